//! A node: every session of one UDP socket, sans-IO.
//!
//! One socket carries the sessions with all peers in both directions; every node
//! is client and server on one port. The node demultiplexes incoming frames by
//! the receiver index in their header (so a peer whose address changes keeps its
//! session), answers handshakes from allowed keys, and merges the sessions'
//! output. Poll order: inputs, then [`Node::service`] (`handle_timeout`,
//! `poll_transmit`, `poll_rx`, `poll_event`; see [`crate::driver`]).

use crate::crypto::{EntropySource, ResponderHello, StaticKeypair};
use crate::ip;
use crate::path::Via;
use crate::session::{Ctx, Event, Session, SessionConfig, SessionStats};
use crate::split::{Split, SplitConfig, SplitStats, Verdict};
use crate::wire::{Control, Frame, Inner, PublicKey};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Which handshake initiators a node answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Anyone holding the network key (a hub).
    AnyWithNetworkKey,
    /// Only keys added with [`Node::add_peer`] (a peer: the hub tells it who exists).
    KnownPeers,
}

/// Node settings.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Settings applied to every session.
    pub session: SessionConfig,
    /// Who may open a session with us.
    pub admission: Admission,
    /// Handshake initiations processed per second from one IP address
    /// (each costs Diffie-Hellman work before anything is authenticated)...
    pub init_rate_per_source: f64,
    /// ...and from everyone together. Excess initiations are dropped, counted.
    pub init_rate_total: f64,
    /// Most sessions a node admitting [`Admission::AnyWithNetworkKey`] holds.
    /// A newcomer beyond it replaces the session silent the longest if that
    /// one has been silent for [`EVICT_SILENT`], and is refused otherwise.
    pub max_sessions: usize,
    /// Forward relay messages between the node's sessions (a hub).
    pub relay: bool,
    /// Split TCP (see [`crate::split`]).
    pub split: SplitConfig,
    /// Most bytes all sessions together may hold for others: relayed frames
    /// waiting to go and reliable control messages not yet acknowledged.
    /// Beyond it both are refused and counted (`budget_dropped`).
    pub memory_budget: usize,
}

/// [`NodeConfig::memory_budget`] by default: at most this much of a hub's
/// memory goes to what members make it hold for them.
pub const MEMORY_BUDGET: usize = 1 << 30;

/// While the node is at its budget, the sessions' holdings are counted again
/// at most this often (the count walks every session).
pub const BUDGET_RECOUNT: Duration = Duration::from_millis(50);

/// The node's memory budget and its running estimate.
struct Budget {
    limit: usize,
    /// Held at the last count over the sessions...
    counted: usize,
    /// ...plus what was admitted since.
    added: usize,
    /// When the last count was made.
    at: Option<Duration>,
}

/// How long a session must have been silent before a newcomer may replace it
/// when the node is at [`NodeConfig::max_sessions`].
pub const EVICT_SILENT: Duration = Duration::from_secs(30);

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            session: SessionConfig::default(),
            admission: Admission::KnownPeers,
            init_rate_per_source: 20.0,
            init_rate_total: 1000.0,
            max_sessions: 16_384,
            relay: false,
            split: SplitConfig::default(),
            memory_budget: MEMORY_BUDGET,
        }
    }
}

/// Token buckets bounding pre-authentication work: one per source address
/// (at most [`MAX_SOURCES`] tracked; idle ones are forgotten) and one for all.
struct InitLimiter {
    per_source: BTreeMap<std::net::IpAddr, (f64, Duration)>,
    total: (f64, Duration),
    rate: f64,
    rate_total: f64,
}

/// Source addresses the initiation limiter tracks at most.
pub const MAX_SOURCES: usize = 4096;

/// Shortest time between two [`Event::UnknownPeer`] for one key.
pub const UNKNOWN_REPORT_EVERY: Duration = Duration::from_secs(2);
/// Most keys reported as unknown within [`UNKNOWN_REPORT_EVERY`].
pub const UNKNOWN_REPORT_KEYS: usize = 64;

impl InitLimiter {
    fn take(bucket: &mut (f64, Duration), now: Duration, rate: f64) -> bool {
        let burst = (rate * 2.0).max(1.0);
        let dt = now.saturating_sub(bucket.1).as_secs_f64();
        bucket.0 = (bucket.0 + dt * rate).min(burst);
        bucket.1 = now;
        if bucket.0 >= 1.0 {
            bucket.0 -= 1.0;
            true
        } else {
            false
        }
    }

