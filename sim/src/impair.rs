//! Seeded network impairments, as sans-IO stages.
//!
//! A [`Stage`] takes a packet that enters it at time `at` and yields the times at
//! which zero, one or more copies leave it. Stages compose into a [`Pipeline`]
//! (`rate limit -> loss -> delay/jitter -> reorder -> duplicate`); the same pipeline
//! drives the discrete-event simulator ([`crate::des`]) and the [`crate::Impaired`]
//! datagram wrapper used over real or turmoil sockets. Every stage owns a ChaCha
//! RNG seeded from the link seed: same seed, same drops, same delays.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Duration;

/// Something held until `at` (a packet a stage delayed). In a
/// `BinaryHeap` the earliest comes out first, ties in `seq` order.
#[derive(Debug)]
pub struct Held<T> {
    /// Release time.
    pub at: Duration,
    /// Tie-breaker: order of admission.
    pub seq: u64,
    /// What is held.
    pub item: T,
}

impl<T> PartialEq for Held<T> {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl<T> Eq for Held<T> {}
impl<T> PartialOrd for Held<T> {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl<T> Ord for Held<T> {
    // BinaryHeap is a max-heap: invert so the earliest release pops first.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// One impairment.
pub trait Stage: Send {
    /// A packet of `len` bytes enters at `at`; push the times its copies leave.
    fn apply(&mut self, at: Duration, len: usize, out: &mut Vec<Duration>);
    /// Packets this stage dropped so far.
    fn dropped(&self) -> u64 {
        0
    }
}

/// Independent, identically distributed loss with probability `p`.
pub struct Loss {
    p: f64,
    rng: ChaCha8Rng,
    dropped: u64,
}

impl Loss {
    /// Loss probability `p` in `[0, 1]`.
    pub fn new(p: f64, seed: u64) -> Loss {
        Loss {
            p: p.clamp(0.0, 1.0),
            rng: ChaCha8Rng::seed_from_u64(seed),
            dropped: 0,
        }
    }
}

impl Stage for Loss {
    fn apply(&mut self, at: Duration, _len: usize, out: &mut Vec<Duration>) {
        if self.p > 0.0 && self.rng.random::<f64>() < self.p {
            self.dropped += 1;
        } else {
            out.push(at);
        }
    }
    fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// Gilbert-Elliott burst loss: a two-state Markov chain, each state with its own loss rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GilbertElliott {
    /// Probability per packet of moving good -> bad.
    pub p_good_to_bad: f64,
    /// Probability per packet of moving bad -> good.
    pub p_bad_to_good: f64,
    /// Loss probability in the good state.
    pub loss_good: f64,
    /// Loss probability in the bad state.
    pub loss_bad: f64,
}

impl GilbertElliott {
    /// Long-run loss rate of the chain.
    pub fn mean_loss(&self) -> f64 {
        let pb = self.p_good_to_bad / (self.p_good_to_bad + self.p_bad_to_good);
        (1.0 - pb) * self.loss_good + pb * self.loss_bad
    }
}

/// The running Gilbert-Elliott stage.
pub struct BurstLoss {
    m: GilbertElliott,
    bad: bool,
    rng: ChaCha8Rng,
    dropped: u64,
}

impl BurstLoss {
    /// Start in the good state.
    pub fn new(m: GilbertElliott, seed: u64) -> BurstLoss {
        BurstLoss {
            m,
            bad: false,
            rng: ChaCha8Rng::seed_from_u64(seed),
            dropped: 0,
        }
    }
}

impl Stage for BurstLoss {
    fn apply(&mut self, at: Duration, _len: usize, out: &mut Vec<Duration>) {
        let flip = if self.bad {
            self.m.p_bad_to_good
        } else {
            self.m.p_good_to_bad
        };
        if self.rng.random::<f64>() < flip {
            self.bad = !self.bad;
        }
        let p = if self.bad {
            self.m.loss_bad
        } else {
            self.m.loss_good
        };
        if self.rng.random::<f64>() < p {
            self.dropped += 1;
        } else {
            out.push(at);
        }
    }
    fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// Fixed one-way latency plus uniform jitter in `[0, jitter]` (jitter can reorder).
pub struct Delay {
    base: Duration,
    jitter: Duration,
    rng: ChaCha8Rng,
}

impl Delay {
    /// One-way `base` latency with up to `jitter` extra.
    pub fn new(base: Duration, jitter: Duration, seed: u64) -> Delay {
        Delay {
            base,
            jitter,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }
}

impl Stage for Delay {
    fn apply(&mut self, at: Duration, _len: usize, out: &mut Vec<Duration>) {
        let j = if self.jitter.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_nanos(self.rng.random_range(0..=self.jitter.as_nanos() as u64))
        };
        out.push(at + self.base + j);
    }
}

/// With probability `p`, hold a packet back by `extra` so later ones overtake it.
pub struct Reorder {
    p: f64,
    extra: Duration,
    rng: ChaCha8Rng,
}

impl Reorder {
    /// Reorder a fraction `p` of packets by `extra`.
    pub fn new(p: f64, extra: Duration, seed: u64) -> Reorder {
        Reorder {
            p,
            extra,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }
}

impl Stage for Reorder {
    fn apply(&mut self, at: Duration, _len: usize, out: &mut Vec<Duration>) {
        if self.p > 0.0 && self.rng.random::<f64>() < self.p {
            out.push(at + self.extra);
        } else {
            out.push(at);
        }
    }
}

/// With probability `p`, deliver a second copy 1 ms after the first.
pub struct Duplicate {
    p: f64,
    rng: ChaCha8Rng,
}

impl Duplicate {
    /// Duplicate a fraction `p` of packets.
    pub fn new(p: f64, seed: u64) -> Duplicate {
        Duplicate {
            p,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }
}

impl Stage for Duplicate {
    fn apply(&mut self, at: Duration, _len: usize, out: &mut Vec<Duration>) {
        out.push(at);
        if self.p > 0.0 && self.rng.random::<f64>() < self.p {
            out.push(at + Duration::from_millis(1));
        }
    }
}

/// A bottleneck: serialises packets at `bits_per_sec` through a FIFO of at most
/// `queue_bytes`: an arrival that finds more than `queue_bytes` of backlog (bytes
/// not yet on the wire) is tail-dropped. Each packet costs its
/// length plus `overhead` bytes (28 = IPv4 + UDP headers) on the wire.
pub struct RateLimit {
    bps: u64,
    queue_bytes: usize,
    overhead: usize,
    busy_until: Duration,
    dropped: u64,
}

impl RateLimit {
    /// A link of `bits_per_sec` with a `queue_bytes` buffer.
    pub fn new(bits_per_sec: u64, queue_bytes: usize) -> RateLimit {
        RateLimit {
            bps: bits_per_sec.max(1),
            queue_bytes,
            overhead: 28,
            busy_until: Duration::ZERO,
            dropped: 0,
        }
    }

