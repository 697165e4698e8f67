//! One actor per remote peer: its record from the hub, its path state, and its
//! statistics over time (rates, loss, RTT), fed by samples of the data plane's
//! counters. The session's packets never pass through here.

use crate::dataplane::PeerSnapshot;
use crate::registry::short_key;
use actix::prelude::*;
use serde::Serialize;
use std::time::Duration;
use transport::path::Via;
use transport::wire::PeerInfo;

/// State of the path to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PathState {
    /// No session yet (handshaking).
    Connecting,
    /// Session up, traffic or heartbeats arriving.
    Up,
    /// Nothing arrived for the dead-link time.
    Dead,
}

/// What `status` shows for one peer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeerStatus {
    /// Display name.
    pub name: String,
    /// Key (short hex).
    pub key: String,
    /// Overlay addresses.
    pub overlay: Vec<String>,
    /// Subnets the peer routes for.
    pub routes: Vec<String>,
    /// Endpoint in use.
    pub endpoint: Option<String>,
    /// Path state.
    pub state: PathState,
    /// How packets get there: "direct", "relay" (through a hub), or "-".
    pub path: String,
    /// The hub relaying, when relayed (short key).
    pub relay: Option<String>,
    /// Why this path (e.g. "no direct candidate answered for 12 s").
    pub path_reason: String,
    /// Heartbeat / ping round-trip time in milliseconds.
    pub rtt_ms: Option<f64>,
    /// Path loss estimate (percent).
    pub loss_pct: f64,
    /// Bytes sent to / received from the peer (UDP payload).
    pub tx_bytes: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Inner packets each way.
    pub tx_packets: u64,
    /// Inner packets received.
    pub rx_packets: u64,
    /// Send rate over the last sample interval (bit/s).
    pub tx_bps: f64,
    /// Receive rate (bit/s).
    pub rx_bps: f64,
    /// Seconds since the last heartbeat ack, if any.
    pub last_heartbeat_s: Option<f64>,
    /// KCP data segments retransmitted to this peer.
    pub retransmits: u64,
    /// Times traffic moved to another path.
    pub path_changes: u64,
    /// KCP data frames sent in FEC groups, parity frames sent, and frames
    /// rebuilt from parity on receipt.
    pub fec_data: u64,
    /// Parity frames sent.
    pub fec_parity: u64,
    /// Frames from this peer rebuilt from parity.
    pub fec_recovered: u64,
    /// Split TCP connections opened to this peer.
    pub streams_opened: u64,
    /// Bytes of split TCP data sent to this peer.
    pub stream_tx_bytes: u64,
    /// Largest frame (UDP payload bytes) the path is known to carry.
    pub path_mtu: usize,
    /// Whether the path MTU search has settled.
    pub pmtu_settled: bool,
    /// Path MTU probes sent.
    pub pmtu_probes: u64,
    /// Times the frame size in use stopped working (the path narrowed).
    pub pmtu_black_holes: u64,
    /// The path's capacity measured before the first transfer, Mbit/s of
    /// frames (0: not measured; see `proto::session` `train`).
    pub capacity_mbit: f64,
    /// ICMP "too big" messages sent to local senders.
    pub too_big_sent: u64,
    /// Inner TCP SYNs whose MSS was lowered to fit the path.
    pub mss_clamped: u64,
    /// Times the session was restarted by the supervisor.
    pub restarts: u64,
    /// Open KCP conversations.
    pub convs: usize,
}

/// A fresh sample of the peer's counters.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Sample {
    /// Data-plane view of the session.
    pub snap: PeerSnapshot,
    /// When it was taken.
    pub at: Duration,
    /// Heartbeat RTT and last ack from the supervisor.
    pub hb_rtt: Option<Duration>,
    /// When the last heartbeat ack came.
    pub last_ack: Option<Duration>,
}

/// The hub changed the peer's record.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Update(pub PeerInfo);

/// Ask for the status line.
#[derive(Debug, Message)]
#[rtype(result = "PeerStatus")]
pub struct GetStatus;

/// The per-peer actor.
pub struct PeerActor {
    info: PeerInfo,
    restarts: u64,
    last: Option<Sample>,
    tx_bps: f64,
    rx_bps: f64,
}

impl PeerActor {
    /// An actor for `info`; `restarts` carries over from a failed predecessor.
    pub fn new(info: PeerInfo, restarts: u64) -> PeerActor {
        PeerActor {
            info,
            restarts,
            last: None,
            tx_bps: 0.0,
            rx_bps: 0.0,
        }
    }

