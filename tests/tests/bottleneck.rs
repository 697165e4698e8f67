//! A bulk flow on a 100 Mbit/s bottleneck with a bounded queue must use the
//! link without overrunning it: >= 90% of the rate, wire overhead <= 1.1x.

use sim::bulk;
use sim::des::pair;
use sim::impair::LinkSpec;
use std::time::Duration;
use transport::{NodeConfig, SessionConfig};

#[test]
fn bulk_flow_fills_a_100_mbit_bottleneck_without_waste() {
    let rate = 100_000_000u64;
    // 20 ms RTT; queue of 128 KiB (about half the bandwidth-delay product).
    let fwd = LinkSpec::latency(Duration::from_millis(10)).with_rate(rate, 128 * 1024);
    let (mut net, _ka, _kb) = pair(3, NodeConfig::default(), fwd.clone());
    net.set_link(1, 0, LinkSpec::latency(Duration::from_millis(10)));
    let mtu = SessionConfig::default().tun_mtu();
    let r = bulk::run(
        &mut net,
        mtu,
        2048,
        Duration::from_secs(3),
        Duration::from_secs(5),
    );
    println!(
        "goodput {:.1} Mbit/s, overhead {:.3}x, {} packets",
        r.goodput_bps / 1e6,
        r.overhead,
        r.packets
    );
    let wire_rate_goodput_max = rate as f64 * mtu as f64 / (mtu + 16 + 1 + 24 + 16 + 28) as f64;
    assert!(
        r.goodput_bps >= 0.90 * wire_rate_goodput_max,
        "goodput {:.1} Mbit/s",
        r.goodput_bps / 1e6
    );
    assert!(r.overhead <= 1.10, "overhead {:.3}", r.overhead);
}
