//! The hub's registry actor: the pure [`Registry`] plus the durable owner
//! table. Control messages arrive from the hub's data plane as [`NetEvent`]s;
//! replies go back as [`Cmd::Send`].

use crate::cluster::{Batch, Book, Change, Cluster, Outcome, ProposeError};
use crate::dataplane::{Cmd, GetSnapshot, NetEvent};
use crate::registry::{short_key, Claim, Registered, Registry, RegistryConfig, Reply};
use crate::store::OwnerStore;
use actix::prelude::*;
use serde::Serialize;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use transport::wire::{Control, ErrorCode, PublicKey};
use transport::Event;

/// One member, for the hub's status.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemberStatus {
    /// Name.
    pub name: String,
    /// Key (short hex).
    pub key: String,
    /// Overlay addresses.
    pub overlay: Vec<String>,
    /// Endpoints (observed first).
    pub endpoints: Vec<String>,
    /// Seconds since last heard.
    pub last_seen_s: f64,
}

/// The hub's status.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HubStatus {
    /// Map version.
    pub map_version: u64,
    /// Online members.
    pub members: Vec<MemberStatus>,
    /// Addresses owned (online or not).
    pub owned_addresses: usize,
    /// Keys revoked.
    pub revoked: usize,
    /// Frames relayed between members that have no direct path.
    pub relayed: u64,
    /// Bytes of those frames.
    pub relayed_bytes: u64,
    /// Relay messages dropped (unknown or unready destination, full queue).
    pub relay_dropped: u64,
    /// The data plane's counters (as a peer's status has them).
    pub counters: std::collections::BTreeMap<String, u64>,
    /// Heartbeat interval members are told, seconds.
    pub heartbeat_s: f64,
    /// Silent heartbeats before a member is dropped.
    pub expire_beats: u32,
    /// Registrations accepted since the hub started.
    pub registrations: u64,
    /// Registrations refused since the hub started, by reason.
    pub refusals: std::collections::BTreeMap<String, u64>,
    /// The hubs' shared registry, when this hub is one of several.
    pub cluster: Option<ClusterStatus>,
}

/// This hub's view of the hubs' Raft.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterStatus {
    /// This hub's id.
    pub id: u64,
    /// "Leader", "Follower", "Candidate" or "Learner".
    pub state: String,
    /// The leader this hub knows of.
    pub leader: Option<u64>,
    /// Raft term.
    pub term: u64,
    /// Index of the last entry applied here.
    pub applied: Option<u64>,
    /// Registrations waiting for the log.
    pub waiting: usize,
}

/// Revoke a node key (operator command). Replies whether it was newly revoked.
#[derive(Debug, Message)]
#[rtype(result = "Result<bool, String>")]
pub struct Revoke(pub PublicKey);

/// Replace the allow-list (None: anyone with the network key); members not
/// on it leave the map at once.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct SetAllowed(pub Option<std::collections::BTreeSet<PublicKey>>);

/// New heartbeat timing (a reload): the interval members are told in their
/// next heartbeat's ack, and the silent beats before one is dropped.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct SetTiming {
    /// Heartbeat interval.
    pub heartbeat: std::time::Duration,
    /// Silent heartbeats before a member is dropped.
    pub expire_beats: u32,
}

/// Ask for the hub's status.
#[derive(Debug, Message)]
#[rtype(result = "HubStatus")]
pub struct GetHubStatus;

/// Longest a change waits before it is pushed to every member (changes
/// within it share one delta per member).
pub const PUSH_DELAY: Duration = Duration::from_millis(250);

/// The registry actor.
pub struct RegistryActor {
    reg: Registry,
    /// A push of changes to all members is scheduled.
    push_scheduled: bool,
    /// Records of members that looked others up wait to be sent to those.
    pairs_scheduled: bool,
    /// Replies to registrations that changed address ownership, held until
    /// the owners are stored (one write for all registrations within
    /// [`PUSH_DELAY`]: a write per registration made a thousand members
    /// joining at once take minutes).
    held: Vec<(PublicKey, Vec<Reply>)>,
    store: Option<OwnerStore>,
    plane: Recipient<Cmd>,
    snap: Option<Recipient<GetSnapshot>>,
    epoch: Instant,
    /// The hubs' replicated book (None: this hub alone decides).
    cluster: Option<Cluster>,
    /// Registrations that change ownership, waiting to go through the log.
    waiting: Vec<(PublicKey, SocketAddr, Claim)>,
    /// A batch of them is in the log's hands.
    proposing: bool,
    /// The allow-list this hub's own config gave, as last loaded: a reload
    /// that leaves it as it was proposes nothing.
    own_allow: Option<std::collections::BTreeSet<PublicKey>>,
}

