//! A bulk sender for bottleneck measurements: keeps the session's KCP backlog
//! topped up, like an application writing as fast as the tunnel accepts.

use crate::des::Net;
use crate::traffic::{self, Kind};
use std::net::Ipv4Addr;
use std::time::Duration;

/// Result of a bulk run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BulkResult {
    /// Inner bytes delivered in the measurement window, per second.
    pub goodput_bps: f64,
    /// Wire bytes (UDP payload + 28 bytes IPv4/UDP header per datagram, both
    /// directions) per inner byte delivered, over the measurement window.
    pub overhead: f64,
    /// Inner packets delivered in the window.
    pub packets: u64,
}

/// Send 1 TCP flow of `pkt_len`-byte packets from host 0 to host 1 for `warmup + measure`,
/// keeping `backlog` packets queued. Measures over the last `measure`.
pub fn run(
    net: &mut Net,
    pkt_len: usize,
    backlog: usize,
    warmup: Duration,
    measure: Duration,
) -> BulkResult {
    let to = *net.node(1).node.public_key();
    let (src, dst) = (Ipv4Addr::new(10, 77, 0, 1), Ipv4Addr::new(10, 77, 0, 2));
    let step = Duration::from_millis(1);
    let mut seq = 0u32;
    let t_end = net.now() + warmup + measure;
    let t_measure = net.now() + warmup;
    let mut base: Option<(usize, u64, u64, u64, u64)> = None;
    while net.now() < t_end {
        if base.is_none() && net.now() >= t_measure {
            let (f, r) = (net.wire(0, 1), net.wire(1, 0));
            base = Some((net.node(1).rx.len(), f.bytes, f.packets, r.bytes, r.packets));
        }
        let now = net.now();
        let queued = net.node(0).node.kcp_backlog(&to);
        for _ in queued..backlog {
            net.send_at(
                now,
                0,
                to,
                traffic::packet(src, dst, Kind::Tcp, 1, seq, pkt_len),
            );
            seq += 1;
        }
        net.run_for(step);
    }
    let (rx0, fb, fp, rb, rp) = base.expect("measurement window reached");
    let delivered: u64 = net.node(1).rx[rx0..]
        .iter()
        .map(|d| d.pkt.len() as u64)
        .sum();
    let (f, r) = (net.wire(0, 1), net.wire(1, 0));
    let wire = (f.bytes - fb) + 28 * (f.packets - fp) + (r.bytes - rb) + 28 * (r.packets - rp);
    BulkResult {
        goodput_bps: delivered as f64 * 8.0 / measure.as_secs_f64(),
        overhead: wire as f64 / delivered.max(1) as f64,
        packets: (net.node(1).rx.len() - rx0) as u64,
    }
}
