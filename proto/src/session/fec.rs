//! Forward error correction for KCP data frames, chosen from the measured loss.
//!
//! On a lossy path a lost KCP segment holds back every later segment of its
//! flow until it is resent, at least one round trip later; the inner TCP sees
//! that as jitter and inflated RTT and slows down, and a message waits a whole
//! retransmission. With FEC the sender groups its KCP data frames (at most
//! [`MAX_GROUP`]; a group also closes a quarter of a round trip after its
//! first frame, and at once after a small frame with nothing queued behind
//! it, so a lone message gets its parity right after it) and follows each group with
//! Reed–Solomon parity frames; the receiver rebuilds up to that many lost
//! frames of the group as soon as enough of it has arrived, without waiting
//! for a retransmission. A group of one with one parity frame is plain
//! duplication.
//!
//! Bulk data of split TCP connections goes without parity (see
//! [`Session::fec_wrap`]): it is recovered by retransmission, which costs
//! the lost frames only, and no end host's TCP sees the delay.
//!
//! The number of parity frames is the smallest that leaves less than
//! [`RESIDUAL`] chance of the group losing more than it can repair, at the
//! loss the rate controller measures; below [`MIN_LOSS`] FEC is off and frames
//! go as plain [`Inner::Kcp`].
//!
//! ```text
//! FecData   | Inner::FecData | group u16le | index u8 | KCP segments
//! FecParity | Inner::FecParity | group u16le | index u8 | k u8 | m u8 | shard
//! shard (data i, padded to the group's shard size) = | len u16le | KCP segments | zeros |
//! ```

use super::Session;
use crate::wire::Inner;
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

/// Most data frames in one group.
pub const MAX_GROUP: usize = 16;
/// A group closes a quarter of the round trip after its first frame even if
/// not full, but no sooner than this...
pub const MIN_GROUP_WINDOW: Duration = Duration::from_millis(3);
/// ...and no later than this.
pub const MAX_GROUP_WINDOW: Duration = Duration::from_millis(20);
/// Below this measured loss no parity is sent.
pub const MIN_LOSS: f64 = 0.005;
/// The loss parity is planned for while the path's is not measured (a new
/// session; a path idle for a few seconds), for small frames only
/// ([`SMALL_FRAME`]): three copies of a lone message. Without it the
/// first messages of a session on a lossy path went with no parity, and
/// each loss cost a retransmission timeout and held the messages behind it
/// (simulated 5% / 50 ms: p99 108-113 ms, from the first 15 messages).
pub const UNMEASURED_LOSS: f64 = 0.05;
/// The largest frame (KCP segments) counted as small: a message, a
/// keystroke, a query. Only these get parity while the loss is not
/// measured (full frames of a flow that is not split, whose loss may stay
/// unmeasured while its queue stands, do not pay for a guess), and a small
/// frame with nothing queued behind it closes its group at once.
pub const SMALL_FRAME: usize = 512;
/// A small frame this long after the previous data frame is a lone one
/// (closes its group at once); denser small packets (a stream of them,
/// 200 a second or more) share groups.
pub const SPARSE_GAP: Duration = Duration::from_millis(5);
/// Target chance that a group loses more frames than its parity repairs.
pub const RESIDUAL: f64 = 0.02;
/// The same for groups of at most [`SMALL_GROUP`] frames: those are
/// interactive traffic (a message, a keystroke), where one unrepaired loss
/// costs a retransmission's delay, and their parity is cheap.
pub const RESIDUAL_SMALL: f64 = 0.001;
/// Groups this small use [`RESIDUAL_SMALL`] and may get up to
/// [`MAX_SMALL_PARITY`] parity frames.
pub const SMALL_GROUP: usize = 2;
/// Most parity frames for a small group.
pub const MAX_SMALL_PARITY: usize = 3;
/// Bytes the FEC wrapping adds to the largest KCP frame (the parity frame's
/// header, the shard's length and its padding to an even size): KCP's MTU is
/// this much smaller so that every frame still fits the path.
pub const FEC_RESERVE: usize = 8;
/// Groups the receiver keeps for rebuilding.
const RX_GROUPS: usize = 64;

const DATA_HEADER: usize = 1 + 2 + 1;
const PARITY_HEADER: usize = 1 + 2 + 1 + 1 + 1;

