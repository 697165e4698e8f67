//! A sans-IO session with one remote node: Noise handshake, AEAD data frames
//! with a replay window, and KCP conversations for reliable flows.
//!
//! Nothing here reads a clock or touches a socket. The owner ([`crate::node::Node`])
//! feeds inputs with the current time and polls outputs, in this order:
//!
//! 1. inputs: `send_ip`, `send_control*`, `on_init`, `on_resp`, `on_data`
//! 2. `handle_timeout(now)` whenever `poll_timeout()` has passed (it also flushes
//!    KCP conversations touched by the inputs, once per batch)
//! 3. `poll_transmit(now, buf)` until it returns `None`
//! 4. `poll_rx()` / `poll_event()` until empty
//!
//! Outbound, an inner TCP packet goes into the KCP conversation of its flow
//! (one conversation per 5-tuple, so a lost segment stalls only its own flow);
//! anything else goes out at once as an encrypted datagram. Packets for KCP wait
//! in their conversation's queue and enter KCP only as the pacer (at the rate the
//! [`RateControl`] allows) and the inflight cap permit, conversations taking
//! turns; KCP output carrying data (including retransmissions) is released by
//! the same pacer. Datagrams, acks and control frames are never queued behind it;
//! acks wait at most [`ACK_DELAY`] so that they share frames.

mod config;
pub mod fec;
pub mod frag;
mod keys;
mod mux;
mod pacing;
mod stream;
mod timers;
mod train;

#[cfg(test)]
mod tests;

pub use config::{FlowMode, KcpProfile, SessionConfig};
pub use keys::Ctx;
pub use stream::{is_stream, Refusal, StreamEvent, StreamMsg, STREAM_BIT};
pub use train::TRAIN_ID;

use crate::cc::{Pacer, RateControl, Report};
use crate::ip;
use crate::path::{PathConfig, Paths, Via};
use crate::pmtu::{self, Pmtu};
use crate::wire::{self, Control, Inner, PublicKey};
use keys::{Keypair, PendingInit};
use mux::{Conv, KcpSink};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Something the owner of a session should know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A handshake completed; traffic flows.
    Established,
    /// Nothing authenticated arrived for `dead_after`.
    DeadLink,
    /// Traffic arrived again after [`Event::DeadLink`].
    Recovered,
    /// The remote restarted (new incarnation); KCP conversations were reset.
    PeerRestarted,
    /// A control message for the layer above (registry, peer map, punching).
    Control(Control),
    /// No direct path answers: ask a hub to make both sides punch now.
    PunchWanted,
    /// The node dropped this session to make room for a newcomer (it had
    /// been silent for [`crate::node::EVICT_SILENT`] at the session cap).
    Evicted,
    /// A node we hold no session with completed the first half of a
    /// handshake (it has the network key) and was refused as unknown: the
    /// layer above may fetch its record and admit it (its handshake is
    /// retried). Raised at most once per
    /// [`crate::node::UNKNOWN_REPORT_EVERY`] per key.
    UnknownPeer,
}

/// Counters kept per session. Bytes are UDP payload bytes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SessionStats {
    /// Frames sent (all kinds).
    pub tx_frames: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Authenticated frames received.
    pub rx_frames: u64,
    /// Bytes of authenticated frames received.
    pub rx_bytes: u64,
    /// Inner IP packets handed in for sending.
    pub ip_tx: u64,
    /// Inner IP packets delivered.
    pub ip_rx: u64,
    /// Frames whose tag did not verify.
    pub auth_failed: u64,
    /// Frames dropped by the replay window.
    pub replayed: u64,
    /// Inner packets dropped: no session yet and the pending queue was full.
    pub pending_dropped: u64,
    /// Inner packets dropped: a conversation's backlog was full.
    pub backlog_dropped: u64,
    /// Inner packets dropped: too large or not IP.
    pub malformed: u64,
    /// KCP conversations currently open.
    pub convs: usize,
    /// Handshakes completed.
    pub handshakes: u64,
    /// Latest smoothed RTT from pings.
    pub srtt: Option<Duration>,
    /// Path loss estimated by the controller (0..1).
    pub loss: f64,
    /// KCP data segments sent again (retransmissions).
    pub retransmits: u64,
    /// Times traffic moved to another path (direct endpoint or relay).
    pub path_changes: u64,
    /// KCP data frames sent inside a forward-error-correction group.
    pub fec_data: u64,
    /// Parity frames sent.
    pub fec_parity: u64,
    /// KCP frames rebuilt from parity instead of waiting for a retransmission.
    pub fec_recovered: u64,
    /// Ack-only KCP frames sent a second time (lossy path).
    pub ack_copies: u64,
    /// Frames carrying a conversation's first segment sent a second time.
    pub open_copies: u64,
    /// Stream conversations this side opened (split TCP connections).
    pub streams_opened: u64,
    /// Bytes of split TCP data queued for the remote.
    pub stream_tx_bytes: u64,
    /// Largest frame (UDP payload) the current path is known to carry.
    pub pmtu: usize,
    /// Whether the path MTU search has settled.
    pub pmtu_settled: bool,
    /// Path MTU probes sent.
    pub pmtu_probes: u64,
    /// Times the frame size in use stopped working (a path narrowed).
    pub pmtu_black_holes: u64,
    /// Times a direct path could not carry even base-size frames.
    pub pmtu_base_fails: u64,
    /// The path's capacity measured before the first transfer (bytes/s of
    /// frames; 0 if not measured), see `session::train`.
    pub capacity: f64,
    /// Probes sent in capacity trains.
    pub capacity_probes: u64,
    /// ICMP "too big" messages sent to inner senders.
    pub too_big_sent: u64,
    /// Inner TCP SYNs whose MSS was lowered to fit the path.
    pub mss_clamped: u64,
    /// Plaintexts sent in fragments (larger than the path carries).
    pub frag_tx: u64,
    /// Plaintexts joined from fragments.
    pub frag_rx: u64,
    /// Fragments refused (malformed) or incomplete plaintexts evicted.
    pub frag_dropped: u64,
    /// Control messages not sent because they encode larger than
    /// [`wire::CONTROL_CAP`] (a bug if ever non-zero: senders split).
    pub control_too_large: u64,
    /// Reliable control messages refused: the control conversation held
    /// [`CONTROL_BACKLOG`] segments (a remote that does not acknowledge).
    pub control_backlog_dropped: u64,
}

