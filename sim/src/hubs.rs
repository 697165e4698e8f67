//! Several hubs sharing one registry (Raft between them), in turmoil.
//!
//! Each hub host runs the real [`RegistryActor`] with its real [`Cluster`]:
//! Raft's log on a [`MemDisk`] that survives the host's crashes (as a disk
//! would), its RPCs over turmoil's TCP inside the hub-to-hub Noise
//! handshake. Members are not simulated down to their sessions: the test
//! hands each hub `Register`s as its data plane would, and a recording data
//! plane keeps every answer the registry sends (acknowledgements and
//! refusals), which is the history a checker reads.

use crate::des::SIM_PSK;
use crate::world::{hub_host, HUB_SEED};
use actix::prelude::*;
use fastmesh_actors::cluster::net::{self, Dialer, HubKeys};
use fastmesh_actors::cluster::store::MemDisk;
use fastmesh_actors::cluster::{Book, Cluster, ClusterConfig, HubPeer};
use fastmesh_actors::dataplane::{Cmd, NetEvent};
use fastmesh_actors::hub::{GetHubStatus, HubStatus, RegistryActor, Revoke, SetAllowed};
use fastmesh_actors::registry::{Registry, RegistryConfig};
use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use transport::crypto::StaticKeypair;
use transport::wire::{Control, IpNet, PublicKey};
use transport::Event;

/// TCP port of the hubs' Raft.
pub const RAFT_PORT: u16 = 4801;

/// turmoil's TCP, for hub-to-hub connections.
#[derive(Debug, Clone, Copy, Default)]
pub struct TurmoilDialer;

impl Dialer for TurmoilDialer {
    type Conn = turmoil::net::TcpStream;
    fn dial(&self, addr: &str) -> impl Future<Output = io::Result<Self::Conn>> + Send {
        let addr = addr.to_string();
        async move { turmoil::net::TcpStream::connect(addr.as_str()).await }
    }
}

/// What one hub answered.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Which hub.
    pub hub: usize,
    /// To whom.
    pub to: PublicKey,
    /// `RegisterAck` or `Nack`.
    pub msg: Control,
    /// Simulated time of the answer.
    pub at: Duration,
}

/// A data plane that only records the registry's answers.
struct Recorder {
    hub: usize,
    answers: Arc<Mutex<Vec<Answer>>>,
    epoch: tokio::time::Instant,
    base: Duration,
}

impl Actor for Recorder {
    type Context = Context<Self>;
}

impl Handler<Cmd> for Recorder {
    type Result = ();
    fn handle(&mut self, c: Cmd, _: &mut Context<Self>) {
        if let Cmd::Send { to, msg, .. } = c {
            if matches!(msg, Control::RegisterAck { .. } | Control::Nack { .. }) {
                let at = self.base + self.epoch.elapsed();
                if let Ok(mut a) = self.answers.lock() {
                    a.push(Answer {
                        hub: self.hub,
                        to,
                        msg,
                        at,
                    });
                }
            }
        }
    }
}

/// A revocation asked of one hub, and what the operator was told.
#[derive(Debug, Clone)]
pub struct RevokeResult {
    /// Which hub was asked.
    pub hub: usize,
    /// The key.
    pub key: PublicKey,
    /// `Ok(newly)` once committed; `Err` if not confirmed.
    pub result: Result<bool, String>,
}

/// What the test sees of one hub.
#[derive(Default)]
pub struct HubProbe {
    /// Registrations to hand the hub (taken within 10 ms; lost if it is down).
    pub inbox: Mutex<Vec<(PublicKey, Vec<IpAddr>)>>,
    /// Keys to revoke at this hub.
    pub revoke: Mutex<Vec<PublicKey>>,
    /// Allow-lists to load at this hub, as a reload would.
    pub allow: Mutex<Vec<Option<std::collections::BTreeSet<PublicKey>>>>,
    /// The book as applied at this hub (updated every 10 ms while it is up).
    pub book: Mutex<Option<Arc<Book>>>,
    /// Latest status (every 100 ms).
    pub status: Mutex<Option<HubStatus>>,
    /// Whether the host is running (cleared by the test when it crashes it).
    pub up: std::sync::atomic::AtomicBool,
}

/// Everything the test queued in `q`.
fn take<T>(q: &Mutex<Vec<T>>) -> Vec<T> {
    q.lock()
        .map(|mut v| std::mem::take(&mut *v))
        .unwrap_or_default()
}

/// A cluster of hubs in a turmoil simulation.
pub struct Hubs {
    /// Per hub.
    pub probes: Vec<Arc<HubProbe>>,
    /// Every answer any hub sent.
    pub answers: Arc<Mutex<Vec<Answer>>>,
    /// Every revocation's result.
    pub revocations: Arc<Mutex<Vec<RevokeResult>>>,
}

