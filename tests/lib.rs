//! Shared helpers for fastmesh's integration tests.

use sim::des::Net;
use sim::traffic::{self, Kind};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;
use transport::wire::PublicKey;

/// The network-namespace lab (end-to-end tests, demo, benchmark).
pub mod lab;

/// A WAN (delay, rate limit, loss) in the lab's router, in user space.
pub mod wan;

/// Mutation fuzzing of decoders, handshake and the receive path.
pub mod fuzz;

/// Guard a simulation test against a hang: a simulation that stops
/// advancing its clock (a task spinning without sleeping) would otherwise
/// hold CI until its own timeout with no word of which test. Keep the
/// returned guard for the test's length: if `limit` of wall time passes
/// before it is dropped, this prints `what` and ends the test process. Not
/// a timing goal: the limit is many times what the test takes.
#[must_use = "the watchdog stands down when its guard is dropped"]
pub fn watchdog(what: &'static str, limit: std::time::Duration) -> std::sync::mpsc::Sender<()> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            // Straight to stderr: the test harness captures `eprintln!`
            // and would lose it with the process.
            let _ = std::io::Write::write_fmt(
                &mut std::io::stderr(),
                format_args!(
                    "{what}: no result after {limit:?} of wall time; the simulation hangs\n"
                ),
            );
            std::process::exit(101);
        }
    });
    tx
}

/// Overlay address of simulated node `i` (10.77.0.i+1).
pub fn overlay(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, i as u8 + 1)
}

/// Schedule `n` tagged packets from host 0 to `to` over `span` from now: `tcp_flows`
/// TCP flows and one UDP flow (every fourth packet), sizes cycling through
/// 40 bytes..=the TUN MTU driven by `seed`. Returns how many packets each TCP flow got.
pub fn schedule_mixed(
    net: &mut Net,
    to: PublicKey,
    n: u32,
    span: Duration,
    tcp_flows: u16,
    seed: u64,
) -> BTreeMap<u16, u32> {
    let mut counts: BTreeMap<u16, u32> = BTreeMap::new();
    let mut udp_seq = 0u32;
    let mut x = seed | 1;
    for i in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Never above the TUN MTU: a TUN device hands out nothing larger.
        let max = transport::SessionConfig::default().tun_mtu() as u64;
        let len = 40 + (x % (max - 39)) as usize;
        let at = net.now() + span * i / n.max(1);
        let pkt = if i % 4 == 3 {
            udp_seq += 1;
            traffic::packet(overlay(0), overlay(1), Kind::Udp, 1000, udp_seq - 1, len)
        } else {
            let flow = (x >> 20) as u16 % tcp_flows;
            let seq = counts.entry(flow).or_insert(0);
            *seq += 1;
            traffic::packet(overlay(0), overlay(1), Kind::Tcp, flow, *seq - 1, len)
        };
        net.send_at(at, 0, to, pkt);
    }
    counts
}

/// The packets host `i` delivered.
pub fn delivered(net: &Net, i: usize) -> Vec<Vec<u8>> {
    net.node(i).rx.iter().map(|d| d.pkt.clone()).collect()
}

/// Address of node A in [`two_nodes`].
pub const NODE_A: &str = "10.0.0.1:4000";
/// Address of node B in [`two_nodes`].
pub const NODE_B: &str = "10.0.0.2:4000";

/// Two nodes (keys from seeds 1 and 2, network key `psk`) that know each
/// other at [`NODE_A`] and [`NODE_B`], no handshake yet; randomness from `seed`.
pub fn two_nodes(
    seed: u64,
    psk: [u8; 32],
) -> (transport::Node, transport::Node, PublicKey, PublicKey) {
    two_nodes_with(seed, psk, transport::NodeConfig::default())
}

/// [`two_nodes`] with settings `cfg`.
pub fn two_nodes_with(
    seed: u64,
    psk: [u8; 32],
    cfg: transport::NodeConfig,
) -> (transport::Node, transport::Node, PublicKey, PublicKey) {
    use transport::crypto::{EntropySource, StaticKeypair};
    use transport::Node;
    let (ska, skb) = (StaticKeypair::from_seed(1), StaticKeypair::from_seed(2));
    let (ka, kb) = (ska.public, skb.public);
    let node = |sk, s| {
        Node::new(
            cfg.clone(),
            sk,
            psk,
            1_700_000_000_000,
            EntropySource::seeded(s),
        )
    };
    let mut a = node(ska, seed);
    let mut b = node(skb, seed.wrapping_add(1));
    a.add_peer(kb, Some(NODE_B.parse().expect("addr")));
    b.add_peer(ka, Some(NODE_A.parse().expect("addr")));
    (a, b, ka, kb)
}

/// A test [`transport::Driver`]: keeps a node's frames in reused buffers (no
/// allocation once warm) until they are handed to another node, and records
/// which peers delivered inner packets. Tests drive nodes through
/// [`transport::Node::service`] with it, in the same poll order as the data
/// plane and the simulators.
#[derive(Debug, Default)]
pub struct Frames {
    bufs: Vec<Vec<u8>>,
    n: usize,
    /// Inner packets delivered.
    pub delivered: u64,
    /// The peers they came from.
    pub senders: std::collections::BTreeSet<PublicKey>,
    /// Events raised.
    pub events: usize,
}

impl transport::Driver for Frames {
    fn transmit(&mut self, _to: std::net::SocketAddr, frame: &[u8]) -> bool {
        if self.n == self.bufs.len() {
            self.bufs.push(Vec::with_capacity(2048));
        }
        let b = &mut self.bufs[self.n];
        b.clear();
        b.extend_from_slice(frame);
        self.n += 1;
        true
    }
    fn deliver(&mut self, from: &PublicKey, _pkt: Vec<u8>) {
        self.delivered += 1;
        self.senders.insert(*from);
    }
    fn event(
        &mut self,
        _peer: PublicKey,
        _endpoint: Option<std::net::SocketAddr>,
        _event: transport::Event,
    ) {
        self.events += 1;
    }
}

impl Frames {
    /// Frames kept.
    pub fn len(&self) -> usize {
        self.n
    }

    /// No frame kept.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The frames kept, in order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.bufs[..self.n].iter().map(|b| b.as_slice())
    }

    /// Forget the frames kept.
    pub fn clear(&mut self) {
        self.n = 0;
    }

    /// Hand every kept frame to `node` as if it came from `from`, then
    /// forget them; returns how many.
    pub fn hand_to(
        &mut self,
        node: &mut transport::Node,
        from: std::net::SocketAddr,
        now: Duration,
    ) -> usize {
        let n = std::mem::take(&mut self.n);
        for b in &mut self.bufs[..n] {
            node.handle_datagram(now, from, b);
        }
        n
    }
}

/// Run `a`'s poll sequence, hand its frames to `b`, then `b`'s, hand them
/// to `a`, until no frame moves. Returns the frames moved each way.
pub fn exchange(
    a: &mut transport::Node,
    a_addr: std::net::SocketAddr,
    b: &mut transport::Node,
    b_addr: std::net::SocketAddr,
    now: Duration,
) -> (usize, usize) {
    let (mut fa, mut fb) = (Frames::default(), Frames::default());
    let (mut ab, mut ba) = (0, 0);
    loop {
        a.service(now, &mut fa);
        let x = fa.hand_to(b, a_addr, now);
        b.service(now, &mut fb);
        let y = fb.hand_to(a, b_addr, now);
        ab += x;
        ba += y;
        if x + y == 0 {
            return (ab, ba);
        }
    }
}
