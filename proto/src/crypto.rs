//! Keys, the Noise handshake, the data-frame AEAD and the replay window.
//!
//! The handshake is `Noise_IKpsk1_25519_ChaChaPoly_BLAKE2s` (snow): the initiator
//! knows the responder's static key in advance (from config or the hub's peer map),
//! both static keys are authenticated, and the network pre-shared key is mixed in
//! at the end of message 1, so a responder rejects an initiator that lacks the
//! network key before it sends anything back. After the handshake the two
//! directional keys drive ChaCha20-Poly1305 with a 64-bit counter nonce, and the
//! 16-byte frame header is authenticated as associated data.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, CHACHA20_POLY1305};
use snow::params::{CipherChoice, DHChoice, HashChoice, NoiseParams};
use snow::resolvers::{CryptoResolver, DefaultResolver};
use snow::types::{Cipher, Dh, Hash, Random};

/// The Noise protocol name used by every fastmesh handshake.
pub const NOISE_PARAMS: &str = "Noise_IKpsk1_25519_ChaChaPoly_BLAKE2s";
/// Bound into every handshake so other Noise protocols' messages never verify.
pub const PROLOGUE: &[u8] = b"fastmesh/1";
/// Counter value after which a key must not be used (rotate long before).
pub const REJECT_AFTER_MESSAGES: u64 = u64::MAX - (1 << 13);

/// Why a cryptographic operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// Noise rejected the message: wrong key, wrong PSK or tampered bytes.
    #[error("handshake failed: {0}")]
    Handshake(String),
    /// AEAD tag did not verify.
    #[error("authentication failed")]
    Auth,
    /// Counter outside the replay window or already seen.
    #[error("replayed or too old counter {0}")]
    Replay(u64),
    /// The key has reached its message limit.
    #[error("key exhausted")]
    Exhausted,
}

/// A long-term X25519 key pair.
#[derive(Clone, PartialEq, Eq)]
pub struct StaticKeypair {
    /// Private scalar (keep secret).
    pub private: [u8; 32],
    /// Public key, shared with the network.
    pub public: [u8; 32],
}

impl std::fmt::Debug for StaticKeypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StaticKeypair({})", short_key(&self.public))
    }
}

/// First 8 hex digits of a key, for logs.
pub fn short_key(k: &[u8; 32]) -> String {
    k[..4].iter().map(|b| format!("{b:02x}")).collect()
}

impl StaticKeypair {
    /// Derive the public key from a private key.
    pub fn from_private(private: [u8; 32]) -> StaticKeypair {
        let mut dh = DefaultResolver
            .resolve_dh(&DHChoice::Curve25519)
            .expect("x25519 available");
        dh.set(&private);
        let mut public = [0u8; 32];
        public.copy_from_slice(dh.pubkey());
        StaticKeypair { private, public }
    }

    /// A new key pair drawn from `entropy` (seeded from the OS by the
    /// binaries: `transport::os_entropy`).
    pub fn generate(entropy: &mut EntropySource) -> StaticKeypair {
        let mut p = [0u8; 32];
        entropy.fill(&mut p);
        StaticKeypair::from_private(p)
    }

    /// A key pair derived from a seed (simulations and tests only).
    pub fn from_seed(seed: u64) -> StaticKeypair {
        let mut p = [0u8; 32];
        ChaCha20Rng::seed_from_u64(seed ^ 0x6b65_7973).fill_bytes(&mut p);
        StaticKeypair::from_private(p)
    }
}

/// Where keys, handshake ephemerals, indices and incarnations come from: a
/// ChaCha20 stream. The protocol core makes no OS calls, so the caller seeds
/// it: with 32 bytes from the OS in the binaries (`transport::os_entropy`),
/// with a number in simulations so that they replay bit for bit.
pub struct EntropySource(Box<ChaCha20Rng>);

impl EntropySource {
    /// A source seeded with 32 bytes of real entropy.
    pub fn from_seed(seed: [u8; 32]) -> EntropySource {
        EntropySource(Box::new(ChaCha20Rng::from_seed(seed)))
    }

    /// A deterministic source (simulations and tests only: 64 bits of seed).
    pub fn seeded(seed: u64) -> EntropySource {
        EntropySource(Box::new(ChaCha20Rng::seed_from_u64(seed)))
    }

    /// Fill `out` with random bytes.
    pub fn fill(&mut self, out: &mut [u8]) {
        self.0.fill_bytes(out);
    }