    fn allow_total(&mut self, now: Duration) -> bool {
        Self::take(&mut self.total, now, self.rate_total)
    }

    fn allow(&mut self, now: Duration, ip: std::net::IpAddr) -> bool {
        if !self.per_source.contains_key(&ip) && self.per_source.len() >= MAX_SOURCES {
            // Forget sources idle for 10 s; if none, refuse newcomers.
            self.per_source
                .retain(|_, b| now.saturating_sub(b.1) < Duration::from_secs(10));
            if self.per_source.len() >= MAX_SOURCES {
                return false;
            }
        }
        let burst = (self.rate * 2.0).max(1.0);
        let b = self.per_source.entry(ip).or_insert((burst, now));
        Self::take(b, now, self.rate) && Self::take(&mut self.total, now, self.rate_total)
    }
}

/// Drops and refusals, counted (never a panic).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Not a frame: too short, bad version, bad type, bad length.
    pub malformed: u64,
    /// Data or response frames for an index no session holds.
    pub unknown_index: u64,
    /// Handshake initiations that failed Noise (wrong network key, tampered, wrong responder).
    pub handshake_failed: u64,
    /// Valid initiations from keys we do not admit.
    pub unknown_key: u64,
    /// Initiations refused as replays or as the losing side of a simultaneous start.
    pub init_refused: u64,
    /// Data frames whose tag did not verify.
    pub auth_failed: u64,
    /// Data frames dropped as replays.
    pub replayed: u64,
    /// Inner packets for peers we have no session with.
    pub no_route: u64,
    /// Handshake initiations dropped by the rate limit (before any crypto).
    pub init_rate_limited: u64,
    /// Initiations from new keys refused because the node holds
    /// [`NodeConfig::max_sessions`] sessions, none of them silent long enough.
    pub session_cap: u64,
    /// Sessions dropped to make room for a newcomer at the cap.
    pub evicted: u64,
    /// Frames forwarded between two of our sessions (as a relay).
    pub relayed: u64,
    /// Bytes of those frames.
    pub relayed_bytes: u64,
    /// Relay messages dropped: not a relay, unknown or unready destination,
    /// from a node we do not take relayed frames from, or a full queue.
    pub relay_dropped: u64,
    /// Relayed frames and reliable control messages refused because the
    /// node held [`NodeConfig::memory_budget`] bytes for others.
    pub budget_dropped: u64,
}

/// Why the node refused to send.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The peer is not known to this node.
    #[error("unknown peer")]
    UnknownPeer,
}

/// A node's sessions by remote key, boxed: a map node has room for eleven,
/// and a hub holds thousands of idle sessions.
pub(crate) type Sessions = BTreeMap<PublicKey, Box<Session>>;

/// All sessions of one UDP socket.
pub struct Node {
    cfg: Arc<SessionConfig>,
    admission: Admission,
    max_sessions: usize,
    budget: Budget,
    relaying: bool,
    /// The heartbeat interval every session is told (see
    /// [`Node::set_heartbeat`]).
    heartbeat: Option<Duration>,
    relays: Vec<PublicKey>,
    /// Relays reached by a stream (see [`Node::set_last_resort_relays`]).
    last_resort: Vec<PublicKey>,
    scratch: Vec<u8>,
    /// The frame buffer [`Node::service`] lends to `poll_transmit`.
    txbuf: Vec<u8>,
    /// The frame last returned by `poll_transmit` is a path MTU probe.
    tx_probe: bool,
    local: StaticKeypair,
    psk: [u8; 32],
    incarnation: u64,
    wall_base_ms: u64,
    entropy: EntropySource,
    sessions: Sessions,
    indices: BTreeMap<u32, PublicKey>,
    /// Sessions that took input or a command since the last
    /// `handle_timeout`: they run then, whatever their timers say.
    ready: BTreeSet<PublicKey>,
    /// Every session's next deadline, in time order (the timer queue), and
    /// the deadline each session is filed under.
    timers: BTreeSet<(Duration, PublicKey)>,
    deadline: BTreeMap<PublicKey, Duration>,
    /// Sessions that may have frames to send, in turn order (one frame per
    /// session per turn), and the set of them.
    txq: VecDeque<PublicKey>,
    in_txq: BTreeSet<PublicKey>,
    /// Sessions that may hold received inner packets.
    rxq: BTreeSet<PublicKey>,
    /// Sessions whose stream events wait for the split proxy.
    streams: BTreeSet<PublicKey>,
    events: VecDeque<(PublicKey, Event)>,
    /// Unknown initiators reported, and when (see [`Node::report_unknown`]).
    unknown_reported: BTreeMap<PublicKey, Duration>,
    now: Duration,
    stats: NodeStats,
    limiter: InitLimiter,
    split: Split,
}

