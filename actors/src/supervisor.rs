//! The peer's heartbeat supervisor: registers with the hubs, applies the peer
//! map they push (starting and stopping one [`PeerActor`] per member and
//! updating the data plane's peers and routes), heartbeats hubs and peers,
//! re-registers after a hub restart and restarts failed sessions. The timing
//! decisions live in the pure [`Heartbeats`]; this actor only carries them out.

use crate::dataplane::{by_peer, Cmd, GetSnapshot, NetEvent, PlaneStats, Snapshot, Unrouted};
use crate::heartbeat::{Action, HeartbeatConfig, Heartbeats, HubPhase};
use crate::peer::{GetStatus, PeerActor, PeerStatus, Sample, Update};
use crate::peermap::{MapChange, PeerMap};
use crate::registry::short_key;
use actix::prelude::*;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use transport::wire::{Control, ErrorCode, IpNet, PublicKey, MAX_ADDRS, MAX_REMOVALS, MAX_UPSERTS};
use transport::Event;

/// What a peer tells its hubs about itself.
#[derive(Debug, Clone)]
pub struct PeerSetup {
    /// Our key.
    pub me: PublicKey,
    /// Our overlay addresses.
    pub overlay: Vec<IpNet>,
    /// Display name.
    pub name: String,
    /// Local candidate endpoints.
    pub local_endpoints: Vec<SocketAddr>,
    /// Hubs: key and address.
    pub hubs: Vec<(PublicKey, SocketAddr)>,
    /// Heartbeat timing.
    pub heartbeat: HeartbeatConfig,
    /// Subnets this node routes for (advertised to the others).
    pub routes: Vec<IpNet>,
}

/// Why the supervisor gave up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fatal {
    /// A hub refused our address.
    Refused(String),
}

/// Status of one hub link.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HubStatus {
    /// Hub address.
    pub addr: String,
    /// connecting / registered / refused.
    pub state: String,
    /// Seconds since the last ack.
    pub last_ack_s: Option<f64>,
    /// Heartbeat RTT in milliseconds.
    pub rtt_ms: Option<f64>,
    /// Registrations so far.
    pub registrations: u64,
    /// Where this hub last saw us (our NAT's mapping toward it).
    pub observed: Option<String>,
}

/// What `status` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeStatus {
    /// Our name.
    pub name: String,
    /// Our key (short hex).
    pub key: String,
    /// Our overlay addresses.
    pub overlay: Vec<String>,
    /// Subnets we route for.
    pub routes: Vec<String>,
    /// Endpoint the hub sees us at.
    pub observed: Option<String>,
    /// Peer-map version.
    pub map_version: u64,
    /// Heartbeat interval in use (the hub's, once one answered), seconds.
    pub heartbeat_s: f64,
    /// Hubs.
    pub hubs: Vec<HubStatus>,
    /// Peers, in key order.
    pub peers: Vec<PeerStatus>,
    /// Data-plane and drop counters.
    pub counters: BTreeMap<String, u64>,
}

/// Ask for the status.
#[derive(Debug, Message)]
#[rtype(result = "NodeStatus")]
pub struct GetNodeStatus;

/// Replace the hubs (a reload): new ones are registered with, removed ones
/// forgotten; sessions with peers are not touched.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct SetHubs(pub Vec<(PublicKey, SocketAddr)>);

/// New local candidates (e.g. a port mapping the router granted after
/// start): registered again with every hub, which passes them on.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct SetLocalEndpoints(pub Vec<SocketAddr>);

/// A new heartbeat interval from the config file (a reload): used until a
/// hub says otherwise, as at start.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct SetHeartbeat(pub Duration);

/// Tell the hubs we leave (shutdown).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Leave;

/// The supervisor actor.
pub struct Supervisor {
    setup: PeerSetup,
    hb: Heartbeats,
    map: PeerMap,
    plane: Recipient<Cmd>,
    snap: Recipient<GetSnapshot>,
    peers: BTreeMap<PublicKey, Addr<PeerActor>>,
    epoch: Instant,
    observed: Option<SocketAddr>,
    /// Where each hub last saw us.
    observed_by: BTreeMap<PublicKey, SocketAddr>,
    fatal: Option<mpsc::UnboundedSender<Fatal>>,
    last_snapshot: Snapshot,
    /// The hub whose peer map we follow (the first registered one in the
    /// configured order); other hubs' deltas are acknowledged but not applied,
    /// since every hub numbers its map versions on its own.
    map_from: Option<PublicKey>,
    /// Last map version each hub sent us (what we report back to it).
    hub_versions: BTreeMap<PublicKey, u64>,
    /// Where the subnets other members advertise are sent, to be routed
    /// into the TUN device (the whole set each time it changes).
    route_sink: Option<mpsc::UnboundedSender<BTreeSet<IpNet>>>,
    /// The set last sent there.
    subnets: BTreeSet<IpNet>,
    /// Many-port punching per peer: when the next attempt may start, and
    /// the wait after it.
    birthday_next: BTreeMap<PublicKey, (Duration, Duration)>,
    /// The hub whose map we follow sends no map: records are fetched when
    /// a packet or a handshake needs one (see [`Lookups`]).
    on_demand: bool,
    /// What was asked of the hub, and when it may be asked again.
    lookups: Lookups,
    /// Per peer held on demand: inner packets counted at the last sample,
    /// and when that count last moved (records unused for
    /// [`FORGET_AFTER`] are dropped).
    used: BTreeMap<PublicKey, (u64, Duration)>,
    /// Our own address for the data plane's [`Unrouted`] reports.
    unrouted_to: Option<Recipient<Unrouted>>,
}

