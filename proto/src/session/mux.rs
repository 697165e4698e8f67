//! The conversation multiplexer: which inner packets use KCP and which
//! conversation (one per TCP flow), opening, expiring and resetting
//! conversations, and feeding received KCP segments to them.

use super::FlowMode;
use super::{
    Out, Session, ACK_DELAY, CONTROL_WND, CONV_CONTROL, CONV_SHARED, IDLE_RESTART, TOMBSTONES,
};
use crate::ip;
use crate::path::Via;
use crate::wire::{self, segment::Segment, Control, Inner};
use kcp::Kcp;
use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Shared sink for KCP output (the kcp crate writes through `std::io::Write`).
#[derive(Clone, Default)]
pub(super) struct KcpSink(pub(super) Arc<Mutex<Vec<Vec<u8>>>>);

impl std::io::Write for KcpSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut v = Vec::with_capacity(buf.len() + 1);
        v.push(Inner::Kcp as u8);
        v.extend_from_slice(buf);
        self.0
            .lock()
            .map_err(|_| std::io::ErrorKind::Other)?
            .push(v);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub(super) struct Conv {
    pub(super) kcp: Kcp<KcpSink>,
    /// Inner packets waiting for the pacer before they enter KCP.
    pub(super) queue: VecDeque<Vec<u8>>,
    /// Acks owed since this time (sent within [`super::ACK_DELAY`] so they batch).
    pub(super) ack_owed: Option<Duration>,
    pub(super) last_active: Duration,
    pub(super) next_update_ms: u32,
    /// One past the highest KCP sequence number sent (to spot retransmissions).
    pub(super) next_sn: u32,
    /// Stream conversations: messages received, not yet taken by the proxy.
    pub(super) rx_msgs: VecDeque<super::StreamMsg>,
    /// Data bytes in `rx_msgs`.
    pub(super) rx_bytes: usize,
    /// Stream conversations: the proxy is done; drop when quiet.
    pub(super) closing: bool,
    /// A stream conversation with more data queued than it may send now
    /// (limited by the path, not by its application): its frames go
    /// without FEC. Set as data is admitted.
    pub(super) bulk: bool,
}

impl Conv {
    /// Whether KCP needs its clock: data unacknowledged or waiting, or acks
    /// owed. A quiet conversation needs no update until it sends or
    /// receives again (both run it at once), so it sets no timer.
    pub(super) fn busy(&self) -> bool {
        self.kcp.wait_snd() > 0 || !self.queue.is_empty() || self.ack_owed.is_some()
    }
}

impl Session {
    /// Whether the conversations keep KCP's clock (an update every KCP
    /// interval): while any of them is busy or any flow or stream
    /// conversation is open (until [`SessionConfig::conv_idle`] of quiet
    /// closes it). A session with only its control conversations, idle,
    /// sleeps until its next keepalive, probe or input: a hub's sessions
    /// and an idle mesh's. (Clocking only busy conversations changed the
    /// dynamics of transfers: the simulated clean-link ramp went bimodal,
    /// 380 or 700 Mbit/s where it had been 450-560.)
    ///
    /// [`SessionConfig::conv_idle`]: super::SessionConfig::conv_idle
    pub(super) fn kcp_clocked(&self) -> bool {
        self.convs.values().any(|c| c.busy())
            || self
                .convs
                .keys()
                .next_back()
                .is_some_and(|&id| id > CONV_SHARED)
    }

