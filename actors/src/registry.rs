//! The hub's registry as a pure state machine: who is in the network, which key
//! owns which overlay address, where each member was seen, and which peer-map
//! changes each member still has to hear about. No IO, no clock: the caller
//! passes `now` and carries out the returned [`Reply`]s.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use transport::stream::is_stream_addr;
use transport::wire::{
    Control, ErrorCode, IpNet, PeerInfo, PublicKey, MAX_ADDRS, MAX_ROUTES, MAX_UPSERTS,
};

/// Registry settings.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Heartbeat interval members are told to keep.
    pub heartbeat: Duration,
    /// A member silent for this many heartbeat intervals is dropped from the map.
    pub expire_beats: u32,
    /// How many past changes are kept for deltas; an older version gets a snapshot.
    pub log_len: usize,
    /// Admit subnet routes that overlap a route another key advertises
    /// (several gateways into one site; the router then picks one).
    pub allow_route_overlap: bool,
    /// Members that can ([`Claim::lookups`]) get no peer map: they fetch
    /// the records they need and hear only about those (for networks of
    /// thousands, where every member holding every record costs N²).
    pub on_demand: bool,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            heartbeat: Duration::from_secs(5),
            // At 20% loss each way three heartbeats in a row are lost
            // every minute or so; the hub then dropped live peers, and
            // every peer tore down its direct sessions with them.
            expire_beats: 6,
            log_len: 1024,
            allow_route_overlap: false,
            on_demand: false,
        }
    }
}

/// An online member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// What peers are told about it.
    pub info: PeerInfo,
    /// When it was last heard from.
    pub last_seen: Duration,
    /// Map version this member is known to hold (reported or sent).
    pub version: u64,
    /// The member fetches records on demand (no peer map is pushed to it).
    pub on_demand: bool,
    /// Records an on-demand member holds: it is told when they change.
    pub holds: BTreeSet<PublicKey>,
}

/// A control message the hub must send to `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Recipient.
    pub to: PublicKey,
    /// The message (sent reliably: deltas must arrive in order).
    pub msg: Control,
}

/// Result of a registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registered {
    /// Accepted; `owners_changed` says the ownership table must be persisted
    /// before the replies go out.
    Accepted {
        /// The key ↔ address table changed.
        owners_changed: bool,
    },
    /// Refused; the reply carries the reason.
    Refused,
}

/// Why an address claim was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    /// The address belongs to another key.
    #[error("overlay address {addr} is owned by another node (key {owner})")]
    InUse {
        /// The contested address.
        addr: IpAddr,
        /// Short hex of the owner's key.
        owner: String,
    },
    /// An advertised subnet overlaps one another key advertises.
    #[error("route {route} overlaps {theirs}, advertised by {owner}")]
    RouteInUse {
        /// The refused route.
        route: IpNet,
        /// The other member's route.
        theirs: IpNet,
        /// Name and short key of the other member.
        owner: String,
    },
    /// The registration carried no address or an unusable one.
    #[error("bad overlay address claim: {0}")]
    Bad(String),
}

/// What a node asks for when it registers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Claim {
    /// Overlay addresses it owns.
    pub overlay: Vec<IpNet>,
    /// Subnets it routes for.
    pub routes: Vec<IpNet>,
    /// Its own candidate endpoints.
    pub local_endpoints: Vec<SocketAddr>,
    /// Display name.
    pub name: String,
    /// Map version it holds.
    pub have_version: u64,
    /// It can work from records fetched on demand.
    pub lookups: bool,
}

/// The registry.
#[derive(Debug, Clone)]
pub struct Registry {
    cfg: RegistryConfig,
    owners: BTreeMap<IpAddr, PublicKey>,
    revoked: BTreeSet<PublicKey>,
    /// If set, only these keys may register.
    allowed: Option<BTreeSet<PublicKey>>,
    members: BTreeMap<PublicKey, Member>,
    version: u64,
    /// (version, key) for each change, oldest first.
    log: VecDeque<(u64, PublicKey)>,
    /// For each member's record, the on-demand members holding it.
    subscribers: BTreeMap<PublicKey, BTreeSet<PublicKey>>,
    /// Records with subscribers that changed (or left) since the last push.
    changed: BTreeSet<PublicKey>,
    /// Members that advertise subnet routes (see [`Registry::hold_gateways`]).
    gateways: BTreeSet<PublicKey>,
    /// Records of askers waiting to go to the on-demand members they asked
    /// about (see [`Registry::flush_pairs`]).
    pairs: BTreeMap<PublicKey, BTreeSet<PublicKey>>,
    /// Changes are pushed to all members by [`Registry::flush_pushes`],
    /// not as they happen (see [`Registry::defer_pushes`]).
    defer: bool,
    /// A change waits for [`Registry::flush_pushes`].
    pending: bool,
    /// Registrations accepted, and refused by reason.
    accepted: u64,
    refused: BTreeMap<&'static str, u64>,
}

/// The metrics label of a refusal.
fn refusal_reason(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::AddressInUse => "address_in_use",
        ErrorCode::NotAllowed => "not_allowed",
        ErrorCode::BadRequest => "bad_request",
        ErrorCode::Busy => "busy",
        ErrorCode::Revoked => "revoked",
        ErrorCode::NotListed => "not_listed",
        ErrorCode::RouteInUse => "route_in_use",
    }
}

/// Short hex form of a key for logs and messages.
pub fn short_key(k: &PublicKey) -> String {
    k[..6].iter().map(|b| format!("{b:02x}")).collect()
}

impl Registry {
    /// An empty registry that already knows the persisted `owners`. Map
    /// versions start after `base_version`; a restarted hub passes a larger base
    /// (e.g. derived from the wall clock) so members' old versions are never
    /// mistaken for current ones.
    pub fn new(
        cfg: RegistryConfig,
        owners: BTreeMap<IpAddr, PublicKey>,
        base_version: u64,
    ) -> Registry {
        Registry {
            cfg,
            owners,
            revoked: BTreeSet::new(),
            allowed: None,
            members: BTreeMap::new(),
            version: base_version,
            log: VecDeque::new(),
            subscribers: BTreeMap::new(),
            changed: BTreeSet::new(),
            gateways: BTreeSet::new(),
            pairs: BTreeMap::new(),
            defer: false,
            pending: false,
            accepted: 0,
            refused: BTreeMap::new(),
        }
    }

    /// Settings.
    pub fn config(&self) -> &RegistryConfig {
        &self.cfg
    }

    /// Current map version.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The allow-list (None: anyone with the network key).
    pub fn allowed(&self) -> Option<&BTreeSet<PublicKey>> {
        self.allowed.as_ref()
    }

    /// Keys refused for good (persisted with the owners).
    pub fn revoked(&self) -> &BTreeSet<PublicKey> {
        &self.revoked
    }

    /// Admit only `keys` from now on (None: anyone with the network key).
    /// Members not on the list are removed at once.
    pub fn set_allowed(&mut self, keys: Option<BTreeSet<PublicKey>>, out: &mut Vec<Reply>) {
        self.allowed = keys;
        let gone: Vec<PublicKey> = self
            .members
            .keys()
            .filter(|k| self.allowed.as_ref().is_some_and(|a| !a.contains(*k)))
            .copied()
            .collect();
        for k in &gone {
            self.unlink(k);
            self.bump(*k);
        }
        if !gone.is_empty() {
            self.push_all(out);
        }
    }

    /// Restore the revoked keys (from disk).
    pub fn set_revoked(&mut self, keys: BTreeSet<PublicKey>) {
        self.revoked = keys;
    }

    /// The key ↔ address table (what must survive restarts).
    pub fn owners(&self) -> &BTreeMap<IpAddr, PublicKey> {
        &self.owners
    }

