//! The data plane: the actor that owns the UDP socket and every peer's session
//! (through [`Node`]), and the TUN reader actor that feeds it.
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

use crate::peermap::Router;
use actix::prelude::*;
use futures_util::Stream;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context as TaskCx, Poll, Waker};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
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
    /// A hub asked us to punch towards `key` at `candidates` now.
    Punch {
        /// Peer key.
        key: PublicKey,
        /// Its candidate endpoints.
        candidates: Vec<SocketAddr>,
    },
    /// Forget a peer; its keys are dropped.
    RemovePeer(PublicKey),
    /// Tear a failed session down and start a new handshake.
    RestartPeer(PublicKey),
    /// Start a fresh handshake now.
    Connect(PublicKey),
    /// Replace the routing table.
    SetRouter(Router),
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
}

/// Everything the data plane counts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Data-plane counters.
    pub plane: PlaneStats,
    /// Node (drop) counters.
    pub node: NodeStats,
    /// Every peer.
    pub peers: Vec<PeerSnapshot>,
}

/// A batch of packets read from TUN, packed in one buffer.
#[derive(Debug)]
pub struct Batch {
    buf: Vec<u8>,
    lens: Vec<u16>,
    slot: usize,
}

impl Batch {
    fn new(slot: usize) -> Batch {
        Batch {
            buf: vec![0; slot * BATCH_SLOTS],
            lens: Vec::with_capacity(BATCH_SLOTS),
            slot,
        }
    }

    /// The packets.
    pub fn packets(&self) -> impl Iterator<Item = &[u8]> {
        self.lens
            .iter()
            .enumerate()
            .map(|(i, n)| &self.buf[i * self.slot..i * self.slot + *n as usize])
    }
}

/// A batch of TUN packets for the data plane.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct TunBatch(pub Batch);

/// A deadline the actor moves; its stream fires when the deadline passes.
#[derive(Default)]
struct AlarmShared {
    deadline: Cell<Option<Instant>>,
    waker: RefCell<Option<Waker>>,
}

struct AlarmStream {
    shared: Rc<AlarmShared>,
    sleep: Pin<Box<Sleep>>,
    armed: Option<Instant>,
}

#[derive(Message)]
#[rtype(result = "()")]
struct AlarmFired;

impl Stream for AlarmStream {
    type Item = AlarmFired;
    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<Option<AlarmFired>> {
        let this = self.get_mut();
        {
            let mut w = this.shared.waker.borrow_mut();
            if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *w = Some(cx.waker().clone());
            }
        }
        let d = this.shared.deadline.get();
        if d != this.armed {
            if let Some(d) = d {
                this.sleep.as_mut().reset(d);
            }
            this.armed = d;
        }
        if this.armed.is_none() {
            return Poll::Pending;
        }
        match this.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                this.armed = None;
                this.shared.deadline.set(None);
                Poll::Ready(Some(AlarmFired))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

fn alarm_set(a: &AlarmShared, d: Option<Instant>) {
    if a.deadline.get() != d {
        a.deadline.set(d);
        if let Some(w) = a.waker.borrow_mut().take() {
            w.wake();
        }
    }
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

/// The largest frame fastmesh sends on a direct path (1452 bytes of UDP
/// payload fit a 1500-byte path over IPv4 and IPv6); larger ones are relayed
/// frames, sent one by one so the kernel may fragment them.
const MAX_DIRECT_FRAME: usize = 1452;

/// The data-plane actor.
pub struct Dataplane<D: Datagram + 'static, P: PacketDevice + 'static> {
    node: Node,
    sock: Arc<D>,
    tun: Option<Arc<P>>,
    router: Router,
    events: Recipient<NetEvent>,
    recycle: Option<mpsc::Sender<Batch>>,
    epoch: Instant,
    alarm: Rc<AlarmShared>,
    txbuf: Vec<u8>,
    batch: Vec<u8>,
    rxbufs: Vec<Vec<u8>>,
    /// A batch the socket refused (full); resent when writable.
    pending: Option<(SocketAddr, usize)>,
    /// A frame in `txbuf` that did not fit the previous batch.
    carry: Option<SocketAddr>,
    /// Packets waiting for one batched TUN write (`tun_n` of them in use;
    /// the buffers are kept for reuse).
    tun_out: Vec<Vec<u8>>,
    tun_n: usize,
    stats: PlaneStats,
}

impl<D: Datagram + 'static, P: PacketDevice + 'static> Dataplane<D, P> {
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
            sock,
            tun,
            router: Router::default(),
            events,
            recycle,
            epoch: Instant::now(),
            alarm: Rc::default(),
            txbuf: Vec::with_capacity(2048),
            batch: Vec::with_capacity(65_536),
            rxbufs: (0..RX_BUFS).map(|_| vec![0; 65_536]).collect(),
            pending: None,
            carry: None,
            tun_out: Vec::new(),
            tun_n: 0,
            stats: PlaneStats::default(),
        }
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Run timers, send what is ready, deliver what arrived, report events,
    /// and set the alarm for the next timer.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        let now = self.now();
        if self.node.poll_timeout().is_some_and(|t| t <= now) {
            self.node.handle_timeout(now);
        }
        self.transmit(now, ctx);
        while let Some((from, pkt)) = self.node.poll_rx() {
            self.deliver(&from, &pkt);
        }
        self.flush_tun();
        while let Some((peer, event)) = self.node.poll_event() {
            let endpoint = self.node.session(&peer).and_then(|s| s.endpoint());
            self.events.do_send(NetEvent {
                peer,
                endpoint,
                event,
            });
        }
        let next = self.node.poll_timeout().map(|t| self.epoch + t.max(now));
        alarm_set(&self.alarm, next);
    }

