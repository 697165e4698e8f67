//! The two IO traits everything else is written against and their real
//! implementations (tokio UDP with GSO/GRO, tun-rs with offload). Simulated
//! and impaired implementations live in the `sim` crate.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

/// An unreliable datagram socket: UDP, a turmoil socket, or a wrapper around one.
pub trait Datagram: Send + Sync {
    /// Send one datagram to `to`.
    fn send_to(&self, buf: &[u8], to: SocketAddr)
        -> impl Future<Output = io::Result<usize>> + Send;
    /// Receive one datagram; returns its length and sender.
    fn recv_from(
        &self,
        buf: &mut [u8],
    ) -> impl Future<Output = io::Result<(usize, SocketAddr)>> + Send;
    /// The bound local address.
    fn local_addr(&self) -> io::Result<SocketAddr>;
    /// Wait until [`Datagram::try_recv_from`] may succeed (it can still return
    /// `WouldBlock`; readiness is cleared by that).
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Receive one datagram without waiting (`WouldBlock` if none).
    fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)>;
    /// Send one datagram without waiting (`WouldBlock` if the socket is full).
    fn try_send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize>;
    /// Wait until [`Datagram::try_send_to`] may succeed.
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Send a path MTU probe without waiting: like [`Datagram::try_send_to`]
    /// but never fragmented (the don't-fragment bit set; a datagram larger
    /// than the interface MTU fails). Where the socket cannot tell, a plain send.
    fn try_send_probe(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.try_send_to(buf, to)
    }
    /// Most equal-size datagrams one [`Datagram::try_send_gso`] call can carry
    /// (1 where the socket has no segmentation offload).
    fn max_gso_segments(&self) -> usize {
        1
    }
    /// Send `buf` to `to` as datagrams of `segment` bytes (the last may be
    /// shorter) without waiting; returns how many datagrams went out. With UDP
    /// GSO this is one system call; a `WouldBlock` error means none went out.
    fn try_send_gso(&self, buf: &[u8], segment: usize, to: SocketAddr) -> io::Result<usize> {
        send_each(buf, segment, |c| self.try_send_to(c, to))
    }
    /// Receive without waiting into `buf`: one datagram, or with UDP GRO several
    /// from one sender back to back. Returns (bytes, stride, sender): datagram i
    /// is `buf[i*stride..min((i+1)*stride, bytes)]`.
    fn try_recv_gro(&self, buf: &mut [u8]) -> io::Result<(usize, usize, SocketAddr)> {
        let (n, from) = self.try_recv_from(buf)?;
        Ok((n, n.max(1), from))
    }
    /// Receive without waiting into several buffers at once (`recvmmsg`);
    /// `out[i]` describes buffer i like [`Datagram::try_recv_gro`]. Returns how
    /// many buffers were filled.
    fn try_recv_batch(
        &self,
        bufs: &mut [Vec<u8>],
        out: &mut [(usize, usize, SocketAddr)],
    ) -> io::Result<usize> {
        out[0] = self.try_recv_gro(&mut bufs[0])?;
        Ok(1)
    }
    /// A number that changes whenever the destinations reached by a stream
    /// instead of datagrams change ([`crate::stream::Streamed`]); constant
    /// for a plain socket.
    fn stream_epoch(&self) -> u64 {
        0
    }
    /// Whether frames to `to` travel on a stream now.
    fn on_stream(&self, _to: SocketAddr) -> bool {
        false
    }
    /// Many-port punching, the side behind a port-changing NAT: open many
    /// mappings towards `dest` ([`crate::spray::Sprayed`]; nothing for a
    /// plain socket).
    fn open_ports(&self, _dest: SocketAddr) {}
    /// Many-port punching, the other side: probe many ports of `ip`.
    fn spray(&self, _ip: std::net::IpAddr) {}
    /// Send several datagrams; returns how many were sent. Implementations with
    /// `sendmmsg` or GSO can do this in one system call.
    fn send_batch<'a>(
        &'a self,
        pkts: &'a [(SocketAddr, &'a [u8])],
    ) -> impl Future<Output = io::Result<usize>> + Send + 'a {
        async move {
            for (to, p) in pkts {
                self.send_to(p, *to).await?;
            }
            Ok(pkts.len())
        }
    }
}

impl Datagram for tokio::net::UdpSocket {
    fn send_to(
        &self,
        buf: &[u8],
        to: SocketAddr,
    ) -> impl Future<Output = io::Result<usize>> + Send {
        tokio::net::UdpSocket::send_to(self, buf, to)
    }
    fn recv_from(
        &self,
        buf: &mut [u8],
    ) -> impl Future<Output = io::Result<(usize, SocketAddr)>> + Send {
        tokio::net::UdpSocket::recv_from(self, buf)
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        tokio::net::UdpSocket::local_addr(self)
    }
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        tokio::net::UdpSocket::readable(self)
    }
    fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        tokio::net::UdpSocket::try_recv_from(self, buf)
    }
    fn try_send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        tokio::net::UdpSocket::try_send_to(self, buf, to)
    }
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
        tokio::net::UdpSocket::writable(self)
    }
}

