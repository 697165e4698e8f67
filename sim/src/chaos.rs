//! Chaos: a fault schedule drawn from one seed, played against a whole
//! simulated mesh (the real actors and data path in turmoil), with
//! invariants checked all along. A failure is a seed, and a schedule that
//! still fails after shrinking, which anyone can replay.
//!
//! Faults: crash and restart of hubs and peers (the hubs' owner tables on
//! disk survive, nothing else does), cuts between two hosts, a host isolated,
//! the peers split in two groups, and, laid over what one host receives,
//! Gilbert-Elliott loss bursts, latency spikes with jitter, reordering,
//! duplication and bandwidth drops; socket rebinding (a NAT's new port);
//! a revocation (at every hub, as docs/deploy.md says to); a peer leaving
//! as on shutdown and joining again. Each lasts a drawn
//! time and all have ended when the quiet period begins.
//!
//! Invariants, on every packet a peer writes to its TUN and on the hosts'
//! status every 500 ms of simulated time:
//!
//! * a packet reaches only its destination, intact, from the peer that owns
//!   its source address; a packet with a forged source never arrives;
//! * no datagram arrives twice; the packets of a reliable (TCP-kind) flow
//!   arrive in order and never twice (a restarted session may lose what was
//!   in flight: gaps are counted, not violations);
//! * an overlay address has one owner across the hubs; a revoked key is
//!   gone from every hub and every peer three heartbeats after the last hub
//!   learned of it, and nothing it sends arrives from then on;
//! * sessions and conversations stay within their budgets, and no node holds
//!   more than its memory budget for others;
//! * every inner TCP connection (real TCP endpoints on the peers' TUNs, see
//!   [`crate::streams`]) delivers every byte once and in order both ways, or
//!   is reported broken (reset, refused, the application's keep-alive
//!   giving up) to both ends; a peer that left is off every live hub's
//!   list within the grace;
//! * within [`ChaosConfig::recover`] of the quiet period's start, every pair
//!   of peers not revoked exchanges traffic again, every connection begun
//!   before it has ended one way or the other, and a new connection around
//!   the ring completes.

use crate::fabric::{Fabric, Quick};
use crate::impair::{GilbertElliott, LinkSpec};
use crate::streams::{self, Streams};
use crate::traffic::{self, Kind};
use crate::world::{hub_host, World, WorldConfig, PROBE_EVERY};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use transport::ip;

/// A host of the world.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Host {
    /// Peer `i`.
    Peer(usize),
    /// Hub `h`.
    Hub(usize),
}

impl Host {
    fn name(self) -> String {
        match self {
            Host::Peer(i) => format!("peer{i}"),
            Host::Hub(h) => hub_host(h),
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// What a fault does to what one host receives while it lasts.
#[derive(Debug, Clone, PartialEq)]
pub enum Impairment {
    /// Gilbert-Elliott loss bursts.
    Burst(GilbertElliott),
    /// Extra one-way delay and jitter.
    Latency {
        /// Added delay.
        extra: Duration,
        /// Up to this much more, drawn per packet.
        jitter: Duration,
    },
    /// A share of packets held back 30 ms.
    Reorder(f64),
    /// A share of packets delivered twice.
    Duplicate(f64),
    /// A bottleneck of this many bit/s with a 50-ms queue.
    Bandwidth(u64),
}

impl Impairment {
    fn spec(&self) -> LinkSpec {
        match self {
            Impairment::Burst(ge) => LinkSpec {
                burst: Some(*ge),
                ..LinkSpec::default()
            },
            Impairment::Latency { extra, jitter } => LinkSpec::latency(*extra).with_jitter(*jitter),
            Impairment::Reorder(p) => LinkSpec {
                reorder: *p,
                reorder_by: Duration::from_millis(30),
                ..LinkSpec::default()
            },
            Impairment::Duplicate(p) => LinkSpec {
                duplicate: *p,
                ..LinkSpec::default()
            },
            Impairment::Bandwidth(bps) => {
                LinkSpec::default().with_rate(*bps, (*bps / 8 / 20) as usize)
            }
        }
    }
}

/// One fault.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// The host crashes and restarts when the fault ends.
    Crash(Host),
    /// The peer leaves the network as on shutdown (tells the hubs, then its
    /// process stops 300 ms later) and joins again when the fault ends.
    Leave(usize),
    /// Nothing passes between two hosts.
    Cut(Host, Host),
    /// Nothing passes between the host and any other.
    Isolate(Host),
    /// These peers cannot reach the other peers (hubs reach both sides).
    Split(Vec<usize>),
    /// Impair what the host receives.
    Impair(Host, Impairment),
    /// The peer's socket moves to this port (instantaneous).
    Rebind(usize, u16),
    /// The peer's key is revoked at every hub (permanent).
    Revoke(usize),
    /// The NAT in front of the peer forgets every mapping (instantaneous):
    /// its next datagram out leaves from a new public port.
    NatFlush(usize),
}

/// A fault, when it begins (after the mesh formed) and how long it lasts.
#[derive(Debug, Clone, PartialEq)]
pub struct Scheduled {
    /// Start, from the moment the mesh formed.
    pub at: Duration,
    /// Length (zero for instantaneous and permanent faults).
    pub dur: Duration,
    /// What happens.
    pub fault: Fault,
}

impl fmt::Display for Scheduled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at {:>6.2}s ", self.at.as_secs_f64())?;
        if !self.dur.is_zero() {
            write!(f, "for {:>5.2}s: ", self.dur.as_secs_f64())?;
        } else {
            write!(f, "         : ")?;
        }
        match &self.fault {
            Fault::Crash(h) => write!(f, "crash {h}"),
            Fault::Leave(i) => write!(f, "peer{i} leaves, joins again at the end"),
            Fault::Cut(a, b) => write!(f, "cut {a} <-> {b}"),
            Fault::Isolate(h) => write!(f, "isolate {h}"),
            Fault::Split(g) => write!(f, "split peers {g:?} from the others"),
            Fault::Impair(h, i) => write!(f, "impair {h}: {i:?}"),
            Fault::Rebind(i, p) => write!(f, "peer{i} rebinds to port {p}"),
            Fault::NatFlush(i) => write!(f, "peer{i}'s NAT forgets its mappings"),
            Fault::Revoke(i) => write!(f, "revoke peer{i} at every hub"),
        }
    }
}

