//! `fastmesh ping PEER`: ICMP echo to a peer's overlay address through the
//! mesh (the real data path: TUN, session, the peer's kernel and back), and
//! for every probe the path the node uses to that peer at that moment - the
//! direct endpoint or the relaying hub - read from the node's status.

use crate::control;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The peer `target` names (its name, an overlay address, or the start of
/// its key) in a status document: (name, address to ping).
pub fn find(status: &Value, target: &str) -> Result<(String, IpAddr)> {
    let peers = status["status"]["peers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let want_ip: Option<IpAddr> = target.parse().ok();
    for p in &peers {
        let name = p["name"].as_str().unwrap_or("");
        let key = p["key"].as_str().unwrap_or("");
        let addrs: Vec<IpAddr> = p["overlay"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str())
            .filter_map(|a| a.split('/').next()?.parse().ok())
            .collect();
        let hit = name == target
            || want_ip.is_some_and(|ip| addrs.contains(&ip))
            || (target.len() >= 4 && key.starts_with(target));
        if hit {
            let ip = want_ip
                .filter(|ip| addrs.contains(ip))
                .or_else(|| addrs.iter().find(|a| a.is_ipv4()).copied())
                .or_else(|| addrs.first().copied());
            let Some(ip) = ip else {
                bail!("peer {name} has no overlay address yet");
            };
            return Ok((name.to_string(), ip));
        }
    }
    let names: Vec<&str> = peers.iter().filter_map(|p| p["name"].as_str()).collect();
    bail!(
        "no peer {target:?} in this node's map (peers: {}); name a peer, its overlay address or its key",
        if names.is_empty() {
            "none yet".to_string()
        } else {
            names.join(", ")
        }
    )
}

/// How the node reaches peer `name` now, as status says.
fn path_of(status: &Value, name: &str) -> String {
    let p = status["status"]["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == name);
    match p {
        None => "peer gone from the map".into(),
        Some(p) => match p["path"].as_str().unwrap_or("-") {
            "direct" => format!("direct {}", p["endpoint"].as_str().unwrap_or("?")),
            "relay" => format!("relay hub {}", p["relay"].as_str().unwrap_or("?")),
            other => format!("{other} ({})", p["state"].as_str().unwrap_or("")),
        },
    }
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in b.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += w as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An echo request (ICMPv4 type 8, ICMPv6 type 128; the kernel fills the
/// ICMPv6 checksum).
fn echo(v6: bool, id: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![if v6 { 128 } else { 8 }, 0, 0, 0];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(b"fastmesh ping...");
    if !v6 {
        let c = checksum(&p);
        p[2..4].copy_from_slice(&c.to_be_bytes());
    }
    p
}

/// Whether `b` (as a raw socket returns it: with the IPv4 header for v4)
/// is the echo reply to (`id`, `seq`) from `from`.
fn is_reply(b: &[u8], v6: bool, id: u16, seq: u16) -> bool {
    let icmp = if v6 {
        b
    } else {
        let ihl = (b.first().copied().unwrap_or(0) & 0x0f) as usize * 4;
        b.get(ihl..).unwrap_or(&[])
    };
    icmp.len() >= 8
        && icmp[0] == if v6 { 129 } else { 0 }
        && icmp[4..6] == id.to_be_bytes()
        && icmp[6..8] == seq.to_be_bytes()
}

/// Ping `target` `count` times through the node at `control`.
pub fn run(control_path: PathBuf, target: &str, count: u32, as_json: bool) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let status = rt.block_on(control::query(&control_path))?;
    if status["kind"] != "peer" {
        bail!(
            "{} is not a peer's control socket (hubs have no TUN to ping from)",
            control_path.display()
        );
    }
    let (name, ip) = find(&status, target)?;
    let v6 = ip.is_ipv6();
    let sock = if v6 {
        Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))
    } else {
        Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))
    }
    .context("cannot open an ICMP socket (fastmesh ping needs root or CAP_NET_RAW)")?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let dst = SockAddr::from(SocketAddr::new(ip, 0));
    let id = (std::process::id() & 0xffff) as u16;
    let mut probes = Vec::new();
    let mut buf = [MaybeUninit::<u8>::uninit(); 2048];
    if !as_json {
        println!("PING {name} ({ip}) through the mesh");
    }
    for seq in 1..=count.min(u16::MAX as u32) as u16 {
        let t0 = Instant::now();
        sock.send_to(&echo(v6, id, seq), &dst)
            .with_context(|| format!("cannot send to {ip}"))?;
        let mut rtt = None;
        while t0.elapsed() < Duration::from_secs(1) {
            match sock.recv(&mut buf) {
                Ok(n) => {
                    // SAFETY: recv initialised the first n bytes.
                    let b: Vec<u8> = buf[..n]
                        .iter()
                        .map(|x| unsafe { x.assume_init() })
                        .collect();
                    if is_reply(&b, v6, id, seq) {
                        rtt = Some(t0.elapsed());
                        break;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e).context("ICMP receive failed"),
            }
        }
        let st = rt.block_on(control::query(&control_path))?;
        let path = path_of(&st, &name);
        let ms = rtt.map(|d| d.as_secs_f64() * 1e3);
        if !as_json {
            match ms {
                Some(ms) => println!("seq={seq} time={ms:.2} ms via {path}"),
                None => println!("seq={seq} no reply within 1 s (path: {path})"),
            }
        }
        probes.push(json!({"seq": seq, "rtt_ms": ms, "path": path}));
        if seq as u32 != count {
            std::thread::sleep(Duration::from_secs(1).saturating_sub(t0.elapsed()));
        }
    }
    let rtts: Vec<f64> = probes.iter().filter_map(|p| p["rtt_ms"].as_f64()).collect();
    let received = rtts.len();
    let (min, max) = rtts
        .iter()
        .fold((f64::INFINITY, 0.0f64), |(a, b), &x| (a.min(x), b.max(x)));
    let avg = rtts.iter().sum::<f64>() / received.max(1) as f64;
    if as_json {
        let summary = json!({
            "peer": name, "address": ip.to_string(), "sent": probes.len(), "received": received,
            "rtt_ms": if received > 0 { json!({"min": min, "avg": avg, "max": max}) } else { Value::Null },
            "probes": probes,
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else if received > 0 {
        println!(
            "{} sent, {received} received, rtt min/avg/max {min:.2}/{avg:.2}/{max:.2} ms",
            probes.len()
        );
    } else {
        println!("{} sent, 0 received", probes.len());
    }
    if received == 0 {
        bail!("no reply from {name} ({ip}): see `fastmesh status` for the path and what to do");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_found_by_name_address_or_key_and_unknown_ones_named() {
        let st = json!({"kind": "peer", "status": {"peers": [
            {"name": "tokyo", "key": "a1b2c3d4e5f6", "overlay": ["10.99.0.2/24", "fd99::2/64"]},
            {"name": "osaka", "key": "ffee00112233", "overlay": ["10.99.0.3/24"]}
        ]}});
        assert_eq!(
            find(&st, "tokyo").unwrap(),
            ("tokyo".into(), "10.99.0.2".parse().unwrap())
        );
        assert_eq!(
            find(&st, "fd99::2").unwrap().1,
            "fd99::2".parse::<IpAddr>().unwrap()
        );
        assert_eq!(find(&st, "10.99.0.3").unwrap().0, "osaka");
        assert_eq!(find(&st, "ffee").unwrap().0, "osaka");
        let e = find(&st, "kyoto").unwrap_err().to_string();
        assert!(
            e.contains("no peer \"kyoto\"") && e.contains("tokyo, osaka"),
            "{e}"
        );
    }

    #[test]
    fn echo_requests_carry_a_valid_checksum_and_replies_are_matched() {
        let p = echo(false, 7, 3);
        assert_eq!(checksum(&p), 0, "a valid ICMP checksum sums to zero");
        // An IPv4 reply: 20-byte header, then type 0 with the same id/seq.
        let mut r = vec![0x45u8];
        r.resize(20, 0);
        let mut icmp = p.clone();
        icmp[0] = 0;
        r.extend_from_slice(&icmp);
        assert!(is_reply(&r, false, 7, 3));
        assert!(!is_reply(&r, false, 7, 4));
        assert!(!is_reply(&r[..22], false, 7, 3));
    }
}
