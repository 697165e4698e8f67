//! A WAN for the namespace lab: the router namespace forwards every packet
//! between nodes through a TUN device whose reader applies the project's own
//! seeded impairment stages (`sim::impair`): a rate limit with a bounded
//! queue, i.i.d. loss, one-way delay and jitter, each ordered pair of
//! addresses its own pipeline. `tc netem` is not in this kernel; this is
//! what stands in for it.
//!
//! Routing: in the router namespace, packets arriving on a node's veth are
//! looked up in table 100, whose only route is the TUN device; the router
//! process writes them back into the TUN when their time comes, and the
//! kernel forwards them by the main table to the destination's veth.

use anyhow::{Context, Result};
use sim::impair::{Held, LinkSpec, Pipeline};
use std::collections::{BTreeMap, BinaryHeap};
use std::net::Ipv4Addr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Name of the router's TUN device.
pub const WAN_DEV: &str = "fmwan";
/// The routing table that sends forwarded packets into the TUN device.
pub const WAN_TABLE: &str = "100";

/// One direction of the emulated WAN (both directions get the same spec,
/// each with its own seeded pipeline).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WanSpec {
    /// Round-trip time added between any two nodes, ms (half each way).
    pub rtt_ms: u64,
    /// Bottleneck rate, Mbit/s (0: unlimited).
    pub rate_mbit: f64,
    /// Bottleneck queue, in ms at the bottleneck rate.
    pub queue_ms: u64,
    /// i.i.d. loss each way, percent.
    pub loss_pct: f64,
    /// Uniform extra delay each way, 0..=jitter ms.
    pub jitter_ms: u64,
}

impl WanSpec {
    /// The impairment stages of one direction.
    pub fn link(&self) -> LinkSpec {
        let rate_bps = (self.rate_mbit > 0.0).then_some((self.rate_mbit * 1e6) as u64);
        LinkSpec {
            loss: self.loss_pct / 100.0,
            latency: Duration::from_micros(self.rtt_ms * 500),
            jitter: Duration::from_millis(self.jitter_ms),
            rate_bps,
            queue_bytes: rate_bps.map_or(0, |r| {
                (r as f64 / 8.0 * self.queue_ms as f64 / 1000.0) as usize
            }),
            ..LinkSpec::default()
        }
    }

    /// Command-line form, as `fastmesh-lab wan-router` takes it.
    pub fn args(&self) -> Vec<String> {
        vec![
            self.rtt_ms.to_string(),
            self.rate_mbit.to_string(),
            self.queue_ms.to_string(),
            self.loss_pct.to_string(),
            self.jitter_ms.to_string(),
        ]
    }

    /// Parse [`WanSpec::args`].
    pub fn parse(a: &[&str]) -> Result<WanSpec> {
        let n = |i: usize, what: &str| -> Result<f64> {
            a.get(i)
                .with_context(|| format!("missing {what}"))?
                .parse::<f64>()
                .with_context(|| format!("bad {what}"))
        };
        Ok(WanSpec {
            rtt_ms: n(0, "rtt ms")? as u64,
            rate_mbit: n(1, "rate Mbit/s")?,
            queue_ms: n(2, "queue ms")? as u64,
            loss_pct: n(3, "loss %")?,
            jitter_ms: n(4, "jitter ms")? as u64,
        })
    }
}

/// Counters of the router, printed when it ends.
#[derive(Debug, Default, Clone, Copy)]
pub struct WanStats {
    /// Packets read from the TUN device.
    pub packets: u64,
    /// Packets the stages dropped (loss, full queue).
    pub dropped: u64,
}

/// Run the router on a new TUN device `dev` until `limit` has passed (or the
/// process is killed). Packets that are not IPv4 pass without impairment.
pub fn run_router(dev: &str, spec: WanSpec, seed: u64, limit: Duration) -> Result<WanStats> {
    let tun = tun_rs::DeviceBuilder::new()
        .name(dev)
        .mtu(1500)
        .build_sync()
        .with_context(|| format!("cannot create TUN device {dev}"))?;
    let tun = Arc::new(tun);
    let epoch = Instant::now();
    let queue = Arc::new((
        Mutex::new(BinaryHeap::<Held<Vec<u8>>>::new()),
        Condvar::new(),
    ));
    let writer = {
        let (tun, queue) = (tun.clone(), queue.clone());
        std::thread::spawn(move || loop {
            let due = {
                let (m, cv) = &*queue;
                let mut q = m.lock().expect("wan queue");
                loop {
                    let now = epoch.elapsed();
                    match q.peek() {
                        Some(h) if h.at <= now => break q.pop().expect("peeked"),
                        Some(h) => {
                            let wait = h.at - now;
                            q = cv.wait_timeout(q, wait).expect("wan queue").0;
                        }
                        None => q = cv.wait(q).expect("wan queue"),
                    }
                }
            };
            let _ = tun.send(&due.item);
        })
    };
    let _ = writer;
    let mut links: BTreeMap<(Ipv4Addr, Ipv4Addr), Pipeline> = BTreeMap::new();
    let mut stats = WanStats::default();
    let mut times = Vec::new();
    let mut buf = vec![0u8; 65_536];
    let mut seq = 0u64;
    let link = spec.link();
    while epoch.elapsed() < limit {
        let n = tun.recv(&mut buf)?;
        let pkt = &buf[..n];
        stats.packets += 1;
        let now = Instant::now();
        let key = (n >= 20 && pkt[0] >> 4 == 4).then(|| {
            (
                Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]),
                Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]),
            )
        });
        times.clear();
        match key {
            Some(k) => {
                let pseed = seed ^ (u64::from(u32::from(k.0)) << 32) ^ u64::from(u32::from(k.1));
                links.entry(k).or_insert_with(|| link.build(pseed)).apply(
                    now - epoch,
                    n,
                    &mut times,
                );
                if times.is_empty() {
                    stats.dropped += 1;
                }
            }
            None => times.push(now - epoch),
        }
        if times.is_empty() {
            continue;
        }
        let (m, cv) = &*queue;
        let mut q = m.lock().expect("wan queue");
        for &t in &times {
            seq += 1;
            q.push(Held {
                at: t,
                seq,
                item: pkt.to_vec(),
            });
        }
        cv.notify_one();
    }
    Ok(stats)
}
