//! Split TCP: each inner TCP connection is terminated next to the
//! application that opened it and opened again next to the one it is for,
//! so neither end's TCP ever sees the long, lossy hop (a
//! performance-enhancing proxy, RFC 3135).
//!
//! ```text
//!  app A ──TUN── smoltcp (as B) ══ stream conversation (KCP) ══ smoltcp (as A) ──TUN── app B
//!   kernel TCP, sub-ms RTT          the long hop: rate control,       kernel TCP, sub-ms RTT
//!                                   FEC, retransmission by fastmesh
//! ```
//!
//! The TCP on the TUN side is smoltcp's, in "any IP" mode: at the connecting
//! side it answers for the remote address, at the accepting side it connects
//! from the remote address, so applications see the same addresses and ports
//! as without the proxy. The long hop carries [`StreamMsg`]s in the
//! connection's own stream conversation (see `session::stream`).
//!
//! Lifecycle of a connection from A to B:
//! 1. A's application sends a SYN. A holds it and sends `Open` (the SYN is
//!    not answered yet, so A's application does not think it is connected).
//! 2. B connects to its application from A's address and port. When that
//!    handshake completes it sends `Accept`; if B's application resets it,
//!    `Refuse(Reset)`; if nothing answers in [`CONNECT_TIMEOUT`],
//!    `Refuse(Unreachable)`; if B does not split, `Refuse(Declined)`.
//! 3. On `Accept`, A lets its listening socket take the held SYN: A's
//!    application completes its handshake. On a refusal A answers the SYN with
//!    a reset (connection refused), or for `Declined` sends the SYN and the
//!    rest of the connection as plain packets.
//! 4. Bytes flow both ways. A FIN becomes `Fin` (half-close: the other
//!    direction keeps flowing), a RST becomes `Reset`, and a lost stream
//!    conversation (the remote restarted) resets the local connection.
//!
//! Memory is bounded: at most [`SplitConfig::max_flows`] connections, each
//! with two socket buffers of [`SplitConfig::buffer`] bytes, plus what the
//! stream conversation may hold (see `session::stream`). A full buffer
//! closes the TCP window of the application that fills it.
//!
//! Packets of TCP connections that began before splitting was on, or whose
//! SYN this node did not see, are sent as plain packets as before.

use crate::ip::{self, FlowKey};
use crate::node::Sessions;
use crate::session::{Refusal, Session, StreamEvent, StreamMsg};
use crate::wire::PublicKey;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{
    HardwareAddress, IpAddress, IpCidr, IpListenEndpoint, IpProtocol, Ipv4Packet, Ipv4Repr,
    Ipv6Packet, Ipv6Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// How long the accepting side waits for its application's handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the connecting side holds a SYN without an answer from the remote.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(75);
/// How long packets of a finished connection are still recognised (and
/// dropped) rather than sent as plain packets.
pub const ENDED_LINGER: Duration = Duration::from_secs(30);
/// A connection sent as plain packets is forgotten after this long idle.
pub const PASSTHROUGH_IDLE: Duration = Duration::from_secs(120);
/// Finished connections remembered at most (oldest forgotten first).
const MAX_ENDED: usize = 4096;
/// A connection's first data segments from the local application are
/// acknowledged one by one, as a TCP receiver in quick-ack mode does, rather
/// than once per batch read from TUN. The application's TCP took its first
/// RTT sample from the held handshake (the far side's connect: a WAN round
/// trip) and paces at about twice its window per smoothed RTT, which moves
/// by an eighth per acknowledgement: at one acknowledgement per batch of ten
/// segments it needed ~30 batches to learn the sub-millisecond hop (lab, 50
/// ms: its first 70 ms at 10-40 Mbit/s, each burst ~12% sooner than the
/// last). 64 samples bring a 200-ms first sample below 0.1 ms.
const QUICK_ACKS: u32 = 64;

/// Split TCP settings.
#[derive(Debug, Clone)]
pub struct SplitConfig {
    /// Split this node's connections, and accept split connections from
    /// peers. Off: both are sent as plain packets (peers asking are told
    /// `Declined`).
    pub enabled: bool,
    /// Connections split at once (beyond: sent as plain packets).
    pub max_flows: usize,
    /// Bytes of each socket buffer (two per connection).
    pub buffer: usize,
}

impl Default for SplitConfig {
    fn default() -> Self {
        SplitConfig {
            enabled: true,
            max_flows: 512,
            buffer: 128 * 1024,
        }
    }
}

/// Split TCP counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SplitStats {
    /// Connections this node asked a peer to open.
    pub opened: u64,
    /// Connections opened here for a peer.
    pub accepted: u64,
    /// Connections refused (by the destination, or unreachable).
    pub refused: u64,
    /// Connections a peer declined to split (sent as plain packets).
    pub declined: u64,
    /// Connections ended by a reset (either side, or a lost stream).
    pub reset: u64,
    /// Connections that ended with both FINs.
    pub closed: u64,
    /// Connections sent as plain packets because the limit was reached.
    pub over_limit: u64,
    /// Packets of finished connections dropped.
    pub late: u64,
    /// Malformed or out-of-order stream messages.
    pub bad_msgs: u64,
    /// Connections split now.
    pub active: usize,
}

