//! Rate control for a session's KCP traffic: a model-based controller in the
//! spirit of BBR, plus a pacer.
//!
//! KCP's own congestion window either collapses to one segment on every timeout
//! (`nc = false`) or is switched off (`nc = true`) and then overruns a bottleneck,
//! wasting bandwidth on its own retransmissions. fastmesh runs KCP with `nc = true`
//! and puts this controller in front of the socket instead:
//!
//! * The receiver reports, every few tens of milliseconds, how many frames and
//!   bytes it has received and the highest frame counter it has seen
//!   ([`crate::wire::Control`] `Feedback`). From consecutive reports the sender
//!   learns the path's delivery rate and its loss rate (counter gaps).
//! * `btl_bw` is the windowed maximum of the delivery rate; `min_rtt` comes from
//!   pings. Random loss makes the delivery rate look smaller than the path, so
//!   the probing round's gain is divided by `1 - loss`: a lossy but idle path is
//!   still probed upwards, while on a bottleneck the delivered rate (and so the
//!   estimate) can never exceed what the bottleneck passes.
//! * Gains cycle like BBR's: startup doubles the rate each round trip until it
//!   stops growing, a drain phase empties the queue it built, then probe cycles
//!   of 1.25, 0.75, 1, 1, 1, 1, 1, 1.
//! * Every KCP packet that carries data leaves through the [`Pacer`] at
//!   `gain * btl_bw`; the inflight window handed to KCP is `2 * BDP`.

use std::collections::VecDeque;
use std::time::Duration;

const STARTUP_GAIN: f64 = 2.885;
const DRAIN_GAIN: f64 = 0.5;
const CYCLE: [f64; 8] = [1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
const BW_WINDOW_ROUNDS: u32 = 10;
const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);
/// Loss beyond this is not compensated for when probing.
const MAX_LOSS_COMPENSATION: f64 = 0.3;
/// Oldest receiver report the clean-loss estimate uses.
const CLEAN_MAX_AGE: Duration = Duration::from_secs(5);
/// Loss above the path's own that ends startup once delivery stops growing.
const STARTUP_OVERFLOW: f64 = 0.05;
/// The receiver reports at most this often while data arrives.
const REPORT_LAG: Duration = Duration::from_millis(20);
/// Delivery-rate samples the bandwidth filter keeps however old they are.
const MIN_BW_SAMPLES: usize = 25;
/// How long the estimate a path had while a flow filled it is where the
/// next transfer's startup begins (at half of it) after the path sat idle.
const PRIOR_MAX_AGE: Duration = Duration::from_secs(600);
/// A measured capacity raises startup's floor to at most this many times
/// the initial rate.
const CAPACITY_FLOOR_MAX: f64 = 16.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Startup,
    Drain,
    ProbeBw(usize),
}

/// A receiver report: cumulative counts as of when it was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Data frames received.
    pub frames: u64,
    /// Highest data-frame counter seen + 1.
    pub highest: u64,
    /// Wire bytes received (frame lengths).
    pub bytes: u64,
}

/// The rate controller. All inputs carry `now`; nothing here reads a clock.
#[derive(Debug, Clone)]
pub struct RateControl {
    phase: Phase,
    phase_start: Duration,
    reports: VecDeque<(Duration, Report)>,
    bw_samples: VecDeque<(Duration, f64)>,
    btl_bw: f64,
    full_bw: f64,
    full_bw_rounds: u32,
    round_start: Duration,
    min_rtt: Option<(Duration, Duration)>,
    recent_rtt: VecDeque<(Duration, Duration)>,
    loss: f64,
    initial_rate: f64,
    max_rate: f64,
    /// The sender had more to send than the pacer let out (set by the
    /// session with every report).
    backlogged: bool,
    /// Nothing waits for the pacer or the inflight cap: the sender sends
    /// all it has (set by the session with every report).
    app_limited: bool,
    /// Whether the sender had data waiting for the pacer or the window at
    /// any report of the current round. A round without (a connection
    /// waiting for the far side's accept, path MTU probes, a trickle) was
    /// limited by the application, and says nothing about whether startup
    /// found the bottleneck.
    round_limited: bool,
    /// `btl_bw` when the current probe round began.
    probe_base: f64,
    /// Per report while no queue was building: (when, frames expected,
    /// frames received), oldest first, for at most [`CLEAN_MAX_AGE`].
    clean: VecDeque<(Duration, u64, u64)>,
    /// Sums (frames expected, received) over all of `clean`: the longer
    /// count that [`RateControl::message_loss`] bounds.
    clean_long_sums: (u64, u64),
    /// The leading samples of `clean` that `clean_loss` no longer counts
    /// (older than the loss horizon, with newer ones covering 20 frames).
    clean_skip: usize,
    /// Sums over the samples `clean_loss` counts (`clean[clean_skip..]`).
    clean_sums: (u64, u64),
    clean_loss: f64,
    /// The counted samples cover enough frames (20) for `clean_loss` to be a
    /// measurement, not the zero it starts from.
    clean_known: bool,
    /// The last report at which the sender had been pacing above the
    /// estimate with data waiting (startup, a probing round): frames sent
    /// until then may have overrun the bottleneck's queue, so reports that
    /// may still cover them are no evidence of the path's own loss.
    hot_until: Duration,
    /// `app_limited` at the previous report.
    was_app_limited: bool,
    /// Bytes the sender has sent and not yet seen acknowledged (set by the
    /// session with every report).
    inflight: f64,
    /// The bottleneck estimate at the last report that found the sender
    /// with data waiting (the path, not the application, was the limit),
    /// and when.
    busy_bw: Option<(f64, Duration)>,
    /// Startup's pace and window start from at least this rate: the
    /// initial rate, or after an idle spell half of `busy_bw`.
    startup_floor: f64,
}

