//! `fastmesh-lab`: the demo, and the small clients the namespace tests and the
//! benchmark run inside namespaces (a checksummed TCP transfer, a UDP echo).

use anyhow::{bail, Context, Result};
use blake2::{Blake2b512, Digest};
use fastmesh_tests::lab::{mbps, proc_cpu_secs, system_busy_secs, Lab};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

mod compare;
mod hubload;
mod wan_bench;

const USAGE: &str = "usage:
  fastmesh-lab demo                        build a 3-peer mesh in namespaces, show it working, clean up
  fastmesh-lab setup                       install what the labs and benchmarks run beside fastmesh
                                           (Debian packages, boringtun-cli from crates.io)
  fastmesh-lab up SECS                     hub + 2 peers in namespaces, held for SECS seconds (prints
                                           namespaces, addresses and PIDs; for ping, perf, strace)
  fastmesh-lab idle [SECS]                 hub + 2 peers, idle: after 40 s (sessions quiet), SECS of
                                           frames out of a peer, CPU and wake-ups per process
  fastmesh-lab bench [SECS] [LOSSES] [CCS] iperf3/ping through the mesh vs direct over the same veth
                                           (defaults: 10 0,1,5 cubic,bbr)
  fastmesh-lab flood ADDR:PORT RATE SECS   send RATE bogus handshake initiations per second for SECS
  fastmesh-lab crypto-cost                 CPU seconds per GB of the data-path AEAD (seal + open)
  fastmesh-lab dos SECS [RATES]            iperf3 between two peers with and without a flood at one of them
                                           (RATES: initiations/s, comma-separated, default 0,5000,20000,100000)
  fastmesh-lab tcp-recv PORT               accept one TCP connection, print bytes, hash, seconds
  fastmesh-lab tcp-send ADDR:PORT BYTES    send BYTES pseudo-random bytes, print bytes and hash
  fastmesh-lab udp-echo PORT SECS          echo UDP datagrams for SECS seconds
  fastmesh-lab udp-ping ADDR:PORT COUNT    send COUNT datagrams 1 ms apart, print sent and echoed
  fastmesh-lab wan [SECS] [LOSSES] [PROFILES] [WHAT]
                                           TCP and message RTT over an emulated WAN: fastmesh (inner
                                           cubic, bbr), no tunnel, kcptun with and without FEC
                                           (defaults: 8 0,1,5,10,20 50:100,200:20 all;
                                           PROFILE = RTT_MS:MBIT; WHAT = all or a comma list of
                                           mesh,direct,kcptun,kcptun-fec)
  fastmesh-lab compare [RUNS] [SECS] [CC] [MTU]
                                           fastmesh beside wireguard-go, boringtun and no tunnel on
                                           the flat lab, runs interleaved: rate, ramp-up, CPU/GB, ping
                                           (defaults: 5 5 cubic, MTU 1500)
  fastmesh-lab hubload N [SECS] [HEARTBEAT] [MAP]
                                           N simulated members (real handshakes, registration,
                                           heartbeats, deltas) against a real hub: join time, idle
                                           frames per member, hub CPU and RSS, time for one change
                                           to reach all (defaults: 30 s, heartbeat 10 s; MAP = full
                                           or on-demand, the hub's --peer-map, default full)
  fastmesh-lab wan-router DEV RTT_MS MBIT QUEUE_MS LOSS_PCT JITTER_MS SEED
                                           the WAN: forward packets read from TUN DEV after the delays
  fastmesh-lab msg-echo PORT               echo 64-byte TCP messages
  fastmesh-lab msg-ping ADDR:PORT COUNT MS send COUNT 64-byte messages MS apart, print RTT p50/p99";

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["demo"] => demo(),
        ["setup"] => setup(),
        ["up", secs] => up(secs.parse().context("secs")?),
        ["idle", rest @ ..] => idle(
            rest.first()
                .map(|s| s.parse())
                .transpose()
                .context("secs")?
                .unwrap_or(20),
        ),
        ["bench", rest @ ..] => bench(rest),
        ["flood", addr, rate, secs] => flood(
            addr.parse().context("address")?,
            rate.parse().context("rate")?,
            secs.parse().context("secs")?,
        ),
        ["dos", secs] => dos(secs.parse().context("secs")?, &[0, 5_000, 20_000, 100_000]),
        ["dos", secs, rates] => dos(
            secs.parse().context("secs")?,
            &rates
                .split(',')
                .map(str::parse)
                .collect::<Result<Vec<u64>, _>>()
                .context("rates: comma-separated initiations per second, first 0")?,
        ),
        ["crypto-cost"] => crypto_cost(),
        ["tcp-recv", port] => tcp_recv(port.parse().context("port")?),
        ["tcp-send", addr, bytes] => tcp_send(
            addr.parse().context("address")?,
            bytes.parse().context("bytes")?,
        ),
        ["udp-echo", port, secs] => {
            udp_echo(port.parse().context("port")?, secs.parse().context("secs")?)
        }
        ["wan-router", dev, rest @ ..] if rest.len() == 6 => {
            let spec = fastmesh_tests::wan::WanSpec::parse(&rest[..5])?;
            let seed = rest[5].parse().context("seed")?;
            let st =
                fastmesh_tests::wan::run_router(dev, spec, seed, Duration::from_secs(24 * 3600))?;
            println!("{st:?}");
            Ok(())
        }
        ["wan", rest @ ..] => wan_bench::wan(rest),
        ["compare", rest @ ..] => compare::compare(rest),
        ["hubload", rest @ ..] => hubload::hubload(rest),
        ["hubload-gen", rest @ ..] => hubload::generator(rest),
        ["msg-echo", port] => wan_bench::msg_echo(port.parse().context("port")?),
        ["msg-ping", addr, count, every_ms] => wan_bench::msg_ping(
            addr.parse().context("address")?,
            count.parse().context("count")?,
            every_ms.parse().context("interval ms")?,
        ),
        ["udp-ping", addr, count] => udp_ping(
            addr.parse().context("address")?,
            count.parse().context("count")?,
        ),
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    }
}