impl Node {
    /// A node with key pair `local` in the network keyed by `psk`.
    /// `wall_base_ms` is the wall clock (ms since the Unix epoch) at time zero of
    /// the `now` values passed later; it only orders handshake initiations.
    pub fn new(
        cfg: NodeConfig,
        local: StaticKeypair,
        psk: [u8; 32],
        wall_base_ms: u64,
        mut entropy: EntropySource,
    ) -> Node {
        let mut inc = [0u8; 8];
        entropy.fill(&mut inc);
        let (cfg_rate, cfg_total) = (cfg.init_rate_per_source, cfg.init_rate_total);
        let split = Split::new(cfg.split, cfg.session.tun_mtu());
        Node {
            split,
            cfg: Arc::new(cfg.session),
            admission: cfg.admission,
            max_sessions: cfg.max_sessions.max(1),
            budget: Budget {
                limit: cfg.memory_budget,
                counted: 0,
                added: 0,
                at: None,
            },
            relaying: cfg.relay,
            heartbeat: None,
            relays: Vec::new(),
            last_resort: Vec::new(),
            scratch: Vec::with_capacity(2048),
            txbuf: Vec::with_capacity(2048),
            tx_probe: false,
            local,
            psk,
            incarnation: u64::from_le_bytes(inc),
            wall_base_ms,
            entropy,
            sessions: BTreeMap::new(),
            indices: BTreeMap::new(),
            ready: BTreeSet::new(),
            timers: BTreeSet::new(),
            deadline: BTreeMap::new(),
            txq: VecDeque::new(),
            in_txq: BTreeSet::new(),
            rxq: BTreeSet::new(),
            streams: BTreeSet::new(),
            events: VecDeque::new(),
            unknown_reported: BTreeMap::new(),
            now: Duration::ZERO,
            stats: NodeStats::default(),
            limiter: InitLimiter {
                per_source: BTreeMap::new(),
                total: ((cfg_total * 2.0).max(1.0), Duration::ZERO),
                rate: cfg_rate,
                rate_total: cfg_total,
            },
        }
    }

    /// This node's public key.
    pub fn public_key(&self) -> &PublicKey {
        &self.local.public
    }

    /// The session settings.
    pub fn session_config(&self) -> &SessionConfig {
        &self.cfg
    }

    /// Drop counters.
    pub fn stats(&self) -> &NodeStats {
        &self.stats
    }

    /// Split TCP counters.
    pub fn split_stats(&self) -> SplitStats {
        self.split.stats()
    }

    /// Per-peer counters.
    pub fn peer_stats(&self, key: &PublicKey) -> Option<SessionStats> {
        self.sessions.get(key).map(|s| s.stats())
    }

    /// The session with `key`, if any.
    pub fn session(&self, key: &PublicKey) -> Option<&Session> {
        self.sessions.get(key).map(|s| &**s)
    }

    /// Keys of all peers.
    pub fn peers(&self) -> impl Iterator<Item = &PublicKey> {
        self.sessions.keys()
    }

    /// Admit `key` and send to it at `endpoint` (if known). Idempotent; a new
    /// endpoint replaces the old one.
    pub fn add_peer(&mut self, key: PublicKey, endpoint: Option<SocketAddr>) {
        let cfg = self.cfg.clone();
        let local = self.local.public;
        let entropy = &mut self.entropy;
        let base = self.incarnation;
        let relays = &self.relays;
        let last_resort = &self.last_resort;
        let heartbeat = self.heartbeat;
        let s = self.sessions.entry(key).or_insert_with(|| {
            let mut b = [0u8; 8];
            entropy.fill(&mut b);
            let mut s = Box::new(Session::new(
                cfg,
                &local,
                key,
                endpoint,
                base ^ u64::from_le_bytes(b),
            ));
            if relays.contains(&key) {
                s.set_control_only();
            } else {
                s.set_relays(relays);
                s.set_last_resort_relays(last_resort);
            }
            if let Some(h) = heartbeat {
                s.set_heartbeat(h);
            }
            s
        });
        if let Some(ep) = endpoint {
            s.set_endpoint(ep);
        }
        self.ready.insert(key);
    }