    fn tx_time(&self, bytes: usize) -> Duration {
        Duration::from_nanos((bytes as u64 * 8).saturating_mul(1_000_000_000) / self.bps)
    }
}

impl Stage for RateLimit {
    fn apply(&mut self, at: Duration, len: usize, out: &mut Vec<Duration>) {
        let wire = len + self.overhead;
        let backlog = if self.busy_until > at {
            ((self.busy_until - at).as_nanos() as u64).saturating_mul(self.bps) / 8 / 1_000_000_000
        } else {
            0
        } as usize;
        if backlog > self.queue_bytes {
            self.dropped += 1;
            return;
        }
        let start = self.busy_until.max(at);
        self.busy_until = start + self.tx_time(wire);
        out.push(self.busy_until);
    }
    fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// What one direction of a link does to packets. Units are in the field names.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LinkSpec {
    /// i.i.d. loss probability, 0..1.
    pub loss: f64,
    /// Optional burst loss (applied after i.i.d. loss).
    pub burst: Option<GilbertElliott>,
    /// One-way latency.
    pub latency: Duration,
    /// Extra uniform random delay, 0..=jitter.
    pub jitter: Duration,
    /// Fraction of packets held back by `reorder_by`.
    pub reorder: f64,
    /// How far reordered packets are held back.
    pub reorder_by: Duration,
    /// Fraction of packets duplicated.
    pub duplicate: f64,
    /// Bottleneck rate in bit/s (`None` = unlimited).
    pub rate_bps: Option<u64>,
    /// Bottleneck buffer in bytes.
    pub queue_bytes: usize,
}

impl LinkSpec {
    /// A clean link with one-way `latency`.
    pub fn latency(latency: Duration) -> LinkSpec {
        LinkSpec {
            latency,
            ..LinkSpec::default()
        }
    }

