//! Decoders: every control message round-trips; arbitrary bytes never panic
//! and never make a decoder allocate more than the size cap.

use proptest::prelude::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::SocketAddr;
use std::time::Duration;
use transport::crypto::{EntropySource, StaticKeypair};
use transport::wire::{Control, ErrorCode, Frame, IpNet, PeerInfo, CONTROL_CAP};
use transport::{Node, NodeConfig};

/// Records the largest single allocation made on this thread while armed
/// (tests run on several threads; only the decoding thread is watched).
struct Watch;
thread_local! {
    static WATCHING: Cell<bool> = const { Cell::new(false) };
    static BIGGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(n: usize) {
    let _ = WATCHING.try_with(|w| {
        if w.get() {
            let _ = BIGGEST.try_with(|b| b.set(b.get().max(n)));
        }
    });
}

/// Largest allocation made while running `f` on this thread.
fn largest_allocation(f: impl FnOnce()) -> usize {
    BIGGEST.with(|b| b.set(0));
    WATCHING.with(|w| w.set(true));
    f();
    WATCHING.with(|w| w.set(false));
    BIGGEST.with(|b| b.get())
}

unsafe impl GlobalAlloc for Watch {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size());
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        note(n);
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Watch = Watch;

fn addr() -> impl Strategy<Value = SocketAddr> {
    (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p)))
}

fn ipnet() -> impl Strategy<Value = IpNet> {
    (any::<[u8; 4]>(), 0u8..=32).prop_map(|(ip, prefix)| IpNet {
        addr: std::net::IpAddr::from(ip),
        prefix,
    })
}

fn peer() -> impl Strategy<Value = PeerInfo> {
    (
        any::<[u8; 32]>(),
        prop::collection::vec(ipnet(), 0..3),
        prop::collection::vec(addr(), 0..4),
        "[a-z0-9-]{0,20}",
        prop::collection::vec(ipnet(), 0..3),
    )
        .prop_map(|(key, overlay, endpoints, name, routes)| PeerInfo {
            key,
            overlay,
            endpoints,
            name,
            routes,
        })
}

fn code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::AddressInUse),
        Just(ErrorCode::NotAllowed),
        Just(ErrorCode::BadRequest),
        Just(ErrorCode::Busy),
        Just(ErrorCode::Revoked),
        Just(ErrorCode::NotListed),
        Just(ErrorCode::RouteInUse)
    ]
}

