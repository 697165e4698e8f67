//! Path choice for one peer, sans-IO: which way frames to it go.
//!
//! A peer can be reached directly at one of several candidate endpoints (the
//! address the hub observed, its local addresses, an address a frame from it
//! arrived from) or through a hub acting as relay. Every path is probed with
//! small authenticated messages; each answer gives an RTT sample, each probe
//! left unanswered counts as loss. Unanswered paths are probed less and less
//! often (backoff), so a peer behind a NAT that never opens costs little.
//!
//! The choice has hysteresis: traffic moves to a direct path only after it
//! answered [`PathConfig::promote_streak`] probes in a row with little loss,
//! and leaves it only when it stops answering or loses badly while a relay
//! does not. With no relay configured the choice is what it always was: the
//! newest direct endpoint (roaming follows authenticated frames).

use crate::wire::PublicKey;
use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// One way to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Via {
    /// Straight to this UDP endpoint.
    Direct(SocketAddr),
    /// Wrapped in our session with this hub, which forwards it.
    Relay(PublicKey),
}

impl Via {
    /// The endpoint of a direct path.
    pub fn direct(&self) -> Option<SocketAddr> {
        match self {
            Via::Direct(a) => Some(*a),
            Via::Relay(_) => None,
        }
    }
}

/// Path-choice settings.
#[derive(Debug, Clone)]
pub struct PathConfig {
    /// Probe interval of a path that answers.
    pub probe_interval: Duration,
    /// Longest interval between probes of a path that does not answer.
    pub max_backoff: Duration,
    /// A probe unanswered after this long counts as lost.
    pub probe_timeout: Duration,
    /// A path with no answer for this long is down.
    pub down_after: Duration,
    /// Consecutive answers a direct path needs before traffic moves to it.
    pub promote_streak: u32,
    /// Loss above which a direct path is left for a relay that loses less.
    pub bad_loss: f64,
    /// Loss a direct path must be at or under to be promoted.
    pub good_loss: f64,
}

impl Default for PathConfig {
    fn default() -> Self {
        PathConfig {
            probe_interval: Duration::from_millis(1000),
            max_backoff: Duration::from_secs(16),
            probe_timeout: Duration::from_millis(1500),
            down_after: Duration::from_millis(3500),
            promote_streak: 3,
            bad_loss: 0.4,
            good_loss: 0.3,
        }
    }
}

/// Why the current path was chosen (for `status`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reason {
    /// Nothing measured yet; trying the first candidate.
    Unprobed,
    /// No relay is configured: direct is the only way.
    NoRelay,
    /// A direct candidate answers probes.
    DirectAnswers,
    /// Frames from the peer arrived from this endpoint (NAT rebinding, roaming).
    Roamed,
    /// No direct candidate answered (for this many seconds); the relay does.
    NoDirectAnswer(u64),
    /// The direct path loses this share of probes (percent); the relay less.
    DirectLossy(u32),
    /// The direct path answers probes but loses this share of the data
    /// (percent, from the receiver's reports): e.g. large frames vanish.
    DirectDropsData(u32),
    /// Nothing answers at the moment; keeping the last path.
    NothingAnswers,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Unprobed => write!(f, "not probed yet"),
            Reason::NoRelay => write!(f, "no relay configured"),
            Reason::DirectAnswers => write!(f, "direct path answers probes"),
            Reason::Roamed => write!(f, "peer's frames come from a new endpoint"),
            Reason::NoDirectAnswer(s) => write!(f, "no direct candidate answered for {s} s"),
            Reason::DirectLossy(p) => write!(f, "direct path loses {p}% of probes"),
            Reason::DirectDropsData(p) => {
                write!(f, "direct path answers probes but loses {p}% of data")
            }
            Reason::NothingAnswers => write!(f, "no path answers; keeping the last one"),
        }
    }
}

/// Measurements of one path.
#[derive(Debug, Clone)]
pub struct PathStat {
    /// The path.
    pub via: Via,
    /// Smoothed RTT of probe answers.
    pub srtt: Option<Duration>,
    /// Last probe answer.
    pub last_ack: Option<Duration>,
    /// Answers in a row.
    pub streak: u32,
    /// Probes in a row without an answer (drives the backoff).
    fails: u32,
    /// Recent probes: id, time sent, answered.
    probes: VecDeque<(u32, Duration, bool)>,
    next_probe: Duration,
    /// Learned from a frame's source (not from the hub's candidates).
    learned: bool,
    /// A relay scheduled at the long interval because direct was healthy.
    sparse: bool,
    /// Not to be promoted before this (it was left for dropping data).
    penalty_until: Option<Duration>,
    /// The next penalty if it is left again.
    penalty: Duration,
}

/// How long a direct path left for dropping data is not promoted again; it
/// doubles with every repeat, up to [`PENALTY_MAX`].
const PENALTY_FIRST: Duration = Duration::from_secs(30);
/// Longest such penalty.
const PENALTY_MAX: Duration = Duration::from_secs(600);
/// How long data loss must stay high before the direct path is left.
const DATA_BAD_FOR: Duration = Duration::from_secs(2);

/// Probes remembered per path.
const WINDOW: usize = 16;
/// Decided probes the loss estimate looks at.
/// Decided probes a loss comparison between paths needs on each side.
const MIN_DECIDED: usize = 6;
const LOSS_WINDOW: usize = 10;

impl PathStat {
    fn new(via: Via, now: Duration, learned: bool) -> PathStat {
        PathStat {
            via,
            srtt: None,
            last_ack: None,
            streak: 0,
            fails: 0,
            probes: VecDeque::new(),
            next_probe: now,
            learned,
            sparse: false,
            penalty_until: None,
            penalty: PENALTY_FIRST,
        }
    }