    /// Online members.
    pub fn members(&self) -> impl Iterator<Item = (&PublicKey, &Member)> {
        self.members.iter()
    }

    /// The member that owns overlay address `ip`, if online.
    pub fn lookup(&self, ip: IpAddr) -> Option<&Member> {
        self.owners.get(&ip).and_then(|k| self.members.get(k))
    }

    /// The member with key `key`, if online.
    pub fn member(&self, key: &PublicKey) -> Option<&Member> {
        self.members.get(key)
    }

    /// Check `key`'s subnet routes: well formed, and (unless overlaps are
    /// allowed) not overlapping another online member's.
    pub fn check_routes(&self, key: &PublicKey, routes: &[IpNet]) -> Result<(), ClaimError> {
        if routes.len() > MAX_ROUTES {
            return Err(ClaimError::Bad(format!("{} routes", routes.len())));
        }
        for r in routes {
            let max = if r.addr.is_ipv4() { 32 } else { 128 };
            if r.prefix == 0 || r.prefix > max || r.addr.is_multicast() || r.addr.is_loopback() {
                return Err(ClaimError::Bad(format!("route {r}")));
            }
        }
        if self.cfg.allow_route_overlap {
            return Ok(());
        }
        let others = self
            .members
            .values()
            .filter(|m| m.info.key != *key && !m.info.routes.is_empty());
        for m in others {
            for theirs in &m.info.routes {
                if let Some(r) = routes.iter().find(|r| r.overlaps(theirs)) {
                    return Err(ClaimError::RouteInUse {
                        route: *r,
                        theirs: *theirs,
                        owner: format!("{:?} (key {})", m.info.name, short_key(&m.info.key)),
                    });
                }
            }
        }
        Ok(())
    }

    /// Check a claim of `overlay` by `key` without changing anything.
    pub fn check_claim(&self, key: &PublicKey, overlay: &[IpNet]) -> Result<(), ClaimError> {
        if overlay.is_empty() || overlay.len() > MAX_ADDRS {
            return Err(ClaimError::Bad(format!("{} addresses", overlay.len())));
        }
        for n in overlay {
            let max = if n.addr.is_ipv4() { 32 } else { 128 };
            if n.prefix > max || n.addr.is_unspecified() || n.addr.is_multicast() {
                return Err(ClaimError::Bad(format!("{}/{}", n.addr, n.prefix)));
            }
            if let Some(owner) = self.owners.get(&n.addr) {
                if owner != key {
                    return Err(ClaimError::InUse {
                        addr: n.addr,
                        owner: short_key(owner),
                    });
                }
            }
        }
        Ok(())
    }

    /// Whether a registration of `claim` by `key` would pass every check
    /// this registry can make (revocation, allow-list, addresses, routes).
    pub fn admissible(&self, key: &PublicKey, claim: &Claim) -> bool {
        !self.revoked.contains(key)
            && self.allowed.as_ref().is_none_or(|a| a.contains(key))
            && self.check_claim(key, &claim.overlay).is_ok()
            && self.check_routes(key, &claim.routes).is_ok()
    }

    /// Whether `key` claiming `overlay` would change who owns what.
    pub fn changes_owners(&self, key: &PublicKey, overlay: &[IpNet]) -> bool {
        let want: BTreeSet<IpAddr> = overlay.iter().map(|n| n.addr).collect();
        want != crate::cluster::owned_by(&self.owners, key)
    }

    /// `key` owns exactly `addrs` (decided elsewhere: by the hubs' log).
    pub fn grant(&mut self, key: &PublicKey, addrs: &[IpAddr]) {
        self.owners.retain(|a, k| k != key || addrs.contains(a));
        for a in addrs {
            self.owners.insert(*a, *key);
        }
    }

    /// Refuse a registration from `key` (decided elsewhere), counted like
    /// any refusal.
    pub fn refuse(
        &mut self,
        key: PublicKey,
        code: ErrorCode,
        message: String,
        out: &mut Vec<Reply>,
    ) {
        *self.refused.entry(refusal_reason(code)).or_default() += 1;
        out.push(Reply {
            to: key,
            msg: Control::Nack { code, message },
        });
    }

    /// Take the replicated book's ownership and revocations: the book is
    /// authoritative. Newly revoked keys leave the map (members are told)
    /// and are returned.
    pub fn apply_book(
        &mut self,
        owners: &BTreeMap<IpAddr, PublicKey>,
        revoked: &BTreeSet<PublicKey>,
        out: &mut Vec<Reply>,
    ) -> Vec<PublicKey> {
        let newly: Vec<PublicKey> = revoked.difference(&self.revoked).copied().collect();
        for k in &newly {
            self.revoke(k, out);
        }
        if self.owners != *owners {
            self.owners = owners.clone();
        }
        newly
    }

    /// A `Register` from `key`, seen at `observed`. Returns the replies to
    /// send. Counted: accepted, or refused by the reason the `Nack` gives.
    pub fn register(
        &mut self,
        now: Duration,
        key: PublicKey,
        observed: SocketAddr,
        claim: Claim,
        out: &mut Vec<Reply>,
    ) -> Registered {
        let r = self.register_checked(now, key, observed, claim, out);
        match r {
            Registered::Accepted { .. } => self.accepted += 1,
            Registered::Refused => {
                let reason = match out.last().map(|r| &r.msg) {
                    Some(Control::Nack { code, .. }) => refusal_reason(*code),
                    _ => "other",
                };
                *self.refused.entry(reason).or_default() += 1;
            }
        }
        r
    }

    /// Registrations accepted so far, and refused by reason (`revoked`,
    /// `not_listed`, `address_in_use`, `route_in_use`, `bad_request`).
    pub fn registration_counts(&self) -> (u64, &BTreeMap<&'static str, u64>) {
        (self.accepted, &self.refused)
    }

    fn register_checked(
        &mut self,
        now: Duration,
        key: PublicKey,
        observed: SocketAddr,
        claim: Claim,
        out: &mut Vec<Reply>,
    ) -> Registered {
        let Claim {
            overlay,
            routes,
            local_endpoints,
            name,
            have_version,
            lookups,
        } = claim;
        if self.revoked.contains(&key) {
            out.push(Reply {
                to: key,
                msg: Control::Nack {
                    code: ErrorCode::Revoked,
                    message: "this node's key was revoked by the hub operator".into(),
                },
            });
            return Registered::Refused;
        }
        if self.allowed.as_ref().is_some_and(|a| !a.contains(&key)) {
            out.push(Reply {
                to: key,
                msg: Control::Nack {
                    code: ErrorCode::NotListed,
                    message: format!(
                        "key {} is not on the hub's allow-list",
                        crate::store::key_hex(&key)
                    ),
                },
            });
            return Registered::Refused;
        }
        let checked = self
            .check_claim(&key, &overlay)
            .and_then(|()| self.check_routes(&key, &routes));
        if let Err(e) = checked {
            let code = match e {
                ClaimError::InUse { .. } => ErrorCode::AddressInUse,
                ClaimError::RouteInUse { .. } => ErrorCode::RouteInUse,
                ClaimError::Bad(_) => ErrorCode::BadRequest,
            };
            out.push(Reply {
                to: key,
                msg: Control::Nack {
                    code,
                    message: e.to_string(),
                },
            });
            return Registered::Refused;
        }
        // Ownership: the key's addresses are exactly what it claims now.
        let claimed: BTreeSet<IpAddr> = overlay.iter().map(|n| n.addr).collect();
        let before = self.owners.len();
        let mut owners_changed = false;
        self.owners.retain(|a, k| {
            let keep = *k != key || claimed.contains(a);
            owners_changed |= !keep;
            keep
        });
        for a in &claimed {
            if self.owners.insert(*a, key).is_none() {
                owners_changed = true;
            }
        }
        owners_changed |= before != self.owners.len();

        // A member that reaches us by stream (TCP or TLS fallback) has no
        // UDP endpoint we saw; its own candidates may still work for others.
        let mut endpoints = Vec::with_capacity(MAX_ADDRS);
        if !is_stream_addr(&observed) {
            endpoints.push(observed);
        }
        for e in local_endpoints {
            if endpoints.len() >= MAX_ADDRS {
                break;
            }
            if !endpoints.contains(&e) && !is_stream_addr(&e) {
                endpoints.push(e);
            }
        }
        let info = PeerInfo {
            key,
            overlay,
            endpoints,
            name: transport::wire::bounded_name(&name).to_string(),
            routes: routes.iter().map(IpNet::network).collect(),
        };
        let changed = self.members.get(&key).is_none_or(|m| m.info != info);
        let on_demand = self.cfg.on_demand && lookups;
        // A member registering again may have restarted and forgotten what
        // it held: it asks again for what it still has.
        self.unsubscribe_all(&key);
        let m = self.members.entry(key).or_insert(Member {
            info: info.clone(),
            last_seen: now,
            version: have_version,
            on_demand,
            holds: BTreeSet::new(),
        });
        m.info = info;
        m.last_seen = now;
        m.version = have_version;
        m.on_demand = on_demand;
        out.push(Reply {
            to: key,
            msg: Control::RegisterAck {
                observed,
                heartbeat_ms: self.cfg.heartbeat.as_millis() as u32,
                on_demand,
            },
        });
        self.hold_gateways(key, out);
        if changed {
            self.bump(key);
            self.push_all(out);
        } else {
            self.push_to(&key, out);
        }
        Registered::Accepted { owners_changed }
    }

