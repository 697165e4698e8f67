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