    /// Share of decided probes (answered, or older than the timeout) left unanswered.
    pub fn loss(&self, now: Duration, timeout: Duration) -> f64 {
        // The last LOSS_WINDOW decided probes: recent enough that a path
        // that recovered is trusted again within seconds.
        let decided: Vec<bool> = self
            .probes
            .iter()
            .rev()
            .filter(|(_, t, acked)| *acked || now.saturating_sub(*t) >= timeout)
            .take(LOSS_WINDOW)
            .map(|p| p.2)
            .collect();
        if decided.is_empty() {
            return 0.0;
        }
        decided.iter().filter(|a| !**a).count() as f64 / decided.len() as f64
    }

    /// Probes decided (answered, or unanswered past `timeout`) among the
    /// last [`LOSS_WINDOW`]: how much [`PathStat::loss`] is worth.
    fn decided(&self, now: Duration, timeout: Duration) -> usize {
        self.probes
            .iter()
            .filter(|(_, t, acked)| *acked || now.saturating_sub(*t) >= timeout)
            .take(LOSS_WINDOW)
            .count()
    }

    fn up(&self, now: Duration, down_after: Duration) -> bool {
        self.last_ack
            .is_some_and(|t| now.saturating_sub(t) < down_after)
    }
}

/// The paths to one peer and the choice among them.
#[derive(Debug, Clone)]
pub struct Paths {
    cfg: PathConfig,
    paths: Vec<PathStat>,
    active: Option<Via>,
    reason: Reason,
    next_id: u32,
    /// Since when no direct path has answered (for the reason text).
    direct_lost_since: Option<Duration>,
    /// Relayed paths are in use (a relay is configured).
    relays: usize,
    /// Since when the data on the active direct path has been lost badly,
    /// and how badly (from the receiver's reports).
    data_bad: Option<(Duration, f64)>,
    /// When the receiver last reported on data over the active direct path.
    data_report_at: Option<Duration>,
    /// Since when the session has been quiet (see [`Paths::set_quiet`]).
    quiet_since: Option<Duration>,
    /// Relays reached by a stream (TCP or TLS fallback): taken only when
    /// no other relay answers.
    last_resort: Vec<PublicKey>,
}

/// What [`Paths::decide`] found.
enum Decision {
    /// Move the traffic to this path, for this reason.
    Move(Via, Reason),
    /// Stay; update the reason if given.
    Stay(Option<Reason>),
}

/// Most paths kept per peer (candidates from the hub plus learned ones).
pub const MAX_PATHS: usize = 12;

impl Paths {
    /// No paths yet.
    pub fn new(cfg: PathConfig) -> Paths {
        Paths {
            cfg,
            paths: Vec::new(),
            active: None,
            reason: Reason::Unprobed,
            next_id: 1,
            direct_lost_since: None,
            relays: 0,
            data_bad: None,
            data_report_at: None,
            quiet_since: None,
            last_resort: Vec::new(),
        }
    }

    /// The relays reached by a stream (see [`Paths::decide`]): a relay
    /// over UDP that answers is preferred to them whatever the RTTs.
    pub fn set_last_resort(&mut self, relays: &[PublicKey]) {
        self.last_resort = relays.to_vec();
    }

    /// A session with no data for a while is quiet: no probes go and no
    /// choice is made (its keepalives still keep the active path's NAT
    /// mappings open), and the measurements' clock stops. When data flows
    /// again it restarts where it stopped: the active path stays, and
    /// probes show within [`PathConfig::down_after`] if it broke meanwhile.
    /// Without this an idle session with a relay to compare with sent a
    /// probe and an answer every second.
    pub fn set_quiet(&mut self, now: Duration, quiet: bool) {
        match (self.quiet_since, quiet) {
            (None, true) => self.quiet_since = Some(now),
            (Some(t), false) => {
                self.quiet_since = None;
                let gap = now.saturating_sub(t);
                for p in self.paths.iter_mut() {
                    p.last_ack = p.last_ack.map(|a| a + gap);
                    p.next_probe += gap;
                    for x in p.probes.iter_mut() {
                        x.1 += gap;
                    }
                }
                if let Some(d) = self.direct_lost_since.as_mut() {
                    *d += gap;
                }
                if let Some((d, _)) = self.data_bad.as_mut() {
                    *d += gap;
                }
            }
            _ => {}
        }
    }

    /// Whether the session is quiet.
    pub fn is_quiet(&self) -> bool {
        self.quiet_since.is_some()
    }

    /// Probes and choices run: a relay to compare with, and not quiet.
    fn measuring(&self) -> bool {
        self.probing() && self.quiet_since.is_none()
    }

    /// The path frames go on now, if any.
    pub fn current(&self) -> Option<Via> {
        self.active
            .or_else(|| {
                self.paths
                    .iter()
                    .map(|p| p.via)
                    .find(|v| v.direct().is_some())
            })
            .or_else(|| self.paths.first().map(|p| p.via))
    }

    /// Whether the current path was chosen on measurements (or is the only one).
    pub fn settled(&self) -> bool {
        self.active.is_some()
    }

    /// Why the current path.
    pub fn reason(&self) -> Reason {
        self.reason
    }

    /// All paths with their measurements.
    pub fn stats(&self) -> &[PathStat] {
        &self.paths
    }