/// Hub `h` of `n`: its Raft on `disk`, serving the other hubs' RPCs over
/// turmoil's TCP on [`RAFT_PORT`] (inside a turmoil host).
pub async fn start_raft(h: usize, n: usize, disk: Arc<MemDisk>) -> io::Result<Cluster> {
    let cfg = ClusterConfig {
        me: h as u64 + 1,
        hubs: cluster_list(n),
    };
    let keys = HubKeys {
        private: StaticKeypair::from_seed(HUB_SEED + h as u64).private,
        psk: SIM_PSK,
    };
    let cluster = Cluster::start(cfg.clone(), keys.clone(), disk, TurmoilDialer)
        .await
        .map_err(io::Error::other)?;
    let l = turmoil::net::TcpListener::bind(("0.0.0.0", RAFT_PORT)).await?;
    let (raft, cfg) = (cluster.raft.clone(), Arc::new(cfg));
    tokio::task::spawn_local(async move {
        while let Ok((s, _)) = l.accept().await {
            let (raft, cfg, keys) = (raft.clone(), cfg.clone(), keys.clone());
            tokio::task::spawn_local(async move {
                let _ = net::serve(s, raft, cfg, keys).await;
            });
        }
    });
    Ok(cluster)
}

/// The cluster list of `n` hubs (hosts as [`hub_host`] names them).
pub fn cluster_list(n: usize) -> Vec<HubPeer> {
    (0..n)
        .map(|j| HubPeer {
            id: j as u64 + 1,
            key: StaticKeypair::from_seed(HUB_SEED + j as u64).public,
            addr: format!("{}:{RAFT_PORT}", hub_host(j)),
        })
        .collect()
}

/// Where members seem to come from (the registry wants an endpoint).
fn member_endpoint(key: &PublicKey) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, key[0]], 4000))
}

impl Hubs {
    /// Add `n` hub hosts to `sim`, each with a disk that outlives its crashes;
    /// Raft's random numbers (this thread's) are seeded with `seed`.
    pub fn build(sim: &mut turmoil::Sim<'_>, n: usize, heartbeat: Duration, seed: u64) -> Hubs {
        fastmesh_actors::cluster::runtime::seed(seed);
        let answers: Arc<Mutex<Vec<Answer>>> = Arc::default();
        let revocations: Arc<Mutex<Vec<RevokeResult>>> = Arc::default();
        let mut probes = Vec::new();
        for h in 0..n {
            let probe = Arc::new(HubProbe::default());
            probe.up.store(true, std::sync::atomic::Ordering::SeqCst);
            probes.push(probe.clone());
            let disk = Arc::new(MemDisk::default());
            let (answers, revocations) = (answers.clone(), revocations.clone());
            sim.host(hub_host(h), move || {
                let (probe, disk) = (probe.clone(), disk.clone());
                let (answers, revocations) = (answers.clone(), revocations.clone());
                async move {
                    let cluster = start_raft(h, n, disk).await?;
                    let rec = Recorder {
                        hub: h,
                        answers,
                        epoch: tokio::time::Instant::now(),
                        base: turmoil::sim_elapsed().unwrap_or_default(),
                    }
                    .start();
                    let reg = Registry::new(
                        RegistryConfig {
                            heartbeat,
                            ..RegistryConfig::default()
                        },
                        BTreeMap::new(),
                        0,
                    );
                    let book = cluster.book.clone();
                    let reg = RegistryActor::new(reg, None, rec.recipient())
                        .with_cluster(cluster)
                        .start();
                    // Whatever was handed to a hub while it was down is lost.
                    probe.inbox.lock().map(|mut i| i.clear()).ok();
                    let mut ticks = 0u64;
                    loop {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        let regs = take(&probe.inbox);
                        for (key, addrs) in regs {
                            reg.do_send(NetEvent {
                                peer: key,
                                endpoint: Some(member_endpoint(&key)),
                                event: Event::Control(Control::Register {
                                    overlay: addrs
                                        .iter()
                                        .map(|a| IpNet {
                                            addr: *a,
                                            prefix: 24,
                                        })
                                        .collect(),
                                    local_endpoints: vec![],
                                    name: format!("n{}", key[0]),
                                    have_version: 0,
                                    lookups: false,
                                    routes: vec![],
                                }),
                            });
                        }
                        let revoke = take(&probe.revoke);
                        for key in revoke {
                            let (reg, revocations) = (reg.clone(), revocations.clone());
                            tokio::task::spawn_local(async move {
                                let result = reg
                                    .send(Revoke(key))
                                    .await
                                    .unwrap_or_else(|e| Err(e.to_string()));
                                if let Ok(mut r) = revocations.lock() {
                                    r.push(RevokeResult {
                                        hub: h,
                                        key,
                                        result,
                                    });
                                }
                            });
                        }
                        let allow = take(&probe.allow);
                        for a in allow {
                            reg.do_send(SetAllowed(a));
                        }
                        if let Ok(mut b) = probe.book.lock() {
                            *b = Some(book.borrow().clone());
                        }
                        ticks += 1;
                        if ticks.is_multiple_of(10) {
                            if let Ok(s) = reg.send(GetHubStatus).await {
                                if let Ok(mut p) = probe.status.lock() {
                                    *p = Some(s);
                                }
                            }
                        }
                    }
                }
            });
        }
        Hubs {
            probes,
            answers,
            revocations,
        }
    }

    /// The books of all hubs (None for a hub that never reported).
    pub fn books(&self) -> Vec<Option<Arc<Book>>> {
        self.probes
            .iter()
            .map(|p| p.book.lock().ok().and_then(|b| b.clone()))
            .collect()
    }
}
