//! `fastmesh-lab wan`: bulk TCP and message latency over an emulated WAN
//! (the router's user-space delay, rate limit and loss, `fastmesh_tests::wan`),
//! through fastmesh, without a tunnel, and through kcptun with and without FEC,
//! in the same run on the same lab.

use super::{iperf_via, Iperf};
use anyhow::{bail, Context, Result};
use fastmesh_tests::lab::Lab;
use fastmesh_tests::wan::WanSpec;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Child;
use std::time::{Duration, Instant};

const MSG: usize = 64;
const ECHO_PORT: u16 = 5300;

/// Echo 64-byte messages on every connection until killed.
pub fn msg_echo(port: u16) -> Result<()> {
    let l = TcpListener::bind(("0.0.0.0", port))?;
    for c in l.incoming() {
        let mut c = c?;
        c.set_nodelay(true)?;
        std::thread::spawn(move || {
            let mut b = [0u8; MSG];
            while c.read_exact(&mut b).is_ok() {
                if c.write_all(&b).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

/// Send `count` 64-byte messages `every_ms` apart (not waiting for replies)
/// and print the round-trip times of the echoes: p50, p99, max, in ms.
pub fn msg_ping(addr: SocketAddr, count: u32, every_ms: u64) -> Result<()> {
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    c.set_nodelay(true)?;
    let mut r = c.try_clone()?;
    r.set_read_timeout(Some(Duration::from_secs(5)))?;
    let start = Instant::now();
    let sender = std::thread::spawn(move || -> Result<()> {
        for i in 0..count {
            let at = start + Duration::from_millis(every_ms * u64::from(i));
            if let Some(w) = at.checked_duration_since(Instant::now()) {
                std::thread::sleep(w);
            }
            let mut b = [0u8; MSG];
            b[..8].copy_from_slice(&(start.elapsed().as_nanos() as u64).to_le_bytes());
            c.write_all(&b)?;
        }
        Ok(())
    });
    let mut rtts = Vec::with_capacity(count as usize);
    let mut sent_at = Vec::with_capacity(count as usize);
    let mut b = [0u8; MSG];
    while rtts.len() < count as usize && r.read_exact(&mut b).is_ok() {
        let sent = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
        let now = start.elapsed().as_nanos() as u64;
        rtts.push(now.saturating_sub(sent) as f64 / 1e6);
        sent_at.push(sent as f64 / 1e9);
    }
    // The five slowest, with when they were sent (s from the start): a
    // slow start of the connection and a loss show differently.
    let mut slow: Vec<(f64, f64)> = sent_at.iter().copied().zip(rtts.iter().copied()).collect();
    slow.sort_by(|a, b| b.1.total_cmp(&a.1));
    slow.truncate(5);
    let _ = sender.join();
    if rtts.is_empty() {
        bail!("no echoes from {addr}");
    }
    rtts.sort_by(f64::total_cmp);
    let q = |p: f64| rtts[((rtts.len() as f64 * p).ceil() as usize).clamp(1, rtts.len()) - 1];
    println!(
        "sent {count} received {} p50 {:.1} p99 {:.1} max {:.1} slowest {}",
        rtts.len(),
        q(0.5),
        q(0.99),
        rtts[rtts.len() - 1],
        slow.iter()
            .map(|(t, r)| format!("{r:.0}ms@{t:.2}s"))
            .collect::<Vec<_>>()
            .join(",")
    );
    Ok(())
}

/// (p50, p99) ms of messages from node 1 to `dst:port`.
fn messages(lab: &Lab, dst: &str, port: u16, secs: u32) -> Result<(f64, f64)> {
    let count = (secs * 50).to_string();
    let o = lab.exec(
        1,
        &std::env::current_exe()?.display().to_string(),
        &["msg-ping", &format!("{dst}:{port}"), &count, "20"],
    )?;
    let text = String::from_utf8_lossy(&o.stdout);
    // The slowest messages and when they went, to tell a slow start of
    // the connection from a loss (stderr; the table is on stdout).
    eprintln!("messages to {dst}: {}", text.trim());
    let field = |name: &str| -> Option<f64> {
        let mut it = text.split_whitespace();
        it.find(|w| *w == name)?;
        it.next()?.parse().ok()
    };
    match (field("p50"), field("p99")) {
        (Some(a), Some(b)) => Ok((a, b)),
        _ => bail!(
            "msg-ping: {text} {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
    }
}

/// A kcptun pair: server on node 2 forwarding to `target` there, client on
/// node 1 listening on 127.0.0.1:`local`.
fn kcptun(lab: &Lab, fec: bool, target: u16, local: u16, udp: u16) -> Result<[Child; 2]> {
    let (ds, ps) = if fec { ("10", "3") } else { ("0", "0") };
    let common = [
        "--mode", "fast3", "--crypt", "none", "--nocomp", "--sndwnd", "1024", "--rcvwnd", "1024",
        "--ds", ds, "--ps", ps, "--quiet",
    ];
    let mut sa = vec![
        "-l".to_string(),
        format!(":{udp}"),
        "-t".into(),
        format!("127.0.0.1:{target}"),
    ];
    sa.extend(common.iter().map(|s| s.to_string()));
    let sa: Vec<&str> = sa.iter().map(String::as_str).collect();
    let srv = lab.spawn(2, &format!("kcps{udp}.log"), "kcptun-server", &sa)?;
    let mut ca = vec![
        "-l".to_string(),
        format!("127.0.0.1:{local}"),
        "-r".into(),
        format!("{}:{udp}", lab.nodes[2].underlay),
    ];
    ca.extend(common.iter().map(|s| s.to_string()));
    let ca: Vec<&str> = ca.iter().map(String::as_str).collect();
    let cli = lab.spawn(1, &format!("kcpc{udp}.log"), "kcptun-client", &ca)?;
    lab.wait_listening(1, local, false)?;
    lab.wait_listening(2, udp, true)?;
    Ok([srv, cli])
}

/// tcpdump on node `k`'s interfaces into `file` (`opts`: snap length and
/// filter), flushed per packet so a kill loses nothing; returned once it
/// captures (it says so in its log).
fn capture(lab: &Lab, k: usize, file: &str, opts: &[&str]) -> Option<Child> {
    let log = format!("tcpdump{k}.log");
    let mut args = vec!["-U", "-i", "any", "-w", file];
    args.extend_from_slice(opts);
    let d = lab.spawn(k, &log, "tcpdump", &args).ok()?;
    let _ = lab.wait(Duration::from_secs(10), |l| {
        l.log(&log).contains("listening on")
    });
    Some(d)
}

fn stop(procs: impl IntoIterator<Item = Child>) {
    for mut c in procs {
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn mbit(r: &Result<Iperf>) -> String {
    match r {
        Ok(i) if std::env::var_os("FASTMESH_BENCH_STATUS").is_some() => {
            format!("{:.1} ({} retx)", i.bps / 1e6, i.retrans)
        }
        Ok(i) => format!("{:.1}", i.bps / 1e6),
        Err(e) => format!(
            "err: {}",
            e.to_string().chars().take(40).collect::<String>()
        ),
    }
}

fn ms(r: &Result<(f64, f64)>) -> String {
    match r {
        Ok((a, b)) => format!("{a:.0} / {b:.0}"),
        Err(_) => "-".into(),
    }
}

/// `fastmesh-lab wan [SECS] [LOSSES] [PROFILES] [WHAT]`.
pub fn wan(args: &[&str]) -> Result<()> {
    let secs: u32 = args.first().map(|s| s.parse()).transpose()?.unwrap_or(8);
    let losses: Vec<f64> = args
        .get(1)
        .unwrap_or(&"0,1,5,10,20")
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("losses")?;
    let profiles: Vec<(u64, f64)> = args
        .get(2)
        .unwrap_or(&"50:100,200:20")
        .split(',')
        .map(|p| -> Result<(u64, f64)> {
            let (a, b) = p.split_once(':').context("PROFILE is RTT_MS:MBIT")?;
            Ok((a.parse()?, b.parse()?))
        })
        .collect::<Result<_>>()?;
    let what = args.get(3).copied().unwrap_or("all");
    let on = |w: &str| what == "all" || what.split(',').any(|x| x == w);
    if (on("kcptun") || on("kcptun-fec")) && which("kcptun-server").is_none() {
        bail!("kcptun not found: apt-get install kcptun");
    }
    let _ = std::process::Command::new("modprobe")
        .arg("tcp_bbr")
        .output();
    let exe = std::env::current_exe()?;
    let me = exe.display().to_string();
    println!(
        "fastmesh {} | iperf3 -t {secs}, one flow, Mbit/s; messages: 64 B every 20 ms over TCP, echoed, RTT p50 / p99 ms",
        env!("CARGO_PKG_VERSION")
    );
    println!("WAN: the lab router's user-space stages (fastmesh_tests::wan), queue 50 ms at the rate, loss i.i.d. each way");
    println!("A new lab per row, the WAN in place before the mesh starts (every estimate is of this WAN, nothing carried over from another row).");
    println!();
    println!("| RTT ms | Mbit/s | loss | fastmesh cubic | fastmesh bbr | no tunnel cubic | no tunnel bbr | kcptun | kcptun FEC 10/3 | msgs fastmesh | msgs no tunnel | msgs kcptun | msgs kcptun FEC |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let skip = || -> Result<Iperf> { bail!("skipped") };
    let skip_ms = || -> Result<(f64, f64)> { bail!("skipped") };
    for (seed, &(rtt, rate)) in profiles.iter().enumerate() {
        let wan = |loss: f64| WanSpec {
            rtt_ms: rtt,
            rate_mbit: rate,
            queue_ms: 50,
            loss_pct: loss,
            jitter_ms: 0,
        };
        for &loss in &losses {
            let mut lab = Lab::new("fmw", 41, 2)?;
            lab.set_wan(&exe, Some(wan(loss)), 7 + seed as u64)?;
            lab.start_mesh(2, Duration::from_secs(30))?;
            let mesh = lab.nodes[2].overlay.to_string();
            let direct = lab.nodes[2].underlay.to_string();
            let mut echo = lab.spawn(2, "echo.log", &me, &["msg-echo", &ECHO_PORT.to_string()])?;
            lab.wait_listening(2, ECHO_PORT, false)?;
            // Let the sessions measure the path.
            std::thread::sleep(Duration::from_secs(2));
            let run = |w: &str, dst: &str, port: u16, cc: &str| {
                if on(w) {
                    iperf_via(&lab, dst, port, secs, cc)
                } else {
                    skip()
                }
            };
            let diag = |when: &str| {
                if std::env::var_os("FASTMESH_BENCH_STATUS").is_none() {
                    return;
                }
                if let Ok(v) = lab.status(1) {
                    let p = &v["status"]["peers"][0];
                    eprintln!(
                        "after {when}: path {} ({}) path_changes {} path_mtu {} settled {} capacity {} Mbit/s black_holes {} retx {} restarts {} streams {}",
                        p["path"], p["path_reason"], p["path_changes"], p["path_mtu"], p["pmtu_settled"], p["capacity_mbit"],
                        p["pmtu_black_holes"], p["retransmits"], p["restarts"], p["streams_opened"]
                    );
                }
            };
            diag("forming");
            // FASTMESH_BENCH_PCAP=FILE: node 1's packet headers (underlay
            // and TUN) during the first transfer, to see its sending rate
            // at fine grain and what its application handed over
            // (tests/scripts/pcap-rate.py).
            let pcap = std::env::var("FASTMESH_BENCH_PCAP")
                .ok()
                .and_then(|f| capture(&lab, 1, &f, &["-s", "96"]));
            let mc = run("mesh", &mesh, 5201, "cubic");
            stop(pcap);
            diag("cubic");
            let mb = run("mesh", &mesh, 5201, "bbr");
            diag("bbr");
            let dc = run("direct", &direct, 5201, "cubic");
            let db = run("direct", &direct, 5201, "bbr");
            let msg = |w: &str, dst: &str, port: u16| {
                if on(w) {
                    messages(&lab, dst, port, secs.min(6))
                } else {
                    skip_ms()
                }
            };
            // FASTMESH_BENCH_PCAP_MSGS=PREFIX: both nodes' packets (TUN and
            // underlay) while messages cross the mesh, to PREFIX.1 and PREFIX.2.
            let caps: Vec<Child> = std::env::var("FASTMESH_BENCH_PCAP_MSGS")
                .ok()
                .map(|f| {
                    [1, 2]
                        .into_iter()
                        .filter_map(|k| capture(&lab, k, &format!("{f}.{k}"), &["-s", "128"]))
                        .collect()
                })
                .unwrap_or_default();
            if on("mesh") {
                // iperf3 ends when its sender has written all; the split
                // proxy may still be sending the last of it (up to its
                // buffers, ~0.1 s at this rate). Messages sent into that
                // tail queue behind it at the bottleneck (lab: the first
                // four 63-84 ms): measure them on a quiet mesh, as kcptun's
                // are (its processes restart between the runs).
                let quiet = lab.wait(Duration::from_secs(5), |l| {
                    l.status(1).is_ok_and(|v| {
                        v["status"]["peers"][0]["tx_bps"]
                            .as_f64()
                            .is_some_and(|b| b < 1e6)
                    })
                });
                if quiet.is_err() {
                    eprintln!("node 1 still sending 5 s after the transfers");
                }
            }
            let mm = msg("mesh", &mesh, ECHO_PORT);
            stop(caps);
            let dm = msg("direct", &direct, ECHO_PORT);
            let mut kc = Vec::new();
            for (w, fec) in [("kcptun", false), ("kcptun-fec", true)] {
                if !on(w) {
                    kc.push((skip(), skip_ms()));
                    continue;
                }
                let bulk = kcptun(&lab, fec, 5201, 12948, 29900).and_then(|p| {
                    let r = iperf_via(&lab, "127.0.0.1", 12948, secs, "cubic");
                    stop(p);
                    r
                });
                let m = kcptun(&lab, fec, ECHO_PORT, 12949, 29901).and_then(|p| {
                    let r = messages(&lab, "127.0.0.1", 12949, secs.min(6));
                    stop(p);
                    r
                });
                kc.push((bulk, m));
            }
            println!(
                "| {rtt} | {rate} | {loss}% | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                mbit(&mc),
                mbit(&mb),
                mbit(&dc),
                mbit(&db),
                mbit(&kc[0].0),
                mbit(&kc[1].0),
                ms(&mm),
                ms(&dm),
                ms(&kc[0].1),
                ms(&kc[1].1),
            );
            if std::env::var_os("FASTMESH_BENCH_STATUS").is_some() {
                for k in [1, 2] {
                    println!("{}", lab.status_table(k));
                    // Receive-buffer overflows in the node (kernel drops before fastmesh).
                    if let Ok(o) = lab.exec(k, "cat", &["/proc/net/snmp"]) {
                        let t = String::from_utf8_lossy(&o.stdout);
                        for l in t.lines().filter(|l| l.starts_with("Udp:")) {
                            println!("{l}");
                        }
                    }
                }
                if let Ok(o) = lab.ns(
                    &lab.router,
                    "ip",
                    &["-s", "link", "show", fastmesh_tests::wan::WAN_DEV],
                ) {
                    println!("{}", String::from_utf8_lossy(&o.stdout));
                }
            }
            let _ = echo.kill();
            let _ = echo.wait();
        }
    }
    Ok(())
}

fn which(cmd: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(cmd))
        .find(|p| p.exists())
}