    /// Send what the sessions have ready. Consecutive frames to one endpoint
    /// of one size go out together (UDP GSO where the socket has it): the
    /// batch ends at a shorter frame, another endpoint, or the segment limit.
    fn transmit(&mut self, now: Duration, ctx: &mut Context<Self>) {
        if self.pending.is_some() {
            return; // waiting for the socket to drain
        }
        let max_segs = self.sock.max_gso_segments().clamp(1, 64);
        loop {
            let first = match self.carry.take() {
                Some(to) => to,
                None => match self.node.poll_transmit(now, &mut self.txbuf) {
                    Some(to) => to,
                    None => return,
                },
            };
            let seg = self.txbuf.len();
            self.batch.clear();
            self.batch.extend_from_slice(&self.txbuf);
            let mut n = 1;
            // A frame larger than any direct one (a relayed frame) may need
            // IP fragmentation, which UDP GSO does not do: send it alone.
            let batchable = seg <= MAX_DIRECT_FRAME;
            while batchable && n < max_segs && self.batch.len() + seg <= 65_000 {
                let Some(to) = self.node.poll_transmit(now, &mut self.txbuf) else {
                    break;
                };
                let len = self.txbuf.len();
                if to != first || len > seg {
                    self.carry = Some(to);
                    break;
                }
                self.batch.extend_from_slice(&self.txbuf);
                n += 1;
                if len < seg {
                    break;
                }
            }
            match self.sock.try_send_gso(&self.batch, seg, first) {
                Ok(k) => {
                    self.stats.udp_tx += k as u64;
                    if n > 1 {
                        self.stats.gso_batches += 1;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.pending = Some((first, seg));
                    self.wait_writable(ctx);
                    return;
                }
                Err(_) => self.stats.udp_send_failed += n as u64,
            }
        }
    }

    /// Resume sending when the socket has room again.
    fn wait_writable(&self, ctx: &mut Context<Self>) {
        let sock = self.sock.clone();
        ctx.add_stream(futures_util::stream::once(async move {
            let _ = sock.writable().await;
            SockWritable
        }));
    }

    fn deliver(&mut self, from: &PublicKey, pkt: &[u8]) {
        let Some(tun) = &self.tun else {
            return;
        };
        let ok = transport::ip::parse(pkt).is_some_and(|i| self.router.owns(from, &i.src));
        if !ok {
            self.stats.bad_source += 1;
            return;
        }
        // Queue for one batched write (the device may coalesce TCP segments).
        let h = tun.headroom();
        if self.tun_n == self.tun_out.len() {
            self.tun_out.push(Vec::with_capacity(h + 2048));
        }
        let b = &mut self.tun_out[self.tun_n];
        b.clear();
        b.resize(h, 0);
        b.extend_from_slice(pkt);
        self.tun_n += 1;
        if self.tun_n >= TUN_WRITE_BATCH {
            self.flush_tun();
        }
    }

    fn flush_tun(&mut self) {
        if self.tun_n == 0 {
            return;
        }
        let Some(tun) = &self.tun else {
            self.tun_n = 0;
            return;
        };
        let n = self.tun_n;
        let failed = tun.try_send_many(&mut self.tun_out[..n]);
        self.stats.tun_written += (n - failed) as u64;
        self.stats.tun_write_failed += failed as u64;
        self.tun_n = 0;
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
            plane: self.stats.clone(),
            node: self.node.stats().clone(),
            peers,
        }
    }
}