/// Send `buf` as `segment`-byte datagrams one call each; stops at the first
/// failure (an error only if nothing went out).
fn send_each(
    buf: &[u8],
    segment: usize,
    mut send: impl FnMut(&[u8]) -> io::Result<usize>,
) -> io::Result<usize> {
    let mut n = 0;
    for c in buf.chunks(segment.max(1)) {
        match send(c) {
            Ok(_) => n += 1,
            Err(e) if n == 0 => return Err(e),
            Err(_) => break,
        }
    }
    Ok(n)
}

/// A UDP socket with segmentation offload on both sides (UDP GSO for sending
/// runs of equal-size datagrams in one system call, UDP GRO for receiving
/// them), through `quinn-udp`, falling back to plain calls where the kernel
/// lacks them.
pub struct FastUdp {
    sock: tokio::net::UdpSocket,
    state: quinn_udp::UdpSocketState,
    /// The socket is IPv6 (dual-stack when bound to `[::]`): IPv4
    /// destinations are sent as IPv4-mapped addresses.
    v6: bool,
}

/// `to` as a socket of the given family can send to it: an IPv4 address
/// becomes IPv4-mapped on an IPv6 socket.
fn for_socket(v6: bool, to: SocketAddr) -> SocketAddr {
    match to {
        SocketAddr::V4(a) if v6 => SocketAddr::new(a.ip().to_ipv6_mapped().into(), a.port()),
        _ => to,
    }
}

/// A received source in the form the rest of fastmesh uses: an
/// IPv4-mapped IPv6 address (an IPv4 sender seen by a dual-stack socket)
/// as the IPv4 address it is, so a node has one endpoint whichever socket
/// family saw it.
pub fn canonical(from: SocketAddr) -> SocketAddr {
    SocketAddr::new(from.ip().to_canonical(), from.port())
}

/// Whether the kernel may fragment what the socket sends (`fragment`: the
/// don't-fragment bit off, oversized datagrams are fragmented at the source
/// and by routers) or not (the bit on; datagrams larger than the interface
/// MTU fail with `EMSGSIZE`; learned path MTUs are ignored, as probing
/// wants). fastmesh sizes its frames by path MTU discovery and sends its
/// probes with the bit on; everything else goes with it off, so a frame cut
/// before the path narrowed, or a datagram larger than the path, still
/// arrives (in fragments) rather than not at all. Best effort: false if
/// neither the IPv4 nor the IPv6 option could be set.
fn set_fragmentation(fd: std::os::fd::RawFd, fragment: bool) -> bool {
    let set = |level: libc::c_int, name: libc::c_int, val: libc::c_int| {
        // SAFETY: setsockopt with a pointer to a live c_int and its size.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&val as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    let (v4, v6) = if fragment {
        (libc::IP_PMTUDISC_DONT, libc::IPV6_PMTUDISC_DONT)
    } else {
        (libc::IP_PMTUDISC_PROBE, libc::IPV6_PMTUDISC_PROBE)
    };
    let a = set(libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, v4);
    let b = set(libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER, v6);
    a == 0 || b == 0
}

impl FastUdp {
    /// Wrap a bound, non-blocking std socket (must be called inside a tokio runtime).
    pub fn new(sock: std::net::UdpSocket) -> io::Result<FastUdp> {
        let state = quinn_udp::UdpSocketState::new((&sock).into())?;
        use std::os::fd::AsRawFd;
        if !set_fragmentation(sock.as_raw_fd(), true) {
            tracing::debug!("could not allow fragmentation on the UDP socket");
        }
        let v6 = sock.local_addr()?.is_ipv6();
        Ok(FastUdp {
            sock: tokio::net::UdpSocket::from_std(sock)?,
            state,
            v6,
        })
    }
}

