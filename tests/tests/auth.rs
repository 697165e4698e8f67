//! Authentication: network key, static keys, tampering, replay; and link death.

use fastmesh_tests::overlay;
use sim::des::{pair, pair_idle, Net, SIM_PSK};
use sim::impair::LinkSpec;
use sim::traffic::{self, Kind};
use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;
use transport::session::Event;
use transport::{Admission, NodeConfig};

fn ms(x: u64) -> Duration {
    Duration::from_millis(x)
}

fn udp(seq: u32) -> Vec<u8> {
    traffic::packet(overlay(0), overlay(1), Kind::Udp, 1, seq, 200)
}

#[test]
fn wrong_network_key_cannot_handshake() {
    let mut net = Net::new(1, LinkSpec::latency(ms(5)));
    let (aa, ba): (SocketAddr, SocketAddr) =
        ("10.0.0.1:1".parse().unwrap(), "10.0.0.2:1".parse().unwrap());
    let hub_cfg = NodeConfig {
        admission: Admission::AnyWithNetworkKey,
        ..NodeConfig::default()
    };
    let mut a = net.make_node(NodeConfig::default(), 1, [9u8; 32]); // wrong key
    let b = net.make_node(hub_cfg, 2, SIM_PSK);
    let kb = *b.public_key();
    a.add_peer(kb, Some(ba));
    net.add(a, aa);
    net.add(b, ba);
    net.send_at(ms(0), 0, kb, udp(0));
    net.run_for(Duration::from_secs(10));
    let b = &net.node(1).node;
    assert!(b.stats().handshake_failed >= 3, "{:?}", b.stats());
    assert_eq!(b.peers().count(), 0, "nothing learned about the intruder");
    assert_eq!(net.wire(1, 0).packets, 0, "the responder never answered");
    assert!(net.node(1).rx.is_empty());
}

#[test]
fn unknown_static_key_is_refused_by_a_peer() {
    let (mut net, ka, _kb) = pair_idle(2, NodeConfig::default(), LinkSpec::latency(ms(5)));
    // B forgets A: A's valid handshake is now from an unknown key.
    net.node_mut(1).node.remove_peer(&ka);
    let kb = *net.node(1).node.public_key();
    net.send_at(ms(0), 0, kb, udp(0));
    net.run_for(Duration::from_secs(5));
    assert!(net.node(1).node.stats().unknown_key >= 1);
    assert_eq!(net.wire(1, 0).packets, 0);
    assert!(net.node(1).rx.is_empty());
}

#[test]
fn flipped_byte_fails_authentication_and_replay_is_dropped() {
    let (mut net, _ka, kb) = pair(3, NodeConfig::default(), LinkSpec::latency(ms(5)));
    let captured: Rc<RefCell<Vec<Vec<u8>>>> = Rc::default();
    let cap = captured.clone();
    let flip = Rc::new(RefCell::new(false));
    let f2 = flip.clone();
    net.set_tap(Box::new(move |from, _to, bytes| {
        if from == 0 && bytes.len() > 200 {
            cap.borrow_mut().push(bytes.clone());
            // Only frames the size of the first data frame: the session's
            // path-MTU probes and capacity trains (larger) go untouched.
            let data = cap.borrow()[0].len() == bytes.len();
            if *f2.borrow() && data {
                let i = bytes.len() - 20;
                bytes[i] ^= 0x01;
            }
        }
        true
    }));
    let t = net.now();
    net.send_at(t, 0, kb, udp(0));
    net.run_for(ms(100));
    assert_eq!(net.node(1).rx.len(), 1);
    // Replay the captured frame later: dropped and counted, not delivered.
    let frame = captured.borrow()[0].clone();
    let from = net.node(0).addr;
    net.inject(net.now() + ms(1), from, 1, frame.clone());
    net.run_for(ms(100));
    assert_eq!(net.node(1).rx.len(), 1);
    assert_eq!(net.node(1).node.stats().replayed, 1);
    // Tamper with one ciphertext byte in flight: fails authentication.
    *flip.borrow_mut() = true;
    let t = net.now();
    net.send_at(t, 0, kb, udp(1));
    net.run_for(ms(100));
    assert_eq!(net.node(1).rx.len(), 1);
    assert_eq!(net.node(1).node.stats().auth_failed, 1);
    // Tampering with the header (authenticated as associated data) fails too.
    let mut hdr = frame;
    hdr[8] ^= 0x80; // counter byte
    net.inject(net.now() + ms(1), from, 1, hdr);
    net.run_for(ms(100));
    assert_eq!(net.node(1).node.stats().auth_failed, 2);
}

