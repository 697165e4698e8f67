//! End to end with the real binaries in network namespaces (needs root,
//! iproute2, nftables, ping): a router namespace, a hub and three peers.
//! Each test builds its own lab and the lab removes everything when dropped,
//! also when the test fails. Tests run one at a time (they share the CPU).

use fastmesh_tests::lab::{fastmesh_bin, mbps, Lab, Nat};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

fn lab_up(prefix: &str, net: u8) -> Lab {
    let mut lab = Lab::new(prefix, net, 3).expect("namespace lab (needs root, iproute2, nftables)");
    lab.start_hub(1.0).unwrap();
    for k in 1..=3 {
        lab.start_peer(k, &[]).unwrap();
    }
    if let Err(e) = lab.wait(Duration::from_secs(30), |l| {
        (1..=3).all(|k| l.peer_ready(k))
    }) {
        panic!("mesh did not come up: {e}\n{}", lab.logs());
    }
    lab
}

fn lab_bin() -> String {
    let p = fastmesh_bin().unwrap().with_file_name("fastmesh-lab");
    assert!(
        p.is_file(),
        "{} missing: cargo build --workspace",
        p.display()
    );
    p.to_string_lossy().into_owned()
}

/// TCP transfer of `bytes` from peer `from` to peer `to`; returns (time, sender line, receiver line).
fn transfer(
    lab: &Lab,
    from: usize,
    to: usize,
    bytes: u64,
    port: u16,
) -> (Duration, String, String) {
    let me = lab_bin();
    let log = format!("recv{port}.log");
    let mut rx = lab
        .spawn(to, &log, &me, &["tcp-recv", &port.to_string()])
        .unwrap();
    lab.wait_listening(to, port, false)
        .expect("receiver listening");
    let dst = format!("{}:{port}", lab.nodes[to].overlay);
    let t = Instant::now();
    let tx = lab
        .exec(from, &me, &["tcp-send", &dst, &bytes.to_string()])
        .unwrap();
    let el = t.elapsed();
    let _ = rx.wait();
    (
        el,
        String::from_utf8_lossy(&tx.stdout).trim().to_string(),
        lab.log(&log).trim().to_string(),
    )
}

fn assert_transfer(what: &str, bytes: u64, r: &(Duration, String, String), lab: &Lab) {
    let (el, sent, got) = r;
    let s: Vec<&str> = sent.split_whitespace().collect();
    let g: Vec<&str> = got.split_whitespace().collect();
    assert!(
        s.len() >= 2 && g.len() >= 2,
        "{what}: transfer failed: sent {sent:?} got {got:?}\n{}",
        lab.logs()
    );
    assert_eq!(s[0], bytes.to_string(), "{what}: bytes sent");
    assert_eq!(g[0], bytes.to_string(), "{what}: bytes received");
    assert_eq!(s[1], g[1], "{what}: checksum");
    println!(
        "{what}: {bytes} bytes in {:.2} s = {:.0} Mbit/s, checksums match",
        el.as_secs_f64(),
        mbps(bytes, *el)
    );
}

