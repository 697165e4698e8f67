//! The data plane: the actor that owns the UDP socket and every peer's session
//! (through [`Node`]), and the TUN reader actor that feeds it.
//!
//! The actor is thin: inputs go to the [`Node`], then the node's one poll
//! sequence ([`Node::service`]) hands its output to [`plane_io`], the
//! [`transport::Driver`] that batches frames onto the socket and packets onto
//! TUN.
//!
//! Design for speed: the socket is driven by readiness, not by messages. When
//! it becomes readable the actor drains up to [`RX_BURST`] datagrams into one
//! reused buffer, decrypts them in place, and writes what they carry straight
//! to the TUN device: no mailbox hop and no allocation per datagram on the way
//! in other than KCP's reassembly. In the other direction the [`TunReader`]
//! reads up to a batch of packets into one recycled buffer and sends the batch
//! in one message, so the mailbox hop is paid per batch, not per packet, and
//! the buffers cycle through a fixed pool (the pool also bounds how far the
//! reader can run ahead of the sessions).

mod alarm;
mod plane_io;
mod reader;

pub use reader::{Batch, TunBatch, TunReader};

use crate::peermap::Router;
use actix::prelude::*;
use alarm::{alarm_set, AlarmFired, AlarmShared, AlarmStream};
use futures_util::Stream;
use plane_io::PlaneIo;
use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use transport::path::Via;
use transport::wire::{Control, PublicKey};
use transport::{Datagram, Event, Node, NodeStats, PacketDevice, SessionStats};

/// Receive calls per readiness event before other work gets a turn.
pub const RX_BURST: usize = 64;
/// Buffers filled per receive call (recvmmsg), each large enough for a GRO run.
pub const RX_BUFS: usize = 16;
/// Packets per TUN batch.
pub const BATCH_SLOTS: usize = 64;
/// Batches in the TUN reader's pool.
pub const BATCH_POOL: usize = 8;
/// Inbound packets written to TUN in one batch.
pub const TUN_WRITE_BATCH: usize = 64;

/// A device that is never readable (the hub has no TUN).
pub struct NoDevice;

impl PacketDevice for NoDevice {
    async fn recv(&self, _buf: &mut [u8]) -> io::Result<usize> {
        std::future::pending().await
    }
    async fn send(&self, _pkt: &[u8]) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
    async fn readable(&self) -> io::Result<()> {
        std::future::pending().await
    }
    fn try_recv(&self, _buf: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
    fn try_send(&self, _pkt: &[u8]) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// Something happened on a session (handshake, dead link, control message).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct NetEvent {
    /// The peer.
    pub peer: PublicKey,
    /// Where the peer was last seen.
    pub endpoint: Option<SocketAddr>,
    /// What happened.
    pub event: Event,
}

/// Overlay destinations of packets no record routes (sent to an on-demand
/// member's supervisor, which fetches the records).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Unrouted(pub Vec<IpAddr>);

/// Most packets held while their destinations' records are fetched.
pub const HOLD_PACKETS: usize = 64;
/// Longest a packet is held for its destination's record.
pub const HOLD_FOR: Duration = Duration::from_secs(2);

/// Commands for the data plane.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub enum Cmd {
    /// Admit a peer (or update it) with its direct candidates, best first.
    AddPeer {
        /// Peer key.
        key: PublicKey,
        /// Where to reach it directly (may be empty).
        endpoints: Vec<SocketAddr>,
    },
    /// The hubs that may relay to our peers.
    SetRelays(Vec<PublicKey>),
    /// Forward relay messages between our sessions, or stop (a hub).
    SetRelaying(bool),
    /// Heartbeats cross every session this often (see
    /// [`transport::Node::set_heartbeat`]).
    SetHeartbeat(Duration),
    /// A hub asked us to punch towards `key` at `candidates` now.
    Punch {
        /// Peer key.
        key: PublicKey,
        /// Its candidate endpoints.
        candidates: Vec<SocketAddr>,
        /// The many-port step, when one side's NAT changes ports.
        birthday: Option<transport::path::Birthday>,
    },
    /// Forget a peer; its keys are dropped.
    RemovePeer(PublicKey),
    /// Tear a failed session down and start a new handshake.
    RestartPeer(PublicKey),
    /// Start a fresh handshake now.
    Connect(PublicKey),
    /// Replace the routing table (and send the held packets it now routes).
    SetRouter(Router),
    /// Report packets to unrouted destinations there, holding them up to
    /// [`HOLD_FOR`] (None: drop them, counted, as before).
    WatchUnrouted(Option<Recipient<Unrouted>>),
    /// Send a control message.
    Send {
        /// Peer.
        to: PublicKey,
        /// Message.
        msg: Control,
        /// Reliable and ordered (KCP conversation 0) or a single datagram.
        reliable: bool,
    },
}

