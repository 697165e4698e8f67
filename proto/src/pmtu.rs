//! Path MTU discovery for one path, packetization-layer style (RFC 8899):
//! padded probe frames sent with the don't-fragment bit, answered by the
//! peer, a search between a size assumed to work and the configured
//! ceiling, and confirmation of the size in use while data flows.
//!
//! Sans-IO and clock-free like the rest of the core: the session asks
//! [`Pmtu::poll_probe`] for a probe to send, reports answers with
//! [`Pmtu::on_ack`], and sizes its frames by [`Pmtu::current`].
//!
//! Frames larger than the size in use are still sent (datagrams bigger than
//! it, KCP segments cut before it shrank): the data socket lets the kernel
//! and routers fragment them, so discovery makes the common case efficient
//! and never makes a packet undeliverable.
//!
//! * **Search**: in rounds of up to [`PARALLEL`] probes sent together: the
//!   ceiling (most paths carry 1500-byte packets, so one round trip settles
//!   it) and sizes spread evenly between the largest size that worked and
//!   the smallest that failed, until those are within [`STEP`] bytes. A
//!   path of 1280 bytes is found in two rounds.
//! * **Loss is not a verdict**: a size fails after [`MAX_PROBES`] probes
//!   unanswered, and a probe only counts if the path answered something
//!   else meanwhile (a silent path is down, not narrow).
//! * **Black holes**: while frames above the base size flow, the size in use is probed every
//!   [`CONFIRM_EVERY`]; if it fails, frames shrink to the base size at once
//!   and a new search starts below the failed size.
//! * **Raise**: a path that settled below the ceiling is searched again
//!   after [`RAISE_AFTER`] (a route may have changed).

use std::time::Duration;

/// UDP payload of a 1280-byte IPv6 packet: every IPv6 path carries it, and
/// nearly every IPv4 one. Frames start at this size.
pub const BASE_FRAME: usize = 1280 - 40 - 8;
/// Search precision in bytes.
pub const STEP: usize = 16;
/// Probes of different sizes in flight at once while searching.
pub const PARALLEL: usize = 4;
/// Unanswered probes after which a size is taken not to fit.
pub const MAX_PROBES: u32 = 4;
/// How often the size in use is confirmed while data flows.
pub const CONFIRM_EVERY: Duration = Duration::from_secs(2);
/// When a search that ended below the ceiling is tried again.
pub const RAISE_AFTER: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Outstanding {
    id: u32,
    size: usize,
    sent: Duration,
    tries: u32,
    /// A confirmation of the size in use (its failure means a black hole).
    confirm: bool,
}

/// What changed with an input, for the session to act on (resize its
/// conversations, log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The size in use grew (a probe of that size was answered).
    Raised(usize),
    /// The size in use stopped working: back to the base size.
    BlackHole {
        /// The size that stopped working.
        from: usize,
    },
    /// Not even the base size gets through whole: the path carries only
    /// small frames (a tiny MTU with fragments dropped). Data needs
    /// another path.
    BaseFails,
}

/// Path MTU state of one path. Sizes are whole frames (UDP payload bytes).
#[derive(Debug, Clone)]
pub struct Pmtu {
    base: usize,
    max: usize,
    current: usize,
    /// Largest size known to work.
    lo: usize,
    /// Smallest size known not to work (`max + 1` while none failed).
    hi: usize,
    searching: bool,
    /// A probe of at least the base size was answered on this path.
    base_ok: bool,
    /// Probes in flight (a search round, or one confirmation).
    probes: Vec<Outstanding>,
    next_id: u32,
    next_confirm: Duration,
    next_raise: Option<Duration>,
    /// Probes sent, answered, and sizes given up on (for status).
    pub sent: u64,
    /// Probes answered.
    pub acked: u64,
    /// Black holes detected.
    pub black_holes: u64,
}

impl Pmtu {
    /// A path whose frames may be up to `max` bytes; frames start at
    /// `BASE_FRAME` (or `max` if that is smaller) until a probe confirms more.
    pub fn new(max: usize) -> Pmtu {
        let base = BASE_FRAME.min(max);
        Pmtu {
            base,
            max,
            current: base,
            lo: base,
            hi: max + 1,
            searching: max > base,
            base_ok: false,
            probes: Vec::new(),
            next_id: 1,
            next_confirm: Duration::ZERO,
            next_raise: None,
            sent: 0,
            acked: 0,
            black_holes: 0,
        }
    }

    /// The frame size in use.
    pub fn current(&self) -> usize {
        self.current
    }

    /// The configured ceiling.
    pub fn max(&self) -> usize {
        self.max
    }

    /// The size in use once the search has settled (None while searching):
    /// what inner senders are told.
    pub fn settled(&self) -> Option<usize> {
        (!self.searching).then_some(self.current)
    }

    /// Is a frame of `size` bytes known not to get through whole: larger
    /// than the size in use, and either a size that failed or the search
    /// over? (While the search runs, larger frames may well fit.)
    pub fn known_too_big(&self, size: usize) -> bool {
        size > self.current && (size >= self.hi || !self.searching)
    }

