//! Inner TCP connections for the chaos runner: a real TCP endpoint
//! ([`TcpHost`], smoltcp) on every peer's TUN side, and connections around
//! the ring of peers (peer i to peer i+1), one at a time per pair, started
//! again as each one ends, for the whole run.
//!
//! Every sender writes a checkable byte pattern; the receiver checks each
//! byte at its offset, so a lost, repeated or misplaced segment shows as
//! corruption. Some receivers read slowly (the connection lasts seconds and
//! its buffers fill: back-pressure across the mesh), some answer after the
//! sender's FIN (half-close).
//!
//! What a connection may do under faults: complete (every byte once and in
//! order, both ways, both FINs), or break, provided both ends learn it (a
//! reset or a refusal, or the application's own keep-alive giving up). A
//! connection that neither completes nor is reported broken to both ends
//! within the recovery bound is a violation: an application would wait on
//! it forever.

use crate::tcp_host::{AppKind, AppStats, TcpHost};
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;
use transport::ip;

/// Ports at or above this are the TCP hosts' (the tagged flows of the
/// chaos runner use lower ones).
pub const PORT_BASE: u16 = 40_000;
/// Socket buffers of the TCP hosts (each direction).
const BUFFER: usize = 64 * 1024;
/// The applications' keep-alive interval and the time after which they
/// give up on a connection nothing answers. A split connection's proxy
/// holds its state in the fastmesh process: when that process restarts, an
/// application idle in FIN-WAIT-2 (or waiting to read) hears nothing, as
/// if the far host had rebooted, and only a keep-alive finds out.
const KEEPALIVE: Duration = Duration::from_secs(5);
const USER_TIMEOUT: Duration = Duration::from_secs(15);
/// Pause between one connection's end and the next on a pair.
const PAUSE: Duration = Duration::from_millis(300);

/// Whether `pkt` belongs to the TCP hosts' connections.
pub fn is_stream_packet(pkt: &[u8]) -> bool {
    ip::parse(pkt).is_some_and(|i| {
        i.proto == ip::PROTO_TCP
            && i.ports
                .is_some_and(|(s, d)| s >= PORT_BASE && d >= PORT_BASE)
    })
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Every byte both ways, both FINs.
    Complete,
    /// Broken, and both ends know.
    Broken,
}

struct Conn {
    from: usize,
    to: usize,
    sink: usize,
    send: usize,
    port: u16,
    started: Duration,
    total: u64,
    reply: u64,
    ended: Option<(Duration, Ending)>,
    flagged: bool,
}

/// The TCP hosts and their connections.
pub struct Streams {
    hosts: Vec<TcpHost>,
    /// When each host next needs a poll (None: only on input).
    due: Vec<Option<Duration>>,
    conns: Vec<Conn>,
    next_port: u16,
    /// Per ring pair (by sender), when the next connection may start.
    next_start: Vec<Duration>,
    /// Per ring pair (by sender), the connection under way (index into
    /// `conns`).
    active: Vec<Option<usize>>,
    /// Peers no connection starts from or to any more (revoked).
    stopped: BTreeSet<usize>,
    /// Connections completed.
    pub completed: u64,
    /// Connections broken (both ends told).
    pub broken: u64,
    /// Bytes the receivers read and checked.
    pub bytes: u64,
}

impl Streams {
    /// A TCP host at each address (the peers' overlay IPv4 addresses), on
    /// TUN devices of MTU `mtu`.
    pub fn new(addrs: &[Ipv4Addr], mtu: usize) -> Streams {
        Streams {
            hosts: addrs
                .iter()
                .map(|a| {
                    TcpHost::new(IpAddr::V4(*a), mtu, BUFFER)
                        .with_keepalive(KEEPALIVE, USER_TIMEOUT)
                })
                .collect(),
            due: vec![Some(Duration::ZERO); addrs.len()],
            conns: Vec::new(),
            next_port: PORT_BASE,
            next_start: vec![Duration::ZERO; addrs.len()],
            active: vec![None; addrs.len()],
            stopped: BTreeSet::new(),
            completed: 0,
            broken: 0,
            bytes: 0,
        }
    }