/// Ask for the counters.
#[derive(Debug, Message)]
#[rtype(result = "Snapshot")]
pub struct GetSnapshot;

/// One peer's session as the data plane sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerSnapshot {
    /// Key.
    pub key: PublicKey,
    /// Current endpoint.
    pub endpoint: Option<SocketAddr>,
    /// The path in use (direct or through which relay).
    pub path: Option<Via>,
    /// Why that path.
    pub path_reason: String,
    /// Handshake done.
    pub established: bool,
    /// Nothing authenticated arrived for the dead-link time.
    pub dead: bool,
    /// Time since the last authenticated frame.
    pub idle: Duration,
    /// Session counters.
    pub stats: SessionStats,
}

/// Counters of the data plane itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlaneStats {
    /// Packets read from TUN.
    pub tun_read: u64,
    /// Packets written to TUN.
    pub tun_written: u64,
    /// TUN packets with no route (unknown destination, or not IP).
    pub no_route: u64,
    /// TUN packets held while their destination's record was fetched.
    pub unrouted_held: u64,
    /// Inbound packets dropped: source address not owned by the sending peer.
    pub bad_source: u64,
    /// Inbound packets dropped: the TUN queue was full or failed.
    pub tun_write_failed: u64,
    /// UDP sends that failed (other than a full socket buffer).
    pub udp_send_failed: u64,
    /// Datagrams received.
    pub udp_rx: u64,
    /// Datagrams sent.
    pub udp_tx: u64,
    /// Batches from the TUN reader.
    pub batches: u64,
    /// Sends that carried several datagrams (GSO).
    pub gso_batches: u64,
    /// Times packets were read from TUN right after writing to it, by the
    /// data plane itself rather than the reader.
    pub tun_inline_batches: u64,
    /// Path MTU probes the socket refused (larger than the interface MTU, or full).
    pub pmtu_probe_failed: u64,
    /// Times the data plane ran (socket readiness, timer, TUN batch or
    /// command): what an idle node costs.
    pub wakeups: u64,
}

/// Everything the data plane counts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Data-plane counters.
    pub plane: PlaneStats,
    /// Node (drop) counters.
    pub node: NodeStats,
    /// Split TCP counters.
    pub split: transport::split::SplitStats,
    /// Every peer.
    pub peers: Vec<PeerSnapshot>,
    /// Bytes the sessions hold for others now (relayed frames waiting,
    /// unacknowledged control messages), counted against the node's memory
    /// budget.
    pub held_bytes: usize,
}

#[derive(Message)]
#[rtype(result = "()")]
struct SockReady(Option<io::ErrorKind>);

#[derive(Message)]
#[rtype(result = "()")]
struct SockWritable;

fn readiness<D: Datagram + 'static>(sock: Arc<D>) -> impl Stream<Item = SockReady> {
    futures_util::stream::unfold(sock, |s| async move {
        let r = s.readable().await;
        Some((SockReady(r.err().map(|e| e.kind())), s))
    })
}

/// The data-plane actor.
pub struct Dataplane<D: Datagram + 'static, P: PacketDevice + 'static> {
    node: Node,
    /// Where the node's output goes (socket and TUN), as its [`Driver`].
    io: PlaneIo<D, P>,
    recycle: Option<mpsc::Sender<Batch>>,
    epoch: Instant,
    alarm: Rc<AlarmShared>,
    rxbufs: Vec<Vec<u8>>,
    /// The socket's stream epoch the relays were last ranked at.
    stream_epoch: u64,
    /// A batch for packets read from TUN right after writing to it (see
    /// [`Dataplane::read_tun_inline`]); sized like the reader's once its
    /// first batch came.
    inline: Option<Batch>,
    inline_scratch: Vec<u8>,
    /// Where unrouted destinations are reported (see [`Cmd::WatchUnrouted`]).
    watch: Option<Recipient<Unrouted>>,
    /// Packets waiting for their destination's record, oldest first.
    held: VecDeque<(Duration, Vec<u8>)>,
}

impl<D: Datagram + 'static, P: PacketDevice + 'static> Dataplane<D, P> {
    /// Drop the endpoints this socket cannot send to (IPv6 ones on an
    /// IPv4 socket): they would only fail and be counted as send errors.
    fn keep_reachable(&self, eps: &mut Vec<SocketAddr>) {
        if self.io.sock.local_addr().is_ok_and(|a| a.is_ipv4()) {
            eps.retain(SocketAddr::is_ipv4);
        }
    }

