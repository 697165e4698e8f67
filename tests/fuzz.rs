//! A seeded mutation fuzzer for every decoder and the
//! receive path, for machines without cargo-fuzz (it needs a nightly
//! toolchain). Inputs are valid frames and messages with random byte flips,
//! truncations, extensions and splices, plus pure noise. A panic anywhere is a
//! crash: [`run`] returns it with its input (the `fastmesh-fuzz` binary prints
//! the target and the input in hex and exits 1).
//!
//! ```text
//! fastmesh-fuzz TARGET COUNT [SEED]     TARGET: frame control ip node inner handshake all
//! ```
//!
//! `inner` reaches past decryption: mutated plaintexts are sealed with the
//! sender's real keys, so the receiver's dispatch, KCP input, control decode
//! and relay handling see every mutation.
//!
//! `node` drives two established nodes: the mutated frames go into the
//! receiver's `Node::handle_datagram` (header parse, index lookup, replay
//! window, AEAD, KCP input, control decode, handshake on init frames), and
//! between batches genuine traffic must still flow.

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::net::{Ipv4Addr, SocketAddr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;
use transport::wire::{Control, ErrorCode, Frame, IpNet, PeerInfo};
use transport::Node;

fn mutate(rng: &mut ChaCha8Rng, seed_input: &[u8], out: &mut Vec<u8>) {
    out.clear();
    match rng.random_range(0..10) {
        0 => {
            let n = rng.random_range(0..200);
            out.resize(n, 0);
            rng.fill_bytes(out);
        }
        _ => {
            out.extend_from_slice(seed_input);
            for _ in 0..rng.random_range(1..5) {
                match rng.random_range(0..5) {
                    0 | 1 if !out.is_empty() => {
                        let i = rng.random_range(0..out.len());
                        out[i] ^= 1 << rng.random_range(0..8);
                    }
                    2 if !out.is_empty() => {
                        let n = rng.random_range(0..out.len());
                        out.truncate(n);
                    }
                    3 => {
                        let n = rng.random_range(1..64);
                        for _ in 0..n {
                            out.push(rng.random());
                        }
                    }
                    _ if !out.is_empty() => {
                        let i = rng.random_range(0..out.len());
                        out[i] = rng.random();
                    }
                    _ => {}
                }
            }
        }
    }
}

fn controls() -> Vec<Vec<u8>> {
    let info = PeerInfo {
        key: [7; 32],
        overlay: vec![IpNet {
            addr: "10.1.2.3".parse().unwrap(),
            prefix: 24,
        }],
        endpoints: vec!["192.0.2.1:4800".parse().unwrap()],
        name: "n".into(),
        routes: vec![IpNet {
            addr: "192.168.5.0".parse().unwrap(),
            prefix: 24,
        }],
    };
    [
        Control::Register {
            overlay: info.overlay.clone(),
            local_endpoints: info.endpoints.clone(),
            name: "x".into(),
            have_version: 3,
            routes: info.routes.clone(),
            lookups: true,
        },
        Control::Lookup {
            addrs: vec!["10.0.0.9".parse().unwrap()],
            keys: vec![[2; 32]],
        },
        Control::Records {
            upserts: vec![info.clone()],
            removals: vec![[3; 32]],
            revoked: vec![[3; 32]],
            missing: vec!["10.0.0.8".parse().unwrap()],
        },
        Control::Forget {
            keys: vec![[4; 32]],
        },
        Control::PeerMapDelta {
            from_version: 1,
            to_version: 2,
            upserts: vec![info.clone(), info],
            removals: vec![[1; 32]],
            revoked: vec![[1; 32]],
        },
        Control::Heartbeat {
            seq: 9,
            map_version: 2,
        },
        Control::Nack {
            code: ErrorCode::Revoked,
            message: "no".into(),
        },
        Control::Feedback {
            frames: 1,
            highest: 2,
            bytes: 3,
        },
        Control::MtuAck { id: 5 },
    ]
    .iter()
    .map(|c| c.encode().unwrap())
    .collect()
}

fn ip_seeds() -> Vec<Vec<u8>> {
    let a = Ipv4Addr::new(10, 0, 0, 1);
    let b = Ipv4Addr::new(10, 0, 0, 2);
    let mut ack = transport::ip::build_v4(a, b, 6, 1, 2, &[], 40);
    ack[32] = 5 << 4;
    ack[33] = 0x10;
    vec![
        ack,
        transport::ip::build_v4(a, b, 17, 1, 2, b"x", 100),
        transport::ip::build_v6(
            "fd00::1".parse().unwrap(),
            "fd00::2".parse().unwrap(),
            6,
            1,
            2,
            b"y",
            80,
        ),
    ]
}

struct Pair {
    a: Node,
    b: Node,
    now: Duration,
    fa: crate::Frames,
    fb: crate::Frames,
    kb: [u8; 32],
}

const A: &str = crate::NODE_A;

impl Pair {
    fn new(seed: u64) -> Pair {
        let (a, b, _ka, kb) = crate::two_nodes(seed, [9u8; 32]);
        let mut p = Pair {
            a,
            b,
            now: Duration::ZERO,
            fa: crate::Frames::default(),
            fb: crate::Frames::default(),
            kb,
        };
        p.a.connect(p.now, &kb).unwrap();
        for _ in 0..20 {
            p.exchange(None);
        }
        p
    }

    /// Move frames both ways; frames from A are also collected into `seen`.
    fn exchange(&mut self, mut seen: Option<&mut Vec<Vec<u8>>>) {
        self.now += Duration::from_millis(5);
        let from_a: SocketAddr = A.parse().unwrap();
        let from_b: SocketAddr = crate::NODE_B.parse().unwrap();
        for _ in 0..4 {
            self.a.service(self.now, &mut self.fa);
            if let Some(s) = seen.as_deref_mut() {
                for f in self.fa.iter() {
                    if s.len() < 64 {
                        s.push(f.to_vec());
                    }
                }
            }
            self.fa.hand_to(&mut self.b, from_a, self.now);
            self.b.service(self.now, &mut self.fb);
            self.fb.hand_to(&mut self.a, from_b, self.now);
        }
    }
}

/// What a fuzz run found wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FuzzError {
    /// A panic on this input.
    Crash {
        /// The target.
        target: String,
        /// The input that panicked.
        input: Vec<u8>,
    },
    /// Genuine traffic no longer flowed after the fuzzing.
    SessionLost {
        /// The target.
        target: String,
        /// Genuine packets delivered of the 10 sent.
        delivered: u64,
    },
    /// No such target.
    UnknownTarget(String),
}

