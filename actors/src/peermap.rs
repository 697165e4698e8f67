//! The peer's view of the network (pure): the member map built from the hub's
//! deltas, and the routing table derived from it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use transport::wire::{IpNet, PeerInfo, PublicKey};

/// A delta that does not apply to the version held.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("delta from version {from} does not apply to version {have}")]
pub struct Stale {
    /// The delta's base.
    pub from: u64,
    /// What the map holds.
    pub have: u64,
}

/// What applying a delta changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapChange {
    /// A new member.
    Added(PeerInfo),
    /// A member's record changed (endpoint, addresses, name).
    Changed(PeerInfo),
    /// A member left or expired.
    Removed(PublicKey),
}

/// Members other than ourselves, as the hub last described them.
#[derive(Debug, Clone)]
pub struct PeerMap {
    me: PublicKey,
    version: u64,
    peers: BTreeMap<PublicKey, PeerInfo>,
    /// Keys some hub revoked: never taken back into the map.
    denied: BTreeSet<PublicKey>,
}

impl PeerMap {
    /// An empty map for the node with key `me`.
    pub fn new(me: PublicKey) -> PeerMap {
        PeerMap {
            me,
            version: 0,
            peers: BTreeMap::new(),
            denied: BTreeSet::new(),
        }
    }

    /// Version held (0 = nothing yet).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Number of members known (ourselves excluded).
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// True if no member is known.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// One member.
    pub fn get(&self, k: &PublicKey) -> Option<&PeerInfo> {
        self.peers.get(k)
    }

    /// All members, in key order.
    pub fn iter(&self) -> impl Iterator<Item = &PeerInfo> {
        self.peers.values()
    }

    /// Forget the version (e.g. after re-registering with a restarted hub), so
    /// the next delta is a snapshot. Members stay until the snapshot replaces them.
    pub fn reset_version(&mut self) {
        self.version = 0;
    }

    /// Apply a delta. `from == 0` is a snapshot that replaces the map. Any
    /// other delta applies if it covers the version held (`from <= version <
    /// to`): records are whole and removals explicit, so a delta from an
    /// older base brings a newer map to `to` as well (a hub resending from
    /// the version a heartbeat reported while newer deltas were in flight).
    /// A delta entirely at or below the version held changes nothing; one
    /// from a later version than held is a gap (`Stale`).
    pub fn apply(
        &mut self,
        from: u64,
        to: u64,
        upserts: &[PeerInfo],
        removals: &[PublicKey],
    ) -> Result<Vec<MapChange>, Stale> {
        let mut keep: Option<BTreeMap<PublicKey, PeerInfo>> = None;
        if from == 0 {
            keep = Some(std::mem::take(&mut self.peers));
        } else if from > self.version {
            return Err(Stale {
                from,
                have: self.version,
            });
        } else if to <= self.version && !(from == to && to == self.version) {
            return Ok(Vec::new()); // already have all of it
        }
        let mut old = keep.unwrap_or_default();
        let mut changes = self.take_records(upserts, removals, &mut old);
        // Members missing from a snapshot are gone.
        for k in old.into_keys() {
            changes.push(MapChange::Removed(k));
        }
        self.version = to;
        Ok(changes)
    }

    /// Take records fetched on demand (no versions: each record is whole,
    /// each removal explicit). Our own and denied keys are skipped.
    pub fn merge(&mut self, upserts: &[PeerInfo], removals: &[PublicKey]) -> Vec<MapChange> {
        self.take_records(upserts, removals, &mut BTreeMap::new())
    }

    /// Upsert and remove records (ours and denied keys skipped); a record
    /// found in `old` (the map a snapshot replaces) is not new.
    fn take_records(
        &mut self,
        upserts: &[PeerInfo],
        removals: &[PublicKey],
        old: &mut BTreeMap<PublicKey, PeerInfo>,
    ) -> Vec<MapChange> {
        let mut changes = Vec::new();
        for p in upserts {
            if p.key == self.me || self.denied.contains(&p.key) {
                continue;
            }
            let prev = self
                .peers
                .insert(p.key, p.clone())
                .or_else(|| old.remove(&p.key));
            match prev {
                None => changes.push(MapChange::Added(p.clone())),
                Some(q) if q != *p => changes.push(MapChange::Changed(p.clone())),
                Some(_) => {}
            }
        }
        for k in removals {
            if self.peers.remove(k).is_some() {
                changes.push(MapChange::Removed(*k));
            }
        }
        changes
    }

