//! A discrete-event network for sans-IO [`Node`]s: no sockets, no tokio, no
//! wall clock. Time jumps from event to event, so minutes of simulated traffic
//! over lossy, long links run in milliseconds, and the same seed replays the
//! same run bit for bit (handshake randomness is seeded too).
//!
//! Each direction of each link has its own seeded [`LinkSpec`] pipeline.
//! Applications are scripted: [`Net::send_at`] schedules an inner IP packet,
//! and every delivered packet and event is recorded with its time and folded
//! into a trace digest.

use crate::impair::{LinkSpec, Pipeline};
use crate::tcp_host::TcpHost;
use blake2::{Blake2b512, Digest};
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::net::IpAddr;
use std::net::SocketAddr;
use std::time::Duration;
use transport::crypto::{EntropySource, StaticKeypair};
use transport::node::{Node, NodeConfig};
use transport::session::Event;
use transport::wire::PublicKey;
use transport::Driver;

/// Configurations for the two hosts of a pair.
pub type NodeConfigPair = (NodeConfig, NodeConfig);

/// A [`Driver`] that collects a node's output, for drivers that route it
/// afterwards (the simulators) or inspect it (tests).
#[derive(Debug, Default)]
pub struct Collect {
    /// Frames to send, with their destination.
    pub frames: Vec<(SocketAddr, Vec<u8>)>,
    /// Inner packets delivered, with the peer they came from.
    pub packets: Vec<(PublicKey, Vec<u8>)>,
    /// Events, with their peer.
    pub events: Vec<(PublicKey, Event)>,
    /// Indices into `frames` of path MTU probes (never fragmented).
    pub probes: Vec<usize>,
}

impl Driver for Collect {
    fn transmit(&mut self, to: SocketAddr, frame: &[u8]) -> bool {
        self.frames.push((to, frame.to_vec()));
        true
    }
    fn transmit_probe(&mut self, to: SocketAddr, frame: &[u8]) -> bool {
        self.probes.push(self.frames.len());
        self.transmit(to, frame)
    }
    fn deliver(&mut self, from: &PublicKey, pkt: Vec<u8>) {
        self.packets.push((*from, pkt));
    }
    fn event(&mut self, peer: PublicKey, _endpoint: Option<SocketAddr>, event: Event) {
        self.events.push((peer, event));
    }
}

/// A delivered inner packet.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// When it came out of the receiving node.
    pub at: Duration,
    /// Sender's key.
    pub from: PublicKey,
    /// The inner IP packet.
    pub pkt: Vec<u8>,
}

/// One simulated host.
pub struct SimNode {
    /// The protocol core.
    pub node: Node,
    /// Its UDP address.
    pub addr: SocketAddr,
    /// Inner packets it delivered.
    pub rx: Vec<Delivery>,
    /// Events it raised.
    pub events: Vec<(Duration, PublicKey, Event)>,
    /// A crashed host neither sends nor receives.
    pub up: bool,
}

struct Arrival {
    at: Duration,
    seq: u64,
    to: SocketAddr,
    from: SocketAddr,
    data: Vec<u8>,
}