    /// Start over on a new path (a new endpoint, a relay), keeping counters.
    pub fn reset(&mut self) {
        let counters = (self.sent, self.acked, self.black_holes, self.next_id);
        *self = Pmtu::new(self.max);
        (self.sent, self.acked, self.black_holes, self.next_id) = counters;
    }

    fn timeout(rtt: Option<Duration>) -> Duration {
        match rtt {
            Some(r) => (r * 2 + Duration::from_millis(10))
                .clamp(Duration::from_millis(30), Duration::from_secs(1)),
            None => Duration::from_millis(300),
        }
    }

    /// The sizes of the next search round (empty: the search is done).
    fn round(&self) -> Vec<usize> {
        let mut v = Vec::with_capacity(PARALLEL);
        if self.hi.saturating_sub(self.lo) <= STEP {
            return v;
        }
        let mut slots = PARALLEL;
        // The base size is assumed, and checked alongside: a path that
        // cannot carry it whole needs telling apart from a narrow one.
        if !self.base_ok && self.hi > self.base {
            v.push(self.base);
        }
        if self.hi > self.max {
            v.push(self.max);
            slots -= 1;
        }
        let top = self.hi.min(self.max);
        for k in 1..=slots {
            let s = (self.lo + (top - self.lo) * k / (slots + 1)) & !3;
            if s > self.lo && s < top && !v.contains(&s) {
                v.push(s);
            }
        }
        v
    }

    fn send(&mut self, now: Duration, size: usize, tries: u32, confirm: bool) -> (u32, usize) {
        let id = self.next_id;
        // Below the bit that marks a capacity train's probes.
        self.next_id = (self.next_id.wrapping_add(1) & !crate::session::TRAIN_ID).max(1);
        self.probes.push(Outstanding {
            id,
            size,
            sent: now,
            tries,
            confirm,
        });
        self.sent += 1;
        (id, size)
    }

    /// Probes to send now go into `out` as (id, frame size). `rtt` is the
    /// path's smoothed RTT if known; `last_rx` when anything last arrived
    /// from the peer; `active` whether data is flowing (confirmations run
    /// only then). Returns a change of the size in use, if any.
    pub fn poll_probe(
        &mut self,
        now: Duration,
        rtt: Option<Duration>,
        last_rx: Duration,
        active: bool,
        out: &mut Vec<(u32, usize)>,
    ) -> Option<Change> {
        let timeout = Self::timeout(rtt);
        let mut change = None;
        let mut i = 0;
        while i < self.probes.len() {
            let p = self.probes[i];
            if now < p.sent + timeout {
                i += 1;
                continue;
            }
            self.probes.swap_remove(i);
            // Unanswered. It counts only if the path answered something else
            // since it went: a path that is down says nothing about size.
            let tries = p.tries + u32::from(last_rx > p.sent);
            if tries < MAX_PROBES {
                out.push(self.send(now, p.size, tries, p.confirm));
                continue;
            }
            if p.size == self.base && !p.confirm {
                change = Some(Change::BaseFails);
                self.hi = self.base;
            } else if p.confirm {
                // The size in use stopped working: shrink at once, search below it.
                change = Some(Change::BlackHole { from: self.current });
                self.current = self.base;
                self.lo = self.base;
                self.hi = p.size;
                self.searching = true;
                self.base_ok = false;
                self.black_holes += 1;
            } else {
                self.hi = self.hi.min(p.size);
            }
        }
        let (lo, hi, base_ok) = (self.lo, self.hi, self.base_ok);
        self.probes
            .retain(|p| p.confirm || (p.size > lo && p.size < hi) || (p.size == lo && !base_ok));
        if !self.probes.is_empty() {
            return change;
        }
        if !self.searching {
            if self.next_raise.is_some_and(|t| now >= t) {
                self.next_raise = None;
                self.hi = self.max + 1;
                self.searching = true;
            } else if active && now >= self.next_confirm && self.current > self.base {
                self.next_confirm = now + CONFIRM_EVERY;
                out.push(self.send(now, self.current, 0, true));
                return change;
            } else {
                return change;
            }
        }
        let sizes = self.round();
        if sizes.is_empty() {
            self.searching = false;
            self.next_confirm = now + CONFIRM_EVERY;
            if self.current < self.max {
                self.next_raise = Some(now + RAISE_AFTER);
            }
        }
        for size in sizes {
            out.push(self.send(now, size, 0, false));
        }
        change
    }

    /// The peer answered probe `id`.
    pub fn on_ack(&mut self, now: Duration, id: u32) -> Option<Change> {
        let i = self.probes.iter().position(|p| p.id == id)?;
        let p = self.probes.swap_remove(i);
        self.acked += 1;
        self.base_ok |= p.size >= self.base;
        if p.confirm {
            self.next_confirm = now + CONFIRM_EVERY;
        }
        if p.size > self.lo {
            self.lo = p.size;
        }
        if self.base_ok {
            let lo = self.lo;
            self.probes.retain(|q| q.confirm || q.size > lo);
        }
        if self.lo > self.current {
            self.current = self.lo;
            return Some(Change::Raised(self.current));
        }
        None
    }