enum Out {
    /// A finished frame (handshake messages) for one path.
    RawTo(Via, Vec<u8>),
    /// Plaintext starting with its inner-type byte, sealed at send time.
    Plain(Vec<u8>),
    /// Plaintext for one path (probes and their answers).
    PlainTo(Via, Vec<u8>),
    /// A path MTU probe for one path: sent with the don't-fragment bit.
    ProbeTo(Via, Vec<u8>),
    /// A fragment of a plaintext too large for the path, for one path.
    FragTo(Via, Vec<u8>),
    /// A relay message held for the node (counted in `relay_bytes`).
    Relayed(Vec<u8>),
}

/// Relayed frames a session holds for the node before they are dropped.
const MAX_RELAYED: usize = 1024;

/// While no direct path answers, how often to ask the hubs to coordinate a punch.
pub const PUNCH_REQUEST_EVERY: Duration = Duration::from_secs(10);

/// Conversation id of the reliable control channel.
pub const CONV_CONTROL: u32 = 0;
/// KCP window of the control conversation, in segments: what one session
/// keeps in flight, and so what it sends again at each timeout while no
/// acknowledgement comes back. At 128, a hub pushing maps to a thousand
/// members at once had up to 128,000 segments in flight; its own receive
/// buffer overflowed with the members' acknowledgements, and it resent them
/// all at every timeout (joins of 80-220 s in 6 runs of 21). At 16 a
/// thousand-record map (~90 segments) takes about six round trips.
pub const CONTROL_WND: u16 = 16;
/// Most segments the control conversation holds unsent or unacknowledged;
/// reliable control messages beyond are refused and counted (a hub's
/// members resynchronise their maps from the version they report).
pub const CONTROL_BACKLOG: usize = 1024;
/// Conversation id shared by non-TCP traffic in all-KCP mode and by flows past the limit.
pub const CONV_SHARED: u32 = 1;
const TOMBSTONES: usize = 1024;
/// Longest an ack waits so that acks for a burst of segments share one frame.
pub const ACK_DELAY: Duration = Duration::from_millis(4);

/// How long a direct path that cannot carry base-size frames counts as
/// losing all data.
pub const NARROW_PATH_HOLD: Duration = Duration::from_secs(60);

/// How long after the last data frame control frames are still reported.
const REPORT_CONTROL_FOR: Duration = Duration::from_secs(1);

/// Data silence (both ways) after which a session is quiet: its paths are
/// not probed until data flows again (see [`crate::path::Paths::set_quiet`]).
pub const QUIET_AFTER: Duration = Duration::from_secs(30);

/// The longest a session told a heartbeat interval stays silent before a
/// keepalive ([`Session::set_heartbeat`]): UDP mappings of NATs commonly
/// expire after 30 s, and WireGuard suggests 25 s for its persistent
/// keepalive for the same reason.
pub const NAT_KEEPALIVE: Duration = Duration::from_secs(25);

/// KCP data silence after which the rate controller probes the path afresh.
pub const IDLE_RESTART: Duration = Duration::from_millis(500);