impl PartialEq for Arrival {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Arrival {}
impl PartialOrd for Arrival {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Arrival {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

struct AppSend {
    at: Duration,
    seq: u64,
    node: usize,
    peer: PublicKey,
    pkt: Vec<u8>,
}
impl PartialEq for AppSend {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for AppSend {}
impl PartialOrd for AppSend {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for AppSend {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// Wire counters for one direction of a link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WireStats {
    /// Datagrams offered to the link.
    pub packets: u64,
    /// UDP payload bytes offered to the link.
    pub bytes: u64,
}

/// The simulated network.
pub struct Net {
    now: Duration,
    seed: u64,
    nodes: Vec<SimNode>,
    specs: BTreeMap<(usize, usize), LinkSpec>,
    default_spec: LinkSpec,
    links: BTreeMap<(usize, usize), Pipeline>,
    cut: BTreeSet<(usize, usize)>,
    inflight: BinaryHeap<Arrival>,
    apps: BinaryHeap<AppSend>,
    seq: u64,
    wire: BTreeMap<(usize, usize), WireStats>,
    trace: Blake2b512,
    out: Collect,
    times: Vec<Duration>,
    tap: Option<Tap>,
    hosts: BTreeMap<usize, TcpHost>,
    routes: BTreeMap<IpAddr, PublicKey>,
    /// Link MTU and whether larger datagrams are fragmented (else dropped).
    mtu: BTreeMap<(usize, usize), (usize, bool)>,
}

/// Sees every datagram before its link: `(from, to, bytes)`; may modify the
/// bytes; returns false to drop the datagram.
pub type Tap = Box<dyn FnMut(usize, usize, &mut Vec<u8>) -> bool>;

/// The network key used by simulated nodes unless a test picks another.
pub const SIM_PSK: [u8; 32] = [0x5a; 32];
const WALL_BASE_MS: u64 = 1_700_000_000_000;
/// IPv4 and UDP headers: a link carries packets, so its rate stage counts
/// them with every datagram as the lab router (and any real link) does.
/// Counting payload alone gave the simulated path about 2% more room than
/// the lab's for full-size frames.
const UDP_IP_HEADERS: usize = 28;

impl Net {
    /// An empty network; every link gets `default_spec` unless set otherwise.
    pub fn new(seed: u64, default_spec: LinkSpec) -> Net {
        Net {
            now: Duration::ZERO,
            seed,
            nodes: Vec::new(),
            specs: BTreeMap::new(),
            default_spec,
            links: BTreeMap::new(),
            cut: BTreeSet::new(),
            inflight: BinaryHeap::new(),
            apps: BinaryHeap::new(),
            seq: 0,
            wire: BTreeMap::new(),
            trace: Blake2b512::new(),
            out: Collect::default(),
            times: Vec::new(),
            tap: None,
            hosts: BTreeMap::new(),
            routes: BTreeMap::new(),
            mtu: BTreeMap::new(),
        }
    }

    /// A node keyed from `key_seed`, with handshake randomness from the net's seed.
    pub fn make_node(&self, cfg: NodeConfig, key_seed: u64, psk: [u8; 32]) -> Node {
        let entropy = EntropySource::seeded(
            self.seed ^ key_seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ self.now.as_nanos() as u64,
        );
        Node::new(
            cfg,
            StaticKeypair::from_seed(key_seed),
            psk,
            WALL_BASE_MS + self.now.as_millis() as u64,
            entropy,
        )
    }

    /// Add a host at `addr`; returns its index.
    pub fn add(&mut self, node: Node, addr: SocketAddr) -> usize {
        self.nodes.push(SimNode {
            node,
            addr,
            rx: Vec::new(),
            events: Vec::new(),
            up: true,
        });
        self.nodes.len() - 1
    }

    /// Replace host `i`'s node (a restart: same address, new state).
    pub fn restart(&mut self, i: usize, node: Node) {
        self.nodes[i].node = node;
        self.nodes[i].up = true;
    }

    /// Take host `i` down (it drops everything) or bring it back.
    pub fn set_up(&mut self, i: usize, up: bool) {
        self.nodes[i].up = up;
    }

    /// Move host `i` to a new address (NAT rebinding).
    pub fn set_addr(&mut self, i: usize, addr: SocketAddr) {
        self.nodes[i].addr = addr;
    }

    /// Set the spec of the direction `from -> to` (rebuilds its pipeline).
    pub fn set_link(&mut self, from: usize, to: usize, spec: LinkSpec) {
        self.specs.insert((from, to), spec);
        self.links.remove(&(from, to));
    }