    /// Heartbeats go between this node and every peer (a member's own, or a
    /// hub's members') every `interval`: sessions send keepalives and
    /// declare links dead by it (see [`Session::set_heartbeat`]).
    pub fn set_heartbeat(&mut self, interval: Duration) {
        self.heartbeat = Some(interval);
        for (k, s) in self.sessions.iter_mut() {
            s.set_heartbeat(interval);
            self.ready.insert(*k);
        }
    }

    /// Whether this node forwards relay messages between its sessions (a
    /// hub's setting, changed by a reload).
    pub fn set_relaying(&mut self, on: bool) {
        self.relaying = on;
    }

    /// Nodes (hubs) that may relay frames to and from our peers. Their own
    /// sessions are always direct.
    pub fn set_relays(&mut self, relays: &[PublicKey]) {
        self.relays = relays.to_vec();
        for (k, s) in self.sessions.iter_mut() {
            if relays.contains(k) {
                s.set_relays(&[]);
                s.set_control_only();
            } else {
                s.set_relays(relays);
            }
            self.ready.insert(*k);
        }
    }

    /// The relays set with [`Node::set_relays`].
    pub fn relays(&self) -> &[PublicKey] {
        &self.relays
    }

    /// Relays that our frames reach by a stream (TCP or TLS fallback): every
    /// session takes them only when no other relay answers.
    pub fn set_last_resort_relays(&mut self, relays: &[PublicKey]) {
        self.last_resort = relays.to_vec();
        for s in self.sessions.values_mut() {
            s.set_last_resort_relays(relays);
        }
    }

    /// The direct candidates of `key` (the hub's peer map), best first.
    pub fn set_candidates(&mut self, key: &PublicKey, eps: &[SocketAddr]) {
        if let Some(s) = self.sessions.get_mut(key) {
            s.set_candidates(eps);
            self.ready.insert(*key);
        }
    }

    /// A hub asked us to try `key`'s candidates now (it tells `key` the same).
    pub fn punch(&mut self, now: Duration, key: &PublicKey, eps: &[SocketAddr]) {
        if let Some(s) = self.sessions.get_mut(key) {
            s.punch(now, eps);
            self.ready.insert(*key);
        }
    }

    /// Forget `key`: its session keys are dropped at once.
    pub fn remove_peer(&mut self, key: &PublicKey) {
        if let Some(mut s) = self.sessions.remove(key) {
            let mut ctx = Ctx {
                now: self.now,
                wall_ms: 0,
                local: &self.local,
                psk: &self.psk,
                incarnation: self.incarnation,
                entropy: &mut self.entropy,
                indices: &mut self.indices,
            };
            s.close(&mut ctx);
        }
        self.split.forget_peer(key);
        self.ready.remove(key);
        if let Some(t) = self.deadline.remove(key) {
            self.timers.remove(&(t, *key));
        }
        // (`txq` skips keys without a session.)
        self.in_txq.remove(key);
        self.rxq.remove(key);
        self.streams.remove(key);
    }

    fn ctx(&mut self, now: Duration) -> (Ctx<'_>, &mut Sessions) {
        self.now = now;
        (
            Ctx {
                now,
                wall_ms: self.wall_base_ms + now.as_millis() as u64,
                local: &self.local,
                psk: &self.psk,
                incarnation: self.incarnation,
                entropy: &mut self.entropy,
                indices: &mut self.indices,
            },
            &mut self.sessions,
        )
    }

