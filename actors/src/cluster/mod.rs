//! Several hubs, one registry: the membership book (which key owns which
//! overlay address, which keys are revoked) replicated between hubs with Raft
//! (openraft). The data plane never waits on it: only a registration that
//! changes ownership, and a revocation, go through the log.
//!
//! - [`Book`] is the replicated state machine, pure and clock-free.
//! - [`store`] keeps the Raft log, the vote and the book's snapshot on a
//!   [`store::Disk`] (files in the hub's data directory; memory that survives
//!   a simulated crash in tests).
//! - [`net`] carries Raft's RPCs between hubs over any byte stream (TCP in the
//!   binary, turmoil's TCP in tests), inside a Noise handshake that
//!   authenticates both hubs' static keys and the network key.
//!
//! One hub alone needs none of this: the registry then keeps ownership in its
//! own file, as before.

pub mod net;
pub mod runtime;
pub mod store;

use openraft::BasicNode;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use transport::wire::PublicKey;

openraft::declare_raft_types!(
    /// The hubs' Raft: a log of [`Batch`]es applied to a [`Book`].
    pub HubRaft:
        D = Batch,
        R = Vec<Outcome>,
        NodeId = u64,
        Node = BasicNode,
        SnapshotData = std::io::Cursor<Vec<u8>>,
        AsyncRuntime = runtime::HubRuntime,
);

/// The Raft handle of a hub.
pub type Raft = openraft::Raft<HubRaft>;

/// One change to the book.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// `key` owns exactly `addrs` from now on, unless one of them is another
    /// key's or `key` is revoked.
    Claim {
        /// The claiming node.
        key: PublicKey,
        /// Its overlay addresses.
        addrs: Vec<IpAddr>,
    },
    /// `key` may never register again; its addresses are freed.
    Revoke {
        /// The revoked node.
        key: PublicKey,
    },
    /// Admit only `keys` from now on (None: anyone with the network key);
    /// an operator reloaded a hub's allow-list.
    Allow {
        /// The listed keys.
        keys: Option<Vec<PublicKey>>,
    },
    /// [`Change::Allow`], but only if no allow-list was ever set: a hub
    /// starting with an allow file seeds a new cluster's list without
    /// overwriting a newer one it has not caught up with yet.
    SeedAllow {
        /// The listed keys.
        keys: Vec<PublicKey>,
    },
}

/// Changes proposed together (one log entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Batch(pub Vec<Change>);

/// What applying one [`Change`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Applied.
    Done,
    /// Nothing to do (the claim held already; the key was revoked already).
    Unchanged,
    /// Refused: `addr` belongs to `owner`.
    InUse {
        /// The contested address.
        addr: IpAddr,
        /// Its owner.
        owner: PublicKey,
    },
    /// Refused: the claiming key is revoked.
    Revoked,
}

/// The replicated membership book.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Book {
    /// Address → owner.
    pub owners: BTreeMap<IpAddr, PublicKey>,
    /// Keys that may never register again.
    pub revoked: BTreeSet<PublicKey>,
    /// Only these keys may register (None: anyone with the network key).
    pub allowed: Option<BTreeSet<PublicKey>>,
    /// An allow-list (or "anyone") was set through the log.
    pub allow_set: bool,
}

impl Book {
    /// Apply one change (every hub applies the same changes in the same
    /// order, so every hub's book is the same at the same log index).
    pub fn apply(&mut self, c: &Change) -> Outcome {
        match c {
            Change::Claim { key, addrs } => {
                if self.revoked.contains(key) {
                    return Outcome::Revoked;
                }
                for a in addrs {
                    match self.owners.get(a) {
                        Some(o) if o != key => {
                            return Outcome::InUse {
                                addr: *a,
                                owner: *o,
                            }
                        }
                        _ => {}
                    }
                }
                let want: BTreeSet<IpAddr> = addrs.iter().copied().collect();
                if owned_by(&self.owners, key) == want {
                    return Outcome::Unchanged;
                }
                self.owners.retain(|a, k| k != key || want.contains(a));
                for a in want {
                    self.owners.insert(a, *key);
                }
                Outcome::Done
            }
            Change::Revoke { key } => {
                if !self.revoked.insert(*key) {
                    return Outcome::Unchanged;
                }
                self.owners.retain(|_, k| k != key);
                Outcome::Done
            }
            Change::SeedAllow { .. } if self.allow_set => Outcome::Unchanged,
            Change::Allow { keys: Some(keys) } | Change::SeedAllow { keys } => {
                self.set_allowed(Some(keys.iter().copied().collect()))
            }
            Change::Allow { keys: None } => self.set_allowed(None),
        }
    }