impl RateControl {
    /// Start at `initial_rate` bytes/s, never exceeding `max_rate`.
    pub fn new(initial_rate: f64, max_rate: f64) -> RateControl {
        RateControl {
            phase: Phase::Startup,
            phase_start: Duration::ZERO,
            reports: VecDeque::new(),
            bw_samples: VecDeque::new(),
            btl_bw: 0.0,
            full_bw: 0.0,
            full_bw_rounds: 0,
            round_start: Duration::ZERO,
            min_rtt: None,
            recent_rtt: VecDeque::new(),
            loss: 0.0,
            initial_rate,
            max_rate,
            backlogged: false,
            app_limited: false,
            round_limited: false,
            probe_base: 0.0,
            clean: VecDeque::new(),
            clean_long_sums: (0, 0),
            clean_skip: 0,
            clean_sums: (0, 0),
            clean_loss: 0.0,
            clean_known: false,
            hot_until: Duration::ZERO,
            was_app_limited: false,
            inflight: 0.0,
            busy_bw: None,
            startup_floor: initial_rate,
        }
    }

    /// Whether the sender is holding data back for the pacer. A probe round
    /// that finds more bandwidth while it is (the estimate, not the path, was
    /// the limit: typically a flow that grew after the controller had settled
    /// at its earlier, smaller rate) sends the controller back to startup, so
    /// it finds the path's rate in a few round trips instead of 25% per
    /// probe cycle; the inner TCP meanwhile sees the tunnel's queue as delay.
    pub fn set_backlogged(&mut self, backlogged: bool) {
        self.backlogged = backlogged;
    }

    /// Bytes sent and not yet acknowledged.
    pub fn set_inflight(&mut self, bytes: f64) {
        self.inflight = bytes;
    }

    /// Whether the sender has nothing waiting for the pacer or the
    /// inflight cap.
    pub fn set_app_limited(&mut self, app_limited: bool) {
        self.app_limited = app_limited;
    }

    /// Phase name, for diagnostics.
    pub fn phase(&self) -> String {
        format!("{:?}", self.phase)
    }

    /// In startup (pacing well above the delivered rate).
    pub fn in_startup(&self) -> bool {
        self.phase == Phase::Startup
    }

    /// Smallest RTT seen in the last 10 s (default 100 ms before any sample).
    pub fn min_rtt(&self) -> Duration {
        self.min_rtt
            .map(|(r, _)| r)
            .unwrap_or(Duration::from_millis(100))
    }

    /// Estimated path loss rate (0..1) from counter gaps.
    pub fn loss(&self) -> f64 {
        self.loss
    }

    /// Estimated bottleneck delivery rate in bytes/s (0 before any report).
    pub fn btl_bw(&self) -> f64 {
        self.btl_bw
    }

    fn round(&self) -> Duration {
        self.min_rtt().max(Duration::from_millis(10))
    }

    /// An RTT sample (from a ping/pong).
    pub fn on_rtt(&mut self, now: Duration, rtt: Duration) {
        match self.min_rtt {
            Some((m, at)) if rtt > m && now.saturating_sub(at) < MIN_RTT_WINDOW => {}
            _ => self.min_rtt = Some((rtt, now)),
        }
        self.recent_rtt.push_back((now, rtt));
        while self.recent_rtt.len() > 4 {
            self.recent_rtt.pop_front();
        }
        // Startup paces at nearly three times the delivered rate: every
        // round trip it stays after the queue began to grow adds twice the
        // path's rate to the bottleneck's queue, until it overflows and the
        // frames waiting in it time out. Leave on the sample that shows
        // the queue, not at the end of the round.
        if self.phase == Phase::Startup && self.queue_building() {
            self.phase = Phase::Drain;
            self.phase_start = now;
        }
    }

    /// Data starts flowing again after the path sat idle: what was learned
    /// while idle says nothing about the bottleneck (only heartbeats were
    /// delivered), so probe for it again from startup instead of growing by
    /// 25% per probe cycle from the idle rate. Loss and RTT estimates stay.
    ///
    /// What the path delivered the last time a flow filled it (within
    /// `PRIOR_MAX_AGE`) is still the best guess of its rate: startup begins
    /// from half of it, a window of one bandwidth-delay product at that
    /// rate, instead of the initial rate. A path that still has that rate
    /// is full from the first round trip; one that lost capacity meanwhile
    /// gets at most what it carried before, for one round trip, and startup's
    /// usual signals (the queue, overflow) end it from there. Without this
    /// every transfer after a pause climbed from the initial rate again
    /// (lab, 50 ms / 100 Mbit/s: half a second to the path's rate).
    pub fn restart_from_idle(&mut self, now: Duration) {
        if matches!(self.phase, Phase::Startup) {
            return;
        }
        self.startup_floor = match self.busy_bw {
            Some((bw, at)) if now.saturating_sub(at) <= PRIOR_MAX_AGE => {
                self.initial_rate.max(bw / 2.0)
            }
            _ => self.initial_rate,
        };
        self.phase = Phase::Startup;
        self.phase_start = now;
        self.round_start = now;
        self.full_bw = 0.0;
        self.full_bw_rounds = 0;
        self.bw_samples.clear();
        self.btl_bw = 0.0;
    }