impl Datagram for FastUdp {
    fn send_to(
        &self,
        buf: &[u8],
        to: SocketAddr,
    ) -> impl Future<Output = io::Result<usize>> + Send {
        self.sock.send_to(buf, for_socket(self.v6, to))
    }
    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let (n, from) = self.sock.recv_from(buf).await?;
        Ok((n, canonical(from)))
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        self.sock.readable()
    }
    fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let (n, from) = self.sock.try_recv_from(buf)?;
        Ok((n, canonical(from)))
    }
    fn try_send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.sock.try_send_to(buf, for_socket(self.v6, to))
    }
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
        self.sock.writable()
    }
    fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments()
    }
    fn try_send_gso(&self, buf: &[u8], segment: usize, to: SocketAddr) -> io::Result<usize> {
        let to = for_socket(self.v6, to);
        let segs = buf.len().div_ceil(segment.max(1));
        if segs <= 1 || self.state.max_gso_segments() <= 1 {
            return send_each(buf, segment, |c| self.sock.try_send_to(c, to));
        }
        let t = quinn_udp::Transmit {
            destination: to,
            ecn: None,
            contents: buf,
            segment_size: Some(segment),
            src_ip: None,
        };
        self.sock
            .try_io(tokio::io::Interest::WRITABLE, || {
                self.state.send((&self.sock).into(), &t)
            })
            .map(|_| segs)
    }
    fn try_send_probe(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        let fd = self.sock.as_raw_fd();
        set_fragmentation(fd, false);
        let r = self.sock.try_send_to(buf, for_socket(self.v6, to));
        set_fragmentation(fd, true);
        r
    }
    fn try_recv_batch(
        &self,
        bufs: &mut [Vec<u8>],
        out: &mut [(usize, usize, SocketAddr)],
    ) -> io::Result<usize> {
        const MAX: usize = 32;
        let k = bufs.len().min(out.len()).min(MAX);
        if k == 1 {
            // (The batch's per-call set-up costs more than the call when one
            // datagram is asked for: the data plane's check that the socket
            // is empty.)
            out[0] = self.try_recv_gro(&mut bufs[0])?;
            return Ok(1);
        }
        let mut meta = [quinn_udp::RecvMeta::default(); MAX];
        let mut slices: [std::io::IoSliceMut<'_>; MAX] =
            std::array::from_fn(|_| std::io::IoSliceMut::new(&mut []));
        for (s, b) in slices.iter_mut().zip(bufs.iter_mut()).take(k) {
            *s = std::io::IoSliceMut::new(&mut b[..]);
        }
        let n = self.sock.try_io(tokio::io::Interest::READABLE, || {
            self.state
                .recv((&self.sock).into(), &mut slices[..k], &mut meta[..k])
        })?;
        for i in 0..n {
            out[i] = (meta[i].len, meta[i].stride.max(1), canonical(meta[i].addr));
        }
        Ok(n)
    }
    fn try_recv_gro(&self, buf: &mut [u8]) -> io::Result<(usize, usize, SocketAddr)> {
        let mut meta = [quinn_udp::RecvMeta::default()];
        let mut bufs = [std::io::IoSliceMut::new(buf)];
        self.sock.try_io(tokio::io::Interest::READABLE, || {
            self.state.recv((&self.sock).into(), &mut bufs, &mut meta)
        })?;
        let m = &meta[0];
        Ok((m.len, m.stride.max(1), canonical(m.addr)))
    }
}

/// A device that reads and writes whole IP packets: a TUN device or an in-memory one.
pub trait PacketDevice: Send + Sync {
    /// Read one IP packet.
    fn recv(&self, buf: &mut [u8]) -> impl Future<Output = io::Result<usize>> + Send;
    /// Write one IP packet.
    fn send(&self, pkt: &[u8]) -> impl Future<Output = io::Result<usize>> + Send;
    /// Wait until [`PacketDevice::try_recv`] may succeed.
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Read one IP packet without waiting (`WouldBlock` if none).
    fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Write one IP packet without waiting (`WouldBlock` if the device queue is full).
    fn try_send(&self, pkt: &[u8]) -> io::Result<usize>;
    /// Bytes every buffer given to [`PacketDevice::try_send_many`] reserves
    /// in front of its packet (room for an offload header).
    fn headroom(&self) -> usize {
        0
    }
    /// Fewest free slots [`PacketDevice::try_recv_many`] needs (one read may
    /// yield a whole TCP super-packet split into segments).
    fn min_slots(&self) -> usize {
        1
    }
    /// One read without waiting. Packets go into `slots` (lengths into
    /// `lens`); returns how many. `scratch` is reusable working space.
    fn try_recv_many(
        &self,
        scratch: &mut Vec<u8>,
        slots: &mut [&mut [u8]],
        lens: &mut [usize],
    ) -> io::Result<usize> {
        let _ = scratch;
        let n = self.try_recv(slots[0])?;
        lens[0] = n;
        Ok(1)
    }
    /// Like [`PacketDevice::try_recv_many`], but reads the device even if
    /// the runtime has not seen it readable yet: right after a write to the
    /// device the kernel's answer (an echo reply, TCP's ack) is often queued
    /// already. `WouldBlock` when there is nothing.
    fn recv_many_now(
        &self,
        scratch: &mut Vec<u8>,
        slots: &mut [&mut [u8]],
        lens: &mut [usize],
    ) -> io::Result<usize> {
        self.try_recv_many(scratch, slots, lens)
    }
    /// Write packets without waiting; packet i is `bufs[i][headroom()..]`.
    /// The buffers may be changed (coalescing). Returns how many packets
    /// could not be written.
    fn try_send_many(&self, bufs: &mut [Vec<u8>]) -> usize {
        let h = self.headroom();
        bufs.iter()
            .filter(|b| b.len() <= h || self.try_send(&b[h..]).is_err())
            .count()
    }
}