impl<D: Datagram + 'static, P: PacketDevice + 'static> Actor for Dataplane<D, P> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Control traffic must not wait behind a flood of packets.
        ctx.set_mailbox_capacity(1024);
        ctx.add_stream(readiness(self.sock.clone()));
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
        if let Some(kind) = r.0 {
            tracing::warn!(?kind, "socket readiness failed");
            return;
        }
        let mut meta = [(0usize, 1usize, SocketAddr::from(([0, 0, 0, 0], 0))); RX_BUFS];
        for _ in 0..RX_BURST {
            match self.sock.try_recv_batch(&mut self.rxbufs, &mut meta) {
                Ok(k) => {
                    let now = self.now();
                    for (i, &(n, stride, from)) in meta.iter().enumerate().take(k) {
                        let mut off = 0;
                        while off < n {
                            let end = (off + stride).min(n);
                            self.stats.udp_rx += 1;
                            self.node
                                .handle_datagram(now, from, &mut self.rxbufs[i][off..end]);
                            off = end;
                        }
                    }
                    // Hand decrypted packets to TUN as they come, so the
                    // reassembly queues stay short.
                    while let Some((from, pkt)) = self.node.poll_rx() {
                        self.deliver(&from, &pkt);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // ICMP errors (port unreachable) surface here on Linux; skip them.
                Err(_) => continue,
            }
        }
        if self.node.needs_service() {
            self.pump(ctx);
        } else {
            // Only drops (e.g. a flood of bogus initiations): no timer or
            // session changed, nothing to send.
            self.flush_tun();
        }
    }

    fn finished(&mut self, _ctx: &mut Context<Self>) {}
}

impl<D: Datagram + 'static, P: PacketDevice + 'static> StreamHandler<SockWritable>
    for Dataplane<D, P>
{
    fn handle(&mut self, _: SockWritable, ctx: &mut Context<Self>) {
        if let Some((to, seg)) = self.pending {
            match self.sock.try_send_gso(&self.batch, seg, to) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.wait_writable(ctx);
                    return;
                }
                Ok(k) => self.stats.udp_tx += k as u64,
                Err(_) => self.stats.udp_send_failed += 1,
            }
            self.pending = None;
        }
        self.pump(ctx);
    }

    fn finished(&mut self, _ctx: &mut Context<Self>) {}
}

impl<D: Datagram + 'static, P: PacketDevice + 'static> StreamHandler<AlarmFired>
    for Dataplane<D, P>
{
    fn handle(&mut self, _: AlarmFired, ctx: &mut Context<Self>) {
        self.pump(ctx);
    }
}