/// The "N received" count of a ping summary.
fn received(out: &str) -> Option<u32> {
    let i = out.find(" received")?;
    out[..i]
        .rsplit(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[test]
fn received_reads_the_ping_summary() {
    let s = "20 packets transmitted, 17 received, 15% packet loss, time 3810ms";
    assert_eq!(received(s), Some(17));
    assert_eq!(
        received("3 packets transmitted, 0 received, 100% packet loss"),
        Some(0)
    );
    assert_eq!(received("ping: unknown host"), None);
}

fn ping(lab: &Lab, from: usize, dst: &str, count: u32) -> (bool, String) {
    let c = count.to_string();
    let o = lab
        .exec(from, "ping", &["-c", &c, "-i", "0.2", "-W", "2", dst])
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

#[test]
fn ping_tcp_and_udp_across_the_mesh() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab_up("fmt1", 11);
    for (a, b) in [(1, 2), (2, 3), (3, 1)] {
        let (ok, out) = ping(&lab, a, &lab.nodes[b].overlay.to_string(), 3);
        assert!(ok, "ping {a}->{b}: {out}");
        let (ok, out) = ping(&lab, a, &lab.nodes[b].overlay6, 3);
        assert!(ok, "ping6 {a}->{b}: {out}");
    }
    // The kernel answers an echo request while the data plane writes it to
    // TUN; the data plane reads the reply at once, not through the reader.
    for k in 1..=3 {
        let st = lab.status(k).unwrap();
        let inline = st["status"]["counters"]["tun_inline_batches"].as_u64();
        assert!(
            inline.is_some_and(|n| n > 0),
            "peer {k}: echo replies read inline: {inline:?}"
        );
    }
    let r = transfer(&lab, 1, 2, 50_000_000, 5001);
    assert_transfer("TCP 50 MB clean", 50_000_000, &r, &lab);
    // UDP: 1000 datagrams echoed by peer 3.
    let me = lab_bin();
    let mut echo = lab
        .spawn(3, "echo.log", &me, &["udp-echo", "6001", "20"])
        .unwrap();
    lab.wait_listening(3, 6001, true)
        .expect("echo server bound");
    let o = lab
        .exec(
            2,
            &me,
            &[
                "udp-ping",
                &format!("{}:6001", lab.nodes[3].overlay),
                "1000",
            ],
        )
        .unwrap();
    let line = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let v: Vec<u32> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    assert_eq!(v.len(), 2, "udp-ping said {line:?}");
    println!("UDP: {} sent, {} echoed", v[0], v[1]);
    let _ = echo.kill();
    let _ = echo.wait();
    assert!(
        v[1] >= 990,
        "UDP echoed {} of 1000 on a clean underlay",
        v[1]
    );
    // Status shows every peer with traffic.
    let st = lab.status(1).unwrap();
    let peers = st["status"]["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 2);
    let p2 = peers.iter().find(|p| p["name"] == "peer2").unwrap();
    assert!(p2["tx_bytes"].as_u64().unwrap() > 50_000_000, "{p2}");
    assert!(p2["rtt_ms"].as_f64().is_some());
    println!("{}", lab.status_table(1));
}

#[test]
fn transfer_survives_five_percent_underlay_loss() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = lab_up("fmt2", 12);
    lab.set_loss(5).unwrap();
    // ICMP is not retransmitted: about 10% of echoes are lost with 5% each
    // way, so ping may report failure; at least half must come back.
    let (_ok, out) = ping(&lab, 1, &lab.nodes[3].overlay.to_string(), 20);
    println!("{out}");
    let got = received(&out).unwrap_or_else(|| panic!("ping ran: {out}"));
    assert!(got >= 10, "{got} of 20 echoes with 5% loss each way: {out}");
    let r = transfer(&lab, 1, 3, 50_000_000, 5002);
    assert_transfer("TCP 50 MB with 5% loss each way", 50_000_000, &r, &lab);
    let drops = lab
        .ns(&lab.router, "nft", &["list", "table", "inet", "fmloss"])
        .unwrap();
    let text = String::from_utf8_lossy(&drops.stdout);
    let dropped = text
        .lines()
        .filter_map(|l| l.split("counter packets ").nth(1))
        .filter_map(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        .sum::<u64>();
    println!("router: the loss rules dropped {dropped} packets");
    // 5% of a 50 MB transfer's ~36,000 frames, each way.
    assert!(
        dropped > 1_000,
        "the loss rules dropped {dropped} packets:\n{text}"
    );
    lab.set_loss(0).unwrap();
}

/// Through the lab's WAN (50 ms RTT, 100 Mbit/s, 10% loss each way, in place
/// before the mesh starts): a checksummed transfer over a split connection
/// completes and its bytes went as a stream; with `--no-split-tcp` on both
/// peers the same transfer completes as packets.
#[test]
fn split_tcp_over_a_long_lossy_link_and_the_off_switch() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = Lab::new("fmt6", 16, 2).expect("namespace lab (needs root, iproute2, nftables)");
    let wan = fastmesh_tests::wan::WanSpec {
        rtt_ms: 50,
        rate_mbit: 100.0,
        queue_ms: 50,
        loss_pct: 10.0,
        jitter_ms: 0,
    };
    lab.set_wan(std::path::Path::new(&lab_bin()), Some(wan), 3)
        .expect("WAN router");
    lab.start_hub(1.0).unwrap();
    let mut rates = Vec::new();
    for (round, split) in [true, false].into_iter().enumerate() {
        for k in 1..=2 {
            if round > 0 {
                lab.kill9(k);
            }
            let extra: &[&str] = if split { &[] } else { &["--no-split-tcp"] };
            lab.start_peer(k, extra).unwrap();
        }
        if let Err(e) = lab.wait(Duration::from_secs(30), |l| {
            (1..=2).all(|k| l.peer_ready(k))
        }) {
            panic!("mesh did not come up over the WAN: {e}\n{}", lab.logs());
        }
        // Two transfers per mode (the better rate is printed).
        let bytes = 40_000_000;
        let mut best: f64 = 0.0;
        for i in 0..2u16 {
            let r = transfer(&lab, 1, 2, bytes, 5006 + 2 * round as u16 + i);
            assert_transfer(
                &format!("TCP 40 MB over 50 ms RTT and 10% loss, split {split}"),
                bytes,
                &r,
                &lab,
            );
            best = best.max(bytes as f64 * 8.0 / r.0.as_secs_f64() / 1e6);
        }
        let st = lab.status(1).unwrap();
        let peer2 = st["status"]["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "peer2")
            .cloned()
            .unwrap_or_else(|| panic!("peer2 in {st}"));
        let streamed = peer2["stream_tx_bytes"].as_u64().unwrap();
        if split {
            assert!(
                streamed >= 2 * bytes,
                "the transfers went as streams: {peer2}"
            );
        } else {
            assert_eq!(streamed, 0, "splitting off: {peer2}");
        }
        let mbit = best;
        println!("split {split}: best {mbit:.1} Mbit/s, {peer2}");
        rates.push(mbit);
    }
    // Not asserted: split faster than packets. In this dev-build lab about
    // one transfer in four (either mode) starts slowly and stays slow, so
    // the comparison decided nothing reliably; the release-build WAN bench
    // (docs/benchmarks.md) is where the two are compared. Both rates are
    // printed.
    println!(
        "best split {:.1} Mbit/s, best packets {:.1} Mbit/s",
        rates[0], rates[1]
    );
}

#[test]
fn hub_kill9_while_traffic_flows_then_restart() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = lab_up("fmt3", 13);
    let me = lab_bin();
    // A long transfer 1 -> 2 in the background.
    let mut rx = lab
        .spawn(2, "recv.log", &me, &["tcp-recv", "5003"])
        .unwrap();
    lab.wait_listening(2, 5003, false)
        .expect("receiver listening");
    let dst = format!("{}:5003", lab.nodes[2].overlay);
    let tx = lab
        .spawn(1, "send.log", &me, &["tcp-send", &dst, "150000000"])
        .unwrap();
    // Kill the hub once the transfer is under way (1 MB through the mesh).
    let to_peer2 = |l: &Lab| {
        l.status(1).ok().and_then(|v| {
            v["status"]["peers"]
                .as_array()?
                .iter()
                .find(|p| p["name"] == "peer2")?["tx_bytes"]
                .as_u64()
        })
    };
    let start = to_peer2(&lab).unwrap_or(0);
    lab.wait(Duration::from_secs(10), |l| {
        to_peer2(l).is_some_and(|b| b > start + 1_000_000)
    })
    .expect("transfer started");
    lab.kill9(0);
    assert!(!lab.running(0));
    // With the hub gone, peers keep talking.
    let (ok, out) = ping(&lab, 3, &lab.nodes[1].overlay.to_string(), 5);
    assert!(ok, "ping with the hub down: {out}");
    // Once every peer has noticed the hub is gone, they still talk.
    lab.wait(Duration::from_secs(10), |l| {
        (1..=3).all(|k| {
            l.status(k)
                .is_ok_and(|v| v["status"]["hubs"][0]["state"] != "registered")
        })
    })
    .unwrap_or_else(|e| panic!("peers did not notice the hub is gone: {e}"));
    let (ok, out) = ping(&lab, 2, &lab.nodes[3].overlay6, 3);
    assert!(ok, "ping6 with the hub gone: {out}");
    let out = tx.wait_with_output().unwrap();
    let _ = rx.wait();
    let sent = lab.log("send.log").trim().to_string();
    let got = lab.log("recv.log").trim().to_string();
    let _ = out;
    let secs: f64 = got
        .split_whitespace()
        .nth(2)
        .and_then(|x| x.parse().ok())
        .unwrap_or(0.0);
    assert_transfer(
        "TCP 150 MB across a hub kill -9",
        150_000_000,
        &(Duration::from_secs_f64(secs), sent, got),
        &lab,
    );
    // Peers notice the hub is gone.
    let st = lab.status(1).unwrap();
    assert_ne!(st["status"]["hubs"][0]["state"], "registered", "{st}");
    // Restart: the hub reloads ownership from disk and every peer registers again.
    lab.start_hub(1.0).unwrap();
    let took = lab
        .wait(Duration::from_secs(20), |l| {
            l.hub_members() == Some(3) && (1..=3).all(|k| l.peer_ready(k))
        })
        .unwrap_or_else(|e| panic!("not all peers back: {e}\n{}", lab.logs()));
    println!(
        "all peers registered again {:.1} s after the hub restarted",
        took.as_secs_f64()
    );
    println!("{}", lab.status_table(0));
    let st = lab.status(0).unwrap();
    assert_eq!(st["status"]["owned_addresses"], 6);
}

#[test]
fn bad_input_and_shutdown_behave() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = lab_up("fmt4", 14);
    let bin = fastmesh_bin().unwrap().to_string_lossy().into_owned();
    let run = |lab: &Lab, k: usize, args: Vec<String>| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = lab.exec(k, &bin, &a).unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    // A second instance in node 3 with its own TUN, port and control socket.
    let other = |lab: &Lab, extra: &[&str]| {
        let ctl = lab.path("other.sock");
        let mut all = vec![
            "--tun",
            "fm9",
            "--listen",
            "0.0.0.0:4809",
            "--control",
            &ctl,
        ];
        all.extend_from_slice(extra);
        lab.peer_args(3, &all)
    };
    // World-readable key.
    let loose = lab.path("loose.key");
    std::fs::copy(lab.path("n3.key"), &loose).unwrap();
    std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let (code, err) = run(&lab, 3, other(&lab, &["--key", &loose]));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("readable by others") && err.contains("chmod 600"),
        "{err}"
    );
    // Bad address.
    let (code, err) = run(&lab, 3, other(&lab, &["--address", "10.1.2.300/24"]));
    assert_eq!(code, Some(1));
    assert!(err.contains("bad address"), "{err}");
    // Bad hub spec.
    let (code, err) = run(&lab, 3, other(&lab, &["--hub", "nokey@1.2.3.4:1"]));
    assert_eq!(code, Some(1));
    assert!(err.contains("bad hub"), "{err}");
    // IP conflict: a new key claims peer 1's address.
    lab.fastmesh(&["keygen", "--out", &lab.path("thief.key")])
        .unwrap();
    let addr1 = format!("{}/24", lab.nodes[1].overlay);
    let (code, err) = run(
        &lab,
        3,
        other(
            &lab,
            &["--key", &lab.path("thief.key"), "--address", &addr1],
        ),
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("owned by another node"), "{err}");
    // No /dev/net/tun (hidden in a private mount namespace).
    let args = other(&lab, &[]).join(" ");
    let o = lab
        .exec(
            3,
            "unshare",
            &[
                "-m",
                "sh",
                "-c",
                &format!("mount -t tmpfs none /dev/net && exec {bin} {args}"),
            ],
        )
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("/dev/net/tun does not exist"), "{err}");
    // Not root: an unprivileged user with its own readable keys.
    for f in ["n3.key", "network.key"] {
        let dst = lab.path(&format!("nobody-{f}"));
        std::fs::copy(lab.path(f), &dst).unwrap();
        std::os::unix::fs::chown(&dst, Some(65534), Some(65534)).unwrap();
    }
    let mut a = other(
        &lab,
        &[
            "--key",
            &lab.path("nobody-n3.key"),
            "--network-key",
            &lab.path("nobody-network.key"),
            "--control",
            "/tmp/fastmesh-nobody.sock",
        ],
    );
    a.insert(0, bin.clone());
    let mut cmd = vec![
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
    ];
    let a_ref: Vec<&str> = a.iter().map(String::as_str).collect();
    cmd.extend(a_ref);
    let o = lab.exec(3, "setpriv", &cmd).unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("CAP_NET_ADMIN"), "{err}");
    // Unreachable hub: retried and reported, no exit.
    let mut a = other(
        &lab,
        &[
            "--hub",
            &format!("{}@10.214.0.2:4999", lab.hub_key()),
            "--heartbeat",
            "0.5",
        ],
    );
    a.insert(0, bin.clone());
    let a_ref: Vec<&str> = a.iter().map(String::as_str).collect();
    let mut c = lab.spawn(3, "unreach.log", a_ref[0], &a_ref[1..]).unwrap();
    lab.wait(Duration::from_secs(10), |l| {
        l.log("unreach.log").contains("hub not answering")
    })
    .unwrap_or_else(|e| panic!("no retry report: {e}: {}", lab.log("unreach.log")));
    assert!(
        matches!(c.try_wait(), Ok(None)),
        "keeps running: {}",
        lab.log("unreach.log")
    );
    let _ = c.kill();
    let _ = c.wait();

    // SIGTERM: clean exit, the hub is told at once, the TUN device is gone.
    let status = lab.stop(1).expect("peer 1 was running");
    assert!(
        status.success(),
        "exit {status:?}: {}",
        lab.log("peer1.log")
    );
    lab.wait(Duration::from_secs(2), |l| l.hub_members() == Some(2))
        .unwrap_or_else(|e| panic!("hub still lists peer1: {e}"));
    let o = lab.exec(1, "ip", &["link", "show", "fm0"]).unwrap();
    assert!(!o.status.success(), "fm0 still exists");
    // Revocation from the command line: peer 2 is dropped by the hub and by
    // peer 3, and its process stops with exit code 2 when the hub refuses it.
    let pub2 = lab.fastmesh(&["pubkey", &lab.path("n2.key")]).unwrap();
    let pub2 = String::from_utf8_lossy(&pub2.stdout).trim().to_string();
    let out = lab
        .fastmesh(&[
            "revoke",
            &pub2,
            "--control",
            &lab.nodes[0].control.to_string_lossy(),
        ])
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "revoked");
    lab.wait(Duration::from_secs(5), |l| {
        l.hub_members() == Some(1)
            && l.status(3).is_ok_and(|v| {
                v["status"]["peers"]
                    .as_array()
                    .is_some_and(|p| p.is_empty())
            })
    })
    .unwrap_or_else(|e| panic!("revoked peer still listed: {e}\n{}", lab.logs()));
    let gone = lab.wait(Duration::from_secs(10), |l| !l.running_pid(2));
    assert!(
        gone.is_ok(),
        "revoked peer still running: {}",
        lab.log("peer2.log")
    );
    assert!(
        lab.log("peer2.log").contains("revoked"),
        "{}",
        lab.log("peer2.log")
    );
}