/// One remote node's session. See the module docs for the poll order.
pub struct Session {
    cfg: Arc<SessionConfig>,
    remote: PublicKey,
    my_bit: u32,
    paths: Paths,
    /// The path the frame being dispatched arrived on.
    rx_via: Option<Via>,
    /// The path traffic used when last checked (to count and log moves).
    last_path: Option<Via>,
    /// [`Inner::Relay`] messages received, whole: type byte, the 32-byte key
    /// named in it, the frame.
    relayed: VecDeque<Vec<u8>>,
    /// Next time to ask the hubs to coordinate a punch.
    next_punch_req: Duration,
    incarnation: u64,
    /// When the current keys were installed (old keys expire from here).
    installed_at: Duration,
    remote_incarnation: Option<u64>,
    last_init_ts: u64,
    /// Timestamp of our own last initiation: the next is later, even
    /// within the same millisecond (the responder takes an equal one for a
    /// replay).
    last_sent_ts: u64,
    // Boxed, like the pending initiation: most of a session's size, and
    // mostly absent (a hub holds thousands of idle sessions).
    current: Option<Box<Keypair>>,
    previous: Option<Box<Keypair>>,
    next: Option<Box<Keypair>>,
    pending_init: Option<Box<PendingInit>>,
    next_handshake: Option<Duration>,
    handshake_attempts: u32,
    wanted: bool,
    pending: VecDeque<Vec<u8>>,
    urgent: VecDeque<Out>,
    /// Bytes of [`Out::Relayed`] in `urgent`.
    relay_bytes: usize,
    /// Packets waiting in conversation queues (sum of `Conv::queue` lengths).
    queued: usize,
    /// Running average size of packets admitted into KCP (bytes, for the inflight cap).
    avg_seg: f64,
    /// KCP output carrying data (new or retransmitted), per conversation,
    /// released by the pacer round-robin across conversations.
    paced: BTreeMap<u32, VecDeque<Vec<u8>>>,
    paced_len: usize,
    paced_last: u32,
    /// Last conversation served by the pacer; queues are served round-robin
    /// so a bulk flow's backlog never delays another flow's packets.
    rr_conv: u32,
    rx: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
    sink: KcpSink,
    // Boxed: a map node holds room for eleven, and a hub's session has one.
    convs: BTreeMap<u32, Box<Conv>>,
    flows: BTreeMap<ip::FlowKey, u32>,
    tombstones: VecDeque<u32>,
    tombstone_set: BTreeSet<u32>,
    next_conv: u32,
    dirty: bool,
    cc: RateControl,
    pacer: Pacer,
    now: Duration,
    last_rx: Duration,
    /// When the node admitted this session (for eviction at the cap).
    born: Duration,
    last_tx: Duration,
    /// When data last left on a KCP conversation (None: never).
    last_kcp_tx: Option<Duration>,
    next_ping: Duration,
    next_feedback: Duration,
    reported: u64,
    next_expiry: Duration,
    dead: bool,
    srtt: Option<Duration>,
    stats: SessionStats,
    fec_tx: fec::FecTx,
    fec_rx: fec::FecRx,
    /// Whether data frames currently go with parity.
    fec_on: bool,
    /// The bulk streams' timeout floor (see `mux::bulk_rto_floor`) as last
    /// set; set again when the least RTT moves it.
    rto_floor: u32,
    /// Stream conversations with messages for the proxy.
    streams_ready: BTreeSet<u32>,
    /// Stream conversations that closed.
    streams_gone: VecDeque<u32>,
    /// Frames the remote last reported receiving (to see reports advance).
    cc_frames_seen: u64,
    /// Something other than a receiver report arrived since our last
    /// report (reports must not answer reports).
    data_since_report: bool,
    /// Last data (not control) frame sent or received, or the first keys.
    last_data: Duration,
    /// The path's MTU is worth finding: from the start on a peer's sessions
    /// (so that a first transfer already fits the path and its first SYN is
    /// clamped; a member's path to its hub carries what the hub relays), on
    /// a hub's only once it sends data of its own, which it does not
    /// ([`SessionConfig::pmtu_at_start`]).
    pmtu_wanted: bool,
    /// A member's session with a hub (see [`Session::set_control_only`]).
    control_only: bool,
    /// Silence after which a keepalive goes out, and after which the link
    /// is declared dead (see [`Session::set_heartbeat`]).
    keepalive: Duration,
    dead_after: Duration,
    /// Path MTU of the path in use.
    pmtu: Pmtu,
    /// The capacity trains sent before the first transfer.
    train: train::Train,
    /// The frame last returned by `poll_transmit` is a path MTU probe.
    tx_probe: bool,
    /// Earliest time for the next ICMP "too big" (at most one per 100 ms).
    next_too_big: Duration,
    /// When a frame larger than the base size last went out (the size in
    /// use is confirmed only while it is used).
    last_big_tx: Duration,
    /// When the direct path was found unable to carry even base-size
    /// frames: it counts as losing all data (so a relay takes over) for
    /// [`NARROW_PATH_HOLD`].
    base_fails_at: Option<Duration>,
    /// Fragments being joined.
    reasm: frag::Reassembly,
    next_frag_id: u16,
}