    fn set_allowed(&mut self, keys: Option<BTreeSet<PublicKey>>) -> Outcome {
        let same = self.allow_set && self.allowed == keys;
        self.allowed = keys;
        self.allow_set = true;
        if same {
            Outcome::Unchanged
        } else {
            Outcome::Done
        }
    }
}

/// The addresses `key` owns in `owners`.
pub fn owned_by(owners: &BTreeMap<IpAddr, PublicKey>, key: &PublicKey) -> BTreeSet<IpAddr> {
    owners
        .iter()
        .filter(|(_, k)| *k == key)
        .map(|(a, _)| *a)
        .collect()
}

/// One hub of a cluster, as every hub's configuration lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubPeer {
    /// Raft node id (unique, stable; at least 1).
    pub id: u64,
    /// The hub's static public key (authenticates hub-to-hub connections).
    pub key: PublicKey,
    /// Where its cluster listener is (host:port).
    pub addr: String,
}

/// Parse `ID=KEYHEX@HOST:PORT`.
pub fn parse_hub_peer(s: &str) -> Result<HubPeer, String> {
    let (id, rest) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: want ID=KEY@HOST:PORT"))?;
    let id: u64 = id
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: hub id {id:?} is not a number"))?;
    if id == 0 {
        return Err(format!("{s:?}: hub ids start at 1"));
    }
    let (key, addr) = rest
        .split_once('@')
        .ok_or_else(|| format!("{s:?}: want ID=KEY@HOST:PORT"))?;
    let key = crate::store::parse_key_hex(key.trim())
        .ok_or_else(|| format!("{s:?}: not a public key (64 hex digits)"))?;
    if addr.trim().is_empty() {
        return Err(format!("{s:?}: no address"));
    }
    Ok(HubPeer {
        id,
        key,
        addr: addr.trim().to_string(),
    })
}

/// The hubs of a cluster and this hub's place in it.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This hub's id.
    pub me: u64,
    /// Every hub, this one included.
    pub hubs: Vec<HubPeer>,
}

impl ClusterConfig {
    /// Check the list: ids and keys unique, this hub listed with `my_key`,
    /// at least three hubs (two cannot survive losing one).
    pub fn check(&self, my_key: &PublicKey) -> Result<(), String> {
        let ids: BTreeSet<u64> = self.hubs.iter().map(|h| h.id).collect();
        let keys: BTreeSet<PublicKey> = self.hubs.iter().map(|h| h.key).collect();
        if ids.len() != self.hubs.len() || keys.len() != self.hubs.len() {
            return Err("cluster hubs must have distinct ids and keys".into());
        }
        match self.hubs.iter().find(|h| h.id == self.me) {
            None => return Err(format!("this hub's id {} is not in the hub list", self.me)),
            Some(h) if h.key != *my_key => {
                return Err(format!(
                    "hub {} is listed with key {}, but this hub's key is {}",
                    self.me,
                    crate::store::key_hex(&h.key),
                    crate::store::key_hex(my_key)
                ))
            }
            Some(_) => {}
        }
        if self.hubs.len() < 3 {
            return Err(format!(
                "a cluster needs at least three hubs ({} listed): with two, losing either stops all registrations",
                self.hubs.len()
            ));
        }
        Ok(())
    }

    /// The hub with id `id`.
    pub fn hub(&self, id: u64) -> Option<&HubPeer> {
        self.hubs.iter().find(|h| h.id == id)
    }
}

/// Raft timing for hubs a continent apart: heartbeats every 250 ms, an
/// election after 1.5-3 s of silence, a snapshot every 500 entries.
pub fn raft_config() -> openraft::Config {
    openraft::Config {
        cluster_name: "fastmesh-hubs".into(),
        heartbeat_interval: 250,
        election_timeout_min: 1500,
        election_timeout_max: 3000,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(500),
        max_in_snapshot_log_to_keep: 100,
        install_snapshot_timeout: 5000,
        ..Default::default()
    }
}

/// Why a proposal was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// No leader reachable, or the leader lost its majority.
    #[error("no majority of hubs reachable: {0}")]
    NoQuorum(String),
    /// Raft stopped.
    #[error("raft stopped: {0}")]
    Fatal(String),
}