    /// The path's capacity, bytes/s, measured before any data (see
    /// `session::train`): startup begins from half of it, a window of one
    /// bandwidth-delay product at that capacity, instead of the initial
    /// rate, if it has not measured more itself. Half, because the path
    /// may carry other traffic: a path that has the whole capacity to give
    /// is full from the first round trip, and a shared one gets at most
    /// twice its share for one round trip, after which startup's own
    /// signals (the queue, overflow) take over. At most
    /// `CAPACITY_FLOOR_MAX` times the initial rate: a receiver whose
    /// clock stamps a train's answers too close together would otherwise
    /// make the first round a burst far beyond any path.
    pub fn on_capacity_estimate(&mut self, rate: f64) {
        if self.phase != Phase::Startup || !rate.is_finite() {
            return;
        }
        let floor = (rate / 2.0)
            .min(self.initial_rate * CAPACITY_FLOOR_MAX)
            .min(self.max_rate);
        self.startup_floor = self.startup_floor.max(floor);
    }

    /// The sender sent a burst outside the pacer at `now` (a capacity
    /// train): reports that may still cover it are no evidence of the
    /// path's own loss, as after a round paced above the estimate. Its
    /// large frames may overflow a shallow queue, or arrive behind the
    /// small frames sent after them and leave a gap in one report that the
    /// next fills (simulated jitter: a sparse session's ten reordered probe
    /// frames read as 24-42% loss and moved its path to the relay).
    pub fn on_burst(&mut self, now: Duration) {
        self.hot_until = self.hot_until.max(now);
    }

    /// A receiver report arrived at `now`.
    pub fn on_report(&mut self, now: Duration, r: Report) {
        self.round_limited |= !self.app_limited;
        if let Some(&(_, last)) = self.reports.back() {
            if last.frames >= 64 && r.highest < last.highest / 2 && r.frames < last.frames / 2 {
                // Far behind: the receiver counts under new session keys
                // (a rotation). Start the report history over; the
                // bandwidth and RTT estimates stay.
                self.reports.clear();
                self.clean.clear();
                self.clean_long_sums = (0, 0);
                self.clean_skip = 0;
                self.clean_sums = (0, 0);
                self.reports.push_back((now, r));
                return;
            }
            if r.highest < last.highest || r.frames < last.frames {
                return; // stale or reordered report
            }
        }
        // The phase in force since the previous report, which frames that
        // this report covers were paced under.
        let hot = match self.phase {
            Phase::Startup => true,
            Phase::ProbeBw(i) => CYCLE[i] > 1.0,
            Phase::Drain => false,
        };
        // A sender that had nothing waiting (messages, a trickle) did not
        // pace above the path whatever the phase; one whose backlog just
        // ran out (the end of a transfer) still has the last round's
        // frames on the way.
        let limited = self.app_limited && self.was_app_limited;
        self.was_app_limited = self.app_limited;
        if hot && !limited {
            self.hot_until = now;
        }
        if let Some(&(last_t, last)) = self.reports.back() {
            // Frames received after the previous report left the sender
            // at least a round trip before it, and the receiver reports
            // up to 20 ms late: only then are they surely not overflow.
            let cool = last_t >= self.hot_until + self.min_rtt() + REPORT_LAG;
            if cool && self.queue_quiet() {
                // Not capped at `dh`: frames that arrive after a later
                // one (reordered, a burst of large frames behind small
                // ones) leave a gap in one report and fill it in the next;
                // capped, the gap stayed as loss (a sparse session's ten
                // reordered probe frames read as 34-42% loss and moved
                // its path to the relay).
                let dh = r.highest.saturating_sub(last.highest);
                let df = r.frames.saturating_sub(last.frames);
                self.clean.push_back((now, dh, df));
                self.clean_long_sums.0 += dh;
                self.clean_long_sums.1 += df;
                self.clean_sums.0 += dh;
                self.clean_sums.1 += df;
            }
        }
        self.reports.push_back((now, r));
        // Loss over a longer horizon (8 rounds) for stability.
        let horizon = self.round() * 8;
        while self.reports.len() > 2 && now.saturating_sub(self.reports[1].0) > horizon {
            self.reports.pop_front();
        }
        let (t0, r0) = self.reports[0];
        let dh = r.highest.saturating_sub(r0.highest);
        if dh >= 20 {
            let df = r.frames.saturating_sub(r0.frames).min(dh);
            self.loss = (1.0 - df as f64 / dh as f64).clamp(0.0, 0.5);
        }
        // Samples older than the horizon leave the clean estimate once the
        // newer ones cover 20 frames (a sender stalled by loss sends few,
        // and its loss must still show; `message_loss` keeps counting
        // them); none is kept past CLEAN_MAX_AGE, so an old estimate (a
        // path cut at the start, a queue ever since) does not stick.
        while let Some(&(t, h0, f0)) = self.clean.front() {
            if now.saturating_sub(t) <= CLEAN_MAX_AGE {
                break;
            }
            self.clean.pop_front();
            self.clean_long_sums.0 -= h0;
            self.clean_long_sums.1 -= f0;
            if self.clean_skip > 0 {
                self.clean_skip -= 1;
            } else {
                self.clean_sums.0 -= h0;
                self.clean_sums.1 -= f0;
            }
        }
        while let Some(&(t, h0, f0)) = self.clean.get(self.clean_skip) {
            if now.saturating_sub(t) > horizon && self.clean_sums.0 - h0 >= 20 {
                self.clean_skip += 1;
                self.clean_sums.0 -= h0;
                self.clean_sums.1 -= f0;
            } else {
                break;
            }
        }
        let (dh, df) = self.clean_sums;
        if dh >= 20 {
            self.clean_loss = (1.0 - df as f64 / dh as f64).clamp(0.0, 0.5);
            self.clean_known = true;
        } else if self.clean.len() == self.clean_skip {
            self.clean_loss = 0.0;
            self.clean_known = false;
        }
        // Delivery rate over about one round.
        let span = if self.phase == Phase::Startup {
            self.round() / 2
        } else {
            self.round()
        };
        let span_start = self
            .reports
            .iter()
            .rev()
            .find(|(t, _)| now.saturating_sub(*t) >= span)
            .copied()
            .unwrap_or((t0, r0));
        let dt = now.saturating_sub(span_start.0);
        if dt.is_zero() {
            return;
        }
        let rate = r.bytes.saturating_sub(span_start.1.bytes) as f64 / dt.as_secs_f64();
        self.bw_samples.push_back((now, rate));
        let keep = self.round() * BW_WINDOW_ROUNDS;
        while let Some(&(t, _)) = self.bw_samples.front() {
            // Age alone does not expire the newest samples: after a stall
            // (KCP's window held by one lost segment, no reports meanwhile)
            // the first report would otherwise be the whole filter, and
            // what a stalled sender delivered says nothing about the path.
            if now.saturating_sub(t) > keep && self.bw_samples.len() > MIN_BW_SAMPLES {
                self.bw_samples.pop_front();
            } else {
                break;
            }
        }
        self.btl_bw = self
            .bw_samples
            .iter()
            .map(|(_, r)| *r)
            .fold(0.0, f64::max)
            .min(self.max_rate);
        if !self.app_limited {
            self.busy_bw = Some((self.btl_bw, now));
        }
        self.advance(now);
    }