/// What [`Split::on_outbound`] did with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The proxy took it.
    Taken,
    /// Send it as a plain packet.
    Pass,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Connecting side: SYN held, `Open` sent (or to be sent), no answer yet.
    Waiting,
    /// Accepting side: connecting to the local application.
    Connecting,
    /// Both handshakes done (on the connecting side: the listener took the SYN).
    Open,
    /// Sent as plain packets (the remote declined, or no stream available).
    Passthrough,
}

struct Flow {
    peer: PublicKey,
    conv: Option<u32>,
    src: SocketAddr,
    dst: SocketAddr,
    stage: Stage,
    syn: Option<Vec<u8>>,
    sock: Option<SocketHandle>,
    /// `Fin` sent on the stream (the local application closed its side).
    fin_out: bool,
    /// `Fin` received and applied (the local socket was closed).
    fin_in: bool,
    /// Reset (sent or received); the flow ends after the next poll.
    reset: bool,
    /// Start of the current stage (passthrough: last packet).
    since: Duration,
    /// Data segments from the local application still to be acknowledged
    /// one by one (see [`QUICK_ACKS`]).
    quick_acks: u32,
}

/// A smoltcp device made of two packet queues: what the TUN side handed in
/// (`rx`) and what smoltcp sends (`tx`). The proxy's link to the TUN
/// device, and the simulated hosts' link to their node (`sim::tcp_host`).
pub struct QueueDevice {
    /// Packets for smoltcp to receive.
    pub rx: VecDeque<Vec<u8>>,
    /// Packets smoltcp sent.
    pub tx: Vec<Vec<u8>>,
    /// The link's MTU.
    pub mtu: usize,
}

impl QueueDevice {
    /// Empty queues on a link of MTU `mtu`.
    pub fn new(mtu: usize) -> QueueDevice {
        QueueDevice {
            rx: VecDeque::new(),
            tx: Vec::new(),
            mtu,
        }
    }
}

/// A received packet, lent to smoltcp.
pub struct RxTok(Vec<u8>);
/// Room for one packet smoltcp sends.
pub struct TxTok<'a>(&'a mut Vec<Vec<u8>>);

impl phy::RxToken for RxTok {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut b = vec![0u8; len];
        let r = f(&mut b);
        self.0.push(b);
        r
    }
}

impl Device for QueueDevice {
    type RxToken<'a>
        = RxTok
    where
        Self: 'a;
    type TxToken<'a>
        = TxTok<'a>
    where
        Self: 'a;

    fn receive(&mut self, _t: SmolInstant) -> Option<(RxTok, TxTok<'_>)> {
        let p = self.rx.pop_front()?;
        Some((RxTok(p), TxTok(&mut self.tx)))
    }

