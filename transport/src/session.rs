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

use crate::cc::{Pacer, RateControl, Report};
use crate::crypto::{
    CryptoError, EntropySource, InitiatorHandshake, ReplayWindow, ResponderHello, SessionKeys,
    StaticKeypair,
};
use crate::ip;
use crate::path::{PathConfig, Paths, Via};
use crate::wire::{self, Control, Inner, PublicKey};
use kcp::Kcp;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// KCP tuning presets. Parameters: (nodelay, flush interval ms, fast-resend
/// threshold in duplicate acks, minimum RTO ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KcpProfile {
    /// Conservative: (false, 40, 0, 100). RTO doubles on each loss, no fast resend.
    Normal,
    /// Default: (true, 20, 2, 30). RTO grows by half, fast resend after 2 acks.
    #[default]
    Fast,
    /// Lowest latency: (true, 10, 1, 10). Resends after one out-of-order ack.
    Turbo,
}

impl KcpProfile {
    /// (nodelay, interval ms, fast resend, min RTO ms).
    pub fn params(self) -> (bool, u32, u32, u32) {
        match self {
            KcpProfile::Normal => (false, 40, 0, 100),
            KcpProfile::Fast => (true, 20, 2, 30),
            KcpProfile::Turbo => (true, 10, 1, 10),
        }
    }

    /// All profiles, for benchmarks.
    pub const ALL: [KcpProfile; 3] = [KcpProfile::Normal, KcpProfile::Fast, KcpProfile::Turbo];
}

impl std::str::FromStr for KcpProfile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "normal" => Ok(KcpProfile::Normal),
            "fast" => Ok(KcpProfile::Fast),
            "turbo" => Ok(KcpProfile::Turbo),
            o => Err(format!("unknown KCP profile {o:?} (normal, fast, turbo)")),
        }
    }
}

/// Which inner packets use KCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FlowMode {
    /// TCP flows each get a KCP conversation; everything else is a datagram.
    #[default]
    Auto,
    /// Everything reliable: TCP per flow, other packets share one conversation.
    AllKcp,
    /// Everything as datagrams (the inner transports recover on their own).
    AllDatagram,
}

/// Session settings. Durations are wall-clock spans; sizes are bytes.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// KCP preset.
    pub profile: KcpProfile,
    /// Which packets use KCP.
    pub flow_mode: FlowMode,
    /// Largest UDP payload to send (1452 fits a 1500-byte path over IPv6).
    pub path_mtu: usize,
    /// Most KCP conversations this side opens (flows beyond share one).
    pub max_convs: usize,
    /// A conversation idle this long with nothing unacknowledged is closed.
    pub conv_idle: Duration,
    /// KCP receive window in segments (bounds memory per conversation).
    pub rcv_wnd: u16,
    /// Ping interval when idle; also the keepalive interval.
    pub keepalive: Duration,
    /// Silence after which the link is declared dead.
    pub dead_after: Duration,
    /// First handshake retry delay (doubles up to 8x).
    pub handshake_retry: Duration,
    /// IP packets held while no session exists.
    pub max_pending: usize,
    /// Packets a KCP conversation may hold unsent before new ones are dropped.
    pub max_backlog: usize,
    /// Rate cap for the controller, bytes/s.
    pub max_rate: f64,
    /// Session keys are replaced by a new handshake after this long...
    pub rekey_after: Duration,
    /// ...or after this many frames sent under them, whichever comes first.
    pub rekey_after_messages: u64,
    /// After a rotation, frames under the previous keys are accepted this
    /// long (they may still be in flight), then refused.
    pub old_key_window: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            profile: KcpProfile::Fast,
            flow_mode: FlowMode::Auto,
            path_mtu: 1452,
            max_convs: 256,
            conv_idle: Duration::from_secs(60),
            rcv_wnd: 4096,
            keepalive: Duration::from_secs(5),
            dead_after: Duration::from_secs(20),
            handshake_retry: Duration::from_secs(1),
            max_pending: 256,
            max_backlog: 4096,
            max_rate: 2.5e9 / 8.0 * 4.0,
            rekey_after: Duration::from_secs(120),
            rekey_after_messages: 1 << 40,
            old_key_window: Duration::from_secs(10),
        }
    }
}

impl SessionConfig {
    /// Largest plaintext (inner type byte + payload) that fits `path_mtu`.
    /// A hub relaying the frame adds [`wire::RELAY_OVERHEAD`]; the sockets let
    /// the kernel fragment such frames rather than reserve room in every
    /// frame (which cost a third of the throughput in the namespace bench).
    pub fn plain_budget(&self) -> usize {
        self.path_mtu - wire::DATA_OVERHEAD
    }

    /// Largest inner IP packet that never needs more than one UDP datagram,
    /// on either path (datagram: 1 type byte; KCP: plus a 24-byte segment header).
    /// This is the TUN MTU to configure.
    pub fn tun_mtu(&self) -> usize {
        self.plain_budget() - 1 - kcp::KCP_OVERHEAD
    }
}

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
}

/// Shared sink for KCP output (the kcp crate writes through `std::io::Write`).
#[derive(Clone, Default)]
struct KcpSink(Arc<Mutex<Vec<Vec<u8>>>>);