    /// A data plane for `node` over `sock`, writing received packets to `tun`
    /// (None on a hub), reporting events to `events`. Batches from a
    /// [`TunReader`] go back to it through `recycle`.
    pub fn new(
        node: Node,
        sock: Arc<D>,
        tun: Option<Arc<P>>,
        events: Recipient<NetEvent>,
        recycle: Option<mpsc::Sender<Batch>>,
    ) -> Self {
        Dataplane {
            node,
            io: PlaneIo::new(sock, tun, events),
            recycle,
            epoch: Instant::now(),
            alarm: Rc::default(),
            rxbufs: (0..RX_BUFS).map(|_| vec![0; 65_536]).collect(),
            stream_epoch: 0,
            inline: None,
            inline_scratch: Vec::new(),
            watch: None,
            held: VecDeque::new(),
        }
    }

    /// Route a batch of packets read from TUN to their sessions.
    fn send_batch(&mut self, batch: &Batch) {
        let now = self.now();
        let mut wanted: Vec<IpAddr> = Vec::new();
        for pkt in batch.packets() {
            self.io.stats.tun_read += 1;
            let dst = transport::ip::parse(pkt).map(|i| i.dst);
            match dst.and_then(|d| self.io.router.route(&d)) {
                Some(k) => {
                    if self.node.send_ip(now, k, pkt).is_err() {
                        self.io.stats.no_route += 1;
                    }
                }
                None => match dst.filter(|_| self.watch.is_some()) {
                    Some(d) => {
                        self.hold(now, pkt);
                        if !wanted.contains(&d) {
                            wanted.push(d);
                        }
                    }
                    None => self.io.stats.no_route += 1,
                },
            }
        }
        if let (Some(w), false) = (&self.watch, wanted.is_empty()) {
            w.do_send(Unrouted(wanted));
        }
    }

    /// Keep `pkt` until its destination is routed, [`HOLD_FOR`] passes or
    /// [`HOLD_PACKETS`] newer ones wait (dropped ones count as `no_route`).
    fn hold(&mut self, now: Duration, pkt: &[u8]) {
        while self.held.len() >= HOLD_PACKETS
            || self
                .held
                .front()
                .is_some_and(|(t, _)| now.saturating_sub(*t) > HOLD_FOR)
        {
            self.held.pop_front();
            self.io.stats.no_route += 1;
        }
        self.held.push_back((now, pkt.to_vec()));
        self.io.stats.unrouted_held += 1;
    }

    /// Send the held packets the routing table now routes; keep the others
    /// while they may still wait.
    fn release_held(&mut self, now: Duration) {
        for (t, pkt) in std::mem::take(&mut self.held) {
            if now.saturating_sub(t) > HOLD_FOR || self.watch.is_none() {
                self.io.stats.no_route += 1;
                continue;
            }
            let dst = transport::ip::parse(&pkt).map(|i| i.dst);
            match dst.and_then(|d| self.io.router.route(&d)) {
                Some(k) => {
                    if self.node.send_ip(now, k, &pkt).is_err() {
                        self.io.stats.no_route += 1;
                    }
                }
                None => self.held.push_back((t, pkt)),
            }
        }
    }

    /// Read TUN now, without waiting for its readiness to reach the reader.
    /// Called after packets were written to TUN: whatever the kernel
    /// answers at once (an ICMP echo reply, TCP's ack) is usually queued
    /// before the write returns, and sending it from here saves a trip
    /// through the reader and the mailbox, and the sleep between. True if
    /// packets were read.
    fn read_tun_inline(&mut self) -> bool {
        let Some(mut b) = self.inline.take() else {
            return false;
        };
        let Some(tun) = self.io.tun.as_deref() else {
            self.inline = Some(b);
            return false;
        };
        let got = match reader::fill(tun, &mut self.inline_scratch, &mut b, true) {
            reader::Filled::Done | reader::Filled::Failed => !b.lens.is_empty(),
            // The reader sees the same and stops the node.
            reader::Filled::Closed => false,
        };
        if got {
            self.io.stats.tun_inline_batches += 1;
            self.send_batch(&b);
        }
        self.inline = Some(b);
        got
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// The node's poll sequence ([`Node::service`]), then the alarm for its
    /// next deadline, and a wait for the socket if it filled up.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        self.rank_relays();
        let now = self.now();
        let next = self.node.service(now, &mut self.io);
        if self.io.take_blocked() {
            self.wait_writable(ctx);
        }
        alarm_set(&self.alarm, next.map(|t| self.epoch + t.max(now)));
    }