impl std::fmt::Display for FuzzError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FuzzError::Crash { target, input } => {
                let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
                write!(f, "CRASH in {target}: input {hex}")
            }
            FuzzError::SessionLost { target, delivered } => write!(
                f,
                "{target}: the session did not survive the fuzzing ({delivered} of 10 genuine packets delivered)"
            ),
            FuzzError::UnknownTarget(t) => write!(f, "unknown target {t}"),
        }
    }
}

/// What a fuzz run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Inputs run.
    pub inputs: u64,
    /// Inputs the code under test refused and counted (decode errors, drops
    /// in the node's or session's counters).
    pub rejected: u64,
}

/// Every target, in the order `all` runs them.
pub const TARGETS: [&str; 6] = ["frame", "control", "ip", "node", "inner", "handshake"];

fn crash(target: &str, input: &[u8]) -> FuzzError {
    FuzzError::Crash {
        target: target.to_string(),
        input: input.to_vec(),
    }
}

/// Send 10 genuine datagrams from A to B; an error unless all arrive.
fn genuine_traffic_flows(p: &mut Pair, target: &str) -> Result<(), FuzzError> {
    let ka = *p.a.public_key();
    let before = p.b.peer_stats(&ka).map_or(0, |s| s.ip_rx);
    let kb = p.kb;
    for i in 0..10u32 {
        let now = p.now;
        let pkt = sim::traffic::packet(
            Ipv4Addr::new(10, 9, 0, 1),
            Ipv4Addr::new(10, 9, 0, 2),
            sim::traffic::Kind::Udp,
            2,
            i,
            100,
        );
        p.a.send_ip(now, &kb, &pkt).unwrap();
        p.exchange(None);
    }
    let delivered = p.b.peer_stats(&ka).map_or(0, |s| s.ip_rx) - before;
    if delivered < 10 {
        return Err(FuzzError::SessionLost {
            target: target.to_string(),
            delivered,
        });
    }
    Ok(())
}