// ------------------------------------------------------------------ NAT

/// Start a TCP transfer of `bytes` from `from` to `to` in the background;
/// returns its processes and start time (logs recvPORT.log, sendPORT.log).
fn start_transfer(lab: &Lab, from: usize, to: usize, bytes: u64, port: u16) -> Transfer {
    let me = lab_bin();
    let rx = lab
        .spawn(
            to,
            &format!("recv{port}.log"),
            &me,
            &["tcp-recv", &port.to_string()],
        )
        .unwrap();
    lab.wait_listening(to, port, false).unwrap();
    let dst = format!("{}:{port}", lab.nodes[to].overlay);
    let tx = lab
        .spawn(
            from,
            &format!("send{port}.log"),
            &me,
            &["tcp-send", &dst, &bytes.to_string()],
        )
        .unwrap();
    Transfer {
        rx,
        tx,
        started: Instant::now(),
    }
}

/// Wait for a transfer from [`start_transfer`] and check it.
/// A transfer under way: its two processes and when the sender started.
struct Transfer {
    rx: std::process::Child,
    tx: std::process::Child,
    started: Instant,
}

/// Wait for a transfer and check it; its rate is over the whole transfer,
/// from the sender's start (faults included), not from some later moment.
fn finish_transfer(lab: &Lab, what: &str, bytes: u64, port: u16, mut t: Transfer) {
    let _ = t.tx.wait();
    let _ = t.rx.wait();
    let sent = lab.log(&format!("send{port}.log")).trim().to_string();
    let got = lab.log(&format!("recv{port}.log")).trim().to_string();
    assert_transfer(what, bytes, &(t.started.elapsed(), sent, got), lab);
}

/// A lab whose peers sit behind NATs of kind `nat`: node 0 is a hub, nodes
/// `1..hubs` more hubs (public), then two peers, each behind its own NAT.
/// Returns the lab and the indices of the two peers.
/// `fastmesh netcheck --json` of peer `k`.
fn netcheck(lab: &Lab, k: usize) -> serde_json::Value {
    let bin = fastmesh_bin().unwrap().to_string_lossy().into_owned();
    let ctl = lab.nodes[k].control.to_string_lossy().into_owned();
    let o = lab
        .exec(k, &bin, &["netcheck", "--json", "--control", &ctl])
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn nat_lab(prefix: &str, net: u8, nat: Nat, hubs: usize) -> (Lab, [usize; 2]) {
    nat_lab_with(prefix, net, [nat, nat], hubs)
}

/// [`nat_lab`] with each peer behind its own kind of NAT.
fn nat_lab_with(prefix: &str, net: u8, nats: [Nat; 2], hubs: usize) -> (Lab, [usize; 2]) {
    let n = hubs + 1;
    let mut kinds = vec![None; hubs];
    kinds.extend(nats.map(Some));
    let mut lab = Lab::with_nat(prefix, net, n, &kinds).expect("namespace lab with NAT");
    for h in 0..hubs {
        lab.start_hub_at(h, 1.0).unwrap();
    }
    let specs: Vec<String> = (0..hubs).map(|h| lab.hub_spec(h).unwrap()).collect();
    let peers = [hubs, hubs + 1];
    for k in peers {
        let mut args = lab.peer_args(k, &["--hub", &specs[0]]);
        for s in &specs[1..] {
            args.push("--hub".into());
            args.push(s.clone());
        }
        lab.start_peer_args(k, &args).unwrap();
    }
    let up = |l: &Lab| peers.iter().all(|&k| l.peer_ready_with(k, 1));
    if let Err(e) = lab.wait(Duration::from_secs(40), up) {
        panic!("mesh behind NAT did not come up: {e}\n{}", lab.logs());
    }
    (lab, peers)
}

/// The path peer `k` uses to its one peer, and why.
fn nat_path(lab: &Lab, k: usize) -> (String, String) {
    lab.status(k)
        .ok()
        .and_then(|v| {
            let p = &v["status"]["peers"][0];
            Some((
                p["path"].as_str()?.to_string(),
                p["path_reason"].as_str().unwrap_or("").to_string(),
            ))
        })
        .unwrap_or_default()
}

/// The hub's relay counter (frames).
fn relayed(lab: &Lab, hub: usize) -> u64 {
    lab.status(hub)
        .ok()
        .and_then(|v| v["status"]["relayed"].as_u64())
        .unwrap_or(0)
}

fn wait_path(lab: &Lab, peers: [usize; 2], want: &str, secs: u64) -> Duration {
    lab.wait(Duration::from_secs(secs), |l| {
        peers.iter().all(|&k| nat_path(l, k).0 == want)
    })
    .unwrap_or_else(|e| {
        panic!(
            "peers not on {want}: {e}\n{}\n{}\n{}",
            lab.status_table(peers[0]),
            lab.status_table(peers[1]),
            lab.logs()
        )
    })
}

#[test]
fn cone_nats_form_a_direct_path_and_the_hub_relays_nothing() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (lab, [a, b]) = nat_lab("fmn1", 21, Nat::Cone, 1);
    let t = wait_path(&lab, [a, b], "direct", 30);
    println!("direct through two cone NATs {t:?} after the mesh was up");
    // One hub: netcheck says it cannot tell the NAT's mapping, and shows
    // the NAT's public side as the hub's view.
    let nc = netcheck(&lab, a);
    assert!(
        nc["nat"]["same_mapping_for_all_destinations"].is_null(),
        "{nc}"
    );
    assert_eq!(nc["hubs"][0]["udp_works"], true, "{nc}");
    let seen = nc["hubs"][0]["observed"].as_str().unwrap_or("");
    assert!(
        !seen.is_empty() && !seen.starts_with("172.16."),
        "the NAT's public side: {nc}"
    );
    // The hub lists each peer's observed (public) endpoint first, then its
    // local addresses as further candidates.
    let hub = lab.status(0).unwrap();
    for k in [a, b] {
        let m = hub["status"]["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == format!("peer{k}"))
            .cloned()
            .unwrap();
        let eps: Vec<String> = m["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap_or("").to_string())
            .collect();
        assert_eq!(eps[0], format!("10.221.{k}.2:4800"), "{eps:?}");
        assert!(eps.contains(&format!("172.16.{k}.2:4800")), "{eps:?}");
    }
    println!("{}", lab.status_table(a));
    let before = relayed(&lab, 0);
    let (ok, out) = ping(&lab, a, &lab.nodes[b].overlay.to_string(), 5);
    assert!(ok, "ping through the NATs: {out}");
    let bytes = 20_000_000;
    let r = transfer(&lab, a, b, bytes, 5301);
    assert_transfer("through cone NATs", bytes, &r, &lab);
    let during = relayed(&lab, 0) - before;
    // ~14,000 data frames went by; only relay probes (one per 16 s and
    // direction while direct is healthy) may cross the hub.
    assert!(during < 20, "the hub relayed {during} frames");
    assert_eq!(nat_path(&lab, a).0, "direct");
    assert_eq!(nat_path(&lab, b).0, "direct");
}

#[test]
fn random_port_nats_fall_back_to_the_relay_and_traffic_flows() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (lab, [a, b]) = nat_lab("fmn2", 22, Nat::Random, 1);
    let t = wait_path(&lab, [a, b], "relay", 40);
    println!("relayed through the hub {t:?} after the mesh was up");
    println!("{}", lab.status_table(a));
    let (_, why) = nat_path(&lab, a);
    assert!(why.contains("no direct candidate answered"), "{why}");
    let before = relayed(&lab, 0);
    let (ok, out) = ping(&lab, a, &lab.nodes[b].overlay.to_string(), 5);
    assert!(ok, "ping through the relay: {out}");
    let bytes = 10_000_000;
    let r = transfer(&lab, a, b, bytes, 5302);
    assert_transfer("through the hub relay (random-port NATs)", bytes, &r, &lab);
    let during = relayed(&lab, 0) - before;
    assert!(during > 5_000, "the hub relayed only {during} frames");
    assert_eq!(nat_path(&lab, a).0, "relay");
    // Staying on the relay costs little: while traffic flows (20 s of
    // pings, so the sessions keep measuring), each peer sends few
    // datagrams anywhere but to the hub: backed-off probes and punches.
    for k in [a, b] {
        lab.count_udp_out(k, &[lab.nodes[0].underlay]).unwrap();
    }
    let (_, out) = ping(&lab, a, &lab.nodes[b].overlay.to_string(), 100);
    assert!(received(&out).is_some_and(|n| n >= 95), "{out}");
    for k in [a, b] {
        let n = lab.udp_out_count(k).unwrap();
        println!("peer{k}: {n} datagrams off the relay in 20 s");
        assert!(
            n <= 40,
            "peer{k} sent {n} datagrams to direct candidates in 20 s"
        );
    }
    assert_eq!(nat_path(&lab, a).0, "relay");
}

#[test]
fn a_random_port_nat_and_a_cone_nat_go_direct_by_many_port_punching() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Plain punching cannot meet: the random side's NAT gives a new port
    // towards the cone side, which the cone side's filter does not expect.
    let (lab, [a, b]) = nat_lab_with("fmbd", 37, [Nat::Random, Nat::Cone], 1);
    let t = wait_path(&lab, [a, b], "direct", 90);
    println!("direct {t:?} after the mesh was up");
    println!("{}", lab.status_table(a));
    println!("{}", lab.status_table(b));
    let pa = lab.status(a).unwrap()["status"]["punch"].clone();
    let pb = lab.status(b).unwrap()["status"]["punch"].clone();
    assert!(pa["opened"].as_u64() >= Some(1) && pa["met"] == 1, "{pa}");
    assert!(pb["sprayed"].as_u64() >= Some(1), "{pb}");
    let before = relayed(&lab, 0);
    let bytes = 20_000_000;
    let r = transfer(&lab, a, b, bytes, 5305);
    assert_transfer("random-port NAT to cone NAT, direct", bytes, &r, &lab);
    let during = relayed(&lab, 0) - before;
    assert!(during < 20, "the hub relayed {during} frames");
    assert_eq!(nat_path(&lab, a).0, "direct");
    assert_eq!(nat_path(&lab, b).0, "direct");
}