#[test]
fn short_partition_heals_without_a_new_handshake() {
    let (mut net, ka, kb) = pair(4, NodeConfig::default(), LinkSpec::latency(ms(20)));
    let t0 = net.now();
    for i in 0..300u32 {
        net.send_at(
            t0 + ms(i as u64 * 20),
            0,
            kb,
            traffic::packet(overlay(0), overlay(1), Kind::Tcp, 1, i, 500),
        );
    }
    net.run_for(ms(1000));
    net.partition(0, 1, true);
    net.run_for(Duration::from_secs(5)); // below the 20 s dead-link threshold
    net.partition(0, 1, false);
    net.run_for(Duration::from_secs(10));
    let rx: Vec<Vec<u8>> = net.node(1).rx.iter().map(|d| d.pkt.clone()).collect();
    traffic::verify(rx, &[(1u16, 300u32)].into_iter().collect()).expect("all delivered in order");
    assert_eq!(
        net.node(0).node.peer_stats(&kb).unwrap().handshakes,
        1,
        "no new handshake"
    );
    assert!(!net.node(0).events.iter().any(|e| e.2 == Event::DeadLink));
    let _ = ka;
}

#[test]
fn long_partition_raises_dead_link_then_recovers() {
    let (mut net, _ka, kb) = pair(5, NodeConfig::default(), LinkSpec::latency(ms(20)));
    net.partition(0, 1, true);
    net.run_for(Duration::from_secs(30));
    let dead: Vec<_> = net
        .node(0)
        .events
        .iter()
        .filter(|e| e.2 == Event::DeadLink)
        .collect();
    assert_eq!(dead.len(), 1, "{:?}", net.node(0).events);
    assert!(net.node(0).node.session(&kb).unwrap().is_dead());
    net.partition(0, 1, false);
    let t = net.now() + Duration::from_secs(10);
    net.send_at(t, 0, kb, udp(7));
    net.run_for(Duration::from_secs(15));
    assert!(net.node(0).events.iter().any(|e| e.2 == Event::Recovered));
    assert!(!net.node(0).node.session(&kb).unwrap().is_dead());
    assert_eq!(net.node(1).rx.len(), 1, "traffic flows again");
}

#[test]
fn a_flood_of_bogus_initiations_is_rate_limited_before_any_crypto() {
    let (mut a, mut b, _ka, kb) = fastmesh_tests::two_nodes(2, SIM_PSK);
    let a_addr: SocketAddr = fastmesh_tests::NODE_A.parse().unwrap();
    let b_addr: SocketAddr = fastmesh_tests::NODE_B.parse().unwrap();
    // 5,000 bogus initiations in one second from one address.
    let flooder: SocketAddr = "203.0.113.9:5555".parse().unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..5_000u64 {
        let mut f = vec![0u8; transport::wire::INIT_FRAME_LEN];
        for v in f.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *v = x as u8;
        }
        transport::wire::write_init_header(&mut f, i as u32);
        b.handle_datagram(Duration::from_micros(i * 200), flooder, &mut f);
    }
    let st = b.stats().clone();
    // Burst 40 plus 20 a second: about 60 reach Noise, the rest cost nothing.
    assert!(st.init_rate_limited >= 4_900, "{st:?}");
    assert_eq!(st.init_rate_limited + st.handshake_failed, 5_000, "{st:?}");
    // No reply to any of them.
    let mut out = fastmesh_tests::Frames::default();
    b.service(Duration::from_secs(1), &mut out);
    assert!(out.is_empty(), "{} replies", out.len());
    // A genuine peer from another address still gets its handshake through.
    let now = Duration::from_secs(1);
    a.connect(now, &kb).unwrap();
    fastmesh_tests::exchange(&mut a, a_addr, &mut b, b_addr, now);
    assert!(a.session(&kb).unwrap().is_established());
}

/// Handshake `from` (at `addr`) with `hub` at time `now`, both ways until quiet.
fn handshake(
    from: &mut transport::Node,
    addr: SocketAddr,
    hub: &mut transport::Node,
    hub_addr: SocketAddr,
    now: Duration,
) {
    let kh = *hub.public_key();
    from.add_peer(kh, Some(hub_addr));
    from.connect(now, &kh).unwrap();
    fastmesh_tests::exchange(from, addr, hub, hub_addr, now);
}