    fn transmit(&mut self, _t: SmolInstant) -> Option<TxTok<'_>> {
        Some(TxTok(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ip;
        c.max_transmission_unit = self.mtu;
        c.checksum = checksums();
        c
    }
}

/// Compute checksums on what smoltcp sends; do not verify what the local
/// kernel hands over (it may leave them to offload, and it cannot corrupt).
fn checksums() -> ChecksumCapabilities {
    let mut c = ChecksumCapabilities::ignored();
    c.ipv4 = Checksum::Tx;
    c.tcp = Checksum::Tx;
    c
}

fn smol_now(now: Duration) -> SmolInstant {
    SmolInstant::from_micros(now.as_micros() as i64)
}

/// The split TCP proxy of one node (one TUN device).
pub struct Split {
    cfg: SplitConfig,
    iface: Interface,
    sockets: SocketSet<'static>,
    pipe: QueueDevice,
    flows: BTreeMap<FlowKey, Flow>,
    by_conv: BTreeMap<(PublicKey, u32), FlowKey>,
    ended: BTreeMap<FlowKey, (Duration, PublicKey)>,
    ended_order: VecDeque<(Duration, FlowKey)>,
    out: VecDeque<(PublicKey, Vec<u8>)>,
    fallback: Vec<(PublicKey, Vec<u8>)>,
    /// Conversations of no connection already answered with a Reset.
    told: BTreeSet<(PublicKey, u32)>,
    dirty: bool,
    next_at: Option<Duration>,
    next_housekeeping: Duration,
    stats: SplitStats,
}

impl Split {
    /// A proxy whose TUN device has MTU `mtu`.
    pub fn new(cfg: SplitConfig, mtu: usize) -> Split {
        let mut pipe = QueueDevice::new(mtu);
        let mut iface = Interface::new(
            Config::new(HardwareAddress::Ip),
            &mut pipe,
            smol_now(Duration::ZERO),
        );
        // Any address routed "via" one of the interface's own takes part in
        // any-IP mode: the proxy answers for every remote address. The
        // interface's own addresses are never used (sockets always name both
        // endpoints): the IPv4 dummy address (RFC 7600) and one from the
        // IPv6 discard prefix (RFC 6666).
        let v4 = Ipv4Addr::new(192, 0, 0, 8);
        let v6 = Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 8);
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(v4), 32));
            let _ = a.push(IpCidr::new(IpAddress::Ipv6(v6), 128));
        });
        let _ = iface.routes_mut().add_default_ipv4_route(v4);
        let _ = iface.routes_mut().add_default_ipv6_route(v6);
        iface.set_any_ip(true);
        Split {
            cfg,
            iface,
            sockets: SocketSet::new(Vec::new()),
            pipe,
            flows: BTreeMap::new(),
            by_conv: BTreeMap::new(),
            ended: BTreeMap::new(),
            ended_order: VecDeque::new(),
            out: VecDeque::new(),
            fallback: Vec::new(),
            told: BTreeSet::new(),
            dirty: false,
            next_at: None,
            next_housekeeping: Duration::ZERO,
            stats: SplitStats::default(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> SplitStats {
        let mut s = self.stats.clone();
        s.active = self
            .flows
            .values()
            .filter(|f| f.stage != Stage::Passthrough)
            .count();
        s
    }

    /// Is splitting on?
    pub fn enabled(&self) -> bool {
        self.cfg.enabled
    }

    /// A TCP packet from the TUN device for `peer`: take it into the proxy,
    /// or say to send it as a plain packet.
    /// `worth` says whether splitting pays on this peer's path (see
    /// [`Session::split_worthwhile`]); it only decides for new connections.
    pub fn on_outbound(
        &mut self,
        now: Duration,
        peer: &PublicKey,
        pkt: &[u8],
        info: &ip::IpInfo,
        worth: bool,
    ) -> Verdict {
        let (Some(key), Some((sp, dp))) = (info.flow(), info.ports) else {
            return Verdict::Pass;
        };
        if info.proto != ip::PROTO_TCP {
            return Verdict::Pass;
        }
        if self.ended.contains_key(&key) {
            self.stats.late += 1;
            return Verdict::Taken;
        }
        if let Some(f) = self.flows.get_mut(&key) {
            match f.stage {
                Stage::Passthrough => {
                    f.since = now;
                    return Verdict::Pass;
                }
                Stage::Waiting => {
                    if ip::tcp_flags(pkt).is_some_and(is_pure_syn) {
                        f.syn = Some(pkt.to_vec());
                    }
                }
                Stage::Connecting | Stage::Open => {
                    self.pipe.rx.push_back(pkt.to_vec());
                    self.dirty = true;
                    if f.quick_acks > 0 && ip::tcp_payload_len(pkt) > 0 {
                        f.quick_acks -= 1;
                        // smoltcp answers what it has taken in on each
                        // poll: take this segment in (and answer it) now.
                        // One poll: its egress visits every socket, so the
                        // cost is one pass over the split connections per
                        // quick-acked segment, 64 per connection.
                        self.iface
                            .poll(smol_now(now), &mut self.pipe, &mut self.sockets);
                    }
                }
            }
            return Verdict::Taken;
        }
        if !self.cfg.enabled || !worth || !ip::tcp_flags(pkt).is_some_and(is_pure_syn) {
            return Verdict::Pass;
        }
        if self.flows.len() >= self.cfg.max_flows {
            self.stats.over_limit += 1;
            return Verdict::Pass;
        }
        self.flows.insert(
            key,
            Flow {
                peer: *peer,
                conv: None,
                src: SocketAddr::new(info.src, sp),
                dst: SocketAddr::new(info.dst, dp),
                stage: Stage::Waiting,
                syn: Some(pkt.to_vec()),
                sock: None,
                fin_out: false,
                fin_in: false,
                reset: false,
                since: now,
                quick_acks: QUICK_ACKS,
            },
        );
        self.dirty = true;
        Verdict::Taken
    }

    /// When [`Split::poll`] should run next.
    pub fn poll_timeout(&self, now: Duration) -> Option<Duration> {
        if self.dirty || !self.out.is_empty() || !self.fallback.is_empty() {
            return Some(now);
        }
        let house =
            (!self.flows.is_empty() || !self.ended.is_empty()).then_some(self.next_housekeeping);
        match (self.next_at, house) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Peers with split connections: the sessions [`Split::poll`] may feed,
    /// open or close streams in.
    pub fn flow_peers(&self) -> impl Iterator<Item = PublicKey> + '_ {
        self.flows.values().map(|f| f.peer)
    }

    /// Packets for the TUN device, with the peer each one is on behalf of
    /// (its source address must be that peer's).
    pub fn poll_out(&mut self) -> Option<(PublicKey, Vec<u8>)> {
        self.out.pop_front()
    }

    /// SYNs to send as plain packets after all (the remote declined).
    pub fn take_fallback(&mut self) -> Vec<(PublicKey, Vec<u8>)> {
        std::mem::take(&mut self.fallback)
    }

    /// `peer` was removed: its connections are reset.
    pub fn forget_peer(&mut self, peer: &PublicKey) {
        let keys: Vec<FlowKey> = self
            .flows
            .iter()
            .filter(|(_, f)| &f.peer == peer)
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            self.lost(&k);
        }
        self.dirty = true;
    }

    /// Run the proxy: stream messages to sockets, sockets to streams, smoltcp's
    /// timers, connection setup and teardown. `sessions` are the node's;
    /// only those in `touched` (the ones that took input or ran timers) are
    /// asked for stream events.
    pub fn poll(&mut self, now: Duration, sessions: &mut Sessions, touched: &BTreeSet<PublicKey>) {
        self.dirty = false;
        for peer in touched {
            let Some(s) = sessions.get_mut(peer) else {
                continue;
            };
            while let Some(ev) = s.poll_stream_event() {
                match ev {
                    StreamEvent::Gone(c) => {
                        if let Some(k) = self.by_conv.remove(&(*peer, c)) {
                            if let Some(f) = self.flows.get_mut(&k) {
                                f.conv = None;
                            }
                            self.lost(&k);
                        }
                    }
                    StreamEvent::Readable(c) => {
                        if !self.by_conv.contains_key(&(*peer, c)) {
                            self.accept_open(now, peer, s, c);
                        }
                    }
                }
            }
        }
        if self.flows.is_empty() && self.pipe.rx.is_empty() && self.pipe.tx.is_empty() {
            // Nothing split (a hub, an idle peer): no smoltcp work on this
            // turn of the node, only the expiry of finished connections.
            if now >= self.next_housekeeping {
                self.housekeeping(now, sessions);
                self.next_housekeeping = now + Duration::from_secs(1);
            }
            self.next_at = None;
            return;
        }
        self.open_waiting(now, sessions);
        self.run(now);
        // Every open flow moves bytes: the stream may have room again (acks
        // arrived) or the socket may have taken data (the application read).
        let keys: Vec<FlowKey> = self.flows.keys().copied().collect();
        for k in keys {
            self.exchange(now, &k, sessions);
        }
        self.run(now);
        if now >= self.next_housekeeping {
            self.housekeeping(now, sessions);
            self.next_housekeeping = now + Duration::from_secs(1);
        }
        self.cleanup(now, sessions);
        self.collect();
        self.next_at = self
            .iface
            .poll_delay(smol_now(now), &self.sockets)
            .map(|d| now + Duration::from_micros(d.total_micros()));
    }

    /// Let smoltcp process what the TUN side sent and send what it has,
    /// until it has nothing more (each socket sends one segment per round).
    fn run(&mut self, now: Duration) {
        let t = smol_now(now);
        for _ in 0..1024 {
            let before = self.pipe.tx.len();
            let had_rx = !self.pipe.rx.is_empty();
            self.iface.poll(t, &mut self.pipe, &mut self.sockets);
            if self.pipe.tx.len() == before && !had_rx {
                break;
            }
        }
    }

    /// Hand smoltcp's output to the TUN queue, each packet on behalf of the
    /// peer whose connection it belongs to.
    fn collect(&mut self) {
        for p in self.pipe.tx.drain(..) {
            let peer = ip::parse(&p).and_then(|i| i.flow()).and_then(|k| {
                self.flows
                    .get(&k)
                    .map(|f| f.peer)
                    .or_else(|| self.ended.get(&k).map(|e| e.1))
            });
            match peer {
                Some(peer) => self.out.push_back((peer, p)),
                None => self.stats.late += 1,
            }
        }
    }

    fn new_socket(buffer: usize) -> tcp::Socket<'static> {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; buffer]),
            tcp::SocketBuffer::new(vec![0u8; buffer]),
        );
        // The local hop is sub-millisecond: acknowledge at once, and never
        // hold small writes back (interactive traffic is the point).
        s.set_ack_delay(None);
        s.set_nagle_enabled(false);
        s
    }

    /// Connecting side: open stream conversations for held SYNs whose
    /// session is up.
    fn open_waiting(&mut self, now: Duration, sessions: &mut Sessions) {
        for (k, f) in self.flows.iter_mut() {
            if f.stage != Stage::Waiting || f.conv.is_some() {
                continue;
            }
            let Some(s) = sessions.get_mut(&f.peer) else {
                continue;
            };
            if !s.is_established() {
                continue;
            }
            match s.open_stream(now, f.src, f.dst) {
                Some(c) => {
                    f.conv = Some(c);
                    self.by_conv.insert((f.peer, c), *k);
                    self.stats.opened += 1;
                }
                None => {
                    // No conversation to be had: plain packets.
                    f.stage = Stage::Passthrough;
                    f.since = now;
                    if let Some(syn) = f.syn.take() {
                        self.fallback.push((f.peer, syn));
                    }
                }
            }
        }
    }

    /// Accepting side: the first message of a new stream conversation.
    fn accept_open(&mut self, now: Duration, peer: &PublicKey, s: &mut Session, conv: u32) {
        let Some(msg) = s.stream_take(now, conv) else {
            return;
        };
        let StreamMsg::Open { src, dst } = msg else {
            // A conversation whose connection ended here (its messages
            // still in flight), or one the remote opened without `Open`.
            // Data means the remote still thinks it open: tell it once.
            // Never answer a Reset (or anything else) with a Reset: two
            // sides that both forgot the connection would bounce Resets
            // for as long as they kept each other's conversation busy.
            tracing::debug!(conv, msg = ?kind(&msg), "stream message for no connection");
            if matches!(msg, StreamMsg::Data(_)) && !self.told.contains(&(*peer, conv)) {
                self.stats.bad_msgs += 1;
                s.stream_send(now, conv, &StreamMsg::Reset);
                self.told.insert((*peer, conv));
                if self.told.len() > MAX_ENDED {
                    self.told.pop_first();
                }
            }
            while s.stream_take(now, conv).is_some() {}
            s.stream_close(conv);
            return;
        };
        let refuse = |s: &mut Session, r: Refusal| {
            s.stream_send(now, conv, &StreamMsg::Refuse(r));
            s.stream_close(conv);
        };
        if !self.cfg.enabled || self.flows.len() >= self.cfg.max_flows {
            refuse(s, Refusal::Declined);
            return;
        }
        let key = flow_key(src, dst);
        if self.flows.contains_key(&key) || src.is_ipv4() != dst.is_ipv4() {
            refuse(s, Refusal::Reset);
            return;
        }
        self.ended.remove(&key);
        let mut sock = Self::new_socket(self.cfg.buffer);
        if sock.connect(self.iface.context(), dst, src).is_err() {
            refuse(s, Refusal::Unreachable);
            return;
        }
        let h = self.sockets.add(sock);
        self.flows.insert(
            key,
            Flow {
                peer: *peer,
                conv: Some(conv),
                src,
                dst,
                stage: Stage::Connecting,
                syn: None,
                sock: Some(h),
                fin_out: false,
                fin_in: false,
                reset: false,
                since: now,
                quick_acks: QUICK_ACKS,
            },
        );
        self.by_conv.insert((*peer, conv), key);
        self.stats.accepted += 1;
        self.dirty = true;
    }

    /// Move what can move between flow `k`'s stream and its socket.
    fn exchange(&mut self, now: Duration, k: &FlowKey, sessions: &mut Sessions) {
        let Some(f) = self.flows.get_mut(k) else {
            return;
        };
        let (Some(conv), Some(s)) = (f.conv, sessions.get_mut(&f.peer)) else {
            return;
        };
        if f.reset {
            return;
        }
        // Stream to socket.
        while let Some(m) = s.stream_take(now, conv) {
            match (f.stage, m) {
                (Stage::Waiting, StreamMsg::Accept) => {
                    let mut sock = Self::new_socket(self.cfg.buffer);
                    let ep = IpListenEndpoint {
                        addr: Some(f.dst.ip().into()),
                        port: f.dst.port(),
                    };
                    if sock.listen(ep).is_err() {
                        f.reset = true;
                        s.stream_send(now, conv, &StreamMsg::Reset);
                        break;
                    }
                    f.sock = Some(self.sockets.add(sock));
                    f.stage = Stage::Open;
                    if let Some(syn) = f.syn.take() {
                        // The listener takes this SYN before anything else
                        // (two listeners on one port must not swap SYNs).
                        self.pipe.rx.push_front(syn);
                        let t = smol_now(now);
                        self.iface.poll(t, &mut self.pipe, &mut self.sockets);
                    }
                }
                (Stage::Waiting, StreamMsg::Refuse(Refusal::Declined)) => {
                    self.stats.declined += 1;
                    f.stage = Stage::Passthrough;
                    f.since = now;
                    if let Some(syn) = f.syn.take() {
                        self.fallback.push((f.peer, syn));
                    }
                    s.stream_close(conv);
                    self.by_conv.remove(&(f.peer, conv));
                    f.conv = None;
                    return;
                }
                (Stage::Waiting, StreamMsg::Refuse(_) | StreamMsg::Reset) => {
                    self.stats.refused += 1;
                    if let Some(rst) = f.syn.take().and_then(|syn| reset_for(&syn)) {
                        self.out.push_back((f.peer, rst));
                    }
                    f.reset = true;
                    break;
                }
                (Stage::Open, StreamMsg::Data(d)) if !f.fin_in => {
                    let Some(h) = f.sock else { break };
                    let sock = self.sockets.get_mut::<tcp::Socket>(h);
                    if !sock.may_send() {
                        // Still in the handshake with the application (or it
                        // is gone, which the socket check below reports).
                        s.stream_unread(conv, StreamMsg::Data(d));
                        break;
                    }
                    let n = sock.send_slice(&d).unwrap_or(0);
                    if n < d.len() {
                        s.stream_unread(conv, StreamMsg::Data(d[n..].to_vec()));
                        break;
                    }
                }
                (Stage::Connecting | Stage::Open, StreamMsg::Fin) => {
                    if let Some(h) = f.sock {
                        self.sockets.get_mut::<tcp::Socket>(h).close();
                    }
                    f.fin_in = true;
                }
                (Stage::Connecting | Stage::Open, StreamMsg::Reset) => {
                    if let Some(h) = f.sock {
                        self.sockets.get_mut::<tcp::Socket>(h).abort();
                    }
                    f.reset = true;
                    self.stats.reset += 1;
                    break;
                }
                (stage, m) => {
                    tracing::debug!(conv, ?stage, fin_in = f.fin_in, msg = ?kind(&m), "stream message out of order");
                    self.stats.bad_msgs += 1;
                }
            }
        }
        if f.reset {
            return;
        }
        let Some(h) = f.sock else {
            return;
        };
        let sock = self.sockets.get_mut::<tcp::Socket>(h);
        let state = sock.state();
        if f.stage == Stage::Connecting {
            match state {
                tcp::State::SynSent => {
                    if now.saturating_sub(f.since) >= CONNECT_TIMEOUT {
                        sock.abort();
                        s.stream_send(now, conv, &StreamMsg::Refuse(Refusal::Unreachable));
                        f.reset = true;
                        self.stats.refused += 1;
                    }
                    return;
                }
                tcp::State::Closed => {
                    s.stream_send(now, conv, &StreamMsg::Refuse(Refusal::Reset));
                    f.reset = true;
                    self.stats.refused += 1;
                    return;
                }
                _ => {
                    s.stream_send(now, conv, &StreamMsg::Accept);
                    f.stage = Stage::Open;
                }
            }
        }
        // Socket to stream, as far as the stream has room.
        let chunk = s.stream_chunk();
        let mut room = s.stream_room(conv);
        while room > 0 && sock.can_recv() {
            // Whole segments while the stream has a queue (the rest will have
            // company before the pacer gets to it); a short piece only when
            // the stream would otherwise idle (interactive traffic).
            if sock.recv_queue() < chunk && s.stream_queued(conv) > 0 {
                break;
            }
            let want = room.min(chunk);
            // The ring buffer may hand out a piece short of its end: take
            // a second piece so a message still fills its segment.
            let mut data = Vec::with_capacity(want);
            while data.len() < want {
                let need = want - data.len();
                let got = sock.recv(|b| {
                    let n = b.len().min(need);
                    data.extend_from_slice(&b[..n]);
                    (n, n)
                });
                if !matches!(got, Ok(n) if n > 0) {
                    break;
                }
            }
            if data.is_empty() {
                break;
            }
            room = room.saturating_sub(chunk);
            s.stream_send(now, conv, &StreamMsg::Data(data));
        }
        let drained = sock.recv_queue() == 0;
        match state {
            tcp::State::CloseWait
            | tcp::State::LastAck
            | tcp::State::Closing
            | tcp::State::TimeWait
                if !f.fin_out && drained =>
            {
                s.stream_send(now, conv, &StreamMsg::Fin);
                f.fin_out = true;
            }
            tcp::State::Closed if !(f.fin_out && f.fin_in) => {
                // Reset by the application (or it vanished): pass it on.
                s.stream_send(now, conv, &StreamMsg::Reset);
                f.reset = true;
                self.stats.reset += 1;
            }
            _ => {}
        }
    }

    /// Remove flows that are over: reset (after the reset went out), or both
    /// sides closed and the local socket done.
    fn cleanup(&mut self, now: Duration, sessions: &mut Sessions) {
        let done: Vec<FlowKey> = self
            .flows
            .iter()
            .filter(|(_, f)| {
                let sock_done = f.sock.is_none_or(|h| {
                    matches!(
                        self.sockets.get::<tcp::Socket>(h).state(),
                        tcp::State::Closed | tcp::State::TimeWait
                    )
                });
                f.stage != Stage::Passthrough && (f.reset || (f.fin_in && f.fin_out && sock_done))
            })
            .map(|(k, _)| *k)
            .collect();
        for k in done {
            let Some(f) = self.flows.remove(&k) else {
                continue;
            };
            tracing::debug!(conv = ?f.conv, src = %f.src, dst = %f.dst, reset = f.reset, "split connection ended");
            if !f.reset {
                self.stats.closed += 1;
            }
            if let Some(h) = f.sock {
                self.sockets.remove(h);
            }
            if let Some(c) = f.conv {
                self.by_conv.remove(&(f.peer, c));
                if let Some(s) = sessions.get_mut(&f.peer) {
                    s.stream_close(c);
                }
            }
            if self.ended.insert(k, (now, f.peer)).is_none() {
                self.ended_order.push_back((now, k));
            }
        }
        while self.ended_order.len() > MAX_ENDED {
            if let Some((_, k)) = self.ended_order.pop_front() {
                self.ended.remove(&k);
            }
        }
    }

    /// Once a second: timeouts of held SYNs and plain-packet flows, expiry
    /// of finished connections.
    fn housekeeping(&mut self, now: Duration, sessions: &mut Sessions) {
        let stale: Vec<FlowKey> = self
            .flows
            .iter()
            .filter(|(_, f)| match f.stage {
                Stage::Waiting => now.saturating_sub(f.since) >= OPEN_TIMEOUT,
                Stage::Passthrough => now.saturating_sub(f.since) >= PASSTHROUGH_IDLE,
                _ => false,
            })
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            if let Some(f) = self.flows.remove(&k) {
                if let Some(c) = f.conv {
                    self.by_conv.remove(&(f.peer, c));
                    if let Some(s) = sessions.get_mut(&f.peer) {
                        s.stream_send(now, c, &StreamMsg::Reset);
                        s.stream_close(c);
                    }
                }
            }
        }
        while let Some(&(t, k)) = self.ended_order.front() {
            if now.saturating_sub(t) < ENDED_LINGER {
                break;
            }
            self.ended_order.pop_front();
            if self.ended.get(&k).is_some_and(|e| e.0 == t) {
                self.ended.remove(&k);
            }
        }
    }

    /// The stream of flow `k` is gone: reset the local connection.
    fn lost(&mut self, k: &FlowKey) {
        let Some(f) = self.flows.get_mut(k) else {
            return;
        };
        match f.stage {
            Stage::Waiting => {
                // Nothing was connected yet: ask again in the next session
                // (the remote restarted, or its conversation was dropped).
                f.conv = None;
                self.dirty = true;
                return;
            }
            Stage::Connecting | Stage::Open => {
                if let Some(h) = f.sock {
                    self.sockets.get_mut::<tcp::Socket>(h).abort();
                }
            }
            Stage::Passthrough => return,
        }
        if !f.reset {
            self.stats.reset += 1;
        }
        f.reset = true;
        self.dirty = true;
    }
}