#[test]
fn a_router_port_mapping_gives_random_port_nats_a_direct_path() {
    // Both NATs pick a new port per destination (the test above: relay),
    // but the first runs a UPnP IGD daemon (miniupnpd) and maps a public
    // port for its peer.
    port_mapping_gives_a_direct_path("fmup", 34, Nat::RandomUpnp, "UPnP IGD");
}

#[test]
fn a_router_with_only_pcp_or_nat_pmp_maps_a_port_too() {
    // The same daemon with UPnP IGD off: the peer finds no IGD and asks the
    // default gateway by PCP (NAT-PMP if PCP is refused).
    port_mapping_gives_a_direct_path("fmpp", 36, Nat::RandomPmp, "PCP");
}

fn port_mapping_gives_a_direct_path(prefix: &str, net: u8, nat: Nat, protocol: &str) {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (lab, [a, b]) = nat_lab_with(prefix, net, [nat, Nat::Random], 1);
    let mapped = format!("11.{}.{a}.2:4800", 200 + net as u32);
    // The mapping is asked for in the background, then registered again.
    let offered = |l: &Lab| {
        l.status(0)
            .ok()
            .and_then(|h| {
                h["status"]["members"]
                    .as_array()?
                    .iter()
                    .find(|m| m["name"] == format!("peer{a}"))
                    .map(|m| m["endpoints"].to_string())
            })
            .unwrap_or_default()
    };
    lab.wait(Duration::from_secs(10), |l| offered(l).contains(&mapped))
        .unwrap_or_else(|e| panic!("the hub never offered {mapped}: {e}: {}", offered(&lab)));
    let t = wait_path(&lab, [a, b], "direct", 40);
    println!("direct {t:?} after the mesh was up");
    let log = lab.log(&format!("peer{a}.log"));
    assert!(
        log.contains(&format!("protocol=\"{protocol}\""))
            || log.contains(&format!("protocol={protocol}")),
        "mapped by {protocol}: {log}"
    );
    println!("{}", lab.status_table(b));
    let before = relayed(&lab, 0);
    let bytes = 20_000_000;
    let r = transfer(&lab, a, b, bytes, 5304);
    assert_transfer("through a mapped port", bytes, &r, &lab);
    let during = relayed(&lab, 0) - before;
    assert!(during < 20, "the hub relayed {during} frames");
    let st = lab.status(b).unwrap();
    assert_eq!(
        st["status"]["peers"][0]["endpoint"].as_str(),
        Some(mapped.as_str()),
        "peer{b} sends to the mapped port"
    );
    // A peer that stops removes its mapping from the router.
    let rules = |l: &Lab| {
        l.ns(
            &format!("{prefix}-x{a}"),
            "nft",
            &["list", "chain", "inet", "filter", "prerouting_miniupnpd"],
        )
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default()
    };
    assert!(rules(&lab).contains("dnat"), "{}", rules(&lab));
    let mut lab = lab;
    assert!(lab.stop(a).is_some_and(|s| s.success()));
    assert!(
        !rules(&lab).contains("dnat"),
        "mapping left: {}",
        rules(&lab)
    );
}

#[test]
fn nat_mappings_flushed_mid_transfer_the_path_recovers() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (lab, [a, b]) = nat_lab("fmn3", 23, Nat::Cone, 1);
    wait_path(&lab, [a, b], "direct", 30);
    let bytes: u64 = 150_000_000;
    let procs = start_transfer(&lab, a, b, bytes, 5303);
    let tx_bytes = |l: &Lab| {
        l.status(a)
            .ok()
            .and_then(|v| v["status"]["peers"][0]["tx_bytes"].as_u64())
            .unwrap_or(0)
    };
    let start = tx_bytes(&lab);
    lab.wait(Duration::from_secs(20), |l| {
        tx_bytes(l) > start + 10_000_000
    })
    .expect("transfer under way");
    // Both NATs forget every mapping while data flows.
    lab.flush_nat(a).unwrap();
    lab.flush_nat(b).unwrap();
    finish_transfer(&lab, "across a NAT mapping flush", bytes, 5303, procs);
    wait_path(&lab, [a, b], "direct", 30);
    let (ok, out) = ping(&lab, a, &lab.nodes[b].overlay.to_string(), 3);
    assert!(ok, "ping after the flush: {out}");
}

#[test]
fn two_hubs_one_killed_while_relaying_nothing_stops() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (mut lab, [a, b]) = nat_lab("fmn4", 24, Nat::Random, 2);
    wait_path(&lab, [a, b], "relay", 40);
    // netcheck sees the random-port NAT: the two hubs see two mappings.
    // (A hub's RTT shows from its first heartbeat answer after registering.)
    lab.wait(Duration::from_secs(10), |l| {
        netcheck(l, a)["hubs"]
            .as_array()
            .is_some_and(|h| h.iter().all(|h| h["rtt_ms"].is_number()))
    })
    .expect("both hubs measured");
    let nc = netcheck(&lab, a);
    assert_eq!(
        nc["nat"]["same_mapping_for_all_destinations"], false,
        "{nc}"
    );
    for h in nc["hubs"].as_array().unwrap() {
        assert_eq!(h["udp_works"], true, "{nc}");
        assert!(h["rtt_ms"].as_f64().is_some(), "{nc}");
    }
    // Which hub relays? Kill that one.
    let via = lab.status(a).unwrap()["status"]["peers"][0]["relay"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let which = (0..2)
        .find(|&h| lab.hub_spec(h).unwrap().starts_with(&via))
        .unwrap_or_else(|| panic!("relaying hub {via:?} not found"));
    let other = 1 - which;
    println!("relayed through hub {which}; killing it");
    let bytes: u64 = 40_000_000;
    let procs = start_transfer(&lab, a, b, bytes, 5304);
    let before = relayed(&lab, which);
    lab.wait(Duration::from_secs(20), |l| {
        relayed(l, which) > before + 2_000
    })
    .expect("transfer under way through the relay");
    lab.kill9(which);
    finish_transfer(
        &lab,
        "with the relaying hub killed mid-transfer",
        bytes,
        5304,
        procs,
    );
    assert!(relayed(&lab, other) > 1_000, "the other hub took over");
    let (ok, out) = ping(&lab, a, &lab.nodes[b].overlay.to_string(), 3);
    assert!(ok, "ping after losing a hub: {out}");
    println!("{}", lab.status_table(a));
}

#[test]
fn a_direct_path_that_drops_large_frames_is_left_for_the_relay() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let net = 25;
    let (lab, [a, b]) = nat_lab("fmn5", net, Nat::Cone, 1);
    wait_path(&lab, [a, b], "direct", 30);
    // A black hole for large datagrams between the two NATs only (an MTU
    // problem on the direct route): probes and keepalives still pass.
    let (pa, pb) = (
        format!("10.{}.{a}.2", 200 + net),
        format!("10.{}.{b}.2", 200 + net),
    );
    let rules = format!(
        "table ip fmhole {{\n chain f {{ type filter hook forward priority 0; policy accept;\n  \
         ip saddr {pa} ip daddr {pb} meta length > 400 drop\n  \
         ip saddr {pb} ip daddr {pa} meta length > 400 drop\n }}\n}}\n"
    );
    let f = lab.path("hole.nft");
    std::fs::write(&f, rules).unwrap();
    lab.ns(&lab.router, "nft", &["-f", &f]).unwrap();
    let bytes = 20_000_000;
    let r = transfer(&lab, a, b, bytes, 5305);
    assert_transfer(
        "with large frames dropped on the direct path",
        bytes,
        &r,
        &lab,
    );
    let (path, why) = nat_path(&lab, a);
    println!("{}", lab.status_table(a));
    assert_eq!(path, "relay", "{why}");
    assert!(why.contains("loses") && why.contains("data"), "{why}");
}