/// The book changed (an entry was applied or a snapshot installed).
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct BookUpdate(Arc<Book>);

impl RegistryActor {
    /// A registry answering through `plane`, persisting ownership to `store`
    /// (None: memory only, for tests that model a disk loss).
    pub fn new(reg: Registry, store: Option<OwnerStore>, plane: Recipient<Cmd>) -> RegistryActor {
        let mut reg = reg;
        reg.defer_pushes(true);
        RegistryActor {
            reg,
            push_scheduled: false,
            pairs_scheduled: false,
            held: Vec::new(),
            store,
            plane,
            snap: None,
            epoch: Instant::now(),
            cluster: None,
            waiting: Vec::new(),
            proposing: false,
            own_allow: None,
        }
    }

    /// Share ownership and revocations with other hubs through `cluster`
    /// (whose log is then the durable copy: the owner file is not used).
    pub fn with_cluster(mut self, cluster: Cluster) -> RegistryActor {
        self.store = None;
        self.cluster = Some(cluster);
        self.own_allow = self.reg.allowed().cloned();
        self
    }

    /// Put the waiting registrations through the log, one batch at a time.
    fn propose(&mut self, ctx: &mut Context<Self>) {
        let Some(c) = self.cluster.clone() else {
            return;
        };
        if self.proposing || self.waiting.is_empty() {
            return;
        }
        self.proposing = true;
        let regs = std::mem::take(&mut self.waiting);
        let batch = Batch(
            regs.iter()
                .map(|(key, _, claim)| Change::Claim {
                    key: *key,
                    addrs: claim.overlay.iter().map(|n| n.addr).collect(),
                })
                .collect(),
        );
        let fut = async move { c.propose(batch).await };
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            act.proposing = false;
            act.decided(regs, res, ctx);
            act.propose(ctx);
        }));
    }

    /// Put an allow-list change through the log (logged if it fails: the
    /// operator reloads again).
    fn propose_allow(&mut self, change: Change, ctx: &mut Context<Self>) {
        let Some(c) = self.cluster.clone() else {
            return;
        };
        let fut = async move { c.propose(Batch(vec![change])).await };
        ctx.spawn(fut.into_actor(self).map(|res, _, _| match res {
            Ok(_) => tracing::info!("allow-list committed by the hubs"),
            Err(e) => tracing::error!(%e, "allow-list not committed: reload again once the hubs reach a majority"),
        }));
    }

    /// Answer registrations the log decided on.
    fn decided(
        &mut self,
        regs: Vec<(PublicKey, SocketAddr, Claim)>,
        res: Result<Vec<Outcome>, ProposeError>,
        ctx: &mut Context<Self>,
    ) {
        let now = self.now();
        let mut out = Vec::new();
        let res = match res {
            Ok(o) if o.len() == regs.len() => Ok(o),
            Ok(o) => Err(ProposeError::Fatal(format!(
                "{} outcomes for {} claims",
                o.len(),
                regs.len()
            ))),
            Err(e) => Err(e),
        };
        match res {
            Ok(outcomes) => {
                for ((key, observed, claim), o) in regs.into_iter().zip(outcomes) {
                    match o {
                        Outcome::Done | Outcome::Unchanged => {
                            let addrs: Vec<IpAddr> = claim.overlay.iter().map(|n| n.addr).collect();
                            // The leader applied it; this hub's copy may lag.
                            self.reg.grant(&key, &addrs);
                            let name = claim.name.clone();
                            if let Registered::Accepted { .. } =
                                self.reg.register(now, key, observed, claim, &mut out)
                            {
                                tracing::info!(%name, key = %short_key(&key), %observed, "member registered (ownership committed by the hubs)");
                            }
                        }
                        Outcome::InUse { addr, owner } => self.reg.refuse(
                            key,
                            ErrorCode::AddressInUse,
                            format!(
                                "overlay address {addr} is owned by another node (key {})",
                                short_key(&owner)
                            ),
                            &mut out,
                        ),
                        Outcome::Revoked => self.reg.refuse(
                            key,
                            ErrorCode::Revoked,
                            "this node's key was revoked by the hub operator".into(),
                            &mut out,
                        ),
                    }
                }
            }
            Err(e) => {
                tracing::warn!(%e, claims = regs.len(), "registrations not confirmed by the hubs");
                for (key, _, _) in regs {
                    self.reg.refuse(
                        key,
                        ErrorCode::Busy,
                        format!("hub cannot confirm address ownership: {e}"),
                        &mut out,
                    );
                }
            }
        }
        self.flush(out);
        self.schedule_push(ctx);
    }

    /// Also report the data plane's relay counters in the status.
    pub fn with_snapshot(mut self, snap: Recipient<GetSnapshot>) -> RegistryActor {
        self.snap = Some(snap);
        self
    }

    /// A registry with config `cfg` whose ownership table is loaded from `store`.
    pub fn open(
        cfg: RegistryConfig,
        store: OwnerStore,
        base_version: u64,
        plane: Recipient<Cmd>,
    ) -> Result<RegistryActor, crate::store::StoreError> {
        let owners = store.load()?;
        let mut reg = Registry::new(cfg, owners, base_version);
        reg.set_revoked(store.load_revoked()?);
        Ok(RegistryActor::new(reg, Some(store), plane))
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Within [`PUSH_DELAY`]: store the owners for the held registrations
    /// and answer them, then push pending changes to all members.
    fn schedule_push(&mut self, ctx: &mut Context<Self>) {
        if (self.reg.push_pending() || !self.held.is_empty()) && !self.push_scheduled {
            self.push_scheduled = true;
            ctx.run_later(PUSH_DELAY, |act, _| {
                act.push_scheduled = false;
                act.commit_held();
                let mut out = Vec::new();
                act.reg.flush_pushes(&mut out);
                act.flush(out);
            });
        }
    }

    /// Store the owners once for every held registration; answer them, or
    /// (not durable) refuse them rather than promise an address the hub
    /// might forget.
    fn commit_held(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let held = std::mem::take(&mut self.held);
        let saved = match &self.store {
            Some(store) => store.save(self.reg.owners(), self.reg.revoked()),
            None => Ok(()),
        };
        match saved {
            Ok(()) => {
                for (_, out) in held {
                    self.flush(out);
                }
            }
            Err(e) => {
                tracing::error!(%e, "cannot persist owners");
                for (key, _) in held {
                    self.reg.leave(&key, &mut Vec::new());
                    self.flush(vec![Reply {
                        to: key,
                        msg: Control::Nack {
                            code: ErrorCode::Busy,
                            message: format!("hub cannot store membership: {e}"),
                        },
                    }]);
                }
            }
        }
    }

    fn flush(&self, out: Vec<Reply>) {
        for r in out {
            // Acks of unreliable heartbeats go as datagrams; everything that
            // must arrive in order (acks, deltas, refusals) goes reliably.
            let reliable = !matches!(r.msg, Control::HeartbeatAck { .. });
            self.plane.do_send(Cmd::Send {
                to: r.to,
                msg: r.msg,
                reliable,
            });
        }
    }
}

