//! The local control socket: a running node answers `status` with JSON; the
//! `fastmesh status` command prints it as a table.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// Bind the control socket at `path`, replacing a stale one (refusing if
/// another process answers on it).
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another fastmesh process answers on {}; stop it or pass --control",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let l = UnixListener::bind(path)
        .with_context(|| format!("cannot bind control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Serve requests: each connection sends one line (`status`, or on a hub
/// `revoke <hex key>`) and gets one JSON document from `answer`.
pub async fn serve<F, Fut>(l: UnixListener, answer: F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Value>,
{
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            continue;
        };
        let mut req = [0u8; 256];
        let n = tokio::time::timeout(std::time::Duration::from_secs(1), s.read(&mut req))
            .await
            .ok()
            .and_then(|r| r.ok())
            .unwrap_or(0);
        let line = String::from_utf8_lossy(&req[..n]).trim().to_string();
        let v = answer(line).await;
        let _ = s.write_all(v.to_string().as_bytes()).await;
        let _ = s.shutdown().await;
    }
}

/// Ask the node at `path` for its status.
pub async fn query(path: &PathBuf) -> Result<Value> {
    request(path, "status").await
}

/// Send one request line to the node at `path`; returns its JSON answer.
pub async fn request(path: &PathBuf, line: &str) -> Result<Value> {
    let mut s = UnixStream::connect(path).await.with_context(|| {
        format!(
            "no fastmesh node answers on {} (is it running? is this the right --control path? are you root?)",
            path.display()
        )
    })?;
    s.write_all(format!("{line}\n").as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .map_err(|_| anyhow!("node did not answer within 5 s"))??;
    Ok(serde_json::from_slice(&buf)?)
}

fn fmt_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2}G", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1}M", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1}k", b / 1e3)
    } else {
        format!("{b}")
    }
}

fn opt_ms(v: &Value) -> String {
    v.as_f64()
        .map(|x| format!("{x:.1}ms"))
        .unwrap_or_else(|| "-".into())
}

/// The strings of a JSON array, comma-separated.
fn joined(v: &Value) -> String {
    let parts: Vec<&str> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str())
        .collect();
    parts.join(",")
}

/// A status document as a human-readable table.
pub fn table(v: &Value) -> String {
    let mut out = String::new();
    if v["kind"] == "hub" {
        let s = &v["status"];
        out.push_str(&format!(
            "hub  map version {}  members {}  owned addresses {}  revoked keys {}\n",
            s["map_version"],
            s["members"].as_array().map_or(0, |m| m.len()),
            s["owned_addresses"],
            s["revoked"]
        ));
        let c = &s["cluster"];
        if c.is_object() {
            out.push_str(&format!(
                "cluster  hub {}  {}  leader {}  term {}  applied {}  waiting {}\n",
                c["id"],
                c["state"].as_str().unwrap_or("?"),
                c["leader"],
                c["term"],
                c["applied"],
                c["waiting"]
            ));
        }
        out.push_str(&format!(
            "relay  {} frames ({}) forwarded, {} dropped\n",
            s["relayed"].as_u64().unwrap_or(0),
            fmt_bytes(s["relayed_bytes"].as_u64().unwrap_or(0)),
            s["relay_dropped"].as_u64().unwrap_or(0)
        ));
        out.push_str(&format!(
            "{:<16} {:<14} {:<28} {:<24} {:>9}\n",
            "NAME", "KEY", "OVERLAY", "ENDPOINT", "LAST SEEN"
        ));
        for m in s["members"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "{:<16} {:<14} {:<28} {:<24} {:>8.1}s\n",
                m["name"].as_str().unwrap_or(""),
                m["key"].as_str().unwrap_or(""),
                joined(&m["overlay"]),
                m["endpoints"][0].as_str().unwrap_or("-"),
                m["last_seen_s"].as_f64().unwrap_or(0.0)
            ));
        }
        push_hints(&mut out, hints(v));
        return out;
    }
    let s = &v["status"];
    out.push_str(&format!(
        "node {} ({})  overlay {}  seen by hub as {}\n",
        s["name"].as_str().unwrap_or(""),
        s["key"].as_str().unwrap_or(""),
        joined(&s["overlay"]),
        match s["observed"].as_str() {
            Some(o) if o.starts_with("[100::") => "a TCP/TLS stream (fallback)",
            Some(o) => o,
            None => "-",
        }
    ));
    if s["routes"].as_array().is_some_and(|r| !r.is_empty()) {
        out.push_str(&format!("routes for {}\n", joined(&s["routes"])));
    }
    for h in s["hubs"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "hub  {:<22} {}  rtt {}  last ack {}{}\n",
            h["addr"].as_str().unwrap_or(""),
            h["state"].as_str().unwrap_or(""),
            opt_ms(&h["rtt_ms"]),
            h["last_ack_s"]
                .as_f64()
                .map(|x| format!("{x:.1}s ago"))
                .unwrap_or_else(|| "never".into()),
            h["via"]
                .as_str()
                .map(|v| format!("  via {v}"))
                .unwrap_or_default()
        ));
    }
    out.push_str(&format!(
        "{:<14} {:<16} {:<22} {:<10} {:<7} {:>9} {:>6} {:>9} {:>9} {:>7} {:>8}  {}\n",
        "PEER",
        "OVERLAY",
        "ENDPOINT",
        "STATE",
        "PATH",
        "RTT",
        "LOSS",
        "TX",
        "RX",
        "RETX",
        "LAST HB",
        "WHY THIS PATH"
    ));
    for p in s["peers"].as_array().into_iter().flatten() {
        let ov = p["overlay"][0].as_str().unwrap_or("");
        out.push_str(&format!(
            "{:<14} {:<16} {:<22} {:<10} {:<7} {:>9} {:>5.1}% {:>9} {:>9} {:>7} {:>8}  {}\n",
            p["name"].as_str().unwrap_or(""),
            ov,
            p["endpoint"].as_str().unwrap_or("-"),
            p["state"].as_str().unwrap_or(""),
            p["path"].as_str().unwrap_or(""),
            opt_ms(&p["rtt_ms"]),
            p["loss_pct"].as_f64().unwrap_or(0.0),
            fmt_bytes(p["tx_bytes"].as_u64().unwrap_or(0)),
            fmt_bytes(p["rx_bytes"].as_u64().unwrap_or(0)),
            p["retransmits"].as_u64().unwrap_or(0),
            p["last_heartbeat_s"]
                .as_f64()
                .map(|x| format!("{x:.1}s"))
                .unwrap_or_else(|| "-".into()),
            p["path_reason"].as_str().unwrap_or("")
        ));
    }
    for p in s["peers"].as_array().into_iter().flatten() {
        if p["routes"].as_array().is_some_and(|r| !r.is_empty()) {
            out.push_str(&format!(
                "route {} via {}\n",
                joined(&p["routes"]),
                p["name"].as_str().unwrap_or("")
            ));
        }
    }
    let drops: Vec<String> = s["counters"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, v)| k.starts_with("drop_") && v.as_u64().unwrap_or(0) > 0)
        .map(|(k, v)| format!("{}={}", &k[5..], v))
        .collect();
    if !drops.is_empty() {
        out.push_str(&format!("drops: {}\n", drops.join(" ")));
    }
    push_hints(&mut out, hints(v));
    out
}

