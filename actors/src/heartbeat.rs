//! Heartbeat supervision as a pure state machine: when to register with each
//! hub, when to heartbeat hubs and peers, when a hub is gone (re-register) and
//! when a peer session has failed (restart it). The caller passes `now`,
//! reports what arrived, and carries out the returned [`Action`]s.

use std::collections::BTreeMap;
use std::time::Duration;
use transport::wire::PublicKey;

/// Supervision settings.
#[derive(Debug, Clone)]
pub struct HeartbeatConfig {
    /// Heartbeat interval (hub and peers).
    pub interval: Duration,
    /// A peer not heard from for this many intervals has its session restarted.
    pub peer_dead_beats: u32,
    /// Longest wait between attempts to reach an unreachable hub, in heartbeat
    /// intervals (so a returning hub has everyone back within that many, plus one).
    pub hub_retry_beats: u32,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            interval: Duration::from_secs(5),
            peer_dead_beats: 4,
            hub_retry_beats: 2,
        }
    }
}

/// Where we stand with one hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubPhase {
    /// Not registered; trying (attempt count).
    Connecting {
        /// Attempts so far.
        attempts: u32,
    },
    /// Registered and heartbeating.
    Registered,
    /// The hub refused us for good (e.g. our address is owned by another key).
    Refused {
        /// The hub's reason.
        reason: String,
    },
}

/// One hub.
#[derive(Debug, Clone)]
pub struct HubLink {
    /// Hub key.
    pub key: PublicKey,
    /// Phase.
    pub phase: HubPhase,
    /// Last ack (registration or heartbeat).
    pub last_ack: Option<Duration>,
    /// Round-trip time of the last acked heartbeat.
    pub rtt: Option<Duration>,
    /// Registrations completed (1 + re-registrations).
    pub registrations: u64,
    next_at: Duration,
    seq: u64,
    awaiting: Option<(u64, Duration)>,
}

/// One peer.
#[derive(Debug, Clone)]
pub struct PeerLink {
    /// Last time anything came back from the peer.
    pub last_heard: Option<Duration>,
    /// Last heartbeat from the peer (or ack of ours, from older peers).
    pub last_ack: Option<Duration>,
    /// Heartbeat round-trip time (only from older peers' acks).
    pub rtt: Option<Duration>,
    /// Times the session was restarted.
    pub restarts: u64,
    since: Duration,
    next_at: Duration,
    seq: u64,
    sent: BTreeMap<u64, Duration>,
}

/// What the supervisor must do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Open a fresh session with the hub and send a registration.
    Register(PublicKey),
    /// Heartbeat the hub.
    HubHeartbeat {
        /// Hub.
        to: PublicKey,
        /// Sequence number.
        seq: u64,
    },
    /// Heartbeat a peer.
    PeerHeartbeat {
        /// Peer.
        to: PublicKey,
        /// Sequence number.
        seq: u64,
    },
    /// The peer's session failed: tear it down and start a new one.
    RestartPeer(PublicKey),
}

/// The supervisor's state.
#[derive(Debug, Clone)]
pub struct Heartbeats {
    cfg: HeartbeatConfig,
    hubs: BTreeMap<PublicKey, HubLink>,
    peers: BTreeMap<PublicKey, PeerLink>,
}

impl Heartbeats {
    /// Supervise `hubs`, starting at `now` (registration is due at once).
    pub fn new(cfg: HeartbeatConfig, hubs: &[PublicKey], now: Duration) -> Heartbeats {
        let mut hb = Heartbeats {
            cfg,
            hubs: BTreeMap::new(),
            peers: BTreeMap::new(),
        };
        for k in hubs {
            hb.add_hub(*k, now);
        }
        hb
    }