    /// Members that advertise subnet routes are held by every on-demand
    /// member: a packet for such a subnet reaches a member's TUN only once
    /// the route is installed from the record, so no lookup would ever ask
    /// for it. Gateways are few; every other record stays on demand. Called
    /// when `key` registers: as a newcomer it gets the gateways' records;
    /// as a gateway it is held by every on-demand member from now on.
    fn hold_gateways(&mut self, key: PublicKey, out: &mut Vec<Reply>) {
        let Some(m) = self.members.get(&key) else {
            return;
        };
        let (gateway, on_demand) = (!m.info.routes.is_empty(), m.on_demand);
        if !gateway {
            // (No longer one, if it was.)
            self.gateways.remove(&key);
        }
        if on_demand {
            let gateways: Vec<PublicKey> = self
                .gateways
                .iter()
                .filter(|k| **k != key)
                .copied()
                .collect();
            let mut upserts = Vec::new();
            for g in gateways {
                self.subscribe(key, g);
                upserts.extend(self.members.get(&g).map(|g| g.info.clone()));
            }
            if !upserts.is_empty() {
                record_messages(key, upserts, Vec::new(), Vec::new(), &self.revoked, out);
            }
        }
        if gateway {
            self.gateways.insert(key);
            let holders: Vec<PublicKey> = self
                .members
                .iter()
                .filter(|(k, h)| **k != key && h.on_demand && !h.holds.contains(&key))
                .map(|(k, _)| *k)
                .collect();
            // Its record reaches them with the push of this registration's
            // change (a gateway's first registration is one; members that
            // came later got it with their own registration).
            for h in holders {
                self.subscribe(h, key);
            }
        }
    }

    /// A heartbeat from `key` at `observed`. A non-member gets a `Nack` so it re-registers.
    pub fn heartbeat(
        &mut self,
        now: Duration,
        key: PublicKey,
        observed: SocketAddr,
        seq: u64,
        map_version: u64,
        out: &mut Vec<Reply>,
    ) {
        let Some(m) = self.members.get_mut(&key) else {
            let (code, message) = if self.revoked.contains(&key) {
                (
                    ErrorCode::Revoked,
                    "this node's key was revoked by the hub operator",
                )
            } else {
                (ErrorCode::NotAllowed, "not registered")
            };
            out.push(Reply {
                to: key,
                msg: Control::Nack {
                    code,
                    message: message.into(),
                },
            });
            return;
        };
        m.last_seen = now;
        out.push(Reply {
            to: key,
            msg: Control::HeartbeatAck {
                seq,
                observed,
                interval_ms: Some(self.cfg.heartbeat.as_millis() as u32),
            },
        });
        // NAT rebinding: the first endpoint is the observed one (a stream
        // address is not an endpoint: see `register`).
        if !is_stream_addr(&observed) && m.info.endpoints.first() != Some(&observed) {
            m.info.endpoints.retain(|e| *e != observed);
            m.info.endpoints.insert(0, observed);
            m.info.endpoints.truncate(MAX_ADDRS);
            // The member reported its version; deltas resume from there.
            m.version = map_version;
            self.bump(key);
            self.push_all(out);
        } else if map_version != self.version {
            // It missed something (or restarted): resend from what it has.
            m.version = map_version;
            self.push_to(&key, out);
        }
    }

    /// Traffic of any kind from `key` (keeps it alive between heartbeats).
    pub fn seen(&mut self, now: Duration, key: &PublicKey) {
        if let Some(m) = self.members.get_mut(key) {
            m.last_seen = now;
        }
    }

    /// `key` leaves (shutdown). Its address ownership stays.
    pub fn leave(&mut self, key: &PublicKey, out: &mut Vec<Reply>) -> bool {
        if !self.unlink(key) {
            return false;
        }
        self.bump(*key);
        self.push_all(out);
        true
    }

    /// Change the heartbeat interval and the silent beats before expiry (a
    /// reload): members learn the interval from their next heartbeat's ack.
    pub fn set_timing(&mut self, heartbeat: Duration, expire_beats: u32) {
        self.cfg.heartbeat = heartbeat;
        self.cfg.expire_beats = expire_beats.max(1);
    }

    /// The heartbeat interval members are told.
    pub fn heartbeat_interval(&self) -> Duration {
        self.cfg.heartbeat
    }

    /// Drop members silent for `expire_beats` heartbeats; returns their keys.
    pub fn expire(&mut self, now: Duration, out: &mut Vec<Reply>) -> Vec<PublicKey> {
        let limit = self.cfg.heartbeat * self.cfg.expire_beats;
        let dead: Vec<PublicKey> = self
            .members
            .iter()
            .filter(|(_, m)| now.saturating_sub(m.last_seen) > limit)
            .map(|(k, _)| *k)
            .collect();
        for k in &dead {
            self.unlink(k);
            self.bump(*k);
        }
        if !dead.is_empty() {
            self.push_all(out);
        }
        dead
    }

    /// Revoke `key`: it leaves the map (every member is told at once), its
    /// addresses are freed, and it can never register again. Returns false if
    /// it was already revoked.
    pub fn revoke(&mut self, key: &PublicKey, out: &mut Vec<Reply>) -> bool {
        if !self.revoked.insert(*key) {
            return false;
        }
        self.owners.retain(|_, k| k != key);
        if self.unlink(key) {
            self.bump(*key);
            self.push_all(out);
        }
        true
    }

    fn bump(&mut self, key: PublicKey) {
        if self.subscribers.contains_key(&key) {
            self.changed.insert(key);
        }
        self.version += 1;
        self.log.push_back((self.version, key));
        while self.log.len() > self.cfg.log_len {
            self.log.pop_front();
        }
    }

    /// Push changes to all members only when [`Registry::flush_pushes`] is
    /// called: a thousand members joining within one flush interval cost
    /// every member one delta, not a thousand (a hub's actor flushes a few
    /// times a second). Off by default: every change is pushed at once.
    pub fn defer_pushes(&mut self, on: bool) {
        self.defer = on;
    }