/// Fuzz `target` with `count` inputs from `seed`. A panic is caught and
/// returned with its input; so is a session that stopped working.
pub fn run(target: &str, count: u64, seed: u64) -> Result<Summary, FuzzError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut input = Vec::with_capacity(4096);
    let mut done = 0u64;
    let mut rejected = 0u64;
    match target {
        "frame" | "control" | "ip" => {
            let seeds = match target {
                "control" => controls(),
                "ip" => ip_seeds(),
                _ => {
                    let mut p = Pair::new(seed);
                    let mut seen = Vec::new();
                    for i in 0..40u32 {
                        let pkt = sim::traffic::packet(
                            Ipv4Addr::new(10, 9, 0, 1),
                            Ipv4Addr::new(10, 9, 0, 2),
                            if i % 2 == 0 {
                                sim::traffic::Kind::Tcp
                            } else {
                                sim::traffic::Kind::Udp
                            },
                            1,
                            i,
                            300,
                        );
                        let kb = p.kb;
                        let now = p.now;
                        p.a.send_ip(now, &kb, &pkt).unwrap();
                        p.exchange(Some(&mut seen));
                    }
                    seen
                }
            };
            while done < count {
                let s = &seeds[rng.random_range(0..seeds.len())];
                mutate(&mut rng, s, &mut input);
                let r = catch_unwind(AssertUnwindSafe(|| match target {
                    "control" => Control::decode(&input).is_err(),
                    "ip" => {
                        let _ = transport::ip::tcp_pure_ack(&input);
                        transport::ip::parse(&input).map(|i| i.flow()).is_none()
                    }
                    _ => Frame::parse(&input).is_err(),
                }));
                match r {
                    Ok(refused) => rejected += u64::from(refused),
                    Err(_) => return Err(crash(target, &input)),
                }
                done += 1;
            }
        }
        "handshake" => {
            // Genuine initiations and responses, mutated, into a node that
            // admits the initiator's key (every input that survives parsing
            // costs a Diffie-Hellman, so this target is slower).
            // The pre-authentication rate limit is off here: every input
            // that parses should reach the handshake code.
            let unlimited = transport::NodeConfig {
                init_rate_per_source: 1e12,
                init_rate_total: 1e12,
                ..transport::NodeConfig::default()
            };
            let (mut a, mut b, _ka, kb) = crate::two_nodes_with(seed, [9u8; 32], unlimited);
            let from: SocketAddr = A.parse().unwrap();
            let (mut fa, mut fb) = (crate::Frames::default(), crate::Frames::default());
            let mut seeds = Vec::new();
            for i in 0..8u64 {
                let now = Duration::from_secs(i + 1);
                a.connect(now, &kb).unwrap();
                a.service(now, &mut fa);
                seeds.extend(fa.iter().map(|f| f.to_vec()));
                fa.hand_to(&mut b, from, now);
                b.service(now, &mut fb);
                seeds.extend(fb.iter().map(|f| f.to_vec()));
                fb.hand_to(&mut a, crate::NODE_B.parse().unwrap(), now);
            }
            let mut t = Duration::from_secs(100);
            while done < count {
                let s = &seeds[rng.random_range(0..seeds.len())];
                mutate(&mut rng, s, &mut input);
                t += Duration::from_millis(1);
                let r = catch_unwind(AssertUnwindSafe(|| {
                    b.handle_datagram(t, from, &mut input);
                    a.handle_datagram(t, crate::NODE_B.parse().unwrap(), &mut input.clone());
                }));
                if r.is_err() {
                    return Err(crash(target, &input));
                }
                done += 1;
            }
            let st = b.stats();
            rejected = st.malformed + st.handshake_failed + st.init_refused + st.unknown_index;
            println!(
                "handshake: drops at the responder: malformed {} handshake_failed {} init_refused {} unknown_index {}",
                st.malformed, st.handshake_failed, st.init_refused, st.unknown_index
            );
        }
        "node" => {
            // Frames from A are captured before B sees them; B gets mutated
            // copies first (these must fail parse, index, replay or AEAD
            // checks, counted) and then the original, so every check runs
            // against fresh counters and the session keeps going.
            let mut p = Pair::new(seed);
            let from: SocketAddr = A.parse().unwrap();
            let from_b: SocketAddr = crate::NODE_B.parse().unwrap();
            let mut seq = 0u32;
            let mut frames: Vec<Vec<u8>> = Vec::new();
            while done < count {
                let kb = p.kb;
                p.now += Duration::from_millis(5);
                let now = p.now;
                for k in 0..4 {
                    let kind = if k % 2 == 0 {
                        sim::traffic::Kind::Tcp
                    } else {
                        sim::traffic::Kind::Udp
                    };
                    let pkt = sim::traffic::packet(
                        Ipv4Addr::new(10, 9, 0, 1),
                        Ipv4Addr::new(10, 9, 0, 2),
                        kind,
                        1,
                        seq,
                        200,
                    );
                    seq += 1;
                    p.a.send_ip(now, &kb, &pkt).unwrap();
                }
                p.a.service(now, &mut p.fa);
                frames.clear();
                frames.extend(p.fa.iter().map(|f| f.to_vec()));
                p.fa.clear();
                for f in &frames {
                    for _ in 0..64.min(count - done) {
                        mutate(&mut rng, f, &mut input);
                        // Init frames cost a Diffie-Hellman each: keep them rare.
                        if input.len() == transport::wire::INIT_FRAME_LEN
                            && rng.random_range(0..50) != 0
                        {
                            input.push(0);
                        }
                        let r = catch_unwind(AssertUnwindSafe(|| {
                            p.b.handle_datagram(now, from, &mut input);
                            p.b.drain_rx(&mut p.fb);
                        }));
                        if r.is_err() {
                            return Err(crash(target, &input));
                        }
                        done += 1;
                    }
                    let mut orig = f.clone();
                    p.b.handle_datagram(now, from, &mut orig);
                }
                p.b.service(now, &mut p.fb);
                p.fb.hand_to(&mut p.a, from_b, now);
            }
            // The session survived all of it.
            genuine_traffic_flows(&mut p, target)?;
            let st = p.b.stats();
            println!(
                "node: drops: malformed {} unknown_index {} auth_failed {} replayed {} handshake_failed {}",
                st.malformed, st.unknown_index, st.auth_failed, st.replayed, st.handshake_failed
            );
            rejected = st.malformed
                + st.unknown_index
                + st.auth_failed
                + st.replayed
                + st.handshake_failed;
        }
        "inner" => {
            // Behind decryption: mutated plaintexts (IP datagrams, KCP
            // segments, control messages, relay wrappers, keepalives) sealed
            // with A's real session keys, so B authenticates every one and
            // its dispatch, KCP input, control decode and relay handling see
            // the mutations.
            let mut p = Pair::new(seed);
            let ka = *p.a.public_key();
            let seeds = inner_seeds();
            let from: SocketAddr = A.parse().unwrap();
            let mut frame = Vec::with_capacity(4096);
            let before = p.b.peer_stats(&ka).map(|s| s.malformed).unwrap_or(0);
            while done < count {
                let s = &seeds[rng.random_range(0..seeds.len())];
                mutate(&mut rng, s, &mut input);
                if input.is_empty() {
                    input.push(0);
                }
                // Keep the inner-type byte valid most of the time.
                if rng.random_range(0..4) != 0 {
                    input[0] = s[0];
                }
                let kb = p.kb;
                let now = p.now;
                if p.a.seal_plaintext(now, &kb, &input, &mut frame).is_none() {
                    continue;
                }
                let r = catch_unwind(AssertUnwindSafe(|| {
                    p.b.handle_datagram(now, from, &mut frame);
                    p.b.service(now, &mut p.fb);
                    p.fb.clear();
                }));
                if r.is_err() {
                    return Err(crash(target, &input));
                }
                done += 1;
                if done.is_multiple_of(256) {
                    // Genuine traffic on the state the mutations left (a
                    // panic here is charged to the last input).
                    let r = catch_unwind(AssertUnwindSafe(|| p.exchange(None)));
                    if r.is_err() {
                        return Err(crash(target, &input));
                    }
                }
            }
            genuine_traffic_flows(&mut p, target)?;
            let st = p.b.peer_stats(&ka).unwrap_or_default();
            rejected = st.malformed - before;
            println!(
                "inner: {} inputs authenticated; malformed {} backlog_dropped {} relay_dropped {}",
                done,
                rejected,
                st.backlog_dropped,
                p.b.stats().relay_dropped
            );
        }
        other => return Err(FuzzError::UnknownTarget(other.to_string())),
    }
    Ok(Summary {
        inputs: done,
        rejected,
    })
}