impl Actor for RegistryActor {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Context<Self>) {
        if let Some(c) = &self.cluster {
            let first = c.book.borrow().clone();
            let updates = futures_util::stream::unfold(c.book.clone(), |mut rx| async move {
                rx.changed().await.ok()?;
                let b = rx.borrow_and_update().clone();
                Some((BookUpdate(b), rx))
            });
            ctx.add_stream(updates);
            // This hub's own allow file seeds a cluster that has none yet.
            let seed = match (first.allow_set, self.reg.allowed()) {
                (false, Some(keys)) => Some(keys.iter().copied().collect()),
                _ => None,
            };
            StreamHandler::handle(self, BookUpdate(first), ctx);
            if let Some(keys) = seed {
                self.propose_allow(Change::SeedAllow { keys }, ctx);
            }
        }
        self.plane
            .do_send(Cmd::SetHeartbeat(self.reg.heartbeat_interval()));
        let step = (self.reg.config().heartbeat / 2).max(Duration::from_millis(20));
        ctx.run_interval(step, |act, ctx| {
            let mut out = Vec::new();
            let gone = act.reg.expire(act.now(), &mut out);
            for k in gone {
                tracing::info!(key = %short_key(&k), "member expired");
                act.plane.do_send(Cmd::RemovePeer(k));
            }
            act.flush(out);
            act.schedule_push(ctx);
        });
    }
}

impl StreamHandler<BookUpdate> for RegistryActor {
    fn handle(&mut self, b: BookUpdate, ctx: &mut Context<Self>) {
        let mut out = Vec::new();
        for k in self.reg.apply_book(&b.0.owners, &b.0.revoked, &mut out) {
            tracing::warn!(key = %short_key(&k), "node key revoked (through the hubs' log)");
            self.plane.do_send(Cmd::RemovePeer(k));
        }
        if b.0.allow_set && self.reg.allowed() != b.0.allowed.as_ref() {
            let before: Vec<PublicKey> = self.reg.members().map(|(k, _)| *k).collect();
            self.reg.set_allowed(b.0.allowed.clone(), &mut out);
            for k in before.into_iter().filter(|k| self.reg.member(k).is_none()) {
                self.plane.do_send(Cmd::RemovePeer(k));
            }
            tracing::info!(
                keys = b.0.allowed.as_ref().map(|a| a.len()),
                "allow-list replaced (through the hubs' log)"
            );
        }
        self.flush(out);
        self.schedule_push(ctx);
    }

