//! Delivery over lossy, long links (simulated time).

use fastmesh_tests::{delivered, schedule_mixed};
use proptest::prelude::*;
use sim::des::pair;
use sim::impair::LinkSpec;
use sim::traffic;
use std::time::Duration;
use transport::NodeConfig;

#[test]
fn ten_thousand_packets_over_20_percent_loss_and_200ms_rtt() {
    let spec = LinkSpec::latency(Duration::from_millis(100)).with_loss(0.20);
    let (mut net, _ka, kb) = pair(7, NodeConfig::default(), spec);
    let expect = schedule_mixed(&mut net, kb, 10_000, Duration::from_secs(20), 8, 7);
    net.run_for(Duration::from_secs(60));
    let s = traffic::verify(delivered(&net, 1), &expect)
        .expect("tcp complete and in order, nothing corrupt");
    assert_eq!(s.tcp, expect.values().map(|&n| n as u64).sum::<u64>());
    // UDP rides as datagrams: about 80% arrive, none twice (verify checks duplicates).
    assert!(
        s.udp > 2500 * 70 / 100 && s.udp < 2500 * 90 / 100,
        "udp delivered {}",
        s.udp
    );
    // Every lost data segment was repaired: resent by KCP (counted by the
    // sender) or rebuilt from parity (counted by the receiver); with 20% loss
    // each way that is at least one in five.
    let st = net.node(0).node.peer_stats(&kb).expect("session");
    let rebuilt = net
        .node(1)
        .node
        .peer_stats(net.node(0).node.public_key())
        .expect("session")
        .fec_recovered;
    let tcp_pkts = expect.values().map(|&n| n as u64).sum::<u64>();
    println!(
        "retransmits {} rebuilt {rebuilt} for {tcp_pkts} packets",
        st.retransmits
    );
    assert!(
        (st.retransmits + rebuilt) * 5 >= tcp_pkts,
        "retransmits {} rebuilt {rebuilt} for {tcp_pkts} packets",
        st.retransmits
    );
}

#[test]
fn a_clean_link_retransmits_almost_nothing() {
    let spec = LinkSpec::latency(Duration::from_millis(20));
    let (mut net, _ka, kb) = pair(3, NodeConfig::default(), spec);
    let expect = schedule_mixed(&mut net, kb, 2_000, Duration::from_secs(4), 4, 3);
    for _ in 0..20 {
        net.run_for(Duration::from_millis(250));
        if std::env::var_os("PROBE").is_some() {
            let st = net.node(0).node.peer_stats(&kb).expect("session");
            println!(
                "{:?} retx {} {}",
                net.now(),
                st.retransmits,
                net.node(0)
                    .node
                    .session(&kb)
                    .unwrap()
                    .rate_control()
                    .phase()
            );
        }
    }
    net.run_for(Duration::from_secs(5));
    traffic::verify(delivered(&net, 1), &expect).expect("all delivered");
    let st = net.node(0).node.peer_stats(&kb).expect("session");
    let tcp_pkts = expect.values().map(|&n| n as u64).sum::<u64>();
    // KCP's timers are aggressive: a few spurious resends while the RTT
    // estimate settles (10 of 1,500 with this seed), never a storm.
    println!(
        "clean link: {} retransmits for {tcp_pkts} packets",
        st.retransmits
    );
    assert!(
        st.retransmits * 100 <= tcp_pkts,
        "{} retransmits",
        st.retransmits
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn any_lossy_link_delivers_tcp_complete_in_order(
        seed in any::<u64>(),
        loss in 0.0f64..0.30,
        latency_ms in 0u64..300,
        jitter_ms in 0u64..40,
        flows in 1u16..6,
    ) {
        let spec = LinkSpec::latency(Duration::from_millis(latency_ms))
            .with_loss(loss)
            .with_jitter(Duration::from_millis(jitter_ms));
        let (mut net, _ka, kb) = pair(seed, NodeConfig::default(), spec);
        let expect = schedule_mixed(&mut net, kb, 400, Duration::from_secs(2), flows, seed);
        net.run_for(Duration::from_secs(60));
        let r = traffic::verify(delivered(&net, 1), &expect);
        prop_assert!(r.is_ok(), "{:?}", r);
    }
}