fn push_hints(out: &mut String, h: Vec<String>) {
    if !h.is_empty() {
        out.push_str("\nwhat to do:\n");
        for x in h {
            out.push_str(&format!("  * {x}\n"));
        }
    }
}

/// For each unusual state in a status document, what to do about it.
/// The stream fallback's counters for `status --json`.
pub fn streams_json(s: &transport::stream::StreamStats) -> Value {
    serde_json::json!({
        "open": s.open,
        "accepted": s.accepted,
        "refused": s.refused,
        "frames_rx": s.frames_rx,
        "frames_tx": s.frames_tx,
        "dropped": s.dropped,
        "fallbacks": s.fallbacks,
        "returns": s.returns,
        "dial_failed": s.dial_failed,
    })
}

/// The many-port punching counters for `status --json`.
pub fn punch_json(s: &transport::spray::SprayStats) -> Value {
    serde_json::json!({
        "opened": s.opened,
        "sprayed": s.sprayed,
        "met": s.met,
        "answered": s.answered,
        "kept": s.kept,
    })
}

/// Mark each hub of a peer's status that is reached by a stream (TCP or TLS
/// fallback): `"via": "tcp://ADDR"`.
pub fn add_hub_streams(v: &mut Value, links: &[(std::net::SocketAddr, Option<String>)]) {
    for h in v["status"]["hubs"].as_array_mut().into_iter().flatten() {
        let via = links
            .iter()
            .find(|(a, _)| h["addr"].as_str() == Some(&a.to_string()))
            .and_then(|(_, via)| via.clone());
        if let Some(via) = via {
            h["via"] = Value::String(via);
        }
    }
}

