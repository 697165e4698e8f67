//! Timers: when the session next needs [`Session::handle_timeout`], and what
//! it does then (KCP updates and flushes, conversation expiry, key rotation,
//! handshake retries, dead-link detection, pings, receiver reports,
//! keepalives, path probes and choice).

use super::{Ctx, Event, Out, Session, ACK_DELAY, PUNCH_REQUEST_EVERY};
use crate::cc::RateControl;
use crate::path::Via;
use crate::wire::{self, Control, Inner};
use std::time::Duration;

/// How often a session with no RTT sample yet pings until one comes back.
pub const FIRST_RTT_EVERY: Duration = Duration::from_millis(100);

impl Session {
    /// The rate controller (read-only, for diagnostics and benchmarks).
    pub fn rate_control(&self) -> &RateControl {
        &self.cc
    }

    /// Timer state, for diagnosing a stuck driver.
    pub fn debug_timers(&self) -> String {
        format!(
            "now {:?} dirty {} hs {:?} ping {:?} fb {:?} last_rx {:?} last_tx {:?} queued {} pacer {:?} convs {:?} expiry {:?}",
            self.now, self.dirty, self.next_handshake, self.next_ping, self.next_feedback, self.last_rx, self.last_tx,
            self.queued, self.pacer.next_send(),
            self.convs.iter().map(|(k, c)| (*k, c.next_update_ms)).collect::<Vec<_>>(), self.next_expiry
        )
    }

    /// When `handle_timeout` should next run.
    pub fn poll_timeout(&self) -> Option<Duration> {
        if self.dirty {
            return Some(self.now);
        }
        let mut t: Option<Duration> = None;
        let mut at = |d: Duration| t = Some(t.map_or(d, |x: Duration| x.min(d)));
        if let Some(d) = self.fec_deadline() {
            at(d);
        }
        if let Some(h) = self.next_handshake {
            if self.wanted || self.current.is_some() {
                at(h);
            }
        }
        if let Some(due) = self.rekey_due() {
            if self.pending_init.is_none() && !self.dead {
                at(due);
            }
        }
        if self.previous.is_some() {
            at(self.installed_at + self.cfg.old_key_window);
        }
        if self.current.is_some() {
            at(self.next_ping);
            if self
                .current
                .as_ref()
                .is_some_and(|k| k.rx.frames > self.reported)
                && self.data_since_report
            {
                at(self.next_feedback);
            }
            if !self.dead {
                at(self.last_rx + self.dead_after);
            }
            if self.pending_init.is_none() && self.next_handshake.is_none() {
                at(self.last_tx + self.keepalive);
            }
        }
        if self.current.is_some() {
            if let Some(t) = self.paths.poll_timeout() {
                at(t);
            }
            if self.paths.current().is_some() && self.pmtu_wanted {
                if let Some(t) = self.pmtu.poll_timeout(self.now, self.srtt) {
                    at(t);
                }
            }
            if let Some(t) = self.train_timeout() {
                at(t);
            }
        }
        if (self.paced_len > 0 || (self.queued > 0 && self.next_admissible().is_some()))
            && self.current.is_some()
            && self.paths.current().is_some()
        {
            at(self.pacer.next_send());
        }
        if !self.convs.is_empty() {
            let base = self.now.as_millis() as u64;
            let now_ms = base as u32;
            let clocked = self.kcp_clocked();
            for c in self.convs.values().filter(|_| clocked) {
                let d = c.next_update_ms.wrapping_sub(now_ms) as i32;
                at(Duration::from_millis(
                    (base as i64 + d.max(0) as i64) as u64,
                ));
            }
            // Only flow and stream conversations expire.
            if self
                .convs
                .keys()
                .next_back()
                .is_some_and(|&id| id > super::CONV_SHARED)
            {
                at(self.next_expiry);
            }
            for c in self.convs.values() {
                if let Some(a) = c.ack_owed {
                    at(a + ACK_DELAY);
                }
            }
        }
        t
    }

