//! `fastmesh-lab`: the demo, and the small clients the namespace tests and the
//! benchmark run inside namespaces (a checksummed TCP transfer, a UDP echo).

use anyhow::{bail, Context, Result};
use blake2::{Blake2b512, Digest};
use fastmesh_tests::lab::{mbps, Lab};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

const USAGE: &str = "usage:
  fastmesh-lab demo                        build a 3-peer mesh in namespaces, show it working, clean up
  fastmesh-lab tcp-recv PORT               accept one TCP connection, print bytes, hash, seconds
  fastmesh-lab tcp-send ADDR:PORT BYTES    send BYTES pseudo-random bytes, print bytes and hash
  fastmesh-lab udp-echo PORT SECS          echo UDP datagrams for SECS seconds
  fastmesh-lab udp-ping ADDR:PORT COUNT    send COUNT datagrams 1 ms apart, print sent and echoed";

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
        ["tcp-recv", port] => tcp_recv(port.parse().context("port")?),
        ["tcp-send", addr, bytes] => tcp_send(
            addr.parse().context("address")?,
            bytes.parse().context("bytes")?,
        ),
        ["udp-echo", port, secs] => {
            udp_echo(port.parse().context("port")?, secs.parse().context("secs")?)
        }
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
    std::thread::sleep(Duration::from_millis(300));
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