impl PacketDevice for tun_rs::AsyncDevice {
    fn recv(&self, buf: &mut [u8]) -> impl Future<Output = io::Result<usize>> + Send {
        tun_rs::AsyncDevice::recv(self, buf)
    }
    fn send(&self, pkt: &[u8]) -> impl Future<Output = io::Result<usize>> + Send {
        tun_rs::AsyncDevice::send(self, pkt)
    }
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        tun_rs::AsyncDevice::readable(self)
    }
    fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        tun_rs::AsyncDevice::try_recv(self, buf)
    }
    fn try_send(&self, pkt: &[u8]) -> io::Result<usize> {
        tun_rs::AsyncDevice::try_send(self, pkt)
    }
    fn headroom(&self) -> usize {
        if self.tcp_gso() {
            TUN_HEADROOM
        } else {
            0
        }
    }
    fn min_slots(&self) -> usize {
        if self.tcp_gso() {
            // A 64 KiB super-packet split at the smallest MSS we configure.
            48
        } else {
            1
        }
    }
    fn try_recv_many(
        &self,
        scratch: &mut Vec<u8>,
        slots: &mut [&mut [u8]],
        lens: &mut [usize],
    ) -> io::Result<usize> {
        tun_recv(self, scratch, slots, lens, false)
    }
    fn recv_many_now(
        &self,
        scratch: &mut Vec<u8>,
        slots: &mut [&mut [u8]],
        lens: &mut [usize],
    ) -> io::Result<usize> {
        tun_recv(self, scratch, slots, lens, true)
    }
    fn try_send_many(&self, bufs: &mut [Vec<u8>]) -> usize {
        if !self.tcp_gso() {
            return bufs
                .iter()
                .filter(|b| tun_rs::AsyncDevice::try_send(self, b).is_err())
                .count();
        }
        GRO.with(|g| {
            let mut g = g.borrow_mut();
            match tun_rs::DeviceImpl::send_multiple(self, &mut g, bufs, TUN_HEADROOM) {
                Ok(_) => 0,
                Err(_) => bufs.len(),
            }
        })
    }
}

/// One read of `dev` into `slots` (a super-packet split into segments when
/// the device offloads TCP). `now`: with the device's own non-blocking read;
/// the async one answers `WouldBlock` without reading while the runtime's
/// cached readiness says the device is empty.
fn tun_recv(
    dev: &tun_rs::AsyncDevice,
    scratch: &mut Vec<u8>,
    slots: &mut [&mut [u8]],
    lens: &mut [usize],
    now: bool,
) -> io::Result<usize> {
    if !dev.tcp_gso() {
        lens[0] = if now {
            use std::os::fd::AsRawFd;
            let buf = &mut *slots[0];
            // SAFETY: a valid descriptor (the device outlives this call) and a
            // buffer of the stated length; the descriptor is non-blocking.
            let n = unsafe {
                libc::read(
                    dev.as_raw_fd(),
                    buf.as_mut_ptr().cast::<libc::c_void>(),
                    buf.len(),
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            n as usize
        } else {
            tun_rs::AsyncDevice::try_recv(dev, slots[0])?
        };
        return Ok(1);
    }
    if scratch.len() < 65_535 + tun_rs::VIRTIO_NET_HDR_LEN {
        scratch.resize(65_535 + tun_rs::VIRTIO_NET_HDR_LEN, 0);
    }
    if now {
        tun_rs::DeviceImpl::recv_multiple(dev, scratch, slots, lens, 0)
    } else {
        dev.try_recv_multiple(scratch, slots, lens, 0)
    }
}

/// Room in front of each packet written to an offloading TUN device (the
/// virtio-net header goes there; tun-rs wants more than its 10 bytes).
const TUN_HEADROOM: usize = 16;

thread_local! {
    /// Coalescing state for TUN writes (one per data-plane thread, reused).
    static GRO: std::cell::RefCell<tun_rs::GROTable> = std::cell::RefCell::new(tun_rs::GROTable::new());
}

/// An entropy source for a real node: the protocol core's ChaCha20 stream,
/// seeded with 32 bytes from the operating system.
pub fn os_entropy() -> io::Result<proto::crypto::EntropySource> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| io::Error::other(format!("no OS randomness: {e}")))?;
    Ok(proto::crypto::EntropySource::from_seed(seed))
}