impl Session {
    /// A session with `remote`, reachable at `endpoint` if known.
    /// `incarnation` is random per session object: the remote sees it in every
    /// handshake, and a new value tells it that this side's state (KCP
    /// conversations) is fresh, whether the process restarted or only this
    /// session was dropped and created again (expiry, revocation, restart of
    /// the session by a supervisor).
    pub fn new(
        cfg: Arc<SessionConfig>,
        local: &PublicKey,
        remote: PublicKey,
        endpoint: Option<SocketAddr>,
        incarnation: u64,
    ) -> Session {
        let initial_rate = 64.0 * 1400.0 / 0.1;
        let max_rate = cfg.max_rate;
        let cfg_path_mtu = cfg.path_mtu;
        let pmtu_at_start = cfg.pmtu_at_start;
        let (keepalive, dead_after) = (cfg.keepalive, cfg.dead_after);
        Session {
            cfg,
            remote,
            my_bit: u32::from(local < &remote),
            paths: {
                let mut p = Paths::new(PathConfig::default());
                if let Some(ep) = endpoint {
                    p.set_direct(Duration::ZERO, &[ep]);
                }
                p
            },
            rx_via: None,
            last_path: None,
            relayed: VecDeque::new(),
            next_punch_req: Duration::ZERO,
            incarnation,
            installed_at: Duration::ZERO,
            remote_incarnation: None,
            last_init_ts: 0,
            last_sent_ts: 0,
            current: None,
            previous: None,
            next: None,
            pending_init: None,
            next_handshake: None,
            handshake_attempts: 0,
            wanted: false,
            pending: VecDeque::new(),
            urgent: VecDeque::new(),
            relay_bytes: 0,
            queued: 0,
            avg_seg: 1000.0,
            paced: BTreeMap::new(),
            paced_len: 0,
            paced_last: 0,
            rr_conv: 0,
            rx: VecDeque::new(),
            events: VecDeque::new(),
            sink: KcpSink::default(),
            convs: BTreeMap::new(),
            flows: BTreeMap::new(),
            tombstones: VecDeque::new(),
            tombstone_set: BTreeSet::new(),
            next_conv: 1,
            dirty: false,
            cc: RateControl::new(initial_rate, max_rate),
            pacer: Pacer::default(),
            now: Duration::ZERO,
            last_rx: Duration::ZERO,
            born: Duration::ZERO,
            last_tx: Duration::ZERO,
            last_kcp_tx: None,
            next_ping: Duration::ZERO,
            next_feedback: Duration::ZERO,
            reported: 0,
            next_expiry: Duration::ZERO,
            dead: false,
            srtt: None,
            stats: SessionStats::default(),
            fec_tx: fec::FecTx::default(),
            fec_rx: fec::FecRx::default(),
            fec_on: false,
            rto_floor: 0,
            streams_ready: BTreeSet::new(),
            streams_gone: VecDeque::new(),
            cc_frames_seen: 0,
            data_since_report: false,
            last_data: Duration::ZERO,
            pmtu_wanted: pmtu_at_start,
            control_only: false,
            keepalive,
            dead_after,
            pmtu: Pmtu::new(cfg_path_mtu),
            train: train::Train::default(),
            tx_probe: false,
            next_too_big: Duration::ZERO,
            last_big_tx: Duration::ZERO,
            base_fails_at: None,
            reasm: frag::Reassembly::default(),
            next_frag_id: 0,
        }
    }

    /// The remote's public key.
    pub fn remote(&self) -> &PublicKey {
        &self.remote
    }

