//! Same seed, same run; different seed, different run — in the discrete-event
//! simulator and in turmoil.

use fastmesh_tests::{overlay, schedule_mixed};
use sim::des::pair;
use sim::impair::LinkSpec;
use sim::traffic::{self, Kind};
use sim::turmoil_net::{MemTun, Mesh};
use std::time::Duration;
use transport::NodeConfig;

fn des_digest(seed: u64) -> ([u8; 32], usize) {
    let spec = LinkSpec::latency(Duration::from_millis(40))
        .with_loss(0.1)
        .with_jitter(Duration::from_millis(10));
    let (mut net, _ka, kb) = pair(seed, NodeConfig::default(), spec);
    schedule_mixed(&mut net, kb, 500, Duration::from_secs(2), 3, 99);
    net.run_for(Duration::from_secs(20));
    (net.digest(), net.node(1).rx.len())
}

#[test]
fn des_same_seed_same_digest() {
    let (a, n) = des_digest(21);
    assert!(n > 400);
    assert_eq!(a, des_digest(21).0);
    assert_ne!(a, des_digest(22).0);
}

/// Two turmoil hosts over 10% loss and 30 ms +- 10 ms; 200 packets from node0's
/// applications to node1's. Returns the delivery digest and count.
fn turmoil_digest(seed: u64) -> ([u8; 32], u64) {
    let spec = LinkSpec::latency(Duration::from_millis(30))
        .with_loss(0.1)
        .with_jitter(Duration::from_millis(10));
    let mesh = Mesh::new(2, spec, seed);
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(Duration::from_secs(120))
        .build();
    let (d0, h0) = MemTun::new(1024);
    let (d1, mut h1) = MemTun::new(1024);
    mesh.build(&mut sim, vec![d0, d1]);
    sim.client("apps", async move {
        for i in 0..200u32 {
            let kind = if i % 3 == 0 { Kind::Udp } else { Kind::Tcp };
            let ok = h0.apps.send(traffic::packet(
                overlay(0),
                overlay(1),
                kind,
                1,
                i,
                100 + (i as usize * 7) % 1200,
            ));
            assert!(ok, "device queue full");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut tcp = 0;
        while tcp < 133 {
            let p = tokio::time::timeout(Duration::from_secs(60), h1.delivered.recv())
                .await?
                .ok_or("closed")?;
            if traffic::read(&p).is_some_and(|t| t.kind == Kind::Tcp) {
                tcp += 1;
            }
        }
        Ok(())
    });
    sim.run().expect("simulation completes");
    let t = mesh.trace.lock().unwrap();
    (t.digest(), t.delivered)
}

#[test]
fn turmoil_same_seed_same_digest() {
    let (a, n) = turmoil_digest(5);
    assert!(n >= 133, "delivered {n}");
    assert_eq!(a, turmoil_digest(5).0);
    assert_ne!(a, turmoil_digest(6).0);
}