    /// The largest datagram (UDP payload bytes) the direction `from -> to`
    /// carries whole (None: any). Larger probes are dropped; larger other
    /// datagrams go as two fragments, each subject to the link's loss, if
    /// `fragment`, else they are dropped too (a link that discards what
    /// exceeds its MTU, or a firewall that drops fragments).
    pub fn set_mtu(&mut self, from: usize, to: usize, mtu: Option<usize>, fragment: bool) {
        match mtu {
            Some(m) => self.mtu.insert((from, to), (m, fragment)),
            None => self.mtu.remove(&(from, to)),
        };
    }

    /// Cut (or restore) both directions between `a` and `b`.
    pub fn partition(&mut self, a: usize, b: usize, cut: bool) {
        for k in [(a, b), (b, a)] {
            if cut {
                self.cut.insert(k);
            } else {
                self.cut.remove(&k);
            }
        }
    }

    /// Install a tap on every datagram (tests: tampering, selective loss, capture).
    pub fn set_tap(&mut self, tap: Tap) {
        self.tap = Some(tap);
    }

    /// Deliver raw `bytes` to host `to` at `at`, as if sent from `from`.
    pub fn inject(&mut self, at: Duration, from: SocketAddr, to: usize, bytes: Vec<u8>) {
        self.seq += 1;
        let to = self.nodes[to].addr;
        self.inflight.push(Arrival {
            at,
            seq: self.seq,
            to,
            from,
            data: bytes,
        });
    }

    /// Put a TCP host on host `i`'s TUN side: packets the node delivers go
    /// to it (and are not recorded), packets it sends go into the node,
    /// routed by [`Net::route`].
    pub fn attach_host(&mut self, i: usize, host: TcpHost) {
        self.hosts.insert(i, host);
    }

    /// Host packets for `ip` go to the peer `key`.
    pub fn route(&mut self, ip: IpAddr, key: PublicKey) {
        self.routes.insert(ip, key);
    }

    /// The TCP host on host `i`.
    pub fn host(&self, i: usize) -> &TcpHost {
        &self.hosts[&i]
    }

    /// The TCP host on host `i`, mutably (to add applications).
    pub fn host_mut(&mut self, i: usize) -> &mut TcpHost {
        self.hosts.get_mut(&i).expect("host attached")
    }

    /// Host `i`.
    pub fn node(&self, i: usize) -> &SimNode {
        &self.nodes[i]
    }

    /// Host `i`, mutably.
    pub fn node_mut(&mut self, i: usize) -> &mut SimNode {
        &mut self.nodes[i]
    }

    /// Current simulated time.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// Wire counters of `from -> to`.
    pub fn wire(&self, from: usize, to: usize) -> WireStats {
        self.wire.get(&(from, to)).copied().unwrap_or_default()
    }

    /// Schedule host `from` to send inner packet `pkt` to peer key `to` at `at`.
    pub fn send_at(&mut self, at: Duration, from: usize, to: PublicKey, pkt: Vec<u8>) {
        self.seq += 1;
        self.apps.push(AppSend {
            at,
            seq: self.seq,
            node: from,
            peer: to,
            pkt,
        });
    }

    /// Digest of every delivery and event so far.
    pub fn digest(&self) -> [u8; 32] {
        let d = self.trace.clone().finalize();
        let mut o = [0u8; 32];
        o.copy_from_slice(&d[..32]);
        o
    }

    fn index_of(&self, addr: SocketAddr) -> Option<usize> {
        self.nodes.iter().position(|n| n.addr == addr)
    }

