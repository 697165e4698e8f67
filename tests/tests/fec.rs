//! Forward error correction on lossy, long links (simulated time): messages
//! arrive without waiting for retransmissions, bulk pays a bounded overhead,
//! and nothing is delivered twice or out of order.

use fastmesh_tests::{delivered, overlay, schedule_mixed};
use sim::des::{pair, Net};
use sim::impair::LinkSpec;
use sim::traffic::{self, Kind};
use std::collections::BTreeMap;
use std::time::Duration;
use transport::wire::PublicKey;
use transport::NodeConfig;

fn cfg(fec: bool) -> NodeConfig {
    let mut c = NodeConfig::default();
    c.session.fec = fec;
    c
}

/// 64-byte messages (one TCP flow) every 20 ms for `secs`; returns the
/// one-way latency of each, in ms, in order of sending.
fn messages(net: &mut Net, kb: PublicKey, secs: u64) -> Vec<f64> {
    let t0 = net.now();
    let n = (secs * 50) as u32;
    let mut sent = BTreeMap::new();
    for i in 0..n {
        let at = t0 + Duration::from_millis(20 * u64::from(i));
        let pkt = traffic::packet(overlay(0), overlay(1), Kind::Tcp, 9, i, 104);
        sent.insert(i, at);
        net.send_at(at, 0, kb, pkt);
    }
    let before = net.node(1).rx.len();
    net.run_for(Duration::from_secs(secs + 10));
    let mut lat = Vec::new();
    let mut next = 0;
    for d in &net.node(1).rx[before..] {
        let t = traffic::read(&d.pkt).expect("tagged");
        assert_eq!(t.seq, next, "in order, once");
        next += 1;
        lat.push((d.at - sent[&t.seq]).as_secs_f64() * 1e3);
    }
    assert_eq!(next, n, "every message delivered");
    lat
}

fn p99(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[(v.len() * 99).div_ceil(100) - 1]
}

/// Messages over 50 ms RTT and 5% loss each way, after the sessions have
/// measured the loss, with and without FEC: (p99 one-way ms, recovered,
/// parity frames per message while measured).
fn run(fec: bool) -> (f64, u64, f64) {
    let spec = LinkSpec::latency(Duration::from_millis(25)).with_loss(0.05);
    let (mut net, _ka, kb) = pair(11, cfg(fec), spec);
    // Warm up: the sessions learn the loss from receiver reports.
    let _ = messages(&mut net, kb, 5);
    let warm = net.node(0).node.peer_stats(&kb).expect("session");
    let lat = messages(&mut net, kb, 20);
    let mut top = lat.clone();
    top.sort_by(f64::total_cmp);
    println!(
        "fec {fec}: p50 {:.1} worst {:?}",
        top[top.len() / 2],
        &top[top.len() - 15..]
    );
    let st = net.node(0).node.peer_stats(&kb).expect("session");
    let rx = net
        .node(1)
        .node
        .peer_stats(net.node(0).node.public_key())
        .expect("session");
    println!(
        "fec {fec}: p99 {:.1} ms, data {} parity {} recovered {} rx malformed {} tx retransmits {} loss est {:.3}",
        p99(lat.clone()),
        st.fec_data,
        st.fec_parity,
        rx.fec_recovered,
        rx.malformed,
        st.retransmits,
        st.loss
    );
    let copies =
        (st.fec_parity - warm.fec_parity) as f64 / (st.fec_data - warm.fec_data).max(1) as f64;
    (p99(lat), rx.fec_recovered, copies)
}

#[test]
fn messages_over_five_percent_loss_do_not_wait_for_retransmissions() {
    let (with, recovered, parity) = run(true);
    let (without, none, _) = run(false);
    assert_eq!(none, 0);
    // At 5% a lone message needs three copies (two lose one message in
    // 400, which then waits a retransmission with the ones behind it).
    // The loss estimate of a sparse session is noisy; planned from the
    // clean estimate alone, 15% of the messages went as two copies.
    assert!(parity >= 2.0, "{parity:.2} parity frames per message");
    assert!(recovered > 0, "parity rebuilt lost messages");
    // One-way 25 ms; a retransmission costs at least one more round trip.
    assert!(with < 40.0, "p99 {with:.1} ms with FEC");
    assert!(without > 70.0, "p99 {without:.1} ms without FEC");
}

#[test]
fn bulk_over_five_percent_loss_pays_a_bounded_overhead() {
    let spec = LinkSpec::latency(Duration::from_millis(25)).with_loss(0.05);
    let (mut net, _ka, kb) = pair(5, cfg(true), spec);
    let expect = schedule_mixed(&mut net, kb, 20_000, Duration::from_secs(10), 4, 5);
    net.run_for(Duration::from_secs(30));
    let s = traffic::verify(delivered(&net, 1), &expect).expect("complete, in order, once");
    let payload: u64 = delivered(&net, 1).iter().map(|p| p.len() as u64).sum();
    let wire = net.wire(0, 1).bytes;
    let st = net.node(0).node.peer_stats(&kb).expect("session");
    let ratio = wire as f64 / payload as f64;
    println!(
        "bulk: {} tcp {} udp delivered; wire/payload {ratio:.3}; data {} parity {} retransmits {}",
        s.tcp, s.udp, st.fec_data, st.fec_parity, st.retransmits
    );
    assert!(st.fec_parity > 0, "parity was sent");
    // Parity (~3 per 16 at 5%), headers, retransmissions and lost frames.
    assert!(ratio < 1.45, "wire/payload {ratio:.3}");
}

#[test]
fn a_clean_link_sends_no_parity() {
    let (mut net, _ka, kb) = pair(3, cfg(true), LinkSpec::latency(Duration::from_millis(20)));
    let expect = schedule_mixed(&mut net, kb, 2_000, Duration::from_secs(4), 4, 3);
    // Small frames get copies only until the loss is measured (a new
    // session: `fec::UNMEASURED_LOSS`), here zero within the first second.
    net.run_for(Duration::from_secs(1));
    let early = net.node(0).node.peer_stats(&kb).expect("session");
    assert!(early.fec_data <= 40, "{early:?}");
    assert!(early.fec_parity <= 2 * early.fec_data, "{early:?}");
    net.run_for(Duration::from_secs(9));
    traffic::verify(delivered(&net, 1), &expect).expect("all delivered");
    let st = net.node(0).node.peer_stats(&kb).expect("session");
    assert_eq!(st.fec_parity, early.fec_parity, "{st:?}");
}