/// A message's kind, for logs (not its data).
fn kind(m: &StreamMsg) -> &'static str {
    match m {
        StreamMsg::Open { .. } => "open",
        StreamMsg::Accept => "accept",
        StreamMsg::Refuse(_) => "refuse",
        StreamMsg::Data(_) => "data",
        StreamMsg::Fin => "fin",
        StreamMsg::Reset => "reset",
    }
}

fn flow_key(src: SocketAddr, dst: SocketAddr) -> FlowKey {
    let x = (src.ip(), src.port());
    let y = (dst.ip(), dst.port());
    let (a, b) = if x <= y { (x, y) } else { (y, x) };
    FlowKey {
        proto: ip::PROTO_TCP,
        a,
        b,
    }
}

fn is_pure_syn(flags: u8) -> bool {
    flags & (ip::TCP_SYN | ip::TCP_ACK | ip::TCP_RST) == ip::TCP_SYN
}

/// The reset that refuses the connection `syn` asked for (what a host with
/// nothing listening answers).
pub fn reset_for(syn: &[u8]) -> Option<Vec<u8>> {
    let info = ip::parse(syn)?;
    let (sp, dp) = info.ports?;
    let tcp = ip::tcp_header(syn)?;
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let repr = TcpRepr {
        src_port: dp,
        dst_port: sp,
        control: TcpControl::Rst,
        seq_number: TcpSeqNumber(0),
        ack_number: Some(TcpSeqNumber(seq.wrapping_add(1) as i32)),
        window_len: 0,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let caps = checksums();
    let tlen = repr.buffer_len();
    let (from, to): (IpAddress, IpAddress) = (info.dst.into(), info.src.into());
    let (hlen, mut buf) = match (info.dst, info.src) {
        (IpAddr::V4(d), IpAddr::V4(s)) => {
            let mut buf = vec![0u8; 20 + tlen];
            let r = Ipv4Repr {
                src_addr: d,
                dst_addr: s,
                next_header: IpProtocol::Tcp,
                payload_len: tlen,
                hop_limit: 64,
            };
            r.emit(&mut Ipv4Packet::new_unchecked(&mut buf[..]), &caps);
            (20, buf)
        }
        (IpAddr::V6(d), IpAddr::V6(s)) => {
            let mut buf = vec![0u8; 40 + tlen];
            let r = Ipv6Repr {
                src_addr: d,
                dst_addr: s,
                next_header: IpProtocol::Tcp,
                payload_len: tlen,
                hop_limit: 64,
            };
            r.emit(&mut Ipv6Packet::new_unchecked(&mut buf[..]));
            (40, buf)
        }
        _ => return None,
    };
    repr.emit(
        &mut TcpPacket::new_unchecked(&mut buf[hlen..]),
        &from,
        &to,
        &caps,
    );
    Some(buf)
}