    /// A random u32.
    pub fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill(&mut b);
        u32::from_le_bytes(b)
    }

    fn fork(&mut self) -> Box<dyn Random> {
        let mut seed = [0u8; 32];
        self.0.fill_bytes(&mut seed);
        Box::new(SeededRandom(ChaCha20Rng::from_seed(seed)))
    }
}

struct SeededRandom(ChaCha20Rng);

impl Random for SeededRandom {
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), snow::Error> {
        self.0.fill_bytes(dest);
        Ok(())
    }
}

struct Resolver(std::sync::Mutex<Option<Box<dyn Random>>>);

impl CryptoResolver for Resolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        // Each handshake gets its own fork of the caller's entropy, once.
        self.0.lock().ok()?.take()
    }
    fn resolve_dh(&self, c: &DHChoice) -> Option<Box<dyn Dh>> {
        DefaultResolver.resolve_dh(c)
    }
    fn resolve_hash(&self, c: &HashChoice) -> Option<Box<dyn Hash>> {
        DefaultResolver.resolve_hash(c)
    }
    fn resolve_cipher(&self, c: &CipherChoice) -> Option<Box<dyn Cipher>> {
        DefaultResolver.resolve_cipher(c)
    }
}

fn builder<'a>(entropy: &mut EntropySource) -> snow::Builder<'a> {
    let params: NoiseParams = NOISE_PARAMS.parse().expect("valid noise params");
    snow::Builder::with_resolver(
        params,
        Box::new(Resolver(std::sync::Mutex::new(Some(entropy.fork())))),
    )
}

fn herr(e: snow::Error) -> CryptoError {
    CryptoError::Handshake(e.to_string())
}

/// The directional keys a finished handshake yields.
///
/// The AEAD is ring's ChaCha20-Poly1305 (assembly on x86-64 and ARM; the
/// RustCrypto one cost about twice the CPU per byte in the namespace benchmark).
pub struct SessionKeys {
    send: LessSafeKey,
    recv: LessSafeKey,
}

impl SessionKeys {
    fn from_split(initiator: bool, split: ([u8; 32], [u8; 32])) -> SessionKeys {
        let (i2r, r2i) = split;
        let (s, r) = if initiator { (i2r, r2i) } else { (r2i, i2r) };
        let key = |k: &[u8; 32]| {
            LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, k).expect("32-byte key"))
        };
        SessionKeys {
            send: key(&s),
            recv: key(&r),
        }
    }

    /// Encrypt `buf` in place with `header` as associated data; returns the tag to append.
    pub fn seal(
        &self,
        counter: u64,
        header: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; 16], CryptoError> {
        if counter >= REJECT_AFTER_MESSAGES {
            return Err(CryptoError::Exhausted);
        }
        if NULL_CIPHER {
            let _ = (header, buf);
            return Ok([0u8; 16]);
        }
        let tag = self
            .send
            .seal_in_place_separate_tag(nonce(counter), Aad::from(header), buf)
            .map_err(|_| CryptoError::Auth)?;
        let mut t = [0u8; 16];
        t.copy_from_slice(tag.as_ref());
        Ok(t)
    }

    /// Decrypt `buf` (ciphertext without tag) in place; fails if the tag does not verify.
    pub fn open(
        &self,
        counter: u64,
        header: &[u8],
        buf: &mut [u8],
        tag: &[u8],
    ) -> Result<(), CryptoError> {
        if NULL_CIPHER {
            let _ = (counter, header, buf);
            return if tag == [0u8; 16] {
                Ok(())
            } else {
                Err(CryptoError::Auth)
            };
        }
        let tag = Tag::try_from(tag).map_err(|_| CryptoError::Auth)?;
        self.recv
            .open_in_place_separate_tag(nonce(counter), Aad::from(header), tag, buf, 0..)
            .map(|_| ())
            .map_err(|_| CryptoError::Auth)
    }
}

/// True only in a build with the `insecure-null-cipher` feature (benchmarks):
/// data frames then go in clear with a zero tag.
pub const NULL_CIPHER: bool = cfg!(feature = "insecure-null-cipher");

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

/// An initiator waiting for message 2.
pub struct InitiatorHandshake {
    hs: snow::HandshakeState,
}