    /// Run timers due at `ctx.now` and flush KCP conversations.
    pub fn handle_timeout(&mut self, ctx: &mut Ctx) {
        let now = ctx.now;
        self.now = now;
        let dirty = std::mem::take(&mut self.dirty);
        let admitted = self.admit(now);
        self.update_convs(now, &admitted, dirty);
        self.collect_kcp(now);
        if self.fec_deadline().is_some_and(|d| d <= now) {
            self.fec_close(now);
        }
        self.expire_convs(now);
        // Key rotation: by age (the side with the higher key a little later,
        // so normally one side starts it) or by volume.
        if let Some(due) = self.rekey_due() {
            if now >= due && self.pending_init.is_none() && !self.dead {
                self.start_handshake(ctx);
            }
        }
        if self.previous.is_some() && now >= self.installed_at + self.cfg.old_key_window {
            if let Some(old) = self.previous.take() {
                ctx.indices.remove(&old.local_index);
            }
        }
        if let Some(h) = self.next_handshake {
            if now >= h && (self.wanted || self.current.is_some()) {
                if self.current.is_none() || self.dead || self.pending_init.is_some() {
                    self.start_handshake(ctx);
                } else {
                    self.next_handshake = None;
                }
            }
        }
        if self.current.is_some() {
            if !self.dead && now.saturating_sub(self.last_rx) >= self.dead_after {
                self.dead = true;
                self.events.push_back(Event::DeadLink);
                self.handshake_attempts = 0;
                self.start_handshake(ctx);
            }
            // (A session that never sent data is not active: its clock may
            // start near zero, and every session a node opened in its first
            // second used to ping every 10 ms until the clock passed 1 s.)
            // While the path-MTU search runs it pings as busily (unless it
            // carries control messages only, a member's with its hub): a probe
            // that goes unanswered counts against its size only if the
            // path answered something else meanwhile, and an idle session
            // would otherwise leave its search unsettled until data flows.
            let active = self
                .last_kcp_tx
                .is_some_and(|t| now.saturating_sub(t) < Duration::from_secs(1))
                || (self.pmtu_wanted && !self.control_only && self.pmtu.settled().is_none());
            // A session with no RTT yet (one that carries only control
            // messages and searches no MTU) measures one at once, then
            // goes quiet: its relayed traffic and path choice use it.
            let unmeasured = self.srtt.is_none();
            // While data flows the controller wants fresh RTT samples (its
            // queue signal); a ping scheduled at the idle interval is
            // brought forward as soon as data starts.
            let busy_every =
                (self.cc.min_rtt() / 4).clamp(Duration::from_millis(10), Duration::from_millis(50));
            if active && self.next_ping > now + busy_every {
                self.next_ping = now;
            }
            if unmeasured && self.next_ping > now + FIRST_RTT_EVERY {
                self.next_ping = now;
            }
            if now >= self.next_ping {
                self.send_control(&Control::Ping {
                    ts_us: now.as_micros() as u64,
                });
                // A quiet session pings a quarter as often: its RTT is not
                // in use, and keepalives and heartbeats keep it alive.
                self.next_ping = now
                    + if active {
                        busy_every
                    } else if unmeasured {
                        FIRST_RTT_EVERY
                    } else if self.paths.is_quiet() {
                        self.keepalive * 4
                    } else {
                        self.keepalive
                    };
            }
            let rx = self.current.as_ref().map(|k| k.rx).expect("current");
            // Reports follow data only: a report is itself a frame, and
            // answering frames with reports would keep two idle sides
            // reporting to each other every 20 ms forever.
            if rx.frames > self.reported && self.data_since_report && now >= self.next_feedback {
                self.reported = rx.frames;
                self.data_since_report = false;
                self.send_control(&Control::Feedback {
                    frames: rx.frames,
                    highest: rx.highest,
                    bytes: rx.bytes,
                });
                self.next_feedback = now + Duration::from_millis(20);
            }
            if now.saturating_sub(self.last_tx) >= self.keepalive && self.urgent.is_empty() {
                self.urgent
                    .push_back(Out::Plain(vec![Inner::Keepalive as u8]));
            }
            // A session on a relay keeps measuring: it goes direct as soon
            // as a direct path answers, instead of relaying its keepalives
            // through the hub for as long as it is idle.
            let relayed = matches!(self.paths.current(), Some(Via::Relay(_)));
            self.paths.set_quiet(
                now,
                !relayed && now.saturating_sub(self.last_data) >= super::QUIET_AFTER,
            );
            if let Some(via) = self.paths.current().filter(|_| self.pmtu_wanted) {
                let mut probes = Vec::new();
                // Confirm the size in use while frames of that size flow.
                let big = self.last_big_tx > Duration::ZERO
                    && now.saturating_sub(self.last_big_tx) < Duration::from_secs(1);
                let change = self
                    .pmtu
                    .poll_probe(now, self.srtt, self.last_rx, big, &mut probes);
                if let Some(c) = change {
                    self.pmtu_changed(c);
                }
                // The frame on the wire is `size` bytes (on a relayed path,
                // with the hub's wrapping).
                let relay = if matches!(via, Via::Relay(_)) {
                    wire::RELAY_OVERHEAD
                } else {
                    0
                };
                for (id, size) in probes {
                    let plain = size.saturating_sub(wire::DATA_OVERHEAD + relay).max(5);
                    let mut v = vec![0u8; plain];
                    v[0] = Inner::MtuProbe as u8;
                    v[1..5].copy_from_slice(&id.to_le_bytes());
                    self.urgent.push_back(Out::ProbeTo(via, v));
                }
            }
            self.poll_train(now);
            // Path choice only changes with probe rounds and answers (which
            // call `choose` themselves), so it is not redone on every timer.
            let probed = self.paths.poll_timeout().is_some_and(|t| t <= now);
            while let Some((via, id)) = self.paths.poll_probe(now) {
                if let Ok(m) = (Control::PathProbe { id }).encode() {
                    let mut v = Vec::with_capacity(1 + m.len());
                    v.push(Inner::Control as u8);
                    v.extend_from_slice(&m);
                    self.urgent.push_back(Out::PlainTo(via, v));
                }
            }
            if probed {
                self.paths.choose(now);
                self.track_path();
                if self.paths.wants_punch(now) && now >= self.next_punch_req {
                    self.events.push_back(Event::PunchWanted);
                    self.next_punch_req = now + PUNCH_REQUEST_EVERY;
                }
            }
        }
    }