/// The world and the schedule's shape.
#[derive(Debug, Clone)]
pub struct ChaosConfig {
    /// Peers.
    pub peers: usize,
    /// Hubs.
    pub hubs: usize,
    /// At most this many faults per schedule.
    pub faults: usize,
    /// Faults begin and end within this much time after the mesh formed.
    pub window: Duration,
    /// Bound on recovery: every pair exchanges traffic again within this
    /// much of the quiet period's start.
    pub recover: Duration,
    /// Heartbeat of hubs and peers.
    pub heartbeat: Duration,
    /// Whether schedules may revoke a peer.
    pub revoke: bool,
    /// Run on [`Quick`] instead of turmoil (for big worlds).
    pub quick: bool,
    /// Each peer sends to this many others (the next ones in order); `None`:
    /// to all (n² flows, too many for big worlds).
    pub flows_per_peer: Option<usize>,
    /// Peers 0..`nat_peers` sit behind a NAT with one public port for all
    /// destinations (their paths are punched through it); schedules may
    /// flush those NATs. The others may rebind their sockets.
    pub nat_peers: usize,
    /// Every node's memory budget: small, so that the faults can push a
    /// node to it, and the checker can see it hold.
    pub memory_budget: usize,
    /// The hubs share one registry through Raft (turmoil only; with
    /// [`ChaosConfig::quick`] each hub keeps its own owner table).
    pub raft: bool,
    /// Schedules may have peers leave (as on shutdown) and join again.
    pub leave: bool,
}

impl Default for ChaosConfig {
    fn default() -> Self {
        ChaosConfig {
            peers: 5,
            hubs: 2,
            faults: 8,
            window: Duration::from_secs(40),
            recover: Duration::from_secs(30),
            heartbeat: Duration::from_secs(1),
            revoke: true,
            quick: false,
            flows_per_peer: None,
            nat_peers: 0,
            memory_budget: 1 << 20,
            raft: false,
            leave: false,
        }
    }
}

fn secs(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> Duration {
    Duration::from_secs_f64(rng.random_range(lo..hi))
}

/// The fault schedule of `seed`: 1 to `cfg.faults` faults, each within the
/// window. A host has at most one crash and one impairment at a time.
pub fn schedule(cfg: &ChaosConfig, seed: u64) -> Vec<Scheduled> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x0063_6861_6f73);
    let n = rng.random_range(1..=cfg.faults.max(1));
    let window = cfg.window.as_secs_f64();
    let mut out: Vec<Scheduled> = Vec::new();
    // Per host: (crash, impairment) intervals taken.
    let mut busy: BTreeMap<(Host, bool), Vec<(Duration, Duration)>> = BTreeMap::new();
    let mut revoked = false;
    let mut tries = 0;
    while out.len() < n && tries < 100 {
        tries += 1;
        let at = secs(&mut rng, 0.0, window - 1.0);
        let left = window - at.as_secs_f64();
        let dur = secs(&mut rng, 0.5, left.clamp(0.6, 15.0));
        let host = |rng: &mut ChaCha8Rng| {
            if rng.random_bool(0.25) {
                Host::Hub(rng.random_range(0..cfg.hubs.max(1)))
            } else {
                Host::Peer(rng.random_range(0..cfg.peers))
            }
        };
        let fault = match rng.random_range(0..100) {
            0..=17 => match host(&mut rng) {
                // (No extra draw without `leave`: older seeds stay as they were.)
                Host::Peer(i) if cfg.leave && rng.random_bool(0.5) => Fault::Leave(i),
                h => Fault::Crash(h),
            },
            18..=29 => {
                let a = host(&mut rng);
                let b = host(&mut rng);
                if a == b {
                    continue;
                }
                Fault::Cut(a, b)
            }
            30..=37 => Fault::Isolate(host(&mut rng)),
            38..=45 => {
                let g: Vec<usize> = (0..cfg.peers).filter(|_| rng.random_bool(0.5)).collect();
                if g.is_empty() || g.len() == cfg.peers {
                    continue;
                }
                Fault::Split(g)
            }
            46..=57 => Fault::Impair(
                host(&mut rng),
                Impairment::Burst(GilbertElliott {
                    p_good_to_bad: rng.random_range(0.01..0.1),
                    p_bad_to_good: rng.random_range(0.1..0.5),
                    loss_good: rng.random_range(0.0..0.05),
                    loss_bad: rng.random_range(0.5..1.0),
                }),
            ),
            58..=67 => Fault::Impair(
                host(&mut rng),
                Impairment::Latency {
                    extra: secs(&mut rng, 0.02, 0.4),
                    jitter: secs(&mut rng, 0.0, 0.05),
                },
            ),
            68..=73 => Fault::Impair(
                host(&mut rng),
                Impairment::Reorder(rng.random_range(0.05..0.3)),
            ),
            74..=79 => Fault::Impair(
                host(&mut rng),
                Impairment::Duplicate(rng.random_range(0.05..0.5)),
            ),
            80..=87 => Fault::Impair(
                host(&mut rng),
                Impairment::Bandwidth(rng.random_range(200_000..5_000_000)),
            ),
            // (No extra draw without NATs: the schedules of older seeds stay as they were.)
            88..=95 if cfg.nat_peers > 0 && rng.random_bool(0.5) => {
                Fault::NatFlush(rng.random_range(0..cfg.nat_peers.min(cfg.peers)))
            }
            88..=95 => {
                if cfg.nat_peers >= cfg.peers {
                    continue;
                }
                Fault::Rebind(
                    rng.random_range(cfg.nat_peers..cfg.peers),
                    rng.random_range(4001..4999),
                )
            }
            _ => {
                if !cfg.revoke || revoked {
                    continue;
                }
                revoked = true;
                Fault::Revoke(rng.random_range(0..cfg.peers))
            }
        };
        let dur = match fault {
            Fault::Rebind(..) | Fault::Revoke(_) | Fault::NatFlush(_) => Duration::ZERO,
            _ => dur,
        };
        let slot = match &fault {
            Fault::Crash(h) => Some((*h, false)),
            Fault::Leave(i) => Some((Host::Peer(*i), false)),
            Fault::Impair(h, _) => Some((*h, true)),
            _ => None,
        };
        if let Some(slot) = slot {
            let taken = busy.entry(slot).or_default();
            if taken.iter().any(|&(a, b)| at < b && a < at + dur) {
                continue;
            }
            taken.push((at, at + dur));
        }
        out.push(Scheduled { at, dur, fault });
    }
    out.sort_by_key(|s| s.at);
    out
}