    /// Whether a change waits to be pushed.
    pub fn push_pending(&self) -> bool {
        self.pending
    }

    /// Push what changed since the last flush to every member.
    pub fn flush_pushes(&mut self, out: &mut Vec<Reply>) {
        if std::mem::take(&mut self.pending) {
            self.push_all_now(out);
        }
    }

    fn push_all(&mut self, out: &mut Vec<Reply>) {
        if self.defer {
            self.pending = true;
        } else {
            self.push_all_now(out);
        }
    }

    fn push_all_now(&mut self, out: &mut Vec<Reply>) {
        let keys: Vec<PublicKey> = self
            .members
            .iter()
            .filter(|(_, m)| !m.on_demand)
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            self.push_to(&k, out);
        }
        self.push_records(out);
    }

    /// Tell on-demand members about the records they hold that changed or
    /// left since the last push: one message (or a few) per member, whatever
    /// the number of changes.
    fn push_records(&mut self, out: &mut Vec<Reply>) {
        let mut per: BTreeMap<PublicKey, (Vec<PeerInfo>, Vec<PublicKey>)> = BTreeMap::new();
        for k in std::mem::take(&mut self.changed) {
            let Some(subs) = self.subscribers.get(&k) else {
                continue;
            };
            let info = self.members.get(&k).map(|m| &m.info);
            for s in subs {
                let e = per.entry(*s).or_default();
                match info {
                    Some(i) => e.0.push(i.clone()),
                    None => e.1.push(k),
                }
            }
            if info.is_none() {
                // Gone: its holders drop it, and fetch it again if it returns.
                if let Some(subs) = self.subscribers.remove(&k) {
                    for s in subs {
                        if let Some(m) = self.members.get_mut(&s) {
                            m.holds.remove(&k);
                        }
                    }
                }
            }
        }
        for (to, (upserts, removals)) in per {
            record_messages(to, upserts, removals, Vec::new(), &self.revoked, out);
        }
    }

    /// `holder` (an on-demand member) holds `key`'s record from now on.
    fn subscribe(&mut self, holder: PublicKey, key: PublicKey) {
        if let Some(m) = self.members.get_mut(&holder) {
            m.holds.insert(key);
            self.subscribers.entry(key).or_default().insert(holder);
        }
    }

    /// `holder` no longer hears about `key`.
    fn unsubscribe(&mut self, holder: &PublicKey, key: &PublicKey) {
        if let Some(m) = self.members.get_mut(holder) {
            m.holds.remove(key);
        }
        if let Some(subs) = self.subscribers.get_mut(key) {
            subs.remove(holder);
            if subs.is_empty() {
                self.subscribers.remove(key);
            }
        }
    }

    /// `holder` hears about nothing (it left, or registers afresh).
    fn unsubscribe_all(&mut self, holder: &PublicKey) {
        let held = self
            .members
            .get_mut(holder)
            .map(|m| std::mem::take(&mut m.holds))
            .unwrap_or_default();
        for k in held {
            self.unsubscribe(holder, &k);
        }
    }

    /// Remove `key` from the members (its subscriptions with it); false if
    /// it was not one. The caller bumps the version.
    fn unlink(&mut self, key: &PublicKey) -> bool {
        self.unsubscribe_all(key);
        self.gateways.remove(key);
        self.members.remove(key).is_some()
    }

    /// Records held by on-demand members, counted (for status and tests).
    pub fn subscriptions(&self) -> usize {
        self.subscribers.values().map(BTreeSet::len).sum()
    }

    /// The online member owning `addr`, or the one whose subnet route holds
    /// it (the longest).
    fn resolve(&self, addr: &IpAddr) -> Option<PublicKey> {
        if let Some(k) = self
            .owners
            .get(addr)
            .filter(|k| self.members.contains_key(*k))
        {
            return Some(*k);
        }
        self.members
            .iter()
            .flat_map(|(k, m)| m.info.routes.iter().map(move |r| (r, k)))
            .filter(|(r, _)| r.contains(addr))
            .max_by_key(|(r, _)| r.prefix)
            .map(|(_, k)| *k)
    }

    /// An on-demand member asks for the records of `addrs`' owners and of
    /// `keys`. It gets them (and hears about their changes from now on),
    /// the addresses nobody online has, and, as removals, the keys that are
    /// not online; each on-demand member it asked about gets the asker's
    /// record at the same time, so that the asker's handshake finds it
    /// known. A non-member is told to register.
    pub fn fetch(
        &mut self,
        now: Duration,
        from: PublicKey,
        addrs: &[IpAddr],
        keys: &[PublicKey],
        out: &mut Vec<Reply>,
    ) {
        let Some(m) = self.members.get_mut(&from) else {
            out.push(Reply {
                to: from,
                msg: Control::Nack {
                    code: ErrorCode::NotAllowed,
                    message: "not registered".into(),
                },
            });
            return;
        };
        m.last_seen = now;
        let mut found = BTreeSet::new();
        let mut missing = Vec::new();
        let mut removals = Vec::new();
        for a in addrs {
            match self.resolve(a) {
                Some(k) => {
                    found.insert(k);
                }
                None => missing.push(*a),
            }
        }
        for k in keys {
            if self.members.contains_key(k) {
                found.insert(*k);
            } else {
                removals.push(*k);
            }
        }
        found.remove(&from);
        let mut upserts = Vec::with_capacity(found.len());
        for k in found {
            let Some(theirs) = self.members.get(&k) else {
                continue;
            };
            upserts.push(theirs.info.clone());
            let pair = theirs.on_demand && !theirs.holds.contains(&from);
            self.subscribe(from, k);
            if pair {
                self.subscribe(k, from);
                self.pairs.entry(k).or_default().insert(from);
            }
        }
        record_messages(from, upserts, removals, missing, &self.revoked, out);
    }

    /// Whether askers' records wait for [`Registry::flush_pairs`].
    pub fn pairs_pending(&self) -> bool {
        !self.pairs.is_empty()
    }

    /// Send the on-demand members that were asked about the records of
    /// those who asked (so that the askers' handshakes find them known): one
    /// message per member for all the lookups since the last flush (a member
    /// many ask about at once gets a few messages, not one per asker).
    pub fn flush_pairs(&mut self, out: &mut Vec<Reply>) {
        for (to, askers) in std::mem::take(&mut self.pairs) {
            let upserts: Vec<PeerInfo> = askers
                .iter()
                .filter_map(|k| self.members.get(k).map(|m| m.info.clone()))
                .collect();
            if !upserts.is_empty() && self.members.contains_key(&to) {
                record_messages(to, upserts, Vec::new(), Vec::new(), &self.revoked, out);
            }
        }
    }

    /// An on-demand member dropped these records.
    pub fn forget(&mut self, from: &PublicKey, keys: &[PublicKey]) {
        for k in keys {
            self.unsubscribe(from, k);
        }
    }

    /// Send `key` what changed since the version it holds.
    fn push_to(&mut self, key: &PublicKey, out: &mut Vec<Reply>) {
        let Some(have) = self
            .members
            .get(key)
            .filter(|m| !m.on_demand)
            .map(|m| m.version)
        else {
            return;
        };
        if have == self.version {
            return;
        }
        let oldest = self.log.front().map_or(self.version + 1, |(v, _)| *v);
        let snapshot = have == 0 || have > self.version || have + 1 < oldest;
        let (from, changed): (u64, BTreeSet<PublicKey>) = if snapshot {
            (0, self.members.keys().copied().collect())
        } else {
            (
                have,
                self.log
                    .iter()
                    .filter(|(v, _)| *v > have)
                    .map(|(_, k)| *k)
                    .collect(),
            )
        };
        let mut upserts = Vec::new();
        let mut removals = Vec::new();
        for k in changed {
            if k == *key {
                continue; // a member is not told about itself
            }
            match self.members.get(&k) {
                Some(m) => upserts.push(m.info.clone()),
                None if !snapshot => removals.push(k),
                None => {}
            }
        }
        delta_messages(
            *key,
            from,
            self.version,
            upserts,
            removals,
            &self.revoked,
            out,
        );
        if let Some(m) = self.members.get_mut(key) {
            m.version = self.version;
        }
    }
}

