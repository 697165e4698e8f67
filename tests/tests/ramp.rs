//! A transfer on a clean, fast link reaches its rate at once: real TCP
//! endpoints (smoltcp CUBIC hosts) on both sides of a simulated pair.

use sim::impair::LinkSpec;
use sim::tcp_host::{start_transfer, tcp_pair};
use std::time::Duration;
use transport::NodeConfig;

/// Sink's bytes read, sampled every `step` while `total` bytes go from A to B.
fn samples(seed: u64, total: u64, step: Duration) -> Vec<u64> {
    // A LAN-like path: 0.25 ms each way and up to 0.1 ms of jitter (drawn
    // from the seed), 1 Gbit/s, a 256 KB queue.
    let spec = LinkSpec::latency(Duration::from_micros(250))
        .with_jitter(Duration::from_micros(100))
        .with_rate(1_000_000_000, 256_000);
    let (mut net, _, kb) = tcp_pair(
        seed,
        (NodeConfig::default(), NodeConfig::default()),
        spec,
        4 << 20,
    );
    // Let the session settle (path MTU, first RTT samples) as a mesh that
    // has been up a while would have.
    net.run_for(Duration::from_secs(1));
    let now = net.now();
    let (k, _) = start_transfer(&mut net, total, 5001);
    let mut v = Vec::new();
    let end = now + Duration::from_secs(20);
    while net.now() < end && net.host(1).apps[k].stats.fin_at.is_none() {
        net.run_for(step);
        v.push(net.host(1).apps[k].stats.read);
    }
    assert_eq!(net.host(1).apps[k].stats.read, total, "every byte");
    assert!(!net.host(1).apps[k].stats.corrupt);
    // The link loses nothing but what overflows its queue: the sender
    // finds its rate without overrunning it for long, and protects
    // nothing with parity (its controller once took its own overflow for
    // path loss: a third of its frames parity, one in ten a retransmission).
    let st = net.node(0).node.peer_stats(&kb).expect("session");
    let frames = net.wire(0, 1).packets;
    println!(
        "seed {seed}: {frames} frames, {} retransmitted, {} parity",
        st.retransmits, st.fec_parity
    );
    assert!(
        st.fec_parity * 100 <= frames,
        "seed {seed}: {} parity",
        st.fec_parity
    );
    assert!(
        st.retransmits * 10 <= frames,
        "seed {seed}: {} retransmitted",
        st.retransmits
    );
    v
}

#[test]
fn a_transfer_on_a_clean_link_is_at_full_rate_within_200_ms() {
    let step = Duration::from_millis(20);
    let mut rates = Vec::new();
    for seed in 1..=5 {
        let s = samples(seed, 60 << 20, step);
        let per: Vec<f64> = s
            .windows(2)
            .map(|w| (w[1] - w[0]) as f64 * 8.0 / step.as_secs_f64() / 1e6)
            .collect();
        // The final rate: the middle of the transfer's second half.
        let tail = &per[per.len() / 2..per.len().saturating_sub(1).max(per.len() / 2 + 1)];
        let fin = tail.iter().sum::<f64>() / tail.len() as f64;
        let reach = per
            .iter()
            .position(|r| *r >= 0.8 * fin)
            .unwrap_or(per.len());
        let at = step * (reach as u32 + 1);
        let avg = *s.last().unwrap() as f64 * 8.0 / (step * s.len() as u32).as_secs_f64() / 1e6;
        println!("seed {seed}: {avg:.0} Mbit/s, final {fin:.0}, 80% of it after {at:?}");
        assert!(at <= Duration::from_millis(200), "seed {seed}: {at:?}");
        rates.push(avg);
    }
    rates.sort_by(|a, b| a.total_cmp(b));
    let (min, median) = (rates[0], rates[rates.len() / 2]);
    assert!(min >= 0.8 * median, "min {min:.0} vs median {median:.0}");
}

/// A long path's rate, measured by the capacity train
/// (`proto::session::train`) once the session's path is measured and
/// before any data: the estimate matches the bottleneck, and the first
/// transfer's startup begins from half of it instead of the initial rate
/// (7 Mbit/s), so it is at the path's rate a few round trips after it
/// began (the split connection's opening takes one, the first data half of
/// one).
#[test]
fn a_long_paths_capacity_is_measured_before_the_first_transfer() {
    // 50 ms round trip, 100 Mbit/s with a 50 ms queue, no loss.
    let spec = LinkSpec::latency(Duration::from_millis(25)).with_rate(100_000_000, 625_000);
    let (mut net, _, kb) = tcp_pair(
        3,
        (
            sim::tcp_host::node_config(true),
            sim::tcp_host::node_config(true),
        ),
        spec,
        4 << 20,
    );
    net.run_for(Duration::from_secs(2));
    let st = net.node(0).node.peer_stats(&kb).expect("session");
    // A frame of 1,452 bytes crosses the link as 1,508 (IP and UDP
    // headers, and the simulated link's own 28 bytes of framing).
    let expected = 100e6 / 8.0 * 1452.0 / 1508.0;
    println!(
        "capacity {:.1} Mbit/s (expected {:.1}), {} probes",
        st.capacity * 8.0 / 1e6,
        expected * 8.0 / 1e6,
        st.capacity_probes
    );
    assert!(
        (st.capacity / expected - 1.0).abs() < 0.05,
        "capacity {:.1} Mbit/s",
        st.capacity * 8.0 / 1e6
    );
    assert_eq!(st.capacity_probes, 10, "one train");
    let (k, _) = start_transfer(&mut net, 64 << 20, 5001);
    let step = Duration::from_millis(50);
    let mut read = Vec::new();
    for _ in 0..8 {
        net.run_for(step);
        read.push(net.host(1).apps[k].stats.read);
    }
    let st = net.node(0).node.peer_stats(&kb).expect("session");
    assert_eq!(st.capacity_probes, 10, "no second train once data flows");
    let mbit = |a: u64, b: u64| (b - a) as f64 * 8.0 / step.as_secs_f64() / 1e6;
    let rates: Vec<f64> = read.windows(2).map(|w| mbit(w[0], w[1])).collect();
    println!("Mbit/s per 50 ms after the first: {rates:.0?}");
    // From 0.2 s on (four round trips), every 50 ms carries at least 80% of
    // the path's rate.
    assert!(
        rates[3..].iter().all(|&r| r >= 80.0),
        "rates per 50 ms {rates:.0?}"
    );
}
