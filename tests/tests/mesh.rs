//! The whole mesh in turmoil: a hub and five peers running the real actors,
//! in-memory TUN devices, seeded links. Every test is deterministic.

use sim::impair::LinkSpec;
use sim::nat::NatKind;
use sim::pumps::Pumps;
use sim::traffic::{self, Kind};
use sim::world::{World, WorldConfig, PROBE_EVERY};
use std::collections::BTreeSet;
use std::time::Duration;

const HB: Duration = Duration::from_secs(1);

fn sim(secs: u64) -> turmoil::Sim<'static> {
    turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(secs))
        .tick_duration(Duration::from_millis(1))
        .rng_seed(7)
        .build()
}

fn world(sim: &mut turmoil::Sim<'static>, spec: LinkSpec, seed: u64, name: &str) -> World {
    world_with_hubs(sim, spec, seed, name, 1)
}

fn world_with_hubs(
    sim: &mut turmoil::Sim<'static>,
    spec: LinkSpec,
    seed: u64,
    name: &str,
    hubs: usize,
) -> World {
    world_nat(sim, spec, seed, name, hubs, vec![])
}

fn world_nat(
    sim: &mut turmoil::Sim<'static>,
    spec: LinkSpec,
    seed: u64,
    name: &str,
    hubs: usize,
    nat: Vec<Option<NatKind>>,
) -> World {
    let dir = std::env::temp_dir().join(format!("fastmesh-mesh-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    World::build(
        sim,
        WorldConfig {
            probe_every: PROBE_EVERY,
            memory_budget: transport::node::MEMORY_BUDGET,
            raft: false,
            on_demand: false,
            peers: 5,
            heartbeat: HB,
            spec,
            seed,
            store_dir: dir,
            hubs,
            nat,
        },
    )
}

fn clean() -> LinkSpec {
    LinkSpec::latency(Duration::from_millis(10))
}

/// Every peer sends `per_pair` UDP-kind and TCP-kind packets to every other;
/// returns (pairs with all TCP delivered, UDP delivered, UDP sent).
fn all_pairs(
    w: &mut World,
    sim: &mut turmoil::Sim<'static>,
    per_pair: u32,
    flow_base: u16,
) -> (usize, usize, usize) {
    let n = w.peers.len();
    for i in 0..n {
        for j in 0..n {
            if i == j {
                continue;
            }
            for s in 0..per_pair {
                let flow = flow_base + (i * n + j) as u16;
                let (src, dst) = (w.peers[i].overlay, w.peers[j].overlay);
                assert!(w.peers[i]
                    .apps
                    .send(traffic::packet(src, dst, Kind::Tcp, flow, s, 200)));
                assert!(w.peers[i]
                    .apps
                    .send(traffic::packet(src, dst, Kind::Udp, flow, s, 300)));
            }
        }
    }
    let mut tcp: BTreeSet<(u16, u32)> = BTreeSet::new();
    let mut udp = 0usize;
    let want = n * (n - 1) * per_pair as usize;
    w.run_until(sim, Duration::from_secs(30), |w| {
        for p in w.peers.iter_mut() {
            for pkt in p.take_delivered() {
                if let Some(t) = traffic::read(&pkt) {
                    if t.flow < flow_base {
                        continue;
                    }
                    match t.kind {
                        Kind::Tcp => {
                            tcp.insert((t.flow, t.seq));
                        }
                        Kind::Udp => udp += 1,
                    }
                }
            }
        }
        // Datagrams may still be on the way when the last reliable packet
        // lands (they go by another queue): wait for them too, up to the
        // bound, so a loss is a loss and not a race with the check.
        tcp.len() == want && udp >= want
    });
    let flows: BTreeSet<u16> = tcp.iter().map(|(f, _)| *f).collect();
    (flows.len(), udp, want)
}

#[test]
fn five_peers_reach_each_other() {
    let mut sim = sim(120);
    let mut w = world(&mut sim, clean(), 1, "reach");
    let t = w.run_until(&mut sim, Duration::from_secs(20), |w| w.all_connected());
    let t = t.unwrap_or_else(|| panic!("mesh did not form:\n{}", w.dump()));
    println!("mesh formed in {t:?}");
    assert_eq!(w.hub_members(), 5);
    let (pairs, udp, want) = all_pairs(&mut w, &mut sim, 20, 100);
    assert_eq!(
        pairs, 20,
        "every ordered pair delivered all its TCP packets"
    );
    assert_eq!(udp, want, "clean links lose no UDP");
    // IPv6 too.
    let (a, b) = (w.peers[0].overlay6, w.peers[3].overlay6);
    let p6 = transport::ip::build_v6(a, b, 17, 5, 6, b"over six", 0);
    assert!(w.peers[0].apps.send(p6.clone()));
    let got = w.run_until(&mut sim, Duration::from_secs(2), |w| {
        w.peers[3].take_delivered().contains(&p6)
    });
    assert!(got.is_some(), "IPv6 packet delivered");
}

fn form(w: &mut World, sim: &mut turmoil::Sim<'static>, limit: Duration) {
    if w.run_until(sim, limit, |w| w.all_connected()).is_none() {
        panic!("mesh did not form:\n{}", w.dump());
    }
}

fn registered_everywhere(w: &World) -> bool {
    w.hub_members() == w.peers.len()
        && w.peers.iter().all(|p| {
            p.status()
                .is_some_and(|s| s.hubs.iter().all(|h| h.state == "registered"))
        })
}

#[test]
fn hub_crash_keeps_direct_paths_and_peers_reregister_after_restart() {
    let mut sim = sim(120);
    let mut w = world(&mut sim, clean(), 2, "hubcrash");
    form(&mut w, &mut sim, Duration::from_secs(20));
    let mut d = Pumps::default();
    let t0 = sim.elapsed();
    d.pump(0, 1, 1, Kind::Tcp, Duration::from_millis(20), t0);
    d.pump(2, 3, 2, Kind::Udp, Duration::from_millis(20), t0);
    d.run(&mut sim, &mut w, Duration::from_secs(1), |_, _, _| false);

    sim.crash("hub");
    let down = sim.elapsed();
    d.run(&mut sim, &mut w, Duration::from_secs(8), |_, _, _| false);
    let up = sim.elapsed();
    // Everything sent while the hub was down, minus the last second still in flight.
    let (sent, got) = d.delivered(1, down, up - Duration::from_secs(1));
    assert!(sent > 300, "pumped {sent}");
    assert_eq!(
        got, sent,
        "TCP between connected peers flows with the hub down"
    );
    let (sent, got) = d.delivered(2, down, up - Duration::from_secs(1));
    assert_eq!(got, sent, "UDP too");
    // The peers noticed the hub is gone.
    assert!(w
        .peers
        .iter()
        .all(|p| p.status().unwrap().hubs[0].state != "registered"));

    sim.bounce("hub");
    let mut owned_at_boot = None;
    let took = d
        .run(&mut sim, &mut w, Duration::from_secs(10), |w, _, _| {
            if owned_at_boot.is_none() {
                if let Some(h) = w.hub_status.lock().unwrap().as_ref() {
                    if h.map_version >> 40 == 2 {
                        owned_at_boot = Some((h.owned_addresses, h.members.len()));
                    }
                }
            }
            registered_everywhere(w)
        })
        .unwrap_or_else(|| panic!("peers did not re-register:\n{}", w.dump()));
    println!("re-registered {took:?} after the hub came back");
    assert!(took <= 3 * HB, "re-registration took {took:?}");
    let (owned, members) = owned_at_boot.expect("hub status after restart");
    assert_eq!(
        owned, 10,
        "address ownership survived the crash (members then: {members})"
    );
    // And the map is whole again: every peer still sees all the others.
    form(&mut w, &mut sim, Duration::from_secs(5));
}

#[test]
fn restarted_peer_leaves_and_returns() {
    let mut sim = sim(120);
    let mut w = world(&mut sim, clean(), 3, "peerrestart");
    form(&mut w, &mut sim, Duration::from_secs(20));
    let key2 = transport::crypto::StaticKeypair::from_seed(sim::world::peer_seed(2)).public;
    let short2 = fastmesh_actors::registry::short_key(&key2);
    sim.crash("peer2");
    let gone = w
        .run_until(&mut sim, Duration::from_secs(15), |w| {
            [0, 1, 3, 4].iter().all(|i| {
                w.peers[*i]
                    .status()
                    .is_some_and(|s| s.peers.iter().all(|p| p.key != short2))
            })
        })
        .unwrap_or_else(|| panic!("peer2 never left:\n{}", w.dump()));
    println!("others saw peer2 leave after {gone:?}");
    assert!(gone <= 5 * HB);
    assert_eq!(w.hub_members(), 4);
    sim.bounce("peer2");
    let back = w
        .run_until(&mut sim, Duration::from_secs(15), |w| w.all_connected())
        .unwrap_or_else(|| panic!("peer2 did not return:\n{}", w.dump()));
    println!("peer2 back and connected after {back:?}");
    let (pairs, _, _) = all_pairs(&mut w, &mut sim, 5, 200);
    assert_eq!(pairs, 20);
}

#[test]
fn nat_rebinding_traffic_follows_within_one_heartbeat() {
    let mut sim = sim(120);
    let mut w = world(&mut sim, clean(), 4, "rebind");
    form(&mut w, &mut sim, Duration::from_secs(20));
    let mut d = Pumps::default();
    d.pump(0, 1, 1, Kind::Tcp, Duration::from_millis(10), sim.elapsed());
    d.run(&mut sim, &mut w, Duration::from_secs(1), |_, _, _| false);
    w.peers[1]
        .rebind_to
        .store(4555, std::sync::atomic::Ordering::SeqCst);
    // The probe loop applies it within 100 ms; find when it did.
    let moved = w
        .run_until(&mut sim, Duration::from_secs(1), |w| {
            w.peers[1]
                .rebind_to
                .load(std::sync::atomic::Ordering::SeqCst)
                == 0
        })
        .expect("rebind applied");
    let at = sim.elapsed();
    let _ = moved;
    // Traffic resumes: a packet sent after the move is delivered.
    let resumed = d
        .run(&mut sim, &mut w, Duration::from_secs(5), |_, d, _| {
            d.sent(1)
                .iter()
                .enumerate()
                .any(|(i, t)| *t >= at && d.got.contains_key(&(1, i as u32)))
        })
        .unwrap_or_else(|| panic!("traffic did not follow:\n{}", w.dump()));
    println!("traffic followed the new endpoint after {resumed:?}");
    assert!(
        resumed <= HB + Duration::from_millis(100),
        "took {resumed:?}"
    );
    d.run(&mut sim, &mut w, Duration::from_secs(3), |_, _, _| false);
    let (sent, got) = d.delivered(1, Duration::ZERO, sim.elapsed() - Duration::from_secs(1));
    assert_eq!(got, sent, "nothing lost across the move");
    // The hub saw the new endpoint too.
    let ep = w
        .hub_status
        .lock()
        .unwrap()
        .as_ref()
        .unwrap()
        .members
        .iter()
        .find(|m| m.name == "peer1")
        .unwrap()
        .endpoints[0]
        .clone();
    assert!(ep.ends_with(":4555"), "hub has {ep}");
}

#[test]
fn five_percent_loss_on_every_link() {
    let mut sim = sim(200);
    let spec = LinkSpec::latency(Duration::from_millis(15)).with_loss(0.05);
    let mut w = world(&mut sim, spec, 5, "loss");
    form(&mut w, &mut sim, Duration::from_secs(30));
    let (pairs, udp, want) = all_pairs(&mut w, &mut sim, 40, 300);
    println!("5% loss: UDP {udp}/{want}");
    assert_eq!(pairs, 20, "every pair's TCP complete");
    // Each datagram crosses one lossy receive path: expect about 95%.
    assert!(udp * 100 >= want * 88, "UDP delivered {udp}/{want}");
}

#[test]
fn two_hubs_losing_the_first_changes_nothing() {
    let mut sim = sim(120);
    let mut w = world_with_hubs(&mut sim, clean(), 6, "twohubs", 2);
    form(&mut w, &mut sim, Duration::from_secs(20));
    let members = |w: &World, h: usize| {
        w.hub_statuses[h]
            .lock()
            .unwrap()
            .as_ref()
            .map_or(0, |s| s.members.len())
    };
    assert_eq!(
        (members(&w, 0), members(&w, 1)),
        (5, 5),
        "registered with both"
    );
    let mut d = Pumps::default();
    d.pump(0, 1, 1, Kind::Tcp, Duration::from_millis(20), sim.elapsed());
    sim.crash("hub");
    let down = sim.elapsed();
    d.run(&mut sim, &mut w, Duration::from_secs(5), |_, _, _| false);
    let (sent, got) = d.delivered(1, down, sim.elapsed() - Duration::from_secs(1));
    assert_eq!(got, sent, "traffic unaffected");
    // A peer restarting now can only reach the second hub; everyone learns
    // of it from there.
    sim.crash("peer2");
    d.run(&mut sim, &mut w, Duration::from_secs(1), |_, _, _| false);
    *w.peers[2].status.lock().unwrap() = None;
    sim.bounce("peer2");
    let back = d
        .run(&mut sim, &mut w, Duration::from_secs(10), |w, _, _| {
            w.peers.iter().all(|p| {
                p.status().is_some_and(|s| {
                    s.peers.len() == 4
                        && s.peers
                            .iter()
                            .all(|q| q.state == fastmesh_actors::peer::PathState::Up)
                })
            })
        })
        .unwrap_or_else(|| panic!("peer2 not back through the second hub:\n{}", w.dump()));
    println!("with the first hub down, a restarted peer was back everywhere after {back:?}");
    let (pairs, _, _) = all_pairs(&mut w, &mut sim, 5, 400);
    assert_eq!(pairs, 20);
}

#[test]
fn forged_sources_and_unknown_destinations_are_dropped_and_counted() {
    let mut sim = sim(60);
    let mut w = world(&mut sim, clean(), 8, "forged");
    form(&mut w, &mut sim, Duration::from_secs(20));
    let counter = |w: &World, i: usize, name: &str| {
        w.peers[i]
            .status()
            .unwrap()
            .counters
            .get(name)
            .copied()
            .unwrap_or(0)
    };
    let (bad0, route0) = (
        counter(&w, 1, "drop_bad_source"),
        counter(&w, 0, "drop_no_route"),
    );
    // peer0 claims peer3's address as source, towards peer1.
    let forged = traffic::packet(w.peers[3].overlay, w.peers[1].overlay, Kind::Udp, 9, 0, 200);
    // A genuine one right after it, to know the path works.
    let genuine = traffic::packet(w.peers[0].overlay, w.peers[1].overlay, Kind::Udp, 9, 1, 200);
    // And one to an address nobody owns.
    let nowhere = traffic::packet(
        w.peers[0].overlay,
        "10.88.0.99".parse().unwrap(),
        Kind::Udp,
        9,
        2,
        200,
    );
    for p in [forged, genuine, nowhere] {
        assert!(w.peers[0].apps.send(p));
    }
    let mut seen = Vec::new();
    w.run_until(&mut sim, Duration::from_secs(2), |w| {
        seen.extend(w.peers[1].take_delivered());
        counter(w, 1, "drop_bad_source") > bad0 && counter(w, 0, "drop_no_route") > route0
    })
    .unwrap_or_else(|| panic!("drops not counted:\n{}", w.dump()));
    w.run_until(&mut sim, Duration::from_millis(500), |_| false);
    seen.extend(w.peers[1].take_delivered());
    let seqs: Vec<u32> = seen
        .iter()
        .filter_map(|p| traffic::read(p))
        .filter(|t| t.flow == 9)
        .map(|t| t.seq)
        .collect();
    assert_eq!(seqs, vec![1], "only the genuine packet reaches peer1's TUN");
}

#[test]
fn revoked_node_leaves_every_map_loses_its_sessions_and_cannot_return() {
    let mut sim = sim(120);
    let mut w = world(&mut sim, clean(), 9, "revoke");
    form(&mut w, &mut sim, Duration::from_secs(20));
    let short3 = fastmesh_actors::registry::short_key(&w.peers[3].key);
    let mut d = Pumps::default();
    d.pump(3, 0, 1, Kind::Udp, Duration::from_millis(20), sim.elapsed());
    d.pump(3, 1, 2, Kind::Tcp, Duration::from_millis(20), sim.elapsed());
    d.run(&mut sim, &mut w, Duration::from_secs(1), |_, _, _| false);
    let key3 = w.peers[3].key;
    w.hub_revoke[0].lock().unwrap().push(key3);
    let at = sim.elapsed();
    let gone = d
        .run(&mut sim, &mut w, Duration::from_secs(5), |w, _, _| {
            [0, 1, 2, 4].iter().all(|&i| {
                w.peers[i]
                    .status()
                    .is_some_and(|s| s.peers.iter().all(|p| p.key != short3))
            })
        })
        .unwrap_or_else(|| panic!("revoked node still listed:\n{}", w.dump()));
    println!("revoked node left every map after {gone:?}");
    assert!(gone <= HB, "within one heartbeat: {gone:?}");
    // Nothing it sends is accepted any more.
    let cut = sim.elapsed() + Duration::from_millis(300);
    d.run(&mut sim, &mut w, Duration::from_secs(3), |_, _, _| false);
    for flow in [1, 2] {
        let (sent, got) = d.delivered(flow, cut, sim.elapsed());
        assert!(sent > 50);
        assert_eq!(
            got, 0,
            "flow {flow}: {got} of {sent} delivered after revocation"
        );
    }
    // It was told, and a restart does not bring it back.
    let st = w.peers[3].status().unwrap();
    assert!(st.hubs[0].state.starts_with("refused"), "{:?}", st.hubs[0]);
    sim.crash("peer3");
    *w.peers[3].status.lock().unwrap() = None;
    sim.bounce("peer3");
    w.run_until(&mut sim, Duration::from_secs(5), |_| false);
    let st = w.peers[3].status().unwrap();
    assert!(st.hubs[0].state.starts_with("refused"), "{:?}", st.hubs[0]);
    assert!(st.peers.is_empty(), "learned nothing of the map");
    assert_eq!(w.hub_members(), 4);
    assert_eq!(w.hub_status.lock().unwrap().as_ref().unwrap().revoked, 1);
    let _ = at;
}

#[test]
fn member_expired_during_a_partition_registers_again_when_it_heals() {
    // The hub drops the silent member and its session; the member keeps its
    // old session state. The new session must not inherit stale KCP state
    // (each session carries its own incarnation), or the reliable
    // registration ack would never get through.
    let mut sim = sim(120);
    let mut w = world(&mut sim, clean(), 10, "partition");
    form(&mut w, &mut sim, Duration::from_secs(20));
    sim.partition("hub", "peer1");
    w.run_until(&mut sim, Duration::from_secs(10), |w| w.hub_members() == 4)
        .unwrap_or_else(|| panic!("hub did not expire peer1:\n{}", w.dump()));
    // Peers keep peer1 while its direct paths work.
    w.run_until(&mut sim, Duration::from_secs(2), |_| false);
    sim.repair("hub", "peer1");
    let healed = w
        .run_until(&mut sim, Duration::from_secs(10), |w| {
            registered_everywhere(w)
        })
        .unwrap_or_else(|| panic!("peer1 did not register again:\n{}", w.dump()));
    println!("peer1 registered again {healed:?} after the partition healed");
    assert!(healed <= 3 * HB, "{healed:?}");
    form(&mut w, &mut sim, Duration::from_secs(5));
}

/// Path and reason `status` of peer `i` shows for peer `j`.
fn path_of(w: &World, i: usize, j: usize) -> Option<(String, String)> {
    let name = format!("peer{j}");
    w.peers[i]
        .status()?
        .peers
        .iter()
        .find(|p| p.name == name)
        .map(|p| (p.path.clone(), p.path_reason.clone()))
}

fn hub_relayed(w: &World) -> u64 {
    w.hub_status
        .lock()
        .unwrap()
        .as_ref()
        .map_or(0, |s| s.relayed)
}

#[test]
fn without_a_direct_path_traffic_goes_through_the_hub_then_back_to_direct() {
    let mut sim = sim(150);
    let mut w = world(&mut sim, clean(), 21, "relay");
    // peer0 and peer1 can each reach the hub but never each other (what two
    // NATs with random port mapping amount to).
    sim.partition("peer0", "peer1");
    let t = w.run_until(&mut sim, Duration::from_secs(30), |w| w.all_connected());
    t.unwrap_or_else(|| panic!("mesh did not form:\n{}", w.dump()));
    let relayed = |w: &World| {
        path_of(w, 0, 1).is_some_and(|p| p.0 == "relay")
            && path_of(w, 1, 0).is_some_and(|p| p.0 == "relay")
    };
    let t = w
        .run_until(&mut sim, Duration::from_secs(20), |w| relayed(w))
        .unwrap_or_else(|| panic!("not relayed:\n{}", w.dump()));
    println!("relayed after {t:?} more: {:?}", path_of(&w, 0, 1).unwrap());
    assert!(path_of(&w, 0, 1)
        .unwrap()
        .1
        .contains("no direct candidate answered"));
    assert_eq!(path_of(&w, 0, 2).unwrap().0, "direct", "others stay direct");
    // Traffic both ways through the relay.
    let before = hub_relayed(&w);
    let mut d = Pumps::default();
    let start = sim.elapsed();
    d.pump(0, 1, 1, Kind::Tcp, Duration::from_millis(20), start);
    d.pump(1, 0, 2, Kind::Udp, Duration::from_millis(20), start);
    d.run(&mut sim, &mut w, Duration::from_secs(5), |_, _, _| false);
    let end = sim.elapsed() - Duration::from_secs(1);
    let (sent, got) = d.delivered(1, start, end);
    assert!(sent > 150);
    assert_eq!(got, sent, "all TCP through the relay");
    let (sent, got) = d.delivered(2, start, end);
    assert_eq!(got, sent, "all UDP through the relay (clean links)");
    let relayed_frames = hub_relayed(&w) - before;
    assert!(
        relayed_frames as usize >= sent,
        "the hub relayed {relayed_frames}"
    );
    // The direct path heals: traffic moves back to it, nothing lost.
    sim.repair("peer0", "peer1");
    let healed = sim.elapsed();
    let back = d
        .run(&mut sim, &mut w, Duration::from_secs(40), |w, _, _| {
            path_of(w, 0, 1).is_some_and(|p| p.0 == "direct")
                && path_of(w, 1, 0).is_some_and(|p| p.0 == "direct")
        })
        .unwrap_or_else(|| panic!("not back to direct:\n{}", w.dump()));
    println!("back to direct {back:?} after the repair");
    d.run(&mut sim, &mut w, Duration::from_secs(3), |_, _, _| false);
    let (sent, got) = d.delivered(1, healed, sim.elapsed() - Duration::from_secs(1));
    assert_eq!(got, sent, "no TCP lost while the path moved");
    let r0 = hub_relayed(&w);
    d.run(&mut sim, &mut w, Duration::from_secs(3), |_, _, _| false);
    // 3 s of 50 packets/s each way would be 300 relayed frames; only the
    // relay probes remain (each pair probes its relay every 16 s once direct
    // is healthy, more often just after a move).
    let relayed = hub_relayed(&w) - r0;
    println!("relayed in 3 s once direct: {relayed}");
    assert!(
        relayed < 60,
        "the data no longer goes through the hub: {relayed}"
    );
}

// ---------------------------------------------- NAT (sim::nat), seeded

/// peer0 and peer1 behind NATs of `kind`, the others public.
fn nat_world(sim: &mut turmoil::Sim<'static>, kind: NatKind, name: &str, hubs: usize) -> World {
    let mut w = world_nat(sim, clean(), 31, name, hubs, vec![Some(kind), Some(kind)]);
    let t = w.run_until(sim, Duration::from_secs(30), |w| w.all_connected());
    t.unwrap_or_else(|| panic!("mesh behind NAT did not form:\n{}", w.dump()));
    w
}

fn both_on(w: &World, want: &str) -> bool {
    path_of(w, 0, 1).is_some_and(|p| p.0 == want) && path_of(w, 1, 0).is_some_and(|p| p.0 == want)
}

#[test]
fn sim_cone_nats_punch_a_direct_path() {
    let mut sim = sim(120);
    let mut w = nat_world(&mut sim, NatKind::Cone, "natcone", 1);
    let t = w
        .run_until(&mut sim, Duration::from_secs(30), |w| both_on(w, "direct"))
        .unwrap_or_else(|| panic!("no direct path through cone NATs:\n{}", w.dump()));
    println!("direct through two cone NATs after {t:?}");
    // Let the first probing rounds (relays probed every second until direct
    // is proven) pass; then measure.
    w.run_until(&mut sim, Duration::from_secs(20), |_| false);
    let r0 = hub_relayed(&w);
    let mut d = Pumps::default();
    let start = sim.elapsed();
    d.pump(0, 1, 1, Kind::Tcp, Duration::from_millis(20), start);
    d.run(&mut sim, &mut w, Duration::from_secs(5), |_, _, _| false);
    let (sent, got) = d.delivered(1, start, sim.elapsed() - Duration::from_secs(1));
    assert_eq!(got, sent);
    let relayed = hub_relayed(&w) - r0;
    println!("hub relayed {relayed} frames while 250 data packets went direct");
    assert!(
        relayed < 40,
        "the hub relayed {relayed} frames (~250 data frames went direct)"
    );
    assert!(both_on(&w, "direct"));
}

#[test]
fn sim_random_port_nats_use_the_relay() {
    let mut sim = sim(120);
    let mut w = nat_world(&mut sim, NatKind::Random, "natrand", 1);
    w.run_until(&mut sim, Duration::from_secs(30), |w| both_on(w, "relay"))
        .unwrap_or_else(|| panic!("not relayed:\n{}", w.dump()));
    let r0 = hub_relayed(&w);
    let mut d = Pumps::default();
    let start = sim.elapsed();
    d.pump(0, 1, 1, Kind::Tcp, Duration::from_millis(20), start);
    d.pump(1, 0, 2, Kind::Udp, Duration::from_millis(20), start);
    // Well past the punch requests and backoff: still relayed, all delivered.
    d.run(&mut sim, &mut w, Duration::from_secs(30), |_, _, _| false);
    let end = sim.elapsed() - Duration::from_secs(1);
    for flow in [1, 2] {
        let (sent, got) = d.delivered(flow, start, end);
        assert!(sent > 1_000);
        assert_eq!(got, sent, "flow {flow} through the relay");
    }
    assert!(hub_relayed(&w) - r0 > 2_000);
    assert!(both_on(&w, "relay"));
    // Direct attempts were made and refused by the NATs (wrong ports).
    let refused = w.peers[0]
        .nat_dropped
        .load(std::sync::atomic::Ordering::SeqCst);
    println!("peer0's NAT refused {refused} datagrams");
    assert!(refused > 0);
    // The other peers reach peer0 directly: it is only the NAT pair that needs the hub.
    assert_eq!(path_of(&w, 2, 3).unwrap().0, "direct");
}

#[test]
fn sim_nat_mapping_flush_mid_transfer_recovers() {
    let mut sim = sim(120);
    let mut w = nat_world(&mut sim, NatKind::Cone, "natflush", 1);
    w.run_until(&mut sim, Duration::from_secs(30), |w| both_on(w, "direct"))
        .unwrap_or_else(|| panic!("no direct path:\n{}", w.dump()));
    let mut d = Pumps::default();
    let start = sim.elapsed();
    d.pump(0, 1, 1, Kind::Tcp, Duration::from_millis(10), start);
    d.pump(1, 0, 2, Kind::Tcp, Duration::from_millis(10), start);
    d.run(&mut sim, &mut w, Duration::from_secs(2), |_, _, _| false);
    use std::sync::atomic::Ordering::SeqCst;
    let dropped = |w: &World| -> u64 {
        w.peers[..2]
            .iter()
            .map(|p| p.nat_dropped.load(SeqCst))
            .sum()
    };
    let before = dropped(&w);
    for p in &w.peers[..2] {
        p.nat_flush.store(true, SeqCst);
    }
    d.run(&mut sim, &mut w, Duration::from_secs(10), |_, _, _| false);
    let end = sim.elapsed() - Duration::from_secs(2);
    for flow in [1, 2] {
        let (sent, got) = d.delivered(flow, start, end);
        assert_eq!(
            got, sent,
            "flow {flow}: every TCP packet arrived across the flush"
        );
    }
    // The NATs keep their public port (as Linux does) and both sides keep
    // sending, so the mappings reopen and the path stays direct.
    assert!(both_on(&w, "direct"), "{}", w.dump());
    // The flush was real: datagrams arriving before the other side's next
    // send were refused by the NATs.
    let refused = dropped(&w) - before;
    println!("the NATs refused {refused} datagrams after the flush");
    assert!(refused > 0);
}

#[test]
fn sim_two_hubs_relaying_hub_crashes_nothing_stops() {
    let mut sim = sim(150);
    let mut w = nat_world(&mut sim, NatKind::Random, "nat2hub", 2);
    w.run_until(&mut sim, Duration::from_secs(30), |w| both_on(w, "relay"))
        .unwrap_or_else(|| panic!("not relayed:\n{}", w.dump()));
    let relaying = |w: &World| {
        w.peers[0].status().and_then(|s| {
            s.peers
                .iter()
                .find(|p| p.name == "peer1")
                .and_then(|p| p.relay.clone())
        })
    };
    let via = relaying(&w).expect("relaying hub");
    let hub0 = fastmesh_actors::registry::short_key(&w.hub_key);
    let (dead, alive) = if via == hub0 { ("hub", 1) } else { ("hub1", 0) };
    let mut d = Pumps::default();
    let start = sim.elapsed();
    d.pump(0, 1, 1, Kind::Tcp, Duration::from_millis(20), start);
    d.run(&mut sim, &mut w, Duration::from_secs(2), |_, _, _| false);
    sim.crash(dead);
    let back = d
        .run(&mut sim, &mut w, Duration::from_secs(30), |w, _, _| {
            relaying(w).is_some_and(|v| v != via)
        })
        .unwrap_or_else(|| panic!("relay did not move:\n{}", w.dump()));
    println!("relay moved to the other hub {back:?} after the crash");
    d.run(&mut sim, &mut w, Duration::from_secs(5), |_, _, _| false);
    let (sent, got) = d.delivered(1, start, sim.elapsed() - Duration::from_secs(1));
    assert_eq!(got, sent, "every TCP packet arrived");
    let relayed = w.hub_statuses[alive]
        .lock()
        .unwrap()
        .as_ref()
        .map_or(0, |s| s.relayed);
    assert!(relayed > 100, "the surviving hub relays: {relayed}");
}

fn holds(w: &World, i: usize) -> BTreeSet<String> {
    w.peers[i]
        .status()
        .map(|s| s.peers.into_iter().map(|p| p.key).collect())
        .unwrap_or_default()
}

#[test]
fn on_demand_peers_fetch_records_when_packets_need_them() {
    let mut sim = sim(120);
    let dir = std::env::temp_dir().join(format!("fastmesh-mesh-ondemand-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut w = World::build(
        &mut sim,
        WorldConfig {
            probe_every: PROBE_EVERY,
            memory_budget: transport::node::MEMORY_BUDGET,
            raft: false,
            on_demand: true,
            peers: 5,
            heartbeat: HB,
            spec: clean(),
            seed: 11,
            store_dir: dir.clone(),
            hubs: 1,
            nat: vec![],
        },
    );
    w.run_until(&mut sim, Duration::from_secs(20), |w| {
        registered_everywhere(w)
    })
    .unwrap_or_else(|| panic!("peers did not register:\n{}", w.dump()));
    // Registered, and nobody was sent anybody's record.
    w.run_until(&mut sim, 2 * HB, |_| false);
    for i in 0..5 {
        assert!(holds(&w, i).is_empty(), "peer {i} holds {:?}", holds(&w, i));
    }
    let short = |i: usize| fastmesh_actors::registry::short_key(&w.peers[i].key);
    let (k0, k3) = (short(0), short(3));

    // The first packet to a member nobody knew waits for its record and
    // arrives; the two hold each other's record, the others still nothing.
    let (src, dst) = (w.peers[0].overlay, w.peers[3].overlay);
    let first = traffic::packet(src, dst, Kind::Udp, 50, 0, 100);
    assert!(w.peers[0].apps.send(first.clone()));
    let mut got = Vec::new();
    let took = w
        .run_until(&mut sim, Duration::from_secs(2), |w| {
            got.extend(w.peers[3].take_delivered());
            got.contains(&first)
        })
        .unwrap_or_else(|| panic!("first packet not delivered:\n{}", w.dump()));
    println!("first packet to an unknown member delivered after {took:?}");
    w.run_until(&mut sim, PROBE_EVERY * 2, |_| false);
    assert_eq!(holds(&w, 0), BTreeSet::from([k3.clone()]));
    assert_eq!(holds(&w, 3), BTreeSet::from([k0.clone()]));
    for i in [1, 2, 4] {
        assert!(holds(&w, i).is_empty(), "peer {i} holds {:?}", holds(&w, i));
    }
    let held = w.peers[0].status().unwrap().counters["unrouted_held"];
    assert!(held >= 1, "the first packet was held, not dropped");

    // TCP one way, UDP the other, and with the hub down the direct path
    // carries on.
    let mut d = Pumps::default();
    let t0 = sim.elapsed();
    d.pump(0, 3, 1, Kind::Tcp, Duration::from_millis(20), t0);
    d.pump(3, 0, 2, Kind::Udp, Duration::from_millis(20), t0);
    d.run(&mut sim, &mut w, Duration::from_secs(1), |_, _, _| false);
    sim.crash("hub");
    let down = sim.elapsed();
    d.run(&mut sim, &mut w, Duration::from_secs(5), |_, _, _| false);
    let up = sim.elapsed();
    for flow in [1, 2] {
        let (sent, got) = d.delivered(flow, down, up - Duration::from_secs(1));
        assert!(sent > 150, "pumped {sent}");
        assert_eq!(got, sent, "flow {flow} with the hub down");
    }

    // The hub comes back knowing nothing of who holds what; the members
    // register again and renew what they hold, so a revocation still
    // reaches the holder, within two heartbeats.
    sim.bounce("hub");
    d.run(&mut sim, &mut w, Duration::from_secs(10), |w, _, _| {
        registered_everywhere(w)
    })
    .unwrap_or_else(|| panic!("peers did not re-register:\n{}", w.dump()));
    d.run(&mut sim, &mut w, HB, |_, _, _| false);
    let key3 = w.peers[3].key;
    w.hub_revoke[0].lock().unwrap().push(key3);
    let gone = d
        .run(&mut sim, &mut w, Duration::from_secs(5), |w, _, _| {
            !holds(w, 0).contains(&k3)
        })
        .unwrap_or_else(|| panic!("revoked member still held:\n{}", w.dump()));
    println!("revocation reached the holder after {gone:?}");
    assert!(gone <= 2 * HB, "{gone:?}");

    // A packet to an address nobody has is held, then dropped and counted.
    let before = w.peers[1].status().unwrap().counters["drop_no_route"];
    let stray: std::net::Ipv4Addr = "10.88.0.200".parse().unwrap();
    for s in 0..2 {
        let p = traffic::packet(w.peers[1].overlay, stray, Kind::Udp, 60, s, 50);
        assert!(w.peers[1].apps.send(p));
        w.run_until(&mut sim, Duration::from_secs(3), |_| false);
    }
    let after = w.peers[1].status().unwrap().counters["drop_no_route"];
    assert!(after > before, "no_route {before} -> {after}");
    assert!(holds(&w, 1).is_empty());
}