    /// Where to send a handshake initiation: the chosen path once there is
    /// one, else every candidate (the first to get through wins).
    pub fn handshake_paths(&self) -> Vec<Via> {
        match self.active {
            Some(v) => vec![v],
            None => self.paths.iter().map(|p| p.via).collect(),
        }
    }

    /// Replace the direct candidates (learned ones and the active path stay).
    pub fn set_direct(&mut self, now: Duration, cands: &[SocketAddr]) {
        let active = self.active;
        self.paths.retain(|p| match p.via {
            Via::Direct(a) => p.learned || cands.contains(&a) || active == Some(p.via),
            Via::Relay(_) => true,
        });
        for &a in cands {
            self.add(now, Via::Direct(a), false);
        }
        if self.relays == 0 {
            // Without relays the newest candidate from the hub is the path.
            if let Some(&a) = cands.first() {
                self.active = Some(Via::Direct(a));
                self.reason = Reason::NoRelay;
            }
        }
    }

    /// Replace the relays.
    pub fn set_relays(&mut self, now: Duration, relays: &[PublicKey]) {
        self.paths.retain(|p| match p.via {
            Via::Relay(k) => relays.contains(&k),
            Via::Direct(_) => true,
        });
        for k in relays {
            self.add(now, Via::Relay(*k), false);
        }
        self.relays = relays.len();
        let gone = self
            .active
            .is_some_and(|v| !self.paths.iter().any(|p| p.via == v));
        // A path taken only because there was no relay is measured now.
        if gone || (self.relays > 0 && self.reason == Reason::NoRelay) {
            self.active = None;
            self.reason = Reason::Unprobed;
        }
        if self.relays == 0 && self.active.is_none() {
            self.reason = Reason::NoRelay;
        }
    }

    /// Probe every direct candidate again now (the hub asked both sides to punch).
    pub fn punch(&mut self, now: Duration, cands: &[SocketAddr]) {
        for &a in cands {
            self.add(now, Via::Direct(a), false);
        }
        for p in self.paths.iter_mut() {
            if p.via.direct().is_some() {
                p.fails = 0;
                p.next_probe = now;
            }
        }
    }

    fn add(&mut self, now: Duration, via: Via, learned: bool) {
        if self.paths.iter().any(|p| p.via == via) {
            return;
        }
        if self.paths.len() >= MAX_PATHS {
            // Make room: drop the learned direct path that answered least recently.
            let victim = self
                .paths
                .iter()
                .enumerate()
                .filter(|(_, p)| p.learned && Some(p.via) != self.active)
                .min_by_key(|(_, p)| p.last_ack)
                .map(|(i, _)| i);
            match victim {
                Some(i) => {
                    self.paths.remove(i);
                }
                None => return,
            }
        }
        self.paths.push(PathStat::new(via, now, learned));
    }

    /// Whether probing is on: only with a relay to compare with.
    fn probing(&self) -> bool {
        self.relays > 0
    }

    /// Earliest probe due.
    pub fn poll_timeout(&self) -> Option<Duration> {
        if !self.measuring() {
            return None;
        }
        self.paths.iter().map(|p| p.next_probe).min()
    }

    /// A probe due now: the path and the probe id to put in it.
    pub fn poll_probe(&mut self, now: Duration) -> Option<(Via, u32)> {
        if !self.measuring() {
            return None;
        }
        let (interval, max_backoff) = (self.cfg.probe_interval, self.cfg.max_backoff);
        let down_after = self.cfg.down_after;
        let healthy = self.direct_healthy(now);
        let p = self.paths.iter_mut().find(|p| p.next_probe <= now)?;
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        // An answer to the previous probe resets `fails`; none raises it.
        if p.probes.back().is_some_and(|x| !x.2) {
            p.fails = p.fails.saturating_add(1);
            p.streak = 0;
        }
        p.probes.push_back((id, now, false));
        if p.probes.len() > WINDOW {
            p.probes.pop_front();
        }
        // Back off from a path that stopped answering, not from one that
        // answered a moment ago: on a lossy path a lost probe or two is
        // normal, and probing it less would let it look down.
        let backoff = if p.up(now, down_after) {
            interval
        } else {
            interval * (1u32 << p.fails.min(4))
        };
        // While a healthy direct path carries the traffic, relays are only
        // checked now and then (each probe through one costs the hub work).
        p.sparse = healthy && p.via.direct().is_none();
        let backoff = if p.sparse { max_backoff } else { backoff };
        p.next_probe = now + backoff.min(max_backoff);
        Some((p.via, id))
    }

    /// The remote reports receiving our data on the active path: the path
    /// works both ways (its report came back), as good as an answered
    /// probe for keeping it up. On a lossy path a few probes in a row can
    /// go unanswered while data flows; that must not count as the path
    /// being down.
    pub fn note_alive(&mut self, now: Duration) {
        let Some(v) = self.current() else { return };
        // Also for a path no probe has answered yet (taken from the
        // hub's candidates or from the first frames): data crossing it
        // both ways is the better proof.
        if let Some(p) = self.paths.iter_mut().find(|p| p.via == v) {
            p.last_ack = Some(now);
        }
    }

    /// The data loss the receiver reports on the active path (0..1).
    pub fn note_data_loss(&mut self, now: Duration, loss: f64) {
        if self.active.is_none_or(|v| v.direct().is_none()) {
            self.data_bad = None;
            self.data_report_at = None;
            return;
        }
        self.data_report_at = Some(now);
        if loss >= self.cfg.bad_loss {
            let since = self.data_bad.map_or(now, |(t, _)| t);
            self.data_bad = Some((since, loss));
        } else {
            self.data_bad = None;
        }
    }