/// Split one delta into messages within the wire limits: at most
/// [`MAX_UPSERTS`] records and [`transport::wire::MAX_REMOVALS`] removals
/// each, and encoded within [`DELTA_BUDGET`] bytes (records are measured as
/// they go in, so long names and many endpoints make more messages, not an
/// encoding that fails). The first carries `from`; the rest apply on top
/// (`from == to`).
fn delta_messages(
    to: PublicKey,
    from: u64,
    version: u64,
    upserts: Vec<PeerInfo>,
    removals: Vec<PublicKey>,
    revoked: &BTreeSet<PublicKey>,
    out: &mut Vec<Reply>,
) {
    split_records(
        upserts,
        removals,
        revoked,
        |first, upserts, removals, revoked| {
            out.push(Reply {
                to,
                msg: Control::PeerMapDelta {
                    from_version: if first { from } else { version },
                    to_version: version,
                    upserts,
                    removals,
                    revoked,
                },
            })
        },
    );
}

/// The same split for an on-demand member's [`Control::Records`]; the
/// addresses nobody has go in the first.
fn record_messages(
    to: PublicKey,
    upserts: Vec<PeerInfo>,
    removals: Vec<PublicKey>,
    mut missing: Vec<IpAddr>,
    revoked: &BTreeSet<PublicKey>,
    out: &mut Vec<Reply>,
) {
    missing.truncate(MAX_ADDRS);
    split_records(
        upserts,
        removals,
        revoked,
        |_, upserts, removals, revoked| {
            out.push(Reply {
                to,
                msg: Control::Records {
                    upserts,
                    removals,
                    revoked,
                    missing: std::mem::take(&mut missing),
                },
            })
        },
    );
}

/// Cut records and removals into lists that fit one message each (see
/// [`delta_messages`]); `emit(first, upserts, removals, revoked)` is called
/// at least once.
fn split_records(
    upserts: Vec<PeerInfo>,
    removals: Vec<PublicKey>,
    revoked: &BTreeSet<PublicKey>,
    mut emit: impl FnMut(bool, Vec<PeerInfo>, Vec<PublicKey>, Vec<PublicKey>),
) {
    // Half the list limit: each removal may be listed again as revoked.
    let mut rm = removals
        .chunks(transport::wire::MAX_REMOVALS / 2)
        .peekable();
    let mut up = upserts.into_iter().peekable();
    let mut first = true;
    while first || up.peek().is_some() || rm.peek().is_some() {
        let removals = rm.next().map(|c| c.to_vec()).unwrap_or_default();
        let gone: Vec<PublicKey> = removals
            .iter()
            .filter(|k| revoked.contains(*k))
            .copied()
            .collect();
        // A key is 32 bytes and its length byte.
        let mut size = DELTA_OVERHEAD + (removals.len() + gone.len()) * 34;
        let mut batch = Vec::new();
        while let Some(p) = up.peek() {
            let n = p.encoded_len();
            if batch.len() >= MAX_UPSERTS || (!batch.is_empty() && size + n > DELTA_BUDGET) {
                break;
            }
            size += n;
            batch.extend(up.next());
        }
        emit(first, batch, removals, gone);
        first = false;
    }
}