    /// Supervise `hub` too (registration due at `now`); a known hub keeps
    /// its state.
    pub fn add_hub(&mut self, hub: PublicKey, now: Duration) {
        self.hubs.entry(hub).or_insert(HubLink {
            key: hub,
            phase: HubPhase::Connecting { attempts: 0 },
            last_ack: None,
            rtt: None,
            registrations: 0,
            next_at: now,
            seq: 0,
            awaiting: None,
        });
    }

    /// Stop supervising `hub`.
    pub fn remove_hub(&mut self, hub: &PublicKey) {
        self.hubs.remove(hub);
    }

    /// Settings.
    pub fn config(&self) -> &HeartbeatConfig {
        &self.cfg
    }

    /// Adopt the heartbeat interval a hub asked for.
    pub fn set_interval(&mut self, interval: Duration) {
        if interval >= Duration::from_millis(50) {
            self.cfg.interval = interval;
        }
    }

    /// The hubs.
    pub fn hubs(&self) -> impl Iterator<Item = &HubLink> {
        self.hubs.values()
    }

    /// One peer's link state.
    pub fn peer(&self, k: &PublicKey) -> Option<&PeerLink> {
        self.peers.get(k)
    }

    /// True if at least one hub has us registered.
    pub fn registered(&self) -> bool {
        self.hubs.values().any(|h| h.phase == HubPhase::Registered)
    }

    /// Start supervising `peer`.
    pub fn add_peer(&mut self, peer: PublicKey, now: Duration) {
        self.peers.entry(peer).or_insert(PeerLink {
            last_heard: None,
            last_ack: None,
            rtt: None,
            restarts: 0,
            since: now,
            next_at: now,
            seq: 0,
            sent: BTreeMap::new(),
        });
    }

    /// Stop supervising `peer`.
    pub fn remove_peer(&mut self, peer: &PublicKey) {
        self.peers.remove(peer);
    }

    fn backoff(&self, attempts: u32) -> Duration {
        let exp = attempts.saturating_sub(1).min(16);
        let cap = self.cfg.interval * self.cfg.hub_retry_beats.max(1);
        (self.cfg.interval * (1u32 << exp)).min(cap)
    }

    /// Run due work.
    pub fn poll(&mut self, now: Duration, out: &mut Vec<Action>) {
        let interval = self.cfg.interval;
        let keys: Vec<PublicKey> = self.hubs.keys().copied().collect();
        for k in keys {
            let backoff_next = {
                let h = &self.hubs[&k];
                match h.phase {
                    HubPhase::Connecting { attempts } => self.backoff(attempts + 1),
                    _ => interval,
                }
            };
            let Some(h) = self.hubs.get_mut(&k) else {
                continue;
            };
            if now < h.next_at {
                continue;
            }
            match h.phase.clone() {
                HubPhase::Refused { .. } => {}
                HubPhase::Connecting { attempts } => {
                    out.push(Action::Register(k));
                    h.phase = HubPhase::Connecting {
                        attempts: attempts + 1,
                    };
                    h.next_at = now + backoff_next;
                }
                HubPhase::Registered => {
                    if h.awaiting.is_some() {
                        // A whole interval without an ack: the hub restarted or
                        // the path broke. Re-register over a fresh handshake.
                        h.awaiting = None;
                        h.phase = HubPhase::Connecting { attempts: 1 };
                        out.push(Action::Register(k));
                        h.next_at = now + interval;
                    } else {
                        h.seq += 1;
                        h.awaiting = Some((h.seq, now));
                        out.push(Action::HubHeartbeat { to: k, seq: h.seq });
                        h.next_at = now + interval;
                    }
                }
            }
        }
        let dead_after = interval * self.cfg.peer_dead_beats;
        for (k, p) in self.peers.iter_mut() {
            if now < p.next_at {
                continue;
            }
            let heard = p.last_heard.unwrap_or(p.since);
            if now.saturating_sub(heard) > dead_after {
                p.restarts += 1;
                p.since = now;
                p.last_heard = None;
                p.sent.clear();
                out.push(Action::RestartPeer(*k));
            }
            p.seq += 1;
            p.sent.insert(p.seq, now);
            while p.sent.len() > 8 {
                p.sent.pop_first();
            }
            out.push(Action::PeerHeartbeat { to: *k, seq: p.seq });
            p.next_at = now + interval;
        }
    }

