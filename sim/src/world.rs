//! A whole fastmesh network in turmoil: one hub and N peers running the real
//! actors (registry, data plane, TUN reader, supervisor, per-peer actors) over
//! seeded impaired links, with in-memory TUN devices.
//!
//! The test drives time with [`World::run_until`] and looks at each host
//! through shared probes (status snapshots written by the host every
//! [`WorldConfig::probe_every`] of simulated time) and the hosts' [`MemTunHandle`]s. Hosts can be crashed and
//! restarted with turmoil; a restarted host gets fresh randomness, so its
//! peers see a new incarnation. The hub's owner table lives in a real
//! directory and survives its crashes.

use crate::des::SIM_PSK;
use crate::fabric::{Binder, Fabric, SimUdp};
use crate::impair::LinkSpec;
use crate::impaired::ChaosKnob;
use crate::nat::{NatKind, SimNat};
use crate::turmoil_net::{AppSender, MemTun};
use crate::Impaired;
use actix::prelude::*;
use fastmesh_actors::cluster::store::MemDisk;
use fastmesh_actors::dataplane::{Dataplane, NoDevice, TunReader};
use fastmesh_actors::heartbeat::HeartbeatConfig;
use fastmesh_actors::hub::{GetHubStatus, HubStatus, RegistryActor, Revoke};
use fastmesh_actors::registry::{Registry, RegistryConfig};
use fastmesh_actors::store::OwnerStore;
use fastmesh_actors::supervisor::{GetNodeStatus, Leave, NodeStatus, PeerSetup, Supervisor};
use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use transport::crypto::{EntropySource, StaticKeypair};
use transport::wire::{IpNet, PublicKey};
use transport::{Admission, Datagram, Node, NodeConfig};

/// UDP port of every host.
pub const PORT: u16 = 4000;
/// Key seed of the hub.
pub const HUB_SEED: u64 = 1000;
/// How often hosts write their status probes unless told otherwise.
pub const PROBE_EVERY: Duration = Duration::from_millis(100);

/// A UDP socket that can move to another local port (NAT rebinding as the
/// peers see it: the same node, a new source port).
pub struct Rebindable {
    binder: Binder,
    cur: Mutex<Arc<SimUdp>>,
    swapped: Notify,
}

impl Rebindable {
    /// Bind on `port` of this host (`binder`).
    pub async fn bind(binder: Binder, port: u16) -> io::Result<Rebindable> {
        let s = binder.bind(port).await?;
        Ok(Rebindable {
            binder,
            cur: Mutex::new(Arc::new(s)),
            swapped: Notify::new(),
        })
    }

    /// Move to `port`; the old socket is closed.
    pub async fn rebind(&self, port: u16) -> io::Result<()> {
        let s = self.binder.bind(port).await?;
        *self.cur.lock().map_err(|_| io::Error::other("poisoned"))? = Arc::new(s);
        self.swapped.notify_waiters();
        Ok(())
    }

    fn cur(&self) -> Arc<SimUdp> {
        self.cur.lock().expect("rebind lock").clone()
    }
}

impl Datagram for Rebindable {
    fn send_to(
        &self,
        buf: &[u8],
        to: SocketAddr,
    ) -> impl Future<Output = io::Result<usize>> + Send {
        let s = self.cur();
        async move { s.send_to(buf, to).await }
    }
    fn recv_from(
        &self,
        buf: &mut [u8],
    ) -> impl Future<Output = io::Result<(usize, SocketAddr)>> + Send {
        crate::turmoil_net::recv_when_readable(self, buf)
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.cur().local_addr()
    }
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        async move {
            loop {
                let s = self.cur();
                let swapped = self.swapped.notified();
                tokio::select! {
                    biased;
                    r = s.readable() => return r,
                    _ = swapped => continue,
                }
            }
        }
    }
    fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.cur().try_recv_from(buf)
    }
    fn try_send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.cur().try_send_to(buf, to)
    }
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
        let s = self.cur();
        async move { s.writable().await }
    }
}