    /// When a hub moved between UDP and a stream (fallback), tell the
    /// sessions which relays are streamed: those are the last resort.
    fn rank_relays(&mut self) {
        let e = self.io.sock.stream_epoch();
        if e == self.stream_epoch {
            return;
        }
        self.stream_epoch = e;
        let sock = &self.io.sock;
        let streamed: Vec<PublicKey> = self
            .node
            .relays()
            .iter()
            .filter(|k| {
                self.node
                    .session(k)
                    .and_then(|s| s.endpoint())
                    .is_some_and(|a| sock.on_stream(a))
            })
            .copied()
            .collect();
        self.node.set_last_resort_relays(&streamed);
    }

    /// Resume sending when the socket has room again.
    fn wait_writable(&self, ctx: &mut Context<Self>) {
        let sock = self.io.sock.clone();
        ctx.add_stream(futures_util::stream::once(async move {
            let _ = sock.writable().await;
            SockWritable
        }));
    }

    fn snapshot(&self) -> Snapshot {
        let now = self.now();
        let peers = self
            .node
            .peers()
            .filter_map(|k| self.node.session(k).map(|s| (k, s)))
            .map(|(k, s)| PeerSnapshot {
                key: *k,
                endpoint: s.endpoint(),
                path: s.path(),
                path_reason: s.paths().reason().to_string(),
                established: s.is_established(),
                dead: s.is_dead(),
                idle: now.saturating_sub(s.last_rx()),
                stats: s.stats(),
            })
            .collect();
        Snapshot {
            plane: self.io.stats.clone(),
            node: self.node.stats().clone(),
            split: self.node.split_stats(),
            peers,
            held_bytes: self.node.held_bytes(),
        }
    }
}

impl<D: Datagram + 'static, P: PacketDevice + 'static> Actor for Dataplane<D, P> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Control traffic must not wait behind a flood of packets.
        ctx.set_mailbox_capacity(1024);
        ctx.add_stream(readiness(self.io.sock.clone()));
        let sleep = Box::pin(tokio::time::sleep_until(self.epoch));
        ctx.add_stream(AlarmStream {
            shared: self.alarm.clone(),
            sleep,
            armed: None,
        });
    }
}