/// What a run found.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Invariant violations, first first (at most 20 kept).
    pub violations: Vec<String>,
    /// Faults injected.
    pub faults: usize,
    /// Simulated time the run covered.
    pub simulated: Duration,
    /// Packets delivered and checked.
    pub delivered: u64,
    /// Packets of reliable flows that never arrived (gaps): what a session
    /// restart or a full queue dropped, which an inner TCP would resend.
    pub gaps: u64,
    /// Time from the quiet period's start until every pair exchanged
    /// traffic again and every inner TCP connection had ended (None if
    /// some never did).
    pub recovered_after: Option<Duration>,
    /// Inner TCP connections that completed (every byte, both ways).
    pub tcp_completed: u64,
    /// Inner TCP connections that broke, reported to both ends.
    pub tcp_broken: u64,
    /// Bytes the inner TCP receivers read and checked.
    pub tcp_bytes: u64,
    /// The most bytes any node held for others (against
    /// [`ChaosConfig::memory_budget`]) in the statuses sampled.
    pub max_held: u64,
    /// With [`ChaosConfig::raft`]: the highest Raft log index any hub had
    /// applied (the registry went through the log).
    pub raft_applied: u64,
}

/// Flow ids: one datagram flow and one reliable flow per ordered pair, and
/// a forged one.
const FORGED: u16 = 9_999;
/// Between a peer's goodbye and its process stopping.
const LEAVE_GRACE: Duration = Duration::from_millis(300);
const EVERY: Duration = Duration::from_millis(250);

struct Flow {
    from: usize,
    to: usize,
    kind: Kind,
    next: Duration,
    sent: Vec<Duration>,
}

struct Checker {
    n: usize,
    /// Each peer's overlay addresses.
    addrs: Vec<(Ipv4Addr, Ipv6Addr)>,
    flows: BTreeMap<u16, Flow>,
    udp_seen: BTreeSet<(u16, u32)>,
    tcp_next: BTreeMap<u16, u32>,
    violations: Vec<String>,
    delivered: u64,
    gaps: u64,
    /// Per ordered pair, when a packet sent after the quiet period began
    /// first arrived.
    recovered: BTreeMap<(usize, usize), Duration>,
    quiet_from: Option<Duration>,
    /// Revoked peer -> from when nothing of it may arrive.
    revoked_after: BTreeMap<usize, Option<Duration>>,
    /// Peer -> since when it can reach a live hub (absent: it cannot, so
    /// it cannot hear of revocations either).
    hub_reach_since: BTreeMap<usize, Duration>,
    /// Heartbeats (and a second) for a revocation to reach everyone.
    grace: Duration,
    /// Peers that left (and have not joined again) -> when their process
    /// stopped.
    left: BTreeMap<usize, Duration>,
}

impl Checker {
    fn violation(&mut self, now: Duration, what: String) {
        if self.violations.len() < 20 {
            self.violations
                .push(format!("at {:.2}s: {what}", now.as_secs_f64()));
        }
    }

    fn new(addrs: Vec<(Ipv4Addr, Ipv6Addr)>) -> Checker {
        Checker {
            n: addrs.len(),
            addrs,
            flows: BTreeMap::new(),
            udp_seen: BTreeSet::new(),
            tcp_next: BTreeMap::new(),
            violations: Vec::new(),
            delivered: 0,
            gaps: 0,
            recovered: BTreeMap::new(),
            quiet_from: None,
            revoked_after: BTreeMap::new(),
            hub_reach_since: BTreeMap::new(),
            grace: Duration::ZERO,
            left: BTreeMap::new(),
        }
    }