    /// Drop `key` for good: it leaves the map (the change, if it was in it)
    /// and no later delta brings it back.
    pub fn deny(&mut self, key: PublicKey) -> Option<MapChange> {
        self.denied.insert(key);
        self.peers.remove(&key).map(|_| MapChange::Removed(key))
    }

    /// The routing table for the current map.
    pub fn router(&self) -> Router {
        let mut r = Router::default();
        for p in self.peers.values() {
            for n in &p.overlay {
                r.insert(n.addr, p.key);
            }
            for n in &p.routes {
                r.insert_route(*n, p.key);
            }
        }
        r
    }

    /// Every subnet the members advertise, to be routed into the mesh.
    pub fn subnet_routes(&self) -> BTreeSet<IpNet> {
        self.peers
            .values()
            .flat_map(|p| p.routes.iter().map(|n| n.network()))
            .collect()
    }
}

/// Overlay address → owning peer. Each member owns host addresses and the
/// subnets it advertises; a packet goes to the owner of its destination
/// (host addresses first, then the longest matching subnet), and an inbound
/// packet is accepted only if its source belongs to the peer that sent it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Router {
    hosts: BTreeMap<IpAddr, PublicKey>,
    /// Subnet routes: (prefix length, IPv6?, network address → owner),
    /// longest prefix first.
    nets: Vec<(u8, bool, BTreeMap<IpAddr, PublicKey>)>,
}

impl Router {
    /// The peer owning `dst`.
    pub fn route(&self, dst: &IpAddr) -> Option<&PublicKey> {
        if let Some(k) = self.hosts.get(dst) {
            return Some(k);
        }
        let v6 = dst.is_ipv6();
        self.nets
            .iter()
            .filter(|(_, f, _)| *f == v6)
            .find_map(|(len, _, m)| {
                let net = IpNet {
                    addr: *dst,
                    prefix: *len,
                };
                m.get(&net.network().addr)
            })
    }

    /// True if `from` owns `src`.
    pub fn owns(&self, from: &PublicKey, src: &IpAddr) -> bool {
        self.route(src) == Some(from)
    }

    /// Number of host addresses and subnets.
    pub fn len(&self) -> usize {
        self.hosts.len() + self.nets.iter().map(|(_, _, m)| m.len()).sum::<usize>()
    }

    /// True if there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Add one host address.
    pub fn insert(&mut self, addr: IpAddr, key: PublicKey) {
        self.hosts.insert(addr, key);
    }

