//! `fastmesh-lab compare`: fastmesh beside the userspace WireGuard tunnels
//! (wireguard-go, boringtun) and no tunnel, on one flat lab, in the same run.
//!
//! All tunnels are up at once between the same two namespaces; runs are
//! interleaved (run 1 of every tunnel, then run 2, ...) so a noisy moment of
//! the machine hits them alike. Per tunnel it prints the median, minimum and
//! maximum of the runs, how long each run took to reach 80% of its final rate
//! (from iperf3's 100 ms intervals), the tunnel processes' CPU per GB and
//! the idle ping.

use anyhow::{bail, Context, Result};
use fastmesh_tests::lab::Lab;
use std::process::{Child, Command};
use std::time::Duration;

/// One tunnel between node 1 and node 2.
struct Tunnel {
    name: &'static str,
    /// Node 2's address through it.
    dst: String,
    /// Processes whose CPU counts as the tunnel's.
    pids: Vec<u32>,
}

/// One iperf3 run.
struct Run {
    mbit: f64,
    bytes: u64,
    cpu: f64,
    /// Seconds until a 100 ms interval first carried 80% of the final rate.
    ramp: f64,
}

fn which(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn wg_key() -> Result<(String, String)> {
    let k = Command::new("wg").arg("genkey").output()?;
    let private = String::from_utf8(k.stdout)?.trim().to_string();
    let mut p = Command::new("wg")
        .arg("pubkey")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    use std::io::Write;
    p.stdin
        .take()
        .context("wg pubkey stdin")?
        .write_all(private.as_bytes())?;
    let o = p.wait_with_output()?;
    Ok((private, String::from_utf8(o.stdout)?.trim().to_string()))
}

/// The pid of the process in node `k`'s namespace whose command line starts with `cmd`
/// and names `dev` (wireguard-go and boringtun fork or run under `ip netns exec`).
fn find_pid(cmd: &str, dev: &str) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(c) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = c
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.first().is_some_and(|a| a.ends_with(cmd)) && args.iter().any(|a| a == dev) {
            return Some(pid);
        }
    }
    None
}

/// A WireGuard tunnel run by `prog` ("wireguard-go" or "boringtun-cli")
/// between nodes 1 and 2 on interfaces `{dev}1`/`{dev}2`, addresses
/// 10.`net`.0.1/2, UDP port `port`.
fn wireguard(
    lab: &Lab,
    prog: &'static str,
    name: &'static str,
    dev: &str,
    net: u8,
    port: u16,
    children: &mut Vec<Child>,
) -> Result<Tunnel> {
    let keys = [wg_key()?, wg_key()?];
    let mut pids = Vec::new();
    for k in [1usize, 2] {
        let ifname = format!("{dev}{k}");
        let args: Vec<&str> = match prog {
            "wireguard-go" => vec!["-f", &ifname],
            _ => vec![
                &ifname,
                "--foreground",
                "--disable-drop-privileges",
                "--threads",
                "2",
            ],
        };
        children.push(lab.spawn(k, &format!("{ifname}.log"), prog, &args)?);
        // The interface appears once the daemon has started.
        lab.wait(Duration::from_secs(5), |l| {
            l.exec(k, "ip", &["link", "show", &ifname])
                .is_ok_and(|o| o.status.success())
        })
        .with_context(|| format!("{prog} did not create {ifname}"))?;
        let keyfile = lab.path(&format!("{ifname}.key"));
        std::fs::write(&keyfile, &keys[k - 1].0)?;
        let other = 3 - k;
        let endpoint = format!("{}:{port}", lab.nodes[other].underlay);
        let allowed = format!("10.{net}.0.{other}/32");
        let o = lab.exec(
            k,
            "wg",
            &[
                "set",
                &ifname,
                "private-key",
                &keyfile,
                "listen-port",
                &port.to_string(),
                "peer",
                &keys[other - 1].1,
                "endpoint",
                &endpoint,
                "allowed-ips",
                &allowed,
            ],
        )?;
        if !o.status.success() {
            bail!("wg set {ifname}: {}", String::from_utf8_lossy(&o.stderr));
        }
        lab.ns(
            &lab.nodes[k].ns,
            "ip",
            &["addr", "add", &format!("10.{net}.0.{k}/24"), "dev", &ifname],
        )?;
        lab.ns(&lab.nodes[k].ns, "ip", &["link", "set", &ifname, "up"])?;
        if let Some(p) = find_pid(prog, &ifname) {
            pids.push(p);
        }
    }
    Ok(Tunnel {
        name,
        dst: format!("10.{net}.0.2"),
        pids,
    })
}

