//! Prometheus metrics (`--metrics ADDR`): on each scrape of `/metrics` the
//! node's status (the same document `fastmesh status --json` prints) is
//! turned into metric families with prometheus-client and encoded in the
//! Prometheus text format (0.0.4, what Prometheus and promtool parse). Off
//! unless an address is given.

use anyhow::{Context, Result};
use fastmesh_actors::hub::HubStatus;
use fastmesh_actors::supervisor::NodeStatus;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::prometheus_text::{encode, CONTENT_TYPE};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use transport::stream::StreamStats;

type GaugeF = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
    key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabels {
    peer: String,
    key: String,
    path: String,
    relay: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HubLabels {
    hub: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

fn counter(v: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(v);
    c
}

fn gauge(v: i64) -> Gauge {
    let g = Gauge::default();
    g.set(v);
    g
}

/// The data plane's counters (`status --json`'s `counters`): drops as one
/// family by reason, the rest a counter each.
fn plane_counters(r: &mut Registry, counters: &BTreeMap<String, u64>) {
    let drops = Family::<ReasonLabels, Counter>::default();
    for (name, &v) in counters {
        if let Some(reason) = name.strip_prefix("drop_") {
            drops
                .get_or_create(&ReasonLabels {
                    reason: reason.to_string(),
                })
                .inc_by(v);
        } else if name == "split_active" {
            r.register(
                "fastmesh_split_active_connections",
                "Split TCP connections open now",
                gauge(v as i64),
            );
        } else if name == "held_bytes" {
            r.register_with_unit(
                "fastmesh_held",
                "Bytes held for others now (relayed frames waiting, unacknowledged control messages), against the memory budget",
                Unit::Bytes,
                gauge(v as i64),
            );
        } else if name == "relayed_bytes" {
            r.register_with_unit(
                "fastmesh_relayed",
                "Bytes of frames relayed between members",
                Unit::Bytes,
                counter(v),
            );
        } else {
            r.register(
                format!("fastmesh_{name}"),
                format!("Data-plane counter {name} (as in status --json)"),
                counter(v),
            );
        }
    }
    r.register(
        "fastmesh_dropped_packets",
        "Packets and frames dropped, by reason",
        drops,
    );
}

/// The stream fallback's counters (TCP and TLS to hubs).
fn stream_metrics(r: &mut Registry, s: &StreamStats) {
    r.register(
        "fastmesh_stream_open",
        "Stream (TCP or TLS fallback) connections open now",
        gauge(s.open as i64),
    );
    for (name, help, v) in [
        ("accepted", "Stream connections a hub accepted", s.accepted),
        (
            "refused",
            "Stream connections refused (limit, failed TLS handshake)",
            s.refused,
        ),
        ("frames_received", "Frames read from streams", s.frames_rx),
        ("frames_sent", "Frames queued to streams", s.frames_tx),
        (
            "dropped",
            "Frames dropped at a full stream queue or for a closed stream",
            s.dropped,
        ),
        (
            "fallbacks",
            "Times a hub was reached by a stream because UDP went unanswered",
            s.fallbacks,
        ),
        (
            "returns",
            "Times a hub was reached by UDP again after a stream",
            s.returns,
        ),
        ("dial_failed", "Stream dials that failed", s.dial_failed),
    ] {
        r.register(format!("fastmesh_stream_{name}"), help, counter(v));
    }
}

/// Metrics of a peer.
pub fn peer_text(st: &NodeStatus, streams: &StreamStats) -> String {
    let mut r = Registry::default();
    stream_metrics(&mut r, streams);
    let labels = |name: &str, key: &str| PeerLabels {
        peer: name.to_string(),
        key: key.to_string(),
    };
    let rtt = Family::<PeerLabels, GaugeF>::default();
    let loss = Family::<PeerLabels, GaugeF>::default();
    let up = Family::<PeerLabels, Gauge>::default();
    let path = Family::<PathLabels, Gauge>::default();
    let tx_bytes = Family::<PeerLabels, Counter>::default();
    let rx_bytes = Family::<PeerLabels, Counter>::default();
    let tx_packets = Family::<PeerLabels, Counter>::default();
    let rx_packets = Family::<PeerLabels, Counter>::default();
    let retx = Family::<PeerLabels, Counter>::default();
    let changes = Family::<PeerLabels, Counter>::default();
    let restarts = Family::<PeerLabels, Counter>::default();
    let parity = Family::<PeerLabels, Counter>::default();
    let recovered = Family::<PeerLabels, Counter>::default();
    let streams = Family::<PeerLabels, Counter>::default();
    let pmtu = Family::<PeerLabels, Gauge>::default();
    let convs = Family::<PeerLabels, Gauge>::default();
    for p in &st.peers {
        let l = labels(&p.name, &p.key);
        if let Some(ms) = p.rtt_ms {
            rtt.get_or_create(&l).set(ms / 1e3);
        }
        loss.get_or_create(&l).set(p.loss_pct / 100.0);
        up.get_or_create(&l)
            .set(i64::from(p.state == fastmesh_actors::peer::PathState::Up));
        path.get_or_create(&PathLabels {
            peer: p.name.clone(),
            key: p.key.clone(),
            path: p.path.clone(),
            relay: p.relay.clone().unwrap_or_default(),
        })
        .set(1);
        tx_bytes.get_or_create(&l).inc_by(p.tx_bytes);
        rx_bytes.get_or_create(&l).inc_by(p.rx_bytes);
        tx_packets.get_or_create(&l).inc_by(p.tx_packets);
        rx_packets.get_or_create(&l).inc_by(p.rx_packets);
        retx.get_or_create(&l).inc_by(p.retransmits);
        changes.get_or_create(&l).inc_by(p.path_changes);
        restarts.get_or_create(&l).inc_by(p.restarts);
        parity.get_or_create(&l).inc_by(p.fec_parity);
        recovered.get_or_create(&l).inc_by(p.fec_recovered);
        streams.get_or_create(&l).inc_by(p.streams_opened);
        pmtu.get_or_create(&l).set(p.path_mtu as i64);
        convs.get_or_create(&l).set(p.convs as i64);
    }
    r.register_with_unit(
        "fastmesh_peer_rtt",
        "Round-trip time to the peer (pings)",
        Unit::Seconds,
        rtt,
    );
    r.register(
        "fastmesh_peer_loss_ratio",
        "Path loss estimate to the peer (0-1)",
        loss,
    );
    r.register("fastmesh_peer_up", "1 if the path to the peer is up", up);
    r.register(
        "fastmesh_peer_path",
        "The path in use to the peer (direct, relay or -), 1 per peer",
        path,
    );
    r.register_with_unit(
        "fastmesh_peer_sent",
        "UDP payload bytes sent to the peer",
        Unit::Bytes,
        tx_bytes,
    );
    r.register_with_unit(
        "fastmesh_peer_received",
        "UDP payload bytes received from the peer",
        Unit::Bytes,
        rx_bytes,
    );
    r.register(
        "fastmesh_peer_sent_packets",
        "Inner packets sent to the peer",
        tx_packets,
    );
    r.register(
        "fastmesh_peer_received_packets",
        "Inner packets received from the peer",
        rx_packets,
    );
    r.register(
        "fastmesh_peer_retransmits",
        "KCP data segments retransmitted to the peer",
        retx,
    );
    r.register(
        "fastmesh_peer_path_changes",
        "Times traffic to the peer moved to another path",
        changes,
    );
    r.register(
        "fastmesh_peer_session_restarts",
        "Times the session with the peer was restarted",
        restarts,
    );
    r.register(
        "fastmesh_peer_fec_parity_frames",
        "FEC parity frames sent to the peer",
        parity,
    );
    r.register(
        "fastmesh_peer_fec_recovered_frames",
        "Frames from the peer rebuilt from parity",
        recovered,
    );
    r.register(
        "fastmesh_peer_split_connections_opened",
        "Split TCP connections opened to the peer",
        streams,
    );
    r.register_with_unit(
        "fastmesh_peer_path_mtu",
        "Largest frame the path to the peer carries (UDP payload)",
        Unit::Bytes,
        pmtu,
    );
    r.register(
        "fastmesh_peer_conversations",
        "Open KCP conversations with the peer",
        convs,
    );
    let hub_rtt = Family::<HubLabels, GaugeF>::default();
    let hub_up = Family::<HubLabels, Gauge>::default();
    let hub_regs = Family::<HubLabels, Counter>::default();
    for h in &st.hubs {
        let l = HubLabels {
            hub: h.addr.clone(),
        };
        if let Some(ms) = h.rtt_ms {
            hub_rtt.get_or_create(&l).set(ms / 1e3);
        }
        hub_up
            .get_or_create(&l)
            .set(i64::from(h.state == "registered"));
        hub_regs.get_or_create(&l).inc_by(h.registrations);
    }
    r.register_with_unit(
        "fastmesh_hub_rtt",
        "Heartbeat round-trip time to the hub",
        Unit::Seconds,
        hub_rtt,
    );
    r.register(
        "fastmesh_hub_registered",
        "1 if this node is registered with the hub",
        hub_up,
    );
    r.register(
        "fastmesh_hub_registrations",
        "Registrations with the hub so far",
        hub_regs,
    );
    r.register(
        "fastmesh_peers",
        "Peers in this node's map",
        gauge(st.peers.len() as i64),
    );
    r.register(
        "fastmesh_map_version",
        "Version of the peer map this node holds",
        gauge(st.map_version as i64),
    );
    plane_counters(&mut r, &st.counters);
    render(&r)
}

/// Metrics of a hub.
pub fn hub_text(st: &HubStatus, streams: &StreamStats) -> String {
    let mut r = Registry::default();
    stream_metrics(&mut r, streams);
    r.register(
        "fastmesh_hub_members",
        "Members online",
        gauge(st.members.len() as i64),
    );
    r.register(
        "fastmesh_hub_map_version",
        "Version of the peer map",
        gauge(st.map_version as i64),
    );
    r.register(
        "fastmesh_hub_owned_addresses",
        "Overlay addresses owned by a key (online or not)",
        gauge(st.owned_addresses as i64),
    );
    r.register(
        "fastmesh_hub_revoked_keys",
        "Keys revoked",
        gauge(st.revoked as i64),
    );
    r.register(
        "fastmesh_hub_registrations_accepted",
        "Registrations accepted since the hub started",
        counter(st.registrations),
    );
    let refused = Family::<ReasonLabels, Counter>::default();
    for (reason, &n) in &st.refusals {
        refused
            .get_or_create(&ReasonLabels {
                reason: reason.clone(),
            })
            .inc_by(n);
    }
    r.register(
        "fastmesh_hub_registrations_refused",
        "Registrations refused since the hub started, by reason",
        refused,
    );
    r.register(
        "fastmesh_hub_relay_dropped",
        "Relay messages dropped (unknown or unready destination, full queue)",
        counter(st.relay_dropped),
    );
    let seen = Family::<PeerLabels, GaugeF>::default();
    for m in &st.members {
        seen.get_or_create(&PeerLabels {
            peer: m.name.clone(),
            key: m.key.clone(),
        })
        .set(m.last_seen_s);
    }
    r.register_with_unit(
        "fastmesh_hub_member_last_seen",
        "Time since the member was last heard",
        Unit::Seconds,
        seen,
    );
    plane_counters(&mut r, &st.counters);
    render(&r)
}

fn render(r: &Registry) -> String {
    let mut s = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut s, r);
    s
}

/// Bind the metrics listener (before the node starts, so a taken address
/// is a clear error at startup).
pub fn bind(addr: &str) -> Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot listen for metrics on {addr}"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Serve `GET /metrics` with what `text` renders; anything else gets 404
/// or 405. Runs on the current (actix) thread.
pub async fn serve<F, Fut>(l: std::net::TcpListener, text: F)
where
    F: Fn() -> Fut + Clone + 'static,
    Fut: Future<Output = String> + 'static,
{
    let Ok(l) = tokio::net::TcpListener::from_std(l) else {
        tracing::warn!("metrics listener unusable");
        return;
    };
    loop {
        let Ok((stream, _)) = l.accept().await else {
            continue;
        };
        let text = text.clone();
        actix::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let text = text.clone();
                async move { Ok::<_, Infallible>(answer(req, text).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            // A client that holds the connection open is cut after 30 s.
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
}

async fn answer<F, Fut>(req: Request<Incoming>, text: F) -> Response<Full<Bytes>>
where
    F: Fn() -> Fut,
    Fut: Future<Output = String>,
{
    let reply = |code: StatusCode, body: String, kind: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = code;
        if let Ok(v) = kind.parse() {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => reply(StatusCode::OK, text().await, CONTENT_TYPE),
        (_, "/metrics") => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET\n".into(),
            "text/plain",
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "metrics are at /metrics\n".into(),
            "text/plain",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plane_counters_become_named_counters_and_drops_one_family() {
        let mut r = Registry::default();
        let c = BTreeMap::from([
            ("udp_rx".to_string(), 7u64),
            ("drop_auth_failed".to_string(), 3),
            ("drop_replayed".to_string(), 2),
            ("split_active".to_string(), 4),
            ("relayed_bytes".to_string(), 1000),
        ]);
        plane_counters(&mut r, &c);
        let t = render(&r);
        assert!(t.contains("# TYPE fastmesh_udp_rx_total counter"), "{t}");
        assert!(t.contains("fastmesh_udp_rx_total 7"), "{t}");
        assert!(
            t.contains("fastmesh_dropped_packets_total{reason=\"auth_failed\"} 3"),
            "{t}"
        );
        assert!(
            t.contains("fastmesh_dropped_packets_total{reason=\"replayed\"} 2"),
            "{t}"
        );
        assert!(t.contains("fastmesh_split_active_connections 4"), "{t}");
        assert!(t.contains("fastmesh_relayed_bytes_total 1000"), "{t}");
        assert!(t.contains("# HELP fastmesh_udp_rx_total "), "{t}");
    }
}
