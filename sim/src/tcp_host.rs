//! Real TCP endpoints for the discrete-event network: a host's IP stack
//! (smoltcp, with CUBIC congestion control) on a node's in-memory TUN side.
//!
//! Offered loads do not react to delay; a TCP does. With these hosts the
//! simulator sees what the namespace lab sees: a transfer's speed is what its
//! TCP gets out of the path the mesh gives it (RTT, jitter, loss), whether
//! the mesh splits the connection or carries its packets.
//!
//! A host runs simple applications, each one connection ([`App`]): a sender
//! of a checkable byte pattern, a sink that checks it (optionally reading
//! slowly, answering after the sender's FIN, or resetting midway), and
//! records what happened to its connection.

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use transport::split::QueueDevice;

/// Byte `o` of the pattern every sender writes (not periodic at any
/// power-of-two length, so a misplaced segment shows).
pub fn pattern(o: u64) -> u8 {
    (o.wrapping_mul(131) ^ (o >> 11) ^ (o >> 19)) as u8
}

/// What an application does.
#[derive(Debug, Clone)]
pub enum AppKind {
    /// Connect to `to` from `port`, write `total` pattern bytes, then close
    /// the sending side (FIN) and read whatever comes back.
    Send {
        /// Destination.
        to: SocketAddr,
        /// Local port.
        port: u16,
        /// Bytes to write.
        total: u64,
    },
    /// Accept one connection on `port`, read and check the pattern.
    Sink {
        /// Port to listen on.
        port: u16,
        /// Read at most this many bytes per second (None: as fast as it comes).
        rate: Option<f64>,
        /// After the sender's FIN, write this many pattern bytes back, then close.
        reply: u64,
        /// Reset the connection after reading this many bytes.
        abort_after: Option<u64>,
    },
    /// Accept one connection on `port` and echo what it reads.
    Echo {
        /// Port to listen on.
        port: u16,
    },
    /// Connect to `to` from `port` and send a `size`-byte message every
    /// `every`, `count` times, each stamped with its send time; record the
    /// round-trip time of each echo.
    Ping {
        /// Destination (an [`AppKind::Echo`]).
        to: SocketAddr,
        /// Local port.
        port: u16,
        /// Interval between messages.
        every: Duration,
        /// Messages to send.
        count: u32,
        /// Message size (at least 8).
        size: usize,
    },
}

/// What happened to an application's connection.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AppStats {
    /// When the connection was established.
    pub connected_at: Option<Duration>,
    /// Pattern bytes written.
    pub written: u64,
    /// Bytes read.
    pub read: u64,
    /// A byte read differed from the pattern at its offset.
    pub corrupt: bool,
    /// When the peer's FIN arrived (all its data read).
    pub fin_at: Option<Duration>,
    /// The connection was refused (closed before it was established).
    pub refused: bool,
    /// The connection was reset after it was established.
    pub reset: bool,
    /// When the sending side finished writing (sender) or replying (sink).
    pub done_writing_at: Option<Duration>,
    /// Round-trip times of the echoed messages ([`AppKind::Ping`]).
    pub rtts: Vec<Duration>,
}

/// One application on a host.
pub struct App {
    /// What it does.
    pub kind: AppKind,
    /// What happened.
    pub stats: AppStats,
    handle: SocketHandle,
    closed_tx: bool,
    was_open: bool,
    tokens: f64,
    last: Duration,
    /// Ping: messages sent, next send time, bytes of a partial echo.
    sent_msgs: u32,
    next_send: Duration,
    partial: Vec<u8>,
}

fn t(now: Duration) -> SmolInstant {
    SmolInstant::from_micros(now.as_micros() as i64)
}

/// A host: one address, an IP stack, applications.
pub struct TcpHost {
    addr: IpAddr,
    iface: Interface,
    sockets: SocketSet<'static>,
    link: QueueDevice,
    /// The applications, in the order added.
    pub apps: Vec<App>,
    buffer: usize,
    /// Keep-alive interval and the time without an answer after which a
    /// connection is given up (reset), for sockets added from now on.
    keepalive: Option<(Duration, Duration)>,
    /// Packets the node's TUN side delivered to this host.
    pub packets_in: u64,
    /// TCP packets carrying data this host sent.
    pub data_out: u64,
}