    /// The active path is direct, answers, and loses little.
    fn direct_healthy(&self, now: Duration) -> bool {
        self.data_bad.is_none()
            && self
                .active
                .filter(|v| v.direct().is_some())
                .and_then(|v| self.paths.iter().find(|p| p.via == v))
                .is_some_and(|p| {
                    p.up(now, self.cfg.down_after)
                        && p.loss(now, self.cfg.probe_timeout) <= self.cfg.good_loss
                })
    }

    /// A probe answer arrived.
    pub fn on_ack(&mut self, now: Duration, id: u32) {
        let healthy = self.direct_healthy(now);
        for p in self.paths.iter_mut() {
            if let Some(x) = p.probes.iter_mut().find(|x| x.0 == id && !x.2) {
                x.2 = true;
                let rtt = now.saturating_sub(x.1);
                p.srtt = Some(match p.srtt {
                    Some(s) => (s * 7 + rtt) / 8,
                    None => rtt,
                });
                p.last_ack = Some(now);
                p.streak += 1;
                p.fails = 0;
                if p.next_probe > now + self.cfg.probe_interval
                    && !(healthy && p.via.direct().is_none())
                {
                    p.next_probe = now + self.cfg.probe_interval;
                }
                break;
            }
        }
        self.choose(now);
    }

    /// An authenticated frame arrived over `via`.
    pub fn on_rx(&mut self, now: Duration, via: Via) {
        if self.active == Some(via) {
            return; // the common case: nothing new
        }
        if let Via::Direct(a) = via {
            self.add(now, via, true);
            // Roaming: the peer's direct frames now come from `a`.
            match self.active {
                Some(Via::Direct(b)) if b != a => {
                    self.active = Some(via);
                    self.reason = Reason::Roamed;
                }
                None if !self.probing() => {
                    self.active = Some(via);
                    self.reason = Reason::NoRelay;
                }
                _ => {}
            }
        }
    }

    /// Re-evaluate the choice (after answers, and on every probe round).
    pub fn choose(&mut self, now: Duration) {
        if !self.measuring() {
            return;
        }
        let down = self.cfg.down_after;
        let any_direct_up = self
            .paths
            .iter()
            .any(|p| p.via.direct().is_some() && p.up(now, down));
        if any_direct_up {
            self.direct_lost_since = None;
        } else if self.direct_lost_since.is_none() {
            self.direct_lost_since = Some(now);
        }
        if !self.direct_healthy(now) {
            // Relays probed rarely while direct was fine: check them now.
            for p in self.paths.iter_mut() {
                if p.sparse {
                    p.sparse = false;
                    p.next_probe = p.next_probe.min(now);
                }
            }
        }
        match self.decide(now) {
            Decision::Move(v, r) => {
                if let Reason::DirectDropsData(_) = r {
                    // Keep traffic off that direct path for a while: its probes
                    // still pass, so without this it would be promoted again.
                    if let Some(old) = self.active {
                        if let Some(p) = self.paths.iter_mut().find(|p| p.via == old) {
                            p.penalty_until = Some(now + p.penalty);
                            p.penalty = (p.penalty * 2).min(PENALTY_MAX);
                        }
                    }
                }
                self.data_bad = None;
                self.data_report_at = None;
                self.active = Some(v);
                self.reason = r;
            }
            Decision::Stay(Some(r)) => self.reason = r,
            Decision::Stay(None) => {}
        }
    }

