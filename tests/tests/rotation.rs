//! Session keys rotate on time and on volume without losing traffic; frames
//! under old keys are refused once the rotation window has passed.

use fastmesh_tests::{delivered, schedule_mixed};
use sim::des::pair;
use sim::impair::LinkSpec;
use sim::traffic;
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;
use transport::{NodeConfig, SessionConfig};

fn cfg(rekey: Duration, messages: u64) -> NodeConfig {
    NodeConfig {
        session: SessionConfig {
            rekey_after: rekey,
            rekey_after_messages: messages,
            old_key_window: Duration::from_secs(1),
            ..SessionConfig::default()
        },
        ..NodeConfig::default()
    }
}

#[test]
fn keys_rotate_by_age_without_losing_traffic_and_old_keys_are_refused() {
    let spec = LinkSpec::latency(Duration::from_millis(20)).with_loss(0.02);
    let (mut net, ka, kb) = pair(21, cfg(Duration::from_secs(2), 1 << 40), spec);
    // Capture an early data frame from node 0 to replay later.
    let captured: Rc<RefCell<Option<Vec<u8>>>> = Rc::default();
    let cap = captured.clone();
    net.set_tap(Box::new(move |from, _to, bytes| {
        if from == 0 && bytes.len() > 300 {
            cap.borrow_mut().get_or_insert_with(|| bytes.clone());
        }
        true
    }));
    let before = net.node(0).node.peer_stats(&kb).unwrap().handshakes;
    let expect = schedule_mixed(&mut net, kb, 6_000, Duration::from_secs(12), 4, 21);
    net.run_for(Duration::from_secs(20));
    let s = traffic::verify(delivered(&net, 1), &expect).expect("TCP complete and in order");
    assert_eq!(s.tcp, expect.values().map(|&n| n as u64).sum::<u64>());
    let a = net.node(0).node.peer_stats(&kb).unwrap();
    let b = net.node(1).node.peer_stats(&ka).unwrap();
    let rotations = a.handshakes - before;
    println!(
        "rotations in 20 s with rekey every 2 s: {rotations}; UDP delivered {} (2% loss)",
        s.udp
    );
    assert!(rotations >= 6, "rotated {rotations} times");
    assert!(b.handshakes >= a.handshakes - 1);
    // UDP: only the link's 2% loss, nothing lost to rotation.
    assert!(s.udp * 100 >= 1500 * 95, "UDP delivered {}", s.udp);
    // A frame under keys retired long ago: refused, counted, not delivered.
    let frame = captured.borrow().clone().expect("captured a data frame");
    let rx_before = net.node(1).rx.len();
    let unknown_before = net.node(1).node.stats().unknown_index;
    let from = net.node(0).addr;
    net.inject(net.now() + Duration::from_millis(1), from, 1, frame);
    net.run_for(Duration::from_millis(100));
    assert_eq!(net.node(1).rx.len(), rx_before);
    assert_eq!(net.node(1).node.stats().unknown_index, unknown_before + 1);
}

#[test]
fn keys_rotate_by_volume() {
    let (mut net, _ka, kb) = pair(
        22,
        cfg(Duration::from_secs(3600), 500),
        LinkSpec::latency(Duration::from_millis(10)),
    );
    let before = net.node(0).node.peer_stats(&kb).unwrap().handshakes;
    let expect = schedule_mixed(&mut net, kb, 3_000, Duration::from_secs(6), 2, 22);
    net.run_for(Duration::from_secs(10));
    let s = traffic::verify(delivered(&net, 1), &expect).expect("TCP complete and in order");
    let a = net.node(0).node.peer_stats(&kb).unwrap();
    let rotations = a.handshakes - before;
    println!(
        "rotations for {} frames sent, every 500: {rotations}",
        a.tx_frames
    );
    assert!(
        rotations >= a.tx_frames / 500 / 2,
        "rotated {rotations} times"
    );
    assert_eq!(s.udp, 750, "no datagram lost to rotation on a clean link");
}

/// A transfer after the keys rotated runs as fast as one before: the
/// receiver's reports count per key and restart at zero, and both sides
/// follow that (before, no report went out after a rotation and the
/// sender stayed at its initial rate, about 20 Mbit/s).
#[test]
fn transfers_after_a_key_rotation_run_at_full_rate() {
    let mut c = sim::tcp_host::node_config(false);
    c.session.rekey_after = Duration::from_secs(3);
    let spec = LinkSpec::latency(Duration::from_millis(5)).with_rate(200_000_000, 500_000);
    let (mut net, ka, kb) = sim::tcp_host::tcp_pair(31, (c.clone(), c), spec, 4 << 20);
    let mut rates = Vec::new();
    for round in 0..4u16 {
        let (st, _, bps) =
            sim::tcp_host::transfer(&mut net, 8 << 20, 5001 + round, Duration::from_secs(30));
        assert_eq!(st.read, 8 << 20);
        rates.push(bps / 1e6);
        // Idle past the rotation (and the controller's idle restart).
        net.run_for(Duration::from_secs(4));
    }
    let hs = net.node(0).node.peer_stats(&kb).unwrap().handshakes
        + net.node(1).node.peer_stats(&ka).unwrap().handshakes;
    println!("Mbit/s per transfer: {rates:?}, handshakes {hs}");
    assert!(hs >= 4, "keys rotated between the transfers: {hs}");
    for r in &rates[1..] {
        assert!(*r >= 0.7 * rates[0], "{rates:?}");
    }
}