    fn delivered(&mut self, now: Duration, at: usize, pkt: &[u8]) {
        let Some(info) = ip::parse(pkt) else {
            self.violation(
                now,
                format!("peer{at} got a packet that is not IP ({} bytes)", pkt.len()),
            );
            return;
        };
        let me = self.addrs[at];
        if info.dst != IpAddr::V4(me.0) && info.dst != IpAddr::V6(me.1) {
            self.violation(now, format!("peer{at} got a packet for {}", info.dst));
            return;
        }
        let Some(tag) = traffic::read(pkt) else {
            if matches!(info.proto, ip::PROTO_TCP | ip::PROTO_UDP) && pkt.len() >= traffic::MIN_LEN
            {
                self.violation(
                    now,
                    format!("peer{at} got a corrupt packet from {}", info.src),
                );
            }
            return;
        };
        if tag.flow == FORGED {
            self.violation(
                now,
                format!("peer{at} accepted a packet with forged source {}", info.src),
            );
            return;
        }
        let Some(f) = self.flows.get(&tag.flow) else {
            self.violation(now, format!("peer{at} got flow {} nobody sends", tag.flow));
            return;
        };
        let (from, to, kind) = (f.from, f.to, f.kind);
        let sent_at = f.sent.get(tag.seq as usize).copied();
        if to != at || info.src != IpAddr::V4(self.addrs[from].0) || kind != tag.kind {
            self.violation(
                now,
                format!(
                    "peer{at} got flow {} (peer{from} -> peer{to}) from {}",
                    tag.flow, info.src
                ),
            );
            return;
        }
        if let Some(Some(r)) = self.revoked_after.get(&from) {
            // The receiver must have been able to hear of it, too: from a
            // grace after it last reached a hub (absent: it cannot).
            let deadline = self
                .hub_reach_since
                .get(&at)
                .map(|&reach| (*r).max(reach + self.grace));
            if deadline.is_some_and(|d| sent_at.is_some_and(|s| s >= d)) {
                self.violation(
                    now,
                    format!("peer{at} accepted a packet from revoked peer{from}"),
                );
            }
        }
        self.delivered += 1;
        match kind {
            Kind::Udp => {
                if !self.udp_seen.insert((tag.flow, tag.seq)) {
                    self.violation(
                        now,
                        format!(
                            "datagram {} of peer{from} -> peer{to} arrived twice",
                            tag.seq
                        ),
                    );
                }
            }
            Kind::Tcp => {
                let next = self.tcp_next.entry(tag.flow).or_insert(0);
                if tag.seq < *next {
                    let want = *next;
                    self.violation(
                        now,
                        format!(
                            "reliable flow peer{from} -> peer{to}: packet {} after {} (repeated or out of order)",
                            tag.seq,
                            want - 1
                        ),
                    );
                } else {
                    self.gaps += (tag.seq - *next) as u64;
                    *next = tag.seq + 1;
                }
            }
        }
        if let (Some(q), Some(s)) = (self.quiet_from, sent_at) {
            if s >= q {
                self.recovered.entry((from, to)).or_insert(now);
            }
        }
    }

    /// A packet of the inner TCP hosts arrived at peer `at`: it must be for
    /// `at`, from one of its neighbours on the ring (the only peers its
    /// host talks to).
    fn stream_packet(&mut self, now: Duration, at: usize, pkt: &[u8]) {
        let Some(info) = ip::parse(pkt) else { return };
        let me = self.addrs[at];
        let n = self.n;
        let neighbours = [(at + 1) % n, (at + n - 1) % n];
        if info.dst != IpAddr::V4(me.0) {
            self.violation(now, format!("peer{at} got a TCP segment for {}", info.dst));
        } else if !neighbours
            .iter()
            .any(|&j| info.src == IpAddr::V4(self.addrs[j].0))
        {
            self.violation(now, format!("peer{at} got a TCP segment from {}", info.src));
        }
    }

    fn pairs_left(&self) -> Vec<(usize, usize)> {
        let mut v = Vec::new();
        let pairs: BTreeSet<(usize, usize)> = self.flows.values().map(|f| (f.from, f.to)).collect();
        for i in 0..self.n {
            for j in 0..self.n {
                if pairs.contains(&(i, j))
                    && !self.revoked_after.contains_key(&i)
                    && !self.revoked_after.contains_key(&j)
                    && !self.recovered.contains_key(&(i, j))
                {
                    v.push((i, j));
                }
            }
        }
        v
    }
}

/// Everything the runner changes in the world, counted so overlapping
/// faults undo correctly.
#[derive(Default)]
struct Applied {
    crashed: BTreeMap<Host, u32>,
    cuts: BTreeMap<(Host, Host), u32>,
}

impl Applied {
    fn cut(&mut self, sim: &mut impl Fabric, a: Host, b: Host, on: bool) {
        let k = if a < b { (a, b) } else { (b, a) };
        let c = self.cuts.entry(k).or_insert(0);
        if on {
            *c += 1;
            if *c == 1 {
                sim.partition(&a.name(), &b.name());
            }
        } else {
            *c = c.saturating_sub(1);
            if *c == 0 {
                sim.repair(&a.name(), &b.name());
            }
        }
    }

    fn crash(&mut self, sim: &mut impl Fabric, w: &World, h: Host, on: bool) {
        let c = self.crashed.entry(h).or_insert(0);
        if on {
            *c += 1;
            if *c == 1 {
                sim.crash(&h.name());
                // What the host last reported is gone with it.
                match h {
                    Host::Peer(i) => *w.peers[i].status.lock().unwrap() = None,
                    Host::Hub(k) => *w.hub_statuses[k].lock().unwrap() = None,
                }
            }
        } else {
            *c = c.saturating_sub(1);
            if *c == 0 {
                sim.bounce(&h.name());
            }
        }
    }

    fn down(&self, h: Host) -> bool {
        self.crashed.get(&h).is_some_and(|c| *c > 0)
    }

    fn is_cut(&self, a: Host, b: Host) -> bool {
        let k = if a < b { (a, b) } else { (b, a) };
        self.cuts.get(&k).is_some_and(|c| *c > 0)
    }