#[test]
fn a_hub_at_its_session_cap_refuses_newcomers_until_a_session_goes_silent() {
    use transport::crypto::{EntropySource, StaticKeypair};
    use transport::Node;
    let cfg = NodeConfig {
        admission: Admission::AnyWithNetworkKey,
        max_sessions: 2,
        ..NodeConfig::default()
    };
    let hub_addr: SocketAddr = "10.0.0.100:4000".parse().unwrap();
    let mut hub = Node::new(
        cfg,
        StaticKeypair::from_seed(100),
        SIM_PSK,
        1_700_000_000_000,
        EntropySource::seeded(7),
    );
    let mut members: Vec<(Node, SocketAddr)> = (0..4u8)
        .map(|i| {
            let n = Node::new(
                NodeConfig::default(),
                StaticKeypair::from_seed(u64::from(i) + 1),
                SIM_PSK,
                1_700_000_000_000,
                EntropySource::seeded(u64::from(i) + 20),
            );
            (n, format!("10.0.0.{}:4000", i + 1).parse().unwrap())
        })
        .collect();
    let kh = *hub.public_key();
    let t = Duration::from_secs(1);
    for (n, a) in members.iter_mut().take(3) {
        handshake(n, *a, &mut hub, hub_addr, t);
    }
    assert!(members[0].0.session(&kh).unwrap().is_established());
    assert!(members[1].0.session(&kh).unwrap().is_established());
    assert!(!members[2].0.session(&kh).unwrap().is_established());
    assert_eq!(hub.peers().count(), 2);
    assert!(hub.stats().session_cap >= 1, "{:?}", hub.stats());
    assert_eq!(hub.stats().evicted, 0);
    // Member 1 keeps talking; member 0 falls silent for longer than EVICT_SILENT.
    let later = t + transport::node::EVICT_SILENT + Duration::from_secs(1);
    let (n1, a1) = &mut members[1];
    handshake(n1, *a1, &mut hub, hub_addr, later);
    let (n, a) = &mut members[3];
    handshake(n, *a, &mut hub, hub_addr, later);
    assert!(n.session(&kh).unwrap().is_established());
    assert_eq!(hub.stats().evicted, 1, "{:?}", hub.stats());
    let k0 = *members[0].0.public_key();
    let k1 = *members[1].0.public_key();
    assert!(hub.session(&k0).is_none(), "the silent member was evicted");
    assert!(hub.session(&k1).is_some(), "the active member stays");
    assert_eq!(hub.peers().count(), 2, "never more than the cap");
}

/// A hub that reaches members which never acknowledge: reliable control
/// messages pile up in its sessions. With a budget the hub holds at most
/// that much for all of them together and counts what it refuses; without,
/// the same load makes it hold several times more.
#[test]
fn a_hub_holds_no_more_than_its_memory_budget_for_silent_members() {
    use transport::crypto::{EntropySource, StaticKeypair};
    use transport::wire::{Control, ErrorCode};
    use transport::Node;
    const BUDGET: usize = 256 << 10;
    let hub_with = |budget: usize| {
        Node::new(
            NodeConfig {
                admission: Admission::AnyWithNetworkKey,
                memory_budget: budget,
                ..NodeConfig::default()
            },
            StaticKeypair::from_seed(100),
            SIM_PSK,
            1_700_000_000_000,
            EntropySource::seeded(7),
        )
    };
    let load = |hub: &mut Node| -> (usize, u64) {
        let hub_addr: SocketAddr = "10.0.0.100:4000".parse().unwrap();
        let t = Duration::from_secs(1);
        let mut keys = Vec::new();
        for i in 0..4u8 {
            let mut n = Node::new(
                NodeConfig::default(),
                StaticKeypair::from_seed(u64::from(i) + 1),
                SIM_PSK,
                1_700_000_000_000,
                EntropySource::seeded(u64::from(i) + 20),
            );
            let a: SocketAddr = format!("10.0.0.{}:4000", i + 1).parse().unwrap();
            handshake(&mut n, a, hub, hub_addr, t);
            keys.push(*n.public_key());
        }
        // The members fall silent; the hub keeps pushing 1 KB messages.
        let msg = Control::Nack {
            code: ErrorCode::Busy,
            message: "x".repeat(1000),
        };
        let (mut sent, mut peak) = (0u64, 0usize);
        for round in 0..1500u64 {
            let now = t + Duration::from_millis(10 * round);
            for k in &keys {
                if hub.send_control_reliable(now, k, &msg) {
                    sent += 1;
                }
            }
            hub.handle_timeout(now);
            let mut buf = Vec::new();
            while hub.poll_transmit(now, &mut buf).is_some() {}
            peak = peak.max(hub.held_bytes());
        }
        (peak, sent)
    };
    let mut capped = hub_with(BUDGET);
    let (held, sent) = load(&mut capped);
    assert!(held <= BUDGET, "held at most {held} > budget {BUDGET}");
    assert!(
        capped.stats().budget_dropped > 0,
        "the load must reach the budget: {:?}",
        capped.stats()
    );
    let mut free = hub_with(transport::node::MEMORY_BUDGET);
    let (held_free, sent_free) = load(&mut free);
    assert_eq!(free.stats().budget_dropped, 0);
    assert!(
        held_free > 3 * BUDGET,
        "without the budget the same load holds more: {held_free}"
    );
    assert!(sent < sent_free);
    println!(
        "silent members: with a {BUDGET}-byte budget the hub held at most {held} bytes ({} refused); without, {held_free}",
        capped.stats().budget_dropped
    );
}