    /// Where frames to the remote go.
    /// The direct endpoint in use (None while relayed or unknown).
    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.paths.current().and_then(|v| v.direct())
    }

    /// The path in use.
    pub fn path(&self) -> Option<Via> {
        self.paths.current()
    }

    /// All paths, their measurements, and why the current one.
    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    /// Point the session at a new endpoint (e.g. from the hub's peer map).
    pub fn set_endpoint(&mut self, ep: SocketAddr) {
        self.paths.set_direct(self.now, &[ep]);
    }

    /// The direct candidates from the hub's peer map, best first.
    pub fn set_candidates(&mut self, eps: &[SocketAddr]) {
        self.paths.set_direct(self.now, eps);
    }

    /// The hubs that may relay to this peer.
    pub fn set_relays(&mut self, relays: &[PublicKey]) {
        self.paths.set_relays(self.now, relays);
    }

    /// Relays reached by a stream: the last resort (see [`crate::path::Paths::set_last_resort`]).
    pub fn set_last_resort_relays(&mut self, relays: &[PublicKey]) {
        self.paths.set_last_resort(relays);
    }

    /// The hub asked both sides to try these candidates now.
    pub fn punch(&mut self, now: Duration, eps: &[SocketAddr]) {
        self.now = self.now.max(now);
        // The other side wants a direct path: measure as if data flowed.
        self.last_data = now;
        self.paths.punch(now, eps);
    }

    /// Count and log a move of the traffic to another path.
    fn track_path(&mut self) {
        let (prev, now) = (self.last_path, self.paths.current());
        if now == prev {
            return;
        }
        // Another path: its MTU is found afresh.
        self.pmtu.reset();
        self.resize_convs();
        if prev.is_some() && now.is_some() {
            self.stats.path_changes += 1;
            tracing::info!(
                peer = %self.remote[..6].iter().map(|b| format!("{b:02x}")).collect::<String>(),
                from = ?prev,
                to = ?now,
                why = %self.paths.reason(),
                "path changed"
            );
        }
        self.last_path = now;
    }

    /// Relay messages that arrived, whole (see [`wire::Inner::Relay`]).
    pub fn take_relayed(&mut self) -> VecDeque<Vec<u8>> {
        std::mem::take(&mut self.relayed)
    }

    /// Forward a relay message received in another session: `msg` is that
    /// message whole; its key is replaced by `src` (the node it came from)
    /// and it goes over this session's own path.
    pub fn queue_relay(&mut self, src: &PublicKey, mut msg: Vec<u8>) -> bool {
        if self.current.is_none() || self.urgent.len() >= MAX_RELAYED || msg.len() < 33 {
            return false;
        }
        msg[1..33].copy_from_slice(src);
        self.relay_bytes += msg.len();
        self.urgent.push_back(Out::Relayed(msg));
        true
    }

    /// Bytes this session holds for others: relayed frames waiting to go,
    /// and reliable control messages not yet acknowledged (whole segments).
    /// What a node's memory budget counts.
    pub fn held_bytes(&self) -> usize {
        self.relay_bytes + self.control_held()
    }

    /// What a reliable control message of `len` bytes adds to
    /// [`Session::held_bytes`] (whole KCP segments; opens the control
    /// conversation, which the message is about to use).
    pub fn control_cost(&mut self, now: Duration, len: usize) -> usize {
        let mss = self.conv(now, CONV_CONTROL).kcp.mss().max(1);
        len.div_ceil(mss).max(1) * mss
    }

    fn control_held(&self) -> usize {
        self.convs
            .get(&CONV_CONTROL)
            .map_or(0, |c| c.kcp.wait_snd() * c.kcp.mss())
    }

    /// Seal the plaintext `plain` into `buf` now, outside the queues (the
    /// node wrapping another session's frame for this relay); returns where
    /// to send it (this session's direct endpoint).
    pub fn seal_now(
        &mut self,
        now: Duration,
        plain: &[u8],
        buf: &mut Vec<u8>,
    ) -> Option<SocketAddr> {
        let to = self.endpoint()?;
        if self.seal(plain, buf) {
            self.count_tx(now, buf.len());
            Some(to)
        } else {
            None
        }
    }

    /// Is there a usable key?
    pub fn is_established(&self) -> bool {
        self.current.is_some()
    }

    /// Has the link been declared dead (and not recovered)?
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    /// Counters.
    pub fn stats(&self) -> SessionStats {
        let mut s = self.stats.clone();
        s.convs = self.convs.len();
        s.srtt = self.srtt;
        s.loss = self.cc.loss();
        s.pmtu = self.frame_budget();
        s.pmtu_settled = self.pmtu.settled().is_some();
        s.pmtu_probes = self.pmtu.sent;
        s.pmtu_black_holes = self.pmtu.black_holes;
        s.capacity = self.train.estimate().unwrap_or(0.0);
        s.capacity_probes = self.train.probes();
        s.frag_dropped += self.reasm.evicted;
        s
    }

    /// Did the frame last returned by [`Session::poll_transmit`] probe the
    /// path MTU (the driver sends it with the don't-fragment bit)?
    pub fn took_probe(&self) -> bool {
        self.tx_probe
    }

    /// Time of the last authenticated frame.
    pub fn last_rx(&self) -> Duration {
        self.last_rx
    }

    /// Last sign of life: the last authenticated frame, or the admission.
    pub fn last_activity(&self) -> Duration {
        self.last_rx.max(self.born)
    }

    /// Record when the node admitted this session.
    pub fn set_born(&mut self, now: Duration) {
        self.born = now;
    }

    /// KCP segments waiting (queued or unacknowledged) over all conversations.
    pub fn kcp_backlog(&self) -> usize {
        self.convs.values().map(|c| c.kcp.wait_snd()).sum::<usize>() + self.queued + self.paced_len
    }

    /// This session carries control messages and relayed frames (a member's
    /// session with a hub): its path-MTU search sends its probes without the
    /// busy pings a searching session sends otherwise (the hub's answers to
    /// the probes, and to heartbeats, are what comes back). Ten thousand
    /// members pinging their hub every 10-50 ms while their searches waited
    /// for a hub busy admitting them kept it too busy to answer them.
    pub fn set_control_only(&mut self) {
        self.control_only = true;
    }

    /// The owner heartbeats this session's remote every `interval` (or, on
    /// a hub, is heartbeated that often), and a heartbeat or its answer is a
    /// frame each way: keepalives are then due only after a silence of one
    /// and a half intervals (a heartbeat sent a little late does not meet a
    /// keepalive), never less than the configured keepalive and never more
    /// than [`NAT_KEEPALIVE`] (NAT mappings must not time out between long
    /// heartbeats); the link is declared dead after two keepalive intervals
    /// of silence (never less than the configured `dead_after`). Without
    /// this an idle session with 10-s heartbeats also sent a keepalive 5 s
    /// after each of them: a hub's sessions sent twice as many frames as
    /// their heartbeats needed.
    pub fn set_heartbeat(&mut self, interval: Duration) {
        self.keepalive =
            (interval * 3 / 2).clamp(self.cfg.keepalive, NAT_KEEPALIVE.max(self.cfg.keepalive));
        self.dead_after = self.cfg.dead_after.max(self.keepalive * 2);
    }

    /// Queue an inner IP packet for the remote.
    pub fn send_ip(&mut self, ctx: &mut Ctx, pkt: &[u8]) {
        self.now = ctx.now;
        self.last_data = ctx.now;
        self.pmtu_wanted = true;
        self.stats.ip_tx += 1;
        let Some(info) = ip::parse(pkt) else {
            self.stats.malformed += 1;
            return;
        };
        if self.current.is_none() {
            self.wanted = true;
            if self.pending.len() >= self.cfg.max_pending {
                self.pending.pop_front();
                self.stats.pending_dropped += 1;
            }
            self.pending.push_back(pkt.to_vec());
            if self.pending_init.is_none() {
                self.start_handshake(ctx);
            }
            return;
        }
        self.route(ctx.now, pkt, &info);
    }

    /// Send a control message as an encrypted datagram (unreliable, not queued
    /// behind KCP). Returns false if there is no session yet.
    pub fn send_control(&mut self, msg: &Control) -> bool {
        if self.current.is_none() {
            return false;
        }
        // Room for the common messages (pings, reports): growing from one
        // byte took four reallocations each.
        let mut v = Vec::with_capacity(64);
        v.push(Inner::Control as u8);
        if msg.encode_into(&mut v).is_err() {
            self.stats.control_too_large += 1;
            return false;
        }
        self.urgent.push_back(Out::Plain(v));
        true
    }

    /// Send a control message reliably, in order, over the control conversation.
    pub fn send_control_reliable(&mut self, now: Duration, msg: &Control) -> bool {
        let Ok(v) = msg.encode() else {
            self.count_control_too_large();
            return false;
        };
        self.send_control_encoded(now, &v)
    }

    /// A control message did not encode within the wire limits.
    pub fn count_control_too_large(&mut self) {
        self.stats.control_too_large += 1;
    }

    /// [`Session::send_control_reliable`] of a message already encoded.
    pub fn send_control_encoded(&mut self, now: Duration, v: &[u8]) -> bool {
        let c = self.conv(now, CONV_CONTROL);
        if c.kcp.wait_snd() >= CONTROL_BACKLOG {
            self.stats.control_backlog_dropped += 1;
            return false;
        }
        if c.kcp.send(v).is_err() {
            return false;
        }
        c.last_active = now;
        self.dirty = true;
        true
    }

    fn dispatch(&mut self, now: Duration, plain: &[u8]) {
        let Some((&kind, body)) = plain.split_first() else {
            return;
        };
        // Receiver reports follow data (what the rate controller accounts
        // for). Control frames (pings, probes, heartbeats) are reported
        // only while data flows (the controller's loss estimate uses them
        // then; without them the simulated message p99 at 5% loss rose
        // from 62 to 90 ms): on an idle session a report answering them
        // would go out every second.
        match Inner::from_u8(kind) {
            // (decided in `on_control`, which knows the message)
            Some(Inner::Control) => {}
            Some(Inner::Keepalive | Inner::MtuProbe) => self.note_control(now),
            _ => {
                self.last_data = now;
                self.data_since_report = true;
            }
        }
        match Inner::from_u8(kind) {
            Some(Inner::Ip) => self.deliver(now, body, None),
            Some(Inner::Kcp) => self.on_kcp(now, body),
            Some(Inner::Control) => match Control::decode(body) {
                Ok(m) => self.on_control(now, m),
                Err(_) => self.stats.malformed += 1,
            },
            Some(Inner::Keepalive) => {}
            Some(Inner::FecData) => self.on_fec_data(now, body),
            Some(Inner::FecParity) => self.on_fec_parity(now, body),
            Some(Inner::Fragment) => match self.reasm.on_fragment(body) {
                Ok(None) => {}
                Ok(Some(whole)) if whole.first() != Some(&(Inner::Fragment as u8)) => {
                    self.stats.frag_rx += 1;
                    self.dispatch(now, &whole);
                }
                _ => self.stats.frag_dropped += 1,
            },
            Some(Inner::MtuProbe) => {
                // Answer on the path the probe came by, small.
                let id = body
                    .get(..4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                match (id, self.rx_via) {
                    (Some(id), Some(via)) => self.answer_on(via, &Control::MtuAck { id }),
                    _ => self.stats.malformed += 1,
                }
            }
            Some(Inner::Relay) => {
                if body.len() < 32 + wire::DATA_HEADER_LEN || self.relayed.len() >= MAX_RELAYED {
                    self.stats.malformed += 1;
                    return;
                }
                self.relayed.push_back(plain.to_vec());
            }
            None => self.stats.malformed += 1,
        }
    }

    /// A control frame arrived: reported only while data flows.
    fn note_control(&mut self, now: Duration) {
        if now.saturating_sub(self.last_data) < REPORT_CONTROL_FOR {
            self.data_since_report = true;
        }
    }

    fn on_control(&mut self, now: Duration, m: Control) {
        // Reports are not reported: two sides would answer each other's
        // reports forever.
        if !matches!(m, Control::Feedback { .. }) {
            self.note_control(now);
        }
        match m {
            Control::Ping { ts_us } => {
                self.send_control(&Control::Pong { ts_us });
            }
            Control::Pong { ts_us } => {
                let sent = Duration::from_micros(ts_us);
                if sent <= now {
                    let rtt = now - sent;
                    self.srtt = Some(match self.srtt {
                        Some(s) => (s * 7 + rtt) / 8,
                        None => rtt,
                    });
                    self.cc.on_rtt(now, rtt);
                    // A pong back over the path in use shows it works both
                    // ways, as an answered probe does. While data flows
                    // pings go every 10-50 ms, so on a lossy path some get
                    // through long before the path could count as down.
                    if self.rx_via == self.paths.current() {
                        self.paths.note_alive(now);
                    }
                }
            }
            Control::Feedback {
                frames,
                highest,
                bytes,
            } => {
                self.cc.set_backlogged(self.queued > 0);
                self.cc
                    .set_app_limited(self.queued == 0 && self.paced_len == 0);
                let unacked: usize = self.convs.values().map(|c| c.kcp.wait_snd()).sum();
                self.cc
                    .set_inflight(unacked.saturating_sub(self.paced_len) as f64 * self.avg_seg);
                if self.cc_frames_seen >= 64 && frames < self.cc_frames_seen / 2 {
                    // The remote counts under new keys now.
                    self.cc_frames_seen = 0;
                }
                if self.cc_frames_seen < frames {
                    self.cc_frames_seen = frames;
                    if self.rx_via == self.paths.current() {
                        self.paths.note_alive(now);
                    }
                }
                self.cc.on_report(
                    now,
                    Report {
                        frames,
                        highest,
                        bytes,
                    },
                );
                let narrow = self
                    .base_fails_at
                    .is_some_and(|t| now.saturating_sub(t) < NARROW_PATH_HOLD);
                let loss = if narrow { 1.0 } else { self.cc.clean_loss() };
                self.paths.note_data_loss(now, loss);
            }
            Control::ConvReset { conv } => {
                if self.convs.contains_key(&conv) {
                    self.close_conv(conv);
                }
            }
            Control::PathProbe { id } => {
                // Answer on the path the probe came by.
                if let Some(via) = self.rx_via {
                    self.answer_on(via, &Control::PathAck { id });
                }
            }
            Control::PathAck { id } => self.paths.on_ack(now, id),
            Control::MtuAck { id } if train::Train::is_train_id(id) => {
                if let Some(rate) = self.train.on_ack(now, id) {
                    self.cc.on_capacity_estimate(rate);
                }
            }
            Control::MtuAck { id } => {
                if let Some(c) = self.pmtu.on_ack(now, id) {
                    self.pmtu_changed(c);
                }
            }
            other => self.events.push_back(Event::Control(other)),
        }
    }

    /// Queue `msg` for path `via` (answers to probes go back the way they came).
    fn answer_on(&mut self, via: Via, msg: &Control) {
        if let Ok(m) = msg.encode() {
            let mut v = Vec::with_capacity(1 + m.len());
            v.push(Inner::Control as u8);
            v.extend_from_slice(&m);
            self.urgent.push_back(Out::PlainTo(via, v));
        }
    }

    /// The frame size in use changed: conversations cut their segments to it.
    fn pmtu_changed(&mut self, c: pmtu::Change) {
        if c == pmtu::Change::BaseFails {
            self.stats.pmtu_base_fails += 1;
            self.base_fails_at = Some(self.now);
            self.paths.note_data_loss(self.now, 1.0);
        }
        tracing::info!(
            peer = %self.remote[..6].iter().map(|b| format!("{b:02x}")).collect::<String>(),
            change = ?c,
            frame = self.pmtu.current(),
            "path MTU"
        );
        self.resize_convs();
    }

    /// Whether [`Session::poll_transmit`] would return a frame at `now`.
    pub fn wants_transmit(&self, now: Duration) -> bool {
        self.paths.current().is_some()
            && (!self.urgent.is_empty()
                || (self.paced_len > 0 && self.pacer.ready(now) && self.current.is_some()))
    }

    /// Write the next frame to send into `buf`; returns its destination.
    pub fn poll_transmit(&mut self, now: Duration, buf: &mut Vec<u8>) -> Option<Via> {
        self.tx_probe = false;
        let path = self.paths.current()?;
        loop {
            let mut to = path;
            let plain = if let Some(o) = self.urgent.pop_front() {
                match o {
                    Out::RawTo(via, f) => {
                        buf.clear();
                        buf.extend_from_slice(&f);
                        self.count_tx(now, buf.len());
                        return Some(via);
                    }
                    Out::PlainTo(via, p) => {
                        to = via;
                        p
                    }
                    Out::ProbeTo(via, p) => {
                        to = via;
                        self.tx_probe = true;
                        p
                    }
                    Out::FragTo(via, p) => {
                        to = via;
                        p
                    }
                    Out::Relayed(p) => {
                        self.relay_bytes -= p.len();
                        p
                    }
                    Out::Plain(p) => {
                        if p.first() == Some(&(Inner::Ip as u8)) {
                            self.last_data = now;
                            self.pmtu_wanted = true;
                            // Datagrams never wait, but they use the path, so KCP yields.
                            self.pacer.on_send(
                                now,
                                p.len() + wire::DATA_OVERHEAD,
                                self.cc.pacing_rate(),
                            );
                        }
                        p
                    }
                }
            } else if self.paced_len > 0 && self.pacer.ready(now) && self.current.is_some() {
                let p = self.pop_paced();
                self.last_data = now;
                // A bulk stream gets no parity, not even on retransmissions:
                // its window is many round trips of segments, a second loss
                // costs one more timeout on one of them, and parity over
                // every resend cost 4% of the wire at 10% loss (simulated:
                // 72-75 Mbit/s with it, 74-77 without; 58 against 60-64 at
                // 20%).
                let bulk = self.convs.get(&self.paced_last).is_some_and(|c| c.bulk);
                let p = if p.first() == Some(&(Inner::Kcp as u8)) {
                    self.fec_wrap(now, p, bulk)
                } else {
                    p // bulk parity, already wrapped
                };
                self.pacer
                    .on_send(now, p.len() + wire::DATA_OVERHEAD, self.cc.pacing_rate());
                p
            } else {
                return None;
            };
            let plain = if self.tx_probe {
                plain
            } else {
                self.fragment(plain, to)
            };
            if self.seal(&plain, buf) {
                self.count_tx(now, buf.len());
                if buf.len() > pmtu::BASE_FRAME && !self.tx_probe {
                    self.last_big_tx = now;
                }
                return Some(to);
            }
        }
    }

    /// `plain` whole, or its first fragment (the rest queued to go next)
    /// if the path is known not to carry it in one frame.
    fn fragment(&mut self, plain: Vec<u8>, to: Via) -> Vec<u8> {
        let budget = self.plain_budget();
        if plain.len() <= budget
            || !self
                .pmtu
                .known_too_big(plain.len() + (self.frame_budget() - budget))
        {
            return plain;
        }
        let id = self.next_frag_id;
        let Some(mut parts) = frag::split(&plain, id, budget) else {
            return plain;
        };
        self.next_frag_id = id.wrapping_add(1);
        self.stats.frag_tx += 1;
        let first = parts.remove(0);
        for p in parts.into_iter().rev() {
            self.urgent.push_front(Out::FragTo(to, p));
        }
        first
    }

    fn count_tx(&mut self, now: Duration, n: usize) {
        self.stats.tx_frames += 1;
        self.stats.tx_bytes += n as u64;
        self.last_tx = now;
    }

    /// Next inner IP packet received from the remote.
    pub fn poll_rx(&mut self) -> Option<Vec<u8>> {
        self.rx.pop_front()
    }

    /// Next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}