/// Encoded bytes a delta may use: the control cap less room for the
/// message's own fields.
const DELTA_BUDGET: usize = transport::wire::CONTROL_CAP - 1024;
/// The delta's fields other than its lists (versions, names, list headers).
const DELTA_OVERHEAD: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peermap::PeerMap;

    fn key(i: u8) -> PublicKey {
        [i; 32]
    }
    fn ep(i: u8) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, i], 4000))
    }
    fn net(i: u8) -> Vec<IpNet> {
        vec![IpNet {
            addr: IpAddr::from([10, 0, 0, i]),
            prefix: 24,
        }]
    }
    fn reg(r: &mut Registry, now: u64, i: u8, have: u64, out: &mut Vec<Reply>) -> Registered {
        reg_as(r, now, i, have, false, out)
    }

    /// Register member `i`, holding map version `have`, able to fetch
    /// records on demand or not (`lookups`).
    fn reg_as(
        r: &mut Registry,
        now: u64,
        i: u8,
        have: u64,
        lookups: bool,
        out: &mut Vec<Reply>,
    ) -> Registered {
        r.register(
            Duration::from_secs(now),
            key(i),
            ep(i),
            Claim {
                overlay: net(i),
                name: format!("n{i}"),
                have_version: have,
                lookups,
                ..Claim::default()
            },
            out,
        )
    }

    /// Feed the replies for `who` into its peer map.
    fn deliver(out: &[Reply], who: u8, map: &mut PeerMap) {
        for r in out.iter().filter(|r| r.to == key(who)) {
            if let Control::PeerMapDelta {
                from_version,
                to_version,
                upserts,
                removals,
                ..
            } = &r.msg
            {
                map.apply(*from_version, *to_version, upserts, removals)
                    .expect("in order");
            }
        }
    }

    /// Register member `i` as one that can fetch records (`lookups`).
    fn reg_lookups(r: &mut Registry, now: u64, i: u8, out: &mut Vec<Reply>) {
        let res = reg_as(r, now, i, 0, true, out);
        assert!(matches!(res, Registered::Accepted { .. }));
    }

    /// One `Records` message: (upserted keys, removals, revoked, missing).
    type Rec = (Vec<PublicKey>, Vec<PublicKey>, Vec<PublicKey>, Vec<IpAddr>);

    /// The `Records` sent to `who`.
    fn records(out: &[Reply], who: u8) -> Vec<Rec> {
        out.iter()
            .filter(|r| r.to == key(who))
            .filter_map(|r| match &r.msg {
                Control::Records {
                    upserts,
                    removals,
                    revoked,
                    missing,
                } => Some((
                    upserts.iter().map(|p| p.key).collect(),
                    removals.clone(),
                    revoked.clone(),
                    missing.clone(),
                )),
                _ => None,
            })
            .collect()
    }

    /// A registry serving records on demand.
    fn on_demand_registry() -> Registry {
        let cfg = RegistryConfig {
            on_demand: true,
            ..RegistryConfig::default()
        };
        Registry::new(cfg, BTreeMap::new(), 0)
    }

    #[test]
    fn on_demand_members_get_what_they_ask_for_and_hear_only_its_changes() {
        let mut r = on_demand_registry();
        let mut out = Vec::new();
        for i in 1..=3 {
            reg_lookups(&mut r, 0, i, &mut out);
        }
        // A member that cannot fetch (an older node) still gets the map.
        reg(&mut r, 0, 4, 0, &mut out);
        assert!(out
            .iter()
            .all(|o| o.to == key(4) || !matches!(o.msg, Control::PeerMapDelta { .. })));
        assert!(out.iter().any(|o| o.to == key(1)
            && matches!(
                o.msg,
                Control::RegisterAck {
                    on_demand: true,
                    ..
                }
            )));
        assert!(out.iter().any(|o| o.to == key(4)
            && matches!(
                o.msg,
                Control::RegisterAck {
                    on_demand: false,
                    ..
                }
            )));
        let mut full = PeerMap::new(key(4));
        deliver(&out, 4, &mut full);
        assert_eq!(full.len(), 3, "the full-map member knows the others");

        // 1 asks for 2's address and for nobody's: it gets 2's record and
        // the miss; 2 gets 1's record once the pairs are flushed; 3 nothing.
        out.clear();
        let nobody: IpAddr = "10.0.0.99".parse().unwrap();
        r.fetch(
            Duration::from_secs(1),
            key(1),
            &[net(2)[0].addr, nobody],
            &[],
            &mut out,
        );
        assert_eq!(
            records(&out, 1),
            vec![(vec![key(2)], vec![], vec![], vec![nobody])]
        );
        assert!(records(&out, 2).is_empty());
        r.flush_pairs(&mut out);
        assert_eq!(
            records(&out, 2),
            vec![(vec![key(1)], vec![], vec![], vec![])]
        );
        assert!(records(&out, 3).is_empty());
        assert_eq!(r.subscriptions(), 2);

        // 2's endpoint changes: 1 and 2's own holders hear it, 3 does not.
        out.clear();
        let moved = SocketAddr::from(([198, 51, 100, 2], 9000));
        let v = r.version();
        r.heartbeat(Duration::from_secs(2), key(2), moved, 1, v, &mut out);
        assert_eq!(
            records(&out, 1),
            vec![(vec![key(2)], vec![], vec![], vec![])]
        );
        assert!(records(&out, 3).is_empty() && records(&out, 2).is_empty());
        deliver(&out, 4, &mut full);
        assert_eq!(full.get(&key(2)).unwrap().endpoints[0], moved);

        // 1 asks by key for 3 and for a key nobody has: 3's record, and the
        // stranger as a removal.
        out.clear();
        r.fetch(
            Duration::from_secs(3),
            key(1),
            &[],
            &[key(3), key(9)],
            &mut out,
        );
        assert_eq!(
            records(&out, 1),
            vec![(vec![key(3)], vec![key(9)], vec![], vec![])]
        );
        // 1 forgets 3: 3's changes no longer reach it.
        r.forget(&key(1), &[key(3)]);
        out.clear();
        r.heartbeat(Duration::from_secs(4), key(3), moved, 1, 0, &mut out);
        assert!(records(&out, 1).is_empty());
        deliver(&out, 4, &mut full);

        // Revoking 2 tells its holders (and the full-map member), no one else.
        out.clear();
        assert!(r.revoke(&key(2), &mut out));
        assert_eq!(
            records(&out, 1),
            vec![(vec![], vec![key(2)], vec![key(2)], vec![])]
        );
        assert!(records(&out, 3).is_empty());
        deliver(&out, 4, &mut full);
        assert!(full.get(&key(2)).is_none());
        // 1 held 2 and 3 (pair) held 1: all gone with 2, except 3's of 1.
        assert_eq!(r.subscriptions(), 1);
        // A non-member's lookup is told to register.
        out.clear();
        r.fetch(Duration::from_secs(5), key(7), &[nobody], &[], &mut out);
        assert!(matches!(
            out[0].msg,
            Control::Nack {
                code: ErrorCode::NotAllowed,
                ..
            }
        ));
    }

    #[test]
    fn on_demand_members_hold_every_gateway_without_asking() {
        // A packet for a subnet another member routes reaches the TUN only
        // once that route is installed from the record: nothing would ask.
        let mut r = on_demand_registry();
        let mut out = Vec::new();
        reg_lookups(&mut r, 0, 1, &mut out);
        out.clear();
        // A gateway joins: the member already there gets its record.
        let res = r.register(
            Duration::from_secs(1),
            key(2),
            ep(2),
            Claim {
                overlay: net(2),
                routes: vec![lan("192.168.7.0/24")],
                name: "gw".into(),
                lookups: true,
                ..Claim::default()
            },
            &mut out,
        );
        assert!(matches!(res, Registered::Accepted { .. }));
        assert_eq!(
            records(&out, 1),
            vec![(vec![key(2)], vec![], vec![], vec![])]
        );
        // A member joining later gets it with its registration; the
        // gateway itself is sent nobody's record.
        out.clear();
        reg_lookups(&mut r, 2, 3, &mut out);
        assert_eq!(
            records(&out, 3),
            vec![(vec![key(2)], vec![], vec![], vec![])]
        );
        assert!(records(&out, 2).is_empty());
        // The gateway's changes reach both.
        out.clear();
        let moved = SocketAddr::from(([198, 51, 100, 2], 9000));
        r.heartbeat(Duration::from_secs(3), key(2), moved, 1, 0, &mut out);
        assert_eq!(records(&out, 1).len(), 1);
        assert_eq!(records(&out, 3).len(), 1);
    }

    #[test]
    fn members_learn_each_other_through_deltas() {
        let mut r = Registry::new(RegistryConfig::default(), BTreeMap::new(), 0);
        let mut maps: Vec<PeerMap> = (0..4).map(|i| PeerMap::new(key(i + 1))).collect();
        for i in 1..=4u8 {
            let mut out = vec![];
            let have = maps[i as usize - 1].version();
            assert_eq!(
                reg(&mut r, 0, i, have, &mut out),
                Registered::Accepted {
                    owners_changed: true
                }
            );
            for j in 1..=4u8 {
                deliver(&out, j, &mut maps[j as usize - 1]);
            }
        }
        for (i, m) in maps.iter().enumerate() {
            assert_eq!(m.len(), 3, "map of node {}", i + 1);
            assert_eq!(m.version(), r.version());
        }
        // The last joiner's registration sent only one upsert to the others.
        let mut out = vec![];
        reg(&mut r, 1, 5, 0, &mut out);
        let to1: Vec<_> = out.iter().filter(|x| x.to == key(1)).collect();
        assert_eq!(to1.len(), 1);
        match &to1[0].msg {
            Control::PeerMapDelta {
                upserts, removals, ..
            } => {
                assert_eq!(upserts.len(), 1);
                assert!(removals.is_empty());
            }
            m => panic!("{m:?}"),
        }
    }

    fn lan(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn reg_routes(r: &mut Registry, i: u8, routes: &[&str], out: &mut Vec<Reply>) -> Registered {
        let claim = Claim {
            overlay: net(i),
            routes: routes.iter().map(|s| lan(s)).collect(),
            name: format!("n{i}"),
            ..Claim::default()
        };
        r.register(Duration::ZERO, key(i), ep(i), claim, out)
    }

    #[test]
    fn subnet_routes_are_distributed_and_overlaps_refused() {
        let mut r = Registry::new(RegistryConfig::default(), BTreeMap::new(), 0);
        let mut out = vec![];
        // Host bits are cleared: the record carries the network.
        assert!(matches!(
            reg_routes(&mut r, 1, &["192.168.5.1/24"], &mut out),
            Registered::Accepted { .. }
        ));
        let mut m = PeerMap::new(key(2));
        reg(&mut r, 0, 2, 0, &mut out);
        deliver(&out, 2, &mut m);
        assert_eq!(m.get(&key(1)).unwrap().routes, vec![lan("192.168.5.0/24")]);
        // Key 3 overlapping it, wider or narrower: refused, naming the owner.
        for wide in ["192.168.0.0/16", "192.168.5.128/25"] {
            out.clear();
            assert_eq!(
                reg_routes(&mut r, 3, &["10.20.0.0/16", wide], &mut out),
                Registered::Refused
            );
            match &out[0].msg {
                Control::Nack {
                    code: ErrorCode::RouteInUse,
                    message,
                } => assert!(message.contains("192.168.5.0/24") && message.contains("n1")),
                m => panic!("{m:?}"),
            }
        }
        // A disjoint route, and the owner re-registering with its own: fine.
        out.clear();
        assert!(matches!(
            reg_routes(&mut r, 3, &["192.168.6.0/24"], &mut out),
            Registered::Accepted { .. }
        ));
        assert!(matches!(
            reg_routes(&mut r, 1, &["192.168.5.0/24"], &mut out),
            Registered::Accepted { .. }
        ));
        // Bad routes: the default route, too many.
        assert_eq!(
            reg_routes(&mut r, 4, &["0.0.0.0/0"], &mut out),
            Registered::Refused
        );
        let many: Vec<String> = (0..9).map(|i| format!("172.16.{i}.0/24")).collect();
        let many: Vec<&str> = many.iter().map(|s| s.as_str()).collect();
        assert_eq!(reg_routes(&mut r, 4, &many, &mut out), Registered::Refused);
        // Once the owner leaves, its subnet is free.
        r.leave(&key(1), &mut out);
        assert!(matches!(
            reg_routes(&mut r, 4, &["192.168.4.0/23"], &mut out),
            Registered::Accepted { .. }
        ));
        // A hub that allows overlaps admits a second gateway.
        let cfg = RegistryConfig {
            allow_route_overlap: true,
            ..RegistryConfig::default()
        };
        let mut r = Registry::new(cfg, BTreeMap::new(), 0);
        reg_routes(&mut r, 1, &["192.168.5.0/24"], &mut out);
        assert!(matches!(
            reg_routes(&mut r, 2, &["192.168.5.0/24"], &mut out),
            Registered::Accepted { .. }
        ));
    }

    #[test]
    fn address_conflict_is_refused_and_ownership_survives() {
        let mut r = Registry::new(RegistryConfig::default(), BTreeMap::new(), 0);
        let mut out = vec![];
        reg(&mut r, 0, 1, 0, &mut out);
        out.clear();
        // Key 2 claims key 1's address.
        let thief = Claim {
            overlay: net(1),
            name: "thief".into(),
            ..Claim::default()
        };
        let res = r.register(Duration::ZERO, key(2), ep(2), thief.clone(), &mut out);
        assert_eq!(res, Registered::Refused);
        assert!(matches!(
            &out[0].msg,
            Control::Nack {
                code: ErrorCode::AddressInUse,
                ..
            }
        ));
        // A restarted hub with the persisted table refuses too, even while key 1 is offline.
        let mut r2 = Registry::new(RegistryConfig::default(), r.owners().clone(), 1000);
        out.clear();
        assert_eq!(
            r2.register(Duration::ZERO, key(2), ep(2), thief, &mut out),
            Registered::Refused
        );
        // The owner itself is welcome.
        assert!(matches!(
            reg(&mut r2, 0, 1, 0, &mut out),
            Registered::Accepted {
                owners_changed: false
            }
        ));
    }

    #[test]
    fn a_new_heartbeat_interval_reaches_members_in_their_acks_and_sets_expiry() {
        let mut r = Registry::new(RegistryConfig::default(), BTreeMap::new(), 0);
        let mut out = vec![];
        reg(&mut r, 0, 1, 0, &mut out);
        reg(&mut r, 0, 2, 0, &mut out);
        let acked = |out: &[Reply]| {
            out.iter().find_map(|r| match r.msg {
                Control::HeartbeatAck { interval_ms, .. } => Some(interval_ms),
                _ => None,
            })
        };
        out.clear();
        let v = r.version();
        r.heartbeat(Duration::from_secs(1), key(1), ep(1), 1, v, &mut out);
        assert_eq!(acked(&out), Some(Some(5000)));
        // Reloaded to 1 s and 3 beats: the next ack says so, and a member
        // silent for 3 s (not 30) expires.
        r.set_timing(Duration::from_secs(1), 3);
        out.clear();
        r.heartbeat(Duration::from_secs(2), key(1), ep(1), 2, v, &mut out);
        assert_eq!(acked(&out), Some(Some(1000)));
        assert!(r.expire(Duration::from_secs(2), &mut out).is_empty());
        assert_eq!(r.expire(Duration::from_secs(4), &mut out), vec![key(2)]);
    }

    #[test]
    fn silent_members_expire_after_configured_beats() {
        let cfg = RegistryConfig {
            heartbeat: Duration::from_secs(1),
            expire_beats: 3,
            ..RegistryConfig::default()
        };
        let mut r = Registry::new(cfg, BTreeMap::new(), 0);
        let mut out = vec![];
        let mut m1 = PeerMap::new(key(1));
        reg(&mut r, 0, 1, 0, &mut out);
        reg(&mut r, 0, 2, 0, &mut out);
        deliver(&out, 1, &mut m1);
        assert_eq!(m1.len(), 1);
        for t in 1..=5 {
            out.clear();
            r.heartbeat(
                Duration::from_secs(t),
                key(1),
                ep(1),
                t,
                m1.version(),
                &mut out,
            );
            let gone = r.expire(Duration::from_secs(t), &mut out);
            deliver(&out, 1, &mut m1);
            if t <= 3 {
                assert!(gone.is_empty(), "t={t}");
                assert_eq!(m1.len(), 1);
            } else if t == 4 {
                assert_eq!(gone, vec![key(2)]);
                assert_eq!(m1.len(), 0, "removal pushed");
            }
        }
        assert!(r.member(&key(1)).is_some());
        // Its address stays owned.
        assert_eq!(r.owners().get(&IpAddr::from([10, 0, 0, 2])), Some(&key(2)));
    }

    #[test]
    fn endpoint_change_is_pushed_and_lagging_members_catch_up() {
        let mut r = Registry::new(RegistryConfig::default(), BTreeMap::new(), 0);
        let mut out = vec![];
        let mut m1 = PeerMap::new(key(1));
        reg(&mut r, 0, 1, 0, &mut out);
        reg(&mut r, 0, 2, 0, &mut out);
        deliver(&out, 1, &mut m1);
        out.clear();
        let new_ep = SocketAddr::from(([198, 51, 100, 7], 999));
        r.heartbeat(Duration::from_secs(1), key(2), new_ep, 1, 2, &mut out);
        deliver(&out, 1, &mut m1);
        assert_eq!(m1.get(&key(2)).unwrap().endpoints[0], new_ep);
        // A member that lost its map (restart) reports version 0 and gets a snapshot.
        out.clear();
        let mut fresh = PeerMap::new(key(1));
        r.heartbeat(Duration::from_secs(2), key(1), ep(1), 2, 0, &mut out);
        deliver(&out, 1, &mut fresh);
        assert_eq!(fresh.len(), 1);
        assert_eq!(fresh.version(), r.version());
    }

    #[test]
    fn a_member_on_a_stream_offers_no_stream_address_to_others() {
        let mut r = Registry::new(RegistryConfig::default(), BTreeMap::new(), 0);
        let mut out = vec![];
        let mut m1 = PeerMap::new(key(1));
        reg(&mut r, 0, 1, 0, &mut out);
        let stream: SocketAddr = "[100::7]:443".parse().unwrap();
        let lan = SocketAddr::from(([192, 168, 1, 2], 4800));
        let claim = Claim {
            overlay: net(2),
            local_endpoints: vec![lan, "[100::9]:443".parse().unwrap()],
            ..Claim::default()
        };
        r.register(Duration::ZERO, key(2), stream, claim, &mut out);
        // Its heartbeats come by the stream too: no rebinding to it.
        r.heartbeat(Duration::from_secs(1), key(2), stream, 1, 0, &mut out);
        deliver(&out, 1, &mut m1);
        assert_eq!(m1.get(&key(2)).unwrap().endpoints, vec![lan]);
        // Back on UDP: the observed endpoint is first again.
        out.clear();
        let v = r.version();
        r.heartbeat(Duration::from_secs(2), key(2), ep(2), 2, v, &mut out);
        deliver(&out, 1, &mut m1);
        assert_eq!(m1.get(&key(2)).unwrap().endpoints, vec![ep(2), lan]);
    }

    #[test]
    fn unknown_heartbeat_is_told_to_register_and_leave_removes() {
        let mut r = Registry::new(RegistryConfig::default(), BTreeMap::new(), 0);
        let mut out = vec![];
        r.heartbeat(Duration::ZERO, key(9), ep(9), 1, 0, &mut out);
        assert!(matches!(
            out[0].msg,
            Control::Nack {
                code: ErrorCode::NotAllowed,
                ..
            }
        ));
        let mut m1 = PeerMap::new(key(1));
        out.clear();
        reg(&mut r, 0, 1, 0, &mut out);
        reg(&mut r, 0, 2, 0, &mut out);
        deliver(&out, 1, &mut m1);
        out.clear();
        assert!(r.leave(&key(2), &mut out));
        deliver(&out, 1, &mut m1);
        assert_eq!(m1.len(), 0);
    }

    #[test]
    fn revoked_key_leaves_every_map_and_cannot_return() {
        let mut r = Registry::new(RegistryConfig::default(), BTreeMap::new(), 0);
        let mut out = vec![];
        let mut m1 = PeerMap::new(key(1));
        reg(&mut r, 0, 1, 0, &mut out);
        reg(&mut r, 0, 2, 0, &mut out);
        deliver(&out, 1, &mut m1);
        assert_eq!(m1.len(), 1);
        out.clear();
        assert!(r.revoke(&key(2), &mut out));
        assert!(!r.revoke(&key(2), &mut out), "idempotent");
        assert!(
            out.iter().any(|o| matches!(&o.msg,
                Control::PeerMapDelta { removals, revoked, .. }
                    if removals == &vec![key(2)] && revoked == &vec![key(2)])),
            "the removal is marked as a revocation: {out:?}"
        );
        deliver(&out, 1, &mut m1);
        assert_eq!(m1.len(), 0, "removal pushed at once");
        assert!(
            r.owners().get(&IpAddr::from([10, 0, 0, 2])).is_none(),
            "address freed"
        );
        out.clear();
        assert_eq!(reg(&mut r, 1, 2, 0, &mut out), Registered::Refused);
        assert!(matches!(
            out[0].msg,
            Control::Nack {
                code: ErrorCode::Revoked,
                ..
            }
        ));
        assert_eq!(out.len(), 1, "learns nothing of the map");
        // Counted: two accepted, one refused as revoked.
        let (accepted, refused) = r.registration_counts();
        assert_eq!(accepted, 2);
        assert_eq!(refused.get("revoked"), Some(&1));
        assert_eq!(refused.len(), 1);
        out.clear();
        r.heartbeat(Duration::from_secs(2), key(2), ep(2), 1, 0, &mut out);
        assert!(matches!(
            out[0].msg,
            Control::Nack {
                code: ErrorCode::Revoked,
                ..
            }
        ));
    }

    #[test]
    fn allow_list_admits_only_listed_keys() {
        let mut r = Registry::new(RegistryConfig::default(), BTreeMap::new(), 0);
        let mut out = vec![];
        let mut m1 = PeerMap::new(key(1));
        reg(&mut r, 0, 1, 0, &mut out);
        reg(&mut r, 0, 2, 0, &mut out);
        deliver(&out, 1, &mut m1);
        assert_eq!(m1.len(), 1);
        out.clear();
        r.set_allowed(Some(BTreeSet::from([key(1)])), &mut out);
        deliver(&out, 1, &mut m1);
        assert_eq!(m1.len(), 0, "unlisted member removed at once");
        out.clear();
        assert_eq!(reg(&mut r, 1, 3, 0, &mut out), Registered::Refused);
        assert_eq!(out.len(), 1, "one refusal, nothing of the map");
        assert!(matches!(
            out[0].msg,
            Control::Nack {
                code: ErrorCode::NotListed,
                ..
            }
        ));
        out.clear();
        let v = r.version();
        assert!(matches!(
            reg(&mut r, 1, 1, v, &mut out),
            Registered::Accepted { .. }
        ));
    }

    #[test]
    fn deltas_are_split_by_encoded_size_with_long_names_and_many_endpoints() {
        let mut r = Registry::new(RegistryConfig::default(), BTreeMap::new(), 0);
        // 200 members, each with two overlay addresses, eight IPv6
        // endpoints and a name far past the limit (multi-byte characters,
        // so the cut must find a character boundary).
        let record = |i: u8| -> (Vec<IpNet>, Vec<SocketAddr>, String) {
            let overlay = vec![
                IpNet {
                    addr: IpAddr::from([10, 1, i, 1]),
                    prefix: 16,
                },
                IpNet {
                    addr: IpAddr::from([0xfd00, 0, 0, 0, 0, 0, i as u16, 1]),
                    prefix: 64,
                },
            ];
            let eps = (0..8u16)
                .map(|j| {
                    SocketAddr::from((
                        [0x2001, 0xdb8, i as u16, j, 0xffff, 0xffff, 0xffff, 0xffff],
                        40_000 + j,
                    ))
                })
                .collect();
            (overlay, eps, format!("{i:03}-{}", "ü".repeat(400)))
        };
        let mut out = vec![];
        for i in 1..=200u8 {
            let (overlay, eps, name) = record(i);
            r.register(
                Duration::ZERO,
                key(i),
                eps[0],
                Claim {
                    overlay,
                    local_endpoints: eps[1..].to_vec(),
                    name,
                    // Eight IPv6 subnet routes each, the most allowed.
                    routes: (0..8u16)
                        .map(|j| IpNet {
                            addr: IpAddr::from([0xfd10, i as u16, j, 0, 0, 0, 0, 0]),
                            prefix: 48,
                        })
                        .collect(),
                    ..Claim::default()
                },
                &mut out,
            );
        }
        // Every message of every member encodes within the cap: no delta
        // is lost to a failed encoding.
        for x in &out {
            let enc = x.msg.encode().expect("fits the control cap");
            assert!(enc.len() <= transport::wire::CONTROL_CAP);
        }
        // A member joining now gets the whole map in several messages, and
        // its map holds every record whole.
        out.clear();
        let mut m = PeerMap::new(key(1));
        r.heartbeat(Duration::from_secs(1), key(1), ep(1), 1, 0, &mut out);
        let to1 = out.iter().filter(|x| x.to == key(1)).count();
        assert!(to1 > 199 / MAX_UPSERTS + 1, "split by size: {to1} messages");
        for x in &out {
            let enc = x.msg.encode().expect("fits the control cap");
            assert!(enc.len() <= transport::wire::CONTROL_CAP);
        }
        deliver(&out, 1, &mut m);
        assert_eq!(m.len(), 199);
        for i in 2..=200u8 {
            let p = m.get(&key(i)).expect("record");
            let (overlay, _, name) = record(i);
            assert_eq!(p.endpoints.len(), 8);
            assert_eq!(p.overlay, overlay);
            assert!(p.name.len() <= transport::wire::MAX_NAME);
            assert!(name.starts_with(&p.name) && p.name.starts_with(&format!("{i:03}-ü")));
        }
    }

    #[test]
    fn large_maps_are_split_within_wire_limits() {
        let mut r = Registry::new(RegistryConfig::default(), BTreeMap::new(), 0);
        let mut out = vec![];
        for i in 1..=200u8 {
            reg(&mut r, 0, i, 0, &mut out);
        }
        out.clear();
        let mut m = PeerMap::new(key(1));
        r.heartbeat(Duration::from_secs(1), key(1), ep(1), 1, 0, &mut out);
        for x in &out {
            let enc = x.msg.encode().expect("fits the control cap");
            assert!(enc.len() < transport::wire::CONTROL_CAP);
        }
        deliver(&out, 1, &mut m);
        assert_eq!(m.len(), 199);
    }
}
