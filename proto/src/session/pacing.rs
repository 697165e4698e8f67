//! Pacing: packets enter KCP only as the rate controller's pacer and the
//! inflight cap allow, conversations taking turns; KCP output carrying data
//! (new or retransmitted) is released by the same pacer, round-robin.

use super::{Out, Session};
use crate::wire::{self, segment::segments};
use std::collections::BTreeSet;
use std::time::Duration;

/// Path loss from which KCP's ack-only frames are sent twice.
pub const ACK_COPY_LOSS: f64 = 0.01;

impl Session {
    /// The conversation that may send next: round-robin over those with queued
    /// packets, each allowed while the total inflight is under the controller's
    /// cap or its own inflight is under its fair share (so a flow stuck on
    /// losses cannot take the whole window from the others).
    pub(super) fn next_admissible(&self) -> Option<u32> {
        // The cap is in bytes; KCP counts segments, so convert with the
        // average size of what was admitted (small packets => more segments).
        let cap = (self.cc.inflight_cap() / self.avg_seg).max(32.0);
        let total: usize = self.convs.values().map(|c| c.kcp.wait_snd()).sum();
        let busy = self
            .convs
            .values()
            .filter(|c| !c.queue.is_empty() || c.kcp.wait_snd() > 0)
            .count()
            .max(1);
        let share = (cap / busy as f64).max(4.0);
        self.convs
            .range(self.rr_conv.wrapping_add(1)..)
            .chain(self.convs.range(..=self.rr_conv))
            .find(|(id, c)| {
                !c.queue.is_empty()
                    && !self.paced.contains_key(id)
                    && ((total as f64) < cap || (c.kcp.wait_snd() as f64) < share)
            })
            .map(|(id, _)| *id)
    }

    /// Move queued packets into KCP as the pacer and the window allow, one
    /// conversation after another. Returns the conversations that got data.
    pub(super) fn admit(&mut self, now: Duration) -> BTreeSet<u32> {
        let mut touched = BTreeSet::new();
        if self.current.is_none() {
            return touched;
        }
        let floor = self.bulk_rto_floor();
        if floor != self.rto_floor {
            self.rto_floor = floor;
            for c in self.convs.values_mut().filter(|c| c.bulk) {
                super::mux::tune_resend(&mut c.kcp, self.cfg.profile, false, Some(floor));
            }
        }
        let rate = self.cc.pacing_rate();
        // A conversation with output still waiting for the pacer is skipped
        // (`next_admissible`), so retransmissions go before its new data,
        // while other conversations are not held back by them.
        let mut budget = self.pacer.budget(now, rate);
        while self.queued > 0 && budget > 0.0 {
            let Some(id) = self.next_admissible() else {
                break;
            };
            let c = self.convs.get_mut(&id).expect("found above");
            let pkt = c.queue.pop_front().expect("non-empty");
            // Bulk: a stream with more queued behind this, or a window's
            // worth still unacknowledged. Interactive streams send a
            // message and wait, and keep FEC.
            let bulk = super::is_stream(id)
                && (!c.queue.is_empty() || c.kcp.wait_snd() >= 2 * super::fec::MAX_GROUP);
            if bulk != c.bulk {
                c.bulk = bulk;
                let f = bulk.then_some(floor);
                super::mux::tune_resend(&mut c.kcp, self.cfg.profile, self.fec_on && !bulk, f);
            }
            self.queued -= 1;
            self.rr_conv = id;
            if c.kcp.send(&pkt).is_err() {
                self.stats.malformed += 1;
                continue;
            }
            let seg = (pkt.len() + 1 + kcp::KCP_OVERHEAD + wire::DATA_OVERHEAD) as f64;
            self.avg_seg = self.avg_seg * 0.95 + seg * 0.05;
            budget -= seg;
            touched.insert(id);
        }
        touched
    }

    /// Loss of the frames this side receives under its current keys (the
    /// gaps in their counters), once enough have arrived to tell.
    fn rx_loss(&self) -> f64 {
        match &self.current {
            Some(k) if k.rx.highest >= 200 => 1.0 - k.rx.frames as f64 / k.rx.highest as f64,
            _ => 0.0,
        }
    }

    pub(super) fn collect_kcp(&mut self, now: Duration) {
        let out = match self.sink.0.lock() {
            Ok(mut s) => std::mem::take(&mut *s),
            Err(_) => return,
        };
        // Acks go twice on a path that loses frames, as the rate controller
        // measures it for what this side sends or as this side sees it in
        // what it receives: a receiver of bulk sends little but acks, and
        // its own estimate can sit below the threshold (simulated at 5%
        // loss: half of its ack frames went once, and each lost one, with
        // the acks of about 15 data frames, made the sender resend frames
        // that had arrived).
        let copy_acks = self.cc.clean_loss() >= ACK_COPY_LOSS || self.rx_loss() >= ACK_COPY_LOSS;
        for pkt in out {
            let mut conv = None;
            let mut opening = false;
            for seg in segments(&pkt[1..]).filter(|s| s.is_push()) {
                conv = Some(seg.conv());
                if let Some(c) = self.convs.get_mut(&seg.conv()) {
                    if (seg.sn().wrapping_sub(c.next_sn) as i32) < 0 {
                        self.stats.retransmits += 1;
                    } else {
                        opening |= seg.sn() == 0;
                        c.next_sn = seg.sn().wrapping_add(1);
                    }
                }
            }
            // Output carrying data waits for the pacer; acks and probes do not.
            if let Some(conv) = conv {
                // Data, not control: control messages do not make a session
                // "active" (pinging for RTT samples, idle restarts).
                if conv != super::CONV_CONTROL {
                    self.last_kcp_tx = Some(now);
                    // A conversation's first segment (a split connection's
                    // open, or the far side's answer) goes twice: lost, it
                    // would wait out KCP's initial 200-ms timeout, since the
                    // conversation has no round trip measured yet, and the
                    // whole connection waits with it (simulated at 5% loss,
                    // an open lost: data flowed 0.24 s after the first frame
                    // instead of 0.04 s). A few dozen bytes per connection.
                    if opening {
                        self.urgent.push_back(Out::Plain(pkt.clone()));
                        self.stats.open_copies += 1;
                    }
                }
                self.paced.entry(conv).or_default().push_back(pkt);
                self.paced_len += 1;
            } else {
                // Acks (and window probes) go at once. On a lossy path they
                // go twice: a lost ack for a segment that arrived behind a
                // hole makes KCP resend it (later acks count against it), so
                // each lost ack would cost a data frame on the way back.
                if copy_acks {
                    self.urgent.push_back(Out::Plain(pkt.clone()));
                    self.stats.ack_copies += 1;
                }
                self.urgent.push_back(Out::Plain(pkt));
            }
        }
    }

    pub(super) fn pop_paced(&mut self) -> Vec<u8> {
        let key = self
            .paced
            .range(self.paced_last.wrapping_add(1)..)
            .next()
            .or_else(|| self.paced.iter().next())
            .map(|(k, _)| *k)
            .expect("paced_len > 0");
        let q = self.paced.get_mut(&key).expect("key from map");
        let p = q.pop_front().expect("queues in the map are non-empty");
        if q.is_empty() {
            self.paced.remove(&key);
        }
        self.paced_len -= 1;
        self.paced_last = key;
        p
    }
}
