//! A seeded mutation fuzzer for every decoder and the
//! receive path, for machines without cargo-fuzz (it needs a nightly
//! toolchain). Inputs are valid frames and messages with random byte flips,
//! truncations, extensions and splices, plus pure noise. A panic anywhere is a
//! crash: the fuzzer prints the target, the input in hex and exits 1.
//!
//! ```text
//! fastmesh-fuzz TARGET COUNT [SEED]     TARGET: frame control ip node handshake all
//! ```
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
    };
    [
        Control::Register {
            overlay: info.overlay.clone(),
            local_endpoints: info.endpoints.clone(),
            name: "x".into(),
            have_version: 3,
        },
        Control::PeerMapDelta {
            from_version: 1,
            to_version: 2,
            upserts: vec![info.clone(), info],
            removals: vec![[1; 32]],
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
    buf: Vec<u8>,
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
            buf: Vec::with_capacity(2048),
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
            self.a.handle_timeout(self.now);
            while self.a.poll_transmit(self.now, &mut self.buf).is_some() {
                if let Some(s) = seen.as_deref_mut() {
                    if s.len() < 64 {
                        s.push(self.buf.clone());
                    }
                }
                self.b.handle_datagram(self.now, from_a, &mut self.buf);
            }
            self.b.handle_timeout(self.now);
            while self.b.poll_transmit(self.now, &mut self.buf).is_some() {
                self.a.handle_datagram(self.now, from_b, &mut self.buf);
            }
            while self.b.poll_rx().is_some() {}
            while self.a.poll_event().is_some() {}
            while self.b.poll_event().is_some() {}
        }
    }
}

fn crash(target: &str, input: &[u8]) -> ! {
    let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
    eprintln!("CRASH in {target}: input {hex}");
    std::process::exit(1);
}

/// Fuzz `target` with `count` inputs from `seed`; returns inputs run. A panic
/// prints the input and exits the process with status 1.
pub fn run(target: &str, count: u64, seed: u64) -> u64 {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut input = Vec::with_capacity(4096);
    let mut done = 0u64;
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
                    "control" => {
                        let _ = Control::decode(&input);
                    }
                    "ip" => {
                        let _ = transport::ip::parse(&input).map(|i| i.flow());
                        let _ = transport::ip::tcp_pure_ack(&input);
                    }
                    _ => {
                        let _ = Frame::parse(&input);
                    }
                }));
                if r.is_err() {
                    crash(target, &input);
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
            let mut buf = Vec::new();
            let mut seeds = Vec::new();
            for i in 0..8u64 {
                let now = Duration::from_secs(i + 1);
                a.connect(now, &kb).unwrap();
                while a.poll_transmit(now, &mut buf).is_some() {
                    seeds.push(buf.clone());
                    b.handle_datagram(now, from, &mut buf.clone());
                }
                while b.poll_transmit(now, &mut buf).is_some() {
                    seeds.push(buf.clone());
                }
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
                    crash(target, &input);
                }
                done += 1;
            }
            let st = b.stats();
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
                p.a.handle_timeout(now);
                frames.clear();
                while p.a.poll_transmit(now, &mut p.buf).is_some() {
                    frames.push(p.buf.clone());
                }
                for f in &frames {
                    for _ in 0..64 {
                        mutate(&mut rng, f, &mut input);
                        // Init frames cost a Diffie-Hellman each: keep them rare.
                        if input.len() == transport::wire::INIT_FRAME_LEN
                            && rng.random_range(0..50) != 0
                        {
                            input.push(0);
                        }
                        let r = catch_unwind(AssertUnwindSafe(|| {
                            p.b.handle_datagram(now, from, &mut input);
                            while p.b.poll_rx().is_some() {}
                        }));
                        if r.is_err() {
                            crash(target, &input);
                        }
                        done += 1;
                    }
                    let mut orig = f.clone();
                    p.b.handle_datagram(now, from, &mut orig);
                }
                p.b.handle_timeout(now);
                while p.b.poll_transmit(now, &mut p.buf).is_some() {
                    p.a.handle_datagram(now, from_b, &mut p.buf);
                }
                while p.b.poll_rx().is_some() {}
                while p.a.poll_event().is_some() {}
                while p.b.poll_event().is_some() {}
            }
            // The session survived all of it.
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
            let after = p.b.peer_stats(&ka).map_or(0, |s| s.ip_rx);
            let st = p.b.stats();
            println!(
                "node: after fuzzing, 10 genuine packets -> {} delivered; drops: malformed {} unknown_index {} auth_failed {} replayed {} handshake_failed {}",
                after - before, st.malformed, st.unknown_index, st.auth_failed, st.replayed, st.handshake_failed
            );
            if after < before + 10 {
                eprintln!("the session did not survive the fuzzing");
                std::process::exit(1);
            }
        }
        _ => {
            eprintln!("unknown target {target}");
            std::process::exit(2);
        }
    }
    done
}
