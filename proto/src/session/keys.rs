//! Handshakes and keys: initiating and answering Noise handshakes, installing
//! and rotating session keys (current, previous, next), opening and sealing
//! data frames with their replay window.

use super::{Event, Out, Session};
use crate::cc::Report;
use crate::crypto::{
    CryptoError, EntropySource, InitiatorHandshake, ReplayWindow, ResponderHello, SessionKeys,
    StaticKeypair,
};
use crate::ip;
use crate::path::Via;
use crate::wire::{self, Inner, PublicKey};
use std::collections::BTreeMap;
use std::time::Duration;

pub(super) struct Keypair {
    pub(super) keys: SessionKeys,
    /// When the handshake that made it finished (for rotation by age).
    pub(super) created: Duration,
    pub(super) local_index: u32,
    pub(super) remote_index: u32,
    pub(super) send_counter: u64,
    pub(super) replay: ReplayWindow,
    pub(super) rx: Report,
    /// The remote's incarnation named in the handshake that made these keys,
    /// applied when they are confirmed (responder side).
    pub(super) incarnation: Option<u64>,
}

impl Keypair {
    pub(super) fn new(
        keys: SessionKeys,
        now: Duration,
        local_index: u32,
        remote_index: u32,
    ) -> Keypair {
        Keypair {
            keys,
            created: now,
            local_index,
            remote_index,
            send_counter: 0,
            replay: ReplayWindow::default(),
            rx: Report {
                frames: 0,
                highest: 0,
                bytes: 0,
            },
            incarnation: None,
        }
    }
}

pub(super) struct PendingInit {
    pub(super) hs: InitiatorHandshake,
    pub(super) local_index: u32,
}

/// What a session needs from its node for one call.
pub struct Ctx<'a> {
    /// Current time.
    pub now: Duration,
    /// Wall-clock milliseconds (handshake timestamps only).
    pub wall_ms: u64,
    /// This node's key pair.
    pub local: &'a StaticKeypair,
    /// Network pre-shared key.
    pub psk: &'a [u8; 32],
    /// This node's incarnation (random per start).
    pub incarnation: u64,
    /// Randomness for handshakes.
    pub entropy: &'a mut EntropySource,
    /// Index -> remote key map shared by all sessions of the node.
    pub indices: &'a mut BTreeMap<u32, PublicKey>,
}

impl Ctx<'_> {
    pub(super) fn alloc_index(&mut self, remote: PublicKey) -> u32 {
        loop {
            let i = self.entropy.next_u32();
            if i != 0 && !self.indices.contains_key(&i) {
                self.indices.insert(i, remote);
                return i;
            }
        }
    }
}

impl Session {
    /// True while our handshake initiation awaits its response.
    pub fn handshaking(&self) -> bool {
        self.pending_init.is_some()
    }

    /// Start (or restart) a handshake now.
    pub fn start_handshake(&mut self, ctx: &mut Ctx) {
        self.wanted = true;
        if self.paths.current().is_none() {
            // Nowhere to send yet; try again later (the endpoint may be learned).
            self.next_handshake = Some(ctx.now + self.cfg.handshake_retry);
            return;
        }
        if let Some(p) = self.pending_init.take() {
            ctx.indices.remove(&p.local_index);
        }
        let idx = ctx.alloc_index(self.remote);
        let mut frame = vec![0u8; wire::INIT_FRAME_LEN];
        wire::write_init_header(&mut frame, idx);
        // Two initiations in one millisecond (a retry and a restart by the
        // owner) once carried the same timestamp: the responder answered the
        // first, which we had already replaced, and refused the second as a
        // replay, so neither completed (`hubload 10000`: members stuck for
        // minutes, every retry meeting a restart).
        let ts = ctx
            .wall_ms
            .max(self.last_init_ts + 1)
            .max(self.last_sent_ts + 1);
        self.last_sent_ts = ts;
        match InitiatorHandshake::start(
            ctx.local,
            &self.remote,
            ctx.psk,
            ts,
            self.incarnation,
            ctx.entropy,
            &mut frame[wire::INIT_HEADER_LEN..],
        ) {
            Ok((hs, _)) => {
                self.pending_init = Some(Box::new(PendingInit {
                    hs,
                    local_index: idx,
                }));
                for via in self.paths.handshake_paths() {
                    self.urgent.push_back(Out::RawTo(via, frame.clone()));
                }
                let backoff = 1u32 << self.handshake_attempts.min(3);
                self.handshake_attempts += 1;
                self.next_handshake = Some(ctx.now + self.cfg.handshake_retry * backoff);
            }
            Err(_) => {
                ctx.indices.remove(&idx);
            }
        }
    }