    /// Set i.i.d. loss.
    pub fn with_loss(mut self, loss: f64) -> LinkSpec {
        self.loss = loss;
        self
    }

    /// Set jitter.
    pub fn with_jitter(mut self, jitter: Duration) -> LinkSpec {
        self.jitter = jitter;
        self
    }

    /// Set a bottleneck.
    pub fn with_rate(mut self, bits_per_sec: u64, queue_bytes: usize) -> LinkSpec {
        self.rate_bps = Some(bits_per_sec);
        self.queue_bytes = queue_bytes;
        self
    }

    /// Build the stages, each with its own seed derived from `seed`.
    pub fn build(&self, seed: u64) -> Pipeline {
        let s = |i: u64| seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(i);
        let mut stages: Vec<Box<dyn Stage>> = Vec::new();
        if let Some(bps) = self.rate_bps {
            stages.push(Box::new(RateLimit::new(bps, self.queue_bytes)));
        }
        if self.loss > 0.0 {
            stages.push(Box::new(Loss::new(self.loss, s(1))));
        }
        if let Some(ge) = self.burst {
            stages.push(Box::new(BurstLoss::new(ge, s(2))));
        }
        if !self.latency.is_zero() || !self.jitter.is_zero() {
            stages.push(Box::new(Delay::new(self.latency, self.jitter, s(3))));
        }
        if self.reorder > 0.0 {
            stages.push(Box::new(Reorder::new(self.reorder, self.reorder_by, s(4))));
        }
        if self.duplicate > 0.0 {
            stages.push(Box::new(Duplicate::new(self.duplicate, s(5))));
        }
        Pipeline {
            stages,
            a: Vec::new(),
            b: Vec::new(),
        }
    }
}

/// Stages applied one after another.
pub struct Pipeline {
    stages: Vec<Box<dyn Stage>>,
    a: Vec<Duration>,
    b: Vec<Duration>,
}

impl Pipeline {
    /// A pipeline of explicit stages.
    pub fn new(stages: Vec<Box<dyn Stage>>) -> Pipeline {
        Pipeline {
            stages,
            a: Vec::new(),
            b: Vec::new(),
        }
    }

    /// Push the departure times of a packet of `len` bytes entering at `at` into `out`.
    pub fn apply(&mut self, at: Duration, len: usize, out: &mut Vec<Duration>) {
        self.a.clear();
        self.a.push(at);
        for st in self.stages.iter_mut() {
            self.b.clear();
            for &t in &self.a {
                st.apply(t, len, &mut self.b);
            }
            std::mem::swap(&mut self.a, &mut self.b);
            if self.a.is_empty() {
                break;
            }
        }
        out.extend_from_slice(&self.a);
    }