/// The deterministic byte stream both ends of a transfer agree on.
struct Stream(u64);

impl Stream {
    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let v = self.0.to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

fn hex(d: &[u8]) -> String {
    d[..16].iter().map(|b| format!("{b:02x}")).collect()
}

fn tcp_recv(port: u16) -> Result<()> {
    let l = TcpListener::bind(("::", port)).or_else(|_| TcpListener::bind(("0.0.0.0", port)))?;
    let (mut s, _) = l.accept()?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let t = Instant::now();
    let mut h = Blake2b512::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        let k = s.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    println!(
        "{n} {} {:.3}",
        hex(&h.finalize()),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn tcp_send(addr: SocketAddr, bytes: u64) -> Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_write_timeout(Some(Duration::from_secs(60)))?;
    let mut g = Stream(0x9e37_79b9_7f4a_7c15);
    let mut h = Blake2b512::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut left = bytes;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        g.fill(&mut buf[..k]);
        s.write_all(&buf[..k])?;
        h.update(&buf[..k]);
        left -= k as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    // Wait for the receiver to close, so the sender's exit means delivery.
    let _ = s.read(&mut buf);
    println!("{bytes} {}", hex(&h.finalize()));
    Ok(())
}

fn udp_echo(port: u16, secs: u64) -> Result<()> {
    let s = UdpSocket::bind(("::", port)).or_else(|_| UdpSocket::bind(("0.0.0.0", port)))?;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    let t = Instant::now();
    let mut buf = [0u8; 2048];
    while t.elapsed() < Duration::from_secs(secs) {
        if let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    }
    Ok(())
}

fn udp_ping(addr: SocketAddr, count: u32) -> Result<()> {
    let bind = if addr.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    let s = UdpSocket::bind(bind)?;
    s.set_read_timeout(Some(Duration::from_millis(1)))?;
    let mut got = std::collections::BTreeSet::new();
    let mut buf = [0u8; 2048];
    for i in 0..count {
        let mut p = [0u8; 200];
        p[..4].copy_from_slice(&i.to_le_bytes());
        s.send_to(&p, addr)?;
        while let Ok((n, _)) = s.recv_from(&mut buf) {
            if n >= 4 {
                got.insert(u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]));
            }
        }
    }
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    while let Ok((n, _)) = s.recv_from(&mut buf) {
        if n >= 4 {
            got.insert(u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]));
        }
    }
    println!("{count} {}", got.len());
    Ok(())
}