/// An on-demand record no inner packet used for this long is dropped, and
/// the hub told to stop sending its changes.
pub const FORGET_AFTER: Duration = Duration::from_secs(600);
/// Shortest time before an address or key is asked for again (the hub did
/// not answer, or the answer did not make it routable).
pub const LOOKUP_RETRY: Duration = Duration::from_secs(1);
/// How long an address the hub said nobody has is not asked for again.
pub const LOOKUP_MISSING: Duration = Duration::from_secs(5);
/// Most addresses and keys asked for per second (a scan of the overlay
/// network costs the hub this much, no more).
pub const LOOKUP_RATE: u32 = 64;
/// Most entries in the asked tables.
const LOOKUP_TABLE: usize = 4096;

/// Lookups in flight or recently answered: an address or key is asked for
/// at most once per [`LOOKUP_RETRY`] (once per [`LOOKUP_MISSING`] if nobody
/// has it), and at most [`LOOKUP_RATE`] per second in all.
#[derive(Debug, Default)]
struct Lookups {
    addrs: BTreeMap<IpAddr, Duration>,
    keys: BTreeMap<PublicKey, Duration>,
    /// Second the budget below counts for, and what is left of it.
    window: (u64, u32),
}

impl Lookups {
    fn take(&mut self, now: Duration) -> bool {
        let sec = now.as_secs();
        if self.window.0 != sec {
            self.window = (sec, LOOKUP_RATE);
        }
        if self.window.1 == 0 {
            return false;
        }
        self.window.1 -= 1;
        true
    }

    fn due<K: Ord + Copy>(t: &mut BTreeMap<K, Duration>, now: Duration, k: K) -> bool {
        if t.get(&k).is_some_and(|at| *at > now) {
            return false;
        }
        if t.len() >= LOOKUP_TABLE {
            t.retain(|_, at| *at > now);
            if t.len() >= LOOKUP_TABLE {
                return false;
            }
        }
        t.insert(k, now + LOOKUP_RETRY);
        true
    }

    /// Of `addrs`, those to ask for now (and noted as asked).
    fn addrs(&mut self, now: Duration, addrs: &[IpAddr]) -> Vec<IpAddr> {
        let mut out = Vec::new();
        for a in addrs {
            if out.len() < MAX_ADDRS && Self::due(&mut self.addrs, now, *a) {
                if !self.take(now) {
                    self.addrs.remove(a);
                    break;
                }
                out.push(*a);
            }
        }
        out
    }

    /// Whether to ask for `key` now (and noted as asked).
    fn key(&mut self, now: Duration, key: PublicKey) -> bool {
        if !Self::due(&mut self.keys, now, key) {
            return false;
        }
        if !self.take(now) {
            self.keys.remove(&key);
            return false;
        }
        true
    }

    /// The hub said nobody online has `addr`.
    fn missing(&mut self, now: Duration, addr: IpAddr) {
        self.addrs.insert(addr, now + LOOKUP_MISSING);
    }
}

/// Wait after the first many-port attempt with a peer (the first punch
/// notice may reach one side before it knows the other); doubled after
/// each, up to [`BIRTHDAY_MAX_WAIT`].
pub const BIRTHDAY_WAIT: Duration = Duration::from_secs(10);
/// Longest wait between many-port attempts with one peer.
pub const BIRTHDAY_MAX_WAIT: Duration = Duration::from_secs(1800);

impl Supervisor {
    /// The many-port step of a punch with `peer` (whose endpoints the hub
    /// lists as `theirs`), if one side's NAT changes ports and the last
    /// attempt is long enough ago.
    fn birthday(
        &mut self,
        now: Duration,
        hub: PublicKey,
        peer: &PublicKey,
        theirs: &[SocketAddr],
    ) -> Option<transport::path::Birthday> {
        let seen = self.observed_by.get(&hub).copied().or(self.observed)?;
        let mut mine = vec![seen];
        mine.extend_from_slice(&self.setup.local_endpoints);
        let plan = transport::path::birthday_plan(&mine, theirs)?;
        let (next, wait) = self
            .birthday_next
            .get(peer)
            .copied()
            .unwrap_or((Duration::ZERO, BIRTHDAY_WAIT / 2));
        if now < next {
            return None;
        }
        let wait = (wait * 2).min(BIRTHDAY_MAX_WAIT);
        self.birthday_next.insert(*peer, (now + wait, wait));
        Some(plan)
    }