/// How long a proposal may take before the registration is refused as busy.
pub const PROPOSE_TIMEOUT: Duration = Duration::from_secs(4);
/// Longest a proposal without a leader waits before trying again (a change
/// in Raft's view of the leader wakes it sooner).
const RETRY_AFTER: Duration = Duration::from_millis(200);

/// A started hub cluster member: its Raft, the book as applied here, and the
/// way to propose changes from any hub (forwarded to the leader).
#[derive(Clone)]
pub struct Cluster {
    /// The Raft node.
    pub raft: Raft,
    /// The book, updated after every applied entry or installed snapshot.
    pub book: tokio::sync::watch::Receiver<Arc<Book>>,
    forward: Arc<dyn net::Forward>,
}

impl Cluster {
    /// Start this hub's Raft on `disk`, talking to the other hubs through
    /// `dialer`; every hub of a fresh cluster proposes the same initial
    /// membership (safe: they agree on it).
    pub async fn start<D: net::Dialer>(
        cfg: ClusterConfig,
        keys: net::HubKeys,
        disk: Arc<dyn store::Disk>,
        dialer: D,
    ) -> Result<Cluster, String> {
        let (store, book) = store::HubStore::open(disk)?;
        let (log, sm) = openraft::storage::Adaptor::new(store);
        let network = net::HubNetwork::new(cfg.clone(), keys, dialer);
        let raft_cfg = Arc::new(raft_config().validate().map_err(|e| e.to_string())?);
        let raft = openraft::Raft::new(cfg.me, raft_cfg, network.clone(), log, sm)
            .await
            .map_err(|e| e.to_string())?;
        if !raft.is_initialized().await.map_err(|e| e.to_string())? {
            let members: BTreeMap<u64, BasicNode> = cfg
                .hubs
                .iter()
                .map(|h| {
                    (
                        h.id,
                        BasicNode {
                            addr: h.addr.clone(),
                        },
                    )
                })
                .collect();
            // Another hub may have initialised it first: that is fine.
            if let Err(e) = raft.initialize(members).await {
                tracing::debug!(%e, "cluster already initialised");
            }
        }
        Ok(Cluster {
            raft,
            book,
            forward: Arc::new(network),
        })
    }

    /// Apply `batch` through the log (at the leader, wherever that is).
    /// Without a reachable leader (an election under way, a leader just
    /// lost) it tries again when Raft's view changes (a new leader, a new
    /// term), or after 200 ms, until [`PROPOSE_TIMEOUT`].
    pub async fn propose(&self, batch: Batch) -> Result<Vec<Outcome>, ProposeError> {
        let work = async {
            let mut view = self.raft.metrics();
            loop {
                let seen = {
                    let m = view.borrow_and_update();
                    (m.current_leader, m.current_term)
                };
                match self.propose_once(&batch).await {
                    Err(ProposeError::NoQuorum(e)) => {
                        tracing::debug!(%e, "proposal not placed; trying again");
                        // Only a new leader or term is worth trying again
                        // for at once: the metrics also change with every
                        // heartbeat and replication, which would spin.
                        let leader_moved = async {
                            loop {
                                if view.changed().await.is_err() {
                                    std::future::pending::<()>().await;
                                }
                                let m = view.borrow_and_update();
                                if (m.current_leader, m.current_term) != seen {
                                    return;
                                }
                            }
                        };
                        let _ = tokio::time::timeout(RETRY_AFTER, leader_moved).await;
                    }
                    other => return other,
                }
            }
        };
        match tokio::time::timeout(PROPOSE_TIMEOUT, work).await {
            Ok(r) => r,
            Err(_) => Err(ProposeError::NoQuorum(format!(
                "not committed within {PROPOSE_TIMEOUT:?}"
            ))),
        }
    }

    async fn propose_once(&self, batch: &Batch) -> Result<Vec<Outcome>, ProposeError> {
        match self.raft.client_write(batch.clone()).await {
            Ok(r) => Ok(r.data),
            Err(e) => match e.forward_to_leader::<BasicNode>() {
                Some(f) => match f.leader_id {
                    Some(leader) if leader != self.raft_id() => {
                        self.forward.forward(leader, batch.clone()).await
                    }
                    _ => Err(ProposeError::NoQuorum("no leader elected".into())),
                },
                None => match e {
                    openraft::error::RaftError::Fatal(f) => Err(ProposeError::Fatal(f.to_string())),
                    other => Err(ProposeError::NoQuorum(other.to_string())),
                },
            },
        }
    }