    fn advance(&mut self, now: Duration) {
        // Drain ends as soon as what is in flight fits the path (one BDP of
        // what it sends, loss included): the sender's own count, with no
        // round trip of lag. Waiting for a ping to show the empty queue
        // kept the pacer at the drain gain a round trip or two after the
        // queue was gone (lab, 50 ms / 100 Mbit/s: 150-200 ms at half
        // the path's rate).
        let bdp = self.btl_bw * self.min_rtt().as_secs_f64()
            / (1.0 - self.loss.min(MAX_LOSS_COMPENSATION));
        if self.phase == Phase::Drain && self.inflight <= bdp {
            self.phase = Phase::ProbeBw(2);
            self.phase_start = now;
            self.round_start = now;
            self.probe_base = self.btl_bw;
            return;
        }
        if now.saturating_sub(self.round_start) < self.round() {
            return;
        }
        tracing::trace!(phase = ?self.phase, btl_bw = self.btl_bw, backlogged = self.backlogged, loss = self.loss, clean_loss = self.clean_loss, min_rtt = ?self.min_rtt(), recent = ?self.recent_rtt.iter().map(|r| r.1).collect::<Vec<_>>(), "cc round");
        self.round_start = now;
        let app_limited = !std::mem::take(&mut self.round_limited);
        match self.phase {
            Phase::Startup if self.queue_building() => {
                // The queue grows: the rate passed the bottleneck's (an
                // earlier signal than the delivered rate levelling off,
                // which comes only after the queue overflowed).
                self.phase = Phase::Drain;
                self.phase_start = now;
            }
            Phase::Startup => {
                if self.btl_bw >= self.full_bw * 1.25 {
                    self.full_bw = self.btl_bw;
                    self.full_bw_rounds = 0;
                } else if app_limited && self.btl_bw < self.startup_floor {
                    // The sender had nothing waiting and no flow has begun
                    // (a connection being opened, path MTU probes): the
                    // rate did not grow because nothing asked it to. Once
                    // a flow runs, rounds it leaves unfilled count as
                    // before: an inner TCP that paces itself below the
                    // startup gain must not keep the tunnel's pacer at it.
                } else {
                    self.full_bw_rounds += 1;
                    // Delivery stopped growing while frames go missing at
                    // more than the path's own loss rate: the bottleneck's
                    // queue is overflowing, and every further round at the
                    // startup gain only overflows it more. On a short path
                    // with a shallow queue the round trip never shows the
                    // queue (it overflows first), so without this startup
                    // ran its three rounds at nearly three times the
                    // path's rate (a 1 Gbit/s link with a 2 ms queue:
                    // 7,800 retransmissions in 60 ms).
                    let overflowing = self.loss > self.clean_loss + STARTUP_OVERFLOW;
                    if self.full_bw_rounds >= 3 || overflowing {
                        self.phase = Phase::Drain;
                        self.phase_start = now;
                    }
                }
            }
            Phase::Drain => {
                let drained = !self.queue_building();
                let long = now.saturating_sub(self.phase_start) >= self.round() * 3;
                if (drained && now.saturating_sub(self.phase_start) >= self.round()) || long {
                    self.phase = Phase::ProbeBw(2);
                    self.phase_start = now;
                    self.probe_base = self.btl_bw;
                }
            }
            Phase::ProbeBw(i) => {
                // What the probing round delivered is reported about a
                // round trip later: judge it at the end of the next round.
                let after_probe = CYCLE[(i + CYCLE.len() - 1) % CYCLE.len()] > 1.0;
                let probed_up = after_probe && self.btl_bw >= self.probe_base * 1.15;
                if probed_up && self.backlogged {
                    self.phase = Phase::Startup;
                    self.full_bw = self.btl_bw;
                    self.full_bw_rounds = 0;
                } else {
                    let next = (i + 1) % CYCLE.len();
                    if CYCLE[next] > 1.0 {
                        self.probe_base = self.btl_bw;
                    }
                    self.phase = Phase::ProbeBw(next);
                }
                self.phase_start = now;
            }
        }
    }