    /// A supervisor driving the data plane at `plane`/`snap`; a fatal refusal
    /// is reported through `fatal`.
    pub fn new(
        setup: PeerSetup,
        plane: Recipient<Cmd>,
        snap: Recipient<GetSnapshot>,
        fatal: Option<mpsc::UnboundedSender<Fatal>>,
    ) -> Supervisor {
        let hubs: Vec<PublicKey> = setup.hubs.iter().map(|(k, _)| *k).collect();
        Supervisor {
            hb: Heartbeats::new(setup.heartbeat.clone(), &hubs, Duration::ZERO),
            map: PeerMap::new(setup.me),
            setup,
            plane,
            snap,
            peers: BTreeMap::new(),
            epoch: Instant::now(),
            observed: None,
            observed_by: BTreeMap::new(),
            fatal,
            last_snapshot: Snapshot::default(),
            map_from: None,
            hub_versions: BTreeMap::new(),
            birthday_next: BTreeMap::new(),
            on_demand: false,
            lookups: Lookups::default(),
            used: BTreeMap::new(),
            unrouted_to: None,
            route_sink: None,
            subnets: BTreeSet::new(),
        }
    }

    /// Send the subnets other members advertise to `sink` whenever they
    /// change (the binary installs them as routes via the TUN device).
    pub fn with_route_sink(mut self, sink: mpsc::UnboundedSender<BTreeSet<IpNet>>) -> Self {
        self.route_sink = Some(sink);
        self
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn is_hub(&self, k: &PublicKey) -> bool {
        self.setup.hubs.iter().any(|(h, _)| h == k)
    }

    fn send(&self, to: PublicKey, msg: Control, reliable: bool) {
        self.plane.do_send(Cmd::Send { to, msg, reliable });
    }

    fn register_msg(&self, hub: &PublicKey) -> Control {
        Control::Register {
            overlay: self.setup.overlay.clone(),
            local_endpoints: self.setup.local_endpoints.clone(),
            name: self.setup.name.clone(),
            have_version: self.version_for(hub),
            routes: self.setup.routes.clone(),
            lookups: true,
        }
    }

    /// The map version to report to `hub`.
    fn version_for(&self, hub: &PublicKey) -> u64 {
        if self.map_from == Some(*hub) {
            self.map.version()
        } else {
            self.hub_versions.get(hub).copied().unwrap_or(0)
        }
    }

    /// The first hub, in configured order, that has us registered.
    fn map_source(&self) -> Option<PublicKey> {
        self.setup.hubs.iter().map(|(k, _)| *k).find(|k| {
            self.hb
                .hubs()
                .any(|h| h.key == *k && h.phase == HubPhase::Registered)
        })
    }

    /// Heartbeat every `d` from now on; the sessions time their keepalives
    /// and dead links by it.
    fn set_interval(&mut self, d: Duration) {
        let before = self.hb.config().interval;
        self.hb.set_interval(d);
        let now = self.hb.config().interval;
        if now != before {
            self.plane.do_send(Cmd::SetHeartbeat(now));
        }
    }

    fn tick(&mut self) {
        let now = self.now();
        let mut out = Vec::new();
        self.hb.poll(now, &mut out);
        for a in out {
            match a {
                Action::Register(hub) => {
                    let attempts =
                        self.hb
                            .hubs()
                            .find(|h| h.key == hub)
                            .map_or(0, |h| match h.phase {
                                HubPhase::Connecting { attempts } => attempts,
                                _ => 0,
                            });
                    let addr = self
                        .setup
                        .hubs
                        .iter()
                        .find(|(k, _)| *k == hub)
                        .map(|(_, a)| *a);
                    if attempts >= 2 {
                        tracing::warn!(?addr, attempts, "hub not answering; still trying");
                    } else {
                        tracing::debug!(?addr, "registering");
                    }
                    // A fresh handshake: if the hub restarted, the old session is gone.
                    self.plane.do_send(Cmd::Connect(hub));
                    self.send(hub, self.register_msg(&hub), false);
                }
                Action::HubHeartbeat { to, seq } => {
                    let msg = Control::Heartbeat {
                        seq,
                        map_version: self.version_for(&to),
                    };
                    self.send(to, msg, false);
                }
                Action::PeerHeartbeat { to, seq } => {
                    self.send(
                        to,
                        Control::Heartbeat {
                            seq,
                            map_version: 0,
                        },
                        false,
                    );
                }
                Action::RestartPeer(k) => {
                    tracing::info!(peer = %short_key(&k), "peer silent; restarting its session");
                    self.plane.do_send(Cmd::RestartPeer(k));
                    if let Some(info) = self.map.get(&k).cloned() {
                        self.plane.do_send(Cmd::AddPeer {
                            key: k,
                            endpoints: info.endpoints.clone(),
                        });
                        let restarts = self.hb.peer(&k).map_or(0, |p| p.restarts);
                        // The old actor stops when its address is dropped.
                        self.peers.insert(k, PeerActor::new(info, restarts).start());
                    }
                }
            }
        }
    }

    fn apply_changes(&mut self, changes: Vec<MapChange>) {
        if changes.is_empty() {
            return;
        }
        let now = self.now();
        for c in changes {
            match c {
                MapChange::Added(info) => {
                    tracing::info!(peer = %info.name, key = %short_key(&info.key), "peer joined");
                    self.plane.do_send(Cmd::AddPeer {
                        key: info.key,
                        endpoints: info.endpoints.clone(),
                    });
                    self.hb.add_peer(info.key, now);
                    self.peers.insert(info.key, PeerActor::new(info, 0).start());
                }
                MapChange::Changed(info) => {
                    self.plane.do_send(Cmd::AddPeer {
                        key: info.key,
                        endpoints: info.endpoints.clone(),
                    });
                    if let Some(a) = self.peers.get(&info.key) {
                        a.do_send(Update(info));
                    }
                }
                MapChange::Removed(k) => {
                    tracing::info!(key = %short_key(&k), "peer left");
                    self.plane.do_send(Cmd::RemovePeer(k));
                    self.hb.remove_peer(&k);
                    self.peers.remove(&k);
                    self.birthday_next.remove(&k);
                    self.used.remove(&k);
                }
            }
        }
        self.plane.do_send(Cmd::SetRouter(self.map.router()));
        let subnets = self.map.subnet_routes();
        if subnets != self.subnets {
            if let Some(tx) = &self.route_sink {
                let _ = tx.send(subnets.clone());
            }
            self.subnets = subnets;
        }
    }

    fn on_hub_control(&mut self, hub: PublicKey, msg: Control) {
        let now = self.now();
        match msg {
            Control::RegisterAck {
                observed,
                heartbeat_ms,
                on_demand,
            } => {
                if !self.hb.registered() {
                    tracing::info!(%observed, on_demand, "registered with hub");
                }
                self.observed = Some(observed);
                self.observed_by.insert(hub, observed);
                self.set_interval(Duration::from_millis(heartbeat_ms as u64));
                self.hb.on_registered(&hub, now);
                if self.map_source() == Some(hub) {
                    self.set_on_demand(on_demand);
                    if on_demand {
                        // A registration starts the hub's list of what we
                        // hold afresh: ask again for every record we keep,
                        // so that their changes reach us (and the ones that
                        // left are removed).
                        let keys: Vec<PublicKey> = self.map.iter().map(|p| p.key).collect();
                        for chunk in keys.chunks(MAX_UPSERTS) {
                            self.send(
                                hub,
                                Control::Lookup {
                                    addrs: Vec::new(),
                                    keys: chunk.to_vec(),
                                },
                                true,
                            );
                        }
                    }
                }
            }
            Control::Records {
                upserts,
                removals,
                revoked,
                missing,
            } => {
                let denied: Vec<MapChange> =
                    revoked.iter().filter_map(|k| self.map.deny(*k)).collect();
                self.apply_changes(denied);
                for a in missing {
                    self.lookups.missing(now, a);
                }
                // Records come from any hub (one pairs us with a member that
                // asked it for us); removals only from the one we follow, as
                // a member gone from one hub may still be with the others.
                let removals = if self.map_source() == Some(hub) {
                    removals
                } else {
                    Vec::new()
                };
                for p in &upserts {
                    self.used.entry(p.key).or_insert((0, now));
                }
                let changes = self.map.merge(&upserts, &removals);
                self.apply_changes(changes);
            }
            Control::HeartbeatAck {
                seq,
                observed,
                interval_ms,
            } => {
                self.observed = Some(observed);
                self.observed_by.insert(hub, observed);
                self.hb.on_hub_ack(&hub, seq, now);
                // The hub's interval changed (it was reloaded): follow it.
                if let Some(ms) = interval_ms {
                    let d = Duration::from_millis(ms as u64);
                    if d != self.hb.config().interval {
                        tracing::info!(interval = ?d, "hub changed the heartbeat interval");
                        self.set_interval(d);
                    }
                }
            }
            Control::PunchNotify { peer, candidates } if self.map.get(&peer).is_some() => {
                tracing::debug!(peer = %short_key(&peer), ?candidates, "hub asks to punch");
                let birthday = self.birthday(now, hub, &peer, &candidates);
                self.plane.do_send(Cmd::Punch {
                    key: peer,
                    candidates,
                    birthday,
                });
            }
            Control::Nack { code, message } => match code {
                ErrorCode::AddressInUse
                | ErrorCode::RouteInUse
                | ErrorCode::BadRequest
                | ErrorCode::Revoked
                | ErrorCode::NotListed => {
                    tracing::error!(%message, "hub refused registration");
                    self.hb.on_hub_refused(&hub, message.clone());
                    if let Some(f) = &self.fatal {
                        let _ = f.send(Fatal::Refused(message));
                    }
                }
                _ => self.hb.on_hub_forgot(&hub, now),
            },
            Control::PeerMapDelta {
                from_version,
                to_version,
                upserts,
                removals,
                revoked,
            } => {
                // A revocation holds whichever hub says it: hubs do not
                // share their registries, and the one whose map we follow
                // may be cut off from us, or may not have heard of it.
                let denied: Vec<MapChange> =
                    revoked.iter().filter_map(|k| self.map.deny(*k)).collect();
                self.apply_changes(denied);
                // A delta shows its hub has us registered, even while our
                // own view says no hub does (a heartbeat answer was lost
                // and we are registering again). Setting it aside then
                // recorded its version as seen without applying it: the
                // next registration reported that version, the hub had
                // nothing newer to send, and a peer that joined meanwhile
                // stayed unknown until the map changed again.
                let source = self.map_source().or(Some(hub));
                if source != self.map_from {
                    // Following another hub now: start from its snapshot.
                    self.map_from = source;
                    self.map.reset_version();
                }
                if source != Some(hub) {
                    self.hub_versions.insert(hub, to_version);
                    return;
                }
                match self
                    .map
                    .apply(from_version, to_version, &upserts, &removals)
                {
                    Ok(changes) => self.apply_changes(changes),
                    Err(e) => tracing::debug!(%e, "stale peer-map delta ignored"),
                }
            }
            _ => {}
        }
    }

    fn on_peer_control(&mut self, peer: PublicKey, msg: Control) {
        let now = self.now();
        match msg {
            // Peers do not acknowledge each other's heartbeats: each side
            // sends its own, and a heartbeat heard is all the other side's
            // acknowledgement would have said (liveness goes by what is
            // heard; the session's pings measure RTT). An idle pair sends
            // two frames per interval instead of four. Acks from older
            // peers are still taken.
            Control::Heartbeat { .. } => self.hb.on_peer_heartbeat(&peer, now),
            Control::HeartbeatAck { seq, .. } => self.hb.on_peer_ack(&peer, seq, now),
            _ => {}
        }
    }

    /// Follow the hub's choice of map: on demand, the data plane reports
    /// packets it cannot route (and holds them a moment for the answer).
    fn set_on_demand(&mut self, on: bool) {
        if on != self.on_demand {
            tracing::info!(on_demand = on, "peer records from the hub");
            self.on_demand = on;
            let to = if on { self.unrouted_to.clone() } else { None };
            self.plane.do_send(Cmd::WatchUnrouted(to));
        }
    }

    /// Drop on-demand records no inner packet used for [`FORGET_AFTER`],
    /// and tell the hub.
    fn forget_unused(&mut self, at: Duration, snap: &Snapshot) {
        if !self.on_demand {
            return;
        }
        let by = by_peer(snap);
        let mut gone = Vec::new();
        // (A gateway's record is kept: its subnet routes are installed from
        // it, and the hub sends it to every member unasked.)
        for p in self.map.iter().filter(|p| p.routes.is_empty()) {
            let n = by.get(&p.key).map_or(0, |s| s.stats.ip_tx + s.stats.ip_rx);
            let e = self.used.entry(p.key).or_insert((n, at));
            if e.0 != n {
                *e = (n, at);
            } else if at.saturating_sub(e.1) >= FORGET_AFTER {
                gone.push(p.key);
            }
        }
        if gone.is_empty() {
            return;
        }
        let changes = self.map.merge(&[], &gone);
        for k in &gone {
            self.used.remove(k);
        }
        tracing::debug!(records = gone.len(), "unused peer records dropped");
        self.apply_changes(changes);
        if let Some(h) = self.map_source() {
            for chunk in gone.chunks(MAX_REMOVALS) {
                self.send(
                    h,
                    Control::Forget {
                        keys: chunk.to_vec(),
                    },
                    true,
                );
            }
        }
    }

    fn sample(&mut self, snap: Snapshot) {
        let at = self.now();
        self.forget_unused(at, &snap);
        let by = by_peer(&snap);
        for (k, a) in &self.peers {
            if let Some(p) = by.get(k) {
                if p.established && !p.dead && p.idle < self.hb.config().interval {
                    self.hb.on_peer_heard(k, at.saturating_sub(p.idle));
                }
                let link = self.hb.peer(k);
                a.do_send(Sample {
                    snap: (*p).clone(),
                    at,
                    hb_rtt: link.and_then(|l| l.rtt),
                    last_ack: link.and_then(|l| l.last_ack),
                });
            }
        }
        self.last_snapshot = snap;
    }

    fn hub_statuses(&self) -> Vec<HubStatus> {
        let now = self.now();
        self.hb
            .hubs()
            .map(|h| HubStatus {
                addr: self
                    .setup
                    .hubs
                    .iter()
                    .find(|(k, _)| *k == h.key)
                    .map(|(_, a)| a.to_string())
                    .unwrap_or_default(),
                state: match &h.phase {
                    HubPhase::Connecting { attempts } => format!("connecting (attempt {attempts})"),
                    HubPhase::Registered => "registered".into(),
                    HubPhase::Refused { reason } => format!("refused: {reason}"),
                },
                last_ack_s: h.last_ack.map(|a| now.saturating_sub(a).as_secs_f64()),
                rtt_ms: h.rtt.map(|r| r.as_secs_f64() * 1e3),
                registrations: h.registrations,
                observed: self.observed_by.get(&h.key).map(|o| o.to_string()),
            })
            .collect()
    }
}

/// Counters as name → value for status output.
pub fn counters(s: &Snapshot) -> BTreeMap<String, u64> {
    let p: &PlaneStats = &s.plane;
    let n = &s.node;
    BTreeMap::from([
        ("tun_read".into(), p.tun_read),
        ("tun_written".into(), p.tun_written),
        ("drop_no_route".into(), p.no_route + n.no_route),
        ("unrouted_held".into(), p.unrouted_held),
        ("drop_bad_source".into(), p.bad_source),
        ("drop_tun_write".into(), p.tun_write_failed),
        ("udp_rx".into(), p.udp_rx),
        ("udp_tx".into(), p.udp_tx),
        ("udp_send_failed".into(), p.udp_send_failed),
        ("udp_gso_batches".into(), p.gso_batches),
        ("tun_inline_batches".into(), p.tun_inline_batches),
        ("pmtu_probe_failed".into(), p.pmtu_probe_failed),
        ("tun_batches".into(), p.batches),
        ("plane_wakeups".into(), p.wakeups),
        (
            "drop_control_too_large".into(),
            s.peers.iter().map(|x| x.stats.control_too_large).sum(),
        ),
        (
            "drop_control_backlog".into(),
            s.peers
                .iter()
                .map(|x| x.stats.control_backlog_dropped)
                .sum(),
        ),
        ("drop_malformed".into(), n.malformed),
        ("drop_unknown_index".into(), n.unknown_index),
        ("drop_handshake_failed".into(), n.handshake_failed),
        ("drop_unknown_key".into(), n.unknown_key),
        ("drop_auth_failed".into(), n.auth_failed),
        ("drop_replayed".into(), n.replayed),
        ("drop_init_rate_limited".into(), n.init_rate_limited),
        ("drop_init_refused".into(), n.init_refused),
        ("drop_session_cap".into(), n.session_cap),
        ("sessions_evicted".into(), n.evicted),
        ("relayed".into(), n.relayed),
        ("relayed_bytes".into(), n.relayed_bytes),
        ("drop_relay".into(), n.relay_dropped),
        ("drop_memory_budget".into(), n.budget_dropped),
        ("held_bytes".into(), s.held_bytes as u64),
        ("split_opened".into(), s.split.opened),
        ("split_accepted".into(), s.split.accepted),
        ("split_refused".into(), s.split.refused),
        ("split_declined".into(), s.split.declined),
        ("split_reset".into(), s.split.reset),
        ("split_closed".into(), s.split.closed),
        ("split_over_limit".into(), s.split.over_limit),
        ("split_active".into(), s.split.active as u64),
        ("drop_split_late".into(), s.split.late),
        ("drop_split_bad_msgs".into(), s.split.bad_msgs),
    ])
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.unrouted_to = Some(ctx.address().recipient());
        for (k, a) in &self.setup.hubs {
            self.plane.do_send(Cmd::AddPeer {
                key: *k,
                endpoints: vec![*a],
            });
        }
        // Every hub is a relay candidate; one that does not relay never
        // answers probes through it and is never chosen.
        let hubs: Vec<PublicKey> = self.setup.hubs.iter().map(|(k, _)| *k).collect();
        self.plane.do_send(Cmd::SetRelays(hubs));
        self.plane
            .do_send(Cmd::SetHeartbeat(self.hb.config().interval));
        let step = (self.setup.heartbeat.interval / 10)
            .clamp(Duration::from_millis(20), Duration::from_millis(500));
        ctx.run_interval(step, |act, _| act.tick());
        // Sample counters once per second for rates and liveness.
        ctx.run_interval(Duration::from_secs(1), |act, ctx| {
            act.snap
                .send(GetSnapshot)
                .into_actor(act)
                .map(|r, act, _| {
                    if let Ok(s) = r {
                        act.sample(s);
                    }
                })
                .wait(ctx);
        });
        self.tick();
    }
}