/// The floor of any userspace tunnel on this machine: socat relaying
/// between a TUN device and a UDP socket, one process per side, no
/// encryption, one packet per system call. Interfaces `sc1`/`sc2`,
/// addresses 10.`net`.0.1/2; the TUN MTU leaves room for the IP and UDP
/// headers so that no datagram is fragmented.
fn socat(
    lab: &Lab,
    net: u8,
    port: u16,
    mtu: Option<u32>,
    children: &mut Vec<Child>,
) -> Result<Tunnel> {
    let mut pids = Vec::new();
    for k in [2usize, 1] {
        let tun = format!("TUN:10.{net}.0.{k}/24,tun-name=sc{k},iff-up,iff-no-pi");
        // Node 2 takes the first datagram's sender as its peer (the TUN
        // device comes first: socat opens its addresses in order).
        let udp = if k == 2 {
            format!("UDP-LISTEN:{port},reuseaddr")
        } else {
            format!("UDP:{}:{port},sourceport={port}", lab.nodes[2].underlay)
        };
        let child = lab.spawn(
            k,
            &format!("socat{k}.log"),
            "socat",
            &["-b", "65536", &tun, &udp],
        )?;
        pids.push(child.id());
        children.push(child);
        let dev = format!("sc{k}");
        lab.wait(Duration::from_secs(5), |l| {
            l.exec(k, "ip", &["link", "show", &dev])
                .is_ok_and(|o| o.status.success())
        })
        .with_context(|| format!("socat did not create {dev}"))?;
        let mtu = (mtu.unwrap_or(1500) - 28).to_string();
        lab.exec(k, "ip", &["link", "set", &dev, "mtu", &mtu])?;
    }
    Ok(Tunnel {
        name: "socat (no crypto)",
        dst: format!("10.{net}.0.2"),
        pids,
    })
}

fn run_iperf(lab: &Lab, t: &Tunnel, secs: u32, cc: &str) -> Result<Run> {
    let (v, cpu) = super::iperf_json(lab, &t.dst, 5202, 5202, secs, cc, &["-i", "0.1"], &t.pids)?;
    let r = &v["end"]["sum_received"];
    let iv: Vec<(f64, f64)> = v["intervals"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| {
                    (
                        i["sum"]["end"].as_f64().unwrap_or(0.0),
                        i["sum"]["bits_per_second"].as_f64().unwrap_or(0.0),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Run {
        mbit: r["bits_per_second"].as_f64().unwrap_or(0.0) / 1e6,
        bytes: r["bytes"].as_u64().unwrap_or(0),
        cpu,
        ramp: ramp_time(&iv),
    })
}

/// When the rate first reached 80% of the final rate (the mean of the last
/// half of the intervals); the run's length if never.
fn ramp_time(iv: &[(f64, f64)]) -> f64 {
    let tail = &iv[iv.len() / 2..];
    if tail.is_empty() {
        return 0.0;
    }
    let fin = tail.iter().map(|x| x.1).sum::<f64>() / tail.len() as f64;
    iv.iter()
        .find(|x| x.1 >= 0.8 * fin)
        .map(|x| x.0)
        .unwrap_or_else(|| iv.last().map(|x| x.0).unwrap_or(0.0))
}

/// Rounds of idle pings per tunnel (100 pings 10 ms apart each).
const PING_ROUNDS: usize = 3;

/// Idle ping through every tunnel before any transfer: [`PING_ROUNDS`]
/// rounds of 100 pings, the tunnels taking turns, so that each meets the
/// machine in the same state. Waking an idle vCPU costs tens of µs here,
/// and pinged once each after the transfers, in a fixed order, one tunnel's
/// average moved by 0.1 ms from run to run with the rest of the machine's
/// state. (avg, p99) ms per tunnel, `None` if no reply came.
fn idle_pings(lab: &Lab, tunnels: &[Tunnel]) -> Vec<Option<(f64, f64)>> {
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); tunnels.len()];
    for _ in 0..PING_ROUNDS {
        for (t, v) in tunnels.iter().zip(times.iter_mut()) {
            if let Ok(s) = super::ping_times(lab, &t.dst, 100) {
                v.extend(s);
            }
        }
    }
    times
        .iter()
        .map(|v| (!v.is_empty()).then(|| super::rtt_summary(v)))
        .collect()
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        0.0
    } else {
        s[s.len() / 2]
    }
}