    fn finished(&mut self, _ctx: &mut Context<Self>) {
        // The book's sender lives as long as Raft; nothing to do here (the
        // default would stop the registry).
    }
}

impl Handler<NetEvent> for RegistryActor {
    type Result = ();
    fn handle(&mut self, ev: NetEvent, ctx: &mut Context<Self>) {
        let now = self.now();
        let mut out = Vec::new();
        let key = ev.peer;
        let Event::Control(msg) = ev.event else {
            self.reg.seen(now, &key);
            return;
        };
        let Some(observed) = ev.endpoint else {
            return;
        };
        match msg {
            Control::Register {
                overlay,
                local_endpoints,
                name,
                have_version,
                routes,
                lookups,
            } => {
                let claim = Claim {
                    overlay,
                    routes,
                    local_endpoints,
                    name: name.clone(),
                    have_version,
                    lookups,
                };
                if self.cluster.is_some()
                    && self.reg.admissible(&key, &claim)
                    && self.reg.changes_owners(&key, &claim.overlay)
                {
                    // Ownership is the hubs' to decide: answered once the
                    // log has it (the latest registration of a key wins).
                    self.reg.seen(now, &key);
                    self.waiting.retain(|(k, _, _)| *k != key);
                    self.waiting.push((key, observed, claim));
                    self.propose(ctx);
                    return;
                }
                let res = self.reg.register(now, key, observed, claim, &mut out);
                match res {
                    Registered::Accepted { owners_changed } => {
                        if owners_changed && self.store.is_some() {
                            // Answered once the owners are stored.
                            self.held.push((key, std::mem::take(&mut out)));
                        }
                        tracing::info!(%name, key = %short_key(&key), %observed, "member registered");
                    }
                    Registered::Refused => {
                        tracing::warn!(%name, key = %short_key(&key), "registration refused");
                    }
                }
            }
            Control::Heartbeat { seq, map_version } => {
                self.reg
                    .heartbeat(now, key, observed, seq, map_version, &mut out);
            }
            Control::PunchRequest { target } => {
                self.reg.seen(now, &key);
                // Tell both sides to send to each other now.
                let eps = |k: &PublicKey| self.reg.member(k).map(|m| m.info.endpoints.clone());
                if let (Some(mine), Some(theirs)) = (eps(&key), eps(&target)) {
                    if target != key {
                        for (to, peer, candidates) in [(key, target, theirs), (target, key, mine)] {
                            self.plane.do_send(Cmd::Send {
                                to,
                                msg: Control::PunchNotify { peer, candidates },
                                reliable: false,
                            });
                        }
                    }
                }
            }
            Control::Lookup { addrs, keys } => {
                self.reg.fetch(now, key, &addrs, &keys, &mut out);
                if self.reg.pairs_pending() && !self.pairs_scheduled {
                    // After the lookups already in the mailbox: one message
                    // per member asked about for all of them.
                    self.pairs_scheduled = true;
                    ctx.run_later(Duration::ZERO, |act, _| {
                        act.pairs_scheduled = false;
                        let mut out = Vec::new();
                        act.reg.flush_pairs(&mut out);
                        act.flush(out);
                    });
                }
            }
            Control::Forget { keys } => {
                self.reg.seen(now, &key);
                self.reg.forget(&key, &keys);
            }
            Control::Leave => {
                if self.reg.leave(&key, &mut out) {
                    tracing::info!(key = %short_key(&key), "member left");
                }
                self.plane.do_send(Cmd::RemovePeer(key));
            }
            _ => self.reg.seen(now, &key),
        }
        self.flush(out);
        self.schedule_push(ctx);
    }
}

impl Handler<Revoke> for RegistryActor {
    type Result = ResponseActFuture<Self, Result<bool, String>>;
    fn handle(&mut self, r: Revoke, ctx: &mut Context<Self>) -> Self::Result {
        if let Some(c) = self.cluster.clone() {
            // Through the log: applied at every hub (this one included,
            // when the book update arrives) or, without a majority, nowhere
            // until the hubs reconnect.
            let key = r.0;
            let fut = async move { c.propose(Batch(vec![Change::Revoke { key }])).await };
            return Box::pin(fut.into_actor(self).map(|res, _, _| match res {
                Ok(o) => Ok(o.first() == Some(&Outcome::Done)),
                Err(e) => Err(format!("not confirmed by a majority of hubs: {e}")),
            }));
        }
        Box::pin(actix::fut::ready(self.revoke_here(r, ctx)))
    }
}

