//! The path's capacity, measured before the first transfer: a short train
//! of full-size probes sent back to back.
//!
//! A new session's rate controller knows the round trip (pings) but not the
//! path's rate, so its first transfer starts from a fixed initial rate and
//! doubles about once per round trip: on a 50 ms / 100 Mbit/s path it
//! reached the path's rate about 0.3 s after the first frame, and at 5%
//! loss that start was most of what an 8-s transfer fell short of the
//! path's steady rate by. The bottleneck spaces packets that reach it
//! together by its own rate, and the far side answers each path-MTU probe
//! at once with a small [`Control::MtuAck`], so the answers come back
//! spaced as the probes left the bottleneck (packet-pair dispersion, as
//! pathrate and TCP Westwood use it). Once per session, when the path MTU
//! has settled on a direct path and no data has flowed yet, the session
//! sends [`TRAIN_LEN`] probes of the settled size (ordinary
//! [`crate::wire::Inner::MtuProbe`] frames, so any peer answers them);
//! their answers give an estimate that startup begins from (at half of it,
//! see [`crate::cc::RateControl::on_capacity_estimate`]).
//!
//! What can go wrong and what guards it: a receiver that reads several
//! probes in one batch stamps them alike, so the estimate starts after the
//! first batch and needs three distinct arrival times; a lost probe or
//! answer leaves a gap the indices account for. A train whose answers give
//! no estimate is tried again [`RETRY_AFTER`] later, at most [`TRAINS`]
//! in all: in the lab (2 cores, both peers sending their trains at once)
//! one train in about six had its ten answers read in one batch (the node
//! busy with the other side's probes, or not scheduled, for the 1.2 ms
//! they took to arrive), and a second try does not meet the same moment.
//! On a path too fast to tell the probes apart every try fails; the
//! session then starts from the initial rate as before, having spent
//! [`TRAINS`] trains (about 45 kB) once.
//!
//! [`Control::MtuAck`]: crate::wire::Control::MtuAck

use std::time::Duration;

/// Probes per train: about TCP's initial window of ten segments.
pub const TRAIN_LEN: u32 = 10;
/// Train probe ids have this bit set; path-MTU search ids never do.
pub const TRAIN_ID: u32 = 0x8000_0000;
/// How long after a train its answers are waited for, at least.
const WAIT_MIN: Duration = Duration::from_millis(200);
/// Trains per session at most, while none gives an estimate.
pub const TRAINS: u32 = 3;
/// A train that gave no estimate is tried again this long after its wait.
pub const RETRY_AFTER: Duration = Duration::from_millis(300);
/// Bits of a train probe's id below the train's number (its index).
const INDEX_BITS: u32 = 16;

/// One session's train.
#[derive(Debug, Default)]
pub struct Train {
    /// Trains sent.
    sent: u32,
    /// When the next may go (after a train that gave no estimate).
    next_at: Duration,
    /// When the outstanding train went, and its probes' size.
    out: Option<(Duration, usize)>,
    /// (index, arrival) of the outstanding train's answers.
    acks: Vec<(u32, Duration)>,
    /// The estimate, bytes/s (of frames), once one was made.
    estimate: Option<f64>,
}

impl Train {
    /// Is `id` a train probe's?
    pub fn is_train_id(id: u32) -> bool {
        id & TRAIN_ID != 0
    }

    /// Probes sent.
    pub fn probes(&self) -> u64 {
        u64::from(self.sent * TRAIN_LEN)
    }

    /// The estimate, once made.
    pub fn estimate(&self) -> Option<f64> {
        self.estimate
    }

    /// When a train is to go: none is out, none gave an estimate yet, and
    /// fewer than [`TRAINS`] went (the caller checks the session's own
    /// conditions: a settled MTU, a direct path, no data yet).
    pub fn due_at(&self) -> Option<Duration> {
        let done = self.estimate.is_some() || self.sent >= TRAINS;
        (!done && self.out.is_none()).then_some(self.next_at)
    }

    /// When the outstanding train's answers stop being waited for.
    pub fn deadline(&self, srtt: Option<Duration>) -> Option<Duration> {
        let wait = srtt.map_or(WAIT_MIN, |r| (r * 2).max(WAIT_MIN));
        self.out.map(|(at, _)| at + wait)
    }

    /// Start a train, probes of `size` bytes, at `now`: the ids to send
    /// (the train's number above the index, so a late answer to an
    /// earlier train is not taken for this one's).
    pub fn start(&mut self, now: Duration, size: usize) -> impl Iterator<Item = u32> {
        let n = self.sent;
        self.sent += 1;
        self.out = Some((now, size));
        self.acks.clear();
        (0..TRAIN_LEN).map(move |i| TRAIN_ID | n << INDEX_BITS | i)
    }

    /// An answer to probe `id` arrived at `now`. Returns the estimate when
    /// this completes the train.
    pub fn on_ack(&mut self, now: Duration, id: u32) -> Option<f64> {
        let (_, size) = self.out?;
        let index = id & ((1 << INDEX_BITS) - 1);
        let train = (id & !TRAIN_ID) >> INDEX_BITS;
        if train + 1 != self.sent
            || index >= TRAIN_LEN
            || self.acks.iter().any(|&(i, _)| i == index)
        {
            return None;
        }
        self.acks.push((index, now));
        if self.acks.len() as u32 == TRAIN_LEN {
            return self.finish(now, size);
        }
        None
    }