impl Handler<NetEvent> for Supervisor {
    type Result = ();
    fn handle(&mut self, ev: NetEvent, _ctx: &mut Context<Self>) {
        let hub = self.is_hub(&ev.peer);
        let now = self.now();
        match ev.event {
            Event::Control(msg) if hub => self.on_hub_control(ev.peer, msg),
            Event::Control(msg) => self.on_peer_control(ev.peer, msg),
            Event::Established | Event::PeerRestarted | Event::Recovered if hub => {
                // A (new) session with the hub: register over it right away.
                if !self
                    .hb
                    .hubs()
                    .any(|h| h.key == ev.peer && h.phase == HubPhase::Registered)
                {
                    self.send(ev.peer, self.register_msg(&ev.peer), false);
                }
            }
            Event::Established | Event::Recovered | Event::PeerRestarted => {
                self.hb.on_peer_heard(&ev.peer, now)
            }
            Event::DeadLink => {
                tracing::info!(key = %short_key(&ev.peer), hub, "link dead");
            }
            Event::PunchWanted => {
                // Any hub that has us can coordinate; ask every registered one.
                let hubs: Vec<PublicKey> = self
                    .hb
                    .hubs()
                    .filter(|h| h.phase == HubPhase::Registered)
                    .map(|h| h.key)
                    .collect();
                for h in hubs {
                    self.send(h, Control::PunchRequest { target: ev.peer }, false);
                }
            }
            Event::Evicted => {
                tracing::info!(key = %short_key(&ev.peer), "silent session evicted at the session cap");
            }
            Event::UnknownPeer => {
                // A member we hold no record of opens a session: fetch its
                // record (its handshake is retried and then admitted).
                if let Some(h) = self.map_source().filter(|_| self.on_demand) {
                    if self.lookups.key(now, ev.peer) {
                        self.send(
                            h,
                            Control::Lookup {
                                addrs: Vec::new(),
                                keys: vec![ev.peer],
                            },
                            true,
                        );
                    }
                }
            }
        }
    }
}