    fn gain(&self) -> f64 {
        match self.phase {
            Phase::Startup => STARTUP_GAIN,
            // Startup leaves as the queue starts to grow, so the queue to
            // drain is at most one BDP: half the rate empties it within two
            // round trips, and drain ends as soon as the sender's own
            // count of what is in flight fits the path (`advance`), so
            // frames KCP already sent do not wait long behind the pacer.
            Phase::Drain => DRAIN_GAIN,
            // The probing round sends enough that, after random loss, the
            // delivered rate can still exceed the estimate by 25%. Delivery
            // can never exceed the bottleneck, so this cannot inflate the
            // estimate past it; the cruising rounds then pace at the estimate.
            Phase::ProbeBw(i) if CYCLE[i] > 1.0 => {
                CYCLE[i] / (1.0 - self.clean_loss.min(MAX_LOSS_COMPENSATION))
            }
            // Cruising: the delivered rate is what survives the path's
            // random loss, so pacing at it would leave that share of the
            // path unused. Send that much more while no queue builds. Only
            // loss seen while the queue was short counts (`clean_loss`):
            // a bottleneck's overflow comes with a full queue, and paying
            // it back would only overflow it more.
            Phase::ProbeBw(i) if CYCLE[i] == 1.0 && !self.queue_building() => {
                1.0 / (1.0 - self.clean_loss.min(MAX_LOSS_COMPENSATION))
            }
            Phase::ProbeBw(i) => CYCLE[i],
        }
    }

    /// Do the recent round trips (the least of the last few pings) exceed
    /// the minimum by more than a quarter of it (at least 5 ms, at most 30)?
    fn queue_building(&self) -> bool {
        let n = if self.phase == Phase::Startup { 2 } else { 4 };
        let Some(recent) = self.recent_rtt.iter().rev().take(n).map(|(_, r)| *r).min() else {
            return false;
        };
        let m = self.min_rtt();
        let slack = (m / 4).clamp(Duration::from_millis(5), Duration::from_millis(30));
        recent > m + slack
    }

    /// Were all the recent round trips within the slack of the minimum
    /// (no queue at any time lately)?
    fn queue_quiet(&self) -> bool {
        let m = self.min_rtt();
        let slack = (m / 4).clamp(Duration::from_millis(5), Duration::from_millis(30));
        self.recent_rtt.iter().all(|(_, r)| *r <= m + slack)
    }

    /// Loss counted only over reports that came while the recent round
    /// trips showed no queue: the path's own (random) loss, not a
    /// bottleneck's overflow (see `gain`; FEC and ack copies use it too).
    pub fn clean_loss(&self) -> f64 {
        self.clean_loss
    }

    /// The loss to plan a message's copies for: the higher of
    /// [`RateControl::clean_loss`] and an upper bound (Wilson score, one
    /// standard deviation) of the loss over every clean sample of the
    /// last [`CLEAN_MAX_AGE`], when those lost any. A sparse session's
    /// clean estimate counts a few dozen frames (8 round trips of
    /// messages and acks); at 5% loss it read below 3% about a quarter of
    /// the time, a message then went as two copies instead of three, and
    /// about once per 300 messages both were lost: that message and the
    /// three behind it waited for the retransmission (lab, 50 ms / 5%:
    /// 121, 101, 81, 61 ms, the p99 of a 6-s message run).
    pub fn message_loss(&self) -> f64 {
        let (dh, df) = self.clean_long_sums;
        if df >= dh {
            // Nothing lost (or nothing counted): no bound to raise, so a
            // clean path's sparse session sends its messages once.
            return self.clean_loss;
        }
        let n = dh as f64;
        let p = (1.0 - df as f64 / n).clamp(0.0, 0.5);
        let upper = (p + 0.5 / n + (p * (1.0 - p) / n + 0.25 / (n * n)).sqrt()) / (1.0 + 1.0 / n);
        upper.max(self.clean_loss).min(0.5)
    }

    /// Whether [`RateControl::clean_loss`] is a measurement: false until
    /// reports have covered 20 frames sent while no queue showed (a new
    /// session), and again once those samples aged out (an idle path).
    pub fn clean_loss_known(&self) -> bool {
        self.clean_known
    }

    /// The rate pacing and the in-flight cap start from: the bottleneck
    /// estimate, and in startup never less than where startup began (the
    /// initial rate, or half the rate before an idle spell). A
    /// transfer's first samples come while it is still being opened (a
    /// few frames of handshake, an inner TCP not yet at speed); taken as
    /// the path's rate they cut startup's pace and window below where it
    /// began, and it climbed back at about 1.5x per round trip (simulated
    /// 50 ms / 100 Mbit/s path: full rate 0.40 s after the transfer's first
    /// frame; 0.28 s without the cut).
    fn base_rate(&self) -> f64 {
        match self.phase {
            Phase::Startup => self.btl_bw.max(self.startup_floor),
            _ if self.btl_bw > 0.0 => self.btl_bw,
            _ => self.initial_rate,
        }
    }

    /// Pacing rate for KCP data in bytes/s.
    pub fn pacing_rate(&self) -> f64 {
        (self.base_rate() * self.gain()).clamp(16_000.0, self.max_rate * 1.25)
    }

    /// Bytes allowed in flight: twice the bandwidth-delay product (with startup headroom).
    pub fn inflight_cap(&self) -> f64 {
        let base = self.base_rate();
        // Startup paces at 2.9x but keeps the window at 2 BDP, so its
        // overshoot cannot exceed a bottleneck queue of one BDP.
        let gain = 2.0;
        let loss = if self.phase == Phase::Startup {
            // Startup's loss is mostly its own overflow: do not feed it.
            0.0
        } else {
            self.loss.min(MAX_LOSS_COMPENSATION)
        };
        base * gain * self.min_rtt().as_secs_f64().max(0.01) / (1.0 - loss)
    }
}