    /// Peer `j` is up and some hub is up and not cut off from it.
    fn reaches_a_hub(&self, j: usize, hubs: usize) -> bool {
        !self.down(Host::Peer(j))
            && (0..hubs)
                .any(|h| !self.down(Host::Hub(h)) && !self.is_cut(Host::Peer(j), Host::Hub(h)))
    }
}

fn hosts(cfg: &ChaosConfig) -> Vec<Host> {
    (0..cfg.hubs.max(1))
        .map(Host::Hub)
        .chain((0..cfg.peers).map(Host::Peer))
        .collect()
}

fn apply(
    cfg: &ChaosConfig,
    sim: &mut impl Fabric,
    w: &mut World,
    st: &mut Applied,
    fault: &Fault,
    on: bool,
) {
    match fault {
        Fault::Crash(h) => st.crash(sim, w, *h, on),
        Fault::Leave(i) => {
            if on {
                // The process stops once its goodbye is out (the runner
                // crashes it after LEAVE_GRACE).
                w.peers[*i]
                    .leave
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            } else {
                st.crash(sim, w, Host::Peer(*i), false);
            }
        }
        Fault::Cut(a, b) => st.cut(sim, *a, *b, on),
        Fault::Isolate(h) => {
            for o in hosts(cfg) {
                if o != *h {
                    st.cut(sim, *h, o, on);
                }
            }
        }
        Fault::Split(g) => {
            for &a in g {
                for b in (0..cfg.peers).filter(|b| !g.contains(b)) {
                    st.cut(sim, Host::Peer(a), Host::Peer(b), on);
                }
            }
        }
        Fault::Impair(h, i) => {
            let knob = match h {
                Host::Peer(p) => &w.peers[*p].knob,
                Host::Hub(k) => &w.hub_knobs[*k],
            };
            knob.set(on.then(|| i.spec()));
        }
        Fault::Rebind(i, port) => {
            if on {
                w.peers[*i]
                    .rebind_to
                    .store(*port, std::sync::atomic::Ordering::SeqCst);
            }
        }
        Fault::NatFlush(i) => {
            if on {
                w.peers[*i]
                    .nat_flush
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        Fault::Revoke(i) => {
            if on {
                let k = w.peers[*i].key;
                for q in &w.hub_revoke {
                    q.lock().unwrap().push(k);
                }
            }
        }
    }
}

static RUNS: AtomicU64 = AtomicU64::new(0);

/// Play `sched` (from [`schedule`], or a part of it) against a fresh world
/// seeded with `seed`, and check the invariants all along.
pub fn run(cfg: &ChaosConfig, seed: u64, sched: &[Scheduled]) -> Outcome {
    let dir = std::env::temp_dir().join(format!(
        "fastmesh-chaos-{}-{seed}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("chaos store dir");
    // The world removes its directory when it is dropped.
    run_in(cfg, seed, sched, &dir)
}

fn run_in(cfg: &ChaosConfig, seed: u64, sched: &[Scheduled], dir: &std::path::Path) -> Outcome {
    let form_limit = Duration::from_secs(60);
    let limit = form_limit + cfg.window + cfg.recover + Duration::from_secs(60);
    if cfg.quick {
        let mut sim = Quick::new(Duration::from_millis(1), limit);
        run_on(&mut sim, cfg, seed, sched, dir, form_limit)
    } else {
        let mut sim = turmoil::Builder::new()
            .simulation_duration(limit)
            .rng_seed(seed)
            .build();
        run_on(&mut sim, cfg, seed, sched, dir, form_limit)
    }
}

fn run_on(
    sim: &mut impl Fabric,
    cfg: &ChaosConfig,
    seed: u64,
    sched: &[Scheduled],
    dir: &std::path::Path,
    form_limit: Duration,
) -> Outcome {
    let mut w = World::build(
        sim,
        WorldConfig {
            probe_every: PROBE_EVERY,
            memory_budget: cfg.memory_budget,
            raft: cfg.raft && !cfg.quick,
            on_demand: false,
            peers: cfg.peers,
            heartbeat: cfg.heartbeat,
            spec: LinkSpec::latency(Duration::from_millis(5)),
            seed,
            store_dir: dir.to_path_buf(),
            hubs: cfg.hubs.max(1),
            nat: (0..cfg.nat_peers)
                .map(|_| Some(crate::nat::NatKind::Cone))
                .collect(),
        },
    );
    let mut out = Outcome {
        faults: sched.len(),
        ..Outcome::default()
    };
    if w.run_until(sim, form_limit, |w| w.all_connected())
        .is_none()
    {
        out.violations
            .push(format!("the mesh did not form within {form_limit:?}"));
        out.simulated = sim.elapsed();
        return out;
    }
    let t0 = sim.elapsed();
    let n = cfg.peers;
    let mut ck = Checker::new(w.peers.iter().map(|p| (p.overlay, p.overlay6)).collect());
    let mut tcp = Streams::new(
        &w.peers.iter().map(|p| p.overlay).collect::<Vec<_>>(),
        transport::SessionConfig::default().tun_mtu(),
    );
    let fan = cfg.flows_per_peer.unwrap_or(n - 1).min(n - 1);
    for i in 0..n {
        for j in (1..=fan).map(|d| (i + d) % n) {
            for (k, kind) in [Kind::Udp, Kind::Tcp].into_iter().enumerate() {
                let id = 100 + (2 * (i * n + j) + k) as u16;
                // Spread the pumps over the interval.
                let next = EVERY * (id as u32 % 64) / 64;
                ck.flows.insert(
                    id,
                    Flow {
                        from: i,
                        to: j,
                        kind,
                        next,
                        sent: Vec::new(),
                    },
                );
            }
        }
    }
    // Events: (time, order, index, begins).
    let mut events: Vec<(Duration, usize, bool)> = Vec::new();
    for (k, s) in sched.iter().enumerate() {
        events.push((s.at, k, true));
        if !s.dur.is_zero() {
            events.push((s.at + s.dur, k, false));
        }
    }
    events.sort_by_key(|e| (e.0, !e.2, e.1));
    let mut next_event = 0;
    let mut st = Applied::default();
    // Peers that said goodbye, and when their process stops.
    let mut leaving: Vec<(Duration, usize)> = Vec::new();
    let quiet_from = sched
        .iter()
        .map(|s| s.at + s.dur)
        .max()
        .unwrap_or_default()
        .max(cfg.window);
    let end = quiet_from + cfg.recover;
    let grace = cfg.heartbeat * 3 + Duration::from_secs(1);
    ck.grace = grace;
    let mut revoke_seen: BTreeMap<usize, (Duration, BTreeSet<usize>)> = BTreeMap::new();
    let mut next_check = Duration::ZERO;
    let mut next_forged = Duration::ZERO;
    let max_convs = transport::SessionConfig::default().max_convs;
    loop {
        let now = sim.elapsed() - t0;
        while next_event < events.len() && events[next_event].0 <= now {
            let (_, k, on) = events[next_event];
            apply(cfg, sim, &mut w, &mut st, &sched[k].fault, on);
            match (&sched[k].fault, on) {
                (Fault::Leave(i), true) => leaving.push((now + LEAVE_GRACE, *i)),
                (Fault::Leave(i), false) => {
                    ck.left.remove(i);
                }
                _ => {}
            }
            if let (Fault::Revoke(i), true) = (&sched[k].fault, on) {
                revoke_seen.insert(*i, (now, BTreeSet::new()));
                ck.revoked_after.insert(*i, None);
                tcp.stop(*i);
            }
            next_event += 1;
        }
        for (at, i) in std::mem::take(&mut leaving) {
            if at <= now {
                st.crash(sim, &w, Host::Peer(i), true);
                ck.left.insert(i, now);
            } else {
                leaving.push((at, i));
            }
        }
        if ck.quiet_from.is_none() && now >= quiet_from {
            ck.quiet_from = Some(now);
        }
        if ck.quiet_from.is_some() && ck.pairs_left().is_empty() && tcp.settled(quiet_from) {
            out.recovered_after = Some(now - quiet_from);
            break;
        }
        if now >= end {
            break;
        }
        for (&id, f) in ck.flows.iter_mut() {
            while f.next <= now {
                let seq = f.sent.len() as u32;
                let (src, dst) = (w.peers[f.from].overlay, w.peers[f.to].overlay);
                if w.peers[f.from]
                    .apps
                    .send(traffic::packet(src, dst, f.kind, id, seq, 200))
                {
                    f.sent.push(now);
                }
                f.next += EVERY;
            }
        }
        if n >= 3 && now >= next_forged {
            // Peer 0 claims peer 1's address toward peer 2.
            let (src, dst) = (w.peers[1].overlay, w.peers[2].overlay);
            w.peers[0]
                .apps
                .send(traffic::packet(src, dst, Kind::Udp, FORGED, 0, 200));
            next_forged = now + Duration::from_millis(500);
        }
        if now >= next_check {
            next_check = now + Duration::from_millis(500);
            check_state(&w, &st, &mut ck, &mut revoke_seen, now, grace, max_convs);
            check_held(&w, &st, &mut ck, &mut out, now, cfg.memory_budget);
        }
        sim.step().expect("simulation step");
        let now = sim.elapsed() - t0;
        for at in 0..n {
            let pkts = w.peers[at].take_delivered();
            for p in pkts {
                if streams::is_stream_packet(&p) {
                    ck.stream_packet(now, at, &p);
                    tcp.input(at, p);
                } else {
                    ck.delivered(now, at, &p);
                }
            }
        }
        for (at, p) in tcp.poll(now) {
            // A full TUN queue drops it; the TCP sends it again.
            let _ = w.peers[at].apps.send(p);
        }
        tcp.check(now, |v| ck.violation(now, v));
    }
    for v in tcp.unsettled(quiet_from) {
        ck.violation(sim.elapsed() - t0, v);
    }
    out.tcp_completed = tcp.completed;
    out.tcp_broken = tcp.broken;
    out.tcp_bytes = tcp.bytes;
    for (i, j) in ck.pairs_left() {
        ck.violation(
            sim.elapsed() - t0,
            format!(
                "peer{i} and peer{j} did not exchange traffic within {:?} of the quiet period",
                cfg.recover
            ),
        );
    }
    out.violations = ck.violations;
    out.delivered = ck.delivered;
    out.gaps = ck.gaps;
    out.simulated = sim.elapsed();
    out
}

/// Every node holds at most its memory budget for others.
fn check_held(
    w: &World,
    st: &Applied,
    ck: &mut Checker,
    out: &mut Outcome,
    now: Duration,
    budget: usize,
) {
    let held = |c: &BTreeMap<String, u64>| c.get("held_bytes").copied();
    let mut seen: Vec<(String, u64)> = Vec::new();
    for (j, p) in w.peers.iter().enumerate() {
        if st.down(Host::Peer(j)) {
            continue;
        }
        if let Some(h) = p.status().and_then(|s| held(&s.counters)) {
            seen.push((format!("peer{j}"), h));
        }
    }
    for (h, s) in w.hub_statuses.iter().enumerate() {
        if st.down(Host::Hub(h)) {
            continue;
        }
        let Ok(s) = s.lock() else { continue };
        let Some(s) = s.as_ref() else { continue };
        if let Some(b) = held(&s.counters) {
            seen.push((hub_host(h), b));
        }
        if let Some(c) = &s.cluster {
            out.raft_applied = out.raft_applied.max(c.applied.unwrap_or(0));
        }
    }
    for (who, h) in seen {
        out.max_held = out.max_held.max(h);
        if h > budget as u64 {
            ck.violation(
                now,
                format!("{who} holds {h} bytes for others, over its budget of {budget}"),
            );
        }
    }
}

/// The hosts' status against the invariants on ownership, revocation and
/// budgets.
fn check_state(
    w: &World,
    st: &Applied,
    ck: &mut Checker,
    revoke_seen: &mut BTreeMap<usize, (Duration, BTreeSet<usize>)>,
    now: Duration,
    grace: Duration,
    max_convs: usize,
) {
    let n = w.peers.len();
    let hubs: Vec<(usize, fastmesh_actors::hub::HubStatus)> = w
        .hub_statuses
        .iter()
        .enumerate()
        .filter(|(h, _)| !st.down(Host::Hub(*h)))
        .filter_map(|(h, s)| s.lock().ok().and_then(|s| s.clone()).map(|s| (h, s)))
        .collect();
    // One owner per address, across the hubs.
    let mut owners: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (_, hs) in &hubs {
        for m in &hs.members {
            for a in &m.overlay {
                owners.entry(a.clone()).or_default().insert(m.key.clone());
            }
        }
        if hs.members.len() > n {
            ck.violation(
                now,
                format!("a hub lists {} members of {n}", hs.members.len()),
            );
        }
    }
    for (a, keys) in owners {
        if keys.len() > 1 {
            ck.violation(now, format!("address {a} owned by {keys:?}"));
        }
    }
    // A peer that left is off every live hub's list within the grace (its
    // goodbye, or else its silence, removes it).
    let gone: Vec<(usize, Duration)> = ck.left.iter().map(|(&i, &t)| (i, t)).collect();
    for (i, t) in gone {
        if now < t + grace {
            continue;
        }
        let short = fastmesh_actors::registry::short_key(&w.peers[i].key);
        for (h, hs) in &hubs {
            if hs.members.iter().any(|m| m.key == short) {
                ck.violation(
                    now,
                    format!(
                        "{} still lists peer{i}, which left at {:.2}s",
                        hub_host(*h),
                        t.as_secs_f64()
                    ),
                );
            }
        }
    }
    for j in 0..n {
        if st.reaches_a_hub(j, w.hub_statuses.len()) {
            ck.hub_reach_since.entry(j).or_insert(now);
        } else {
            ck.hub_reach_since.remove(&j);
        }
    }
    // Revocations: from when the last hub has it, plus the grace, the key
    // is gone everywhere and nothing it sends may arrive.
    for (&i, (_, seen)) in revoke_seen.iter_mut() {
        for (h, hs) in &hubs {
            if hs.revoked > 0 {
                seen.insert(*h);
            }
        }
        let all = seen.len() == w.hub_statuses.len();
        let after = ck.revoked_after.get(&i).copied().flatten();
        match after {
            None if all => {
                ck.revoked_after.insert(i, Some(now + grace));
            }
            Some(t) if now >= t => {
                let short = fastmesh_actors::registry::short_key(&w.peers[i].key);
                for (h, hs) in &hubs {
                    if hs.members.iter().any(|m| m.key == short) {
                        ck.violation(now, format!("{} still lists revoked peer{i}", hub_host(*h)));
                    }
                }
                for (j, p) in w.peers.iter().enumerate() {
                    // A peer learns of a revocation from a hub: one cut off
                    // from every hub keeps its map until it reaches one
                    // again, and is held to the grace from then.
                    let heard = ck
                        .hub_reach_since
                        .get(&j)
                        .is_some_and(|&r| now >= r + grace);
                    if j == i || st.down(Host::Peer(j)) || !heard {
                        continue;
                    }
                    if p.status()
                        .is_some_and(|s| s.peers.iter().any(|q| q.key == short))
                    {
                        ck.violation(now, format!("peer{j} still lists revoked peer{i}"));
                    }
                }
            }
            _ => {}
        }
    }
    // Budgets.
    for (j, p) in w.peers.iter().enumerate() {
        if st.down(Host::Peer(j)) {
            continue;
        }
        if let Some(s) = p.status() {
            if s.peers.len() > n - 1 {
                ck.violation(
                    now,
                    format!("peer{j} lists {} peers of {}", s.peers.len(), n - 1),
                );
            }
            for q in &s.peers {
                if q.convs > max_convs + 1 {
                    ck.violation(
                        now,
                        format!("peer{j} holds {} conversations with {}", q.convs, q.name),
                    );
                }
            }
        }
    }
}

/// Remove faults one at a time while the run still fails; what is left is
/// a schedule every fault of which the failure needs (as far as removing
/// one at a time can tell). Returns the kept faults' indexes in `sched`.
pub fn shrink(cfg: &ChaosConfig, seed: u64, sched: &[Scheduled]) -> Vec<usize> {
    shrink_with(sched, |part| !run(cfg, seed, part).violations.is_empty())
}

/// [`shrink`] with any test of whether a part of the schedule fails.
pub fn shrink_with(sched: &[Scheduled], mut fails: impl FnMut(&[Scheduled]) -> bool) -> Vec<usize> {
    let mut keep: Vec<usize> = (0..sched.len()).collect();
    loop {
        let mut changed = false;
        let mut k = keep.len();
        while k > 0 {
            k -= 1;
            let mut cand = keep.clone();
            cand.remove(k);
            let part: Vec<Scheduled> = cand.iter().map(|&i| sched[i].clone()).collect();
            if fails(&part) {
                keep = cand;
                changed = true;
            }
        }
        if !changed {
            return keep;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_are_a_function_of_the_seed_and_stay_in_the_window() {
        let cfg = ChaosConfig::default();
        for seed in 0..200 {
            let a = schedule(&cfg, seed);
            assert_eq!(a, schedule(&cfg, seed));
            assert!(!a.is_empty() && a.len() <= cfg.faults);
            assert!(a.iter().all(|s| s.at + s.dur <= cfg.window), "{a:?}");
            assert!(
                a.iter()
                    .filter(|s| matches!(s.fault, Fault::Revoke(_)))
                    .count()
                    <= 1
            );
        }
        assert_ne!(schedule(&cfg, 1), schedule(&cfg, 2));
    }

    #[test]
    fn shrinking_keeps_what_the_failure_needs() {
        let cfg = ChaosConfig::default();
        let sched = (0..)
            .map(|seed| schedule(&cfg, seed))
            .find(|s| s.len() >= 5)
            .expect("a seed with five faults");
        // A failure that needs the first and the last fault together.
        let (first, last) = (sched[0].clone(), sched[sched.len() - 1].clone());
        let keep = shrink_with(&sched, |p| p.contains(&first) && p.contains(&last));
        assert_eq!(keep, vec![0, sched.len() - 1]);
    }

    fn checker() -> Checker {
        let addrs = (0..3)
            .map(|i| {
                (
                    Ipv4Addr::new(10, 88, 0, i + 1),
                    Ipv6Addr::new(0xfd88, 0, 0, 0, 0, 0, 0, i as u16 + 1),
                )
            })
            .collect();
        let mut c = Checker::new(addrs);
        for (id, from, to, kind) in [(100, 0, 1, Kind::Udp), (101, 0, 1, Kind::Tcp)] {
            c.flows.insert(
                id,
                Flow {
                    from,
                    to,
                    kind,
                    next: Duration::ZERO,
                    sent: vec![Duration::ZERO; 10],
                },
            );
        }
        c
    }

    fn pkt(c: &Checker, from: usize, to: usize, kind: Kind, flow: u16, seq: u32) -> Vec<u8> {
        traffic::packet(c.addrs[from].0, c.addrs[to].0, kind, flow, seq, 200)
    }

    #[test]
    fn the_checker_accepts_what_a_mesh_may_do() {
        let mut c = checker();
        let t = Duration::ZERO;
        for p in [
            pkt(&c, 0, 1, Kind::Udp, 100, 3),
            pkt(&c, 0, 1, Kind::Udp, 100, 1),
            pkt(&c, 0, 1, Kind::Tcp, 101, 0),
            pkt(&c, 0, 1, Kind::Tcp, 101, 2),
        ] {
            c.delivered(t, 1, &p);
        }
        assert!(c.violations.is_empty(), "{:?}", c.violations);
        assert_eq!((c.delivered, c.gaps), (4, 1));
    }

    #[test]
    fn the_checker_reports_each_kind_of_violation() {
        let t = Duration::ZERO;
        type Make = Box<dyn Fn(&Checker) -> Vec<(usize, Vec<u8>)>>;
        let cases: Vec<(&str, Make)> = vec![
            (
                "got a packet for",
                Box::new(|c| vec![(2, pkt(c, 0, 1, Kind::Udp, 100, 0))]),
            ),
            (
                "forged source",
                Box::new(|c| vec![(1, pkt(c, 2, 1, Kind::Udp, FORGED, 0))]),
            ),
            (
                "got flow 100 (peer0 -> peer1) from",
                Box::new(|c| vec![(1, pkt(c, 2, 1, Kind::Udp, 100, 0))]),
            ),
            (
                "arrived twice",
                Box::new(|c| {
                    vec![
                        (1, pkt(c, 0, 1, Kind::Udp, 100, 0)),
                        (1, pkt(c, 0, 1, Kind::Udp, 100, 0)),
                    ]
                }),
            ),
            (
                "repeated or out of order",
                Box::new(|c| {
                    vec![
                        (1, pkt(c, 0, 1, Kind::Tcp, 101, 2)),
                        (1, pkt(c, 0, 1, Kind::Tcp, 101, 1)),
                    ]
                }),
            ),
            (
                "corrupt",
                Box::new(|c| {
                    let mut p = pkt(c, 0, 1, Kind::Udp, 100, 0);
                    let last = p.len() - 1;
                    p[last] ^= 1;
                    vec![(1, p)]
                }),
            ),
            ("not IP", Box::new(|_| vec![(1, vec![0x00; 40])])),
        ];
        for (want, make) in cases {
            let mut c = checker();
            for (at, p) in make(&c) {
                c.delivered(t, at, &p);
            }
            assert!(
                c.violations.iter().any(|v| v.contains(want)),
                "{want}: {:?}",
                c.violations
            );
        }
        // Nothing of a revoked peer may arrive once its grace is over.
        let mut c = checker();
        c.revoked_after.insert(0, Some(Duration::ZERO));
        // ...at a receiver that could not hear of it, it may.
        c.delivered(t, 1, &pkt(&c, 0, 1, Kind::Udp, 100, 5));
        assert!(c.violations.is_empty(), "{:?}", c.violations);
        c.hub_reach_since.insert(1, Duration::ZERO);
        c.delivered(t, 1, &pkt(&c, 0, 1, Kind::Udp, 100, 6));
        assert!(
            c.violations.iter().any(|v| v.contains("revoked")),
            "{:?}",
            c.violations
        );
    }
}
