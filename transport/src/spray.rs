//! Many-port punching for a peer behind a NAT that picks a new port for
//! every destination, towards a peer whose NAT keeps one ([`Birthday`]).
//!
//! [`Sprayed`] wraps the node's socket and is itself a [`Datagram`]:
//!
//! * **Hard side** ([`Sprayed::open_ports`]): [`OPEN_PORTS`] fresh sockets
//!   each send a marker to the easy side's endpoint, three times a second
//!   apart, so the NAT opens that many mappings towards it. The first socket
//!   that hears anything from that endpoint is kept: from then on frames the
//!   node sends to that endpoint leave through it and what it receives is
//!   handed up as usual, so the node sees nothing but a direct path that
//!   started to answer. The others are closed after [`OPEN_FOR`].
//! * **Easy side** ([`Sprayed::spray`]): markers go from the node's socket to
//!   [`SPRAY_PORTS`] random ports of the hard side's public address, paced
//!   over about two seconds; a marker from that address in the next
//!   [`OPEN_FOR`] is answered with one, so whichever side's marker gets
//!   through first, both NATs end up with the mapping.
//!
//! With 256 mappings and 1,024 probes over ~64,500 ports, one attempt meets
//! with probability 1 - e^(-256*1024/64512), about 98%. Markers are 16 bytes
//! that no fastmesh frame starts with; they are never handed up. A socket
//! kept for a path that has not carried a frame for [`ROUTE_IDLE`] is closed.

use crate::inbox::{lock, Inbox};
use crate::io::Datagram;
use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::task::AbortHandle;
use tokio::time::Instant;

pub use proto::path::Birthday;

/// Fresh sockets the hard side opens per attempt.
pub const OPEN_PORTS: usize = 256;
/// Attempts of the hard side under way at once (each holds [`OPEN_PORTS`]
/// descriptors for [`OPEN_FOR`]); more are skipped, and the next punch
/// notice for that peer tries again. Keeps a node with many peers from
/// running out of descriptors.
pub const MAX_OPENING: usize = 2;
/// Random ports the easy side sends to per attempt.
pub const SPRAY_PORTS: usize = 1024;
/// How long an attempt waits for a meeting.
pub const OPEN_FOR: Duration = Duration::from_secs(10);
/// A kept socket unused this long is closed.
pub const ROUTE_IDLE: Duration = Duration::from_secs(300);
/// Datagrams from kept sockets waiting for the node.
const RX_QUEUE: usize = 4096;

/// What a marker datagram holds (0xff: not a fastmesh frame version).
pub const MARKER: [u8; 16] = *b"\xfffastmesh-punch\x00";

fn is_marker(d: &[u8]) -> bool {
    d == MARKER
}

/// Counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SprayStats {
    /// Attempts as the hard side (sockets opened).
    pub opened: u64,
    /// Attempts as the easy side (ports sprayed).
    pub sprayed: u64,
    /// Attempts that met: a socket kept for a path.
    pub met: u64,
    /// Markers answered (easy side).
    pub answered: u64,
    /// Sockets kept for a path now.
    pub kept: u64,
}

struct Kept {
    sock: Arc<UdpSocket>,
    reader: AbortHandle,
    last_used: Instant,
}

struct Opening {
    socks: Vec<(Arc<UdpSocket>, AbortHandle)>,
}

#[derive(Default)]
struct State {
    kept: BTreeMap<SocketAddr, Kept>,
    opening: BTreeMap<SocketAddr, Opening>,
    /// Addresses we sprayed, and until when their markers are answered.
    spraying: BTreeMap<IpAddr, Instant>,
}

struct Shared {
    rx: Inbox,
    st: Mutex<State>,
    has_kept: AtomicBool,
    opened: AtomicU64,
    sprayed: AtomicU64,
    met: AtomicU64,
    answered: AtomicU64,
}