    /// The choice on the current measurements (no state changes).
    fn decide(&self, now: Duration) -> Decision {
        let (to, down) = (self.cfg.probe_timeout, self.cfg.down_after);
        let up = |p: &&PathStat| p.up(now, down);
        let rtt = |p: &PathStat| p.srtt.unwrap_or(Duration::from_secs(1));
        // IPv6 first among direct paths that measure as well: no NAT
        // mapping to expire or be flushed on the way.
        let v6 = |p: &PathStat| p.via.direct().is_some_and(|a| a.is_ipv6());
        let as_good = |d: &PathStat, c: &PathStat| {
            rtt(d) <= rtt(c) + rtt(c) / 10 + Duration::from_millis(1)
                && d.loss(now, to) <= c.loss(now, to)
        };
        let best_direct = self
            .paths
            .iter()
            .filter(|p| p.via.direct().is_some())
            .filter(up)
            .min_by(|a, b| {
                let la = (a.loss(now, to) * 10.0) as u32;
                let lb = (b.loss(now, to) * 10.0) as u32;
                la.cmp(&lb).then_with(|| {
                    if v6(a) != v6(b) && as_good(a, b) && as_good(b, a) {
                        v6(b).cmp(&v6(a))
                    } else {
                        rtt(a).cmp(&rtt(b))
                    }
                })
            });
        let last_resort =
            |p: &PathStat| matches!(p.via, Via::Relay(k) if self.last_resort.contains(&k));
        let best_relay = self
            .paths
            .iter()
            .filter(|p| p.via.direct().is_none())
            .filter(up)
            .min_by_key(|p| (last_resort(p), rtt(p)));
        let cur = self
            .active
            .and_then(|v| self.paths.iter().find(|p| p.via == v));
        let promotable = |d: &PathStat| {
            d.streak >= self.cfg.promote_streak
                && d.loss(now, to) <= self.cfg.good_loss
                && d.penalty_until.is_none_or(|t| now >= t)
        };
        let drops_data = self
            .data_bad
            .filter(|(t, _)| now.saturating_sub(*t) >= DATA_BAD_FOR)
            .map(|(_, l)| l);
        // While data flows on the active direct path, the receiver's
        // reports measure its loss on thousands of frames (and
        // `drops_data` acts on them); its probes, a few a second sharing
        // the queue with that data, are too few to judge it by.
        let data_reported = self
            .data_report_at
            .is_some_and(|t| now.saturating_sub(t) < DATA_BAD_FOR);
        let no_direct_for = || {
            now.saturating_sub(self.direct_lost_since.unwrap_or(now))
                .as_secs()
        };
        let next: Option<(Via, Reason)> = match cur {
            Some(c) if c.via.direct().is_some() => {
                let c_loss = c.loss(now, to);
                let c_up = c.up(now, down);
                if let (Some(dl), Some(r)) = (drops_data, best_relay) {
                    (r.loss(now, to) + 0.2 < dl)
                        .then(|| (r.via, Reason::DirectDropsData((dl * 100.0).round() as u32)))
                } else if !c_up {
                    match (best_direct, best_relay) {
                        (Some(d), _) if promotable(d) => Some((d.via, Reason::DirectAnswers)),
                        (_, Some(r)) => Some((r.via, Reason::NoDirectAnswer(no_direct_for()))),
                        _ => None,
                    }
                } else if c_loss >= self.cfg.bad_loss && !data_reported {
                    // Both losses must rest on enough probes: a relay with
                    // one answer so far reads as lossless (over a lossy
                    // WAN it may lose more than the direct path). Another
                    // direct candidate that loses much less goes first
                    // (the other address family, another interface).
                    let much_better = |p: &PathStat| {
                        p.decided(now, to) >= MIN_DECIDED
                            && c.decided(now, to) >= MIN_DECIDED
                            && p.loss(now, to) + 0.2 < c_loss
                    };
                    best_direct
                        .filter(|d| d.via != c.via && promotable(d) && much_better(d))
                        .map(|d| (d.via, Reason::DirectAnswers))
                        .or_else(|| {
                            best_relay.filter(|r| much_better(r)).map(|r| {
                                (r.via, Reason::DirectLossy((c_loss * 100.0).round() as u32))
                            })
                        })
                } else {
                    // Another direct candidate much better, or IPv6 and
                    // as good as this IPv4 one: move.
                    best_direct
                        .filter(|d| {
                            d.via != c.via
                                && promotable(d)
                                && d.loss(now, to) <= c_loss
                                && (rtt(d) * 2 < rtt(c) || (v6(d) && !v6(c) && as_good(d, c)))
                        })
                        .map(|d| (d.via, Reason::DirectAnswers))
                }
            }
            Some(c) => {
                // On a relay: a good direct path wins unless it is much slower.
                let c_up = c.up(now, down);
                // So does a direct path that loses no more than the relay,
                // both measured on enough probes, even if it loses too
                // much to count as good: a lossy WAN under both, with the
                // relay crossing it twice. (Leaving direct for the relay
                // takes a relay that loses 20 points less: no flapping.)
                let no_worse_than_relay = |d: &PathStat| {
                    d.streak >= 1
                        && d.penalty_until.is_none_or(|t| now >= t)
                        && d.decided(now, to) >= MIN_DECIDED
                        && c.decided(now, to) >= MIN_DECIDED
                        && d.loss(now, to) <= c.loss(now, to)
                };
                match best_direct {
                    Some(d)
                        if (promotable(d) || no_worse_than_relay(d))
                            && (!c_up || rtt(d) <= rtt(c) * 2 + Duration::from_millis(50)) =>
                    {
                        Some((d.via, Reason::DirectAnswers))
                    }
                    _ if !c_up => best_relay
                        .filter(|r| r.via != c.via)
                        .map(|r| (r.via, Reason::NoDirectAnswer(no_direct_for()))),
                    // Off a stream relay as soon as a UDP one answers.
                    _ if last_resort(c) => best_relay
                        .filter(|r| !last_resort(r))
                        .map(|r| (r.via, Reason::NoDirectAnswer(no_direct_for()))),
                    _ => None,
                }
            }
            None => match (best_direct, best_relay) {
                (Some(d), _) => Some((d.via, Reason::DirectAnswers)),
                (_, Some(r)) => Some((r.via, Reason::NoDirectAnswer(no_direct_for()))),
                _ => None,
            },
        };
        if let Some((v, r)) = next {
            return Decision::Move(v, r);
        }
        // Staying: keep the reason current.
        Decision::Stay(match cur {
            Some(c) if c.up(now, down) => Some(match (c.via, self.reason) {
                (Via::Direct(_), Reason::Roamed) => Reason::Roamed,
                (Via::Direct(_), _) => Reason::DirectAnswers,
                (Via::Relay(_), Reason::DirectLossy(p)) => Reason::DirectLossy(p),
                (Via::Relay(_), Reason::DirectDropsData(p)) => Reason::DirectDropsData(p),
                (Via::Relay(_), _) => Reason::NoDirectAnswer(no_direct_for()),
            }),
            Some(_) if best_relay.is_none() && best_direct.is_none() => {
                Some(Reason::NothingAnswers)
            }
            _ => None,
        })
    }

    /// Whether to ask the hubs to coordinate a punch: direct candidates exist,
    /// none answers, and a relay is in use or nothing is.
    pub fn wants_punch(&self, now: Duration) -> bool {
        self.measuring()
            && self.paths.iter().any(|p| p.via.direct().is_some())
            && !self
                .paths
                .iter()
                .any(|p| p.via.direct().is_some() && p.up(now, self.cfg.down_after))
    }
}