/// Parity frames for `k` data frames at loss `p`: the smallest `m` with
/// P(more than `m` of `k + m` lost) below [`RESIDUAL`] (at most `k / 2`), or for
/// small groups below [`RESIDUAL_SMALL`] (at most [`MAX_SMALL_PARITY`]); 0
/// below [`MIN_LOSS`].
pub fn parity_for(k: usize, p: f64) -> usize {
    if p < MIN_LOSS || k == 0 {
        return 0;
    }
    let p = p.min(0.5);
    let (residual, most) = if k <= SMALL_GROUP {
        (RESIDUAL_SMALL, MAX_SMALL_PARITY)
    } else {
        // At most half again the data: past that, loss is better left to
        // retransmission than paid for on every group.
        (RESIDUAL, k.div_ceil(2))
    };
    for m in 1..=most {
        let n = k + m;
        // P(X <= m), X ~ Binomial(n, p).
        let (mut term, mut cdf) = ((1.0 - p).powi(n as i32), 0.0);
        for i in 0..=m {
            cdf += term;
            term *= (n - i) as f64 / (i + 1) as f64 * p / (1.0 - p);
        }
        if 1.0 - cdf < residual {
            return m;
        }
    }
    most
}

/// The pacer's round-robin slot for bulk parity (beside the conversations).
const PARITY_TURN: u32 = u32::MAX;

/// The sender's open group.
#[derive(Default)]
pub(super) struct FecTx {
    group: u16,
    /// Shards of the data frames sent in the open group: length-prefixed KCP
    /// segments, not yet padded.
    shards: Vec<Vec<u8>>,
    /// When the open group must close.
    deadline: Option<Duration>,
    /// Spare shard buffers.
    spare: Vec<Vec<u8>>,
    /// When the last data frame was wrapped.
    last: Option<Duration>,
}

/// A group being received.
#[derive(Default)]
struct RxGroup {
    data: BTreeMap<u8, Vec<u8>>,
    parity: BTreeMap<u8, Vec<u8>>,
    k: Option<(u8, u8)>,
    done: bool,
}

/// The receiver's recent groups.
#[derive(Default)]
pub(super) struct FecRx {
    groups: BTreeMap<u16, RxGroup>,
    order: VecDeque<u16>,
}

impl FecRx {
    fn group(&mut self, g: u16) -> &mut RxGroup {
        if !self.groups.contains_key(&g) {
            if self.order.len() >= RX_GROUPS {
                if let Some(old) = self.order.pop_front() {
                    self.groups.remove(&old);
                }
            }
            self.order.push_back(g);
        }
        self.groups.entry(g).or_default()
    }
}

impl Session {
    /// The loss parity for a group of `k` frames is planned for:
    /// [`UNMEASURED_LOSS`] until there is a measurement; then the clean
    /// loss, or for small groups (messages) its upper bound
    /// ([`crate::cc::RateControl::message_loss`]).
    fn fec_loss(&self, k: usize) -> f64 {
        if !self.cc.clean_loss_known() {
            UNMEASURED_LOSS
        } else if k <= SMALL_GROUP {
            self.cc.message_loss()
        } else {
            self.cc.clean_loss()
        }
    }