impl Shared {
    /// Socket `sock` (of the attempt towards `dest`) heard from `from`.
    fn heard(&self, dest: SocketAddr, sock: &Arc<UdpSocket>, from: SocketAddr) -> bool {
        if from != dest {
            return false;
        }
        let mut st = lock(&self.st);
        if st
            .kept
            .get(&dest)
            .is_some_and(|k| Arc::ptr_eq(&k.sock, sock))
        {
            return true;
        }
        let Some(o) = st.opening.remove(&dest) else {
            return false;
        };
        let mut reader = None;
        for (s, h) in o.socks {
            if Arc::ptr_eq(&s, sock) {
                reader = Some(h);
            } else {
                h.abort();
            }
        }
        let Some(reader) = reader else {
            return false;
        };
        tracing::info!(peer = %dest, local = ?sock.local_addr().ok(), "many-port punch met: a direct path through a fresh port");
        if let Some(old) = st.kept.insert(
            dest,
            Kept {
                sock: sock.clone(),
                reader,
                last_used: Instant::now(),
            },
        ) {
            old.reader.abort();
        }
        self.has_kept.store(true, Ordering::Relaxed);
        self.met.fetch_add(1, Ordering::Relaxed);
        true
    }
}

/// A datagram socket that can punch through port-changing NATs (see the
/// module documentation).
pub struct Sprayed<D> {
    udp: Arc<D>,
    sh: Arc<Shared>,
}

impl<D: Datagram + 'static> Sprayed<D> {
    /// Wrap `udp`; until an attempt it behaves exactly like it.
    pub fn new(udp: D) -> Self {
        Sprayed {
            udp: Arc::new(udp),
            sh: Arc::new(Shared {
                rx: Inbox::new(RX_QUEUE),
                st: Mutex::default(),
                has_kept: AtomicBool::new(false),
                opened: AtomicU64::new(0),
                sprayed: AtomicU64::new(0),
                met: AtomicU64::new(0),
                answered: AtomicU64::new(0),
            }),
        }
    }

    /// The counters.
    pub fn stats(&self) -> SprayStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SprayStats {
            opened: g(&self.sh.opened),
            sprayed: g(&self.sh.sprayed),
            met: g(&self.sh.met),
            answered: g(&self.sh.answered),
            kept: lock(&self.sh.st).kept.len() as u64,
        }
    }

    /// One attempt of the hard side towards `dest` (spawns its work).
    fn start_open(&self, dest: SocketAddr) {
        let sh = self.sh.clone();
        {
            let mut st = lock(&sh.st);
            if st.opening.contains_key(&dest) || st.opening.len() >= MAX_OPENING {
                return;
            }
            st.opening.insert(dest, Opening { socks: Vec::new() });
        }
        sh.opened.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let bind = if dest.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            };
            let mut socks = Vec::new();
            for _ in 0..OPEN_PORTS {
                // Out of descriptors: go with what we have.
                let Ok(s) = UdpSocket::bind(bind).await else {
                    break;
                };
                let s = Arc::new(s);
                let (s2, sh2) = (s.clone(), sh.clone());
                let reader = tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    while let Ok((n, from)) = s2.recv_from(&mut buf).await {
                        if sh2.heard(dest, &s2, from) && !is_marker(&buf[..n]) {
                            let _ = sh2.rx.push(buf[..n].to_vec(), from);
                        }
                    }
                })
                .abort_handle();
                socks.push((s, reader));
            }
            let opened = socks.len();
            match lock(&sh.st).opening.get_mut(&dest) {
                Some(o) => o.socks = socks.clone(),
                None => return,
            }
            tracing::info!(peer = %dest, sockets = opened, "many-port punch: opening mappings towards an easy NAT");
            for round in 0..3 {
                if round > 0 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                if !lock(&sh.st).opening.contains_key(&dest) {
                    return;
                }
                for (s, _) in &socks {
                    let _ = s.try_send_to(&MARKER, dest);
                }
            }
            tokio::time::sleep(OPEN_FOR).await;
            if let Some(o) = lock(&sh.st).opening.remove(&dest) {
                for (_, h) in o.socks {
                    h.abort();
                }
                tracing::debug!(peer = %dest, "many-port punch did not meet");
            }
        });
    }

    /// Answer markers from `ip` for a while; false if already doing so.
    fn expect(&self, ip: IpAddr) -> bool {
        let mut st = lock(&self.sh.st);
        let now = Instant::now();
        if st.spraying.get(&ip).is_some_and(|t| *t > now) {
            return false;
        }
        st.spraying.retain(|_, t| *t > now);
        st.spraying
            .insert(ip, now + OPEN_FOR + Duration::from_secs(3));
        true
    }

    /// One attempt of the easy side towards the hard side's public `ip`.
    fn start_spray(&self, ip: IpAddr) {
        if !self.expect(ip) {
            return;
        }
        let (sh, udp) = (self.sh.clone(), self.udp.clone());
        sh.sprayed.fetch_add(1, Ordering::Relaxed);
        tracing::info!(peer = %ip, ports = SPRAY_PORTS, "many-port punch: probing a port-changing NAT");
        tokio::spawn(async move {
            let ports = random_ports(SPRAY_PORTS);
            // 1,024 markers in ~2 s: 8 every 16 ms.
            let mut tick = tokio::time::interval(Duration::from_millis(16));
            for chunk in ports.chunks(8) {
                tick.tick().await;
                for p in chunk {
                    let _ = udp.try_send_to(&MARKER, SocketAddr::new(ip, *p));
                }
            }
        });
    }

    /// Drop markers from a batch (answering those of an address we sprayed);
    /// returns the entries left.
    fn filter_markers(
        &self,
        bufs: &mut [Vec<u8>],
        out: &mut [(usize, usize, SocketAddr)],
        k: usize,
    ) -> usize {
        let mut kept = 0;
        for i in 0..k {
            let (n, _, from) = out[i];
            if n == MARKER.len() && is_marker(&bufs[i][..n]) {
                self.answer(from);
                continue;
            }
            if kept != i {
                out[kept] = out[i];
                bufs.swap(kept, i);
            }
            kept += 1;
        }
        kept
    }

    fn answer(&self, from: SocketAddr) {
        let ok = lock(&self.sh.st)
            .spraying
            .get(&from.ip())
            .is_some_and(|t| *t > Instant::now());
        if ok && self.udp.try_send_to(&MARKER, from).is_ok() {
            self.sh.answered.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The socket kept for `to`, if any (its idle time reset).
    fn kept_for(&self, to: SocketAddr) -> Option<Arc<UdpSocket>> {
        if !self.sh.has_kept.load(Ordering::Relaxed) {
            return None;
        }
        let mut st = lock(&self.sh.st);
        let now = Instant::now();
        let k = st.kept.get_mut(&to)?;
        if now.saturating_duration_since(k.last_used) > ROUTE_IDLE {
            let k = st.kept.remove(&to)?;
            k.reader.abort();
            self.sh
                .has_kept
                .store(!st.kept.is_empty(), Ordering::Relaxed);
            return None;
        }
        k.last_used = now;
        Some(k.sock.clone())
    }
}

/// `n` distinct random ports of 1024..=65535.
fn random_ports(n: usize) -> Vec<u16> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::with_capacity(n);
    let mut b = [0u8; 2];
    while out.len() < n.min(64_512) {
        if getrandom::fill(&mut b).is_err() {
            break;
        }
        let p = 1024 + (u16::from_le_bytes(b) % 64_512);
        if seen.insert(p) {
            out.push(p);
        }
    }
    out
}

