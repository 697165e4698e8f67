//! Simulated benchmark: latency, bottleneck goodput and wire overhead per KCP
//! profile and for all-datagram mode, over loss x RTT. Prints a Markdown table.
//!
//! `cargo run --release -p fastmesh-sim --bin simbench [-- --quick]`

use sim::bulk;
use sim::des::pair;
use sim::impair::LinkSpec;
use sim::traffic::{self, Kind};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;
use transport::{FlowMode, KcpProfile, NodeConfig, SessionConfig};

#[derive(Clone, Copy)]
enum Mode {
    Kcp(KcpProfile),
    Datagram,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Kcp(KcpProfile::Normal) => "kcp normal",
            Mode::Kcp(KcpProfile::Fast) => "kcp fast",
            Mode::Kcp(KcpProfile::Turbo) => "kcp turbo",
            Mode::Datagram => "all-datagram",
        }
    }
    fn cfg(self) -> NodeConfig {
        let session = match self {
            Mode::Kcp(p) => SessionConfig {
                profile: p,
                ..SessionConfig::default()
            },
            Mode::Datagram => SessionConfig {
                flow_mode: FlowMode::AllDatagram,
                ..SessionConfig::default()
            },
        };
        NodeConfig {
            session,
            ..NodeConfig::default()
        }
    }
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// 200 packets/s of 500-byte TCP packets for 10 s; latency of each delivery.
fn latency(mode: Mode, loss: f64, rtt_ms: u64, seed: u64) -> (Duration, Duration, Duration, f64) {
    let spec = LinkSpec::latency(Duration::from_millis(rtt_ms / 2)).with_loss(loss);
    let (mut net, _ka, kb) = pair(seed, mode.cfg(), spec);
    let t0 = net.now();
    let n = 2000u32;
    let mut sent = BTreeMap::new();
    for i in 0..n {
        let at = t0 + Duration::from_millis(i as u64 * 5);
        sent.insert(i, at);
        net.send_at(
            at,
            0,
            kb,
            traffic::packet(
                Ipv4Addr::new(10, 77, 0, 1),
                Ipv4Addr::new(10, 77, 0, 2),
                Kind::Tcp,
                1,
                i,
                500,
            ),
        );
    }
    net.run_for(Duration::from_secs(60));
    let mut d: Vec<Duration> = net
        .node(1)
        .rx
        .iter()
        .filter_map(|r| traffic::read(&r.pkt).map(|t| r.at - sent[&t.seq]))
        .collect();
    let delivered = d.len() as f64 / n as f64;
    (
        pct(&mut d, 0.5),
        pct(&mut d, 0.99),
        pct(&mut d, 1.0),
        delivered,
    )
}

/// Bulk over a 100 Mbit/s bottleneck (queue 1/2 BDP, min 64 KiB) with `loss` after it.
fn goodput(mode: Mode, loss: f64, rtt_ms: u64, seed: u64, measure: Duration) -> (f64, f64) {
    let rate = 100_000_000u64;
    let bdp = (rate / 8) as usize * rtt_ms as usize / 1000;
    let q = (bdp / 2).max(64 * 1024);
    let fwd = LinkSpec::latency(Duration::from_millis(rtt_ms / 2))
        .with_loss(loss)
        .with_rate(rate, q);
    let rev = LinkSpec::latency(Duration::from_millis(rtt_ms / 2)).with_loss(loss);
    let (mut net, _ka, _kb) = pair(seed, mode.cfg(), fwd);
    net.set_link(1, 0, rev);
    let mtu = SessionConfig::default().tun_mtu();
    let warmup = Duration::from_millis(2000 + rtt_ms * 20);
    match mode {
        Mode::Kcp(_) => {
            let r = bulk::run(&mut net, mtu, 4096, warmup, measure);
            (r.goodput_bps, r.overhead)
        }
        Mode::Datagram => {
            // No reliability and no rate control: offer the link rate, count what arrives.
            let to = *net.node(1).node.public_key();
            let per_ms = (rate as f64 / 8.0 / 1000.0 / (mtu + 85) as f64).round() as u32;
            let t0 = net.now();
            let total = warmup + measure;
            let mut seq = 0;
            let steps = total.as_millis() as u64;
            for ms in 0..steps {
                for _ in 0..per_ms {
                    net.send_at(
                        t0 + Duration::from_millis(ms),
                        0,
                        to,
                        traffic::packet(
                            Ipv4Addr::new(10, 77, 0, 1),
                            Ipv4Addr::new(10, 77, 0, 2),
                            Kind::Udp,
                            1,
                            seq,
                            mtu,
                        ),
                    );
                    seq += 1;
                }
            }
            net.run_until(t0 + warmup);
            let (rx0, w0, r0) = (net.node(1).rx.len(), net.wire(0, 1), net.wire(1, 0));
            net.run_until(t0 + total);
            let got: u64 = net.node(1).rx[rx0..]
                .iter()
                .map(|d| d.pkt.len() as u64)
                .sum();
            let (w1, r1) = (net.wire(0, 1), net.wire(1, 0));
            let wire = (w1.bytes - w0.bytes)
                + 28 * (w1.packets - w0.packets)
                + (r1.bytes - r0.bytes)
                + 28 * (r1.packets - r0.packets);
            (
                got as f64 * 8.0 / measure.as_secs_f64(),
                wire as f64 / got.max(1) as f64,
            )
        }
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let losses: &[f64] = if quick {
        &[0.0, 0.05]
    } else {
        &[0.0, 0.01, 0.05, 0.10, 0.20]
    };
    let rtts: &[u64] = if quick { &[20, 100] } else { &[20, 100, 300] };
    let modes = [
        Mode::Kcp(KcpProfile::Normal),
        Mode::Kcp(KcpProfile::Fast),
        Mode::Kcp(KcpProfile::Turbo),
        Mode::Datagram,
    ];
    let measure = Duration::from_secs(if quick { 3 } else { 5 });
    println!("| loss | RTT ms | mode | p50 ms | p99 ms | max ms | delivered | goodput Mbit/s (100 Mbit/s link) | wire/payload |");
    println!("|---:|---:|---|---:|---:|---:|---:|---:|---:|");
    for &loss in losses {
        for &rtt in rtts {
            for m in modes {
                let started = std::time::Instant::now();
                let (p50, p99, max, del) = latency(m, loss, rtt, 1);
                let (gp, oh) = goodput(m, loss, rtt, 2, measure);
                println!(
                    "| {:.0}% | {} | {} | {:.1} | {:.1} | {:.1} | {:.1}% | {:.1} | {:.3} |",
                    loss * 100.0,
                    rtt,
                    m.name(),
                    p50.as_secs_f64() * 1e3,
                    p99.as_secs_f64() * 1e3,
                    max.as_secs_f64() * 1e3,
                    del * 100.0,
                    gp / 1e6,
                    oh
                );
                eprintln!(
                    "  ({} loss {loss} rtt {rtt}: {:.1}s wall)",
                    m.name(),
                    started.elapsed().as_secs_f64()
                );
            }
        }
    }
}