/// Plaintexts B could receive from A: one of each inner type, with real KCP
/// segments taken from a TCP flow.
fn inner_seeds() -> Vec<Vec<u8>> {
    use transport::wire::Inner;
    let (src, dst) = (Ipv4Addr::new(10, 9, 0, 1), Ipv4Addr::new(10, 9, 0, 2));
    let with = |t: Inner, body: &[u8]| {
        let mut v = vec![t as u8];
        v.extend_from_slice(body);
        v
    };
    let udp = sim::traffic::packet(src, dst, sim::traffic::Kind::Udp, 1, 0, 200);
    let mut seeds = vec![with(Inner::Ip, &udp), with(Inner::Keepalive, &[])];
    for c in controls() {
        seeds.push(with(Inner::Control, &c));
    }
    // A relay wrapper: the 32-byte key of a node, then a whole frame.
    let mut relay = vec![Inner::Relay as u8];
    relay.extend_from_slice(&[3u8; 32]);
    relay.extend_from_slice(&[1, 3, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    relay.extend_from_slice(&[0u8; 48]);
    seeds.push(relay);
    // FEC: a data frame of group 7 and a parity shard for a group of one.
    let seg = {
        let mut v = Vec::new();
        v.extend_from_slice(&3u32.to_le_bytes());
        v.extend_from_slice(&[81, 0, 128, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        v.extend_from_slice(&4u32.to_le_bytes());
        v.extend_from_slice(b"abcd");
        v
    };
    let mut data = vec![Inner::FecData as u8, 7, 0, 0];
    data.extend_from_slice(&seg);
    seeds.push(data);
    let mut parity = vec![Inner::FecParity as u8, 7, 0, 0, 1, 1];
    parity.extend_from_slice(&(seg.len() as u16).to_le_bytes());
    parity.extend_from_slice(&seg);
    seeds.push(parity);
    // A path MTU probe, and the two pieces of a datagram cut in fragments.
    let mut probe = vec![Inner::MtuProbe as u8, 5, 0, 0, 0];
    probe.extend_from_slice(&[0u8; 64]);
    seeds.push(probe);
    let mut whole = vec![Inner::Ip as u8];
    whole.extend_from_slice(&sim::traffic::packet(
        src,
        dst,
        sim::traffic::Kind::Udp,
        2,
        0,
        300,
    ));
    seeds.extend(transport::session::frag::split(&whole, 11, 200).expect("two pieces"));
    // KCP segments: what A's session builds for a TCP flow, in the form the
    // kcp crate writes them (conversation, command, ..., payload).
    for i in 0..4u32 {
        let tcp = sim::traffic::packet(
            src,
            dst,
            sim::traffic::Kind::Tcp,
            1,
            i,
            100 + 50 * i as usize,
        );
        let mut seg = Vec::new();
        seg.extend_from_slice(&((1u32 << 1) | 1).to_le_bytes()); // a remote-made conversation
        seg.extend_from_slice(&[81, 0]); // push, no fragment
        seg.extend_from_slice(&128u16.to_le_bytes());
        seg.extend_from_slice(&(i * 10).to_le_bytes()); // ts
        seg.extend_from_slice(&i.to_le_bytes()); // sn
        seg.extend_from_slice(&0u32.to_le_bytes()); // una
        seg.extend_from_slice(&(tcp.len() as u32).to_le_bytes());
        seg.extend_from_slice(&tcp);
        seeds.push(with(Inner::Kcp, &seg));
    }
    // A split TCP connection's stream conversation, in order: Open, Data,
    // Fin, then Reset, Accept and Refuse (out of place on purpose).
    use transport::session::{Refusal, StreamMsg, STREAM_BIT};
    let open = StreamMsg::Open {
        src: "10.9.0.1:40000".parse().unwrap(),
        dst: "10.9.0.2:22".parse().unwrap(),
    };
    let msgs = [
        open,
        StreamMsg::Data(b"SSH-2.0-fuzz\r\n".to_vec()),
        StreamMsg::Fin,
        StreamMsg::Reset,
        StreamMsg::Accept,
        StreamMsg::Refuse(Refusal::Declined),
    ];
    for (i, m) in msgs.iter().enumerate() {
        let body = m.encode();
        let mut seg = Vec::new();
        seg.extend_from_slice(&(STREAM_BIT | (2 << 1) | 1).to_le_bytes());
        seg.extend_from_slice(&[81, 0]);
        seg.extend_from_slice(&128u16.to_le_bytes());
        seg.extend_from_slice(&(i as u32 * 10).to_le_bytes());
        seg.extend_from_slice(&(i as u32).to_le_bytes());
        seg.extend_from_slice(&0u32.to_le_bytes());
        seg.extend_from_slice(&(body.len() as u32).to_le_bytes());
        seg.extend_from_slice(&body);
        seeds.push(with(Inner::Kcp, &seg));
    }
    seeds
}