impl std::io::Write for KcpSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut v = Vec::with_capacity(buf.len() + 1);
        v.push(Inner::Kcp as u8);
        v.extend_from_slice(buf);
        self.0
            .lock()
            .map_err(|_| std::io::ErrorKind::Other)?
            .push(v);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Conv {
    kcp: Kcp<KcpSink>,
    /// Inner packets waiting for the pacer before they enter KCP.
    queue: VecDeque<Vec<u8>>,
    /// Acks owed since this time (sent within [`ACK_DELAY`] so they batch).
    ack_owed: Option<Duration>,
    last_active: Duration,
    next_update_ms: u32,
    /// One past the highest KCP sequence number sent (to spot retransmissions).
    next_sn: u32,
}

struct Keypair {
    keys: SessionKeys,
    /// When the handshake that made it finished (for rotation by age).
    created: Duration,
    local_index: u32,
    remote_index: u32,
    send_counter: u64,
    replay: ReplayWindow,
    rx: Report,
}

impl Keypair {
    fn new(keys: SessionKeys, now: Duration, local_index: u32, remote_index: u32) -> Keypair {
        Keypair {
            keys,
            created: now,
            local_index,
            remote_index,
            send_counter: 0,
            replay: ReplayWindow::default(),
            rx: Report {
                frames: 0,
                highest: 0,
                bytes: 0,
            },
        }
    }
}

struct PendingInit {
    hs: InitiatorHandshake,
    local_index: u32,
}

enum Out {
    /// A finished frame (handshake messages) for one path.
    RawTo(Via, Vec<u8>),
    /// Plaintext starting with its inner-type byte, sealed at send time.
    Plain(Vec<u8>),
    /// Plaintext for one path (probes and their answers).
    PlainTo(Via, Vec<u8>),
}

/// Relayed frames a session holds for the node before they are dropped.
const MAX_RELAYED: usize = 1024;

/// While no direct path answers, how often to ask the hubs to coordinate a punch.
pub const PUNCH_REQUEST_EVERY: Duration = Duration::from_secs(10);

/// Conversation id of the reliable control channel.
pub const CONV_CONTROL: u32 = 0;
/// Conversation id shared by non-TCP traffic in all-KCP mode and by flows past the limit.
pub const CONV_SHARED: u32 = 1;
const TOMBSTONES: usize = 1024;
/// Longest an ack waits so that acks for a burst of segments share one frame.
pub const ACK_DELAY: Duration = Duration::from_millis(4);

/// KCP data silence after which the rate controller probes the path afresh.
pub const IDLE_RESTART: Duration = Duration::from_millis(500);

/// What a session needs from its node for one call.
pub struct Ctx<'a> {
    /// Current time.
    pub now: Duration,
    /// Wall-clock milliseconds (handshake timestamps only).
    pub wall_ms: u64,
    /// This node's key pair.
    pub local: &'a StaticKeypair,
    /// Network pre-shared key.
    pub psk: &'a [u8; 32],
    /// This node's incarnation (random per start).
    pub incarnation: u64,
    /// Randomness for handshakes.
    pub entropy: &'a mut EntropySource,
    /// Index -> remote key map shared by all sessions of the node.
    pub indices: &'a mut BTreeMap<u32, PublicKey>,
}