    fn raft_id(&self) -> u64 {
        self.raft.metrics().borrow().id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(n: u8) -> PublicKey {
        [n; 32]
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_claim_on_an_owned_address_is_refused_and_changes_nothing() {
        let mut b = Book::default();
        let c1 = Change::Claim {
            key: k(1),
            addrs: vec![ip("10.0.0.1")],
        };
        assert_eq!(b.apply(&c1), Outcome::Done);
        assert_eq!(b.apply(&c1), Outcome::Unchanged);
        let before = b.clone();
        let c2 = Change::Claim {
            key: k(2),
            addrs: vec![ip("10.0.0.2"), ip("10.0.0.1")],
        };
        assert_eq!(
            b.apply(&c2),
            Outcome::InUse {
                addr: ip("10.0.0.1"),
                owner: k(1)
            }
        );
        assert_eq!(
            b, before,
            "a refused claim must not take its free addresses"
        );
    }

    #[test]
    fn a_new_claim_replaces_the_keys_addresses_and_revocation_frees_them_for_good() {
        let mut b = Book::default();
        b.apply(&Change::Claim {
            key: k(1),
            addrs: vec![ip("10.0.0.1"), ip("fd00::1")],
        });
        b.apply(&Change::Claim {
            key: k(1),
            addrs: vec![ip("10.0.0.3")],
        });
        assert_eq!(b.owners.len(), 1);
        assert_eq!(b.owners.get(&ip("10.0.0.3")), Some(&k(1)));
        assert_eq!(b.apply(&Change::Revoke { key: k(1) }), Outcome::Done);
        assert!(b.owners.is_empty());
        assert_eq!(b.apply(&Change::Revoke { key: k(1) }), Outcome::Unchanged);
        let again = Change::Claim {
            key: k(1),
            addrs: vec![ip("10.0.0.3")],
        };
        assert_eq!(b.apply(&again), Outcome::Revoked);
        assert!(b.owners.is_empty());
    }

    #[test]
    fn a_seeded_allow_list_never_overwrites_one_set_before() {
        let mut b = Book::default();
        assert_eq!(
            b.apply(&Change::SeedAllow { keys: vec![k(1)] }),
            Outcome::Done
        );
        assert_eq!(b.allowed, Some(BTreeSet::from([k(1)])));
        // A second hub starting with an older file: ignored.
        assert_eq!(
            b.apply(&Change::SeedAllow { keys: vec![k(2)] }),
            Outcome::Unchanged
        );
        assert_eq!(b.allowed, Some(BTreeSet::from([k(1)])));
        // An operator's reload replaces it, also with "anyone".
        b.apply(&Change::Allow {
            keys: Some(vec![k(2), k(3)]),
        });
        assert_eq!(b.allowed, Some(BTreeSet::from([k(2), k(3)])));
        assert_eq!(b.apply(&Change::Allow { keys: None }), Outcome::Done);
        assert_eq!(b.allowed, None);
        assert_eq!(
            b.apply(&Change::SeedAllow { keys: vec![k(1)] }),
            Outcome::Unchanged
        );
        assert_eq!(b.allowed, None);
    }

    #[test]
    fn hub_lists_parse_and_are_checked() {
        let key = "ab".repeat(32);
        let h = parse_hub_peer(&format!("2={key}@hub2.example.org:4801")).unwrap();
        assert_eq!((h.id, h.addr.as_str()), (2, "hub2.example.org:4801"));
        assert!(parse_hub_peer(&format!("0={key}@h:1")).is_err());
        assert!(parse_hub_peer("1=zz@h:1").is_err());
        assert!(parse_hub_peer(&format!("x={key}@h:1")).is_err());
        let hubs = |n: u8| -> Vec<HubPeer> {
            (1..=n)
                .map(|i| HubPeer {
                    id: i as u64,
                    key: k(i),
                    addr: format!("h{i}:1"),
                })
                .collect()
        };
        let ok = ClusterConfig {
            me: 2,
            hubs: hubs(3),
        };
        assert!(ok.check(&k(2)).is_ok());
        assert!(ok.check(&k(3)).unwrap_err().contains("listed with key"));
        let two = ClusterConfig {
            me: 1,
            hubs: hubs(2),
        };
        assert!(two.check(&k(1)).unwrap_err().contains("at least three"));
        let absent = ClusterConfig {
            me: 9,
            hubs: hubs(3),
        };
        assert!(absent.check(&k(1)).is_err());
    }
}
