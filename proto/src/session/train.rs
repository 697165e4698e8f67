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
//! answer leaves a gap the indices account for. One train per session: one
//! whose answers give no estimate (all read in a batch or two, on a path
//! too fast to tell apart) says a second would not either, and the session
//! starts from the initial rate as before.
//!
//! [`Control::MtuAck`]: crate::wire::Control::MtuAck

use std::time::Duration;

/// Probes per train: about TCP's initial window of ten segments.
pub const TRAIN_LEN: u32 = 10;
/// Train probe ids have this bit set; path-MTU search ids never do.
pub const TRAIN_ID: u32 = 0x8000_0000;
/// How long after a train its answers are waited for, at least.
const WAIT_MIN: Duration = Duration::from_millis(200);

/// One session's train.
#[derive(Debug, Default)]
pub struct Train {
    /// The train went.
    sent: bool,
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
        if self.sent {
            u64::from(TRAIN_LEN)
        } else {
            0
        }
    }

    /// The estimate, once made.
    pub fn estimate(&self) -> Option<f64> {
        self.estimate
    }

    /// Whether the train has yet to go (the caller checks the session's
    /// own conditions: a settled MTU, a direct path, the first data).
    pub fn due(&self) -> bool {
        !self.sent
    }

    /// When the outstanding train's answers stop being waited for.
    pub fn deadline(&self, srtt: Option<Duration>) -> Option<Duration> {
        let wait = srtt.map_or(WAIT_MIN, |r| (r * 2).max(WAIT_MIN));
        self.out.map(|(at, _)| at + wait)
    }

    /// Start the train, probes of `size` bytes, at `now`: the ids to send.
    pub fn start(&mut self, now: Duration, size: usize) -> impl Iterator<Item = u32> {
        self.sent = true;
        self.out = Some((now, size));
        (0..TRAIN_LEN).map(|i| TRAIN_ID | i)
    }

    /// An answer to probe `id` arrived at `now`. Returns the estimate when
    /// this completes the train.
    pub fn on_ack(&mut self, now: Duration, id: u32) -> Option<f64> {
        let (_, size) = self.out?;
        let index = id & !TRAIN_ID;
        if index >= TRAIN_LEN || self.acks.iter().any(|&(i, _)| i == index) {
            return None;
        }
        self.acks.push((index, now));
        if self.acks.len() as u32 == TRAIN_LEN {
            return self.finish(size);
        }
        None
    }

    /// The outstanding train's wait is over (see [`Train::deadline`]):
    /// estimate from what came back.
    pub fn expire(&mut self) -> Option<f64> {
        let (_, size) = self.out?;
        self.finish(size)
    }

    fn finish(&mut self, size: usize) -> Option<f64> {
        self.out = None;
        self.estimate = dispersion(&mut self.acks, size);
        self.acks = Vec::new();
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
    fn one_train_whose_answers_came_back_spaced_gives_the_estimate() {
        let now = Duration::from_secs(1);
        // Nothing comes back: no estimate, and no second train.
        let mut t = Train::default();
        assert!(t.due());
        let ids: Vec<u32> = t.start(now, 1452).collect();
        assert_eq!(ids.len() as u32, TRAIN_LEN);
        assert!(ids.iter().all(|&id| Train::is_train_id(id)));
        assert_eq!(t.expire(), None);
        assert!(!t.due());
        assert_eq!(t.probes(), u64::from(TRAIN_LEN));
        // Answers spaced by the bottleneck give its rate.
        let mut t = Train::default();
        let ids: Vec<u32> = t.start(now, 1452).collect();
        let mut got = None;
        for (k, id) in ids.into_iter().enumerate() {
            got = t.on_ack(now + us(25_000 + 116 * k as u64), id);
        }
        assert!(got.is_some_and(|r| (r * 8.0 / 1e6 - 100.0).abs() < 1.0));
        assert_eq!(t.estimate(), got);
    }
}
