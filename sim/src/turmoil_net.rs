//! turmoil adapters: the transport traits over turmoil sockets, an in-memory
//! packet device, a small async driver for a [`Node`], and a builder that puts
//! N nodes on a turmoil network with seeded per-link impairments.
//!
//! turmoil provides simulated time, hosts, partitions and crashes; per-packet
//! loss, jitter and bottlenecks come from [`Impaired`] (turmoil's `fail_rate`
//! cuts whole links in bursts, it is not per-packet loss).

use crate::des::{Collect, SIM_PSK};
use crate::impair::LinkSpec;
use crate::Impaired;
use blake2::{Blake2b512, Digest};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use transport::crypto::{EntropySource, StaticKeypair};
use transport::wire::PublicKey;
use transport::{Datagram, Node, NodeConfig, PacketDevice};

/// A turmoil UDP socket as a [`Datagram`].
pub struct TurmoilUdp(pub turmoil::net::UdpSocket);

impl Datagram for TurmoilUdp {
    fn send_to(
        &self,
        buf: &[u8],
        to: SocketAddr,
    ) -> impl Future<Output = io::Result<usize>> + Send {
        self.0.send_to(buf, to)
    }
    fn recv_from(
        &self,
        buf: &mut [u8],
    ) -> impl Future<Output = io::Result<(usize, SocketAddr)>> + Send {
        self.0.recv_from(buf)
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        self.0.readable()
    }
    fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.0.try_recv_from(buf)
    }
    fn try_send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.0.try_send_to(buf, to)
    }
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
        self.0.writable()
    }
}

/// An in-memory TUN device: the test writes packets "from applications" into
/// `apps`, and reads what the node delivered from `delivered`.
#[derive(Clone)]
pub struct MemTun {
    from_apps: Arc<MemQueue>,
    to_apps: mpsc::Sender<Vec<u8>>,
}

/// A bounded queue with async readiness (the application-to-node direction).
#[derive(Default)]
pub struct MemQueue {
    q: Mutex<VecDeque<Vec<u8>>>,
    notify: tokio::sync::Notify,
    cap: usize,
    closed: std::sync::atomic::AtomicBool,
}

/// The application side of a [`MemTun`].
pub struct MemTunHandle {
    /// Packets into the device (as if an application wrote them).
    pub apps: AppSender,
    /// Packets the node wrote to the device.
    pub delivered: mpsc::Receiver<Vec<u8>>,
}

/// Writes packets into a [`MemTun`] as applications would; full queue drops (like a real TUN).
#[derive(Clone)]
pub struct AppSender(Arc<MemQueue>);

impl AppSender {
    /// Queue one packet; false if the device queue is full (the packet is dropped).
    pub fn send(&self, pkt: Vec<u8>) -> bool {
        let Ok(mut q) = self.0.q.lock() else {
            return false;
        };
        if q.len() >= self.0.cap {
            return false;
        }
        q.push_back(pkt);
        drop(q);
        self.0.notify.notify_one();
        true
    }

    /// Packets waiting to be read by the node.
    pub fn queued(&self) -> usize {
        self.0.q.lock().map(|q| q.len()).unwrap_or(0)
    }

    /// Close the device: the node's reads fail from now on.
    pub fn close(&self) {
        self.0
            .closed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.0.notify.notify_one();
    }
}

impl MemTun {
    /// A device and its application-side handle.
    pub fn new(capacity: usize) -> (MemTun, MemTunHandle) {
        let q = Arc::new(MemQueue {
            cap: capacity,
            ..MemQueue::default()
        });
        let (d_tx, d_rx) = mpsc::channel(capacity);
        (
            MemTun {
                from_apps: q.clone(),
                to_apps: d_tx,
            },
            MemTunHandle {
                apps: AppSender(q),
                delivered: d_rx,
            },
        )
    }
}