    /// Send an inner IP packet to `peer`.
    pub fn send_ip(
        &mut self,
        now: Duration,
        peer: &PublicKey,
        pkt: &[u8],
    ) -> Result<(), SendError> {
        if !self.sessions.contains_key(peer) {
            self.stats.no_route += 1;
            return Err(SendError::UnknownPeer);
        }
        if let Some(info) = ip::parse(pkt).filter(|i| i.proto == ip::PROTO_TCP) {
            let worth = self
                .sessions
                .get(peer)
                .is_some_and(|s| s.split_worthwhile());
            if self.split.on_outbound(now, peer, pkt, &info, worth) == Verdict::Taken {
                self.now = now;
                self.ready.insert(*peer);
                if self.sessions.get(peer).is_some_and(|s| !s.is_established()) {
                    let _ = self.ensure_handshake(now, peer);
                }
                return Ok(());
            }
        }
        let (mut ctx, sessions) = self.ctx(now);
        let Some(s) = sessions.get_mut(peer) else {
            self.stats.no_route += 1;
            return Err(SendError::UnknownPeer);
        };
        s.send_ip(&mut ctx, pkt);
        self.ready.insert(*peer);
        Ok(())
    }

    /// Send a control message to `peer` as a datagram; false if no session yet.
    pub fn send_control(&mut self, peer: &PublicKey, msg: &Control) -> bool {
        let ok = self
            .sessions
            .get_mut(peer)
            .is_some_and(|s| s.send_control(msg));
        if ok {
            self.ready.insert(*peer);
        }
        ok
    }

    /// Send a control message to `peer` reliably and in order (refused,
    /// and counted, when the node holds its memory budget).
    pub fn send_control_reliable(
        &mut self,
        now: Duration,
        peer: &PublicKey,
        msg: &Control,
    ) -> bool {
        let Some(s) = self.sessions.get_mut(peer) else {
            return false;
        };
        let Ok(v) = msg.encode() else {
            s.count_control_too_large();
            return false;
        };
        let cost = s.control_cost(now, v.len());
        self.now = self.now.max(now);
        if !self.admit(cost) {
            return false;
        }
        let ok = self
            .sessions
            .get_mut(peer)
            .is_some_and(|s| s.send_control_encoded(now, &v));
        if ok {
            self.ready.insert(*peer);
        }
        ok
    }

    /// Start a handshake with `peer` now (e.g. to register with a hub).
    pub fn connect(&mut self, now: Duration, peer: &PublicKey) -> Result<(), SendError> {
        let (mut ctx, sessions) = self.ctx(now);
        let s = sessions.get_mut(peer).ok_or(SendError::UnknownPeer)?;
        s.start_handshake(&mut ctx);
        self.ready.insert(*peer);
        Ok(())
    }

    /// Start a handshake with `peer` unless one is already under way.
    pub fn ensure_handshake(&mut self, now: Duration, peer: &PublicKey) -> Result<(), SendError> {
        if self.sessions.get(peer).is_some_and(|s| s.handshaking()) {
            return Ok(());
        }
        self.connect(now, peer)
    }

    /// KCP segments waiting for `peer` (for flow control by the caller).
    pub fn kcp_backlog(&self, peer: &PublicKey) -> usize {
        self.sessions.get(peer).map_or(0, |s| s.kcp_backlog())
    }

    /// Handle one UDP payload from `from`. `buf` is decrypted in place.
    pub fn handle_datagram(&mut self, now: Duration, from: SocketAddr, buf: &mut [u8]) {
        self.handle_via(now, Via::Direct(from), buf, 0);
    }

    /// Handle one frame that came by `via`; `depth` 1 for a frame a relay
    /// delivered (whose own relay messages are not followed further).
    fn handle_via(&mut self, now: Duration, via: Via, buf: &mut [u8], depth: u8) {
        let frame = match Frame::parse(buf) {
            Ok(f) => f,
            Err(_) => {
                self.stats.malformed += 1;
                return;
            }
        };
        match frame {
            Frame::HandshakeInit {
                sender_index,
                noise,
            } => {
                let allowed = match via {
                    Via::Direct(a) => self.limiter.allow(now, a.ip()),
                    Via::Relay(_) => self.limiter.allow_total(now),
                };
                if !allowed {
                    self.stats.init_rate_limited += 1;
                    return;
                }
                let noise = noise.to_vec();
                self.on_init(now, via, sender_index, &noise)
            }
            Frame::HandshakeResp {
                sender_index,
                receiver_index,
                noise,
            } => {
                let noise = noise.to_vec();
                let Some(key) = self.indices.get(&receiver_index).copied() else {
                    self.stats.unknown_index += 1;
                    return;
                };
                let (mut ctx, sessions) = self.ctx(now);
                if let Some(s) = sessions.get_mut(&key) {
                    if s.on_resp(&mut ctx, sender_index, receiver_index, &noise, via)
                        .is_err()
                    {
                        self.stats.handshake_failed += 1;
                    }
                    self.ready.insert(key);
                }
            }
            Frame::Data {
                receiver_index,
                counter,
                ..
            } => {
                let Some(key) = self.indices.get(&receiver_index).copied() else {
                    self.stats.unknown_index += 1;
                    return;
                };
                let (mut ctx, sessions) = self.ctx(now);
                let mut relayed = None;
                let mut failed = (0, 0);
                if let Some(s) = sessions.get_mut(&key) {
                    let before = s.stats();
                    if s.on_data(&mut ctx, receiver_index, counter, buf, via)
                        .is_err()
                    {
                        let after = s.stats();
                        failed = (
                            after.auth_failed - before.auth_failed,
                            after.replayed - before.replayed,
                        );
                    }
                    let r = s.take_relayed();
                    if !r.is_empty() {
                        relayed = Some(r);
                    }
                    self.ready.insert(key);
                    self.rxq.insert(key);
                }
                self.stats.auth_failed += failed.0;
                self.stats.replayed += failed.1;
                if let Some(r) = relayed {
                    self.on_relayed(now, key, r, depth);
                }
            }
        }
    }