impl<D: Datagram + 'static, P: PacketDevice + 'static> StreamHandler<SockReady>
    for Dataplane<D, P>
{
    fn handle(&mut self, r: SockReady, ctx: &mut Context<Self>) {
        self.io.stats.wakeups += 1;
        if let Some(kind) = r.0 {
            tracing::warn!(?kind, "socket readiness failed");
            return;
        }
        let mut meta = [(0usize, 1usize, SocketAddr::from(([0, 0, 0, 0], 0))); RX_BUFS];
        let written = self.io.stats.tun_written;
        // A call that filled fewer buffers than it had found the socket
        // drained: the next (normally the one that sees it empty and clears
        // its readiness) offers one buffer, which is cheaper to set up.
        let mut want = RX_BUFS;
        for _ in 0..RX_BURST {
            match self
                .io
                .sock
                .try_recv_batch(&mut self.rxbufs[..want], &mut meta)
            {
                Ok(k) => {
                    want = if k < want { 1 } else { RX_BUFS };
                    let now = self.now();
                    for (i, &(n, stride, from)) in meta.iter().enumerate().take(k) {
                        let mut off = 0;
                        while off < n {
                            let end = (off + stride).min(n);
                            self.io.stats.udp_rx += 1;
                            self.node
                                .handle_datagram(now, from, &mut self.rxbufs[i][off..end]);
                            off = end;
                        }
                    }
                    // Hand decrypted packets to TUN as they come, so the
                    // reassembly queues stay short.
                    self.node.drain_rx(&mut self.io);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // ICMP errors (port unreachable) surface here on Linux; skip them.
                Err(_) => continue,
            }
        }
        let replies = self.io.stats.tun_written > written && self.read_tun_inline();
        if replies || self.node.needs_service() {
            self.pump(ctx);
        } else {
            // Only drops (e.g. a flood of bogus initiations): no timer or
            // session changed, nothing to send.
        }
    }

    fn finished(&mut self, _ctx: &mut Context<Self>) {}
}

impl<D: Datagram + 'static, P: PacketDevice + 'static> StreamHandler<SockWritable>
    for Dataplane<D, P>
{
    fn handle(&mut self, _: SockWritable, ctx: &mut Context<Self>) {
        self.io.stats.wakeups += 1;
        if !self.io.resume() {
            self.wait_writable(ctx);
            return;
        }
        self.pump(ctx);
    }

    fn finished(&mut self, _ctx: &mut Context<Self>) {}
}

impl<D: Datagram + 'static, P: PacketDevice + 'static> StreamHandler<AlarmFired>
    for Dataplane<D, P>
{
    fn handle(&mut self, _: AlarmFired, ctx: &mut Context<Self>) {
        self.io.stats.wakeups += 1;
        self.pump(ctx);
    }
}

impl<D: Datagram + 'static, P: PacketDevice + 'static> Handler<TunBatch> for Dataplane<D, P> {
    type Result = ();
    fn handle(&mut self, b: TunBatch, ctx: &mut Context<Self>) {
        let batch = b.0;
        self.io.stats.batches += 1;
        self.io.stats.wakeups += 1;
        self.send_batch(&batch);
        if self.inline.is_none() {
            self.inline = Some(Batch::new(batch.slot));
        }
        if let Some(r) = &self.recycle {
            let _ = r.try_send(batch);
        }
        self.pump(ctx);
    }
}

impl<D: Datagram + 'static, P: PacketDevice + 'static> Handler<Cmd> for Dataplane<D, P> {
    type Result = ();
    fn handle(&mut self, cmd: Cmd, ctx: &mut Context<Self>) {
        self.io.stats.wakeups += 1;
        let now = self.now();
        let mut burst = false;
        match cmd {
            Cmd::AddPeer { key, mut endpoints } => {
                self.keep_reachable(&mut endpoints);
                self.node.add_peer(key, endpoints.first().copied());
                self.node.set_candidates(&key, &endpoints);
            }
            Cmd::SetRelays(relays) => self.node.set_relays(&relays),
            Cmd::SetRelaying(on) => self.node.set_relaying(on),
            Cmd::SetHeartbeat(d) => self.node.set_heartbeat(d),
            Cmd::Punch {
                key,
                mut candidates,
                birthday,
            } => {
                self.keep_reachable(&mut candidates);
                self.node.punch(now, &key, &candidates);
                match birthday {
                    Some(transport::path::Birthday::OpenPorts(to)) => self.io.sock.open_ports(to),
                    Some(transport::path::Birthday::Spray(ip)) => self.io.sock.spray(ip),
                    None => {}
                }
            }
            Cmd::RemovePeer(key) => self.node.remove_peer(&key),
            Cmd::RestartPeer(key) => {
                let ep = self.node.session(&key).and_then(|s| s.endpoint());
                self.node.remove_peer(&key);
                self.node.add_peer(key, ep);
                let _ = self.node.connect(now, &key);
            }
            Cmd::Connect(key) => {
                // A fresh initiation now, even if one is pending with a long
                // retry backoff (the supervisor paces these).
                let _ = self.node.connect(now, &key);
            }
            Cmd::SetRouter(r) => {
                self.io.router = r;
                self.release_held(now);
            }
            Cmd::WatchUnrouted(w) => {
                self.watch = w;
                self.release_held(now);
            }
            Cmd::Send { to, msg, reliable } => {
                burst = reliable;
                let sent = if reliable {
                    self.node.send_control_reliable(now, &to, &msg)
                } else {
                    self.node.send_control(&to, &msg)
                };
                if !sent && !reliable {
                    // No session yet: start one; the caller retries on its schedule.
                    let _ = self.node.ensure_handshake(now, &to);
                }
            }
        }
        if burst {
            // Reliable messages come in bursts (a hub's map push is one per
            // member, a join of thousands many per member): one pump when
            // the burst is taken, by the alarm, not one per message. A pump
            // per message made a hub with 10,000 joining members spend all
            // its time in them while its registry and control socket waited.
            // Everything else (datagrams such as a leaving peer's last
            // words, session commands) is sent at once, as callers expect.
            alarm_set(&self.alarm, Some(self.epoch + now));
        } else {
            self.pump(ctx);
        }
    }
}

impl<D: Datagram + 'static, P: PacketDevice + 'static> Handler<GetSnapshot> for Dataplane<D, P> {
    type Result = MessageResult<GetSnapshot>;
    fn handle(&mut self, _: GetSnapshot, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(self.snapshot())
    }
}

/// Convenience: per-peer stats keyed by peer, from a snapshot.
pub fn by_peer(s: &Snapshot) -> BTreeMap<PublicKey, &PeerSnapshot> {
    s.peers.iter().map(|p| (p.key, p)).collect()
}