    /// Earliest time `poll` has work.
    pub fn next_wakeup(&self) -> Option<Duration> {
        self.hubs
            .values()
            .filter(|h| !matches!(h.phase, HubPhase::Refused { .. }))
            .map(|h| h.next_at)
            .chain(self.peers.values().map(|p| p.next_at))
            .min()
    }

    /// A hub accepted our registration.
    pub fn on_registered(&mut self, hub: &PublicKey, now: Duration) {
        let interval = self.cfg.interval;
        if let Some(h) = self.hubs.get_mut(hub) {
            h.phase = HubPhase::Registered;
            h.last_ack = Some(now);
            h.awaiting = None;
            h.registrations += 1;
            h.next_at = now + interval;
        }
    }

    /// A hub acked heartbeat `seq`.
    pub fn on_hub_ack(&mut self, hub: &PublicKey, seq: u64, now: Duration) {
        if let Some(h) = self.hubs.get_mut(hub) {
            if let Some((s, sent)) = h.awaiting {
                if s == seq {
                    h.awaiting = None;
                    h.rtt = Some(now.saturating_sub(sent));
                }
            }
            h.last_ack = Some(now);
        }
    }

    /// A hub says we are not registered (it restarted or expired us): register now.
    pub fn on_hub_forgot(&mut self, hub: &PublicKey, now: Duration) {
        if let Some(h) = self.hubs.get_mut(hub) {
            if !matches!(h.phase, HubPhase::Refused { .. }) {
                h.phase = HubPhase::Connecting { attempts: 0 };
                h.awaiting = None;
                h.next_at = now;
            }
        }
    }

    /// A hub refused us for good.
    pub fn on_hub_refused(&mut self, hub: &PublicKey, reason: String) {
        if let Some(h) = self.hubs.get_mut(hub) {
            h.phase = HubPhase::Refused { reason };
        }
    }

