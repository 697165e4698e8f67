//! The data plane's [`Driver`]: where the node's output goes on a real node.
//!
//! Frames: consecutive frames to one endpoint of one size are gathered into a
//! run and sent in one call (UDP GSO where the socket has it); a run ends at
//! a shorter frame, another endpoint, the segment limit or the end of the
//! node's output. When the socket is full the run is kept and resent once it
//! is writable; the frame that did not fit it starts the next run.
//!
//! Packets: checked against the sender's owned addresses, then queued for one
//! batched TUN write (the device may coalesce TCP segments).

use super::{NetEvent, PlaneStats, TUN_WRITE_BATCH};
use crate::peermap::Router;
use actix::Recipient;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use transport::wire::PublicKey;
use transport::{Datagram, Driver, Event, PacketDevice};

/// The largest frame fastmesh sends on a direct path (1452 bytes of UDP
/// payload fit a 1500-byte path over IPv4 and IPv6); larger ones are relayed
/// frames, sent one by one so the kernel may fragment them.
const MAX_DIRECT_FRAME: usize = 1452;

/// Bytes one GSO run may hold.
const MAX_RUN_BYTES: usize = 65_000;

pub(super) struct PlaneIo<D, P> {
    pub(super) sock: Arc<D>,
    pub(super) tun: Option<Arc<P>>,
    pub(super) router: Router,
    events: Recipient<NetEvent>,
    /// The run being gathered: frames back to back, all `seg` bytes but the
    /// last, `n` of them, for `to` (None: no run).
    run: Vec<u8>,
    to: Option<SocketAddr>,
    seg: usize,
    n: usize,
    /// The run ended with a shorter frame: nothing more joins it.
    closed: bool,
    /// The socket refused the run; it is resent when writable.
    pending: bool,
    /// A frame taken from the node while the run was refused.
    carry: Vec<u8>,
    carry_to: Option<SocketAddr>,
    /// A send would block since the actor last asked.
    blocked: bool,
    /// Packets waiting for one batched TUN write (`tun_n` in use; the
    /// buffers are kept for reuse).
    tun_out: Vec<Vec<u8>>,
    tun_n: usize,
    pub(super) stats: PlaneStats,
}

impl<D: Datagram, P: PacketDevice> PlaneIo<D, P> {
    pub(super) fn new(sock: Arc<D>, tun: Option<Arc<P>>, events: Recipient<NetEvent>) -> Self {
        PlaneIo {
            sock,
            tun,
            router: Router::default(),
            events,
            run: Vec::with_capacity(MAX_RUN_BYTES + MAX_DIRECT_FRAME),
            to: None,
            seg: 0,
            n: 0,
            closed: false,
            pending: false,
            carry: Vec::with_capacity(2048),
            carry_to: None,
            blocked: false,
            tun_out: Vec::new(),
            tun_n: 0,
            stats: PlaneStats::default(),
        }
    }

    /// Whether a send blocked since the last call (the actor then waits for
    /// the socket to become writable).
    pub(super) fn take_blocked(&mut self) -> bool {
        std::mem::take(&mut self.blocked)
    }

    /// The socket became writable: resend the refused run and start the next
    /// one with the carried frame. False if the socket is still full.
    pub(super) fn resume(&mut self) -> bool {
        if self.pending {
            if !self.send_run() {
                self.blocked = false;
                return false;
            }
            self.pending = false;
        }
        if let Some(to) = self.carry_to.take() {
            let carry = std::mem::take(&mut self.carry);
            self.start_run(to, &carry);
            self.carry = carry;
        }
        true
    }

    fn fits(&self, to: SocketAddr, len: usize) -> bool {
        self.to == Some(to)
            && !self.closed
            && len <= self.seg
            && self.seg <= MAX_DIRECT_FRAME
            && self.n < self.sock.max_gso_segments().clamp(1, 64)
            && self.run.len() + self.seg <= MAX_RUN_BYTES
    }