impl<D: Datagram + 'static> Datagram for Sprayed<D> {
    async fn send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        match self.kept_for(to) {
            Some(s) => s.send_to(buf, to).await,
            None => self.udp.send_to(buf, to).await,
        }
    }

    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        loop {
            if let Some(x) = self.sh.rx.pop(buf) {
                return Ok(x);
            }
            match self.try_recv_from(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return r,
            }
            self.readable().await?;
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    async fn readable(&self) -> io::Result<()> {
        self.sh.rx.readable(&*self.udp).await
    }

    fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        if let Some(x) = self.sh.rx.pop(buf) {
            return Ok(x);
        }
        loop {
            let (n, from) = self.udp.try_recv_from(buf)?;
            if n == MARKER.len() && is_marker(&buf[..n]) {
                self.answer(from);
                continue;
            }
            return Ok((n, from));
        }
    }

    fn try_send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        match self.kept_for(to) {
            Some(s) => s.try_send_to(buf, to),
            None => self.udp.try_send_to(buf, to),
        }
    }

    async fn writable(&self) -> io::Result<()> {
        self.udp.writable().await
    }

    fn try_send_probe(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        match self.kept_for(to) {
            // No don't-fragment setting on the kept socket: a plain send.
            Some(s) => s.try_send_to(buf, to),
            None => self.udp.try_send_probe(buf, to),
        }
    }

    fn max_gso_segments(&self) -> usize {
        self.udp.max_gso_segments()
    }

    fn try_send_gso(&self, buf: &[u8], segment: usize, to: SocketAddr) -> io::Result<usize> {
        let Some(s) = self.kept_for(to) else {
            return self.udp.try_send_gso(buf, segment, to);
        };
        let mut n = 0;
        for c in buf.chunks(segment.max(1)) {
            match s.try_send_to(c, to) {
                Ok(_) => n += 1,
                Err(e) if n == 0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok(n)
    }

    fn try_recv_gro(&self, buf: &mut [u8]) -> io::Result<(usize, usize, SocketAddr)> {
        if let Some((n, from)) = self.sh.rx.pop(buf) {
            return Ok((n, n.max(1), from));
        }
        loop {
            let r = self.udp.try_recv_gro(buf)?;
            if r.0 == MARKER.len() && is_marker(&buf[..r.0]) {
                self.answer(r.2);
                continue;
            }
            return Ok(r);
        }
    }

    fn try_recv_batch(
        &self,
        bufs: &mut [Vec<u8>],
        out: &mut [(usize, usize, SocketAddr)],
    ) -> io::Result<usize> {
        let k = self.sh.rx.pop_batch(bufs, out);
        if k > 0 {
            return Ok(k);
        }
        loop {
            let k = self.udp.try_recv_batch(bufs, out)?;
            let left = self.filter_markers(bufs, out, k);
            if left > 0 || k == 0 {
                return Ok(left);
            }
        }
    }

    fn stream_epoch(&self) -> u64 {
        self.udp.stream_epoch()
    }

    fn on_stream(&self, to: SocketAddr) -> bool {
        self.udp.on_stream(to)
    }

    fn open_ports(&self, dest: SocketAddr) {
        self.start_open(dest)
    }

    fn spray(&self, ip: IpAddr) {
        self.start_spray(ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_never_frames_and_ports_are_distinct() {
        assert_ne!(MARKER[0], proto::wire::VERSION);
        let p = random_ports(1024);
        assert_eq!(p.len(), 1024);
        assert!(p.iter().all(|p| *p >= 1024));
        assert_eq!(
            p.iter().collect::<std::collections::BTreeSet<_>>().len(),
            1024
        );
    }

    /// On loopback (no NAT) the hard side's fresh sockets meet the easy
    /// side's answer: the first socket to hear from the easy endpoint is
    /// kept, frames to that endpoint leave through it, and markers never
    /// reach the caller.
    #[tokio::test]
    async fn an_opened_port_that_hears_from_the_peer_carries_its_frames() {
        let hard = Sprayed::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let easy = Sprayed::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let easy_at = easy.local_addr().unwrap();
        // The easy side answers markers only from an address it sprayed
        // (the spray itself, to random ports, is left out here).
        assert!(easy.expect(IpAddr::from([127, 0, 0, 1])));
        hard.open_ports(easy_at);
        let mut buf = vec![0u8; 2048];
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let mut met = false;
        for _ in 0..300 {
            tick.tick().await;
            // The easy side answers the markers that reach it.
            while let Ok((n, from)) = easy.try_recv_from(&mut buf) {
                assert_ne!(&buf[..n], &MARKER[..], "a marker was handed up");
                if &buf[..n] == b"frame" {
                    assert_ne!(
                        from,
                        hard.local_addr().unwrap(),
                        "sent through a fresh port"
                    );
                    met = true;
                }
            }
            if hard.stats().met == 1 {
                hard.try_send_to(b"frame", easy_at).unwrap();
            }
            if met {
                break;
            }
        }
        assert!(met, "{:?} {:?}", hard.stats(), easy.stats());
        assert_eq!(hard.stats().kept, 1);
        assert!(easy.stats().answered >= 1);
        // The answer to our frame comes back through the kept socket.
        easy.try_send_to(b"reply", hard_kept_addr(&hard, easy_at))
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), hard.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((&buf[..got.0], got.1), (&b"reply"[..], easy_at));
    }

    #[tokio::test]
    async fn at_most_two_attempts_open_ports_at_once() {
        let hard = Sprayed::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        // Three peers that never answer (loopback addresses nothing
        // listens on).
        for i in 2..=4u8 {
            hard.open_ports(SocketAddr::from(([127, 0, 0, i], 9)));
        }
        assert_eq!(hard.stats().opened, 2);
        // The same peer again while its attempt runs: nothing new.
        hard.open_ports(SocketAddr::from(([127, 0, 0, 2], 9)));
        assert_eq!(hard.stats().opened, 2);
    }

    fn hard_kept_addr<D>(h: &Sprayed<D>, to: SocketAddr) -> SocketAddr {
        lock(&h.sh.st).kept[&to].sock.local_addr().unwrap()
    }
}