fn control() -> impl Strategy<Value = Control> {
    prop_oneof![
        (
            prop::collection::vec(ipnet(), 0..3),
            prop::collection::vec(addr(), 0..4),
            ".{0,30}",
            any::<u64>(),
            prop::collection::vec(ipnet(), 0..3),
        )
            .prop_map(|(overlay, local_endpoints, name, have_version, routes)| {
                Control::Register {
                    lookups: have_version % 2 == 0,
                    overlay,
                    local_endpoints,
                    name,
                    have_version,
                    routes,
                }
            }),
        (addr(), any::<u32>(), any::<bool>()).prop_map(|(observed, heartbeat_ms, on_demand)| {
            Control::RegisterAck {
                observed,
                heartbeat_ms,
                on_demand,
            }
        }),
        (
            prop::collection::vec(ipnet(), 0..8),
            prop::collection::vec(any::<[u8; 32]>(), 0..5)
        )
            .prop_map(|(nets, keys)| Control::Lookup {
                addrs: nets.iter().map(|n| n.addr).collect(),
                keys,
            }),
        prop::collection::vec(any::<[u8; 32]>(), 0..5).prop_map(|keys| Control::Forget { keys }),
        (
            prop::collection::vec(peer(), 0..5),
            prop::collection::vec(any::<[u8; 32]>(), 0..5),
            prop::collection::vec(ipnet(), 0..8)
        )
            .prop_map(|(upserts, removals, nets)| Control::Records {
                upserts,
                revoked: removals.iter().take(1).copied().collect(),
                removals,
                missing: nets.iter().map(|n| n.addr).collect(),
            }),
        (code(), ".{0,40}").prop_map(|(code, message)| Control::Nack { code, message }),
        (
            any::<u64>(),
            any::<u64>(),
            prop::collection::vec(peer(), 0..5),
            prop::collection::vec(any::<[u8; 32]>(), 0..5)
        )
            .prop_map(|(from_version, to_version, upserts, removals)| {
                Control::PeerMapDelta {
                    from_version,
                    to_version,
                    upserts,
                    revoked: removals.iter().take(1).copied().collect(),
                    removals,
                }
            }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(seq, map_version)| Control::Heartbeat { seq, map_version }),
        (any::<u64>(), addr(), any::<Option<u32>>()).prop_map(|(seq, observed, interval_ms)| {
            Control::HeartbeatAck {
                seq,
                observed,
                interval_ms,
            }
        }),
        any::<[u8; 32]>().prop_map(|target| Control::PunchRequest { target }),
        (any::<[u8; 32]>(), prop::collection::vec(addr(), 0..4))
            .prop_map(|(peer, candidates)| Control::PunchNotify { peer, candidates }),
        any::<u64>().prop_map(|ts_us| Control::Ping { ts_us }),
        any::<u64>().prop_map(|ts_us| Control::Pong { ts_us }),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(frames, highest, bytes)| {
            Control::Feedback {
                frames,
                highest,
                bytes,
            }
        }),
        any::<u32>().prop_map(|conv| Control::ConvReset { conv }),
        Just(Control::Leave),
        (code(), ".{0,40}").prop_map(|(code, message)| Control::Error { code, message }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    #[test]
    fn every_control_message_round_trips(m in control()) {
        let enc = m.encode().unwrap();
        prop_assert!(enc.len() <= CONTROL_CAP);
        prop_assert_eq!(Control::decode(&enc).unwrap(), m);
    }

    #[test]
    fn arbitrary_bytes_never_panic_or_overallocate(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let n = largest_allocation(|| {
            let _ = Control::decode(&bytes);
            let _ = Frame::parse(&bytes);
        });
        prop_assert!(n <= CONTROL_CAP, "allocated {}", n);
    }

    #[test]
    fn length_prefixes_claiming_huge_sizes_are_refused(tag in prop::sample::select(vec![0xc6u8, 0xdb, 0xdd, 0xdf]), len in any::<u32>(), tail in prop::collection::vec(any::<u8>(), 0..64)) {
        // bin32 / str32 / array32 / map32 headers with any claimed length.
        let mut b = vec![0x81, 0xa8]; // map of 1, key "Register"-like str8 of 8
        b.extend_from_slice(b"Register");
        b.push(tag);
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(&tail);
        let mut r = Ok(Control::Ping { ts_us: 0 });
        let n = largest_allocation(|| r = Control::decode(&b));
        prop_assert!(r.is_err());
        prop_assert!(n <= CONTROL_CAP, "allocated {}", n);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, .. ProptestConfig::default() })]

    /// The whole receive path of a node (frame parse, handshake, decrypt, KCP,
    /// control decode) takes arbitrary datagrams and only counts drops.
    #[test]
    fn node_survives_arbitrary_datagrams(frames in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..20), ty in 1u8..=3) {
        let mut node = Node::new(NodeConfig::default(), StaticKeypair::from_seed(1), [1; 32], 0, EntropySource::seeded(1));
        node.add_peer(StaticKeypair::from_seed(2).public, Some("1.2.3.4:5".parse().unwrap()));
        let from: SocketAddr = "9.9.9.9:9".parse().unwrap();
        let mut out = fastmesh_tests::Frames::default();
        for (i, mut f) in frames.into_iter().enumerate() {
            if f.len() >= 2 { f[0] = 1; f[1] = ty; } // reach past the version check
            node.handle_datagram(Duration::from_millis(i as u64), from, &mut f);
            node.service(Duration::from_millis(i as u64), &mut out);
            out.clear();
        }
        prop_assert_eq!(out.delivered, 0);
        let s = node.stats();
        prop_assert!(s.malformed + s.unknown_index + s.handshake_failed >= 1);
    }
}