    fn start_run(&mut self, to: SocketAddr, frame: &[u8]) {
        self.run.clear();
        self.run.extend_from_slice(frame);
        self.to = Some(to);
        self.seg = frame.len();
        self.n = 1;
        self.closed = false;
    }

    /// Send the run; false (run kept, `blocked` set) if the socket is full.
    fn send_run(&mut self) -> bool {
        let Some(to) = self.to else {
            return true;
        };
        match self.sock.try_send_gso(&self.run, self.seg, to) {
            Ok(k) => {
                self.stats.udp_tx += k as u64;
                if self.n > 1 {
                    self.stats.gso_batches += 1;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.blocked = true;
                return false;
            }
            Err(_) if self.n > 1 => {
                // The kernel refused the batch (a segment larger than the
                // interface MTU cannot be offloaded): one by one, which it
                // fragments.
                let mut sent = 0;
                for c in self.run.chunks(self.seg.max(1)) {
                    if self.sock.try_send_to(c, to).is_ok() {
                        sent += 1;
                    }
                }
                self.stats.udp_tx += sent;
                self.stats.udp_send_failed += self.n as u64 - sent;
            }
            Err(_) => self.stats.udp_send_failed += self.n as u64,
        }
        self.to = None;
        true
    }

    fn flush_tun(&mut self) {
        if self.tun_n == 0 {
            return;
        }
        let n = std::mem::take(&mut self.tun_n);
        let Some(tun) = &self.tun else {
            return;
        };
        let failed = tun.try_send_many(&mut self.tun_out[..n]);
        self.stats.tun_written += (n - failed) as u64;
        self.stats.tun_write_failed += failed as u64;
    }
}

impl<D: Datagram, P: PacketDevice> Driver for PlaneIo<D, P> {
    fn can_transmit(&self) -> bool {
        !self.pending
    }

    fn transmit(&mut self, to: SocketAddr, frame: &[u8]) -> bool {
        if self.fits(to, frame.len()) {
            self.run.extend_from_slice(frame);
            self.n += 1;
            self.closed = frame.len() < self.seg;
            return true;
        }
        if !self.send_run() {
            self.pending = true;
            self.carry.clear();
            self.carry.extend_from_slice(frame);
            self.carry_to = Some(to);
            return false;
        }
        self.start_run(to, frame);
        true
    }

    fn transmit_probe(&mut self, to: SocketAddr, frame: &[u8]) -> bool {
        // Whatever was gathered goes first; the probe goes alone, unfragmented.
        if !self.send_run() {
            // The socket is full: the probe is lost (it is repeated on timeout).
            self.pending = true;
            return false;
        }
        match self.sock.try_send_probe(frame, to) {
            Ok(_) => self.stats.udp_tx += 1,
            // Too large for the local interface, or the socket is full: a lost probe.
            Err(_) => self.stats.pmtu_probe_failed += 1,
        }
        true
    }

    fn transmit_done(&mut self) {
        if !self.pending && !self.send_run() {
            self.pending = true;
        }
    }

    fn deliver(&mut self, from: &PublicKey, pkt: Vec<u8>) {
        let Some(tun) = &self.tun else {
            return;
        };
        let ok = transport::ip::parse(&pkt).is_some_and(|i| self.router.owns(from, &i.src));
        if !ok {
            self.stats.bad_source += 1;
            return;
        }
        let h = tun.headroom();
        if self.tun_n == self.tun_out.len() {
            self.tun_out.push(Vec::with_capacity(h + 2048));
        }
        let b = &mut self.tun_out[self.tun_n];
        b.clear();
        b.resize(h, 0);
        b.extend_from_slice(&pkt);
        self.tun_n += 1;
        if self.tun_n >= TUN_WRITE_BATCH {
            self.flush_tun();
        }
    }

    fn deliver_done(&mut self) {
        self.flush_tun();
    }

    fn event(&mut self, peer: PublicKey, endpoint: Option<SocketAddr>, event: Event) {
        self.events.do_send(NetEvent {
            peer,
            endpoint,
            event,
        });
    }
}