fn step(what: &str) {
    println!("\n== {what}");
}

/// What an idle mesh costs: frames a peer sends, and each process's CPU and
/// wake-ups (voluntary context switches: each is a return from waiting).
fn idle(secs: u64) -> Result<()> {
    let mut lab = Lab::new("fmi", 53, 2)?;
    lab.start_mesh(2, Duration::from_secs(20))?;
    // Sessions go quiet 30 s after their last data.
    std::thread::sleep(Duration::from_secs(40));
    let dev = format!("{}b1", lab.prefix);
    let tx = |lab: &Lab| -> Result<u64> {
        let o = lab.exec(
            1,
            "cat",
            &[&format!("/sys/class/net/{dev}/statistics/tx_packets")],
        )?;
        Ok(String::from_utf8_lossy(&o.stdout).trim().parse()?)
    };
    let switches = |pid: u32| fastmesh_tests::lab::proc_status(pid, "voluntary_ctxt_switches");
    let pids: Vec<u32> = (0..3).filter_map(|k| lab.pid(k)).collect();
    let before: Vec<(f64, u64)> = pids
        .iter()
        .map(|&p| (proc_cpu_secs(p), switches(p)))
        .collect();
    let tx0 = tx(&lab)?;
    std::thread::sleep(Duration::from_secs(secs));
    let tx1 = tx(&lab)?;
    println!(
        "idle mesh, heartbeat 1 s: peer 1 sends {:.2} frames/s (to the hub and peer 2)",
        (tx1 - tx0) as f64 / secs as f64
    );
    for (k, (&p, b)) in pids.iter().zip(&before).enumerate() {
        let name = if k == 0 {
            "hub".to_string()
        } else {
            format!("peer {k}")
        };
        println!(
            "{name}: {:.2}% of a core, {:.1} wake-ups/s",
            (proc_cpu_secs(p) - b.0) * 100.0 / secs as f64,
            (switches(p) - b.1) as f64 / secs as f64
        );
    }
    Ok(())
}

/// Hold a two-peer mesh up for `secs` seconds, for looking at it by hand.
fn up(secs: u64) -> Result<()> {
    let mut lab = Lab::new("fmup", 52, 2)?;
    lab.start_mesh(2, Duration::from_secs(20))?;
    for (k, n) in lab.nodes.iter().enumerate() {
        println!(
            "{}: underlay {}  overlay {}  pid {}",
            n.ns,
            n.underlay,
            n.overlay,
            lab.pid(k).map(|p| p.to_string()).unwrap_or_default()
        );
    }
    println!("up for {secs} s (Ctrl-C leaves the namespaces behind)");
    std::thread::sleep(Duration::from_secs(secs));
    Ok(())
}

/// Debian packages the labs use: namespaces and loss (iproute2, nftables),
/// traffic (iperf3, ping, socat), captures, and the tunnels compared with
/// fastmesh (wireguard-go with wireguard-tools' `wg`, kcptun).
const LAB_PACKAGES: &[&str] = &[
    "iproute2",
    "nftables",
    "iperf3",
    "iputils-ping",
    "socat",
    "tcpdump",
    "wireguard-go",
    "wireguard-tools",
    "kcptun",
];

/// The boringtun release `compare` was measured with.
const BORINGTUN_VERSION: &str = "0.7.1";