    /// The outstanding train's wait is over (see [`Train::deadline`]) at
    /// `now`: estimate from what came back.
    pub fn expire(&mut self, now: Duration) -> Option<f64> {
        let (_, size) = self.out?;
        self.finish(now, size)
    }

    fn finish(&mut self, now: Duration, size: usize) -> Option<f64> {
        self.out = None;
        self.next_at = now + RETRY_AFTER;
        self.estimate = dispersion(&mut self.acks, size);
        tracing::debug!(train = self.sent, answers = ?self.acks, estimate = ?self.estimate, "capacity train");
        self.acks.clear();
        self.estimate
    }
}

/// The rate, bytes/s, at which answers to probes of `size` bytes arrived:
/// from the last of those that share the earliest arrival time to the last
/// answer, by probe index (a lost probe or answer is a gap, not a faster
/// train). None unless three distinct arrival times span three probes.
pub fn dispersion(acks: &mut [(u32, Duration)], size: usize) -> Option<f64> {
    acks.sort_by_key(|&(i, t)| (t, i));
    let &(_, t0) = acks.first()?;
    let first = acks
        .iter()
        .filter(|&&(_, t)| t == t0)
        .map(|&(i, _)| i)
        .max()?;
    let &(last, t1) = acks.last()?;
    let mut times: Vec<Duration> = acks.iter().map(|&(_, t)| t).collect();
    times.dedup();
    if times.len() < 3 || last < first + 3 || t1 <= t0 {
        return None;
    }
    Some(f64::from(last - first) * size as f64 / (t1 - t0).as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(x: u64) -> Duration {
        Duration::from_micros(x)
    }

    #[test]
    fn answers_spaced_by_the_bottleneck_give_its_rate() {
        // 1,452-byte probes through 100 Mbit/s: 116 us apart.
        let mut a: Vec<(u32, Duration)> =
            (0..10).map(|i| (i, us(50_000 + 116 * i as u64))).collect();
        let r = dispersion(&mut a, 1452).unwrap();
        assert!((r * 8.0 / 1e6 - 100.0).abs() < 1.0, "{}", r * 8.0 / 1e6);
    }

    #[test]
    fn a_first_batch_read_together_and_a_lost_answer_do_not_inflate_it() {
        // The first four read in one batch (stamped alike), answer 6 lost.
        let mut a: Vec<(u32, Duration)> = (0..10)
            .filter(|&i| i != 6)
            .map(|i| (i, us(50_000 + 116 * u64::from(i.max(3)))))
            .collect();
        let r = dispersion(&mut a, 1452).unwrap();
        assert!((r * 8.0 / 1e6 - 100.0).abs() < 1.0, "{}", r * 8.0 / 1e6);
    }

    #[test]
    fn a_train_read_in_one_or_two_batches_gives_no_estimate() {
        let mut one: Vec<(u32, Duration)> = (0..10).map(|i| (i, us(50_000))).collect();
        assert_eq!(dispersion(&mut one, 1452), None);
        let mut two: Vec<(u32, Duration)> = (0..10)
            .map(|i| (i, us(50_000 + 10 * u64::from(i >= 5))))
            .collect();
        assert_eq!(dispersion(&mut two, 1452), None);
    }

    #[test]
    fn a_train_without_an_estimate_is_tried_again_a_few_times() {
        let now = Duration::from_secs(1);
        // Nothing comes back: no estimate; another train after a pause,
        // at most `TRAINS`.
        let mut t = Train::default();
        let mut at = now;
        for n in 0..TRAINS {
            let due = t.due_at().expect("due");
            assert!(due <= at, "train {n} due at {due:?}");
            let ids: Vec<u32> = t.start(at, 1452).collect();
            assert_eq!(ids.len() as u32, TRAIN_LEN);
            assert!(ids.iter().all(|&id| Train::is_train_id(id)));
            assert_eq!(t.due_at(), None, "one train out at a time");
            at += Duration::from_millis(200);
            assert_eq!(t.expire(at), None);
            at += RETRY_AFTER;
        }
        assert_eq!(t.due_at(), None);
        assert_eq!(t.probes(), u64::from(TRAINS * TRAIN_LEN));
    }

    #[test]
    fn answers_spaced_by_the_bottleneck_end_the_trains() {
        let now = Duration::from_secs(1);
        let mut t = Train::default();
        // The first train's answers all read in one batch: no estimate.
        let first: Vec<u32> = t.start(now, 1452).collect();
        for &id in &first {
            assert_eq!(t.on_ack(now + us(25_000), id), None);
        }
        assert_eq!(t.estimate(), None);
        assert_eq!(t.due_at(), Some(now + us(25_000) + RETRY_AFTER));
        let at = now + us(25_000) + RETRY_AFTER;
        let ids: Vec<u32> = t.start(at, 1452).collect();
        // A late answer to the first train is not the second's.
        assert_eq!(t.on_ack(at + us(20_000), first[9]), None);
        let mut got = None;
        for (k, id) in ids.into_iter().enumerate() {
            got = t.on_ack(at + us(25_000 + 116 * k as u64), id);
        }
        assert!(got.is_some_and(|r| (r * 8.0 / 1e6 - 100.0).abs() < 1.0));
        assert_eq!(t.estimate(), got);
        // Measured: no more trains.
        assert_eq!(t.due_at(), None);
    }
}