impl TcpHost {
    /// A host at `addr` whose TUN device has MTU `mtu`; every socket gets
    /// two buffers of `buffer` bytes (its TCP window).
    pub fn new(addr: IpAddr, mtu: usize, buffer: usize) -> TcpHost {
        let mut link = QueueDevice::new(mtu);
        let mut iface = Interface::new(
            Config::new(HardwareAddress::Ip),
            &mut link,
            t(Duration::ZERO),
        );
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::from(addr), prefix));
        });
        match addr {
            IpAddr::V4(a) => {
                let _ = iface.routes_mut().add_default_ipv4_route(a);
            }
            IpAddr::V6(a) => {
                let _ = iface.routes_mut().add_default_ipv6_route(a);
            }
        }
        TcpHost {
            addr,
            iface,
            sockets: SocketSet::new(Vec::new()),
            link,
            apps: Vec::new(),
            buffer,
            keepalive: None,
            packets_in: 0,
            data_out: 0,
        }
    }

    /// Sockets added from now on send keep-alives every `interval` while
    /// idle and give up (reset) after `timeout` without an answer to what
    /// they sent, as a long-lived application sets SO_KEEPALIVE and
    /// TCP_USER_TIMEOUT: a connection whose far end vanished without a word
    /// is found out instead of waiting forever.
    pub fn with_keepalive(mut self, interval: Duration, timeout: Duration) -> TcpHost {
        self.keepalive = Some((interval, timeout));
        self
    }

    /// The host's address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// Start an application now; returns its index in [`TcpHost::apps`].
    pub fn add(&mut self, now: Duration, kind: AppKind) -> usize {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; self.buffer]),
            tcp::SocketBuffer::new(vec![0u8; self.buffer]),
        );
        s.set_congestion_control(tcp::CongestionControl::Cubic);
        s.set_nagle_enabled(false);
        if let Some((interval, timeout)) = self.keepalive {
            s.set_keep_alive(Some(smoltcp::time::Duration::from_micros(
                interval.as_micros() as u64,
            )));
            s.set_timeout(Some(smoltcp::time::Duration::from_micros(
                timeout.as_micros() as u64,
            )));
        }
        match &kind {
            AppKind::Send { to, port, .. } => {
                let local = IpEndpoint::new(IpAddress::from(self.addr), *port);
                s.connect(self.iface.context(), *to, local)
                    .expect("valid endpoints");
            }
            AppKind::Sink { port, .. } | AppKind::Echo { port } => {
                s.listen(IpListenEndpoint::from(*port)).expect("valid port");
            }
            AppKind::Ping { to, port, .. } => {
                let local = IpEndpoint::new(IpAddress::from(self.addr), *port);
                s.connect(self.iface.context(), *to, local)
                    .expect("valid endpoints");
            }
        }
        let handle = self.sockets.add(s);
        self.apps.push(App {
            kind,
            stats: AppStats::default(),
            handle,
            closed_tx: false,
            was_open: false,
            tokens: 0.0,
            last: now,
            sent_msgs: 0,
            next_send: now,
            partial: Vec::new(),
        });
        self.apps.len() - 1
    }

    /// App `i`'s socket, in words (state, queues, windows) for diagnostics.
    pub fn describe(&self, i: usize) -> String {
        let s = self.sockets.get::<tcp::Socket>(self.apps[i].handle);
        format!(
            "{} recv_queue {} send_queue {} window {}",
            s.state(),
            s.recv_queue(),
            s.send_queue(),
            s.recv_capacity() - s.recv_queue()
        )
    }

    /// A packet from the node's TUN side.
    pub fn input(&mut self, pkt: Vec<u8>) {
        self.packets_in += 1;
        self.link.rx.push_back(pkt);
    }

    /// Run the stack and the applications at `now`; returns the packets the
    /// host sends (to the node's TUN side).
    pub fn poll(&mut self, now: Duration) -> Vec<Vec<u8>> {
        for _ in 0..4096 {
            self.iface.poll(t(now), &mut self.link, &mut self.sockets);
            let before = self.link.tx.len();
            let moved = self.run_apps(now);
            self.iface.poll(t(now), &mut self.link, &mut self.sockets);
            if !moved && self.link.tx.len() == before && self.link.rx.is_empty() {
                break;
            }
        }
        let out = std::mem::take(&mut self.link.tx);
        self.data_out += out
            .iter()
            .filter(|p| transport::ip::tcp_payload_len(p) > 0)
            .count() as u64;
        out
    }

    /// When the host next needs [`TcpHost::poll`] (its TCP timers, a
    /// rate-limited reader's next read).
    pub fn poll_at(&mut self, now: Duration) -> Option<Duration> {
        if !self.link.rx.is_empty() {
            return Some(now);
        }
        let mut at = self
            .iface
            .poll_at(t(now), &self.sockets)
            .map(|i| Duration::from_micros(i.total_micros().max(0) as u64));
        for a in &self.apps {
            if let AppKind::Ping { count, .. } = a.kind {
                if a.sent_msgs < count && a.stats.connected_at.is_some() {
                    let next = a.next_send.max(now);
                    at = Some(at.map_or(next, |x| x.min(next)));
                }
            }
            if let AppKind::Sink { rate: Some(_), .. } = a.kind {
                let s = self.sockets.get::<tcp::Socket>(a.handle);
                if s.can_recv() {
                    let next = now + Duration::from_millis(10);
                    at = Some(at.map_or(next, |x| x.min(next)));
                }
            }
        }
        at
    }

    fn run_apps(&mut self, now: Duration) -> bool {
        let mut moved = false;
        for a in &mut self.apps {
            let s = self.sockets.get_mut::<tcp::Socket>(a.handle);
            let st = s.state();
            if matches!(st, tcp::State::Established) && a.stats.connected_at.is_none() {
                a.stats.connected_at = Some(now);
                a.was_open = true;
                a.next_send = now;
            }
            if st == tcp::State::Closed {
                if !a.was_open {
                    a.stats.refused = true;
                } else if a.stats.fin_at.is_none() || !a.closed_tx {
                    a.stats.reset = true;
                }
                continue;
            }
            match a.kind {
                AppKind::Echo { .. } => {
                    while s.can_recv() && s.can_send() {
                        let room = s.send_capacity() - s.send_queue();
                        let data = s
                            .recv(|b| {
                                let n = b.len().min(room);
                                (n, b[..n].to_vec())
                            })
                            .unwrap_or_default();
                        if data.is_empty() {
                            break;
                        }
                        a.stats.read += data.len() as u64;
                        let _ = s.send_slice(&data);
                        moved = true;
                    }
                    continue;
                }
                AppKind::Ping {
                    every, count, size, ..
                } => {
                    let size = size.max(8);
                    while a.was_open
                        && a.sent_msgs < count
                        && now >= a.next_send
                        && s.send_capacity() - s.send_queue() >= size
                    {
                        let mut m = vec![0u8; size];
                        m[..8].copy_from_slice(&(now.as_micros() as u64).to_le_bytes());
                        let _ = s.send_slice(&m);
                        a.sent_msgs += 1;
                        a.stats.written += size as u64;
                        a.next_send += every;
                        moved = true;
                    }
                    while s.can_recv() {
                        let data = s.recv(|b| (b.len(), b.to_vec())).unwrap_or_default();
                        if data.is_empty() {
                            break;
                        }
                        a.stats.read += data.len() as u64;
                        a.partial.extend_from_slice(&data);
                        while a.partial.len() >= size {
                            let mut t = [0u8; 8];
                            t.copy_from_slice(&a.partial[..8]);
                            let sent = Duration::from_micros(u64::from_le_bytes(t));
                            a.stats.rtts.push(now.saturating_sub(sent));
                            a.partial.drain(..size);
                        }
                        moved = true;
                    }
                    continue;
                }
                _ => {}
            }
            // Read (checking the pattern).
            let limited = matches!(a.kind, AppKind::Sink { rate: Some(_), .. });
            let mut budget = match &a.kind {
                AppKind::Sink { rate: Some(r), .. } => {
                    let dt = now.saturating_sub(a.last).as_secs_f64();
                    a.tokens = (a.tokens + dt * r).min(r * 0.1);
                    a.last = now;
                    a.tokens as usize
                }
                _ => usize::MAX,
            };
            while budget > 0 && s.can_recv() {
                let off = a.stats.read;
                let (n, bad) = s
                    .recv(|b| {
                        let n = b.len().min(budget);
                        let bad = b[..n]
                            .iter()
                            .enumerate()
                            .any(|(i, &x)| x != pattern(off + i as u64));
                        (n, (n, bad))
                    })
                    .unwrap_or((0, false));
                if n == 0 {
                    break;
                }
                a.stats.read += n as u64;
                a.stats.corrupt |= bad;
                budget -= n;
                if limited {
                    a.tokens -= n as f64;
                }
                moved = true;
            }
            if let AppKind::Sink {
                abort_after: Some(x),
                ..
            } = a.kind
            {
                if a.stats.read >= x {
                    s.abort();
                    moved = true;
                    continue;
                }
            }
            if a.stats.fin_at.is_none() && a.was_open && !s.may_recv() && s.recv_queue() == 0 {
                a.stats.fin_at = Some(now);
                moved = true;
            }
            // Write.
            let total = match &a.kind {
                AppKind::Send { total, .. } => Some(*total),
                AppKind::Sink { reply, .. } if a.stats.fin_at.is_some() => Some(*reply),
                AppKind::Sink { .. } | AppKind::Echo { .. } | AppKind::Ping { .. } => None,
            };
            if let Some(total) = total {
                while a.stats.written < total && s.can_send() {
                    let off = a.stats.written;
                    let n = s
                        .send(|b| {
                            let n = (b.len() as u64).min(total - off) as usize;
                            for (i, x) in b[..n].iter_mut().enumerate() {
                                *x = pattern(off + i as u64);
                            }
                            (n, n)
                        })
                        .unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    a.stats.written += n as u64;
                    moved = true;
                }
                if a.stats.written >= total && !a.closed_tx {
                    s.close();
                    a.closed_tx = true;
                    a.stats.done_writing_at = Some(now);
                    moved = true;
                }
            }
        }
        moved
    }
}

