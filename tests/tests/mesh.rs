//! The whole mesh in turmoil: a hub and five peers running the real actors,
//! in-memory TUN devices, seeded links. Every test is deterministic.

use sim::traffic::{self, Kind};
use sim::world::{World, WorldConfig};
use std::collections::BTreeSet;
use std::time::Duration;
use transport::impair::LinkSpec;

const HB: Duration = Duration::from_secs(1);

fn sim(secs: u64) -> turmoil::Sim<'static> {
    turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(secs))
        .tick_duration(Duration::from_millis(1))
        .rng_seed(7)
        .build()
}

fn world(sim: &mut turmoil::Sim<'static>, spec: LinkSpec, seed: u64, name: &str) -> World {
    let dir = std::env::temp_dir().join(format!("fastmesh-mesh-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    World::build(
        sim,
        WorldConfig {
            peers: 5,
            heartbeat: HB,
            spec,
            seed,
            store_dir: dir,
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
        tcp.len() == want
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
        w.peers[3].take_delivered().iter().any(|p| *p == p6)
    });
    assert!(got.is_some(), "IPv6 packet delivered");
}
