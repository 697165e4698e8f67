//! Traffic for simulated meshes: self-checking packets pumped between the
//! peers of a [`World`] at fixed rates while turmoil steps, with the time each
//! one arrived.

use crate::traffic::{self, Kind};
use crate::world::World;
use std::time::Duration;

/// Packets pumped from one peer to another at a fixed rate, and what arrived.
struct Pump {
    from: usize,
    to: usize,
    flow: u16,
    kind: Kind,
    every: Duration,
    next: Duration,
    sent: Vec<Duration>,
}

/// Traffic for a [`World`]: pumps that send self-checking packets between
/// peers at fixed rates as simulated time passes, and what arrived when.
#[derive(Default)]
pub struct Pumps {
    pumps: Vec<Pump>,
    /// (flow, seq) -> simulated time of delivery.
    pub got: std::collections::BTreeMap<(u16, u32), Duration>,
}

impl Pumps {
    /// Send packets of `flow` (`kind`) from peer `from` to peer `to` every
    /// `every`, starting at `now`.
    pub fn pump(
        &mut self,
        from: usize,
        to: usize,
        flow: u16,
        kind: Kind,
        every: Duration,
        now: Duration,
    ) {
        self.pumps.push(Pump {
            from,
            to,
            flow,
            kind,
            every,
            next: now,
            sent: Vec::new(),
        });
    }

    /// Step until `cond` or `limit`; pumps send as time passes. Returns how
    /// long it took, or None at the limit.
    pub fn run(
        &mut self,
        sim: &mut turmoil::Sim<'static>,
        w: &mut World,
        limit: Duration,
        mut cond: impl FnMut(&World, &Pumps, Duration) -> bool,
    ) -> Option<Duration> {
        let start = sim.elapsed();
        loop {
            let now = sim.elapsed();
            if cond(w, self, now) {
                return Some(now - start);
            }
            if now - start > limit {
                return None;
            }
            for p in self.pumps.iter_mut() {
                while p.next <= now {
                    let seq = p.sent.len() as u32;
                    let pkt = traffic::packet(
                        w.peers[p.from].overlay,
                        w.peers[p.to].overlay,
                        p.kind,
                        p.flow,
                        seq,
                        400,
                    );
                    if w.peers[p.from].apps.send(pkt) {
                        p.sent.push(now);
                    }
                    p.next += p.every;
                }
            }
            sim.step().expect("step");
            let now = sim.elapsed();
            for peer in w.peers.iter_mut() {
                for pkt in peer.take_delivered() {
                    if let Some(t) = traffic::read(&pkt) {
                        self.got.entry((t.flow, t.seq)).or_insert(now);
                    }
                }
            }
        }
    }

    /// When each packet of `flow` was sent, by sequence number.
    pub fn sent(&self, flow: u16) -> &[Duration] {
        self.pumps
            .iter()
            .find(|p| p.flow == flow)
            .map_or(&[], |p| p.sent.as_slice())
    }

    /// Packets of `flow` sent in [from, to) and how many of them arrived.
    pub fn delivered(&self, flow: u16, from: Duration, to: Duration) -> (usize, usize) {
        let p = self.pumps.iter().find(|p| p.flow == flow).expect("flow");
        let sent: Vec<u32> = p
            .sent
            .iter()
            .enumerate()
            .filter(|(_, t)| **t >= from && **t < to)
            .map(|(i, _)| i as u32)
            .collect();
        let got = sent
            .iter()
            .filter(|s| self.got.contains_key(&(flow, **s)))
            .count();
        (sent.len(), got)
    }
}