/// Host 0's TCP host address in [`tcp_pair`].
pub const HOST_A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 77, 0, 1));
/// Host 1's.
pub const HOST_B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 77, 0, 2));

/// Two nodes (configured `a` and `b`) over `spec` both ways with a session
/// up, and a TCP host on each ([`HOST_A`], [`HOST_B`]) whose sockets have
/// `buffer`-byte windows.
pub fn tcp_pair(
    seed: u64,
    a: crate::des::NodeConfigPair,
    spec: crate::impair::LinkSpec,
    buffer: usize,
) -> (
    crate::des::Net,
    transport::wire::PublicKey,
    transport::wire::PublicKey,
) {
    let (mut net, ka, kb) = crate::des::pair_with(seed, a.0, a.1, spec);
    let mtu = net.node(0).node.session_config().tun_mtu();
    net.attach_host(0, TcpHost::new(HOST_A, mtu, buffer));
    net.attach_host(1, TcpHost::new(HOST_B, mtu, buffer));
    net.route(HOST_B, kb);
    net.route(HOST_A, ka);
    (net, ka, kb)
}

/// A node configuration with split TCP on or off, the rest default.
pub fn node_config(split: bool) -> transport::NodeConfig {
    transport::NodeConfig {
        split: transport::split::SplitConfig {
            enabled: split,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Start sending `total` bytes from host 0 to a new sink on host 1 (port
/// `port`); returns the sink's and the sender's app indices.
pub fn start_transfer(net: &mut crate::des::Net, total: u64, port: u16) -> (usize, usize) {
    let now = net.now();
    let k = net.host_mut(1).add(
        now,
        AppKind::Sink {
            port,
            rate: None,
            reply: 0,
            abort_after: None,
        },
    );
    let s = net.host_mut(0).add(
        now,
        AppKind::Send {
            to: SocketAddr::new(HOST_B, port),
            port: 40_000u16.wrapping_add(port),
            total,
        },
    );
    (k, s)
}

/// Send `total` bytes from host 0 to a sink on host 1 (port `port`); run
/// until the sink saw the FIN or `limit` passed. Returns the sink's and
/// the sender's stats and the goodput in bit/s (start to FIN, or to the
/// end of the run).
pub fn transfer(
    net: &mut crate::des::Net,
    total: u64,
    port: u16,
    limit: Duration,
) -> (AppStats, AppStats, f64) {
    let now = net.now();
    let (k, s) = start_transfer(net, total, port);
    let end = now + limit;
    while net.now() < end && net.host(1).apps[k].stats.fin_at.is_none() {
        net.run_for(Duration::from_millis(50));
    }
    let st = net.host(1).apps[k].stats.clone();
    let snd = net.host(0).apps[s].stats.clone();
    let secs = st
        .fin_at
        .unwrap_or(net.now())
        .saturating_sub(now)
        .as_secs_f64();
    let bps = st.read as f64 * 8.0 / secs.max(1e-9);
    (st, snd, bps)
}

/// Echo server on host 1 port `port`, and host 0 sending `count` 64-byte
/// messages `every` apart to it; runs until the last echo or `limit`.
/// Returns the round-trip times (sorted) and how many were sent.
pub fn messages(
    net: &mut crate::des::Net,
    port: u16,
    every: Duration,
    count: u32,
    limit: Duration,
) -> (Vec<Duration>, u32) {
    let now = net.now();
    net.host_mut(1).add(now, AppKind::Echo { port });
    let p = net.host_mut(0).add(
        now,
        AppKind::Ping {
            to: SocketAddr::new(HOST_B, port),
            port: 41_000u16.wrapping_add(port),
            every,
            count,
            size: 64,
        },
    );
    let end = now + limit;
    while net.now() < end && net.host(0).apps[p].stats.rtts.len() < count as usize {
        net.run_for(Duration::from_millis(100));
    }
    let mut r = net.host(0).apps[p].stats.rtts.clone();
    r.sort();
    (r, count)
}

/// The `q` quantile (0..=1) of sorted `v` (zero if empty).
pub fn quantile(v: &[Duration], q: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1]
}