impl InitiatorHandshake {
    /// Build message 1 into `out` (exactly [`crate::wire::NOISE_INIT_LEN`] bytes).
    /// `timestamp` is carried encrypted so a responder can refuse replays of old
    /// initiations; `incarnation` tells the responder whether this node restarted.
    pub fn start(
        local: &StaticKeypair,
        remote: &[u8; 32],
        psk: &[u8; 32],
        timestamp: u64,
        incarnation: u64,
        entropy: &mut EntropySource,
        out: &mut [u8],
    ) -> Result<(InitiatorHandshake, usize), CryptoError> {
        let mut hs = builder(entropy)
            .local_private_key(&local.private)
            .and_then(|b| b.remote_public_key(remote))
            .and_then(|b| b.psk(1, psk))
            .and_then(|b| b.prologue(PROLOGUE))
            .and_then(|b| b.build_initiator())
            .map_err(herr)?;
        let mut payload = [0u8; 16];
        payload[..8].copy_from_slice(&timestamp.to_le_bytes());
        payload[8..].copy_from_slice(&incarnation.to_le_bytes());
        let n = hs.write_message(&payload, out).map_err(herr)?;
        Ok((InitiatorHandshake { hs }, n))
    }

    /// Consume message 2 and derive the session keys; also returns the responder's incarnation.
    pub fn finish(mut self, msg2: &[u8]) -> Result<(SessionKeys, u64), CryptoError> {
        let mut payload = [0u8; 64];
        let n = self.hs.read_message(msg2, &mut payload).map_err(herr)?;
        if !self.hs.is_handshake_finished() || n != 8 {
            return Err(CryptoError::Handshake("bad message 2".into()));
        }
        let mut inc = [0u8; 8];
        inc.copy_from_slice(&payload[..8]);
        Ok((
            SessionKeys::from_split(true, self.hs.dangerously_get_raw_split()),
            u64::from_le_bytes(inc),
        ))
    }
}

/// What a responder learned from a valid message 1.
pub struct ResponderHello {
    hs: snow::HandshakeState,
    /// The initiator's authenticated static key.
    pub remote: [u8; 32],
    /// The initiator's timestamp.
    pub timestamp: u64,
    /// The initiator's incarnation (changes when it restarts).
    pub incarnation: u64,
}

impl ResponderHello {
    /// Read message 1. Fails for a wrong PSK, a tampered message or a message
    /// not addressed to `local`'s key.
    pub fn read(
        local: &StaticKeypair,
        psk: &[u8; 32],
        msg1: &[u8],
        entropy: &mut EntropySource,
    ) -> Result<ResponderHello, CryptoError> {
        let mut hs = builder(entropy)
            .local_private_key(&local.private)
            .and_then(|b| b.psk(1, psk))
            .and_then(|b| b.prologue(PROLOGUE))
            .and_then(|b| b.build_responder())
            .map_err(herr)?;
        let mut payload = [0u8; 64];
        let n = hs.read_message(msg1, &mut payload).map_err(herr)?;
        if n != 16 {
            return Err(CryptoError::Handshake(format!("payload of {n} bytes")));
        }
        let remote: [u8; 32] = hs
            .get_remote_static()
            .and_then(|r| r.try_into().ok())
            .ok_or_else(|| CryptoError::Handshake("no remote static".into()))?;
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&payload[..8]);
        let mut inc = [0u8; 8];
        inc.copy_from_slice(&payload[8..16]);
        Ok(ResponderHello {
            hs,
            remote,
            timestamp: u64::from_le_bytes(ts),
            incarnation: u64::from_le_bytes(inc),
        })
    }

    /// Accept: write message 2 (carrying our `incarnation`) into `out` and derive the session keys.
    pub fn accept(
        mut self,
        incarnation: u64,
        out: &mut [u8],
    ) -> Result<(SessionKeys, usize), CryptoError> {
        let n = self
            .hs
            .write_message(&incarnation.to_le_bytes(), out)
            .map_err(herr)?;
        Ok((
            SessionKeys::from_split(false, self.hs.dangerously_get_raw_split()),
            n,
        ))
    }
}

/// Bits in the sliding replay window.
pub const REPLAY_WINDOW: u64 = 2048;
const BLOCKS: usize = (REPLAY_WINDOW / 64) as usize;

/// Sliding-window replay protection over 64-bit counters (RFC 6479 style).
/// `check` before decrypting, `commit` only after the tag verified, so forged
/// frames can never move the window.
#[derive(Clone)]
pub struct ReplayWindow {
    top: Option<u64>,
    bits: [u64; BLOCKS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow {
            top: None,
            bits: [0; BLOCKS],
        }
    }
}