impl Handler<Unrouted> for Supervisor {
    type Result = ();
    /// Packets went to overlay addresses no record routes: ask the hub.
    fn handle(&mut self, m: Unrouted, _ctx: &mut Context<Self>) {
        let now = self.now();
        let Some(h) = self.map_source().filter(|_| self.on_demand) else {
            return;
        };
        let addrs = self.lookups.addrs(now, &m.0);
        if !addrs.is_empty() {
            self.send(
                h,
                Control::Lookup {
                    addrs,
                    keys: Vec::new(),
                },
                true,
            );
        }
    }
}

impl Handler<SetHeartbeat> for Supervisor {
    type Result = ();
    fn handle(&mut self, m: SetHeartbeat, _ctx: &mut Context<Self>) {
        self.setup.heartbeat.interval = m.0;
        self.set_interval(m.0);
    }
}

impl Handler<GetNodeStatus> for Supervisor {
    type Result = ResponseActFuture<Self, NodeStatus>;
    fn handle(&mut self, _: GetNodeStatus, _ctx: &mut Context<Self>) -> Self::Result {
        let snap = self.snap.clone();
        Box::pin(
            async move { snap.send(GetSnapshot).await.ok() }
                .into_actor(self)
                .then(|s, act, _| {
                    if let Some(s) = s {
                        act.sample(s);
                    }
                    let asks: Vec<_> = act.peers.values().map(|a| a.send(GetStatus)).collect();
                    futures_util::future::join_all(asks).into_actor(act)
                })
                .map(|res, act, _| NodeStatus {
                    name: act.setup.name.clone(),
                    key: short_key(&act.setup.me),
                    overlay: act
                        .setup
                        .overlay
                        .iter()
                        .map(|n| format!("{}/{}", n.addr, n.prefix))
                        .collect(),
                    routes: act.setup.routes.iter().map(|n| n.to_string()).collect(),
                    observed: act.observed.map(|o| o.to_string()),
                    map_version: act.map.version(),
                    heartbeat_s: act.hb.config().interval.as_secs_f64(),
                    hubs: act.hub_statuses(),
                    peers: res.into_iter().filter_map(Result::ok).collect(),
                    counters: counters(&act.last_snapshot),
                }),
        )
    }
}