impl Ctx<'_> {
    fn alloc_index(&mut self, remote: PublicKey) -> u32 {
        loop {
            let i = self.entropy.next_u32();
            if i != 0 && !self.indices.contains_key(&i) {
                self.indices.insert(i, remote);
                return i;
            }
        }
    }
}

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
    current: Option<Keypair>,
    previous: Option<Keypair>,
    next: Option<Keypair>,
    pending_init: Option<PendingInit>,
    next_handshake: Option<Duration>,
    handshake_attempts: u32,
    wanted: bool,
    pending: VecDeque<Vec<u8>>,
    urgent: VecDeque<Out>,
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
    convs: BTreeMap<u32, Conv>,
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
    last_kcp_tx: Duration,
    next_ping: Duration,
    next_feedback: Duration,
    reported: u64,
    next_expiry: Duration,
    dead: bool,
    srtt: Option<Duration>,
    stats: SessionStats,
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
            current: None,
            previous: None,
            next: None,
            pending_init: None,
            next_handshake: None,
            handshake_attempts: 0,
            wanted: false,
            pending: VecDeque::new(),
            urgent: VecDeque::new(),
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
            last_kcp_tx: Duration::ZERO,
            next_ping: Duration::ZERO,
            next_feedback: Duration::ZERO,
            reported: 0,
            next_expiry: Duration::ZERO,
            dead: false,
            srtt: None,
            stats: SessionStats::default(),
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

    /// The hub asked both sides to try these candidates now.
    pub fn punch(&mut self, now: Duration, eps: &[SocketAddr]) {
        self.now = self.now.max(now);
        self.paths.punch(now, eps);
    }

    /// Count and log a move of the traffic to another path.
    fn track_path(&mut self) {
        let (prev, now) = (self.last_path, self.paths.current());
        if now == prev {
            return;
        }
        let relay = |v: Option<Via>| matches!(v, Some(Via::Relay(_)));
        if relay(now) != relay(prev) {
            let m = self.kcp_mtu();
            for c in self.convs.values_mut() {
                let _ = c.kcp.set_mtu(m);
            }
        }
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
        self.urgent.push_back(Out::Plain(msg));
        true
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
        s
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

    /// Local indices this session holds (for the node's index map).
    pub fn indices(&self) -> Vec<u32> {
        let mut v = Vec::new();
        for k in [&self.current, &self.previous, &self.next]
            .into_iter()
            .flatten()
        {
            v.push(k.local_index);
        }
        if let Some(p) = &self.pending_init {
            v.push(p.local_index);
        }
        v
    }

    // ----------------------------------------------------------------- inputs

    /// Queue an inner IP packet for the remote.
    pub fn send_ip(&mut self, ctx: &mut Ctx, pkt: &[u8]) {
        self.now = ctx.now;
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

    fn route(&mut self, now: Duration, pkt: &[u8], info: &ip::IpInfo) {
        let conv = match (self.cfg.flow_mode, info.proto) {
            (FlowMode::AllDatagram, _) => None,
            // Pure TCP acks need no retransmission (the next ack covers a lost
            // one) and must not queue behind a lost data segment: that would
            // stall the sender's ack clock (and its delivery-rate samples).
            (FlowMode::Auto, ip::PROTO_TCP) if ip::tcp_pure_ack(pkt) => None,
            (_, ip::PROTO_TCP) => Some(self.conv_for_flow(now, info)),
            (FlowMode::AllKcp, _) => Some(CONV_SHARED),
            (FlowMode::Auto, _) => None,
        };
        match conv {
            None => {
                if pkt.len() + 1 > self.cfg.plain_budget() {
                    self.stats.malformed += 1;
                    return;
                }
                let mut v = Vec::with_capacity(pkt.len() + 1);
                v.push(Inner::Ip as u8);
                v.extend_from_slice(pkt);
                self.urgent.push_back(Out::Plain(v));
            }
            Some(id) => {
                let max_backlog = self.cfg.max_backlog;
                let c = self.conv(now, id);
                if c.queue.len() >= max_backlog {
                    self.stats.backlog_dropped += 1;
                    return;
                }
                // Idle = nothing queued, nothing unacknowledged, no data sent
                // for a while (not a transfer stalled on its window).
                let idle = self.queued == 0
                    && self.paced_len == 0
                    && now.saturating_sub(self.last_kcp_tx) >= IDLE_RESTART
                    && self.convs.values().all(|c| c.kcp.wait_snd() == 0);
                let c = self.conv(now, id);
                c.queue.push_back(pkt.to_vec());
                c.last_active = now;
                self.queued += 1;
                self.dirty = true;
                if idle {
                    self.cc.restart_from_idle(now);
                }
            }
        }
    }

    fn conv_for_flow(&mut self, now: Duration, info: &ip::IpInfo) -> u32 {
        let Some(key) = info.flow() else {
            return CONV_SHARED;
        };
        if let Some(&c) = self.flows.get(&key) {
            if self.convs.contains_key(&c) {
                return c;
            }
        }
        let mine = self
            .convs
            .keys()
            .filter(|&&c| c > CONV_SHARED && c & 1 == self.my_bit)
            .count();
        if mine >= self.cfg.max_convs && !self.evict_idle(now) {
            return CONV_SHARED;
        }
        let id = (self.next_conv << 1) | self.my_bit;
        self.next_conv = self.next_conv.wrapping_add(1).max(1);
        self.flows.insert(key, id);
        self.conv(now, id);
        id
    }

    fn evict_idle(&mut self, now: Duration) -> bool {
        let victim = self
            .convs
            .iter()
            .filter(|(&id, c)| id > CONV_SHARED && id & 1 == self.my_bit && c.kcp.wait_snd() == 0)
            .min_by_key(|(_, c)| c.last_active)
            .map(|(&id, _)| id);
        match victim {
            Some(id) => {
                self.close_conv(id);
                let _ = now;
                true
            }
            None => false,
        }
    }

    fn close_conv(&mut self, id: u32) {
        if let Some(c) = self.convs.remove(&id) {
            self.queued -= c.queue.len();
        }
        self.flows.retain(|_, c| *c != id);
        if id > CONV_SHARED && self.tombstone_set.insert(id) {
            self.tombstones.push_back(id);
            if self.tombstones.len() > TOMBSTONES {
                if let Some(old) = self.tombstones.pop_front() {
                    self.tombstone_set.remove(&old);
                }
            }
        }
    }

    /// KCP's MTU: the whole plaintext budget on a direct path; on a relayed
    /// one, less the relay's wrapping, so relayed frames never need IP
    /// fragmentation (KCP splits larger inner packets into two segments).
    fn kcp_mtu(&self) -> usize {
        let relayed = matches!(self.paths.current(), Some(Via::Relay(_)));
        self.cfg.plain_budget() - 1 - if relayed { wire::RELAY_OVERHEAD } else { 0 }
    }

    fn conv(&mut self, now: Duration, id: u32) -> &mut Conv {
        let kcp_mtu = self.kcp_mtu();
        let cfg = &self.cfg;
        let sink = &self.sink;
        self.convs.entry(id).or_insert_with(|| {
            let mut kcp = Kcp::new(id, sink.clone());
            let (nodelay, interval, resend, min_rto) = cfg.profile.params();
            kcp.set_nodelay(nodelay, interval as i32, resend as i32, true);
            kcp.set_rx_minrto(min_rto);
            let _ = kcp.set_mtu(kcp_mtu);
            // The controller limits inflight (`window_full`); KCP only by the receiver.
            kcp.set_wndsize(cfg.rcv_wnd, cfg.rcv_wnd);
            kcp.set_maximum_resend_times(u32::MAX);
            let ms = now.as_millis() as u32;
            let _ = kcp.update(ms);
            Conv {
                kcp,
                queue: VecDeque::new(),
                ack_owed: None,
                last_active: now,
                next_update_ms: ms,
                next_sn: 0,
            }
        })
    }

    /// Send a control message as an encrypted datagram (unreliable, not queued
    /// behind KCP). Returns false if there is no session yet.
    pub fn send_control(&mut self, msg: &Control) -> bool {
        if self.current.is_none() {
            return false;
        }
        let mut v = vec![Inner::Control as u8];
        if msg.encode_into(&mut v).is_err() {
            return false;
        }
        self.urgent.push_back(Out::Plain(v));
        true
    }

    /// Send a control message reliably, in order, over the control conversation.
    pub fn send_control_reliable(&mut self, now: Duration, msg: &Control) -> bool {
        let Ok(v) = msg.encode() else { return false };
        let c = self.conv(now, CONV_CONTROL);
        if c.kcp.send(&v).is_err() {
            return false;
        }
        c.last_active = now;
        self.dirty = true;
        true
    }

    /// True while our handshake initiation awaits its response.
    pub fn handshaking(&self) -> bool {
        self.pending_init.is_some()
    }

    /// Start (or restart) a handshake now.
    pub fn start_handshake(&mut self, ctx: &mut Ctx) {
        self.wanted = true;
        if self.paths.current().is_none() {
            // Nowhere to send yet; try again later (the endpoint may be learned).
            self.next_handshake = Some(ctx.now + self.cfg.handshake_retry);
            return;
        }
        if let Some(p) = self.pending_init.take() {
            ctx.indices.remove(&p.local_index);
        }
        let idx = ctx.alloc_index(self.remote);
        let mut frame = vec![0u8; wire::INIT_FRAME_LEN];
        wire::write_init_header(&mut frame, idx);
        let ts = ctx.wall_ms.max(self.last_init_ts + 1);
        match InitiatorHandshake::start(
            ctx.local,
            &self.remote,
            ctx.psk,
            ts,
            self.incarnation,
            ctx.entropy,
            &mut frame[wire::INIT_HEADER_LEN..],
        ) {
            Ok((hs, _)) => {
                self.pending_init = Some(PendingInit {
                    hs,
                    local_index: idx,
                });
                for via in self.paths.handshake_paths() {
                    self.urgent.push_back(Out::RawTo(via, frame.clone()));
                }
                let backoff = 1u32 << self.handshake_attempts.min(3);
                self.handshake_attempts += 1;
                self.next_handshake = Some(ctx.now + self.cfg.handshake_retry * backoff);
            }
            Err(_) => {
                ctx.indices.remove(&idx);
            }
        }
    }

    /// A valid handshake initiation from this session's remote arrived.
    pub fn on_init(
        &mut self,
        ctx: &mut Ctx,
        hello: ResponderHello,
        sender_index: u32,
        from: Via,
    ) -> bool {
        self.now = ctx.now;
        if hello.timestamp <= self.last_init_ts
            && self.remote_incarnation == Some(hello.incarnation)
        {
            return false; // replayed initiation
        }
        if self.pending_init.is_some() && self.my_bit == 1 {
            // Both sides initiated at once: the lower key stays the initiator.
            return false;
        }
        if let Some(p) = self.pending_init.take() {
            ctx.indices.remove(&p.local_index);
        }
        self.last_init_ts = hello.timestamp;
        let incarnation = hello.incarnation;
        let idx = ctx.alloc_index(self.remote);
        let mut frame = vec![0u8; wire::RESP_FRAME_LEN];
        wire::write_resp_header(&mut frame, idx, sender_index);
        let keys = match hello.accept(self.incarnation, &mut frame[wire::RESP_HEADER_LEN..]) {
            Ok((k, _)) => k,
            Err(_) => {
                ctx.indices.remove(&idx);
                return false;
            }
        };
        self.check_incarnation(ctx.now, incarnation);
        if let Some(old) = self.next.take() {
            ctx.indices.remove(&old.local_index);
        }
        self.next = Some(Keypair::new(keys, ctx.now, idx, sender_index));
        self.paths.on_rx(ctx.now, from);
        self.urgent.push_back(Out::RawTo(from, frame));
        true
    }

    /// When the current keys are due for rotation (None without keys).
    fn rekey_due(&self) -> Option<Duration> {
        let k = self.current.as_ref()?;
        if self.next.is_some() {
            return None; // a rotation started by the remote is completing
        }
        // One side (the one that wins simultaneous starts) rotates; the other
        // only if that one has not, later, so the two rarely cross.
        let (messages, stagger) = if self.my_bit == 1 {
            (self.cfg.rekey_after_messages, Duration::ZERO)
        } else {
            (
                self.cfg.rekey_after_messages.saturating_mul(2),
                self.cfg.rekey_after / 8,
            )
        };
        if k.send_counter >= messages {
            return Some(self.now);
        }
        Some(k.created + self.cfg.rekey_after + stagger)
    }

    fn check_incarnation(&mut self, now: Duration, inc: u64) {
        if let Some(old) = self.remote_incarnation {
            if old != inc {
                self.reset_convs();
                self.events.push_back(Event::PeerRestarted);
            }
        }
        self.remote_incarnation = Some(inc);
        let _ = now;
    }

    fn reset_convs(&mut self) {
        self.convs.clear();
        self.flows.clear();
        self.queued = 0;
        self.paced.clear();
        self.paced_len = 0;
        self.tombstones.clear();
        self.tombstone_set.clear();
        if let Ok(mut s) = self.sink.0.lock() {
            s.clear();
        }
    }

    /// A handshake response addressed to `receiver_index` arrived.
    pub fn on_resp(
        &mut self,
        ctx: &mut Ctx,
        sender_index: u32,
        receiver_index: u32,
        noise: &[u8],
        from: Via,
    ) -> Result<(), CryptoError> {
        self.now = ctx.now;
        let Some(p) = self
            .pending_init
            .take_if(|p| p.local_index == receiver_index)
        else {
            return Err(CryptoError::Handshake(
                "no handshake pending for that index".into(),
            ));
        };
        let local_index = p.local_index;
        let (keys, incarnation) = match p.hs.finish(noise) {
            Ok(k) => k,
            Err(e) => {
                ctx.indices.remove(&local_index);
                self.stats.auth_failed += 1;
                return Err(e);
            }
        };
        self.check_incarnation(ctx.now, incarnation);
        self.install(ctx, Keypair::new(keys, ctx.now, local_index, sender_index));
        self.paths.on_rx(ctx.now, from);
        // Confirm to the responder at once; it will not send on the new key before.
        self.urgent
            .push_back(Out::Plain(vec![Inner::Keepalive as u8]));
        Ok(())
    }

    fn install(&mut self, ctx: &mut Ctx, kp: Keypair) {
        if let Some(old) = self.previous.take() {
            ctx.indices.remove(&old.local_index);
        }
        self.previous = self.current.replace(kp);
        self.installed_at = ctx.now;
        self.next_handshake = None;
        self.handshake_attempts = 0;
        self.stats.handshakes += 1;
        self.last_rx = ctx.now;
        self.next_ping = ctx.now;
        if self.dead {
            self.dead = false;
            self.events.push_back(Event::Recovered);
        }
        self.events.push_back(Event::Established);
        while let Some(p) = self.pending.pop_front() {
            if let Some(info) = ip::parse(&p) {
                self.route(ctx.now, &p, &info);
            }
        }
    }

    /// An encrypted data frame for one of this session's indices arrived.
    /// `buf` holds the whole frame and is decrypted in place.
    pub fn on_data(
        &mut self,
        ctx: &mut Ctx,
        receiver_index: u32,
        counter: u64,
        buf: &mut [u8],
        from: Via,
    ) -> Result<(), CryptoError> {
        self.now = ctx.now;
        let wire_len = buf.len();
        let which = [&self.current, &self.previous, &self.next]
            .iter()
            .position(|k| k.as_ref().is_some_and(|k| k.local_index == receiver_index));
        let Some(which) = which else {
            return Err(CryptoError::Handshake("unknown index".into()));
        };
        let kp = match which {
            0 => self.current.as_mut(),
            1 => self.previous.as_mut(),
            _ => self.next.as_mut(),
        }
        .expect("found above");
        if !kp.replay.check(counter) {
            self.stats.replayed += 1;
            return Err(CryptoError::Replay(counter));
        }
        let (header, rest) = buf.split_at_mut(wire::DATA_HEADER_LEN);
        let ct_len = rest.len() - wire::TAG_LEN;
        let (ct, tag) = rest.split_at_mut(ct_len);
        if let Err(e) = kp.keys.open(counter, header, ct, tag) {
            self.stats.auth_failed += 1;
            return Err(e);
        }
        let newest = kp.replay.check(counter) && kp.rx.highest <= counter;
        kp.replay.commit(counter);
        kp.rx.frames += 1;
        kp.rx.bytes += wire_len as u64;
        kp.rx.highest = kp.rx.highest.max(counter + 1);
        if which == 2 {
            let kp = self.next.take().expect("present");
            self.install(ctx, kp);
        }
        if newest && which != 1 {
            self.paths.on_rx(ctx.now, from);
        }
        self.stats.rx_frames += 1;
        self.stats.rx_bytes += wire_len as u64;
        self.last_rx = ctx.now;
        if self.dead {
            self.dead = false;
            self.events.push_back(Event::Recovered);
        }
        let plain = &buf[wire::DATA_HEADER_LEN..wire::DATA_HEADER_LEN + ct_len];
        self.rx_via = Some(from);
        self.dispatch(ctx.now, plain);
        self.rx_via = None;
        self.track_path();
        Ok(())
    }

    fn dispatch(&mut self, now: Duration, plain: &[u8]) {
        let Some((&kind, body)) = plain.split_first() else {
            return;
        };
        match Inner::from_u8(kind) {
            Some(Inner::Ip) => self.deliver(now, body, None),
            Some(Inner::Kcp) => self.on_kcp(now, body),
            Some(Inner::Control) => match Control::decode(body) {
                Ok(m) => self.on_control(now, m),
                Err(_) => self.stats.malformed += 1,
            },
            Some(Inner::Keepalive) => {}
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

    fn deliver(&mut self, now: Duration, pkt: &[u8], conv: Option<u32>) {
        let Some(info) = ip::parse(pkt) else {
            self.stats.malformed += 1;
            return;
        };
        if let (Some(c), Some(key)) = (conv, info.flow()) {
            if c > CONV_SHARED {
                self.flows.entry(key).or_insert(c);
            }
        }
        let _ = now;
        self.stats.ip_rx += 1;
        self.rx.push_back(pkt.to_vec());
    }

    fn on_kcp(&mut self, now: Duration, segs: &[u8]) {
        if segs.len() < kcp::KCP_OVERHEAD {
            self.stats.malformed += 1;
            return;
        }
        let id = kcp::get_conv(segs);
        if !self.convs.contains_key(&id) {
            let remote_made = id > CONV_SHARED && id & 1 != self.my_bit;
            let remote_count = self
                .convs
                .keys()
                .filter(|&&c| c > CONV_SHARED && c & 1 != self.my_bit)
                .count();
            let acceptable = id <= CONV_SHARED
                || (remote_made
                    && !self.tombstone_set.contains(&id)
                    && remote_count < 2 * self.cfg.max_convs);
            if !acceptable {
                self.send_control(&Control::ConvReset { conv: id });
                return;
            }
        }
        let c = self.conv(now, id);
        c.last_active = now;
        c.ack_owed.get_or_insert(now);
        let bad_input = c.kcp.input(segs).is_err();
        let mut msgs = Vec::new();
        while let Ok(n) = c.kcp.peeksize() {
            let mut m = vec![0u8; n];
            match c.kcp.recv(&mut m) {
                Ok(k) => {
                    m.truncate(k);
                    msgs.push(m);
                }
                Err(_) => break,
            }
        }
        if bad_input {
            self.stats.malformed += 1;
        }
        for m in msgs {
            if id == CONV_CONTROL {
                match Control::decode(&m) {
                    Ok(msg) => self.on_control(now, msg),
                    Err(_) => self.stats.malformed += 1,
                }
            } else {
                self.deliver(now, &m, Some(id));
            }
        }
    }

    fn on_control(&mut self, now: Duration, m: Control) {
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
                }
            }
            Control::Feedback {
                frames,
                highest,
                bytes,
            } => {
                self.cc.on_report(
                    now,
                    Report {
                        frames,
                        highest,
                        bytes,
                    },
                );
                self.paths.note_data_loss(now, self.cc.loss());
            }
            Control::ConvReset { conv } => {
                if self.convs.contains_key(&conv) {
                    self.close_conv(conv);
                }
            }
            Control::PathProbe { id } => {
                // Answer on the path the probe came by.
                if let (Some(via), Ok(m)) = (self.rx_via, Control::PathAck { id }.encode()) {
                    let mut v = Vec::with_capacity(1 + m.len());
                    v.push(Inner::Control as u8);
                    v.extend_from_slice(&m);
                    self.urgent.push_back(Out::PlainTo(via, v));
                }
            }
            Control::PathAck { id } => self.paths.on_ack(now, id),
            other => self.events.push_back(Event::Control(other)),
        }
    }

    // ---------------------------------------------------------------- timers

    /// The rate controller (read-only, for diagnostics and benchmarks).
    pub fn rate_control(&self) -> &RateControl {
        &self.cc
    }

    /// Timer state, for diagnosing a stuck driver.
    pub fn debug_timers(&self) -> String {
        format!(
            "now {:?} dirty {} hs {:?} ping {:?} fb {:?} last_rx {:?} last_tx {:?} queued {} pacer {:?} convs {:?} expiry {:?}",
            self.now, self.dirty, self.next_handshake, self.next_ping, self.next_feedback, self.last_rx, self.last_tx,
            self.queued, self.pacer.next_send(),
            self.convs.iter().map(|(k, c)| (*k, c.next_update_ms)).collect::<Vec<_>>(), self.next_expiry
        )
    }

    /// When `handle_timeout` should next run.
    pub fn poll_timeout(&self) -> Option<Duration> {
        if self.dirty {
            return Some(self.now);
        }
        let mut t: Option<Duration> = None;
        let mut at = |d: Duration| t = Some(t.map_or(d, |x: Duration| x.min(d)));
        if let Some(h) = self.next_handshake {
            if self.wanted || self.current.is_some() {
                at(h);
            }
        }
        if let Some(due) = self.rekey_due() {
            if self.pending_init.is_none() && !self.dead {
                at(due);
            }
        }
        if self.previous.is_some() {
            at(self.installed_at + self.cfg.old_key_window);
        }
        if self.current.is_some() {
            at(self.next_ping);
            if self
                .current
                .as_ref()
                .is_some_and(|k| k.rx.frames > self.reported)
            {
                at(self.next_feedback);
            }
            if !self.dead {
                at(self.last_rx + self.cfg.dead_after);
            }
            if self.pending_init.is_none() && self.next_handshake.is_none() {
                at(self.last_tx + self.cfg.keepalive);
            }
        }
        if self.current.is_some() {
            if let Some(t) = self.paths.poll_timeout() {
                at(t);
            }
        }
        if (self.paced_len > 0 || (self.queued > 0 && self.next_admissible().is_some()))
            && self.current.is_some()
            && self.paths.current().is_some()
        {
            at(self.pacer.next_send());
        }
        if !self.convs.is_empty() {
            let base = self.now.as_millis() as u64;
            let now_ms = base as u32;
            for c in self.convs.values() {
                let d = c.next_update_ms.wrapping_sub(now_ms) as i32;
                at(Duration::from_millis(
                    (base as i64 + d.max(0) as i64) as u64,
                ));
            }
            at(self.next_expiry);
            for c in self.convs.values() {
                if let Some(a) = c.ack_owed {
                    at(a + ACK_DELAY);
                }
            }
        }
        t
    }

    /// Run timers due at `ctx.now` and flush KCP conversations.
    pub fn handle_timeout(&mut self, ctx: &mut Ctx) {
        let now = ctx.now;
        self.now = now;
        let now_ms = now.as_millis() as u32;
        let dirty = std::mem::take(&mut self.dirty);
        let admitted = self.admit(now);
        for (id, c) in self.convs.iter_mut() {
            let due = (now_ms.wrapping_sub(c.next_update_ms) as i32) >= 0;
            let fresh = admitted.contains(id);
            let acks = c.ack_owed.is_some_and(|a| now >= a + ACK_DELAY);
            let fresh = fresh || (dirty && *id == CONV_CONTROL);
            if due || fresh || acks {
                let _ = c.kcp.update(now_ms);
                if fresh || acks {
                    let _ = c.kcp.flush();
                }
                c.ack_owed = None;
                c.next_update_ms = now_ms.wrapping_add(c.kcp.check(now_ms).max(1));
            }
        }
        self.collect_kcp(now);
        if now >= self.next_expiry && !self.convs.is_empty() {
            self.next_expiry = now + Duration::from_secs(1);
            let idle = self.cfg.conv_idle;
            let expired: Vec<u32> = self
                .convs
                .iter()
                .filter(|(&id, c)| {
                    id > CONV_SHARED
                        && c.kcp.wait_snd() == 0
                        && now.saturating_sub(c.last_active) >= idle
                })
                .map(|(&id, _)| id)
                .collect();
            for id in expired {
                self.close_conv(id);
            }
        }
        // Key rotation: by age (the side with the higher key a little later,
        // so normally one side starts it) or by volume.
        if let Some(due) = self.rekey_due() {
            if now >= due && self.pending_init.is_none() && !self.dead {
                self.start_handshake(ctx);
            }
        }
        if self.previous.is_some() && now >= self.installed_at + self.cfg.old_key_window {
            if let Some(old) = self.previous.take() {
                ctx.indices.remove(&old.local_index);
            }
        }
        if let Some(h) = self.next_handshake {
            if now >= h && (self.wanted || self.current.is_some()) {
                if self.current.is_none() || self.dead || self.pending_init.is_some() {
                    self.start_handshake(ctx);
                } else {
                    self.next_handshake = None;
                }
            }
        }
        if self.current.is_some() {
            if !self.dead && now.saturating_sub(self.last_rx) >= self.cfg.dead_after {
                self.dead = true;
                self.events.push_back(Event::DeadLink);
                self.handshake_attempts = 0;
                self.start_handshake(ctx);
            }
            if now >= self.next_ping {
                let active = now.saturating_sub(self.last_kcp_tx) < Duration::from_secs(1);
                self.send_control(&Control::Ping {
                    ts_us: now.as_micros() as u64,
                });
                self.next_ping = now
                    + if active {
                        Duration::from_millis(50)
                    } else {
                        self.cfg.keepalive
                    };
            }
            let rx = self.current.as_ref().map(|k| k.rx).expect("current");
            if rx.frames > self.reported && now >= self.next_feedback {
                self.reported = rx.frames;
                self.send_control(&Control::Feedback {
                    frames: rx.frames,
                    highest: rx.highest,
                    bytes: rx.bytes,
                });
                self.next_feedback = now + Duration::from_millis(20);
            }
            if now.saturating_sub(self.last_tx) >= self.cfg.keepalive && self.urgent.is_empty() {
                self.urgent
                    .push_back(Out::Plain(vec![Inner::Keepalive as u8]));
            }
            // Path choice only changes with probe rounds and answers (which
            // call `choose` themselves), so it is not redone on every timer.
            let probed = self.paths.poll_timeout().is_some_and(|t| t <= now);
            while let Some((via, id)) = self.paths.poll_probe(now) {
                if let Ok(m) = (Control::PathProbe { id }).encode() {
                    let mut v = Vec::with_capacity(1 + m.len());
                    v.push(Inner::Control as u8);
                    v.extend_from_slice(&m);
                    self.urgent.push_back(Out::PlainTo(via, v));
                }
            }
            if probed {
                self.paths.choose(now);
                self.track_path();
                if self.paths.wants_punch(now) && now >= self.next_punch_req {
                    self.events.push_back(Event::PunchWanted);
                    self.next_punch_req = now + PUNCH_REQUEST_EVERY;
                }
            }
        }
    }

    /// The conversation that may send next: round-robin over those with queued
    /// packets, each allowed while the total inflight is under the controller's
    /// cap or its own inflight is under its fair share (so a flow stuck on
    /// losses cannot take the whole window from the others).
    fn next_admissible(&self) -> Option<u32> {
        // The cap is in bytes; KCP counts segments, so convert with the
        // average size of what was admitted (small packets => more segments).
        let cap = (self.cc.inflight_cap() / self.avg_seg).max(32.0);
        let total: usize = self.convs.values().map(|c| c.kcp.wait_snd()).sum();
        let busy = self
            .convs
            .values()
            .filter(|c| !c.queue.is_empty() || c.kcp.wait_snd() > 0)
            .count()
            .max(1);
        let share = (cap / busy as f64).max(4.0);
        self.convs
            .range(self.rr_conv.wrapping_add(1)..)
            .chain(self.convs.range(..=self.rr_conv))
            .find(|(id, c)| {
                !c.queue.is_empty()
                    && !self.paced.contains_key(id)
                    && ((total as f64) < cap || (c.kcp.wait_snd() as f64) < share)
            })
            .map(|(id, _)| *id)
    }

    /// Move queued packets into KCP as the pacer and the window allow, one
    /// conversation after another. Returns the conversations that got data.
    fn admit(&mut self, now: Duration) -> BTreeSet<u32> {
        let mut touched = BTreeSet::new();
        if self.current.is_none() {
            return touched;
        }
        let rate = self.cc.pacing_rate();
        // A conversation with output still waiting for the pacer is skipped
        // (`next_admissible`), so retransmissions go before its new data,
        // while other conversations are not held back by them.
        let mut budget = self.pacer.budget(now, rate);
        while self.queued > 0 && budget > 0.0 {
            let Some(id) = self.next_admissible() else {
                break;
            };
            let c = self.convs.get_mut(&id).expect("found above");
            let pkt = c.queue.pop_front().expect("non-empty");
            self.queued -= 1;
            self.rr_conv = id;
            if c.kcp.send(&pkt).is_err() {
                self.stats.malformed += 1;
                continue;
            }
            let seg = (pkt.len() + 1 + kcp::KCP_OVERHEAD + wire::DATA_OVERHEAD) as f64;
            self.avg_seg = self.avg_seg * 0.95 + seg * 0.05;
            budget -= seg;
            touched.insert(id);
        }
        touched
    }

    fn collect_kcp(&mut self, now: Duration) {
        let out = match self.sink.0.lock() {
            Ok(mut s) => std::mem::take(&mut *s),
            Err(_) => return,
        };
        for pkt in out {
            if carries_data(&pkt[1..]) {
                self.last_kcp_tx = now;
                let conv = kcp::get_conv(&pkt[1..]);
                if let Some(c) = self.convs.get_mut(&conv) {
                    for sn in data_sns(&pkt[1..]) {
                        if (sn.wrapping_sub(c.next_sn) as i32) < 0 {
                            self.stats.retransmits += 1;
                        } else {
                            c.next_sn = sn.wrapping_add(1);
                        }
                    }
                }
                self.paced.entry(conv).or_default().push_back(pkt);
                self.paced_len += 1;
            } else {
                self.urgent.push_back(Out::Plain(pkt));
            }
        }
    }

    // ---------------------------------------------------------------- output

    /// Write the next frame to send into `buf`; returns its destination.
    pub fn poll_transmit(&mut self, now: Duration, buf: &mut Vec<u8>) -> Option<Via> {
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
                    Out::Plain(p) => {
                        if p.first() == Some(&(Inner::Ip as u8)) {
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
                self.pacer
                    .on_send(now, p.len() + wire::DATA_OVERHEAD, self.cc.pacing_rate());
                p
            } else {
                return None;
            };
            if self.seal(&plain, buf) {
                self.count_tx(now, buf.len());
                return Some(to);
            }
        }
    }

    fn pop_paced(&mut self) -> Vec<u8> {
        let key = self
            .paced
            .range(self.paced_last.wrapping_add(1)..)
            .next()
            .or_else(|| self.paced.iter().next())
            .map(|(k, _)| *k)
            .expect("paced_len > 0");
        let q = self.paced.get_mut(&key).expect("key from map");
        let p = q.pop_front().expect("queues in the map are non-empty");
        if q.is_empty() {
            self.paced.remove(&key);
        }
        self.paced_len -= 1;
        self.paced_last = key;
        p
    }

    fn count_tx(&mut self, now: Duration, n: usize) {
        self.stats.tx_frames += 1;
        self.stats.tx_bytes += n as u64;
        self.last_tx = now;
    }

    fn seal(&mut self, plain: &[u8], buf: &mut Vec<u8>) -> bool {
        let Some(kp) = self.current.as_mut() else {
            return false;
        };
        let n = plain.len();
        buf.clear();
        buf.resize(wire::DATA_HEADER_LEN + n + wire::TAG_LEN, 0);
        wire::write_data_header(buf, kp.remote_index, kp.send_counter);
        buf[wire::DATA_HEADER_LEN..wire::DATA_HEADER_LEN + n].copy_from_slice(plain);
        let (h, rest) = buf.split_at_mut(wire::DATA_HEADER_LEN);
        match kp.keys.seal(kp.send_counter, h, &mut rest[..n]) {
            Ok(tag) => {
                rest[n..].copy_from_slice(&tag);
                kp.send_counter += 1;
                true
            }
            Err(_) => false,
        }
    }

    /// Next inner IP packet received from the remote.
    pub fn poll_rx(&mut self) -> Option<Vec<u8>> {
        self.rx.pop_front()
    }

    /// Next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Forget all keys (the node is removing this peer).
    pub fn close(&mut self, ctx: &mut Ctx) {
        for i in self.indices() {
            ctx.indices.remove(&i);
        }
        self.current = None;
        self.previous = None;
        self.next = None;
        self.pending_init = None;
        self.reset_convs();
    }
}

/// Does a KCP output buffer contain a data (PUSH) segment?
/// Sequence numbers of the data (PUSH) segments in one KCP output datagram.
fn data_sns(mut b: &[u8]) -> impl Iterator<Item = u32> + '_ {
    const PUSH: u8 = 81;
    std::iter::from_fn(move || {
        while b.len() >= kcp::KCP_OVERHEAD {
            let cmd = b[4];
            let sn = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
            let len = u32::from_le_bytes([b[20], b[21], b[22], b[23]]) as usize;
            let next = kcp::KCP_OVERHEAD.saturating_add(len).min(b.len());
            b = &b[next..];
            if cmd == PUSH {
                return Some(sn);
            }
        }
        None
    })
}

fn carries_data(mut b: &[u8]) -> bool {
    const PUSH: u8 = 81;
    while b.len() >= kcp::KCP_OVERHEAD {
        if b[4] == PUSH {
            return true;
        }
        let len = u32::from_le_bytes([b[20], b[21], b[22], b[23]]) as usize;
        let next = kcp::KCP_OVERHEAD.saturating_add(len);
        if next > b.len() {
            return false;
        }
        b = &b[next..];
    }
    false
}