/// A peer's socket: plain (and rebindable) or behind a NAT.
pub enum PeerSock {
    /// Straight on the host's address.
    Plain(Rebindable),
    /// Behind a [`SimNat`].
    Nat(SimNat),
}

either_datagram!(PeerSock { Plain, Nat });

/// What the test sees of one peer.
pub struct PeerHandle {
    /// turmoil host name.
    pub host: String,
    /// Overlay IPv4 address.
    pub overlay: Ipv4Addr,
    /// Overlay IPv6 address.
    pub overlay6: Ipv6Addr,
    /// Public key.
    pub key: PublicKey,
    /// Write packets into the peer's TUN.
    pub apps: AppSender,
    /// Packets the peer wrote to its TUN.
    pub delivered: mpsc::Receiver<Vec<u8>>,
    /// Latest status (every 100 ms of simulated time).
    pub status: Arc<Mutex<Option<NodeStatus>>>,
    /// Set to a port number to make the peer move its socket there.
    pub rebind_to: Arc<AtomicU16>,
    /// Set to make the peer's NAT forget its mappings (within 100 ms).
    pub nat_flush: Arc<AtomicBool>,
    /// Inbound datagrams the peer's NAT dropped (updated every 100 ms).
    pub nat_dropped: Arc<AtomicU64>,
    /// A fault laid over everything the peer receives (chaos runner).
    pub knob: ChaosKnob,
    /// Set to make the peer tell its hubs it leaves (within 100 ms; the
    /// flag clears when the peer starts again).
    pub leave: Arc<AtomicBool>,
}

impl PeerHandle {
    /// The latest status.
    pub fn status(&self) -> Option<NodeStatus> {
        self.status.lock().ok().and_then(|s| s.clone())
    }

    /// Drain what arrived so far.
    pub fn take_delivered(&mut self) -> Vec<Vec<u8>> {
        let mut v = Vec::new();
        while let Ok(p) = self.delivered.try_recv() {
            v.push(p);
        }
        v
    }
}

/// The network.
pub struct World {
    /// Peers, in order.
    pub peers: Vec<PeerHandle>,
    /// Latest status of hub 0.
    pub hub_status: Arc<Mutex<Option<HubStatus>>>,
    /// Latest status of every hub.
    pub hub_statuses: Vec<Arc<Mutex<Option<HubStatus>>>>,
    /// Keys to revoke, per hub (applied by the hub within 100 ms).
    pub hub_revoke: Vec<Arc<Mutex<Vec<PublicKey>>>>,
    /// Hub key.
    pub hub_key: PublicKey,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// A fault laid over everything each hub receives (chaos runner).
    pub hub_knobs: Vec<ChaosKnob>,
    /// [`WorldConfig::store_dir`], removed with the world.
    store_dir: PathBuf,
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.store_dir);
    }
}

/// How to build a [`World`].
#[derive(Clone)]
pub struct WorldConfig {
    /// Number of peers.
    pub peers: usize,
    /// Heartbeat interval (hub and peers).
    pub heartbeat: Duration,
    /// Impairment of every datagram every host receives.
    pub spec: LinkSpec,
    /// Seed for impairments and keys' randomness.
    pub seed: u64,
    /// Directory for the hubs' owner tables: scratch, removed when the
    /// [`World`] is dropped.
    pub store_dir: PathBuf,
    /// Number of hubs (hosts "hub", "hub1", ...); every peer lists them all.
    pub hubs: usize,
    /// NAT in front of peer `i` (`nat[i]`); missing entries: none.
    pub nat: Vec<Option<NatKind>>,
    /// How often each host writes its status probe (a multiple of 100 ms;
    /// building a peer's status asks every per-peer actor, so big worlds
    /// probe less often).
    pub probe_every: Duration,
    /// Every node's memory budget ([`transport::NodeConfig::memory_budget`]).
    pub memory_budget: usize,
    /// The hubs share one registry through Raft (`fastmesh_actors::cluster`,
    /// its log on a disk that survives crashes, its RPCs over turmoil's
    /// TCP): only in turmoil, whose hosts have TCP. Otherwise each hub keeps
    /// its own owner table in `store_dir`.
    pub raft: bool,
    /// The hubs send no peer map: members fetch records on demand
    /// (`RegistryConfig::on_demand`).
    pub on_demand: bool,
}