    /// A packet peer `at` wrote to its TUN for its TCP host.
    pub fn input(&mut self, at: usize, pkt: Vec<u8>) {
        self.hosts[at].input(pkt);
        self.due[at] = Some(Duration::ZERO);
    }

    /// Start no more connections from or to peer `i`; the ones it has need
    /// to be reported broken only to the other end.
    pub fn stop(&mut self, i: usize) {
        self.stopped.insert(i);
    }

    /// Run the hosts at `now`: start connections that are due, move bytes;
    /// returns the packets each host sends into its peer's TUN.
    pub fn poll(&mut self, now: Duration) -> Vec<(usize, Vec<u8>)> {
        let n = self.hosts.len();
        if n >= 2 {
            for from in 0..n {
                let to = (from + 1) % n;
                if self.active[from].is_some()
                    || now < self.next_start[from]
                    || self.stopped.contains(&from)
                    || self.stopped.contains(&to)
                {
                    continue;
                }
                self.start(now, from, to);
            }
        }
        let mut out = Vec::new();
        for (i, h) in self.hosts.iter_mut().enumerate() {
            if self.due[i].is_some_and(|t| t <= now) {
                out.extend(h.poll(now).into_iter().map(|p| (i, p)));
                self.due[i] = h.poll_at(now);
            }
        }
        out
    }

    fn start(&mut self, now: Duration, from: usize, to: usize) {
        let k = self.conns.len() as u64;
        let port = self.next_port;
        self.next_port = self.next_port.checked_add(1).unwrap_or(PORT_BASE);
        // Sizes and behaviours vary with the connection's number: fast and
        // slow readers, with and without an answer after the FIN.
        let total = 48 * 1024 * (1 + k % 5);
        let reply = if k.is_multiple_of(2) { 2048 } else { 0 };
        let rate = (k % 3 == 2).then_some(96_000.0);
        let to_addr = self.hosts[to].addr();
        self.due[from] = Some(now);
        self.due[to] = Some(now);
        let sink = self.hosts[to].add(
            now,
            AppKind::Sink {
                port,
                rate,
                reply,
                abort_after: None,
            },
        );
        let send = self.hosts[from].add(
            now,
            AppKind::Send {
                to: SocketAddr::new(to_addr, port),
                port,
                total,
            },
        );
        self.active[from] = Some(self.conns.len());
        self.conns.push(Conn {
            from,
            to,
            sink,
            send,
            port,
            started: now,
            total,
            reply,
            ended: None,
            flagged: false,
        });
    }

    fn stats(&self, c: &Conn) -> (&AppStats, &AppStats) {
        (
            &self.hosts[c.from].apps[c.send].stats,
            &self.hosts[c.to].apps[c.sink].stats,
        )
    }

