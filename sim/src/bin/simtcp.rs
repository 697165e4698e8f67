//! Simulated benchmark with real TCP endpoints: one CUBIC connection (smoltcp
//! hosts on the nodes' TUN side) through two simulated fastmesh nodes, split
//! (the default) and carried as packets, over the WAN profiles of
//! `fastmesh-lab wan`. Prints a Markdown table: goodput, and wire bytes per
//! payload byte in the data direction.
//!
//! `cargo run --release -p fastmesh-sim --bin simtcp [-- SECS] [LOSSES] [PROFILES]`
//! (defaults: 8 0,1,5,10,20 50:100,200:20; PROFILE = RTT_MS:MBIT)

use sim::impair::LinkSpec;
use sim::tcp_host::{messages, quantile, tcp_pair, transfer};
use std::time::Duration;
use transport::split::SplitConfig;
use transport::NodeConfig;

fn cfg(split: bool) -> NodeConfig {
    let mut session = transport::SessionConfig::default();
    if std::env::var_os("SIMTCP_NO_FEC").is_some() {
        session.fec = false;
    }
    NodeConfig {
        session,
        split: SplitConfig {
            enabled: split,
            ..SplitConfig::default()
        },
        ..NodeConfig::default()
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let secs: u64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(8);
    let losses: Vec<f64> = args
        .get(1)
        .map_or("0,1,5,10,20", String::as_str)
        .split(',')
        .filter_map(|x| x.parse().ok())
        .collect();
    let profiles: Vec<(u64, u64)> = args
        .get(2)
        .map_or("50:100,200:20", String::as_str)
        .split(',')
        .filter_map(|p| {
            let (a, b) = p.split_once(':')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .collect();
    println!("simulated: one CUBIC flow (smoltcp, 4 MiB windows) for {secs} s, bottleneck queue 50 ms, loss i.i.d. each way");
    println!();
    println!("| RTT ms | Mbit/s | loss | split Mbit/s | split wire/payload | packets Mbit/s | packets wire/payload | msgs split p50 / p99 ms |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    if let Ok(l) = std::env::var("SIMTCP_TRACE") {
        let v: Vec<f64> = l
            .split(':')
            .map(|x| x.parse().expect("LOSS[:RTT:MBIT]"))
            .collect();
        trace(
            v[0],
            *v.get(1).unwrap_or(&50.0) as u64,
            *v.get(2).unwrap_or(&100.0) as u64,
        );
        return;
    }
    for &(rtt, mbit) in &profiles {
        for &loss in &losses {
            let spec = LinkSpec::latency(Duration::from_millis(rtt / 2))
                .with_loss(loss / 100.0)
                .with_rate(mbit * 1_000_000, (mbit * 1_000_000 / 8 / 20) as usize);
            let mut row = Vec::new();
            for split in [true, false] {
                let seed = std::env::var("SIMTCP_SEED")
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(1);
                let (mut net, _, _) =
                    tcp_pair(seed, (cfg(split), cfg(split)), spec.clone(), 4 << 20);
                let w0 = net.wire(0, 1).bytes;
                // More than the link can carry in `secs`: goodput is the rate.
                let total = mbit * 1_000_000 / 8 * secs * 2;
                let (st, _, bps) = transfer(&mut net, total, 5001, Duration::from_secs(secs));
                let wire = (net.wire(0, 1).bytes - w0) as f64 / st.read.max(1) as f64;
                row.push(format!("{:.1} | {:.2}", bps / 1e6, wire));
                if std::env::var_os("SIMTCP_DEBUG").is_some() {
                    let kb = *net.node(1).node.public_key();
                    let w = net.wire(0, 1);
                    eprintln!(
                        "split {split} loss {loss}: wire {} frames {} bytes, read {}; {:?}",
                        w.packets,
                        w.bytes,
                        st.read,
                        net.node(0).node.peer_stats(&kb)
                    );
                    let ka = *net.node(0).node.public_key();
                    eprintln!(
                        "  receiver rx_frames, tx_frames, ack_copies: {:?}",
                        net.node(1).node.peer_stats(&ka).map(|s| (
                            s.rx_frames,
                            s.tx_frames,
                            s.ack_copies
                        ))
                    );
                }
            }
            // The messages' own seed (SIMTCP_MSG_SEED, 2 unless given).
            let msg_seed = std::env::var("SIMTCP_MSG_SEED")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(2);
            let (mut net, _, _) = tcp_pair(msg_seed, (cfg(true), cfg(true)), spec.clone(), 1 << 20);
            let n = (secs * 50) as u32;
            let (r, _) = messages(
                &mut net,
                5300,
                Duration::from_millis(20),
                n,
                Duration::from_secs(secs + 10),
            );
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            let m = format!(
                "{:.0} / {:.0}{}",
                ms(quantile(&r, 0.5)),
                ms(quantile(&r, 0.99)),
                if r.len() < n as usize {
                    format!(" ({} of {n})", r.len())
                } else {
                    String::new()
                }
            );
            println!(
                "| {rtt} | {mbit} | {loss}% | {} | {} | {m} |",
                row[0], row[1]
            );
        }
    }
}

/// Every 250 ms (or `SIMTCP_TRACE_MS`) of one split transfer over `rtt` ms / `mbit` Mbit/s at `loss` %:
/// what the sender's controller and KCP are doing.
fn trace(loss: f64, rtt: u64, mbit: u64) {
    use sim::tcp_host::{AppKind, HOST_B};
    let spec = LinkSpec::latency(Duration::from_millis(rtt / 2))
        .with_loss(loss / 100.0)
        .with_rate(mbit * 1_000_000, (mbit * 1_000_000 / 8 / 20) as usize);
    let (mut net, _, kb) = tcp_pair(1, (cfg(true), cfg(true)), spec, 4 << 20);
    let now = net.now();
    net.host_mut(1).add(
        now,
        AppKind::Sink {
            port: 5001,
            rate: None,
            reply: 0,
            abort_after: None,
        },
    );
    net.host_mut(0).add(
        now,
        AppKind::Send {
            to: std::net::SocketAddr::new(HOST_B, 5001),
            port: 45001,
            total: 1 << 30,
        },
    );
    let (mut last_read, mut last_tx, mut last_retx) = (0, 0, 0);
    // SIMTCP_TRACE_MS: the step (250 ms unless given), 10 s in all.
    let step: u64 = std::env::var("SIMTCP_TRACE_MS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&ms| ms > 0)
        .unwrap_or(250);
    for _ in 0..10_000 / step {
        net.run_for(Duration::from_millis(step));
        let read = net.host(1).apps[0].stats.read;
        let s = net.node(0).node.session(&kb).expect("session");
        let st = s.stats();
        let cc = s.rate_control();
        eprintln!(
            "{:>6.2}s read {:>5.1} Mbit/s frames {:>5} retx {:>5} | {} btl {:.1} pace {:.1} Mbit/s loss {:.3} clean {:.3} minrtt {:?} srtt {:?} backlog {}",
            net.now().as_secs_f64(),
            (read - last_read) as f64 * 8.0 / (step as f64 / 1e3) / 1e6,
            st.tx_frames - last_tx,
            st.retransmits - last_retx,
            cc.phase(),
            cc.btl_bw() * 8.0 / 1e6,
            cc.pacing_rate() * 8.0 / 1e6,
            cc.loss(),
            cc.clean_loss(),
            cc.min_rtt(),
            st.srtt,
            s.kcp_backlog(),
        );
        last_read = read;
        last_tx = st.tx_frames;
        last_retx = st.retransmits;
    }
}