impl Handler<SetLocalEndpoints> for Supervisor {
    type Result = ();
    fn handle(&mut self, m: SetLocalEndpoints, _: &mut Context<Self>) {
        if m.0 == self.setup.local_endpoints {
            return;
        }
        self.setup.local_endpoints = m.0;
        for (hub, _) in &self.setup.hubs {
            self.send(*hub, self.register_msg(hub), true);
        }
    }
}

impl Handler<SetHubs> for Supervisor {
    type Result = ();
    fn handle(&mut self, m: SetHubs, _: &mut Context<Self>) {
        let now = self.now();
        for (k, a) in &m.0 {
            let known = self.setup.hubs.iter().find(|(h, _)| h == k).map(|x| x.1);
            if known != Some(*a) {
                self.plane.do_send(Cmd::AddPeer {
                    key: *k,
                    endpoints: vec![*a],
                });
            }
            if known.is_none() {
                tracing::info!(hub = %short_key(k), addr = %a, "hub added");
                self.hb.add_hub(*k, now);
            }
        }
        for (k, _) in &self.setup.hubs {
            if !m.0.iter().any(|(n, _)| n == k) {
                tracing::info!(hub = %short_key(k), "hub removed");
                self.hb.remove_hub(k);
                self.hub_versions.remove(k);
                self.observed_by.remove(k);
                if self.map.get(k).is_none() {
                    self.plane.do_send(Cmd::RemovePeer(*k));
                }
            }
        }
        self.setup.hubs = m.0;
        let hubs: Vec<PublicKey> = self.setup.hubs.iter().map(|(k, _)| *k).collect();
        self.plane.do_send(Cmd::SetRelays(hubs));
    }
}