    /// Relay messages that arrived in `sender`'s session: forward them (a
    /// relay), or take the frames inside as having come by that relay (a
    /// peer whose relay `sender` is).
    fn on_relayed(
        &mut self,
        now: Duration,
        sender: PublicKey,
        items: VecDeque<Vec<u8>>,
        depth: u8,
    ) {
        // Each item: inner type, 32-byte key, frame (length checked on receipt).
        for mut msg in items {
            let mut key = [0u8; 32];
            key.copy_from_slice(&msg[1..33]);
            if self.relaying {
                let len = (msg.len() - 33) as u64;
                let ok = key != sender
                    && self.admit(msg.len())
                    && self
                        .sessions
                        .get_mut(&key)
                        .is_some_and(|d| d.is_established() && d.queue_relay(&sender, msg));
                if ok {
                    self.stats.relayed += 1;
                    self.stats.relayed_bytes += len;
                    self.ready.insert(key);
                } else {
                    self.stats.relay_dropped += 1;
                }
            } else if depth == 0 && self.relays.contains(&sender) {
                self.handle_via(now, Via::Relay(sender), &mut msg[33..], depth + 1);
            } else {
                self.stats.relay_dropped += 1;
            }
        }
    }

    fn on_init(&mut self, now: Duration, from: Via, sender_index: u32, noise: &[u8]) {
        let hello = match ResponderHello::read(&self.local, &self.psk, noise, &mut self.entropy) {
            Ok(h) => h,
            Err(_) => {
                self.stats.handshake_failed += 1;
                return;
            }
        };
        let key = hello.remote;
        if !self.sessions.contains_key(&key) {
            match self.admission {
                Admission::KnownPeers => {
                    self.stats.unknown_key += 1;
                    self.report_unknown(now, key);
                    return;
                }
                Admission::AnyWithNetworkKey => {
                    if self.sessions.len() >= self.max_sessions && !self.evict_one(now) {
                        self.stats.session_cap += 1;
                        return;
                    }
                    self.add_peer(key, from.direct());
                    if let Some(s) = self.sessions.get_mut(&key) {
                        s.set_born(now);
                    }
                }
            }
        }
        let (mut ctx, sessions) = self.ctx(now);
        let s = sessions.get_mut(&key).expect("added above");
        if !s.on_init(&mut ctx, hello, sender_index, from) {
            self.stats.init_refused += 1;
        }
        self.ready.insert(key);
    }

    /// Raise [`Event::UnknownPeer`] for `key`, at most once per
    /// [`UNKNOWN_REPORT_EVERY`] per key and for at most
    /// [`UNKNOWN_REPORT_KEYS`] keys at a time (a flood of strangers with the
    /// network key costs a bounded table, and the rest are only counted).
    fn report_unknown(&mut self, now: Duration, key: PublicKey) {
        self.unknown_reported
            .retain(|_, t| now.saturating_sub(*t) < UNKNOWN_REPORT_EVERY);
        if self.unknown_reported.len() >= UNKNOWN_REPORT_KEYS
            || self.unknown_reported.contains_key(&key)
        {
            return;
        }
        self.unknown_reported.insert(key, now);
        self.events.push_back((key, Event::UnknownPeer));
    }

