//! A lost segment of one TCP flow must not delay another flow.
//!
//! Flow A sends 1000-byte packets, flow B 200-byte packets; their frames have
//! distinct sizes on the wire, so a tap can drop only A's frames. B's worst
//! one-way delay is compared with and without A's losses. With per-flow KCP
//! conversations it must not change by more than 10 ms; with every flow forced
//! into one conversation (`max_convs = 0`) it grows by hundreds of ms, which
//! shows the test can tell the difference.

use fastmesh_tests::overlay;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sim::des::pair;
use sim::impair::LinkSpec;
use sim::traffic::{self, Kind};
use std::collections::BTreeMap;
use std::time::Duration;
use transport::{NodeConfig, SessionConfig};

const ONE_WAY: Duration = Duration::from_millis(50);

/// Worst delay of flow B (flow id 2), in the A->B direction.
fn worst_b_delay(lose_a: f64, max_convs: usize) -> Duration {
    let cfg = NodeConfig {
        session: SessionConfig {
            max_convs,
            ..SessionConfig::default()
        },
        ..NodeConfig::default()
    };
    let (mut net, _ka, kb) = pair(11, cfg, LinkSpec::latency(ONE_WAY));
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    // A's data frames: 16 header + 1 type + 24 KCP + 1000 + 16 tag, maybe with acks appended.
    net.set_tap(Box::new(move |from, _to, bytes| {
        let is_a = from == 0 && (1057..1057 + 24 * 40).contains(&bytes.len());
        !(is_a && rng.random::<f64>() < lose_a)
    }));
    let start = net.now();
    let mut sent_at = BTreeMap::new();
    for i in 0..2000u32 {
        let at = start + Duration::from_millis(i as u64 * 2);
        net.send_at(
            at,
            0,
            kb,
            traffic::packet(overlay(0), overlay(1), Kind::Tcp, 1, i, 1000),
        );
        if i % 10 == 0 {
            let seq = i / 10;
            sent_at.insert(seq, at);
            net.send_at(
                at,
                0,
                kb,
                traffic::packet(overlay(0), overlay(1), Kind::Tcp, 2, seq, 200),
            );
        }
    }
    net.run_for(Duration::from_secs(30));
    let mut worst = Duration::ZERO;
    let mut got = 0;
    for d in &net.node(1).rx {
        let t = traffic::read(&d.pkt).expect("intact");
        if t.flow == 2 {
            worst = worst.max(d.at - sent_at[&t.seq]);
            got += 1;
        }
    }
    assert_eq!(got, 200, "flow B complete");
    worst
}

#[test]
fn lost_segments_of_one_flow_do_not_delay_another() {
    let clean = worst_b_delay(0.0, 256);
    let lossy = worst_b_delay(0.3, 256);
    println!(
        "per-flow conversations: worst B delay {clean:?} without A loss, {lossy:?} with 30% A loss"
    );
    assert!(clean >= ONE_WAY);
    assert!(
        lossy <= clean + Duration::from_millis(10),
        "B delayed by A's losses: {clean:?} -> {lossy:?}"
    );

    let shared_clean = worst_b_delay(0.0, 0);
    let shared_lossy = worst_b_delay(0.3, 0);
    println!("one shared conversation: worst B delay {shared_clean:?} -> {shared_lossy:?}");
    assert!(
        shared_lossy > shared_clean + Duration::from_millis(100),
        "control case shows head-of-line blocking"
    );
}