/// Releases packets no faster than a rate, allowing a small burst.
#[derive(Debug, Clone)]
pub struct Pacer {
    next: Duration,
    burst: Duration,
}

impl Default for Pacer {
    fn default() -> Self {
        Pacer {
            next: Duration::ZERO,
            burst: Duration::from_millis(2),
        }
    }
}

impl Pacer {
    /// When the next packet may go (`<= now` means now).
    pub fn next_send(&self) -> Duration {
        self.next
    }

    /// May a packet go at `now`?
    pub fn ready(&self, now: Duration) -> bool {
        self.next <= now
    }

    /// Bytes that may go at `now` under `rate` bytes/s (the burst allowance included).
    pub fn budget(&self, now: Duration, rate: f64) -> f64 {
        let earliest = self.next.saturating_sub(self.burst);
        now.saturating_sub(earliest).min(self.burst).as_secs_f64() * rate
    }

    /// A packet of `bytes` went at `now` under `rate` bytes/s.
    pub fn on_send(&mut self, now: Duration, bytes: usize, rate: f64) {
        let base = self.next.max(now.saturating_sub(self.burst));
        self.next = base + Duration::from_secs_f64(bytes as f64 / rate.max(1.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(x: u64) -> Duration {
        Duration::from_millis(x)
    }

    /// A controller with a first RTT sample of `rtt_ms`, and an empty report.
    fn fresh(rtt_ms: u64) -> (RateControl, Report) {
        let mut c = RateControl::new(100_000.0, 1e9);
        c.on_rtt(ms(0), ms(rtt_ms));
        // The path, not the application, limits the sender unless a test
        // says otherwise.
        c.set_backlogged(true);
        let r = Report {
            frames: 0,
            highest: 0,
            bytes: 0,
        };
        (c, r)
    }

    #[test]
    fn pacer_spaces_packets() {
        let mut p = Pacer::default();
        let now = ms(100);
        let mut sent = 0;
        let mut t = now;
        // 1 MB/s, 1000-byte packets: 1 ms apart after a 2 ms burst allowance.
        while t < ms(110) {
            if p.ready(t) {
                p.on_send(t, 1000, 1_000_000.0);
                sent += 1;
            } else {
                t = p.next_send();
            }
        }
        assert!((11..=13).contains(&sent), "{sent}");
    }

    #[test]
    fn the_first_slow_samples_do_not_cut_startup_below_where_it_began() {
        // A transfer being opened: 20 kB/s delivered over the first
        // round trips (a handshake's worth), far below the initial rate.
        let (mut c, mut r) = fresh(50);
        let (pace0, cap0) = (c.pacing_rate(), c.inflight_cap());
        for i in 1..=6u64 {
            r.frames += 1;
            r.highest += 1;
            r.bytes += 400;
            c.on_report(ms(i * 20), r);
        }
        assert_eq!(c.phase, Phase::Startup);
        assert!(c.btl_bw() < 100_000.0 / 2.0, "{}", c.btl_bw());
        assert!(c.pacing_rate() >= pace0, "{} < {pace0}", c.pacing_rate());
        assert!(c.inflight_cap() >= cap0, "{} < {cap0}", c.inflight_cap());
        // Once delivery passes the initial rate, startup follows it.
        for i in 7..=30u64 {
            r.frames += 100;
            r.highest += 100;
            r.bytes += 100_000;
            c.on_report(ms(i * 20), r);
        }
        assert!(c.btl_bw() > 1_000_000.0, "{}", c.btl_bw());
        assert!(c.phase != Phase::Startup || c.pacing_rate() > STARTUP_GAIN * 1_000_000.0 * 0.99);
    }

    #[test]
    fn learns_rate_and_loss_from_reports() {
        // 1 MB/s delivered, 10% of frames missing.
        let (mut c, mut r) = fresh(50);
        for i in 1..=100u64 {
            r.frames += 90;
            r.highest += 100;
            r.bytes += 25_000;
            c.on_report(ms(i * 25), r);
        }
        assert!((c.loss() - 0.1).abs() < 0.01, "{}", c.loss());
        assert!(
            (c.btl_bw() - 1_000_000.0).abs() < 30_000.0,
            "{}",
            c.btl_bw()
        );
        // The inflight cap covers the path's bandwidth-delay product
        // (1 MB/s x 50 ms = 50 kB) with its gain and loss compensation, and
        // not grossly more.
        let bdp = 1_000_000.0 * 0.050;
        let cap = c.inflight_cap();
        assert!(cap >= 2.0 * bdp / 0.9 * 0.95, "{cap}");
        assert!(cap <= STARTUP_GAIN * bdp / 0.9 * 1.05, "{cap}");
    }

    #[test]
    fn pacing_never_far_above_what_the_path_delivered() {
        let (mut c, mut r) = fresh(50);
        for i in 1..=400u64 {
            r.frames += 90;
            r.highest += 100;
            r.bytes += 25_000;
            c.on_report(ms(i * 25), r);
            if i > 100 {
                // At most the loss-compensated probing gain above the delivered 1 MB/s.
                assert!(
                    c.pacing_rate() <= 1_000_000.0 * 1.25 / 0.9 + 1.0,
                    "{}",
                    c.pacing_rate()
                );
            }
        }
    }

    /// Reports for `rounds` rounds of 50 ms delivering `rate` bytes/s.
    fn deliver(c: &mut RateControl, r: &mut Report, t: &mut u64, rounds: u64, rate: f64) {
        for _ in 0..rounds * 2 {
            *t += 25;
            r.frames += 10;
            r.highest += 10;
            r.bytes += (rate * 0.025) as u64;
            c.on_report(ms(*t), *r);
        }
    }

    /// One 50-ms round over a path of `path` bytes/s that loses `random`
    /// of what it carries and drops (overflow) whatever exceeds its rate;
    /// 1000-byte frames, two reports per round. Returns whether the
    /// pacer sent more than the path carries.
    fn round_over(
        c: &mut RateControl,
        r: &mut Report,
        t: &mut u64,
        path: f64,
        random: f64,
    ) -> bool {
        let send = c.pacing_rate();
        for _ in 0..2 {
            *t += 25;
            let sent = (send * 0.025 / 1000.0).round().max(1.0) as u64;
            let carried = (send.min(path) * 0.025 / 1000.0) as u64;
            let got = (carried as f64 * (1.0 - random)).round() as u64;
            r.highest += sent;
            r.frames += got;
            r.bytes += got * 1000;
            c.on_report(ms(*t), *r);
        }
        send > path
    }

    #[test]
    fn startup_ends_at_the_first_flat_round_that_overflows() {
        // No queue ever shows in the round trips (a shallow queue
        // overflows first): only the loss tells.
        let (mut c, mut r) = fresh(50);
        let mut t = 0;
        let mut over = 0;
        for _ in 0..60 {
            if c.phase() != "Startup" {
                break;
            }
            over += round_over(&mut c, &mut r, &mut t, 1_000_000.0, 0.0) as u32;
        }
        assert_ne!(c.phase(), "Startup");
        // Growth stops at the first overflowing round; the next one shows
        // the loss with flat delivery (without the loss signal: three
        // flat rounds at the startup gain).
        assert!(over <= 2, "{over} rounds above the path's rate");
        // What startup overflowed is not the path's own loss: no parity,
        // no compensation for it while cruising.
        for _ in 0..20 {
            round_over(&mut c, &mut r, &mut t, 1_000_000.0, 0.0);
        }
        assert_eq!(c.clean_loss(), 0.0);
        assert!(c.btl_bw() > 950_000.0, "{}", c.btl_bw());
    }

    #[test]
    fn drain_ends_once_what_is_in_flight_fits_the_path() {
        // 1 MB/s x 50 ms: one BDP is 50 kB.
        let (mut c, mut r) = fresh(50);
        let mut t = 0;
        c.set_inflight(100_000.0);
        deliver(&mut c, &mut r, &mut t, 2, 1_000_000.0);
        assert_eq!(c.phase(), "Startup");
        // The pings show a queue: startup ends.
        for _ in 0..4 {
            t += 5;
            c.on_rtt(ms(t), ms(80));
        }
        assert_eq!(c.phase(), "Drain");
        // Two BDP still in flight: the queue is there, drain goes on.
        deliver(&mut c, &mut r, &mut t, 1, 1_000_000.0);
        assert_eq!(c.phase(), "Drain");
        // What is in flight fits the path: the next report ends drain,
        // though the pings (a round trip old) still show the queue.
        c.set_inflight(45_000.0);
        t += 25;
        r.frames += 10;
        r.highest += 10;
        r.bytes += 25_000;
        c.on_report(ms(t), r);
        assert!(c.phase().starts_with("ProbeBw"), "{}", c.phase());
        assert!(c.pacing_rate() >= c.btl_bw() * 0.99, "{}", c.pacing_rate());
    }

    #[test]
    fn random_loss_neither_ends_startup_nor_hides_from_the_clean_estimate() {
        let (mut c, mut r) = fresh(50);
        let mut t = 0;
        for _ in 0..60 {
            if c.phase() != "Startup" {
                break;
            }
            round_over(&mut c, &mut r, &mut t, 1_000_000.0, 0.1);
        }
        // Startup went on until the path's rate (90% of it delivered).
        assert!(c.btl_bw() > 850_000.0, "{}", c.btl_bw());
        for _ in 0..40 {
            round_over(&mut c, &mut r, &mut t, 1_000_000.0, 0.1);
        }
        assert!((c.clean_loss() - 0.1).abs() < 0.03, "{}", c.clean_loss());
    }

    #[test]
    fn a_transfer_after_an_idle_spell_starts_from_half_the_rate_the_path_had() {
        for idle_s in [2u64, 1_000] {
            let (mut c, mut r) = fresh(50);
            let mut t = 0;
            // A transfer fills the path at 1 MB/s, then the path sits idle.
            deliver(&mut c, &mut r, &mut t, 40, 1_000_000.0);
            assert!(c.phase().starts_with("ProbeBw"), "{}", c.phase());
            c.set_app_limited(true);
            c.set_backlogged(false);
            t += idle_s * 1_000;
            c.restart_from_idle(ms(t));
            assert!(c.in_startup());
            let bdp = 1_000_000.0 * 0.050;
            if idle_s <= PRIOR_MAX_AGE.as_secs() {
                // A window of one BDP at the old rate, paced at the
                // startup gain over half of it.
                assert!(c.inflight_cap() >= bdp * 0.99, "{}", c.inflight_cap());
                assert!(c.inflight_cap() <= bdp * 1.01, "{}", c.inflight_cap());
                assert!(c.pacing_rate() >= STARTUP_GAIN * 500_000.0 * 0.99);
            } else {
                // Too old to go by: the initial rate (100 kB/s here).
                assert!(c.inflight_cap() <= 2.0 * 100_000.0 * 0.050 * 1.01);
            }
        }
    }

    #[test]
    fn a_backlogged_sender_whose_probe_finds_more_returns_to_startup() {
        for backlogged in [true, false] {
            let (mut c, mut r) = fresh(50);
            let mut t = 0;
            // Settle at 1 MB/s (startup ends when growth stops).
            deliver(&mut c, &mut r, &mut t, 40, 1_000_000.0);
            assert!(c.phase().starts_with("ProbeBw"), "{}", c.phase());
            c.set_backlogged(backlogged);
            // The flow grows: every round delivers what the pacer allowed.
            let mut entered = false;
            for _ in 0..40 {
                let rate = c.pacing_rate();
                deliver(&mut c, &mut r, &mut t, 1, rate);
                entered |= c.phase() == "Startup";
            }
            assert_eq!(
                entered,
                backlogged,
                "backlogged {backlogged}: {}",
                c.phase()
            );
        }
    }

    #[test]
    fn startup_does_not_end_while_the_application_is_the_limit() {
        let (mut c, mut r) = fresh(50);
        c.set_app_limited(true);
        let mut t = 0;
        // A connection being opened: nothing waits to be sent, so flat
        // delivery (below the initial rate) says nothing about the path.
        deliver(&mut c, &mut r, &mut t, 20, 2_000.0);
        assert_eq!(c.phase(), "Startup");
        // The bulk arrives: startup grows from where it is and ends only
        // once the (now busy) delivery stops growing.
        c.set_app_limited(false);
        let mut rounds = 0;
        while c.phase() == "Startup" && rounds < 40 {
            let rate = c.pacing_rate().min(1_000_000.0);
            deliver(&mut c, &mut r, &mut t, 1, rate);
            rounds += 1;
        }
        assert!(c.phase() != "Startup", "{}", c.phase());
        assert!(c.btl_bw() > 900_000.0, "{}", c.btl_bw());
    }

    #[test]
    fn a_sparse_sessions_messages_are_planned_for_the_loss_it_has() {
        use crate::session::fec::parity_for;
        use rand::{Rng, SeedableRng};
        // Messages and their acks: 5 frames per 20-ms report, each lost
        // with chance 5%, for 20 s. Three copies of a message (two parity)
        // are what 5% needs; two copies lose one message in 400.
        for seed in 1..=3u64 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let (mut c, mut r) = fresh(50);
            c.set_backlogged(false);
            c.set_app_limited(true);
            let (mut short, mut planned, mut reports) = (0, 0, 0);
            for i in 1..=1_000u64 {
                for _ in 0..5 {
                    r.highest += 1;
                    r.frames += u64::from(rng.random::<f64>() >= 0.05);
                }
                c.on_report(ms(i * 20), r);
                if i > 100 {
                    reports += 1;
                    short += usize::from(parity_for(1, c.clean_loss()) < 2);
                    planned += usize::from(parity_for(1, c.message_loss()) >= 2);
                }
            }
            // The clean estimate alone (a few dozen frames) falls short
            // often: what this bound is for.
            assert!(short * 10 > reports, "seed {seed}: {short} of {reports}");
            assert!(
                planned * 1000 >= reports * 998,
                "seed {seed}: {planned} of {reports}"
            );
        }
        // Nothing lost: no bound, messages go once.
        let (mut c, mut r) = fresh(50);
        for i in 1..=100u64 {
            r.highest += 5;
            r.frames += 5;
            c.on_report(ms(i * 20), r);
        }
        assert_eq!(c.message_loss(), 0.0);
    }

    #[test]
    fn an_old_clean_loss_estimate_does_not_stick() {
        let (mut c, mut r) = fresh(20);
        // Half the frames lost while the path shows no queue.
        for i in 1..=10u64 {
            r.frames += 5;
            r.highest += 10;
            r.bytes += 5_000;
            c.on_report(ms(i * 20), r);
        }
        assert!(c.clean_loss() > 0.4, "{}", c.clean_loss());
        // Then a queue for a long time (no clean samples), nothing lost.
        for i in 11..=400u64 {
            c.on_rtt(ms(i * 20), ms(80));
            r.frames += 10;
            r.highest += 10;
            r.bytes += 10_000;
            c.on_report(ms(i * 20), r);
        }
        assert_eq!(c.clean_loss(), 0.0);
    }

    #[test]
    fn a_sender_stalled_by_loss_still_shows_it() {
        let (mut c, mut r) = fresh(5);
        // A few frames per report, nearly all lost, for 10 s: far fewer
        // than 20 frames per horizon, but the estimate must not fade.
        for i in 1..=100u64 {
            r.highest += 2;
            if i % 10 == 0 {
                r.frames += 1;
                r.bytes += 100;
            }
            c.on_report(ms(i * 100), r);
        }
        assert!(c.clean_loss() > 0.4, "{}", c.clean_loss());
    }

    #[test]
    fn reports_counted_under_new_keys_are_followed() {
        let (mut c, mut r) = fresh(50);
        let mut t = 0;
        deliver(&mut c, &mut r, &mut t, 40, 1_000_000.0);
        let before = c.btl_bw();
        assert!((before - 1_000_000.0).abs() < 50_000.0, "{before}");
        // Key rotation: the receiver's counters start again from zero, and
        // the path now delivers twice as much.
        r = Report {
            frames: 0,
            highest: 0,
            bytes: 0,
        };
        c.restart_from_idle(ms(t));
        deliver(&mut c, &mut r, &mut t, 40, 2_000_000.0);
        assert!(c.btl_bw() > 1_800_000.0, "{}", c.btl_bw());
    }
}