/// `fastmesh-lab setup`: install what the labs need (as root, from the
/// Debian and crate registries); what is already there is left alone.
fn setup() -> Result<()> {
    let run = |cmd: &str, args: &[&str]| -> Result<()> {
        println!("$ {cmd} {}", args.join(" "));
        let st = std::process::Command::new(cmd)
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .with_context(|| format!("cannot run {cmd}"))?;
        if !st.success() {
            bail!("{cmd} failed ({st})");
        }
        Ok(())
    };
    run("apt-get", &["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q"];
    args.extend_from_slice(LAB_PACKAGES);
    run("apt-get", &args)?;
    let have_boringtun = std::process::Command::new("boringtun-cli")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if have_boringtun {
        println!("boringtun-cli is installed");
    } else {
        run(
            "cargo",
            &[
                "install",
                "boringtun-cli",
                "--locked",
                "--version",
                BORINGTUN_VERSION,
            ],
        )
        .context("boringtun-cli (needs cargo; it lands in ~/.cargo/bin, which must be on PATH)")?;
    }
    Ok(())
}

fn demo() -> Result<()> {
    let me = std::env::current_exe()?;
    let me = me.to_string_lossy().into_owned();
    step("building a network: router namespace + hub + 3 peers (veth, 10.250.k.0/24 underlay)");
    let mut lab = Lab::new("fmdemo", 50, 3)?;
    lab.start_hub(1.0)?;
    for k in 1..=3 {
        lab.start_peer(k, &[])?;
    }
    println!("hub key {}", lab.hub_key());
    for n in &lab.nodes[1..] {
        println!(
            "{}: underlay {}  overlay {} / {}",
            n.ns, n.underlay, n.overlay, n.overlay6
        );
    }
    step("waiting for the peers to register and connect");
    let t = lab
        .wait(Duration::from_secs(20), |l| {
            (1..=3).all(|k| l.peer_ready(k))
        })
        .map_err(|e| anyhow::anyhow!("{e}\n{}", lab.logs()))?;
    println!("mesh up after {:.1} s", t.as_secs_f64());

    let (p2, p3) = (
        lab.nodes[2].overlay.to_string(),
        lab.nodes[3].overlay6.clone(),
    );
    step(&format!("ping peer1 -> peer2 ({p2}) over the mesh"));
    let o = lab.exec(1, "ping", &["-c", "5", "-i", "0.2", "-W", "2", &p2])?;
    print!("{}", String::from_utf8_lossy(&o.stdout));
    step(&format!("ping peer1 -> peer3 over IPv6 ({p3})"));
    let o = lab.exec(1, "ping", &["-6", "-c", "3", "-i", "0.2", "-W", "2", &p3])?;
    print!("{}", String::from_utf8_lossy(&o.stdout));

    step("TCP transfer of 50 MB peer1 -> peer2, checksummed at both ends");
    let mut rx = lab.spawn(2, "recv.log", &me, &["tcp-recv", "5001"])?;
    lab.wait_listening(2, 5001, false)?;
    let t = Instant::now();
    let tx = lab.exec(1, &me, &["tcp-send", &format!("{p2}:5001"), "50000000"])?;
    let el = t.elapsed();
    let _ = rx.wait();
    let sent = String::from_utf8_lossy(&tx.stdout).trim().to_string();
    let got = lab.log("recv.log").trim().to_string();
    println!("sent:     {sent}\nreceived: {got}");
    let ok = got.split_whitespace().nth(1) == sent.split_whitespace().nth(1) && !sent.is_empty();
    println!(
        "{} in {:.2} s = {:.0} Mbit/s",
        if ok {
            "checksums match"
        } else {
            "CHECKSUM MISMATCH"
        },
        el.as_secs_f64(),
        mbps(50_000_000, el)
    );

    step("status on peer1 (`fastmesh status`)");
    print!("{}", lab.status_table(1));
    step("status on the hub");
    print!("{}", lab.status_table(0));
    step("cleaning up (processes, namespaces, files)");
    drop(lab);
    println!("done");
    if !ok {
        bail!("transfer checksum mismatch");
    }
    Ok(())
}

struct Iperf {
    bps: f64,
    bytes: u64,
    retrans: u64,
    sys_cpu: f64,
    mesh_cpu: f64,
}

fn iperf(lab: &Lab, dst: &str, secs: u32, cc: &str) -> Result<Iperf> {
    iperf_via(lab, dst, 5201, secs, cc)
}

/// iperf3 from node 1 to `dst:port`, with the server on node 2 port 5201
/// (`port` differs when a proxy in between forwards to it).
fn iperf_via(lab: &Lab, dst: &str, port: u16, secs: u32, cc: &str) -> Result<Iperf> {
    let pids: Vec<u32> = [1, 2].iter().filter_map(|k| lab.pid(*k)).collect();
    let sys0 = system_busy_secs();
    let every = bench_intervals();
    let extra: Vec<&str> = match &every {
        Some(i) => vec!["-i", i, "--get-server-output"],
        None => vec![],
    };
    let (v, mesh_cpu) = iperf_json(lab, dst, port, 5201, secs, cc, &extra, &pids)?;
    if every.is_some() {
        let text = v["server_output_text"].as_str().unwrap_or("");
        let rates: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("sec") && !l.contains("receiver"))
            .filter_map(|l| l.split_whitespace().rev().nth(1))
            .collect();
        eprintln!(
            "{dst} {cc} receiver Mbit/s per interval: {}",
            rates.join(" ")
        );
        let (s, r) = (&v["end"]["sum_sent"], &v["end"]["sum_received"]);
        eprintln!(
            "{dst} {cc} sent {} B in {:.3} s, received {} B in {:.3} s",
            s["bytes"],
            s["seconds"].as_f64().unwrap_or(0.0),
            r["bytes"],
            r["seconds"].as_f64().unwrap_or(0.0),
        );
    }
    let sys1 = system_busy_secs();
    let r = &v["end"]["sum_received"];
    Ok(Iperf {
        bps: r["bits_per_second"].as_f64().unwrap_or(0.0),
        bytes: r["bytes"].as_u64().unwrap_or(0),
        retrans: v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
        sys_cpu: sys1 - sys0,
        mesh_cpu,
    })
}