    /// Drop the session silent the longest if it has been silent for
    /// [`EVICT_SILENT`]; false if every session is more recent.
    fn evict_one(&mut self, now: Duration) -> bool {
        let oldest = self
            .sessions
            .iter()
            .min_by_key(|(_, s)| s.last_activity())
            .map(|(k, s)| (*k, s.last_activity()));
        match oldest {
            Some((k, last)) if now.saturating_sub(last) >= EVICT_SILENT => {
                self.remove_peer(&k);
                self.events.push_back((k, Event::Evicted));
                self.stats.evicted += 1;
                true
            }
            _ => false,
        }
    }

    /// Bytes all sessions hold for others now (walks every session).
    pub fn held_bytes(&self) -> usize {
        self.sessions.values().map(|s| s.held_bytes()).sum()
    }

    /// Whether `len` more bytes held for others fit the budget. The count
    /// is the last walk over the sessions plus what was admitted since (it
    /// only overestimates); a walk happens only when that estimate is full,
    /// at most every [`BUDGET_RECOUNT`].
    fn admit(&mut self, len: usize) -> bool {
        let b = &mut self.budget;
        if b.counted + b.added + len <= b.limit {
            b.added += len;
            return true;
        }
        if b.at.is_none_or(|t| self.now >= t + BUDGET_RECOUNT) {
            let held = self.held_bytes();
            let b = &mut self.budget;
            b.counted = held;
            b.added = 0;
            b.at = Some(self.now);
            if held + len <= b.limit {
                b.added = len;
                return true;
            }
        }
        self.stats.budget_dropped += 1;
        false
    }

    /// Whether anything since the last `handle_timeout` needs the poll
    /// sequence (a session took input, or events wait). False after input that
    /// was only dropped (a flood), so the caller can skip the work.
    pub fn needs_service(&self) -> bool {
        !self.ready.is_empty() || !self.events.is_empty()
    }

    /// Earliest time `handle_timeout` should run. O(1): the timer queue's
    /// first entry.
    pub fn poll_timeout(&self) -> Option<Duration> {
        if !self.ready.is_empty() || !self.streams.is_empty() {
            return Some(self.now);
        }
        let first = self.timers.first().map(|(t, _)| *t);
        match (first, self.split.poll_timeout(self.now)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Debug builds, nodes of up to 64 sessions (the check walks them all):
    /// every session's filed deadline is no later than the one it reports (a
    /// later one would be a missed wake-up), and every session with a frame
    /// to send now has a turn.
    #[cfg(debug_assertions)]
    pub(crate) fn check_timers(&self) {
        if self.sessions.len() > 64 {
            return;
        }
        for (k, s) in &self.sessions {
            if self.ready.contains(k) {
                continue;
            }
            let want = s.poll_timeout();
            let filed = self.deadline.get(k).copied();
            let ok = match (want, filed) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(w), Some(f)) => f <= w,
            };
            assert!(
                ok,
                "session {:02x?} wants {want:?}, filed {filed:?}: {}",
                &k[..4],
                s.debug_timers()
            );
            assert!(
                self.in_txq.contains(k) || !s.wants_transmit(self.now),
                "session {:02x?} has output but no turn",
                &k[..4]
            );
        }
    }

    /// File `key`'s next deadline in the timer queue.
    fn reschedule(&mut self, key: &PublicKey) {
        let next = self.sessions.get(key).and_then(|s| s.poll_timeout());
        let old = self.deadline.get(key).copied();
        if old == next {
            return;
        }
        if let Some(t) = old {
            self.timers.remove(&(t, *key));
            self.deadline.remove(key);
        }
        if let Some(t) = next {
            self.timers.insert((t, *key));
            self.deadline.insert(*key, t);
        }
    }