    pub(super) fn route(&mut self, now: Duration, pkt: &[u8], info: &ip::IpInfo) {
        let conv = match (self.cfg.flow_mode, info.proto) {
            (FlowMode::AllDatagram, _) => None,
            // Pure TCP acks need no retransmission (the next ack covers a lost
            // one) and must not queue behind a lost data segment: that would
            // stall the sender's ack clock (and its delivery-rate samples).
            (FlowMode::Auto, ip::PROTO_TCP) if ip::tcp_pure_ack(pkt) => None,
            (_, ip::PROTO_TCP) => Some(self.conv_for_flow(now, info)),
            (FlowMode::AllKcp, _) => Some(CONV_SHARED),
            (FlowMode::Auto, _) => None,
        };
        match conv {
            None => {
                if pkt.len() + 1 > self.cfg.plain_budget() {
                    self.stats.malformed += 1;
                    return;
                }
                if pkt.len() + 1 > self.plain_budget() {
                    // Larger than the path carries whole: it still goes
                    // (the kernel and routers fragment the frame), and a
                    // sender that asked not to be fragmented learns the size.
                    self.too_big(now, pkt);
                }
                let mut v = Vec::with_capacity(pkt.len() + 1);
                v.push(Inner::Ip as u8);
                v.extend_from_slice(pkt);
                self.urgent.push_back(Out::Plain(v));
            }
            Some(id) => {
                let mut owned = None;
                if info.proto == ip::PROTO_TCP {
                    if ip::tcp_flags(pkt).is_some_and(|f| f & ip::TCP_SYN != 0) {
                        owned = self.clamp_syn(pkt);
                    } else if pkt.len() > self.inner_mtu() {
                        // KCP cuts it into two segments; tell the sender.
                        self.too_big(now, pkt);
                    }
                }
                let pkt = owned.as_deref().unwrap_or(pkt);
                let max_backlog = self.cfg.max_backlog;
                let c = self.conv(now, id);
                if c.queue.len() >= max_backlog {
                    self.stats.backlog_dropped += 1;
                    return;
                }
                // Idle = nothing queued, nothing unacknowledged, no data sent
                // for a while (not a transfer stalled on its window).
                let idle = self.queued == 0
                    && self.paced_len == 0
                    && self
                        .last_kcp_tx
                        .is_none_or(|t| now.saturating_sub(t) >= IDLE_RESTART)
                    && self.convs.values().all(|c| c.kcp.wait_snd() == 0);
                let c = self.conv(now, id);
                c.queue.push_back(pkt.to_vec());
                c.last_active = now;
                self.queued += 1;
                self.dirty = true;
                if idle {
                    self.cc.restart_from_idle(now);
                }
            }
        }
    }

    pub(super) fn conv_for_flow(&mut self, now: Duration, info: &ip::IpInfo) -> u32 {
        let Some(key) = info.flow() else {
            return CONV_SHARED;
        };
        if let Some(&c) = self.flows.get(&key) {
            if self.convs.contains_key(&c) {
                return c;
            }
        }
        if self.own_convs() >= self.cfg.max_convs && !self.evict_idle(now) {
            return CONV_SHARED;
        }
        let id = (self.next_conv << 1) | self.my_bit;
        self.next_conv = self.next_conv.wrapping_add(1).max(1);
        self.flows.insert(key, id);
        self.conv(now, id);
        id
    }

    /// Flow and stream conversations this side opened.
    pub(super) fn own_convs(&self) -> usize {
        self.convs
            .keys()
            .filter(|&&c| c > CONV_SHARED && c & 1 == self.my_bit)
            .count()
    }

    pub(super) fn evict_idle(&mut self, now: Duration) -> bool {
        let victim = self
            .convs
            .iter()
            .filter(|(&id, c)| {
                // A stream conversation is a live connection, however quiet:
                // only one its proxy is done with may go.
                id > CONV_SHARED
                    && id & 1 == self.my_bit
                    && c.kcp.wait_snd() == 0
                    && (!super::is_stream(id) || c.closing)
            })
            .min_by_key(|(_, c)| c.last_active)
            .map(|(&id, _)| id);
        match victim {
            Some(id) => {
                self.close_conv(id);
                let _ = now;
                true
            }
            None => false,
        }
    }

    pub(super) fn close_conv(&mut self, id: u32) {
        if let Some(c) = self.convs.remove(&id) {
            self.queued -= c.queue.len();
            if super::is_stream(id) {
                self.streams_ready.remove(&id);
                self.streams_gone.push_back(id);
            }
        }
        self.flows.retain(|_, c| *c != id);
        if id > CONV_SHARED && self.tombstone_set.insert(id) {
            self.tombstones.push_back(id);
            if self.tombstones.len() > TOMBSTONES {
                if let Some(old) = self.tombstones.pop_front() {
                    self.tombstone_set.remove(&old);
                }
            }
        }
    }

