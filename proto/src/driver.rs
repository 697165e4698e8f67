//! The one poll sequence of a [`Node`], shared by every driver.
//!
//! A driver owns the I/O (a socket and a TUN device, a simulated network, a
//! test harness) and the clock. It feeds inputs to the node
//! ([`Node::handle_datagram`], [`Node::send_ip`], control calls) and then runs
//! [`Node::service`], which performs the node's outputs in this fixed order:
//!
//! 1. [`Node::handle_timeout`] if [`Node::poll_timeout`] has passed (this also
//!    flushes the KCP conversations the inputs touched, once per batch);
//! 2. frames: [`Node::poll_transmit`] until it has nothing more or the driver
//!    says its way out is full ([`Driver::transmit`] returns `false`), then
//!    [`Driver::transmit_done`];
//! 3. inner packets: [`Node::poll_rx`] until empty, then [`Driver::deliver_done`];
//! 4. events: [`Node::poll_event`] until empty;
//!
//! and returns the next deadline ([`Node::poll_timeout`]), at which the driver
//! calls `service` again. Between inputs, a driver may hand over packets early
//! with [`Node::drain_rx`] (step 3 alone) to keep reassembly queues short.
//!
//! The data-plane actor, the turmoil adapter, the discrete-event simulator,
//! the allocation test and the fuzzer all call this, so the order cannot
//! drift between the binary and the simulators.

use crate::node::Node;
use crate::session::Event;
use crate::wire::PublicKey;
use std::net::SocketAddr;
use std::time::Duration;

/// Where a node's output goes.
pub trait Driver {
    /// Whether frames may be offered now (false while a full socket drains).
    fn can_transmit(&self) -> bool {
        true
    }
    /// Send `frame` to `to`. Returning `false` says the way out is full: the
    /// node offers no more frames until the next [`Node::service`]. The frame
    /// passed is already taken from the node either way; a driver that
    /// cannot send it now keeps it.
    fn transmit(&mut self, to: SocketAddr, frame: &[u8]) -> bool;
    /// Send a path MTU probe: like [`Driver::transmit`], but the frame must
    /// not be fragmented on the way (the don't-fragment bit; a simulated
    /// link drops it if it is larger than the link's MTU).
    fn transmit_probe(&mut self, to: SocketAddr, frame: &[u8]) -> bool {
        self.transmit(to, frame)
    }
    /// The node has no more frames for now (send what was batched).
    fn transmit_done(&mut self) {}
    /// An inner IP packet that arrived from `from`.
    fn deliver(&mut self, from: &PublicKey, pkt: Vec<u8>);
    /// The packets delivered so far are all there is for now (write a batch).
    fn deliver_done(&mut self) {}
    /// An event for the layer above; `endpoint` is the peer's direct endpoint
    /// in use, if any.
    fn event(&mut self, peer: PublicKey, endpoint: Option<SocketAddr>, event: Event);
}

impl Node {
    /// Run the poll sequence (see the [module docs](self)) at `now`; returns
    /// when it should run next (None: only when an input arrives).
    pub fn service(&mut self, now: Duration, d: &mut impl Driver) -> Option<Duration> {
        if self.poll_timeout().is_some_and(|t| t <= now) {
            self.handle_timeout(now);
        }
        if d.can_transmit() {
            let mut buf = self.take_txbuf();
            while let Some(to) = self.poll_transmit(now, &mut buf) {
                let sent = if self.took_probe() {
                    d.transmit_probe(to, &buf)
                } else {
                    d.transmit(to, &buf)
                };
                if !sent {
                    break;
                }
            }
            self.put_txbuf(buf);
            d.transmit_done();
        }
        self.drain_rx(d);
        while let Some((peer, event)) = self.poll_event() {
            let endpoint = self.session(&peer).and_then(|s| s.endpoint());
            d.event(peer, endpoint, event);
        }
        #[cfg(debug_assertions)]
        self.check_timers();
        self.poll_timeout()
    }

    /// Step 3 of the sequence alone: hand every received inner packet to `d`.
    pub fn drain_rx(&mut self, d: &mut impl Driver) {
        let mut any = false;
        while let Some((from, pkt)) = self.poll_rx() {
            d.deliver(&from, pkt);
            any = true;
        }
        if any {
            d.deliver_done();
        }
    }
}