    /// The path and frame size a capacity train would use now, if one is
    /// wanted: once the path MTU has settled on a direct path, before the
    /// session's first data, with a peer (not a hub, not a member's session
    /// with its hub). Sent while nothing else flows, its probes reach the
    /// far side spaced by the bottleneck alone; sent beside data, a
    /// receiver that read them in one batch answered them together, and
    /// the answers came back spaced by their own size (simulated: 1,400
    /// Mbit/s measured on a 100 Mbit/s path).
    fn train_path(&self) -> Option<(Via, usize)> {
        if self.control_only
            || !self.cfg.remote_flows
            || self.last_kcp_tx.is_some()
            || !self.cc.in_startup()
        {
            return None;
        }
        let size = self.pmtu.settled().filter(|_| self.pmtu_wanted)?;
        match self.paths.current()? {
            Via::Direct(a) => Some((Via::Direct(a), size)),
            Via::Relay(_) => None,
        }
    }

    /// When the capacity train next needs the timer: its answers' deadline,
    /// or when the next is to go.
    fn train_timeout(&self) -> Option<Duration> {
        self.train.deadline(self.srtt).or_else(|| {
            self.train_path()
                .and_then(|_| self.train.due_at())
                .map(|t| t.max(self.now))
        })
    }

    /// Send a capacity train when one is due, or estimate from the answers
    /// of one whose wait is over.
    fn poll_train(&mut self, now: Duration) {
        if self.train.deadline(self.srtt).is_some_and(|d| now >= d) {
            if let Some(rate) = self.train.expire(now) {
                self.cc.on_capacity_estimate(rate);
            }
        }
        let Some((via, size)) = self.train_path() else {
            return;
        };
        if self.train.due_at().is_none_or(|t| now < t) {
            return;
        }
        let plain = size.saturating_sub(wire::DATA_OVERHEAD).max(5);
        for id in self.train.start(now, size) {
            let mut v = vec![0u8; plain];
            v[0] = Inner::MtuProbe as u8;
            v[1..5].copy_from_slice(&id.to_le_bytes());
            self.urgent.push_back(Out::ProbeTo(via, v));
        }
        self.cc.on_burst(now);
    }
}