    /// When [`Pmtu::poll_probe`] has something to do next (None: only when
    /// data flows, checked with the session's other timers).
    pub fn poll_timeout(&self, now: Duration, rtt: Option<Duration>) -> Option<Duration> {
        if let Some(t) = self.probes.iter().map(|p| p.sent).min() {
            return Some(t + Self::timeout(rtt));
        }
        if self.searching {
            Some(now)
        } else {
            self.next_raise
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(x: u64) -> Duration {
        Duration::from_millis(x)
    }

    /// Run discovery against a path carrying frames up to `path` bytes,
    /// answering every probe that fits after `rtt`.
    fn discover(max: usize, path: usize) -> (Pmtu, u32, Duration) {
        let mut p = Pmtu::new(max);
        let mut now = ms(0);
        let mut probes = 0;
        let mut inflight: Vec<(u32, usize, Duration)> = Vec::new();
        let mut out = Vec::new();
        for _ in 0..10_000 {
            for &(id, size, at) in &inflight {
                if now >= at && size <= path {
                    p.on_ack(now, id);
                }
            }
            inflight.retain(|x| now < x.2);
            // Other traffic arrives all along.
            out.clear();
            p.poll_probe(now, Some(ms(20)), now, false, &mut out);
            for &(id, size) in &out {
                probes += 1;
                inflight.push((id, size, now + ms(20)));
            }
            if p.settled().is_some() && inflight.is_empty() {
                break;
            }
            now += ms(5);
        }
        (p, probes, now)
    }

    #[test]
    fn a_full_size_path_settles_in_one_round() {
        let (p, probes, _) = discover(1452, 1472);
        assert_eq!(p.settled(), Some(1452));
        // The ceiling, three sizes below it and the base, all in one round.
        assert!(probes <= PARALLEL as u32 + 1, "{probes}");
    }

    #[test]
    fn a_narrow_path_settles_close_below_its_limit() {
        for path in [1252, 1392, 1412, 1440] {
            let (p, _, t) = discover(1452, path);
            let got = p.settled().unwrap();
            assert!(got <= path && got + STEP >= path, "path {path}: {got}");
            // Two or three rounds, each failed size costing MAX_PROBES timeouts of 50 ms.
            assert!(t <= ms(700), "path {path}: {t:?}");
        }
    }

    #[test]
    fn a_path_below_the_base_keeps_the_base() {
        let (p, _, _) = discover(1452, 1000);
        assert_eq!(p.settled(), Some(BASE_FRAME));
    }

    #[test]
    fn a_path_that_cannot_carry_the_base_size_says_so() {
        let mut p = Pmtu::new(1452);
        let mut out = Vec::new();
        let mut changes = Vec::new();
        for i in 0..100 {
            // Small frames arrive all along; no probe is ever answered.
            let now = ms(i * 50);
            changes.extend(p.poll_probe(now, Some(ms(5)), now, false, &mut out));
        }
        assert_eq!(changes, vec![Change::BaseFails]);
        assert_eq!(p.current(), BASE_FRAME);
        assert!(p.known_too_big(BASE_FRAME + 1));
    }

    #[test]
    fn a_silent_path_is_not_taken_as_narrow() {
        let mut p = Pmtu::new(1452);
        // Nothing at all arrives for a long time: the first probe is
        // repeated but never given up on.
        let mut out = Vec::new();
        for i in 0..200 {
            p.poll_probe(ms(i * 100), None, ms(0), false, &mut out);
        }
        assert!(out.len() > 40, "{out:?}");
        // The first round's sizes, again and again; none given up on.
        let first: Vec<usize> = out[..5].iter().map(|x| x.1).collect();
        assert!(out.iter().all(|x| first.contains(&x.1)), "{out:?}");
        assert!(p.settled().is_none());
        assert_eq!(p.current(), BASE_FRAME);
    }

    #[test]
    fn a_black_hole_while_data_flows_shrinks_then_searches_again() {
        let (mut p, _, _) = discover(1452, 1500);
        assert_eq!(p.current(), 1452);
        // The path narrows to 1300; data flows; probes of 1452 die while other frames arrive.
        let mut now = ms(100_000);
        let mut change = None;
        let mut out = Vec::new();
        for _ in 0..1000 {
            out.clear();
            let c = p.poll_probe(now, Some(ms(20)), now, true, &mut out);
            if c.is_some() {
                change = c;
                break;
            }
            assert!(out.iter().all(|x| x.1 == 1452), "{out:?}");
            now += ms(50);
        }
        assert_eq!(change, Some(Change::BlackHole { from: 1452 }));
        assert_eq!(p.current(), BASE_FRAME);
        // The search below resumes and settles under 1300.
        for _ in 0..1000 {
            for &(id, s) in &out {
                if s <= 1300 {
                    p.on_ack(now, id);
                }
            }
            out.clear();
            p.poll_probe(now, Some(ms(20)), now, true, &mut out);
            now += ms(50);
            if p.settled().is_some() && out.is_empty() {
                break;
            }
        }
        let got = p.settled().unwrap();
        assert!(got <= 1300 && got + STEP >= 1300, "{got}");
    }
}