impl RegistryActor {
    fn revoke_here(&mut self, r: Revoke, ctx: &mut Context<Self>) -> Result<bool, String> {
        let mut out = Vec::new();
        let newly = self.reg.revoke(&r.0, &mut out);
        if newly {
            if let Some(store) = &self.store {
                store
                    .save(self.reg.owners(), self.reg.revoked())
                    .map_err(|e| format!("revoked in memory, but not stored: {e}"))?;
            }
            tracing::warn!(key = %short_key(&r.0), "node key revoked");
            // Close the hub's own session with it; members drop theirs when
            // the removal reaches them.
            self.plane.do_send(Cmd::RemovePeer(r.0));
        }
        self.flush(out);
        self.schedule_push(ctx);
        Ok(newly)
    }
}

impl Handler<SetAllowed> for RegistryActor {
    type Result = ();
    fn handle(&mut self, m: SetAllowed, ctx: &mut Context<Self>) {
        if self.cluster.is_some() {
            // Every hub's list: through the log, applied when it commits;
            // only when this hub's own list changed (a reload for anything
            // else must not overwrite what another hub's operator set).
            if m.0 == self.own_allow {
                return;
            }
            self.own_allow = m.0.clone();
            let keys = m.0.map(|k| k.into_iter().collect());
            self.propose_allow(Change::Allow { keys }, ctx);
            return;
        }
        let mut out = Vec::new();
        let before = self.reg.members().count();
        self.reg.set_allowed(m.0, &mut out);
        let gone = before - self.reg.members().count();
        tracing::info!(members_removed = gone, "allow-list replaced");
        self.flush(out);
        self.schedule_push(ctx);
    }
}

impl Handler<SetTiming> for RegistryActor {
    type Result = ();
    fn handle(&mut self, m: SetTiming, _ctx: &mut Context<Self>) {
        tracing::info!(heartbeat = ?m.heartbeat, expire_beats = m.expire_beats, "heartbeat timing changed");
        self.reg.set_timing(m.heartbeat, m.expire_beats);
        self.plane
            .do_send(Cmd::SetHeartbeat(self.reg.heartbeat_interval()));
    }
}

impl Handler<GetHubStatus> for RegistryActor {
    type Result = ResponseActFuture<Self, HubStatus>;
    fn handle(&mut self, _: GetHubStatus, _ctx: &mut Context<Self>) -> Self::Result {
        let now = self.now();
        let (registrations, refused) = self.reg.registration_counts();
        let status = HubStatus {
            registrations,
            refusals: refused.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            heartbeat_s: self.reg.heartbeat_interval().as_secs_f64(),
            expire_beats: self.reg.config().expire_beats,
            map_version: self.reg.version(),
            members: self
                .reg
                .members()
                .map(|(k, m)| MemberStatus {
                    name: m.info.name.clone(),
                    key: short_key(k),
                    overlay: m.info.overlay.iter().map(|n| n.addr.to_string()).collect(),
                    endpoints: m.info.endpoints.iter().map(|e| e.to_string()).collect(),
                    last_seen_s: now.saturating_sub(m.last_seen).as_secs_f64(),
                })
                .collect(),
            owned_addresses: self.reg.owners().len(),
            revoked: self.reg.revoked().len(),
            relayed: 0,
            relayed_bytes: 0,
            relay_dropped: 0,
            counters: Default::default(),
            cluster: self.cluster.as_ref().map(|c| {
                let m = c.raft.metrics().borrow().clone();
                ClusterStatus {
                    id: m.id,
                    state: format!("{:?}", m.state),
                    leader: m.current_leader,
                    term: m.current_term,
                    applied: m.last_applied.map(|l| l.index),
                    waiting: self.waiting.len() + usize::from(self.proposing),
                }
            }),
        };
        let snap = self.snap.clone();
        Box::pin(
            async move {
                let mut status = status;
                if let Some(s) = snap {
                    if let Ok(s) = s.send(GetSnapshot).await {
                        status.relayed = s.node.relayed;
                        status.relayed_bytes = s.node.relayed_bytes;
                        status.relay_dropped = s.node.relay_dropped;
                        status.counters = crate::supervisor::counters(&s);
                    }
                }
                status
            }
            .into_actor(self),
        )
    }
}