/// FASTMESH_BENCH_INTERVALS=SECS: the iperf3 server reports per SECS, and
/// the receiver's rate per interval is printed (stderr), to see where a
/// transfer loses time.
fn bench_intervals() -> Option<String> {
    std::env::var("FASTMESH_BENCH_INTERVALS").ok()
}

/// One iperf3 run from node 1 to `dst:port` (`-C cc`, `extra` options),
/// the server on node 2 at `server_port`: its JSON report, and the CPU
/// seconds the processes `pids` used meanwhile.
#[allow(clippy::too_many_arguments)]
fn iperf_json(
    lab: &Lab,
    dst: &str,
    port: u16,
    server_port: u16,
    secs: u32,
    cc: &str,
    extra: &[&str],
    pids: &[u32],
) -> Result<(serde_json::Value, f64)> {
    let sp = server_port.to_string();
    let every = bench_intervals().unwrap_or_else(|| "1".into());
    let mut srv = lab.spawn(
        2,
        "iperf-s.log",
        "iperf3",
        &["-s", "-1", "-p", &sp, "-i", &every],
    )?;
    lab.wait_listening(2, server_port, false)?;
    let cpu0: f64 = pids.iter().map(|p| proc_cpu_secs(*p)).sum();
    let (port, secs) = (port.to_string(), secs.to_string());
    let mut args = vec!["-c", dst, "-p", &port, "-t", &secs, "-C", cc, "-J"];
    args.extend_from_slice(extra);
    let o = lab.exec(1, "iperf3", &args)?;
    let cpu1: f64 = pids.iter().map(|p| proc_cpu_secs(*p)).sum();
    let _ = srv.kill();
    let _ = srv.wait();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&o.stderr)))?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    Ok((v, cpu1 - cpu0))
}

/// Round-trip times (ms) of the replies to `count` pings 10 ms apart
/// (`FASTMESH_PING_INTERVAL` seconds apart if set).
fn ping_times(lab: &Lab, dst: &str, count: u32) -> Result<Vec<f64>> {
    let interval = std::env::var("FASTMESH_PING_INTERVAL").unwrap_or_else(|_| "0.01".into());
    let o = lab.exec(
        1,
        "ping",
        &["-c", &count.to_string(), "-i", &interval, "-W", "1", dst],
    )?;
    let text = String::from_utf8_lossy(&o.stdout);
    let t: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|x| x.split_whitespace().next()?.parse().ok())
        .collect();
    if t.is_empty() {
        bail!("no ping replies from {dst}");
    }
    Ok(t)
}

/// (avg, p99) of round-trip times in ms.
fn rtt_summary(t: &[f64]) -> (f64, f64) {
    let mut t = t.to_vec();
    t.sort_by(|a, b| a.total_cmp(b));
    let avg = t.iter().sum::<f64>() / t.len().max(1) as f64;
    let p99 = t
        .get(((t.len() as f64 * 0.99).ceil() as usize).clamp(1, t.len().max(1)) - 1)
        .copied()
        .unwrap_or(f64::NAN);
    (avg, p99)
}