/// The extra step of a punch between a peer whose NAT picks a new port for
/// every destination ("hard") and one whose NAT keeps one mapping for all
/// ("easy"): plain probes cannot meet, since the easy side does not know
/// which port the hard side's NAT will use towards it. Both sides act at the
/// same time (a hub's punch notice reaches both):
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Birthday {
    /// We are the hard side: send from many fresh local ports to the easy
    /// side's endpoint, opening as many mappings on our NAT.
    OpenPorts(SocketAddr),
    /// We are the easy side: send to many random ports of the hard side's
    /// public address; one that meets a mapping it opened makes a path.
    Spray(std::net::IpAddr),
}

/// Whether a node whose endpoints are `eps` (as a hub lists them: the
/// endpoint the hub saw first, then the node's own addresses) looks to be
/// behind a NAT that changed its port: IPv4, not reachable at any of its own
/// addresses, and none of them has the port the hub saw. (A NAT that keeps
/// ports for one destination may still change them for others; one that
/// changes them may still keep one mapping for all: this is a guess, as
/// good as one hub can make.)
pub fn behind_port_changing_nat(eps: &[SocketAddr]) -> bool {
    let Some(seen) = eps.first().filter(|a| a.is_ipv4()) else {
        return false;
    };
    let own: Vec<&SocketAddr> = eps[1..].iter().filter(|a| a.is_ipv4()).collect();
    !own.is_empty()
        && own
            .iter()
            .all(|a| a.ip() != seen.ip() && a.port() != seen.port())
}