    /// A valid handshake initiation from this session's remote arrived.
    pub fn on_init(
        &mut self,
        ctx: &mut Ctx,
        hello: ResponderHello,
        sender_index: u32,
        from: Via,
    ) -> bool {
        self.now = ctx.now;
        // Timestamps only grow, across the remote's restarts too (they come
        // from its wall clock): an older or repeated one is a replay, whatever
        // incarnation it names.
        if hello.timestamp <= self.last_init_ts {
            return false;
        }
        if self.pending_init.is_some() && self.my_bit == 1 {
            // Both sides initiated at once: the lower key stays the initiator.
            return false;
        }
        if let Some(p) = self.pending_init.take() {
            ctx.indices.remove(&p.local_index);
        }
        self.last_init_ts = hello.timestamp;
        let incarnation = hello.incarnation;
        let idx = ctx.alloc_index(self.remote);
        let mut frame = vec![0u8; wire::RESP_FRAME_LEN];
        wire::write_resp_header(&mut frame, idx, sender_index);
        let keys = match hello.accept(self.incarnation, &mut frame[wire::RESP_HEADER_LEN..]) {
            Ok((k, _)) => k,
            Err(_) => {
                ctx.indices.remove(&idx);
                return false;
            }
        };
        if let Some(old) = self.next.take() {
            ctx.indices.remove(&old.local_index);
        }
        // A new incarnation resets the conversations, and the path follows
        // the remote, only once the initiator proves it is live (its first
        // frame under the new keys, see `on_data`): a replayed initiation
        // changes nothing but the answer it gets.
        let mut kp = Box::new(Keypair::new(keys, ctx.now, idx, sender_index));
        kp.incarnation = Some(incarnation);
        self.next = Some(kp);
        self.urgent.push_back(Out::RawTo(from, frame));
        true
    }

    /// When the current keys are due for rotation (None without keys).
    pub(super) fn rekey_due(&self) -> Option<Duration> {
        let k = self.current.as_ref()?;
        if self.next.is_some() {
            return None; // a rotation started by the remote is completing
        }
        // One side (the one that wins simultaneous starts) rotates; the other
        // only if that one has not, later, so the two rarely cross.
        let (messages, stagger) = if self.my_bit == 1 {
            (self.cfg.rekey_after_messages, Duration::ZERO)
        } else {
            (
                self.cfg.rekey_after_messages.saturating_mul(2),
                self.cfg.rekey_after / 8,
            )
        };
        if k.send_counter >= messages {
            return Some(self.now);
        }
        Some(k.created + self.cfg.rekey_after + stagger)
    }

    pub(super) fn check_incarnation(&mut self, now: Duration, inc: u64) {
        if let Some(old) = self.remote_incarnation {
            if old != inc {
                self.reset_convs();
                self.events.push_back(Event::PeerRestarted);
            }
        }
        self.remote_incarnation = Some(inc);
        let _ = now;
    }

    /// A handshake response addressed to `receiver_index` arrived.
    pub fn on_resp(
        &mut self,
        ctx: &mut Ctx,
        sender_index: u32,
        receiver_index: u32,
        noise: &[u8],
        from: Via,
    ) -> Result<(), CryptoError> {
        self.now = ctx.now;
        let Some(p) = self
            .pending_init
            .take_if(|p| p.local_index == receiver_index)
        else {
            return Err(CryptoError::Handshake(
                "no handshake pending for that index".into(),
            ));
        };
        let local_index = p.local_index;
        let (keys, incarnation) = match p.hs.finish(noise) {
            Ok(k) => k,
            Err(e) => {
                ctx.indices.remove(&local_index);
                self.stats.auth_failed += 1;
                return Err(e);
            }
        };
        self.check_incarnation(ctx.now, incarnation);
        self.install(
            ctx,
            Box::new(Keypair::new(keys, ctx.now, local_index, sender_index)),
        );
        self.paths.on_rx(ctx.now, from);
        // Confirm to the responder at once; it will not send on the new key before.
        self.urgent
            .push_back(Out::Plain(vec![Inner::Keepalive as u8]));
        Ok(())
    }