    /// Run what is due: the sessions that took input or commands, and those
    /// whose deadline passed. The cost is in the number of those sessions
    /// (and split connections), not in the number of sessions held.
    pub fn handle_timeout(&mut self, now: Duration) {
        self.now = now;
        let mut active = std::mem::take(&mut self.ready);
        active.append(&mut self.streams);
        // The sessions of split connections: the proxy may feed, open or
        // close their streams.
        active.extend(self.split.flow_peers());
        self.split.poll(now, &mut self.sessions, &active);
        for (peer, syn) in self.split.take_fallback() {
            let (mut ctx, sessions) = self.ctx(now);
            if let Some(s) = sessions.get_mut(&peer) {
                s.send_ip(&mut ctx, &syn);
                active.insert(peer);
            }
        }
        while let Some(&(t, k)) = self.timers.first() {
            if t > now {
                break;
            }
            self.timers.pop_first();
            self.deadline.remove(&k);
            active.insert(k);
        }
        for key in active {
            let (mut ctx, sessions) = self.ctx(now);
            let Some(s) = sessions.get_mut(&key) else {
                continue;
            };
            if s.poll_timeout().is_some_and(|t| t <= now) {
                s.handle_timeout(&mut ctx);
            }
            let mut evs = Vec::new();
            while let Some(e) = s.poll_event() {
                evs.push((key, e));
            }
            let streams = s.has_stream_events();
            self.events.extend(evs);
            if streams {
                self.streams.insert(key);
            }
            self.rxq.insert(key);
            if self.in_txq.insert(key) {
                self.txq.push_back(key);
            }
            self.reschedule(&key);
        }
    }

    /// Next frame to send, written into `buf`; sessions with output take
    /// turns, one frame each.
    pub fn poll_transmit(&mut self, now: Duration, buf: &mut Vec<u8>) -> Option<SocketAddr> {
        while let Some(k) = self.txq.pop_front() {
            if !self.in_txq.contains(&k) {
                continue; // removed
            }
            while let Some((via, probe)) = self
                .sessions
                .get_mut(&k)
                .and_then(|s| s.poll_transmit(now, buf).map(|v| (v, s.took_probe())))
            {
                self.tx_probe = probe;
                let to = match via {
                    Via::Direct(a) => Some(a),
                    Via::Relay(hub) => {
                        // Wrap the frame in a relay message in our session
                        // with the hub.
                        self.scratch.clear();
                        self.scratch.push(Inner::Relay as u8);
                        self.scratch.extend_from_slice(&k);
                        self.scratch.extend_from_slice(buf);
                        self.sessions
                            .get_mut(&hub)
                            .and_then(|h| h.seal_now(now, &self.scratch, buf))
                    }
                };
                match to {
                    Some(a) => {
                        // It may have more: back of the line.
                        self.txq.push_back(k);
                        return Some(a);
                    }
                    None => self.stats.relay_dropped += 1,
                }
            }
            // Nothing more now; sending moved its timers (pacing, keepalive).
            self.in_txq.remove(&k);
            self.reschedule(&k);
        }
        None
    }

    /// Is the frame last returned by [`Node::poll_transmit`] a path MTU
    /// probe (to be sent with the don't-fragment bit)?
    pub fn took_probe(&self) -> bool {
        self.tx_probe
    }

    /// Seal `plain` (inner-type byte first) into `buf` as a data frame of the
    /// session with `peer`, as if this node had built it, and return where
    /// it would go. For fuzzing the receive path behind decryption: nothing
    /// here checks that `plain` is well formed.
    pub fn seal_plaintext(
        &mut self,
        now: Duration,
        peer: &PublicKey,
        plain: &[u8],
        buf: &mut Vec<u8>,
    ) -> Option<SocketAddr> {
        self.sessions.get_mut(peer)?.seal_now(now, plain, buf)
    }

    pub(crate) fn take_txbuf(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.txbuf)
    }

    pub(crate) fn put_txbuf(&mut self, buf: Vec<u8>) {
        self.txbuf = buf;
    }

    /// Next inner IP packet received, with the key of the peer it came from.
    pub fn poll_rx(&mut self) -> Option<(PublicKey, Vec<u8>)> {
        if let Some(p) = self.split.poll_out() {
            return Some(p);
        }
        while let Some(&k) = self.rxq.first() {
            if let Some(p) = self.sessions.get_mut(&k).and_then(|s| s.poll_rx()) {
                return Some((k, p));
            }
            self.rxq.remove(&k);
        }
        None
    }

    /// Next event.
    pub fn poll_event(&mut self) -> Option<(PublicKey, Event)> {
        self.events.pop_front()
    }
}

/// The frame overhead a peer's TUN MTU must leave room for on a `path_mtu` path.
pub fn tun_mtu_for(path_mtu: usize) -> usize {
    SessionConfig {
        path_mtu,
        ..SessionConfig::default()
    }
    .tun_mtu()
}