    /// Packets dropped by all stages.
    pub fn dropped(&self) -> u64 {
        self.stages.iter().map(|s| s.dropped()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(spec: &LinkSpec, seed: u64, n: usize) -> Vec<Vec<Duration>> {
        let mut p = spec.build(seed);
        (0..n)
            .map(|i| {
                let mut o = Vec::new();
                p.apply(Duration::from_micros(i as u64 * 100), 1000, &mut o);
                o
            })
            .collect()
    }

    #[test]
    fn same_seed_same_behaviour() {
        let spec = LinkSpec {
            loss: 0.1,
            burst: Some(GilbertElliott {
                p_good_to_bad: 0.01,
                p_bad_to_good: 0.3,
                loss_good: 0.0,
                loss_bad: 0.5,
            }),
            latency: Duration::from_millis(30),
            jitter: Duration::from_millis(5),
            reorder: 0.05,
            reorder_by: Duration::from_millis(3),
            duplicate: 0.02,
            rate_bps: Some(50_000_000),
            queue_bytes: 64_000,
        };
        assert_eq!(run(&spec, 9, 5000), run(&spec, 9, 5000));
        assert_ne!(run(&spec, 9, 5000), run(&spec, 10, 5000));
    }

    #[test]
    fn iid_loss_rate_is_close() {
        let out = run(&LinkSpec::default().with_loss(0.2), 1, 20_000);
        let lost = out.iter().filter(|o| o.is_empty()).count() as f64 / 20_000.0;
        assert!((lost - 0.2).abs() < 0.015, "{lost}");
    }

    #[test]
    fn burst_loss_is_bursty_with_expected_mean() {
        let ge = GilbertElliott {
            p_good_to_bad: 0.02,
            p_bad_to_good: 0.25,
            loss_good: 0.0,
            loss_bad: 0.8,
        };
        let spec = LinkSpec {
            burst: Some(ge),
            ..LinkSpec::default()
        };
        let out = run(&spec, 2, 50_000);
        let lost: Vec<bool> = out.iter().map(|o| o.is_empty()).collect();
        let rate = lost.iter().filter(|l| **l).count() as f64 / lost.len() as f64;
        assert!(
            (rate - ge.mean_loss()).abs() < 0.02,
            "rate {rate} mean {}",
            ge.mean_loss()
        );
        // P(loss | previous lost) far above the mean: losses cluster.
        let pairs = lost.windows(2).filter(|w| w[0]).count() as f64;
        let both = lost.windows(2).filter(|w| w[0] && w[1]).count() as f64;
        assert!(
            both / pairs > 2.0 * rate,
            "conditional {} vs {rate}",
            both / pairs
        );
    }

    #[test]
    fn rate_limit_serialises_and_tail_drops() {
        // 8 Mbit/s = 1 byte/us; packets of 972+28 = 1000 B take 1 ms each.
        let mut r = RateLimit::new(8_000_000, 3000);
        let mut out = Vec::new();
        for _ in 0..10 {
            r.apply(Duration::ZERO, 972, &mut out);
        }
        // one in service + 3 queued (3000 B) fit; the rest are dropped
        assert_eq!(out.len(), 4, "{out:?}");
        assert_eq!(out[0], Duration::from_millis(1));
        assert_eq!(out[3], Duration::from_millis(4));
        assert_eq!(r.dropped(), 6);
        // after the queue drains, packets pass again
        out.clear();
        r.apply(Duration::from_millis(10), 972, &mut out);
        assert_eq!(out, vec![Duration::from_millis(11)]);
    }

    #[test]
    fn delay_jitter_bounds_and_duplicates() {
        let spec = LinkSpec {
            duplicate: 1.0,
            ..LinkSpec::latency(Duration::from_millis(10)).with_jitter(Duration::from_millis(2))
        };
        for (i, o) in run(&spec, 3, 1000).into_iter().enumerate() {
            assert_eq!(o.len(), 2);
            let sent = Duration::from_micros(i as u64 * 100);
            assert!(
                o[0] >= sent + Duration::from_millis(10)
                    && o[0] <= sent + Duration::from_millis(12)
            );
        }
    }
}