    /// Wrap a paced KCP frame (`Inner::Kcp` + segments) for sending: as
    /// `FecData` of the open group when the path loses enough to want parity,
    /// else unchanged. Parity frames of a group that fills up are queued.
    /// A frame of a `bulk` conversation (see [`super::mux::Conv::bulk`]) is
    /// never wrapped: a split connection's bulk data reaches no TCP that
    /// would see its recovery as jitter, so parity would cost bandwidth for
    /// nothing that retransmission does not do.
    pub(super) fn fec_wrap(&mut self, now: Duration, plain: Vec<u8>, bulk: bool) -> Vec<u8> {
        let on = self.cfg.fec && parity_for(MAX_GROUP, self.cc.clean_loss()) > 0;
        if on != self.fec_on {
            self.fec_on = on;
            let floor = self.bulk_rto_floor();
            for c in self.convs.values_mut() {
                let f = c.bulk.then_some(floor);
                super::mux::tune_resend(&mut c.kcp, self.cfg.profile, on && !c.bulk, f);
            }
        }
        if bulk {
            return plain;
        }
        // A message: a small frame (KCP segments of at most `SMALL_FRAME`
        // bytes after the type byte) with nothing waiting behind it.
        let message = plain.len() <= SMALL_FRAME + 1 && self.queued == 0 && self.paced_len == 0;
        // A message gets parity when the loss planned for one is worth it
        // (the guess while the loss is not measured). The guess is for
        // messages only: a busy sender's loss can stay unmeasured (its
        // queue standing, no clean sample) and its small frames are not
        // messages (simulated clean 1 Gbit/s transfer: parity for 2% of
        // its frames).
        let for_message = self.cfg.fec && message && self.fec_loss(1) >= MIN_LOSS;
        if !on && !for_message {
            if !self.fec_tx.shards.is_empty() {
                self.fec_close(now);
            }
            return plain;
        }
        let segs = &plain[1..];
        let tx = &mut self.fec_tx;
        let index = tx.shards.len() as u8;
        let mut out = Vec::with_capacity(DATA_HEADER + segs.len());
        out.push(Inner::FecData as u8);
        out.extend_from_slice(&tx.group.to_le_bytes());
        out.push(index);
        out.extend_from_slice(segs);
        let mut shard = tx.spare.pop().unwrap_or_default();
        shard.clear();
        shard.extend_from_slice(&(segs.len() as u16).to_le_bytes());
        shard.extend_from_slice(segs);
        tx.shards.push(shard);
        let window = self
            .srtt
            .map_or(MIN_GROUP_WINDOW, |s| s / 4)
            .clamp(MIN_GROUP_WINDOW, MAX_GROUP_WINDOW);
        let tx = &mut self.fec_tx;
        tx.deadline.get_or_insert(now + window);
        // A lone message (nothing else wrapped within `SPARSE_GAP` before
        // it) closes the group: its parity goes at once. Waiting the
        // group's window for frames that were not coming delayed every
        // message repaired by parity by that window, each way (simulated
        // 5% / 50 ms: such messages took 75 ms, the others 50-63). Dense small packets (a
        // stream of them) still share groups and their parity.
        let sparse = tx.last.is_none_or(|t| now.saturating_sub(t) >= SPARSE_GAP);
        tx.last = Some(now);
        if tx.shards.len() >= MAX_GROUP || (message && sparse) {
            self.fec_close(now);
        }
        self.stats.fec_data += 1;
        out
    }

    /// When the open group must close (for the session's timer).
    pub(super) fn fec_deadline(&self) -> Option<Duration> {
        self.fec_tx.deadline
    }

    /// Close the open group: compute and queue its parity frames.
    pub(super) fn fec_close(&mut self, _now: Duration) {
        let k = self.fec_tx.shards.len();
        let loss = self.fec_loss(k);
        let tx = &mut self.fec_tx;
        tx.deadline = None;
        if k == 0 {
            return;
        }
        let m = parity_for(k, loss).max(1);
        let size = tx
            .shards
            .iter()
            .map(Vec::len)
            .max()
            .unwrap_or(2)
            .next_multiple_of(2);
        for s in tx.shards.iter_mut() {
            s.resize(size, 0);
        }
        let group = tx.group;
        tx.group = tx.group.wrapping_add(1);
        // Cannot fail: 1..=16 shards of a non-zero, even size.
        let parity = reed_solomon_simd::encode(k, m, tx.shards.iter()).unwrap_or_default();
        tx.spare.append(&mut tx.shards);
        for (i, shard) in parity.into_iter().enumerate() {
            let mut v = Vec::with_capacity(PARITY_HEADER + shard.len());
            v.push(Inner::FecParity as u8);
            v.extend_from_slice(&group.to_le_bytes());
            v.extend_from_slice(&[i as u8, k as u8, m as u8]);
            v.extend_from_slice(&shard);
            if k > SMALL_GROUP {
                // Bulk parity takes its turn in the pacer like a flow, so
                // it neither exceeds the rate nor holds other flows back.
                self.paced.entry(PARITY_TURN).or_default().push_back(v);
                self.paced_len += 1;
            } else {
                // A message's few copies go at once, outside the pacer.
                self.urgent.push_back(super::Out::Plain(v));
            }
            self.stats.fec_parity += 1;
        }
    }