    /// Add one subnet. Two owners of the same subnet (a hub that allows
    /// overlaps): the one added last wins.
    pub fn insert_route(&mut self, net: IpNet, key: PublicKey) {
        let net = net.network();
        let v6 = net.addr.is_ipv6();
        // Kept ordered longest prefix first, IPv4 before IPv6.
        let order = |l: u8, f: bool| (std::cmp::Reverse(l), f);
        let at = match self
            .nets
            .binary_search_by_key(&order(net.prefix, v6), |(l, f, _)| order(*l, *f))
        {
            Ok(i) => i,
            Err(i) => {
                self.nets.insert(i, (net.prefix, v6, BTreeMap::new()));
                i
            }
        };
        self.nets[at].2.insert(net.addr, key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(i: u8, port: u16) -> PeerInfo {
        PeerInfo {
            key: [i; 32],
            overlay: vec![
                IpNet {
                    addr: IpAddr::from([10, 0, 0, i]),
                    prefix: 24,
                },
                IpNet {
                    addr: format!("fd00::{i}").parse().unwrap(),
                    prefix: 64,
                },
            ],
            endpoints: vec![([192, 0, 2, i], port).into()],
            name: String::new(),
            routes: Vec::new(),
        }
    }

    #[test]
    fn a_denied_key_leaves_and_no_later_delta_or_snapshot_brings_it_back() {
        let mut m = PeerMap::new([1; 32]);
        m.apply(0, 5, &[info(2, 1), info(3, 1)], &[]).unwrap();
        assert_eq!(m.deny([3; 32]), Some(MapChange::Removed([3; 32])));
        assert_eq!(m.deny([3; 32]), None, "already gone");
        assert_eq!(m.deny([9; 32]), None, "never listed");
        // The hub the map follows has not heard of the revocation.
        let c = m.apply(5, 6, &[info(3, 2)], &[]).unwrap();
        assert!(c.is_empty(), "{c:?}");
        let c = m.apply(0, 7, &[info(2, 1), info(3, 1)], &[]).unwrap();
        assert!(c.is_empty(), "{c:?}");
        assert_eq!(m.len(), 1);
        assert!(m.get(&[3; 32]).is_none());
    }

    #[test]
    fn deltas_apply_when_they_cover_the_version_held_and_gaps_are_refused() {
        let mut m = PeerMap::new([1; 32]);
        let c = m
            .apply(0, 5, &[info(1, 1), info(2, 1), info(3, 1)], &[])
            .unwrap();
        assert_eq!(c.len(), 2, "self is skipped");
        assert_eq!(m.len(), 2);
        // A gap: changes between 5 and 6 would be missing.
        assert_eq!(m.apply(6, 7, &[], &[]), Err(Stale { from: 6, have: 5 }));
        // From an older base (the hub resent from the version a heartbeat
        // reported while this member was already further): it covers 5..6.
        let c = m.apply(4, 6, &[info(2, 9)], &[[3; 32]]).unwrap();
        assert_eq!(
            c,
            vec![MapChange::Changed(info(2, 9)), MapChange::Removed([3; 32])]
        );
        assert_eq!(m.version(), 6);
        // Entirely old: nothing changes.
        assert_eq!(m.apply(5, 6, &[info(2, 1)], &[]), Ok(vec![]));
        assert_eq!(m.get(&[2; 32]), Some(&info(2, 9)));
        assert_eq!(m.version(), 6);
        // The rest of a split delta applies on top of its first part.
        let c = m.apply(6, 6, &[info(5, 1)], &[]).unwrap();
        assert_eq!(c, vec![MapChange::Added(info(5, 1))]);
        m.apply(6, 6, &[], &[[5; 32]]).unwrap();
        // A snapshot replaces: 2 missing means removed, 4 new.
        let c = m.apply(0, 9, &[info(4, 1)], &[]).unwrap();
        assert_eq!(
            c,
            vec![MapChange::Added(info(4, 1)), MapChange::Removed([2; 32])]
        );
        assert_eq!(m.version(), 9);
    }

    #[test]
    fn router_routes_v4_and_v6_and_checks_sources() {
        let mut m = PeerMap::new([1; 32]);
        m.apply(0, 1, &[info(2, 1), info(3, 1)], &[]).unwrap();
        let r = m.router();
        assert_eq!(r.route(&IpAddr::from([10, 0, 0, 2])), Some(&[2; 32]));
        assert_eq!(r.route(&"fd00::3".parse().unwrap()), Some(&[3; 32]));
        assert_eq!(r.route(&IpAddr::from([10, 0, 0, 9])), None);
        assert!(r.owns(&[2; 32], &IpAddr::from([10, 0, 0, 2])));
        assert!(!r.owns(&[2; 32], &IpAddr::from([10, 0, 0, 3])));
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn subnet_routes_take_the_longest_match_and_extend_the_source_check() {
        let mut m = PeerMap::new([1; 32]);
        let mut b = info(2, 1);
        b.routes = vec![net("192.168.0.0/16"), net("fd05::/48")];
        let mut c = info(3, 1);
        // Host bits set: taken as the network.
        c.routes = vec![net("192.168.5.1/24")];
        m.apply(0, 1, &[b, c], &[]).unwrap();
        let r = m.router();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            r.route(&ip("192.168.5.9")),
            Some(&[3; 32]),
            "longest prefix"
        );
        assert_eq!(r.route(&ip("192.168.6.9")), Some(&[2; 32]));
        assert_eq!(r.route(&ip("fd05::1")), Some(&[2; 32]));
        assert_eq!(r.route(&ip("fd06::1")), None);
        assert_eq!(r.route(&ip("172.16.0.1")), None);
        // Host addresses win over subnets.
        assert_eq!(r.route(&ip("10.0.0.3")), Some(&[3; 32]));
        // The source check: a LAN address is B's only where B routes it.
        assert!(r.owns(&[2; 32], &ip("192.168.6.9")));
        assert!(!r.owns(&[2; 32], &ip("192.168.5.9")), "C's subnet");
        assert!(r.owns(&[3; 32], &ip("192.168.5.9")));
        assert!(!r.owns(&[3; 32], &ip("172.16.0.1")));
        assert_eq!(r.len(), 4 + 3);
        assert_eq!(
            m.subnet_routes().into_iter().collect::<Vec<_>>(),
            vec![
                net("192.168.0.0/16"),
                net("192.168.5.0/24"),
                net("fd05::/48")
            ]
        );
    }
}