    /// The largest frame to send on the path in use: its discovered MTU;
    /// on a relayed path, less the relay's wrapping, so relayed frames need
    /// no IP fragmentation either.
    pub(super) fn frame_budget(&self) -> usize {
        let relayed = matches!(self.paths.current(), Some(Via::Relay(_)));
        self.pmtu.current() - if relayed { wire::RELAY_OVERHEAD } else { 0 }
    }

    /// Largest plaintext (inner type byte + payload) of a frame on the path in use.
    pub(super) fn plain_budget(&self) -> usize {
        self.frame_budget() - wire::DATA_OVERHEAD
    }

    /// KCP's MTU: the plaintext budget less the type byte and room for the
    /// FEC wrapping (KCP splits larger inner packets into two segments).
    pub(super) fn kcp_mtu(&self) -> usize {
        self.plain_budget() - 1 - super::fec::FEC_RESERVE
    }

    /// The largest inner packet one KCP segment carries on the path in use:
    /// what inner senders are told (ICMP "too big", MSS clamping).
    pub(super) fn inner_mtu(&self) -> usize {
        self.kcp_mtu() - kcp::KCP_OVERHEAD
    }

    /// Every conversation cuts its segments to the path in use.
    pub(super) fn resize_convs(&mut self) {
        let m = self.kcp_mtu();
        for c in self.convs.values_mut() {
            let _ = c.kcp.set_mtu(m);
        }
    }

    /// Tell the local sender of `pkt` (which asked not to be fragmented)
    /// how large its packets may be, once the search has settled; at most
    /// ten a second.
    pub(super) fn too_big(&mut self, now: Duration, pkt: &[u8]) {
        if self.pmtu.settled().is_none() || now < self.next_too_big || !ip::dont_fragment(pkt) {
            return;
        }
        if let Some(icmp) = ip::too_big(pkt, self.inner_mtu()) {
            self.next_too_big = now + Duration::from_millis(100);
            self.stats.too_big_sent += 1;
            self.rx.push_back(icmp);
        }
    }

    /// A SYN whose MSS asks for segments larger than one KCP segment of the
    /// settled path carries: a copy with the MSS lowered (None: left as is).
    fn clamp_syn(&mut self, pkt: &[u8]) -> Option<Vec<u8>> {
        self.pmtu.settled()?;
        let hdrs = if pkt.first()? >> 4 == 4 { 40 } else { 60 };
        let mss = self.inner_mtu().checked_sub(hdrs)?.min(u16::MAX as usize) as u16;
        let mut v = pkt.to_vec();
        if ip::clamp_mss(&mut v, mss) {
            self.stats.mss_clamped += 1;
            Some(v)
        } else {
            None
        }
    }

    pub(super) fn conv(&mut self, now: Duration, id: u32) -> &mut Conv {
        let kcp_mtu = self.kcp_mtu();
        let cfg = &self.cfg;
        let sink = &self.sink;
        let fec_on = self.fec_on;
        self.convs.entry(id).or_insert_with(|| {
            let mut kcp = Kcp::new(id, sink.clone());
            tune_resend(&mut kcp, cfg.profile, fec_on, None);
            let _ = kcp.set_mtu(kcp_mtu);
            // The controller limits inflight (`window_full`); KCP only by the
            // receiver. Control messages are small and few: their window is
            // small, which bounds what a session's control conversation holds.
            let wnd = if id == CONV_CONTROL {
                CONTROL_WND
            } else {
                cfg.rcv_wnd
            };
            kcp.set_wndsize(wnd, wnd);
            kcp.set_maximum_resend_times(u32::MAX);
            let ms = now.as_millis() as u32;
            let _ = kcp.update(ms);
            Box::new(Conv {
                kcp,
                queue: VecDeque::new(),
                ack_owed: None,
                last_active: now,
                next_update_ms: ms,
                next_sn: 0,
                rx_msgs: VecDeque::new(),
                rx_bytes: 0,
                closing: false,
                bulk: false,
            })
        })
    }