    /// A `FecData` frame arrived: its KCP segments go in at once, and the
    /// group keeps a copy in case a sibling needs rebuilding.
    pub(super) fn on_fec_data(&mut self, now: Duration, body: &[u8]) {
        if body.len() < DATA_HEADER - 1 + crate::wire::segment::SEGMENT_HEADER_LEN {
            self.stats.malformed += 1;
            return;
        }
        let g = u16::from_le_bytes([body[0], body[1]]);
        let index = body[2];
        let segs = &body[3..];
        self.on_kcp(now, segs);
        let grp = self.fec_rx.group(g);
        if !grp.done && (index as usize) < MAX_GROUP {
            let mut shard = Vec::with_capacity(segs.len() + 2);
            shard.extend_from_slice(&(segs.len() as u16).to_le_bytes());
            shard.extend_from_slice(segs);
            grp.data.insert(index, shard);
        }
        self.fec_try_rebuild(now, g);
    }

    /// A `FecParity` frame arrived.
    pub(super) fn on_fec_parity(&mut self, now: Duration, body: &[u8]) {
        if body.len() < PARITY_HEADER - 1 + 2 {
            self.stats.malformed += 1;
            return;
        }
        let g = u16::from_le_bytes([body[0], body[1]]);
        let (index, k, m) = (body[2], body[3], body[4]);
        let shard = &body[5..];
        let valid = k >= 1
            && (k as usize) <= MAX_GROUP
            && m >= 1
            && (m <= k || m as usize <= MAX_SMALL_PARITY)
            && index < m
            && shard.len().is_multiple_of(2);
        if !valid {
            self.stats.malformed += 1;
            return;
        }
        let grp = self.fec_rx.group(g);
        if grp.done {
            return;
        }
        if grp.k.is_some_and(|km| km != (k, m))
            || grp
                .parity
                .values()
                .next()
                .is_some_and(|p| p.len() != shard.len())
        {
            self.stats.malformed += 1;
            return;
        }
        grp.k = Some((k, m));
        grp.parity.insert(index, shard.to_vec());
        self.fec_try_rebuild(now, g);
    }

    /// Rebuild the missing data frames of group `g` if enough has arrived.
    fn fec_try_rebuild(&mut self, now: Duration, g: u16) {
        let Some(grp) = self.fec_rx.groups.get_mut(&g) else {
            return;
        };
        let Some((k, m)) = grp.k else {
            return;
        };
        let (k, m) = (k as usize, m as usize);
        let have = grp.data.keys().filter(|&&i| (i as usize) < k).count();
        if grp.done || have >= k {
            grp.done |= have >= k;
            return;
        }
        if have + grp.parity.len() < k {
            return;
        }
        grp.done = true;
        let size = grp.parity.values().next().map_or(0, Vec::len);
        let mut originals = Vec::with_capacity(have);
        for (&i, s) in grp.data.iter().filter(|(&i, _)| (i as usize) < k) {
            if s.len() > size {
                self.stats.malformed += 1;
                return;
            }
            let mut s = s.clone();
            s.resize(size, 0);
            originals.push((i as usize, s));
        }
        let recovery = grp.parity.iter().map(|(&i, s)| (i as usize, s));
        let rebuilt = match reed_solomon_simd::decode(k, m, originals, recovery) {
            Ok(r) => r,
            Err(_) => {
                self.stats.malformed += 1;
                return;
            }
        };
        for (_, shard) in rebuilt {
            let len = u16::from_le_bytes([shard[0], shard[1]]) as usize;
            if len + 2 > shard.len() {
                self.stats.malformed += 1;
                continue;
            }
            self.stats.fec_recovered += 1;
            self.on_kcp(now, &shard[2..2 + len]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parity_follows_the_loss() {
        assert_eq!(parity_for(16, 0.0), 0);
        assert_eq!(parity_for(16, 0.004), 0);
        let at = |p| parity_for(16, p);
        assert!(at(0.01) >= 1 && at(0.01) <= 2, "{}", at(0.01));
        assert!(at(0.05) >= 3 && at(0.05) <= 4, "{}", at(0.05));
        assert!(at(0.05) < at(0.10) && at(0.10) < at(0.20));
        assert!(at(0.20) <= 8);
        // A lone frame (a message) is sent two or three more times.
        assert_eq!(parity_for(1, 0.05), 2);
        assert_eq!(parity_for(1, 0.5), MAX_SMALL_PARITY);
    }
}