/// The birthday step for a pair, from our endpoints and theirs (each as
/// [`behind_port_changing_nat`] takes them); None unless exactly one side
/// is hard (two hard sides stay on the relay: no flood of probes).
pub fn birthday_plan(mine: &[SocketAddr], theirs: &[SocketAddr]) -> Option<Birthday> {
    let their_seen = *theirs.first().filter(|a| a.is_ipv4())?;
    mine.first().filter(|a| a.is_ipv4())?;
    match (
        behind_port_changing_nat(mine),
        behind_port_changing_nat(theirs),
    ) {
        (true, false) => Some(Birthday::OpenPorts(their_seen)),
        (false, true) => Some(Birthday::Spray(their_seen.ip())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(x: u64) -> Duration {
        Duration::from_millis(x)
    }

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], p))
    }

    /// Run probes for `secs` seconds; `answer(via)` says whether and after
    /// how long the probe is answered.
    fn drive(
        p: &mut Paths,
        from: Duration,
        secs: u64,
        answer: impl Fn(Via) -> Option<Duration>,
    ) -> Duration {
        drive_with(p, from, secs, answer, |_, _| {})
    }

    /// [`drive`], calling `each` every 10 ms step.
    fn drive_with(
        p: &mut Paths,
        from: Duration,
        secs: u64,
        answer: impl Fn(Via) -> Option<Duration>,
        mut each: impl FnMut(&mut Paths, Duration),
    ) -> Duration {
        let mut acks: Vec<(Duration, u32)> = Vec::new();
        let mut t = from;
        let end = from + Duration::from_secs(secs);
        while t < end {
            while let Some((via, id)) = p.poll_probe(t) {
                if let Some(d) = answer(via) {
                    acks.push((t + d, id));
                }
            }
            acks.sort();
            while acks.first().is_some_and(|a| a.0 <= t) {
                let (_, id) = acks.remove(0);
                p.on_ack(t, id);
            }
            each(p, t);
            p.choose(t);
            t += ms(10);
        }
        t
    }

    /// [`drive_with`], counting how often the traffic moved to another path.
    fn drive_counting_moves(
        p: &mut Paths,
        from: Duration,
        secs: u64,
        answer: impl Fn(Via) -> Option<Duration>,
        mut each: impl FnMut(&mut Paths, Duration),
    ) -> (Duration, usize) {
        let (mut moves, mut last) = (0, p.current());
        let t = drive_with(p, from, secs, answer, |p, t| {
            each(p, t);
            if p.current() != last {
                moves += 1;
                last = p.current();
            }
        });
        (t, moves + usize::from(p.current() != last))
    }

    /// Paths with one direct candidate (`addr(1)`) and one relay.
    fn direct_and_relay() -> ([u8; 32], Paths) {
        let hub = [7; 32];
        let mut p = Paths::new(PathConfig::default());
        p.set_relays(ms(0), &[hub]);
        p.set_direct(ms(0), &[addr(1)]);
        (hub, p)
    }

    #[test]
    fn without_relays_the_hubs_candidate_is_used_and_roaming_follows_frames() {
        let mut p = Paths::new(PathConfig::default());
        p.set_direct(ms(0), &[addr(1)]);
        assert_eq!(p.current(), Some(Via::Direct(addr(1))));
        assert!(p.poll_probe(ms(0)).is_none(), "no probes without a relay");
        p.on_rx(ms(5), Via::Direct(addr(2)));
        assert_eq!(p.current(), Some(Via::Direct(addr(2))));
        assert_eq!(p.reason(), Reason::Roamed);
    }

    #[test]
    fn direct_wins_when_it_answers_and_relay_takes_over_when_it_does_not() {
        let (hub, mut p) = direct_and_relay();
        // Both answer: direct (20 ms) is chosen over the relay (60 ms).
        let t = drive(&mut p, ms(0), 5, |v| {
            Some(if v.direct().is_some() { ms(20) } else { ms(60) })
        });
        assert_eq!(p.current(), Some(Via::Direct(addr(1))));
        assert_eq!(p.reason(), Reason::DirectAnswers);
        // Direct goes silent: the relay within `down_after` plus a probe.
        let t2 = drive(&mut p, t, 6, |v| v.direct().is_none().then_some(ms(60)));
        assert_eq!(p.current(), Some(Via::Relay(hub)));
        assert!(matches!(p.reason(), Reason::NoDirectAnswer(_)));
        assert!(p.wants_punch(t2));
        // Direct answers again: back to it after the promotion streak, though
        // its probes are backed off (a punch resets that).
        p.punch(t2, &[]);
        drive(&mut p, t2, 8, |v| {
            Some(if v.direct().is_some() { ms(20) } else { ms(60) })
        });
        assert_eq!(p.current(), Some(Via::Direct(addr(1))));
    }

    #[test]
    fn birthday_only_between_one_hard_and_one_easy_side() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        // Hub saw a new port: hard. Kept port, or reachable at its own
        // address (public, or a port mapping): easy.
        let hard = [a("198.51.100.1:40123"), a("172.16.1.2:4800")];
        let cone = [a("198.51.100.2:4800"), a("172.16.2.2:4800")];
        let public = [a("203.0.113.5:4800"), a("203.0.113.5:4800")];
        let mapped = [
            a("198.51.100.1:40123"),
            a("198.51.100.1:4800"),
            a("172.16.1.2:4800"),
        ];
        assert!(behind_port_changing_nat(&hard));
        for e in [
            &cone[..],
            &public,
            &mapped,
            &[],
            &[a("[2001:db8::1]:1"), a("[fd00::1]:4800")],
        ] {
            assert!(!behind_port_changing_nat(e), "{e:?}");
        }
        assert_eq!(
            birthday_plan(&hard, &cone),
            Some(Birthday::OpenPorts(cone[0]))
        );
        assert_eq!(
            birthday_plan(&cone, &hard),
            Some(Birthday::Spray(hard[0].ip()))
        );
        assert_eq!(
            birthday_plan(&public, &hard),
            Some(Birthday::Spray(hard[0].ip()))
        );
        assert_eq!(birthday_plan(&hard, &hard), None);
        assert_eq!(birthday_plan(&cone, &public), None);
        assert_eq!(birthday_plan(&[], &hard), None);
    }

    #[test]
    fn a_relay_reached_by_stream_is_the_last_resort() {
        // Two relays, no direct path; the one on a stream is faster.
        let (udp_hub, tcp_hub) = ([7; 32], [8; 32]);
        let mut p = Paths::new(PathConfig::default());
        p.set_relays(ms(0), &[udp_hub, tcp_hub]);
        p.set_direct(ms(0), &[addr(1)]);
        p.set_last_resort(&[tcp_hub]);
        let rtt = |v: Via| match v {
            Via::Relay(k) if k == tcp_hub => Some(ms(30)),
            Via::Relay(_) => Some(ms(80)),
            Via::Direct(_) => None,
        };
        let t = drive(&mut p, ms(0), 5, rtt);
        assert_eq!(p.current(), Some(Via::Relay(udp_hub)));
        // The UDP relay stops answering: the stream one carries on...
        let t = drive(&mut p, t, 6, |v| {
            (v == Via::Relay(tcp_hub)).then_some(ms(30))
        });
        assert_eq!(p.current(), Some(Via::Relay(tcp_hub)));
        // ...until the UDP relay answers again, slower as it is (its probes
        // backed off meanwhile: at most `max_backoff` apart).
        drive(&mut p, t, 18, rtt);
        assert_eq!(p.current(), Some(Via::Relay(udp_hub)));
        // Without the mark the faster relay wins.
        let mut q = Paths::new(PathConfig::default());
        q.set_relays(ms(0), &[udp_hub, tcp_hub]);
        q.set_direct(ms(0), &[addr(1)]);
        drive(&mut q, ms(0), 5, rtt);
        assert_eq!(q.current(), Some(Via::Relay(tcp_hub)));
    }

    #[test]
    fn ipv6_direct_is_preferred_when_it_measures_as_well_and_only_then() {
        let v6 = |port| SocketAddr::from(([0xfd00, 0, 0, 0, 0, 0, 0, 2], port));
        // Both answer in the same time (the drive loop measures in 10 ms
        // steps): IPv6 is chosen.
        let with_relay = || {
            let mut p = Paths::new(PathConfig::default());
            p.set_relays(ms(0), &[[7; 32]]);
            p.set_direct(ms(0), &[addr(1), v6(1)]);
            p
        };
        let mut p = with_relay();
        let t = drive(&mut p, ms(0), 5, |v| match v {
            Via::Relay(_) => Some(ms(40)),
            _ => Some(ms(20)),
        });
        assert_eq!(p.current(), Some(Via::Direct(v6(1))));
        // IPv6 turning much slower than IPv4: back to IPv4.
        let mut p2 = with_relay();
        drive(&mut p2, ms(0), 5, |v| match v {
            Via::Relay(_) => Some(ms(40)),
            Via::Direct(a) if a.is_ipv6() => Some(ms(40)),
            _ => Some(ms(20)),
        });
        assert_eq!(p2.current(), Some(Via::Direct(addr(1))), "IPv6 slower");
        // IPv6 lossy: IPv4 stays.
        let n = std::cell::Cell::new(0u32);
        drive(&mut p, t, 10, |v| match v {
            Via::Relay(_) => Some(ms(40)),
            Via::Direct(a) if a.is_ipv6() => {
                n.set(n.get() + 1);
                n.get().is_multiple_of(2).then_some(ms(20))
            }
            _ => Some(ms(20)),
        });
        assert_eq!(p.current(), Some(Via::Direct(addr(1))), "IPv6 lossy");
    }

    #[test]
    fn a_direct_path_that_loses_badly_is_left_for_the_relay_without_flapping() {
        let (hub, mut p) = direct_and_relay();
        let t = drive(&mut p, ms(0), 5, |_| Some(ms(20)));
        assert_eq!(p.current(), Some(Via::Direct(addr(1))));
        // Direct answers only every other probe (50% loss): relay.
        let n = std::cell::Cell::new(0u32);
        let lossy = |v: Via| {
            if v.direct().is_some() {
                n.set(n.get() + 1);
                (n.get() & 1 == 0).then_some(ms(20))
            } else {
                Some(ms(40))
            }
        };
        let (_, switches) = drive_counting_moves(&mut p, t, 30, lossy, |_, _| {});
        assert_eq!(p.current(), Some(Via::Relay(hub)));
        assert!(
            matches!(p.reason(), Reason::DirectLossy(_)),
            "{:?}",
            p.reason()
        );
        assert_eq!(switches, 1, "one move, no flapping");
    }

    #[test]
    fn a_lossy_direct_path_is_taken_over_a_relay_that_loses_more() {
        // The first direct probe is lost, so the relay is taken first;
        // then direct loses 2 probes in 5 (more than `good_loss`) and the
        // relay, crossing the same lossy WAN twice, 1 in 2.
        let (_, mut p) = direct_and_relay();
        let (nd, nr) = (std::cell::Cell::new(0u32), std::cell::Cell::new(0u32));
        let lossy = |v: Via| {
            if v.direct().is_some() {
                nd.set(nd.get() + 1);
                (nd.get() % 5 != 1 && nd.get() % 5 != 3).then_some(ms(50))
            } else {
                nr.set(nr.get() + 1);
                (!nr.get().is_multiple_of(2)).then_some(ms(100))
            }
        };
        let t = drive(&mut p, ms(0), 1, lossy);
        assert!(matches!(p.current(), Some(Via::Relay(_))));
        let (_, switches) = drive_counting_moves(&mut p, t, 40, lossy, |_, _| {});
        assert_eq!(p.current(), Some(Via::Direct(addr(1))));
        assert_eq!(switches, 1, "one move, no flapping");
    }

    #[test]
    fn data_crossing_a_direct_path_keeps_it_though_its_probes_are_lost() {
        // Data flows on the hub's direct candidate before any probe is
        // answered; the relay answers first. The receiver's reports (20%
        // data loss) prove direct works: it is taken and kept although
        // three probes in four are lost (a queue full of that data).
        let (_, mut p) = direct_and_relay();
        assert_eq!(p.current(), Some(Via::Direct(addr(1))));
        let n = std::cell::Cell::new(0u32);
        let answer = |v: Via| {
            if v.direct().is_some() {
                n.set(n.get() + 1);
                n.get().is_multiple_of(4).then_some(ms(50))
            } else {
                Some(ms(60))
            }
        };
        let (_, moves) = drive_counting_moves(&mut p, ms(0), 30, answer, |p, t| {
            if t.as_millis().is_multiple_of(20) {
                p.note_alive(t);
                p.note_data_loss(t, 0.2);
            }
        });
        assert_eq!(p.current(), Some(Via::Direct(addr(1))));
        assert_eq!(moves, 0, "never left direct");
    }

    #[test]
    fn a_direct_path_that_answers_probes_but_drops_data_is_left_and_kept_off() {
        let (hub, mut p) = direct_and_relay();
        let t = drive(&mut p, ms(0), 5, |_| Some(ms(20)));
        assert_eq!(p.current(), Some(Via::Direct(addr(1))));
        // Probes still pass both ways; the receiver reports 50% data loss
        // (as it would every 20 ms while traffic flows).
        let t = drive_with(
            &mut p,
            t,
            4,
            |_| Some(ms(20)),
            |p, t| {
                if p.current().is_some_and(|v| v.direct().is_some()) {
                    p.note_data_loss(t, 0.5)
                }
            },
        );
        assert_eq!(p.current(), Some(Via::Relay(hub)));
        assert_eq!(p.reason(), Reason::DirectDropsData(50));
        // Direct keeps answering probes, but stays out for the penalty...
        let t2 = drive(&mut p, t, 20, |_| Some(ms(20)));
        assert_eq!(p.current(), Some(Via::Relay(hub)));
        // ...and is tried again after it (30 s).
        drive(&mut p, t2, 15, |_| Some(ms(20)));
        assert_eq!(p.current(), Some(Via::Direct(addr(1))));
    }

    #[test]
    fn unanswered_paths_back_off() {
        let (_, mut p) = direct_and_relay();
        let mut direct_probes = 0;
        let mut t = ms(0);
        while t < Duration::from_secs(60) {
            while let Some((v, id)) = p.poll_probe(t) {
                if v.direct().is_some() {
                    direct_probes += 1;
                } else {
                    p.on_ack(t, id);
                }
            }
            t += ms(100);
        }
        // 1 s doubling to 16 s: 1+2+4+8+16+16+... about 7 probes in 60 s, not 60.
        assert!((5..=9).contains(&direct_probes), "{direct_probes}");
    }

    #[test]
    fn learned_paths_are_bounded() {
        let mut p = Paths::new(PathConfig::default());
        p.set_relays(ms(0), &[[1; 32]]);
        for i in 0..100 {
            p.on_rx(ms(i), Via::Direct(addr(i as u16)));
        }
        assert!(p.stats().len() <= MAX_PATHS);
    }
}