/// turmoil host name of hub `i`.
pub fn hub_host(i: usize) -> String {
    if i == 0 {
        "hub".to_string()
    } else {
        format!("hub{i}")
    }
}

fn overlay4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 88, 0, i as u8 + 1)
}

fn overlay6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd88, 0, 0, 0, 0, 0, 0, i as u16 + 1)
}

/// Key seed of peer `i`.
pub fn peer_seed(i: usize) -> u64 {
    i as u64 + 1
}

impl World {
    /// Register the hub and the peers as turmoil hosts.
    pub fn build(sim: &mut impl Fabric, cfg: WorldConfig) -> World {
        let hub_key = StaticKeypair::from_seed(HUB_SEED).public;
        let hub_statuses: Vec<Arc<Mutex<Option<HubStatus>>>> =
            (0..cfg.hubs.max(1)).map(|_| Arc::default()).collect();
        let hub_revoke: Vec<Arc<Mutex<Vec<PublicKey>>>> =
            (0..cfg.hubs.max(1)).map(|_| Arc::default()).collect();
        let hub_knobs: Vec<ChaosKnob> =
            (0..cfg.hubs.max(1)).map(|_| ChaosKnob::default()).collect();
        if cfg.raft {
            fastmesh_actors::cluster::runtime::seed(cfg.seed);
        }
        for (h, probe) in hub_statuses.iter().enumerate() {
            let cfg = cfg.clone();
            let probe = probe.clone();
            let revoke = hub_revoke[h].clone();
            let knob = hub_knobs[h].clone();
            let starts = Arc::new(AtomicU64::new(0));
            let disk = Arc::new(MemDisk::default());
            sim.host(&hub_host(h), move |binder: Binder| {
                let cfg = cfg.clone();
                let probe = probe.clone();
                let revoke = revoke.clone();
                let knob = knob.clone();
                let disk = disk.clone();
                let n = starts.fetch_add(1, Ordering::SeqCst);
                async move {
                    let seed = cfg.seed ^ 0xabcd ^ ((h as u64) << 20) ^ (n << 32);
                    let sock = binder.bind(PORT).await?;
                    let sock =
                        Arc::new(Impaired::new(sock, cfg.spec.clone(), seed).with_knob(knob));
                    let node = Node::new(
                        NodeConfig {
                            admission: Admission::AnyWithNetworkKey,
                            relay: true,
                            session: transport::SessionConfig::hub(),
                            memory_budget: cfg.memory_budget,
                            ..NodeConfig::default()
                        },
                        StaticKeypair::from_seed(HUB_SEED + h as u64),
                        SIM_PSK,
                        1_700_000_000_000 + n * 1_000_000,
                        EntropySource::seeded(seed),
                    );
                    let reg_ctx = Context::<RegistryActor>::new();
                    let plane = Dataplane::<_, NoDevice>::new(
                        node,
                        sock,
                        None,
                        reg_ctx.address().recipient(),
                        None,
                    )
                    .start();
                    let rcfg = RegistryConfig {
                        heartbeat: cfg.heartbeat,
                        expire_beats: 3,
                        on_demand: cfg.on_demand,
                        ..RegistryConfig::default()
                    };
                    let reg = if cfg.raft {
                        let cluster = crate::hubs::start_raft(h, cfg.hubs.max(1), disk).await?;
                        let reg = Registry::new(rcfg, BTreeMap::new(), (n + 1) << 40);
                        RegistryActor::new(reg, None, plane.clone().recipient())
                            .with_cluster(cluster)
                    } else {
                        let store = OwnerStore::new(cfg.store_dir.join(format!("owners{h}")));
                        RegistryActor::open(rcfg, store, (n + 1) << 40, plane.clone().recipient())?
                    }
                    .with_snapshot(plane.recipient());
                    let reg = reg_ctx.run(reg);
                    let mut last_probe: Option<tokio::time::Instant> = None;
                    loop {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        let keys: Vec<PublicKey> = revoke
                            .lock()
                            .map(|mut v| v.drain(..).collect())
                            .unwrap_or_default();
                        for k in keys {
                            let _ = reg.send(Revoke(k)).await;
                        }
                        if last_probe.is_some_and(|t| t.elapsed() < cfg.probe_every) {
                            continue;
                        }
                        last_probe = Some(tokio::time::Instant::now());
                        if let Ok(s) = reg.send(GetHubStatus).await {
                            if let Ok(mut p) = probe.lock() {
                                *p = Some(s);
                            }
                        }
                    }
                }
            });
        }
        let hub_status = hub_statuses[0].clone();
        let mut peers = Vec::new();
        for i in 0..cfg.peers {
            let host = format!("peer{i}");
            let (dev, handle) = MemTun::new(4096);
            let status: Arc<Mutex<Option<NodeStatus>>> = Arc::default();
            let rebind_to = Arc::new(AtomicU16::new(0));
            let nat_flush = Arc::new(AtomicBool::new(false));
            let nat_dropped = Arc::new(AtomicU64::new(0));
            let leave = Arc::new(AtomicBool::new(false));
            let knob = ChaosKnob::default();
            let nat_kind = cfg.nat.get(i).copied().flatten();
            let key = StaticKeypair::from_seed(peer_seed(i)).public;
            {
                let cfg = cfg.clone();
                let status = status.clone();
                let rebind_to = rebind_to.clone();
                let nat_flush = nat_flush.clone();
                let nat_dropped = nat_dropped.clone();
                let leave = leave.clone();
                let knob = knob.clone();
                let host = host.clone();
                let starts = Arc::new(AtomicU64::new(0));
                sim.host(&host.clone(), move |binder: Binder| {
                    let cfg = cfg.clone();
                    let dev = Arc::new(dev.clone());
                    let status = status.clone();
                    let rebind_to = rebind_to.clone();
                    let nat_flush = nat_flush.clone();
                    let nat_dropped = nat_dropped.clone();
                    let leave = leave.clone();
                    let knob = knob.clone();
                    let host = host.clone();
                    let n = starts.fetch_add(1, Ordering::SeqCst);
                    leave.store(false, Ordering::SeqCst);
                    async move {
                        let seed = cfg.seed ^ (i as u64 + 1) ^ (n << 32);
                        let inner = match nat_kind {
                            None => PeerSock::Plain(Rebindable::bind(binder.clone(), PORT).await?),
                            Some(k) => {
                                PeerSock::Nat(SimNat::bind(&binder, k, seed ^ 0x4e41_5400).await?)
                            }
                        };
                        let sock =
                            Arc::new(Impaired::new(inner, cfg.spec.clone(), seed).with_knob(knob));
                        let node = Node::new(
                            NodeConfig {
                                memory_budget: cfg.memory_budget,
                                ..NodeConfig::default()
                            },
                            StaticKeypair::from_seed(peer_seed(i)),
                            SIM_PSK,
                            1_700_000_000_000 + n * 1_000_000,
                            EntropySource::seeded(seed),
                        );
                        let sup_ctx = Context::<Supervisor>::new();
                        let plane_ctx = Context::<Dataplane<_, MemTun>>::new();
                        let (reader, recycle) =
                            TunReader::new(dev.clone(), plane_ctx.address().recipient(), 1500);
                        let plane = plane_ctx.run(Dataplane::new(
                            node,
                            sock.clone(),
                            Some(dev),
                            sup_ctx.address().recipient(),
                            Some(recycle),
                        ));
                        reader.start();
                        let setup = PeerSetup {
                            me: StaticKeypair::from_seed(peer_seed(i)).public,
                            overlay: vec![
                                IpNet {
                                    addr: overlay4(i).into(),
                                    prefix: 24,
                                },
                                IpNet {
                                    addr: overlay6(i).into(),
                                    prefix: 64,
                                },
                            ],
                            name: host,
                            local_endpoints: vec![],
                            hubs: (0..cfg.hubs.max(1))
                                .map(|h| {
                                    (
                                        StaticKeypair::from_seed(HUB_SEED + h as u64).public,
                                        SocketAddr::new(binder.lookup(&hub_host(h)), PORT),
                                    )
                                })
                                .collect(),
                            heartbeat: HeartbeatConfig {
                                interval: cfg.heartbeat,
                                ..HeartbeatConfig::default()
                            },
                            routes: vec![],
                        };
                        let sup = sup_ctx.run(Supervisor::new(
                            setup,
                            plane.clone().recipient(),
                            plane.recipient(),
                            None,
                        ));
                        let mut last_probe: Option<tokio::time::Instant> = None;
                        let mut said_goodbye = false;
                        loop {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            if !said_goodbye && leave.load(Ordering::SeqCst) {
                                said_goodbye = true;
                                let _ = sup.send(Leave).await;
                            }
                            let port = rebind_to.swap(0, Ordering::SeqCst);
                            match sock.inner() {
                                PeerSock::Plain(s) if port != 0 => s.rebind(port).await?,
                                PeerSock::Nat(s) => {
                                    if nat_flush.swap(false, Ordering::SeqCst) {
                                        s.flush();
                                    }
                                    nat_dropped.store(s.dropped(), Ordering::SeqCst);
                                }
                                _ => {}
                            }
                            if last_probe.is_some_and(|t| t.elapsed() < cfg.probe_every) {
                                continue;
                            }
                            last_probe = Some(tokio::time::Instant::now());
                            if let Ok(s) = sup.send(GetNodeStatus).await {
                                if let Ok(mut p) = status.lock() {
                                    *p = Some(s);
                                }
                            }
                        }
                    }
                });
            }
            peers.push(PeerHandle {
                host,
                overlay: overlay4(i),
                overlay6: overlay6(i),
                key,
                apps: handle.apps,
                delivered: handle.delivered,
                status,
                rebind_to,
                nat_flush,
                nat_dropped,
                knob,
                leave,
            });
        }
        World {
            peers,
            hub_status,
            hub_statuses,
            hub_revoke,
            hub_key,
            heartbeat: cfg.heartbeat,
            hub_knobs,
            store_dir: cfg.store_dir.clone(),
        }
    }