    pub(super) fn reset_convs(&mut self) {
        self.streams_ready.clear();
        self.streams_gone
            .extend(self.convs.keys().copied().filter(|&c| super::is_stream(c)));
        self.convs.clear();
        self.flows.clear();
        self.queued = 0;
        self.paced.clear();
        self.paced_len = 0;
        self.tombstones.clear();
        self.tombstone_set.clear();
        if let Ok(mut s) = self.sink.0.lock() {
            s.clear();
        }
    }

    pub(super) fn deliver(&mut self, now: Duration, pkt: &[u8], conv: Option<u32>) {
        let Some(info) = ip::parse(pkt) else {
            self.stats.malformed += 1;
            return;
        };
        if let (Some(c), Some(key)) = (conv, info.flow()) {
            if c > CONV_SHARED {
                self.flows.entry(key).or_insert(c);
            }
        }
        let _ = now;
        self.stats.ip_rx += 1;
        self.rx.push_back(pkt.to_vec());
    }

    pub(super) fn on_kcp(&mut self, now: Duration, segs: &[u8]) {
        let Some(first) = Segment::new_checked(segs) else {
            self.stats.malformed += 1;
            return;
        };
        let id = first.conv();
        if !self.convs.contains_key(&id) {
            let remote_made = id > CONV_SHARED && id & 1 != self.my_bit;
            let remote_count = self
                .convs
                .keys()
                .filter(|&&c| c > CONV_SHARED && c & 1 != self.my_bit)
                .count();
            let acceptable = id == CONV_CONTROL
                || (self.cfg.remote_flows && id == CONV_SHARED)
                || (self.cfg.remote_flows
                    && remote_made
                    && !self.tombstone_set.contains(&id)
                    && remote_count < 2 * self.cfg.max_convs);
            if !acceptable {
                self.send_control(&Control::ConvReset { conv: id });
                return;
            }
        }
        let c = self.conv(now, id);
        c.last_active = now;
        c.ack_owed.get_or_insert(now);
        let bad_input = c.kcp.input(segs).is_err();
        if super::is_stream(id) {
            if bad_input {
                self.stats.malformed += 1;
            }
            self.pull_stream(now, id);
            return;
        }
        let mut msgs = Vec::new();
        while let Ok(n) = c.kcp.peeksize() {
            let mut m = vec![0u8; n];
            match c.kcp.recv(&mut m) {
                Ok(k) => {
                    m.truncate(k);
                    msgs.push(m);
                }
                Err(_) => break,
            }
        }
        if bad_input {
            self.stats.malformed += 1;
        }
        for m in msgs {
            if id == CONV_CONTROL {
                match Control::decode(&m) {
                    Ok(msg) => self.on_control(now, msg),
                    Err(_) => self.stats.malformed += 1,
                }
            } else {
                self.deliver(now, &m, Some(id));
            }
        }
    }

    /// Run KCP's clock for the conversations that are due, and flush at once
    /// those that got new data (`admitted`), owe acks, or (`control_dirty`)
    /// carry a new control message.
    pub(super) fn update_convs(
        &mut self,
        now: Duration,
        admitted: &BTreeSet<u32>,
        control_dirty: bool,
    ) {
        let now_ms = now.as_millis() as u32;
        let clocked = self.kcp_clocked();
        for (id, c) in self.convs.iter_mut() {
            let due = (now_ms.wrapping_sub(c.next_update_ms) as i32) >= 0 && clocked;
            let fresh = admitted.contains(id) || (control_dirty && *id == CONV_CONTROL);
            let acks = c.ack_owed.is_some_and(|a| now >= a + ACK_DELAY);
            if due || fresh || acks {
                let _ = c.kcp.update(now_ms);
                if fresh || acks {
                    let _ = c.kcp.flush();
                }
                c.ack_owed = None;
                c.next_update_ms = now_ms.wrapping_add(c.kcp.check(now_ms).max(1));
            }
        }
    }