impl<D: Datagram + 'static, P: PacketDevice + 'static> Handler<TunBatch> for Dataplane<D, P> {
    type Result = ();
    fn handle(&mut self, b: TunBatch, ctx: &mut Context<Self>) {
        let batch = b.0;
        self.stats.batches += 1;
        let now = self.now();
        for pkt in batch.packets() {
            self.stats.tun_read += 1;
            let dst = transport::ip::parse(pkt).map(|i| i.dst);
            match dst.and_then(|d| self.router.route(&d)) {
                Some(k) => {
                    if self.node.send_ip(now, k, pkt).is_err() {
                        self.stats.no_route += 1;
                    }
                }
                None => self.stats.no_route += 1,
            }
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
        let now = self.now();
        match cmd {
            Cmd::AddPeer { key, endpoints } => {
                self.node.add_peer(key, endpoints.first().copied());
                self.node.set_candidates(&key, &endpoints);
            }
            Cmd::SetRelays(relays) => self.node.set_relays(&relays),
            Cmd::Punch { key, candidates } => self.node.punch(now, &key, &candidates),
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
            Cmd::SetRouter(r) => self.router = r,
            Cmd::Send { to, msg, reliable } => {
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
        self.pump(ctx);
    }
}

impl<D: Datagram + 'static, P: PacketDevice + 'static> Handler<GetSnapshot> for Dataplane<D, P> {
    type Result = MessageResult<GetSnapshot>;
    fn handle(&mut self, _: GetSnapshot, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(self.snapshot())
    }
}

/// Reads IP packets from the TUN device in batches and hands them to the data plane.
pub struct TunReader<P: PacketDevice + 'static> {
    dev: Arc<P>,
    to: Recipient<TunBatch>,
    free: Option<mpsc::Receiver<Batch>>,
    scratch: Vec<u8>,
    /// Packets truncated or unreadable.
    pub errors: u64,
}

impl<P: PacketDevice + 'static> TunReader<P> {
    /// A reader of `dev` with a pool of batches sized for packets up to
    /// `max_packet` bytes. Returns the reader and the channel batches go back
    /// through (give it to [`Dataplane::new`]).
    pub fn new(
        dev: Arc<P>,
        to: Recipient<TunBatch>,
        max_packet: usize,
    ) -> (TunReader<P>, mpsc::Sender<Batch>) {
        let (tx, rx) = mpsc::channel(BATCH_POOL);
        let slot = max_packet.clamp(576, 65_535);
        for _ in 0..BATCH_POOL {
            let _ = tx.try_send(Batch::new(slot));
        }
        (
            TunReader {
                dev,
                to,
                free: Some(rx),
                scratch: Vec::new(),
                errors: 0,
            },
            tx,
        )
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Fillable(Batch);

impl<P: PacketDevice + 'static> Actor for TunReader<P> {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Context<Self>) {
        let Some(free) = self.free.take() else {
            return;
        };
        // A batch is read only when a free buffer exists: the pool is the
        // back-pressure between TUN and the sessions.
        let s =
            futures_util::stream::unfold((free, self.dev.clone()), |(mut free, dev)| async move {
                let b = free.recv().await?;
                dev.readable().await.ok()?;
                Some((Fillable(b), (free, dev)))
            });
        ctx.add_stream(s);
    }
}

impl<P: PacketDevice + 'static> StreamHandler<Fillable> for TunReader<P> {
    fn handle(&mut self, f: Fillable, ctx: &mut Context<Self>) {
        let mut b = f.0;
        b.lens.clear();
        let slot = b.slot;
        let need = self.dev.min_slots().clamp(1, BATCH_SLOTS);
        let mut lens = [0usize; BATCH_SLOTS];
        while BATCH_SLOTS - b.lens.len() >= need {
            let used = b.lens.len();
            let mut slots: Vec<&mut [u8]> = b.buf[used * slot..].chunks_mut(slot).collect();
            let room = slots.len();
            match self
                .dev
                .try_recv_many(&mut self.scratch, &mut slots, &mut lens[..room])
            {
                Ok(0) => break,
                Ok(n) => b.lens.extend(lens[..n].iter().map(|&l| l as u16)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                    ctx.stop();
                    break;
                }
                Err(_) => {
                    self.errors += 1;
                    break;
                }
            }
        }
        // Even an empty batch goes through, so the buffer returns to the pool.
        self.to.do_send(TunBatch(b));
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

/// Convenience: per-peer stats keyed by peer, from a snapshot.
pub fn by_peer(s: &Snapshot) -> BTreeMap<PublicKey, &PeerSnapshot> {
    s.peers.iter().map(|p| (p.key, p)).collect()
}