    /// Step the simulation until `cond` holds or `limit` of simulated time
    /// passes; returns the simulated time it took, or None on timeout.
    pub fn run_until(
        &mut self,
        sim: &mut impl Fabric,
        limit: Duration,
        mut cond: impl FnMut(&mut World) -> bool,
    ) -> Option<Duration> {
        let start = sim.elapsed();
        loop {
            if cond(self) {
                return Some(sim.elapsed() - start);
            }
            if sim.elapsed() - start > limit {
                return None;
            }
            sim.step().expect("simulation step");
        }
    }

    /// Everything the probes hold, for failure messages.
    pub fn dump(&self) -> String {
        let mut s = format!(
            "hub: {:#?}\n",
            self.hub_status.lock().ok().and_then(|h| h.clone())
        );
        for p in &self.peers {
            s.push_str(&format!("{}: {:#?}\n", p.host, p.status()));
        }
        s
    }

    /// Members the hub lists.
    pub fn hub_members(&self) -> usize {
        self.hub_status
            .lock()
            .ok()
            .and_then(|s| s.as_ref().map(|s| s.members.len()))
            .unwrap_or(0)
    }

    /// True if every peer is registered and knows all others with an established path.
    pub fn all_connected(&self) -> bool {
        let n = self.peers.len();
        self.peers.iter().all(|p| {
            // Looked at in place: this runs on every step while a mesh forms.
            p.status.lock().is_ok_and(|s| {
                let Some(s) = s.as_ref() else {
                    return false;
                };
                s.hubs.iter().all(|h| h.state == "registered")
                    && s.peers.len() == n - 1
                    && s.peers
                        .iter()
                        .all(|q| q.state == fastmesh_actors::peer::PathState::Up)
            })
        })
    }
}