    pub(super) fn install(&mut self, ctx: &mut Ctx, kp: Box<Keypair>) {
        if self.current.is_none() {
            // A new session measures its paths before it may go quiet.
            self.last_data = ctx.now;
        }
        if let Some(old) = self.previous.take() {
            ctx.indices.remove(&old.local_index);
        }
        // Keys from an initiation of the remote's that crossed ours, still
        // unconfirmed, are older than these: promoted later (by a frame the
        // remote sent before it saw ours), they would put this side back on
        // them while the remote moves on, and once each side dropped the
        // other's keys the pair would be deaf both ways until a restart.
        if let Some(stale) = self.next.take() {
            ctx.indices.remove(&stale.local_index);
        }
        self.previous = self.current.replace(kp);
        self.installed_at = ctx.now;
        // Receiver reports count per key: new keys start from zero (without
        // this, no report went out after a rotation until the new keys had
        // carried as many frames as the old ones, and the sender's rate
        // controller, stuck at its initial rate, held transfers at ~20 Mbit/s).
        // A count this small is passed again within a few frames anyway.
        if self.reported >= 64 {
            self.reported = 0;
        }
        self.next_handshake = None;
        self.handshake_attempts = 0;
        self.stats.handshakes += 1;
        self.last_rx = ctx.now;
        self.next_ping = ctx.now;
        if self.dead {
            self.dead = false;
            self.events.push_back(Event::Recovered);
        }
        self.events.push_back(Event::Established);
        while let Some(p) = self.pending.pop_front() {
            if let Some(info) = ip::parse(&p) {
                self.route(ctx.now, &p, &info);
            }
        }
    }

    /// An encrypted data frame for one of this session's indices arrived.
    /// `buf` holds the whole frame and is decrypted in place.
    pub fn on_data(
        &mut self,
        ctx: &mut Ctx,
        receiver_index: u32,
        counter: u64,
        buf: &mut [u8],
        from: Via,
    ) -> Result<(), CryptoError> {
        self.now = ctx.now;
        let wire_len = buf.len();
        let which = [&self.current, &self.previous, &self.next]
            .iter()
            .position(|k| k.as_ref().is_some_and(|k| k.local_index == receiver_index));
        let Some(which) = which else {
            return Err(CryptoError::Handshake("unknown index".into()));
        };
        let kp = match which {
            0 => self.current.as_mut(),
            1 => self.previous.as_mut(),
            _ => self.next.as_mut(),
        }
        .expect("found above");
        if !kp.replay.check(counter) {
            self.stats.replayed += 1;
            return Err(CryptoError::Replay(counter));
        }
        let (header, rest) = buf.split_at_mut(wire::DATA_HEADER_LEN);
        let ct_len = rest.len() - wire::TAG_LEN;
        let (ct, tag) = rest.split_at_mut(ct_len);
        if let Err(e) = kp.keys.open(counter, header, ct, tag) {
            self.stats.auth_failed += 1;
            return Err(e);
        }
        let newest = kp.replay.check(counter) && kp.rx.highest <= counter;
        kp.replay.commit(counter);
        kp.rx.frames += 1;
        kp.rx.bytes += wire_len as u64;
        kp.rx.highest = kp.rx.highest.max(counter + 1);
        if which == 2 {
            let mut kp = self.next.take().expect("present");
            if let Some(inc) = kp.incarnation.take() {
                self.check_incarnation(ctx.now, inc);
            }
            self.install(ctx, kp);
        }
        if newest && which != 1 {
            self.paths.on_rx(ctx.now, from);
        }
        self.stats.rx_frames += 1;
        self.stats.rx_bytes += wire_len as u64;
        self.last_rx = ctx.now;
        if self.dead {
            self.dead = false;
            self.events.push_back(Event::Recovered);
        }
        let plain = &buf[wire::DATA_HEADER_LEN..wire::DATA_HEADER_LEN + ct_len];
        self.rx_via = Some(from);
        self.dispatch(ctx.now, plain);
        self.rx_via = None;
        self.track_path();
        Ok(())
    }

    pub(super) fn seal(&mut self, plain: &[u8], buf: &mut Vec<u8>) -> bool {
        let Some(kp) = self.current.as_mut() else {
            return false;
        };
        let n = plain.len();
        buf.clear();
        buf.resize(wire::DATA_HEADER_LEN + n + wire::TAG_LEN, 0);
        wire::write_data_header(buf, kp.remote_index, kp.send_counter);
        buf[wire::DATA_HEADER_LEN..wire::DATA_HEADER_LEN + n].copy_from_slice(plain);
        let (h, rest) = buf.split_at_mut(wire::DATA_HEADER_LEN);
        match kp.keys.seal(kp.send_counter, h, &mut rest[..n]) {
            Ok(tag) => {
                rest[n..].copy_from_slice(&tag);
                kp.send_counter += 1;
                true
            }
            Err(_) => false,
        }
    }

    /// Forget all keys (the node is removing this peer).
    pub fn close(&mut self, ctx: &mut Ctx) {
        for i in self.indices() {
            ctx.indices.remove(&i);
        }
        self.current = None;
        self.previous = None;
        self.next = None;
        self.pending_init = None;
        self.reset_convs();
    }

    /// Local indices this session holds (for the node's index map).
    pub fn indices(&self) -> Vec<u32> {
        let mut v = Vec::new();
        for k in [&self.current, &self.previous, &self.next]
            .into_iter()
            .flatten()
        {
            v.push(k.local_index);
        }
        if let Some(p) = &self.pending_init {
            v.push(p.local_index);
        }
        v
    }
}
