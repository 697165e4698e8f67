//! `fastmesh netcheck`: what the node's hubs say about its network - the
//! endpoint each hub sees it at, whether its NAT keeps one mapping for all
//! destinations, the round trip to each hub, and whether UDP to each works.

use anyhow::{bail, Result};
use serde_json::{json, Value};

/// A hub's answers count as UDP working while the last one is at most this
/// many heartbeats old (the default heartbeat is 5 s).
const FRESH_S: f64 = 15.0;

/// The report as JSON, from a peer's status document.
pub fn report(status: &Value) -> Result<Value> {
    if status["kind"] != "peer" {
        bail!("netcheck needs a peer's control socket (a hub has no hubs to ask)");
    }
    let s = &status["status"];
    let mut hubs = Vec::new();
    let mut ports = std::collections::BTreeSet::new();
    let mut ips = std::collections::BTreeSet::new();
    for h in s["hubs"].as_array().into_iter().flatten() {
        let state = h["state"].as_str().unwrap_or("");
        let last = h["last_ack_s"].as_f64();
        // A hub reached by the TCP or TLS fallback answers, but not by UDP.
        let via = h["via"].as_str();
        let works = state == "registered" && last.is_some_and(|t| t <= FRESH_S) && via.is_none();
        let observed = h["observed"].as_str().map(str::to_string);
        if works {
            if let Some(a) = observed
                .as_deref()
                .and_then(|o| o.parse::<std::net::SocketAddr>().ok())
            {
                ports.insert(a.port());
                ips.insert(a.ip());
            }
        }
        hubs.push(json!({
            "addr": h["addr"],
            "udp_works": works,
            "state": state,
            "rtt_ms": h["rtt_ms"],
            "last_ack_s": last,
            "observed": observed,
            "via": via,
        }));
    }
    let answering = hubs.iter().filter(|h| h["udp_works"] == true).count();
    let (same, nat) = match answering {
        0 => (Value::Null, "no hub answers: cannot tell".to_string()),
        1 => (
            Value::Null,
            "one hub answers: a second hub is needed to tell how the NAT maps".to_string(),
        ),
        _ if ports.len() == 1 && ips.len() == 1 => (
            json!(true),
            "one mapping for all destinations: every hub sees the same endpoint, so peers can punch a direct path to it".to_string(),
        ),
        _ => (
            json!(false),
            "a new mapping per destination (a \"symmetric\" NAT): hubs see different endpoints; direct paths form only with peers that are reachable themselves, the rest go through a hub's relay".to_string(),
        ),
    };
    Ok(json!({
        "node": s["name"],
        "hubs": hubs,
        "nat": {"same_mapping_for_all_destinations": same, "verdict": nat},
    }))
}

/// The report as text.
pub fn text(r: &Value) -> String {
    let mut out = format!("netcheck of {}\n", r["node"].as_str().unwrap_or(""));
    for h in r["hubs"].as_array().into_iter().flatten() {
        let addr = h["addr"].as_str().unwrap_or("");
        if h["udp_works"] == true {
            out.push_str(&format!(
                "hub {addr}: UDP works, rtt {}, sees this node at {}\n",
                h["rtt_ms"]
                    .as_f64()
                    .map_or("-".into(), |x| format!("{x:.1} ms")),
                h["observed"].as_str().unwrap_or("?")
            ));
        } else if let Some(via) = h["via"].as_str() {
            out.push_str(&format!(
                "hub {addr}: UDP unanswered, reached by {via} instead: UDP is blocked or throttled on the way\n"
            ));
        } else {
            out.push_str(&format!(
                "hub {addr}: no answer ({}): UDP to it may be blocked, or the hub is down\n",
                h["state"].as_str().unwrap_or("")
            ));
        }
    }
    out.push_str(&format!(
        "NAT: {}\n",
        r["nat"]["verdict"].as_str().unwrap_or("")
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(hubs: Value) -> Value {
        json!({"kind": "peer", "status": {"name": "a", "hubs": hubs}})
    }

    #[test]
    fn verdicts_follow_what_the_hubs_see() {
        let ok = |addr: &str, seen: &str| json!({"addr": addr, "state": "registered", "last_ack_s": 1.0, "rtt_ms": 20.0, "observed": seen});
        let same = report(&status(json!([
            ok("h1:4800", "9.9.9.9:40000"),
            ok("h2:4800", "9.9.9.9:40000")
        ])))
        .unwrap();
        assert_eq!(same["nat"]["same_mapping_for_all_destinations"], true);
        let diff = report(&status(json!([
            ok("h1:4800", "9.9.9.9:40000"),
            ok("h2:4800", "9.9.9.9:51234")
        ])))
        .unwrap();
        assert_eq!(diff["nat"]["same_mapping_for_all_destinations"], false);
        assert!(text(&diff).contains("symmetric"));
        let down = json!({"addr": "h2:4800", "state": "connecting (attempt 5)", "last_ack_s": null, "observed": null});
        let one = report(&status(json!([ok("h1:4800", "9.9.9.9:40000"), down]))).unwrap();
        assert!(one["nat"]["same_mapping_for_all_destinations"].is_null());
        assert_eq!(one["hubs"][1]["udp_works"], false);
        assert!(text(&one).contains("hub h2:4800: no answer"));
        // A hub answering only over the TCP fallback: UDP does not work.
        let mut tcp = ok("h2:4800", "[100::3]:4800");
        tcp["via"] = json!("tcp://h2:4800");
        let r = report(&status(json!([ok("h1:4800", "9.9.9.9:40000"), tcp]))).unwrap();
        assert_eq!(r["hubs"][1]["udp_works"], false);
        assert!(r["nat"]["same_mapping_for_all_destinations"].is_null());
        assert!(
            text(&r).contains("reached by tcp://h2:4800 instead"),
            "{}",
            text(&r)
        );
        assert!(report(&json!({"kind": "hub", "status": {}})).is_err());
    }
}
