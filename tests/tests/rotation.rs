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