    /// Something authenticated came from `peer`.
    pub fn on_peer_heard(&mut self, peer: &PublicKey, now: Duration) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.last_heard = Some(now);
        }
    }

    /// A heartbeat came from `peer`.
    pub fn on_peer_heartbeat(&mut self, peer: &PublicKey, now: Duration) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.last_ack = Some(now);
            p.last_heard = Some(now);
        }
    }

    /// `peer` acked heartbeat `seq` (older peers ack every heartbeat).
    pub fn on_peer_ack(&mut self, peer: &PublicKey, seq: u64, now: Duration) {
        if let Some(p) = self.peers.get_mut(peer) {
            if let Some(sent) = p.sent.remove(&seq) {
                p.rtt = Some(now.saturating_sub(sent));
            }
            p.last_ack = Some(now);
            p.last_heard = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HUB: PublicKey = [1; 32];
    const PEER: PublicKey = [2; 32];

    fn s(x: u64) -> Duration {
        Duration::from_secs(x)
    }

    fn cfg() -> HeartbeatConfig {
        HeartbeatConfig {
            interval: s(1),
            peer_dead_beats: 3,
            hub_retry_beats: 2,
        }
    }

    #[test]
    fn registers_then_heartbeats_every_interval() {
        let mut h = Heartbeats::new(cfg(), &[HUB], s(0));
        let mut out = vec![];
        h.poll(s(0), &mut out);
        assert_eq!(out, vec![Action::Register(HUB)]);
        h.on_registered(&HUB, s(0));
        for t in 1..=3 {
            out.clear();
            h.poll(s(t), &mut out);
            assert_eq!(out, vec![Action::HubHeartbeat { to: HUB, seq: t }]);
            h.on_hub_ack(&HUB, t, s(t));
        }
        assert!(h.registered());
    }

    #[test]
    fn missed_ack_reregisters_within_one_interval() {
        let mut h = Heartbeats::new(cfg(), &[HUB], s(0));
        let mut out = vec![];
        h.poll(s(0), &mut out);
        h.on_registered(&HUB, s(0));
        out.clear();
        h.poll(s(1), &mut out); // heartbeat 1, never acked (hub restarted)
        out.clear();
        h.poll(s(2), &mut out);
        assert_eq!(out, vec![Action::Register(HUB)]);
        assert!(!h.registered());
        h.on_registered(&HUB, s(2));
        assert!(h.registered());
        assert_eq!(h.hubs().next().unwrap().registrations, 2);
    }

    #[test]
    fn unreachable_hub_is_retried_with_capped_backoff() {
        let mut h = Heartbeats::new(cfg(), &[HUB], s(0));
        let mut at = vec![];
        for ms in (0..20_000).step_by(100) {
            let mut out = vec![];
            h.poll(Duration::from_millis(ms), &mut out);
            if !out.is_empty() {
                at.push(ms);
            }
        }
        // 0, +1 s, then every 2 s (the cap).
        assert_eq!(&at[..4], &[0, 1000, 3000, 5000]);
        assert!(at.windows(2).all(|w| w[1] - w[0] <= 2000));
    }

    /// Ten seconds of polling with one peer that is heard (by `hear`) until
    /// t=4 and silent after; returns the heartbeats and the restarts.
    fn heard_until_4(hear: impl Fn(&mut Heartbeats, u64)) -> (Heartbeats, usize) {
        let mut h = Heartbeats::new(cfg(), &[], s(0));
        h.add_peer(PEER, s(0));
        let mut restarts = 0;
        for t in 0..10 {
            let mut out = vec![];
            h.poll(s(t), &mut out);
            assert!(
                out.iter()
                    .any(|a| matches!(a, Action::PeerHeartbeat { .. })),
                "we keep sending ours at {t}"
            );
            restarts += out
                .iter()
                .filter(|a| matches!(a, Action::RestartPeer(_)))
                .count();
            if t < 5 {
                hear(&mut h, t);
            }
        }
        (h, restarts)
    }

    #[test]
    fn silent_peer_is_restarted_and_heard_peer_is_not() {
        // Acks of ours (from older peers) arrive until t=4.
        let (h, restarts) = heard_until_4(|h, t| h.on_peer_ack(&PEER, t + 1, s(t)));
        // Heard at 4; dead after 3 s of silence -> restart at 8.
        assert_eq!(restarts, 1);
        assert_eq!(h.peer(&PEER).unwrap().restarts, 1);
    }

    /// Peers do not ack each other's heartbeats: the other side's own
    /// heartbeats keep the link alive, and their silence restarts it.
    #[test]
    fn heard_heartbeats_keep_a_peer_alive_without_acks() {
        let (h, restarts) = heard_until_4(|h, t| h.on_peer_heartbeat(&PEER, s(t)));
        assert_eq!(restarts, 1, "heard at 4; restarted after 3 s of silence");
        let p = h.peer(&PEER).unwrap();
        assert_eq!(p.last_ack, Some(s(4)), "shown as the last heartbeat");
        assert_eq!(p.rtt, None, "no RTT without acks");
    }

    #[test]
    fn refused_hub_stops_trying_and_forgotten_hub_registers_now() {
        let mut h = Heartbeats::new(cfg(), &[HUB, PEER], s(0));
        h.on_hub_refused(&HUB, "address in use".into());
        let mut out = vec![];
        h.poll(s(0), &mut out);
        assert_eq!(out, vec![Action::Register(PEER)]);
        h.on_registered(&PEER, s(0));
        h.on_hub_forgot(&PEER, Duration::from_millis(300));
        out.clear();
        h.poll(Duration::from_millis(300), &mut out);
        assert_eq!(out, vec![Action::Register(PEER)]);
    }
}