    /// Check every connection: report corruption and repeats through
    /// `violation`, and settle the ones that completed or broke at both ends.
    pub fn check(&mut self, now: Duration, mut violation: impl FnMut(String)) {
        for k in self.active.clone().into_iter().flatten() {
            let c = &self.conns[k];
            let (snd, snk) = self.stats(c);
            let what = format!(
                "TCP connection {} (peer{} -> peer{}, port {})",
                k, c.from, c.to, c.port
            );
            let mut bad = Vec::new();
            if snk.corrupt || snd.corrupt {
                bad.push(format!(
                    "{what}: a byte arrived out of place (lost, repeated or reordered data)"
                ));
            }
            if snk.read > c.total || snd.read > c.reply {
                bad.push(format!(
                    "{what}: more bytes arrived than were sent ({} of {}, {} of {})",
                    snk.read, c.total, snd.read, c.reply
                ));
            }
            let sender_done = snd.fin_at.is_some() && snd.read == c.reply;
            let sink_done =
                snk.fin_at.is_some() && snk.read == c.total && snk.done_writing_at.is_some();
            let sender_told = snd.reset || snd.refused;
            let sink_told = snk.reset || snk.refused || snk.connected_at.is_none();
            let (from_gone, to_gone) =
                (self.stopped.contains(&c.from), self.stopped.contains(&c.to));
            let ending = if sender_done && sink_done {
                Some(Ending::Complete)
            } else if (sender_told || sender_done || from_gone)
                && (sink_told || sink_done || to_gone)
                && (sender_told || sink_told)
            {
                Some(Ending::Broken)
            } else {
                None
            };
            let read = snk.read;
            let c = &mut self.conns[k];
            if !bad.is_empty() && !c.flagged {
                c.flagged = true;
                for b in bad {
                    violation(b);
                }
            }
            if let Some(e) = ending {
                c.ended = Some((now, e));
                self.active[c.from] = None;
                self.next_start[c.from] = now + PAUSE;
                self.bytes += read;
                match e {
                    Ending::Complete => self.completed += 1,
                    Ending::Broken => self.broken += 1,
                }
            }
        }
    }

    /// Whether every connection begun before `quiet_from` has ended, and
    /// every ring pair of peers still in the mesh completed one begun at or
    /// after it.
    pub fn settled(&self, quiet_from: Duration) -> bool {
        self.unsettled(quiet_from).is_empty()
    }

    /// What keeps [`Streams::settled`] false, in words.
    pub fn unsettled(&self, quiet_from: Duration) -> Vec<String> {
        let mut v = Vec::new();
        for (k, c) in self.conns.iter().enumerate() {
            if c.ended.is_none() && c.started < quiet_from {
                let (snd, snk) = self.stats(c);
                v.push(format!(
                    "TCP connection {k} (peer{} -> peer{}, port {}, begun at {:.2}s) neither completed nor was reported broken to both ends: sender wrote {} read {} reset {} fin {} ({}); receiver read {} of {} reset {} connected {} fin {} ({})",
                    c.from,
                    c.to,
                    c.port,
                    c.started.as_secs_f64(),
                    snd.written,
                    snd.read,
                    snd.reset || snd.refused,
                    snd.fin_at.is_some(),
                    self.hosts[c.from].describe(c.send),
                    snk.read,
                    c.total,
                    snk.reset,
                    snk.connected_at.is_some(),
                    snk.fin_at.is_some(),
                    self.hosts[c.to].describe(c.sink),
                ));
            }
        }
        let n = self.hosts.len();
        if n >= 2 {
            for from in 0..n {
                let to = (from + 1) % n;
                if self.stopped.contains(&from) || self.stopped.contains(&to) {
                    continue;
                }
                let done = self.conns.iter().any(|c| {
                    c.from == from
                        && c.started >= quiet_from
                        && matches!(c.ended, Some((_, Ending::Complete)))
                });
                if !done {
                    v.push(format!(
                        "no TCP connection from peer{from} to peer{to} completed in the quiet period"
                    ));
                }
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_hosts_ports_are_stream_packets() {
        let a = Ipv4Addr::new(10, 0, 0, 1);
        let b = Ipv4Addr::new(10, 0, 0, 2);
        let host = ip::build_v4(a, b, ip::PROTO_TCP, PORT_BASE + 3, PORT_BASE + 3, &[], 60);
        let tagged = crate::traffic::packet(a, b, crate::traffic::Kind::Tcp, 200, 0, 200);
        let udp = ip::build_v4(a, b, ip::PROTO_UDP, PORT_BASE, PORT_BASE, &[], 60);
        assert!(is_stream_packet(&host));
        assert!(!is_stream_packet(&tagged));
        assert!(!is_stream_packet(&udp));
    }
}