pub fn hints(v: &Value) -> Vec<String> {
    let s = &v["status"];
    let mut out = Vec::new();
    let count = |name: &str| s["counters"][name].as_u64().unwrap_or(0);
    let drop_hints = [
        ("drop_auth_failed", "frames that failed authentication arrive: a node with another network key, or traffic that is not fastmesh's, reaches this port; check that every node uses the same --network-key"),
        ("drop_bad_source", "a peer sent packets from an address it does not own: check that peer's --address, and that it routes only its own traffic into the mesh"),
        ("drop_no_route", "packets for overlay addresses no peer owns were dropped: check the destination, and that the peer owning it is online (fastmesh status on the hub)"),
        ("drop_unknown_key", "frames from keys this node does not know arrive: a revoked node, or one not yet in the map, keeps sending"),
        ("drop_session_cap", "the session limit was reached: more nodes try to connect than this node admits"),
        ("drop_tun_write", "packets could not be written to the TUN device: the system is overloaded or the device was removed"),
    ];
    for (name, hint) in drop_hints {
        let n = count(name);
        if n > 0 {
            out.push(format!("{} ({n}): {hint}", &name[5..]));
        }
    }
    if v["kind"] == "hub" {
        if s["members"].as_array().is_some_and(|m| m.is_empty()) {
            out.push("no members online: peers join with --hub PUBKEY@ADDR:PORT of this hub (fastmesh pubkey HUBKEY prints the key); check that its UDP port is reachable".into());
        }
        if s["relay_dropped"].as_u64().unwrap_or(0) > 0 {
            out.push("relay messages were dropped (destination unknown or not ready, or its queue full): normal while members join or leave; if it grows, check the members' connectivity".into());
        }
        return out;
    }
    for h in s["hubs"].as_array().into_iter().flatten() {
        let addr = h["addr"].as_str().unwrap_or("");
        let state = h["state"].as_str().unwrap_or("");
        if let Some(via) = h["via"].as_str() {
            out.push(format!("hub {addr} is reached by {via}: UDP to it goes unanswered (blocked or throttled on the way); fastmesh keeps trying UDP and returns to it when it passes, meanwhile peers are reached through the hub's relay"));
        }
        if state.starts_with("connecting") {
            out.push(format!("hub {addr} does not answer: check that UDP to {addr} passes (firewall, the hub's --listen address), that the hub runs, and that its public key in --hub is right; direct paths to known peers keep working meanwhile"));
        } else if let Some(why) = state.strip_prefix("refused: ") {
            out.push(format!("hub {addr} refused this node ({why}): a revoked key or one not on the hub's --allow list needs the hub operator; an address owned by another key needs another --address"));
        }
    }
    for p in s["peers"].as_array().into_iter().flatten() {
        let name = p["name"].as_str().unwrap_or("");
        match p["state"].as_str().unwrap_or("") {
            "up" => {}
            "connecting" => out.push(format!("peer {name}: no session yet: its UDP port must be reachable from here directly or through a hub that relays (hubs relay unless started with --no-relay)")),
            other => out.push(format!("peer {name} is {other}: nothing arrived from it lately; it may be down, or the path between you is cut (the session retries by itself)")),
        }
        if p["path"] == "relay" {
            out.push(format!("peer {name} is reached through a hub's relay ({}): a direct path is faster; open UDP between the two peers or see docs/nat.md", p["path_reason"].as_str().unwrap_or("")));
        }
        let loss = p["loss_pct"].as_f64().unwrap_or(0.0);
        if loss >= 5.0 {
            out.push(format!("peer {name}: the path loses {loss:.0}% of frames; fastmesh repairs it, but the link itself is poor"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_status_has_no_hints_and_each_unusual_state_gets_one() {
        let ok = serde_json::json!({"kind": "peer", "status": {
            "hubs": [{"addr": "1.2.3.4:4800", "state": "registered"}],
            "peers": [{"name": "b", "state": "up", "path": "direct", "loss_pct": 0.0}],
            "counters": {"drop_auth_failed": 0, "udp_rx": 10}
        }});
        assert!(hints(&ok).is_empty());
        assert!(!table(&ok).contains("what to do"));
        let bad = serde_json::json!({"kind": "peer", "status": {
            "hubs": [{"addr": "1.2.3.4:4800", "state": "connecting (attempt 3)"},
                     {"addr": "5.6.7.8:4800", "state": "refused: revoked"}],
            "peers": [{"name": "b", "state": "connecting", "path": "-", "loss_pct": 0.0},
                      {"name": "c", "state": "up", "path": "relay", "path_reason": "no direct candidate answered", "loss_pct": 12.0}],
            "counters": {"drop_auth_failed": 4, "drop_bad_source": 1}
        }});
        let h = hints(&bad);
        for want in [
            "hub 1.2.3.4:4800 does not answer",
            "hub 5.6.7.8:4800 refused this node (revoked)",
            "peer b: no session yet",
            "peer c is reached through a hub's relay",
            "peer c: the path loses 12%",
            "auth_failed (4)",
            "bad_source (1)",
        ] {
            assert!(h.iter().any(|x| x.contains(want)), "{want}: {h:#?}");
        }
        assert!(table(&bad).contains("what to do:"));
        let hub = serde_json::json!({"kind": "hub", "status": {"members": [], "relay_dropped": 0, "counters": {}}});
        assert!(hints(&hub)[0].starts_with("no members online"));
    }
}