    /// One node's poll sequence ([`Node::service`]), then its frames onto
    /// their links and its deliveries and events into the record.
    fn service(&mut self, i: usize) {
        let now = self.now;
        self.nodes[i].node.service(now, &mut self.out);
        let mut frames = std::mem::take(&mut self.out.frames);
        let probes = std::mem::take(&mut self.out.probes);
        for (k, (to, data)) in frames.drain(..).enumerate() {
            self.send(i, to, data, probes.contains(&k));
        }
        self.out.frames = frames;
        if let Some(h) = self.hosts.get_mut(&i) {
            for (from, pkt) in self.out.packets.drain(..) {
                self.trace.update((now.as_micros() as u64).to_le_bytes());
                self.trace.update([2, i as u8]);
                self.trace.update(&from[..4]);
                self.trace.update(&pkt);
                h.input(pkt);
            }
            for pkt in h.poll(now) {
                let to = transport::ip::parse(&pkt).and_then(|p| self.routes.get(&p.dst));
                if let Some(k) = to {
                    let _ = self.nodes[i].node.send_ip(now, k, &pkt);
                }
            }
        }
        let n = &mut self.nodes[i];
        for (from, pkt) in self.out.packets.drain(..) {
            self.trace.update((now.as_micros() as u64).to_le_bytes());
            self.trace.update([0, i as u8]);
            self.trace.update(&from[..4]);
            self.trace.update(&pkt);
            n.rx.push(Delivery { at: now, from, pkt });
        }
        for (k, e) in self.out.events.drain(..) {
            self.trace.update((now.as_micros() as u64).to_le_bytes());
            self.trace.update([1, i as u8]);
            self.trace.update(&k[..4]);
            self.trace.update(format!("{e:?}").as_bytes());
            n.events.push((now, k, e));
        }
    }

    /// A frame from host `i` onto the link towards `to` (counted, then cut,
    /// tapped or impaired).
    fn send(&mut self, i: usize, to: SocketAddr, mut data: Vec<u8>, probe: bool) {
        let from_addr = self.nodes[i].addr;
        let Some(j) = self.index_of(to) else { return };
        let w = self.wire.entry((i, j)).or_default();
        w.packets += 1;
        w.bytes += data.len() as u64;
        if self.cut.contains(&(i, j)) {
            return;
        }
        if let Some(tap) = self.tap.as_mut() {
            if !tap(i, j, &mut data) {
                return;
            }
        }
        let seed = self.seed;
        let spec = self.specs.get(&(i, j)).unwrap_or(&self.default_spec);
        let link = self.links.entry((i, j)).or_insert_with(|| {
            spec.build(seed ^ ((i as u64) << 32 | j as u64).wrapping_mul(0x9e37_79b9))
        });
        self.times.clear();
        link.apply(self.now, data.len() + UDP_IP_HEADERS, &mut self.times);
        if let Some(&(m, fragment)) = self.mtu.get(&(i, j)) {
            if data.len() > m {
                if probe || !fragment {
                    return;
                }
                // The second fragment (its own IP header) crosses the link
                // too; both must arrive.
                let mut second = Vec::new();
                link.apply(self.now, data.len() - m + 20, &mut second);
                if second.is_empty() {
                    return;
                }
            }
        }
        for (k, &at) in self.times.iter().enumerate() {
            self.seq += 1;
            self.inflight.push(Arrival {
                at,
                seq: self.seq,
                to,
                from: from_addr,
                data: if k + 1 == self.times.len() {
                    std::mem::take(&mut data)
                } else {
                    data.clone()
                },
            });
        }
    }

    fn next_time(&self) -> Option<Duration> {
        let mut t = self.inflight.peek().map(|a| a.at);
        let mut at = |d: Duration| t = Some(t.map_or(d, |x: Duration| x.min(d)));
        if let Some(a) = self.apps.peek() {
            at(a.at);
        }
        for n in &self.nodes {
            if n.up {
                if let Some(d) = n.node.poll_timeout() {
                    at(d);
                }
            }
        }
        t
    }

    /// The earliest time a TCP host needs polling.
    fn host_time(&mut self) -> Option<Duration> {
        let now = self.now;
        self.hosts
            .iter_mut()
            .filter_map(|(_, h)| h.poll_at(now))
            .min()
    }