#[test]
fn two_peers_behind_one_nat_find_each_other_on_the_lan() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Peer 2 sits on a second segment of peer 1's NAT: their public
    // endpoints do not reach each other (no hairpin), their local ones do.
    let kinds = [None, Some(Nat::Cone), Some(Nat::SameAs(1))];
    let mut lab = Lab::with_nat("fmn6", 26, 2, &kinds).expect("namespace lab with NAT");
    lab.start_hub(1.0).unwrap();
    lab.start_peer(1, &[]).unwrap();
    lab.start_peer(2, &[]).unwrap();
    if let Err(e) = lab.wait(Duration::from_secs(40), |l| {
        l.peer_ready(1) && l.peer_ready(2)
    }) {
        panic!("mesh did not come up: {e}\n{}", lab.logs());
    }
    let t = wait_path(&lab, [1, 2], "direct", 30);
    println!("direct over the LAN {t:?} after the mesh was up");
    println!("{}", lab.status_table(1));
    let endpoint = |k: usize| {
        lab.status(k).unwrap()["status"]["peers"][0]["endpoint"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(endpoint(1), "172.16.2.2:4800");
    assert_eq!(endpoint(2), "172.16.1.2:4800");
    let before = relayed(&lab, 0);
    let bytes = 20_000_000;
    let r = transfer(&lab, 1, 2, bytes, 5306);
    assert_transfer("between two peers behind one NAT", bytes, &r, &lab);
    assert!(relayed(&lab, 0) - before < 20);
}

// ------------------------------------------------------------ path MTU

/// A hub and two peers on a flat lab whose links all have `mtu` (if given)
/// before anything starts; returns once both peers are ready.
fn hub_and_two_peers(prefix: &str, net: u8, mtu: Option<u32>) -> Lab {
    let mut lab = Lab::new(prefix, net, 2).expect("namespace lab");
    if let Some(m) = mtu {
        lab.set_mtu(m).unwrap();
    }
    if let Err(e) = lab.start_mesh(2, Duration::from_secs(30)) {
        panic!("{e}");
    }
    lab
}

/// Peer `k`'s view of its first peer: (frame size in use, search settled).
fn path_mtu(lab: &Lab, k: usize) -> (u64, bool) {
    let s = lab.status(k).unwrap();
    let p = &s["status"]["peers"][0];
    (
        p["path_mtu"].as_u64().unwrap_or(0),
        p["pmtu_settled"].as_bool().unwrap_or(false),
    )
}

#[test]
fn underlay_paths_below_1500_bytes_from_the_start() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for (mtu, net) in [(1280u32, 17u8), (1420, 18)] {
        // Every link (both peers', the hub's, the router's) at `mtu` before
        // anything starts, as on a PPPoE line or inside a cloud VPC.
        let lab = hub_and_two_peers(&format!("fmt{}", net - 10), net, Some(mtu));
        let bytes = 50_000_000;
        let r = transfer(&lab, 1, 2, bytes, 5310);
        assert_transfer(
            &format!("50 MB over a {mtu}-byte underlay"),
            bytes,
            &r,
            &lab,
        );
        // Both sides found the path's size: the UDP payload of an IPv4
        // packet of `mtu` bytes, to within the search's 16 bytes.
        let udp = u64::from(mtu) - 28;
        for k in [1, 2] {
            let (m, settled) = path_mtu(&lab, k);
            assert!(settled, "peer {k}: search settled");
            assert!(
                m <= udp && m + 16 >= udp,
                "peer {k}: frames of {m} on a {mtu} path"
            );
        }
        println!("{}", lab.status_table(1));
    }
}

#[test]
fn the_router_mtu_lowered_during_a_transfer() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = hub_and_two_peers("fmt9", 19, None);
    assert_eq!(path_mtu(&lab, 1).0, 1452, "a 1500-byte path at first");
    // Only the router's links narrow: the peers' own interfaces stay at
    // 1500, so their kernels send full-size frames that the router must
    // fragment (or, for probes, refuse).
    let bytes = 400_000_000;
    let t = start_transfer(&lab, 1, 2, bytes, 5311);
    // Narrow the path once the transfer is well under way (50 MB sent to
    // peer 2 by peer 1's own count), not after a guessed delay.
    let sent = |l: &Lab| {
        l.status(1)
            .ok()
            .and_then(|s| s["status"]["peers"][0]["tx_bytes"].as_u64())
    };
    let at_start = sent(&lab).unwrap_or(0);
    lab.wait(Duration::from_secs(30), |l| {
        sent(l).is_some_and(|b| b >= at_start + 50_000_000)
    })
    .expect("the transfer got under way");
    for k in 0..=2 {
        let a = format!("{}a{k}", lab.prefix);
        lab.ns(&lab.router, "ip", &["link", "set", &a, "mtu", "1280"])
            .unwrap();
    }
    finish_transfer(
        &lab,
        "400 MB while the router's MTU drops to 1280",
        bytes,
        5311,
        t,
    );
    let (m, _) = path_mtu(&lab, 1);
    let s = lab.status(1).unwrap();
    let holes = s["status"]["peers"][0]["pmtu_black_holes"]
        .as_u64()
        .unwrap_or(0);
    println!(
        "{}\nsender: frames of {m}, black holes {holes}",
        lab.status_table(1)
    );
    assert!(holes >= 1, "the sender noticed its frames no longer fit");
    assert!(m <= 1252, "frames of {m} after the drop");
}