    /// Once a second: close flow conversations idle for `conv_idle` with
    /// nothing unacknowledged.
    pub(super) fn expire_convs(&mut self, now: Duration) {
        if now < self.next_expiry || self.convs.is_empty() {
            return;
        }
        self.next_expiry = now + Duration::from_secs(1);
        let idle = self.cfg.conv_idle;
        let expired: Vec<u32> = self
            .convs
            .iter()
            .filter(|(&id, c)| {
                let quiet = now.saturating_sub(c.last_active);
                id > CONV_SHARED
                    && c.kcp.wait_snd() == 0
                    && c.queue.is_empty()
                    && if super::is_stream(id) {
                        // Open connections stay (TCP may idle for hours).
                        c.closing && quiet >= super::stream::STREAM_LINGER
                    } else {
                        quiet >= idle
                    }
            })
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            self.close_conv(id);
        }
    }
}

/// The least retransmission timeout of a control conversation. Control
/// messages (registrations, peer-map deltas) are small and not urgent to the
/// millisecond, and their round trip includes the other side's processing:
/// a hub admitting a thousand members at once answers each one late, and with
/// the fast profile's 30 ms every control segment in flight timed out and was
/// sent again, over and over (`fastmesh-lab hubload 1000`: 36 s for all to
/// register). A loss costs at most this much more.
pub(super) const CONTROL_MIN_RTO: u32 = 200;

/// KCP's retransmission settings for `profile`. While FEC protects the data
/// frames, a segment is not resent fast (after a few later segments were
/// acknowledged) but only after a group's worth were, or at its timeout:
/// parity usually rebuilds it first, and resending what parity repairs
/// doubles the cost of every loss.
///
/// A bulk stream's timeout is at least `rto_floor` (see [`bulk_rto_floor`]).
pub(super) fn tune_resend(
    kcp: &mut Kcp<KcpSink>,
    profile: super::KcpProfile,
    fec_on: bool,
    rto_floor: Option<u32>,
) {
    let (nodelay, interval, resend, min_rto) = profile.params();
    let min_rto = min_rto.max(rto_floor.unwrap_or(0));
    let min_rto = if kcp.conv() == super::CONV_CONTROL {
        min_rto.max(CONTROL_MIN_RTO)
    } else {
        min_rto
    };
    let resend = if fec_on && resend > 0 {
        (super::fec::MAX_GROUP + 4) as u32
    } else {
        resend
    };
    kcp.set_nodelay(nodelay, interval as i32, resend as i32, true);
    kcp.set_rx_minrto(min_rto);
}

impl Session {
    /// [`bulk_rto_floor`] for this session's path now.
    pub(super) fn bulk_rto_floor(&self) -> u32 {
        bulk_rto_floor(self.cc.min_rtt())
    }
}

/// The least retransmission timeout of a bulk stream: twice the least RTT
/// plus 10 ms, in every phase of the controller. KCP's own timeout is the
/// smoothed RTT plus about 20 ms; each time the queue on the path grew by
/// more than that, a bulk stream's segments in flight timed out together
/// and were sent again with nothing lost. Startup lets the queue grow by up
/// to the path's RTT (its window is twice the bandwidth-delay product), and
/// afterwards a probe adds a quarter of it on top of whatever queue stands
/// (lab, 50 ms / 100 Mbit/s at 5% loss: round trips of 60-90 ms in steady
/// state). The earlier floor after startup, 1.5x + 10 ms (85 ms there),
/// resent 3,800-4,000 frames in an 8-s transfer; this one 3,500-3,600. A bulk
/// stream's losses are repaired by fast resend (later segments
/// acknowledged), so the timeout serves little else: a segment whose fast
/// resends are used up waits for it.
pub(super) fn bulk_rto_floor(min_rtt: Duration) -> u32 {
    (min_rtt.as_millis() as u32)
        .saturating_mul(2)
        .saturating_add(10)
}