    /// Run until simulated time `until`.
    pub fn run_until(&mut self, until: Duration) {
        let mut spins = 0u32;
        loop {
            for i in 0..self.nodes.len() {
                if self.nodes[i].up {
                    self.service(i);
                }
            }
            let next = match (self.next_time(), self.host_time()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let Some(next) = next else {
                self.now = until.max(self.now);
                return;
            };
            if next > until {
                self.now = until.max(self.now);
                return;
            }
            if next <= self.now {
                spins += 1;
                if spins >= 1_000_000 {
                    for n in &self.nodes {
                        for k in n.node.peers() {
                            let s = n.node.session(k).expect("listed");
                            eprintln!("{:?} {:?}", s.poll_timeout(), s.debug_timers());
                        }
                    }
                    panic!("simulation stuck at {:?}", self.now);
                }
            } else {
                spins = 0;
            }
            self.now = self.now.max(next);
            while self.inflight.peek().is_some_and(|a| a.at <= self.now) {
                let mut a = self.inflight.pop().expect("peeked");
                if let Some(j) = self.index_of(a.to) {
                    if self.nodes[j].up {
                        self.nodes[j]
                            .node
                            .handle_datagram(self.now, a.from, &mut a.data);
                    }
                }
            }
            while self.apps.peek().is_some_and(|a| a.at <= self.now) {
                let a = self.apps.pop().expect("peeked");
                if self.nodes[a.node].up {
                    let _ = self.nodes[a.node].node.send_ip(self.now, &a.peer, &a.pkt);
                }
            }
        }
    }

    /// Run for `d` more simulated time.
    pub fn run_for(&mut self, d: Duration) {
        let t = self.now + d;
        self.run_until(t);
    }
}

/// Two peers that know each other, on `spec` links both ways, at 10.0.0.1 and
/// 10.0.0.2 port 4000, with a session already established (host 0 initiated).
/// Returns the net and the two keys.
pub fn pair(seed: u64, cfg: NodeConfig, spec: LinkSpec) -> (Net, PublicKey, PublicKey) {
    let (mut net, ka, kb) = pair_idle(seed, cfg, spec);
    establish(&mut net, ka, kb);
    (net, ka, kb)
}

/// Host 0 starts a handshake with host 1; run until both sides have keys
/// (at most two simulated minutes).
pub fn establish(net: &mut Net, ka: PublicKey, kb: PublicKey) {
    net.node_mut(0)
        .node
        .connect(Duration::ZERO, &kb)
        .expect("known peer");
    let limit = Duration::from_secs(120);
    while net.now() < limit
        && !(net
            .node(0)
            .node
            .session(&kb)
            .is_some_and(|s| s.is_established())
            && net
                .node(1)
                .node
                .session(&ka)
                .is_some_and(|s| s.is_established()))
    {
        net.run_for(Duration::from_millis(10));
    }
}

/// Like [`pair`] but without starting a handshake.
pub fn pair_idle(seed: u64, cfg: NodeConfig, spec: LinkSpec) -> (Net, PublicKey, PublicKey) {
    pair_idle_with(seed, cfg.clone(), cfg, spec)
}

/// Like [`pair`], each host with its own configuration.
pub fn pair_with(
    seed: u64,
    a: NodeConfig,
    b: NodeConfig,
    spec: LinkSpec,
) -> (Net, PublicKey, PublicKey) {
    let (mut net, ka, kb) = pair_idle_with(seed, a, b, spec);
    establish(&mut net, ka, kb);
    (net, ka, kb)
}

/// Like [`pair_idle`], each host with its own configuration.
pub fn pair_idle_with(
    seed: u64,
    cfg_a: NodeConfig,
    cfg_b: NodeConfig,
    spec: LinkSpec,
) -> (Net, PublicKey, PublicKey) {
    let mut net = Net::new(seed, spec);
    let a_addr: SocketAddr = "10.0.0.1:4000".parse().expect("addr");
    let b_addr: SocketAddr = "10.0.0.2:4000".parse().expect("addr");
    let mut a = net.make_node(cfg_a, 1, SIM_PSK);
    let mut b = net.make_node(cfg_b, 2, SIM_PSK);
    let (ka, kb) = (*a.public_key(), *b.public_key());
    a.add_peer(kb, Some(b_addr));
    b.add_peer(ka, Some(a_addr));
    net.add(a, a_addr);
    net.add(b, b_addr);
    (net, ka, kb)
}