/// `curl` of each node's `/metrics` during traffic: promtool accepts what
/// hub and peer serve, the per-peer counters move with the traffic, other
/// paths get 404, and a taken metrics address stops a second node with a
/// clear error.
#[test]
fn metrics_scraped_with_curl_pass_promtool_and_follow_traffic() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = Lab::new("fmtm", 27, 2).expect("namespace lab (needs root, iproute2, nftables)");
    let addr = "127.0.0.1:9480";
    lab.start_hub_with(0, 1.0, &["--metrics", addr]).unwrap();
    for k in 1..=2 {
        lab.start_peer(k, &["--metrics", addr]).unwrap();
    }
    if let Err(e) = lab.wait(Duration::from_secs(30), |l| {
        (1..=2).all(|k| l.peer_ready(k))
    }) {
        panic!("mesh did not come up: {e}\n{}", lab.logs());
    }
    let scrape = |k: usize, path: &str| -> (String, String) {
        let url = format!("http://{addr}{path}");
        let o = lab
            .exec(k, "curl", &["-s", "-o", "-", "-w", "\n%{http_code}", &url])
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        let (body, code) = out.rsplit_once('\n').unwrap_or((&out, ""));
        (body.to_string(), code.to_string())
    };
    let promtool = |text: &str| {
        use std::io::Write;
        let mut c = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool (Debian package prometheus)");
        c.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let o = c.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "promtool check metrics: {}{}\n{text}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let sent_to_peer2 = |text: &str| -> u64 {
        text.lines()
            .find(|l| {
                l.starts_with("fastmesh_peer_sent_packets_total{") && l.contains("peer=\"peer2\"")
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no packets-sent counter for peer2:\n{text}"))
    };
    let (hub, code) = scrape(0, "/metrics");
    assert_eq!(code, "200", "{hub}");
    promtool(&hub);
    assert!(hub.contains("fastmesh_hub_members 2"), "{hub}");
    let accepted: u64 = hub
        .lines()
        .find_map(|l| l.strip_prefix("fastmesh_hub_registrations_accepted_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(accepted >= 2, "two peers registered: {hub}");
    assert!(hub.contains("fastmesh_stream_open 0"), "{hub}");
    let (before, code) = scrape(1, "/metrics");
    assert_eq!(code, "200");
    promtool(&before);
    assert!(before.contains("fastmesh_peer_up{"), "{before}");
    let (ok, out) = ping(&lab, 1, &lab.nodes[2].overlay.to_string(), 20);
    assert!(ok, "{out}");
    let (after, _) = scrape(1, "/metrics");
    let (a, b) = (sent_to_peer2(&before), sent_to_peer2(&after));
    println!("packets sent to peer2: {a} before 20 pings, {b} after");
    assert!(b >= a + 20, "{a} -> {b}");
    let (_, code) = scrape(1, "/other");
    assert_eq!(code, "404");
    // The address is taken: a second peer in the same namespace stops at once.
    let bin = fastmesh_bin().unwrap();
    let o = lab
        .exec(
            1,
            &bin.to_string_lossy(),
            &[
                "peer",
                "--hub",
                &lab.hub_spec(0).unwrap(),
                "--address",
                "10.99.0.99/24",
                "--key",
                &lab.path("n1.key"),
                "--network-key",
                &lab.path("network.key"),
                "--tun",
                "fmx9",
                "--listen",
                "0.0.0.0:4899",
                "--metrics",
                addr,
            ],
        )
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("cannot listen for metrics on 127.0.0.1:9480"),
        "{err}"
    );
}

/// `fastmesh ping` from peer 1: replies from peer 2 by name and by IPv6
/// overlay address, each with its RTT and the direct path's endpoint; an
/// unknown peer and a hub's socket are refused with the reason.
#[test]
fn fastmesh_ping_shows_rtt_and_the_path_taken() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = hub_and_two_peers("fmtp", 28, None);
    let bin = fastmesh_bin().unwrap().to_string_lossy().into_owned();
    let ctl1 = lab.nodes[1].control.to_string_lossy().into_owned();
    let run = |args: &[&str]| {
        let o = lab.exec(1, &bin, args).unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (ok, out, err) = run(&["ping", "peer2", "-c", "3", "--control", &ctl1]);
    assert!(ok, "{out}{err}");
    println!("{out}");
    let replies: Vec<&str> = out.lines().filter(|l| l.starts_with("seq=")).collect();
    assert_eq!(replies.len(), 3, "{out}");
    let endpoint = format!("via direct {}:", lab.nodes[2].underlay);
    for l in &replies {
        assert!(l.contains("time=") && l.contains(&endpoint), "{l}");
    }
    assert!(out.contains("3 sent, 3 received"), "{out}");
    let (ok, out, err) = run(&[
        "ping",
        &lab.nodes[2].overlay6,
        "-c",
        "1",
        "--json",
        "--control",
        &ctl1,
    ]);
    assert!(ok, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["received"], 1, "{v}");
    assert!(v["probes"][0]["rtt_ms"].as_f64().unwrap() > 0.0);
    let (ok, _, err) = run(&["ping", "nobody", "--control", &ctl1]);
    assert!(!ok);
    assert!(
        err.contains("no peer \"nobody\"") && err.contains("peer2"),
        "{err}"
    );
    let ctl0 = lab.nodes[0].control.to_string_lossy().into_owned();
    let o = lab
        .exec(0, &bin, &["ping", "peer2", "--control", &ctl0])
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("not a peer's control socket"),
        "{err}"
    );
}

/// SIGHUP and `fastmesh reload` during a transfer: the hub applies a new
/// allow-list and log level, names the setting it cannot change, refuses a
/// broken file without changing anything, and the transfer finishes with its
/// checksum on the sessions it started on.
#[test]
fn reload_during_a_transfer_keeps_every_session() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = Lab::new("fmtr", 29, 2).expect("namespace lab (needs root, iproute2, nftables)");
    let conf = lab.path("hub.toml");
    // The heartbeat from the file (no --heartbeat flag), so a reload may
    // change it.
    std::fs::write(&conf, "relay = true\nheartbeat = 1\n").unwrap();
    let args = lab.hub_args(0, None, &["--config", &conf]);
    lab.start_hub_args(0, &args).unwrap();
    for k in 1..=2 {
        lab.start_peer(k, &[]).unwrap();
    }
    if let Err(e) = lab.wait(Duration::from_secs(30), |l| {
        (1..=2).all(|k| l.peer_ready(k))
    }) {
        panic!("mesh did not come up: {e}\n{}", lab.logs());
    }
    let bin = fastmesh_bin().unwrap().to_string_lossy().into_owned();
    let reload = |k: usize| {
        let ctl = lab.nodes[k].control.to_string_lossy().into_owned();
        let o = lab.exec(k, &bin, &["reload", "--control", &ctl]).unwrap();
        (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    };
    let bytes: u64 = 500_000_000;
    let mut t = start_transfer(&lab, 1, 2, bytes, 5310);
    // Both peers' keys on the allow-list, a log level, a new heartbeat
    // interval (members follow it from their next heartbeat's ack), and a
    // setting that needs a restart.
    let keys: Vec<String> = (1..=2)
        .map(|k| {
            let o = lab
                .fastmesh(&["pubkey", &lab.path(&format!("n{k}.key"))])
                .unwrap();
            String::from_utf8_lossy(&o.stdout).trim().to_string()
        })
        .collect();
    let allow = lab.path("allowed");
    std::fs::write(&allow, keys.join("\n") + "\n").unwrap();
    std::fs::write(
        &conf,
        format!(
            "relay = true\nallow = \"{allow}\"\nlog = \"debug\"\nheartbeat = 2\nexpire_beats = 8\nmetrics = \"127.0.0.1:1\"\n"
        ),
    )
    .unwrap();
    assert!(lab.signal(0, libc::SIGHUP));
    let want = "reloaded: allow-list of 2 keys, relaying on, heartbeat 2 s, members dropped after 8 silent, log level debug; changed but not applied until a restart: metrics";
    lab.wait(Duration::from_secs(5), |l| l.logs().contains(want))
        .unwrap_or_else(|e| panic!("no reload line after SIGHUP: {e}\n{}", lab.logs()));
    assert!(
        t.tx.try_wait().unwrap().is_none(),
        "the reload came while the transfer ran"
    );
    let (ok, out) = reload(0);
    assert!(ok && out.contains(want), "{out}");
    // A broken file changes nothing.
    std::fs::write(&conf, "allow = \"/nonexistent/allowed\"\n").unwrap();
    let (ok, out) = reload(0);
    assert!(
        !ok && out.contains("reload failed, nothing changed"),
        "{out}"
    );
    // A peer started without a config file says so.
    let (ok, out) = reload(1);
    assert!(!ok && out.contains("started without --config"), "{out}");
    finish_transfer(&lab, "during reloads", bytes, 5310, t);
    let st = lab.status(1).unwrap();
    let p = &st["status"]["peers"][0];
    assert_eq!(p["restarts"], 0, "no session restarted: {p}");
    // Both peers took the hub's new interval, without registering again.
    for k in 1..=2 {
        lab.wait(Duration::from_secs(10), |l| {
            l.status(k).is_ok_and(|v| v["status"]["heartbeat_s"] == 2.0)
        })
        .unwrap_or_else(|e| panic!("peer{k} kept its heartbeat: {e}\n{}", lab.logs()));
        let regs = &lab.status(k).unwrap()["status"]["hubs"][0]["registrations"];
        assert_eq!(regs, 1, "peer{k} registered again");
    }
    let hub = lab.status(0).unwrap();
    assert_eq!(hub["status"]["heartbeat_s"], 2.0);
    assert_eq!(hub["status"]["expire_beats"], 8);
    assert_eq!(
        hub["status"]["members"].as_array().unwrap().len(),
        2,
        "{hub}"
    );
}

/// A peer's reload adds a hub and then removes the first one: it registers
/// with the new hub, forgets the old one, and its session with the other
/// peer (which lists both hubs) carries on without a restart.
#[test]
fn a_peer_reload_adds_and_removes_hubs_without_touching_its_sessions() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = Lab::new("fmth", 30, 3).expect("namespace lab (needs root, iproute2, nftables)");
    lab.start_hub_at(0, 1.0).unwrap();
    lab.start_hub_at(1, 1.0).unwrap();
    let (h0, h1) = (lab.hub_spec(0).unwrap(), lab.hub_spec(1).unwrap());
    let conf = lab.path("peer2.toml");
    std::fs::write(&conf, format!("hubs = [\"{h0}\"]\n")).unwrap();
    let mut args = lab.peer_args(2, &[]);
    let i = args.iter().position(|a| a == "--hub").unwrap();
    args.drain(i..i + 2);
    args.extend(["--config".to_string(), conf.clone()]);
    lab.start_peer_args(2, &args).unwrap();
    let mut args = lab.peer_args(3, &[]);
    args.extend(["--hub".to_string(), h1.clone()]);
    lab.start_peer_args(3, &args).unwrap();
    let hubs_of = |l: &Lab, k: usize| -> Vec<(String, String)> {
        l.status(k)
            .ok()
            .and_then(|v| v["status"]["hubs"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|h| {
                (
                    h["addr"].as_str().unwrap_or("").to_string(),
                    h["state"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    };
    let addr = |spec: &str| spec.split('@').nth(1).unwrap().to_string();
    let up = |l: &Lab| (2..=3).all(|k| l.peer_ready_with(k, 1));
    if let Err(e) = lab.wait(Duration::from_secs(30), up) {
        panic!("mesh did not come up: {e}\n{}", lab.logs());
    }
    let bin = fastmesh_bin().unwrap().to_string_lossy().into_owned();
    let ctl = lab.nodes[2].control.to_string_lossy().into_owned();
    let reload = || {
        let o = lab.exec(2, &bin, &["reload", "--control", &ctl]).unwrap();
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(
            o.status.success(),
            "{out}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        out
    };
    std::fs::write(&conf, format!("hubs = [\"{h0}\", \"{h1}\"]\n")).unwrap();
    assert!(reload().contains("reloaded: 2 hubs"));
    lab.wait(Duration::from_secs(10), |l| {
        let h = hubs_of(l, 2);
        h.len() == 2 && h.iter().all(|(_, s)| s == "registered")
    })
    .unwrap_or_else(|e| panic!("not registered with both hubs: {e}\n{:?}", hubs_of(&lab, 2)));
    std::fs::write(&conf, format!("hubs = [\"{h1}\"]\n")).unwrap();
    assert!(reload().contains("reloaded: 1 hubs"));
    lab.wait(Duration::from_secs(5), |l| {
        hubs_of(l, 2) == vec![(addr(&h1), "registered".to_string())]
    })
    .unwrap_or_else(|e| panic!("hub 0 not forgotten: {e}\n{:?}", hubs_of(&lab, 2)));
    let (ok, out) = ping(&lab, 2, &lab.nodes[3].overlay.to_string(), 3);
    assert!(ok, "{out}");
    let st = lab.status(2).unwrap();
    let p = &st["status"]["peers"][0];
    assert_eq!(p["name"], "peer3", "{st}");
    assert_eq!(p["restarts"], 0, "{p}");
}

// ------------------------------------------------------------ subnet routes

#[test]
fn a_lan_behind_a_peer_is_reached_by_its_address_and_spoofed_lan_sources_are_dropped() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = Lab::new("fmsr", 31, 3).expect("namespace lab (needs root, iproute2, nftables)");
    // Site B: peer 2 with 192.168.31.0/24 behind it.
    let lan = lab.add_lan_host(2, 31).unwrap();
    lab.start_hub(1.0).unwrap();
    lab.start_peer(1, &[]).unwrap();
    lab.start_peer(2, &["--route", "192.168.31.0/24"]).unwrap();
    lab.wait(Duration::from_secs(30), |l| {
        l.peer_ready_with(1, 1) && l.peer_ready_with(2, 1)
    })
    .unwrap_or_else(|e| panic!("mesh did not come up: {e}\n{}", lab.logs()));
    // Peer 1 routes the subnet into its TUN device, as the map said.
    lab.wait(Duration::from_secs(10), |l| {
        l.exec(1, "ip", &["route", "show", "192.168.31.0/24"])
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("dev fm0"))
    })
    .unwrap_or_else(|e| panic!("route not installed: {e}\n{}", lab.log("peer1.log")));
    let st = lab.status(1).unwrap();
    assert_eq!(
        st["status"]["peers"][0]["routes"][0], "192.168.31.0/24",
        "{st}"
    );
    assert!(lab
        .status_table(1)
        .contains("route 192.168.31.0/24 via peer2"));
    // The LAN host answers by its LAN address, ping and TCP (split) alike.
    let host = lab.nodes[lan].overlay.to_string();
    let (ok, out) = ping(&lab, 1, &host, 3);
    assert!(ok, "ping the LAN host: {out}\n{}", lab.logs());
    let r = transfer(&lab, 1, lan, 20_000_000, 5401);
    assert_transfer(
        "20 MB to a host on the LAN behind peer 2",
        20_000_000,
        &r,
        &lab,
    );
    // Peer 1 claims a LAN source: peer 2 drops and counts it.
    let drops = |l: &Lab| {
        l.status(2).map_or(0, |v| {
            v["status"]["counters"]["drop_bad_source"]
                .as_u64()
                .unwrap_or(0)
        })
    };
    let before = drops(&lab);
    lab.exec(1, "ip", &["addr", "add", "192.168.31.77/32", "dev", "lo"])
        .unwrap();
    let b_overlay = lab.nodes[2].overlay.to_string();
    let o = lab
        .exec(
            1,
            "ping",
            &[
                "-c",
                "3",
                "-i",
                "0.2",
                "-W",
                "1",
                "-I",
                "192.168.31.77",
                &b_overlay,
            ],
        )
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(received(&out), Some(0), "spoofed pings answered: {out}");
    let after = drops(&lab);
    assert!(after >= before + 3, "bad_source {before} -> {after}");
    // A third node advertising an overlapping subnet is refused by the hub
    // with the reason, and its process stops.
    lab.start_peer(3, &["--route", "192.168.0.0/16"]).unwrap();
    lab.wait(Duration::from_secs(15), |l| !l.running_pid(3))
        .unwrap_or_else(|e| {
            panic!(
                "overlapping peer still running: {e}\n{}",
                lab.log("peer3.log")
            )
        });
    let log = lab.log("peer3.log");
    assert!(log.contains("overlaps 192.168.31.0/24"), "{log}");
}

// ------------------------------------------------------------- IPv6 underlay

/// Peer `k`'s first peer: (endpoint in use, path kind).
fn peer_endpoint(lab: &Lab, k: usize) -> (String, String) {
    let s = lab.status(k).unwrap();
    let p = &s["status"]["peers"][0];
    (
        p["endpoint"].as_str().unwrap_or("").to_string(),
        p["path"].as_str().unwrap_or("").to_string(),
    )
}

#[test]
fn ipv6_only_and_dual_stack_underlays() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // IPv6 only: the router forwards no IPv4; the hub is reached at its
    // IPv6 address and the peers' direct path is IPv6.
    let mut lab = Lab::new("fmv6", 32, 2).expect("namespace lab (needs root, iproute2, nftables)");
    lab.enable_ipv6(32, false).unwrap();
    let hub6 = lab.nodes[0].underlay6.clone().unwrap();
    lab.start_hub_with(0, 1.0, &["--listen", "[::]:4800"])
        .unwrap();
    let key = lab.hub_key().to_string();
    let hub = format!("{key}@[{hub6}]:4800");
    for k in [1, 2] {
        lab.start_peer(k, &["--hub", &hub, "--listen", "[::]:4800"])
            .unwrap();
    }
    lab.wait(Duration::from_secs(30), |l| {
        l.peer_ready(1) && l.peer_ready(2)
    })
    .unwrap_or_else(|e| panic!("IPv6-only mesh did not come up: {e}\n{}", lab.logs()));
    let (ep, path) = peer_endpoint(&lab, 1);
    assert_eq!(path, "direct");
    assert!(ep.starts_with("[fdc8:32:2::2]"), "IPv6 endpoint, got {ep}");
    let (ok, out) = ping(&lab, 1, &lab.nodes[2].overlay.to_string(), 3);
    assert!(ok, "ping over an IPv6 underlay: {out}");
    let r = transfer(&lab, 1, 2, 20_000_000, 5501);
    assert_transfer("20 MB over an IPv6-only underlay", 20_000_000, &r, &lab);
    drop(lab);

    // Dual stack: the hub is listed by its IPv4 address; the peers' IPv6
    // candidates measure as well as their IPv4 ones, and IPv6 is chosen.
    let mut lab = Lab::new("fmv7", 33, 2).expect("namespace lab");
    lab.enable_ipv6(33, true).unwrap();
    lab.start_hub_with(0, 1.0, &["--listen", "[::]:4800"])
        .unwrap();
    for k in [1, 2] {
        lab.start_peer(k, &["--listen", "[::]:4800"]).unwrap();
    }
    lab.wait(Duration::from_secs(30), |l| {
        l.peer_ready(1) && l.peer_ready(2)
    })
    .unwrap_or_else(|e| panic!("dual-stack mesh did not come up: {e}\n{}", lab.logs()));
    // The hub saw the peers at their IPv4 addresses (not IPv4-mapped).
    let st = lab.status(1).unwrap();
    let observed = st["status"]["observed"].as_str().unwrap_or("");
    assert!(observed.starts_with("10.233.1.2:"), "{st}");
    lab.wait(Duration::from_secs(20), |l| {
        peer_endpoint(l, 1).0.starts_with("[fdc8:33:2::2]")
            && peer_endpoint(l, 2).0.starts_with("[fdc8:33:1::2]")
    })
    .unwrap_or_else(|e| {
        panic!(
            "IPv6 not chosen: {e}\n{}\n{}",
            lab.status_table(1),
            lab.status_table(2)
        )
    });
    let r = transfer(&lab, 2, 1, 20_000_000, 5502);
    assert_transfer("20 MB over a dual-stack underlay", 20_000_000, &r, &lab);
    println!("{}", lab.status_table(1));
}

/// How peer `k` reaches its first hub besides UDP ("tcp://...", "tls://...",
/// or "" on UDP).
fn hub_via(lab: &Lab, k: usize) -> String {
    lab.status(k)
        .ok()
        .and_then(|v| v["status"]["hubs"][0]["via"].as_str().map(str::to_string))
        .unwrap_or_default()
}

#[test]
fn udp_blocked_peers_reach_the_mesh_over_tcp_and_tls_and_return_to_udp() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = Lab::new("fmsf", 35, 2).expect("namespace lab");
    let tls = format!("{}:443", lab.nodes[0].underlay);
    lab.start_hub_with(0, 1.0, &["--tls-listen", &tls]).unwrap();
    for k in 1..=2 {
        lab.start_peer(k, &[]).unwrap();
    }
    if let Err(e) = lab.wait(Duration::from_secs(30), |l| {
        l.peer_ready(1) && l.peer_ready(2)
    }) {
        panic!("mesh did not come up: {e}\n{}", lab.logs());
    }
    wait_path(&lab, [1, 2], "direct", 30);
    let on = |via: &'static str| {
        move |l: &Lab| {
            hub_via(l, 1).starts_with(via)
                && l.peer_ready(1)
                && nat_path(l, 1).0 == "relay"
                && nat_path(l, 2).0 == "relay"
        }
    };
    let check_traffic = |lab: &Lab, what: &str, from: usize, to: usize, port: u16| {
        let (_, out) = ping(lab, from, &lab.nodes[to].overlay.to_string(), 20);
        assert!(
            received(&out).is_some_and(|n| n >= 19),
            "{what}: ping {out}\n{}",
            lab.status_table(1)
        );
        let bytes = 20_000_000;
        let r = transfer(lab, from, to, bytes, port);
        assert_transfer(what, bytes, &r, lab);
    };

    // No UDP at all for peer 1 (both ways): its hub link moves to TCP and
    // both peers reach each other through the hub's relay.
    lab.block_udp(1, Some(&[])).unwrap();
    let t = lab
        .wait(Duration::from_secs(60), on("tcp://"))
        .unwrap_or_else(|e| {
            panic!(
                "no TCP fallback: {e}\n{}\n{}",
                lab.status_table(1),
                lab.logs()
            )
        });
    println!("UDP blocked: hub over TCP, peers relayed after {t:?}");
    println!("{}", lab.status_table(1));
    check_traffic(&lab, "UDP blocked, TCP fallback", 1, 2, 5351);

    // A network that passes only HTTPS (no UDP, no TCP to 4800), from a
    // fresh start: TLS on port 443.
    lab.stop(1);
    lab.block_udp(1, Some(&[4800])).unwrap();
    lab.start_peer(1, &[]).unwrap();
    let t = lab
        .wait(Duration::from_secs(60), on("tls://"))
        .unwrap_or_else(|e| {
            panic!(
                "no TLS fallback: {e}\n{}\n{}",
                lab.status_table(1),
                lab.logs()
            )
        });
    println!("only HTTPS passes: started over TLS, peers relayed after {t:?}");
    check_traffic(&lab, "only HTTPS passes, TLS fallback", 2, 1, 5352);
    let hub = lab.status(0).unwrap();
    let m = hub["status"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "peer1")
        .cloned()
        .unwrap();
    assert!(
        m["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| !e.as_str().unwrap_or("").starts_with("[100::")),
        "a stream address offered as a candidate: {m}"
    );

    // Rules removed: back to UDP, and a direct path, within 30 s.
    lab.block_udp(1, None).unwrap();
    let t = lab
        .wait(Duration::from_secs(30), |l| {
            hub_via(l, 1).is_empty() && nat_path(l, 1).0 == "direct" && nat_path(l, 2).0 == "direct"
        })
        .unwrap_or_else(|e| {
            panic!(
                "not back on direct UDP: {e}\n{}\n{}\n{}",
                lab.status_table(1),
                lab.status_table(2),
                lab.logs()
            )
        });
    println!("unblocked: hub over UDP and the peers direct again after {t:?}");
    let (ok, out) = ping(&lab, 1, &lab.nodes[2].overlay.to_string(), 5);
    assert!(ok, "{out}");
    // Counted: the hub accepted a TCP and a TLS connection; the restarted
    // peer fell back once (TCP failed first) and returned once.
    let hs = &lab.status(0).unwrap()["status"]["streams"];
    assert!(hs["accepted"].as_u64() >= Some(2), "{hs}");
    let ps = &lab.status(1).unwrap()["status"]["streams"];
    assert_eq!(ps["fallbacks"], 1, "{ps}");
    assert_eq!(ps["returns"], 1, "{ps}");
    assert!(ps["dial_failed"].as_u64() >= Some(1), "{ps}");
}

/// Cluster flags for hub `h` of `n` hubs in nodes 0..n (hub-to-hub TCP on 4801).
fn cluster_hub_args(lab: &Lab, h: usize, n: usize) -> Vec<String> {
    let mut args = lab.hub_args(h, Some(1.0), &[]);
    args.extend([
        "--cluster-id".to_string(),
        (h + 1).to_string(),
        "--cluster-listen".to_string(),
        format!("{}:4801", lab.nodes[h].underlay),
    ]);
    for j in 0..n {
        let spec = lab.hub_spec(j).unwrap();
        let key = spec.split('@').next().unwrap().to_string();
        args.push("--cluster-hub".into());
        args.push(format!("{}={key}@{}:4801", j + 1, lab.nodes[j].underlay));
    }
    args
}

fn cluster_status(lab: &Lab, h: usize) -> Option<serde_json::Value> {
    let v = lab.status(h).ok()?;
    let c = v["status"]["cluster"].clone();
    c.is_object().then_some(c)
}

#[test]
fn three_hubs_one_killed_while_peers_register_the_survivors_agree() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = Lab::new("fmh3", 38, 5).expect("namespace lab");
    for h in 0..3 {
        let args = cluster_hub_args(&lab, h, 3);
        lab.start_hub_args(h, &args).unwrap();
    }
    let leader = |l: &Lab, hubs: &[usize]| -> Option<u64> {
        let ls: Vec<Option<u64>> = hubs
            .iter()
            .map(|h| cluster_status(l, *h).and_then(|c| c["leader"].as_u64()))
            .collect();
        ls[0].filter(|_| ls.iter().all(|x| *x == ls[0]))
    };
    let took = lab
        .wait(Duration::from_secs(20), |l| leader(l, &[0, 1, 2]).is_some())
        .unwrap_or_else(|e| panic!("no leader: {e}\n{}", lab.logs()));
    println!("hubs elected a leader in {:.1} s", took.as_secs_f64());
    let specs: Vec<String> = (0..3).map(|h| lab.hub_spec(h).unwrap()).collect();
    let peer_args = |lab: &Lab, k: usize| {
        let mut args = lab.peer_args(k, &["--hub", &specs[0]]);
        for s in &specs[1..] {
            args.push("--hub".into());
            args.push(s.clone());
        }
        args
    };
    for k in [3, 4] {
        let a = peer_args(&lab, k);
        lab.start_peer_args(k, &a).unwrap();
    }
    lab.wait(Duration::from_secs(30), |l| {
        l.peer_ready_with(3, 1) && l.peer_ready_with(4, 1)
    })
    .unwrap_or_else(|e| panic!("two peers did not come up: {e}\n{}", lab.logs()));
    // Peer 5 registers while the leader is killed.
    let a = peer_args(&lab, 5);
    lab.start_peer_args(5, &a).unwrap();
    let killed = (leader(&lab, &[0, 1, 2]).expect("leader") - 1) as usize;
    lab.kill9(killed);
    let survivors: Vec<usize> = (0..3).filter(|h| *h != killed).collect();
    println!("killed hub {killed} (the leader) while peer 5 registers");
    let took = lab
        .wait(Duration::from_secs(40), |l| {
            (3..=5).all(|k| {
                l.status(k).is_ok_and(|v| {
                    let s = &v["status"];
                    s["peers"]
                        .as_array()
                        .is_some_and(|p| p.len() == 2 && p.iter().all(|p| p["state"] == "up"))
                        && s["hubs"].as_array().is_some_and(|h| {
                            h.iter().filter(|h| h["state"] == "registered").count() == 2
                        })
                })
            })
        })
        .unwrap_or_else(|e| panic!("peers did not settle on the survivors: {e}\n{}", lab.logs()));
    println!(
        "all three peers registered with both survivors {:.1} s after the kill",
        took.as_secs_f64()
    );
    // The survivors agree: same leader, same applied index, same owners.
    let agree = |l: &Lab| {
        let c: Vec<_> = survivors.iter().map(|h| cluster_status(l, *h)).collect();
        let owned: Vec<_> = survivors
            .iter()
            .map(|h| {
                l.status(*h)
                    .ok()
                    .map(|v| v["status"]["owned_addresses"].clone())
            })
            .collect();
        c.iter().all(|x| x.is_some())
            && c[0].as_ref().unwrap()["applied"] == c[1].as_ref().unwrap()["applied"]
            && c[0].as_ref().unwrap()["leader"] == c[1].as_ref().unwrap()["leader"]
            && c[0].as_ref().unwrap()["leader"]
                .as_u64()
                .is_some_and(|l| survivors.contains(&(l as usize - 1)))
            && owned[0] == owned[1]
            && owned[0] == Some(serde_json::json!(6))
    };
    lab.wait(Duration::from_secs(10), agree)
        .unwrap_or_else(|e| {
            panic!(
                "survivors disagree: {e}\n{}\n{}",
                lab.status_table(survivors[0]),
                lab.status_table(survivors[1])
            )
        });
    let (ok, out) = ping(&lab, 5, &lab.nodes[3].overlay.to_string(), 3);
    assert!(ok, "ping from the peer that joined during the kill: {out}");
    // A revocation at one survivor reaches the other and every member.
    let pub4 = lab.fastmesh(&["pubkey", &lab.path("n4.key")]).unwrap();
    let pub4 = String::from_utf8_lossy(&pub4.stdout).trim().to_string();
    let t0 = Instant::now();
    let out = lab
        .fastmesh(&[
            "revoke",
            &pub4,
            "--control",
            &lab.nodes[survivors[1]].control.to_string_lossy(),
        ])
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "revoked",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    lab.wait(Duration::from_secs(10), |l| {
        survivors.iter().all(|h| {
            l.status(*h)
                .is_ok_and(|v| v["status"]["revoked"] == 1 && v["status"]["owned_addresses"] == 4)
        }) && [3, 5].iter().all(|k| {
            l.status(*k).is_ok_and(|v| {
                v["status"]["peers"]
                    .as_array()
                    .is_some_and(|p| p.len() == 1)
            })
        })
    })
    .unwrap_or_else(|e| panic!("revocation did not reach everyone: {e}\n{}", lab.logs()));
    println!(
        "revocation at hub {} reached both survivors and every member in {:.2} s (heartbeat 1 s)",
        survivors[1],
        t0.elapsed().as_secs_f64()
    );
    // The killed hub comes back with its disk and catches up.
    let args = cluster_hub_args(&lab, killed, 3);
    lab.start_hub_args(killed, &args).unwrap();
    lab.wait(Duration::from_secs(20), |l| {
        l.status(killed)
            .is_ok_and(|v| v["status"]["revoked"] == 1 && v["status"]["owned_addresses"] == 4)
    })
    .unwrap_or_else(|e| panic!("the restarted hub did not catch up: {e}\n{}", lab.logs()));
    println!("{}", lab.status_table(killed));
}