impl ReplayWindow {
    /// Would `c` be accepted?
    pub fn check(&self, c: u64) -> bool {
        let Some(top) = self.top else { return true };
        if c > top {
            return true;
        }
        if top - c >= REPLAY_WINDOW - 64 {
            return false;
        }
        let (blk, bit) = ((c / 64) as usize % BLOCKS, c % 64);
        self.bits[blk] & (1 << bit) == 0
    }

    /// Mark `c` as seen (call only after `check(c)` and successful authentication).
    pub fn commit(&mut self, c: u64) {
        match self.top {
            Some(top) if c <= top => {}
            top => {
                let old_blk = top.map(|t| t / 64);
                let new_blk = c / 64;
                match old_blk {
                    Some(ob) if new_blk - ob < BLOCKS as u64 => {
                        for b in ob + 1..=new_blk {
                            self.bits[b as usize % BLOCKS] = 0;
                        }
                    }
                    Some(_) => self.bits = [0; BLOCKS],
                    None => {}
                }
                self.top = Some(c);
            }
        }
        self.bits[(c / 64) as usize % BLOCKS] |= 1 << (c % 64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (StaticKeypair, StaticKeypair) {
        (StaticKeypair::from_seed(1), StaticKeypair::from_seed(2))
    }

    #[test]
    fn handshake_and_aead_roundtrip() {
        let (a, b) = pair();
        let psk = [7u8; 32];
        let mut ea = EntropySource::seeded(1);
        let mut eb = EntropySource::seeded(2);
        let mut m1 = [0u8; 256];
        let (init, n1) =
            InitiatorHandshake::start(&a, &b.public, &psk, 42, 9, &mut ea, &mut m1).unwrap();
        assert_eq!(n1, crate::wire::NOISE_INIT_LEN);
        let hello = ResponderHello::read(&b, &psk, &m1[..n1], &mut eb).unwrap();
        assert_eq!(hello.remote, a.public);
        assert_eq!(hello.timestamp, 42);
        assert_eq!(hello.incarnation, 9);
        let mut m2 = [0u8; 256];
        let (kb, n2) = hello.accept(11, &mut m2).unwrap();
        assert_eq!(n2, crate::wire::NOISE_RESP_LEN);
        let (ka, inc) = init.finish(&m2[..n2]).unwrap();
        assert_eq!(inc, 11);
        let hdr = [1u8; 16];
        let mut msg = *b"hello over the mesh";
        let tag = ka.seal(5, &hdr, &mut msg).unwrap();
        assert_ne!(&msg, b"hello over the mesh");
        kb.open(5, &hdr, &mut msg, &tag).unwrap();
        assert_eq!(&msg, b"hello over the mesh");
        // wrong counter or header fails
        let tag = kb.seal(6, &hdr, &mut msg).unwrap();
        let mut copy = msg;
        assert_eq!(ka.open(7, &hdr, &mut copy, &tag), Err(CryptoError::Auth));
        let mut copy = msg;
        assert_eq!(
            ka.open(6, &[2u8; 16], &mut copy, &tag),
            Err(CryptoError::Auth)
        );
    }

    #[test]
    fn wrong_psk_fails_at_responder() {
        let (a, b) = pair();
        let mut e = EntropySource::seeded(3);
        let mut m1 = [0u8; 256];
        let (_i, n1) =
            InitiatorHandshake::start(&a, &b.public, &[1; 32], 0, 0, &mut e, &mut m1).unwrap();
        assert!(ResponderHello::read(&b, &[2; 32], &m1[..n1], &mut e).is_err());
    }

    #[test]
    fn replay_window() {
        let mut w = ReplayWindow::default();
        for c in [0u64, 1, 5, 3, 2000, 1990] {
            assert!(w.check(c), "{c}");
            w.commit(c);
            assert!(!w.check(c), "dup {c}");
        }
        assert!(w.check(100));
        w.commit(3000);
        // far behind the top is refused, just inside is accepted
        assert!(!w.check(3000 - REPLAY_WINDOW));
        assert!(w.check(3000 - REPLAY_WINDOW + 100));
        w.commit(100_000);
        assert!(!w.check(2000));
        assert!(w.check(100_000 - 100));
        assert!(w.check(100_001));
    }
}