/// (avg, p99, loss%) of `count` pings (see [`ping_times`]).
fn ping_stats(lab: &Lab, dst: &str, count: u32) -> Result<(f64, f64, f64)> {
    let t = ping_times(lab, dst, count)?;
    let (avg, p99) = rtt_summary(&t);
    let loss = 100.0 * (1.0 - t.len() as f64 / count as f64);
    Ok((avg, p99, loss))
}

fn bench(args: &[&str]) -> Result<()> {
    let secs: u32 = args.first().map(|s| s.parse()).transpose()?.unwrap_or(10);
    let losses: Vec<u32> = args
        .get(1)
        .unwrap_or(&"0,1,5")
        .split(',')
        .map(|x| x.parse())
        .collect::<Result<_, _>>()?;
    let ccs: Vec<String> = args
        .get(2)
        .unwrap_or(&"cubic,bbr")
        .split(',')
        .map(String::from)
        .collect();
    let _ = std::process::Command::new("modprobe")
        .arg("tcp_bbr")
        .output();
    let mut lab = Lab::new("fmb", 40, 2)?;
    lab.start_mesh(2, Duration::from_secs(20))?;
    let mesh = lab.nodes[2].overlay.to_string();
    let direct = lab.nodes[2].underlay.to_string();
    println!("fastmesh {} | {} s per run | peer1 -> peer2 over the mesh ({mesh}) vs directly over the same veth path ({direct})", env!("CARGO_PKG_VERSION"), secs);
    println!();
    println!("| loss | cc | mesh Mbit/s | direct Mbit/s | ratio | mesh retrans | direct retrans | mesh CPU s/GB (system) | direct CPU s/GB (system) | fastmesh processes CPU s/GB |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut pings = Vec::new();
    for loss in &losses {
        lab.set_loss(*loss)?;
        for cc in &ccs {
            let m = iperf(&lab, &mesh, secs, cc);
            let d = iperf(&lab, &direct, secs, cc);
            match (m, d) {
                (Ok(m), Ok(d)) => {
                    let gb = |b: u64| (b as f64 / 1e9).max(1e-9);
                    println!(
                        "| {loss}% | {cc} | {:.0} | {:.0} | {:.2} | {} | {} | {:.1} | {:.1} | {:.1} |",
                        m.bps / 1e6,
                        d.bps / 1e6,
                        m.bps / d.bps.max(1.0),
                        m.retrans,
                        d.retrans,
                        m.sys_cpu / gb(m.bytes),
                        d.sys_cpu / gb(d.bytes),
                        m.mesh_cpu / gb(m.bytes)
                    );
                }
                (m, d) => println!(
                    "| {loss}% | {cc} | {} | {} | - | - | - | - | - | - |",
                    m.map(|m| format!("{:.0}", m.bps / 1e6))
                        .unwrap_or_else(|e| format!("error: {e}")),
                    d.map(|d| format!("{:.0}", d.bps / 1e6))
                        .unwrap_or_else(|e| format!("error: {e}"))
                ),
            }
        }
        let pm = ping_stats(&lab, &mesh, 500)?;
        let pd = ping_stats(&lab, &direct, 500)?;
        pings.push((*loss, pm, pd));
    }
    lab.set_loss(0)?;
    if std::env::var_os("FASTMESH_BENCH_STATUS").is_some() {
        for k in [1, 2] {
            println!(
                "{}",
                lab.status(k).map(|v| v.to_string()).unwrap_or_default()
            );
            // The TUN device's own counters (kernel queue drops are not ours).
            if let Ok(o) = lab.exec(k, "ip", &["-s", "link", "show", "fm0"]) {
                println!("{}", String::from_utf8_lossy(&o.stdout));
            }
        }
    }
    println!();
    println!("| loss | mesh ping avg ms | mesh p99 ms | mesh lost | direct ping avg ms | direct p99 ms | direct lost |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for (loss, m, d) in pings {
        println!(
            "| {loss}% | {:.3} | {:.3} | {:.1}% | {:.3} | {:.3} | {:.1}% |",
            m.0, m.1, m.2, d.0, d.1, d.2
        );
    }
    Ok(())
}

/// Bogus handshake initiations: the right size and header, random content.
/// Sent in batches of up to 32 per `sendmmsg` so the flooder itself costs
/// little CPU: on this 2-core machine it shares the cores with the peers it
/// attacks, and a remote attacker's CPU would not be ours.
fn flood(addr: SocketAddr, rate: u64, secs: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    let s = UdpSocket::bind(if addr.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    })?;
    s.connect(addr)?;
    const BATCH: usize = 32;
    let mut frames = vec![[0u8; transport::wire::INIT_FRAME_LEN]; BATCH];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let start = Instant::now();
    let limit = rate.saturating_mul(secs).min(100_000_000);
    let mut sent = 0u64;
    while sent < limit && start.elapsed() < Duration::from_secs(secs) {
        // Pace: never ahead of rate * elapsed.
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        if sent >= due {
            std::thread::sleep(Duration::from_micros(500));
            continue;
        }
        let n = ((due - sent) as usize).min(BATCH);
        for f in frames.iter_mut().take(n) {
            for b in f.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            transport::wire::write_init_header(f, x as u32);
        }
        let mut iov: Vec<libc::iovec> = frames[..n]
            .iter_mut()
            .map(|f| libc::iovec {
                iov_base: f.as_mut_ptr().cast(),
                iov_len: f.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iov
            .iter_mut()
            .map(|v| {
                // SAFETY: an all-zero mmsghdr is valid (no name, no control).
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = v;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        // SAFETY: msgs points at n initialised headers whose iovecs point at
        // live frames; the socket is connected, so no address is needed.
        let r = unsafe { libc::sendmmsg(s.as_raw_fd(), msgs.as_mut_ptr(), n as u32, 0) };
        // A full socket buffer (r < n) still counts only what left.
        sent += r.max(0) as u64;
        if r <= 0 {
            std::thread::sleep(Duration::from_micros(500));
        }
    }
    // SAFETY: getrusage writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let cpu = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    println!("{sent} {:.2}", cpu(ru.ru_utime) + cpu(ru.ru_stime));
    Ok(())
}

fn dos(secs: u32, rates: &[u64]) -> Result<()> {
    let mut lab = Lab::new("fmd", 41, 3)?;
    lab.start_hub(1.0)?;
    lab.start_peer(1, &[])?;
    lab.start_peer(2, &[])?;
    lab.wait(Duration::from_secs(20), |l| {
        l.status(1).is_ok_and(|v| {
            v["status"]["peers"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["name"] == "peer2" && p["state"] == "up"))
        })
    })
    .map_err(|e| anyhow::anyhow!("{e}\n{}", lab.logs()))?;
    let me = std::env::current_exe()?.to_string_lossy().into_owned();
    let dst = lab.nodes[2].overlay.to_string();
    let target = format!("{}:{}", lab.nodes[2].underlay, fastmesh_tests::lab::PORT);
    println!(
        "peer1 -> peer2 iperf3 (cubic, {secs} s); flood from node 3 at peer2's UDP port {target}"
    );
    println!();
    println!("| flood (bogus initiations/s) | Mbit/s | vs no flood | initiations sent | dropped by rate limit | reached the handshake | peer2 CPU (cores) | flooder CPU (cores) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    let counters = |l: &Lab| {
        l.status(2).ok().map(|v| {
            let c = &v["status"]["counters"];
            (
                c["drop_init_rate_limited"].as_u64().unwrap_or(0),
                c["drop_handshake_failed"].as_u64().unwrap_or(0),
            )
        })
    };
    let mut base = 0.0;
    for &rate in rates {
        let (l0, h0) = counters(&lab).unwrap_or((0, 0));
        let victim = lab.pid(2).unwrap_or(0);
        let (v0, t0) = (proc_cpu_secs(victim), Instant::now());
        let fl = if rate > 0 {
            Some(lab.spawn(
                3,
                "flood.log",
                &me,
                &["flood", &target, &rate.to_string(), &(secs + 2).to_string()],
            )?)
        } else {
            None
        };
        let r = iperf(&lab, &dst, secs, "cubic")?;
        if let Some(mut f) = fl {
            let _ = f.wait();
        }
        let victim_cores = (proc_cpu_secs(victim) - v0) / t0.elapsed().as_secs_f64();
        let log = lab.log("flood.log");
        let mut it = log.split_whitespace();
        let sent: u64 = it.next().and_then(|x| x.parse().ok()).unwrap_or(0);
        // The flooder's own CPU includes the kernel forwarding its packets
        // through veth and the router namespace, which runs in its context.
        let flooder_cpu: f64 = it.next().and_then(|x| x.parse().ok()).unwrap_or(0.0);
        let (l1, h1) = counters(&lab).unwrap_or((0, 0));
        if rate == 0 {
            base = r.bps;
        }
        let ratio = if base > 0.0 {
            format!("{:.2}", r.bps / base)
        } else {
            "-".into()
        };
        println!(
            "| {rate} | {:.0} | {ratio} | {} | {} | {} | {victim_cores:.2} | {:.2} |",
            r.bps / 1e6,
            if rate == 0 { 0 } else { sent },
            l1 - l0,
            h1 - h0,
            flooder_cpu / f64::from(secs + 2),
        );
    }
    // The attacked peer's own cost per bogus initiation: the largest flood
    // with no traffic, against the same peer idle.
    if let Some(&rate) = rates.iter().max().filter(|&&r| r > 0) {
        let victim = lab.pid(2).unwrap_or(0);
        let c0 = proc_cpu_secs(victim);
        std::thread::sleep(Duration::from_secs(u64::from(secs)));
        let quiet = proc_cpu_secs(victim) - c0;
        let (l0, _) = counters(&lab).unwrap_or((0, 0));
        let c0 = proc_cpu_secs(victim);
        let mut f = lab.spawn(
            3,
            "flood.log",
            &me,
            &["flood", &target, &rate.to_string(), &secs.to_string()],
        )?;
        let _ = f.wait();
        let flooded = proc_cpu_secs(victim) - c0;
        let (l1, _) = counters(&lab).unwrap_or((0, 0));
        let dropped = (l1 - l0).max(1);
        println!();
        println!(
            "no traffic, {rate}/s for {secs} s: peer2 used {flooded:.2} CPU s ({quiet:.2} s idle over the same time); {dropped} dropped by the rate limit; {:.2} us of peer2 CPU per bogus initiation",
            (flooded - quiet).max(0.0) * 1e6 / dropped as f64
        );
    }
    Ok(())
}

/// The cost of the data path's encryption: ChaCha20-Poly1305 (ring, as in
/// `transport::crypto`) sealing and opening 1 GB in full-size frames (1,395
/// bytes of inner packet + 1 type byte, 16-byte header as associated data).
fn crypto_cost() -> Result<()> {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
    let key = LessSafeKey::new(
        UnboundKey::new(&CHACHA20_POLY1305, &[7u8; 32]).map_err(|_| anyhow::anyhow!("key"))?,
    );
    let hdr = [3u8; 16];
    let mut buf = vec![0x5au8; 1396];
    let frames = 1_000_000_000u64 / 1396;
    let nonce = |c: u64| {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&c.to_le_bytes());
        Nonce::assume_unique_for_key(n)
    };
    let t = Instant::now();
    let mut tags = Vec::with_capacity(16);
    for c in 0..frames {
        let tag = key
            .seal_in_place_separate_tag(nonce(c), Aad::from(&hdr), &mut buf)
            .map_err(|_| anyhow::anyhow!("seal"))?;
        tags.clear();
        tags.extend_from_slice(tag.as_ref());
        let tag = ring::aead::Tag::try_from(&tags[..]).map_err(|_| anyhow::anyhow!("tag"))?;
        key.open_in_place_separate_tag(nonce(c), Aad::from(&hdr), tag, &mut buf, 0..)
            .map_err(|_| anyhow::anyhow!("open"))?;
    }
    let el = t.elapsed().as_secs_f64();
    println!(
        "seal + open of 1 GB in {frames} frames of 1396 bytes: {el:.2} CPU s/GB (one core); that is the encryption cost of one GB crossing the mesh (sender seals, receiver opens)"
    );
    Ok(())
}