/// `fastmesh-lab compare [RUNS] [SECS] [CC] [MTU]`.
pub fn compare(args: &[&str]) -> Result<()> {
    let runs: usize = args.first().map(|s| s.parse()).transpose()?.unwrap_or(5);
    let secs: u32 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(5);
    let cc = args.get(2).copied().unwrap_or("cubic");
    let mtu: Option<u32> = args.get(3).map(|s| s.parse()).transpose()?;
    let mut lab = Lab::new("fmc", 41, 2)?;
    if let Some(m) = mtu {
        lab.set_mtu(m)?;
    }
    lab.start_mesh(2, Duration::from_secs(20))?;
    let mut children = Vec::new();
    let mut tunnels = vec![
        Tunnel {
            name: "no tunnel",
            dst: lab.nodes[2].underlay.to_string(),
            pids: vec![],
        },
        Tunnel {
            name: "fastmesh",
            dst: lab.nodes[2].overlay.to_string(),
            pids: [1, 2].iter().filter_map(|k| lab.pid(*k)).collect(),
        },
    ];
    let result = measure(&lab, &mut tunnels, &mut children, runs, secs, cc, mtu);
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    result
}

/// Bring up the WireGuard tunnels beside the others, then run and print the comparison.
fn measure(
    lab: &Lab,
    tunnels: &mut Vec<Tunnel>,
    children: &mut Vec<Child>,
    runs: usize,
    secs: u32,
    cc: &str,
    mtu: Option<u32>,
) -> Result<()> {
    for (prog, name, dev, net, port) in [
        ("wireguard-go", "wireguard-go", "wgc", 97u8, 51820u16),
        ("boringtun-cli", "boringtun", "btc", 96, 51821),
    ] {
        if !which(prog) || !which("wg") {
            println!("({name} not installed: skipped)");
            continue;
        }
        match wireguard(lab, prog, name, dev, net, port, children) {
            Ok(t) => tunnels.push(t),
            Err(e) => println!("({name}: {e:#}; skipped)"),
        }
    }
    if which("socat") {
        match socat(lab, 95, 51822, mtu, children) {
            Ok(t) => tunnels.push(t),
            Err(e) => println!("(socat: {e:#}; skipped)"),
        }
    } else {
        println!("(socat not installed: skipped)");
    }
    // Warm up every tunnel (handshakes, path probes) before measuring.
    for t in tunnels.iter() {
        let _ = super::ping_times(lab, &t.dst, 50);
    }
    let pings = idle_pings(lab, tunnels);
    let mut results: Vec<Vec<Run>> = tunnels.iter().map(|_| Vec::new()).collect();
    for _ in 0..runs {
        for (t, res) in tunnels.iter().zip(results.iter_mut()) {
            match run_iperf(lab, t, secs, cc) {
                Ok(r) => res.push(r),
                Err(e) => println!("({}: {e:#})", t.name),
            }
        }
    }
    println!(
        "fastmesh {} | flat lab{} | {runs} x {secs} s iperf3 -C {cc}, interleaved | peer1 -> peer2",
        env!("CARGO_PKG_VERSION"),
        mtu.map(|m| format!(", underlay MTU {m}"))
            .unwrap_or_default()
    );
    println!();
    println!("| tunnel | median Mbit/s | min | max | runs | median s to 80% | max s to 80% | tunnel CPU s/GB | ping avg ms | ping p99 ms |");
    println!("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|");
    for ((t, res), ping) in tunnels.iter().zip(&results).zip(&pings) {
        let rates: Vec<f64> = res.iter().map(|r| r.mbit).collect();
        let ramps: Vec<f64> = res.iter().map(|r| r.ramp).collect();
        let bytes: u64 = res.iter().map(|r| r.bytes).sum();
        let cpu: f64 = res.iter().map(|r| r.cpu).sum();
        let (pa, pp) = ping.unwrap_or((f64::NAN, f64::NAN));
        let cpu_gb = if t.pids.is_empty() {
            "-".to_string()
        } else {
            format!("{:.1}", cpu / (bytes as f64 / 1e9).max(1e-9))
        };
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {} | {:.1} | {:.1} | {} | {:.3} | {:.3} |",
            t.name,
            median(&rates),
            rates.iter().copied().fold(f64::INFINITY, f64::min),
            rates.iter().copied().fold(0.0, f64::max),
            rates
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(" "),
            median(&ramps),
            ramps.iter().copied().fold(0.0, f64::max),
            cpu_gb,
            pa,
            pp
        );
    }
    Ok(())
}