    fn status(&self) -> PeerStatus {
        let s = self.last.as_ref();
        let st = s.map(|s| &s.snap.stats);
        let state = match s {
            Some(s) if s.snap.dead => PathState::Dead,
            Some(s) if s.snap.established => PathState::Up,
            _ => PathState::Connecting,
        };
        let rtt = s
            .and_then(|s| s.snap.stats.srtt.or(s.hb_rtt))
            .map(|d| d.as_secs_f64() * 1e3);
        PeerStatus {
            name: self.info.name.clone(),
            key: short_key(&self.info.key),
            overlay: self
                .info
                .overlay
                .iter()
                .map(|n| n.addr.to_string())
                .collect(),
            routes: self.info.routes.iter().map(|n| n.to_string()).collect(),
            endpoint: s
                .and_then(|s| s.snap.endpoint)
                .or(self.info.endpoints.first().copied())
                .map(|e| e.to_string()),
            state,
            path: match s.and_then(|s| s.snap.path) {
                Some(Via::Direct(_)) => "direct".into(),
                Some(Via::Relay(_)) => "relay".into(),
                None => "-".into(),
            },
            relay: match s.and_then(|s| s.snap.path) {
                Some(Via::Relay(h)) => Some(short_key(&h)),
                _ => None,
            },
            path_reason: s.map(|s| s.snap.path_reason.clone()).unwrap_or_default(),
            rtt_ms: rtt,
            loss_pct: st.map_or(0.0, |s| s.loss * 100.0),
            tx_bytes: st.map_or(0, |s| s.tx_bytes),
            rx_bytes: st.map_or(0, |s| s.rx_bytes),
            tx_packets: st.map_or(0, |s| s.ip_tx),
            rx_packets: st.map_or(0, |s| s.ip_rx),
            tx_bps: self.tx_bps,
            rx_bps: self.rx_bps,
            last_heartbeat_s: s
                .and_then(|s| s.last_ack.map(|a| s.at.saturating_sub(a).as_secs_f64())),
            retransmits: st.map_or(0, |s| s.retransmits),
            path_changes: st.map_or(0, |s| s.path_changes),
            fec_data: st.map_or(0, |s| s.fec_data),
            fec_parity: st.map_or(0, |s| s.fec_parity),
            fec_recovered: st.map_or(0, |s| s.fec_recovered),
            streams_opened: st.map_or(0, |s| s.streams_opened),
            stream_tx_bytes: st.map_or(0, |s| s.stream_tx_bytes),
            path_mtu: st.map_or(0, |s| s.pmtu),
            pmtu_settled: st.is_some_and(|s| s.pmtu_settled),
            pmtu_probes: st.map_or(0, |s| s.pmtu_probes),
            pmtu_black_holes: st.map_or(0, |s| s.pmtu_black_holes),
            capacity_mbit: st.map_or(0.0, |s| s.capacity * 8.0 / 1e6),
            too_big_sent: st.map_or(0, |s| s.too_big_sent),
            mss_clamped: st.map_or(0, |s| s.mss_clamped),
            restarts: self.restarts,
            convs: st.map_or(0, |s| s.convs),
        }
    }
}

impl Actor for PeerActor {
    type Context = Context<Self>;
}

impl Handler<Sample> for PeerActor {
    type Result = ();
    fn handle(&mut self, s: Sample, _ctx: &mut Context<Self>) {
        if let Some(prev) = &self.last {
            let dt = s.at.saturating_sub(prev.at).as_secs_f64();
            if dt > 0.0 {
                let d = |a: u64, b: u64| a.saturating_sub(b) as f64 * 8.0 / dt;
                self.tx_bps = d(s.snap.stats.tx_bytes, prev.snap.stats.tx_bytes);
                self.rx_bps = d(s.snap.stats.rx_bytes, prev.snap.stats.rx_bytes);
            }
        }
        self.last = Some(s);
    }
}

impl Handler<Update> for PeerActor {
    type Result = ();
    fn handle(&mut self, u: Update, _ctx: &mut Context<Self>) {
        self.info = u.0;
    }
}

impl Handler<GetStatus> for PeerActor {
    type Result = MessageResult<GetStatus>;
    fn handle(&mut self, _: GetStatus, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(self.status())
    }
}