/// `recv_from` for a [`Datagram`] that has readiness and `try_recv_from`:
/// wait until readable, try, and wait again on a spurious wakeup.
pub async fn recv_when_readable<D: Datagram + Sync>(
    d: &D,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr)> {
    loop {
        d.readable().await?;
        match d.try_recv_from(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

impl PacketDevice for MemTun {
    fn recv(&self, buf: &mut [u8]) -> impl Future<Output = io::Result<usize>> + Send {
        async move {
            loop {
                self.readable().await?;
                match self.try_recv(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    r => return r,
                }
            }
        }
    }
    fn send(&self, pkt: &[u8]) -> impl Future<Output = io::Result<usize>> + Send {
        async move {
            self.to_apps
                .send(pkt.to_vec())
                .await
                .map_err(|_| io::ErrorKind::BrokenPipe)?;
            Ok(pkt.len())
        }
    }
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        async move {
            loop {
                let notified = self.from_apps.notify.notified();
                if self
                    .from_apps
                    .closed
                    .load(std::sync::atomic::Ordering::SeqCst)
                {
                    return Err(io::ErrorKind::BrokenPipe.into());
                }
                if self
                    .from_apps
                    .q
                    .lock()
                    .map(|q| !q.is_empty())
                    .unwrap_or(false)
                {
                    return Ok(());
                }
                notified.await;
            }
        }
    }
    fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        if self
            .from_apps
            .closed
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let p = self
            .from_apps
            .q
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?
            .pop_front()
            .ok_or(io::ErrorKind::WouldBlock)?;
        let n = p.len().min(buf.len());
        buf[..n].copy_from_slice(&p[..n]);
        Ok(n)
    }
    fn try_send(&self, pkt: &[u8]) -> io::Result<usize> {
        match self.to_apps.try_send(pkt.to_vec()) {
            Ok(()) => Ok(pkt.len()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(io::ErrorKind::WouldBlock.into()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(io::ErrorKind::BrokenPipe.into()),
        }
    }
}

/// Record of what a driver delivered, folded into a digest.
#[derive(Default)]
pub struct Trace {
    h: Option<Blake2b512>,
    /// Packets delivered.
    pub delivered: u64,
}

impl Trace {
    fn add(&mut self, now: Duration, host: &str, pkt: &[u8]) {
        let h = self.h.get_or_insert_with(Blake2b512::new);
        h.update((now.as_micros() as u64).to_le_bytes());
        h.update(host.as_bytes());
        h.update(pkt);
        self.delivered += 1;
    }

    /// Digest of all deliveries so far.
    pub fn digest(&self) -> [u8; 32] {
        let d = self.h.clone().unwrap_or_default().finalize();
        let mut o = [0u8; 32];
        o.copy_from_slice(&d[..32]);
        o
    }
}

/// Drive `node` over `sock` and `dev` until the device closes: inner packets
/// read from `dev` go to the peer whose overlay address matches their
/// destination (`routes`); packets the node delivers go to `dev`.
pub async fn drive<D: Datagram, P: PacketDevice>(
    mut node: Node,
    sock: D,
    dev: P,
    routes: Vec<(IpAddr, PublicKey)>,
    host: String,
    trace: Arc<Mutex<Trace>>,
) -> io::Result<()> {
    let epoch = tokio::time::Instant::now();
    let mut out = Collect::default();
    let mut rbuf = vec![0u8; 65_536];
    let mut tbuf = vec![0u8; 65_536];
    loop {
        let now = epoch.elapsed();
        let next = node.service(now, &mut out);
        out.probes.clear();
        for (to, frame) in out.frames.drain(..) {
            sock.send_to(&frame, to).await?;
        }
        for (_from, p) in out.packets.drain(..) {
            if let Ok(mut t) = trace.lock() {
                t.add(now, &host, &p);
            }
            dev.send(&p).await?;
        }
        out.events.clear();
        let deadline = next.map(|t| epoch + t.max(now));
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            r = sock.recv_from(&mut rbuf) => {
                let (n, from) = r?;
                node.handle_datagram(epoch.elapsed(), from, &mut rbuf[..n]);
            }
            r = dev.recv(&mut tbuf) => {
                let n = match r { Ok(n) => n, Err(_) => return Ok(()) };
                if let Some(info) = transport::ip::parse(&tbuf[..n]) {
                    if let Some((_, k)) = routes.iter().find(|(a, _)| *a == info.dst) {
                        let _ = node.send_ip(epoch.elapsed(), k, &tbuf[..n]);
                    }
                }
            }
            _ = sleep => {}
        }
    }
}

/// One node of a [`Mesh`].
pub struct MeshNode {
    /// turmoil host name.
    pub host: String,
    /// Overlay address.
    pub overlay: IpAddr,
    /// Key seed (the key pair is derived from it).
    pub key_seed: u64,
}

/// N nodes that all know each other, on a turmoil network whose links impair
/// per packet with `spec` (seeded).
pub struct Mesh {
    /// The nodes.
    pub nodes: Vec<MeshNode>,
    /// Impairment applied to every datagram a node receives.
    pub spec: LinkSpec,
    /// Seed for impairments and handshakes.
    pub seed: u64,
    /// Trace of deliveries on all hosts.
    pub trace: Arc<Mutex<Trace>>,
}

/// UDP port every mesh node listens on.
pub const PORT: u16 = 4000;

impl Mesh {
    /// `n` nodes named `node0..` with overlay addresses 10.77.0.1.. .
    pub fn new(n: usize, spec: LinkSpec, seed: u64) -> Mesh {
        let nodes = (0..n)
            .map(|i| MeshNode {
                host: format!("node{i}"),
                overlay: IpAddr::from([10, 77, 0, i as u8 + 1]),
                key_seed: i as u64 + 1,
            })
            .collect();
        Mesh {
            nodes,
            spec,
            seed,
            trace: Arc::default(),
        }
    }

    /// Register every node as a turmoil host. `devices[i]` becomes node i's TUN.
    pub fn build(&self, sim: &mut turmoil::Sim<'_>, devices: Vec<MemTun>) {
        let keys: Vec<PublicKey> = self
            .nodes
            .iter()
            .map(|n| StaticKeypair::from_seed(n.key_seed).public)
            .collect();
        let devices: Vec<Arc<Mutex<Option<MemTun>>>> = devices
            .into_iter()
            .map(|d| Arc::new(Mutex::new(Some(d))))
            .collect();
        for (i, n) in self.nodes.iter().enumerate() {
            let host = n.host.clone();
            let spec = self.spec.clone();
            let seed = self.seed.wrapping_add(i as u64);
            let key_seed = n.key_seed;
            let peers: Vec<(String, IpAddr, PublicKey)> = self
                .nodes
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(j, m)| (m.host.clone(), m.overlay, keys[j]))
                .collect();
            let dev = devices[i].clone();
            let trace = self.trace.clone();
            sim.host(host.clone(), move || {
                let host = host.clone();
                let spec = spec.clone();
                let peers = peers.clone();
                let dev = dev.clone();
                let trace = trace.clone();
                async move {
                    let sock =
                        turmoil::net::UdpSocket::bind((IpAddr::from([0, 0, 0, 0]), PORT)).await?;
                    let sock = Impaired::new(TurmoilUdp(sock), spec, seed);
                    let mut node = Node::new(
                        NodeConfig::default(),
                        StaticKeypair::from_seed(key_seed),
                        SIM_PSK,
                        // Wall clock at this start: it keeps going across restarts.
                        1_700_000_000_000
                            + turmoil::sim_elapsed().unwrap_or_default().as_millis() as u64,
                        EntropySource::seeded(seed),
                    );
                    let mut routes = Vec::new();
                    for (h, ov, k) in peers {
                        node.add_peer(k, Some(SocketAddr::new(turmoil::lookup(h.as_str()), PORT)));
                        routes.push((ov, k));
                    }
                    let Some(dev) = dev.lock().ok().and_then(|mut d| d.take()) else {
                        return Err("device already taken (host restarted)".into());
                    };
                    drive(node, sock, dev, routes, host, trace).await?;
                    Ok(())
                }
            });
        }
    }
}