impl Handler<Leave> for Supervisor {
    type Result = ResponseFuture<()>;
    /// Resolves once the data plane has handed the messages to the socket.
    fn handle(&mut self, _: Leave, _ctx: &mut Context<Self>) -> Self::Result {
        let sends: Vec<_> = self
            .setup
            .hubs
            .iter()
            .map(|(k, _)| {
                self.plane.send(Cmd::Send {
                    to: *k,
                    msg: Control::Leave,
                    reliable: false,
                })
            })
            .collect();
        Box::pin(async move {
            let _ = futures_util::future::join_all(sends).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;
    use transport::wire::PeerInfo;

    /// A data plane that records the peers it is told to add.
    struct Plane(Rc<RefCell<Vec<PublicKey>>>);

    impl Actor for Plane {
        type Context = Context<Self>;
    }

    impl Handler<Cmd> for Plane {
        type Result = ();
        fn handle(&mut self, c: Cmd, _: &mut Context<Self>) {
            if let Cmd::AddPeer { key, .. } = c {
                self.0.borrow_mut().push(key);
            }
        }
    }

    impl Handler<GetSnapshot> for Plane {
        type Result = MessageResult<GetSnapshot>;
        fn handle(&mut self, _: GetSnapshot, _: &mut Context<Self>) -> Self::Result {
            MessageResult(Snapshot::default())
        }
    }

    /// Regression (seen once in the 10%-loss WAN namespace test): a delta
    /// that arrives while the peer registers again, after its hub forgot
    /// it, must be applied; it used to be set aside with its version
    /// recorded as seen, so the peer it announced stayed unknown.
    #[test]
    fn a_delta_arriving_while_registering_again_is_applied() {
        let (me, hub, other) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        let hub_at = SocketAddr::from(([192, 0, 2, 1], 4800));
        actix::System::new().block_on(async move {
            let added = Rc::new(RefCell::new(Vec::new()));
            let plane = Plane(added.clone()).start();
            let setup = PeerSetup {
                me,
                overlay: vec![IpNet {
                    addr: [10, 0, 0, 1].into(),
                    prefix: 24,
                }],
                name: "me".into(),
                local_endpoints: Vec::new(),
                hubs: vec![(hub, hub_at)],
                heartbeat: HeartbeatConfig::default(),
                routes: Vec::new(),
            };
            let sup =
                Supervisor::new(setup, plane.clone().recipient(), plane.recipient(), None).start();
            let from_hub = |msg| NetEvent {
                peer: hub,
                endpoint: Some(hub_at),
                event: Event::Control(msg),
            };
            let observed = SocketAddr::from(([198, 51, 100, 1], 4800));
            sup.send(from_hub(Control::RegisterAck {
                observed,
                heartbeat_ms: 1000,
                on_demand: false,
            }))
            .await
            .unwrap();
            // The hub lost us (a heartbeat answer was lost, or it restarted):
            // we register again, and meanwhile a delta comes.
            sup.send(from_hub(Control::Nack {
                code: ErrorCode::NotAllowed,
                message: "not registered".into(),
            }))
            .await
            .unwrap();
            let info = PeerInfo {
                key: other,
                overlay: vec![IpNet {
                    addr: [10, 0, 0, 3].into(),
                    prefix: 24,
                }],
                endpoints: vec![SocketAddr::from(([198, 51, 100, 3], 4800))],
                name: "other".into(),
                routes: Vec::new(),
            };
            sup.send(from_hub(Control::PeerMapDelta {
                from_version: 0,
                to_version: 7,
                upserts: vec![info],
                removals: Vec::new(),
                revoked: Vec::new(),
            }))
            .await
            .unwrap();
            let st = sup.send(GetNodeStatus).await.unwrap();
            assert_eq!(st.map_version, 7);
            assert!(
                added.borrow().contains(&other),
                "the new peer was not added"
            );
        });
    }
}
