//! Several hubs, one registry (issue 13): three hubs sharing ownership and
//! revocations through Raft, under partitions and crashes (their disks
//! kept), while forty nodes race to claim twelve addresses through whichever
//! hub they pick. A checker reads the history of every answer the hubs gave
//! and their books at the end:
//!
//! - no address was ever acknowledged to two keys (a revoked key's address
//!   may pass on);
//! - no acknowledged registration is lost: every hub's final book has it;
//! - every hub ends with the same book, so a revocation asked at a hub cut
//!   off from the others is either refused or, once healed, applied
//!   everywhere, never at some hubs only;
//! - once the faults stop, every node gets an answer (an owner or a refusal).

use fastmesh_actors::registry::short_key;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sim::hubs::Hubs;
use sim::world::hub_host;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;
use transport::wire::{Control, ErrorCode, PublicKey};

const HUBS: usize = 3;
const NODES: usize = 40;
const ADDRS: u8 = 12;

struct Member {
    key: PublicKey,
    addr: IpAddr,
    next: Duration,
    done: bool,
}

#[derive(Debug)]
enum Fault {
    Isolate(usize),
    Crash(usize),
    Cut(usize, usize),
}

fn node_key(i: usize) -> PublicKey {
    let mut k = [0u8; 32];
    k[0] = i as u8 + 1;
    k[1] = 0x77;
    k
}

/// Run one seed; returns the history of answers (hub, key byte, answer,
/// time) for replay checks.
fn run(seed: u64) -> (Vec<String>, usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(400))
        .tick_duration(Duration::from_millis(1))
        .tcp_capacity(1 << 16)
        .rng_seed(seed)
        .build();
    let hubs = Hubs::build(&mut sim, HUBS, Duration::from_secs(1), seed);
    let mut members: Vec<Member> = (0..NODES)
        .map(|i| Member {
            key: node_key(i),
            addr: IpAddr::from([10, 77, 0, rng.random_range(1..=ADDRS)]),
            // Joins spread over the faulty minute.
            next: Duration::from_millis(rng.random_range(500..55_000)),
            done: false,
        })
        .collect();
    let faults_end = Duration::from_secs(60);
    let mut next_fault = Duration::from_secs(3);
    let mut active: Option<(Fault, Duration)> = None;
    let mut seen = 0usize;
    let mut revoke_asked = 0;
    let mut history = Vec::new();
    let hosts: Vec<String> = (0..HUBS).map(hub_host).collect();
    loop {
        sim.step().expect("simulation step");
        let now = sim.elapsed();
        // Faults: one at a time, each for a drawn time, none after `faults_end`.
        if let Some((f, until)) = &active {
            if now >= *until {
                match f {
                    Fault::Isolate(h) => {
                        for o in (0..HUBS).filter(|o| o != h) {
                            sim.repair(hosts[*h].as_str(), hosts[o].as_str());
                        }
                    }
                    Fault::Crash(h) => {
                        sim.bounce(hosts[*h].as_str());
                        hubs.probes[*h].up.store(true, Ordering::SeqCst);
                    }
                    Fault::Cut(a, b) => sim.repair(hosts[*a].as_str(), hosts[*b].as_str()),
                }
                history.push(format!("{:?} healed at {:?}", f, now));
                active = None;
                next_fault = now + Duration::from_millis(rng.random_range(500..3000));
            }
        } else if now >= next_fault && now < faults_end {
            let h = rng.random_range(0..HUBS);
            let f = match rng.random_range(0..3) {
                0 => {
                    for o in (0..HUBS).filter(|o| *o != h) {
                        sim.partition(hosts[h].as_str(), hosts[o].as_str());
                    }
                    // Ask the cut-off hub to revoke an acknowledged node.
                    if revoke_asked < 2 {
                        if let Some(m) = members.iter().find(|m| m.done) {
                            hubs.probes[h].revoke.lock().unwrap().push(m.key);
                            revoke_asked += 1;
                        }
                    }
                    Fault::Isolate(h)
                }
                1 => {
                    sim.crash(hosts[h].as_str());
                    hubs.probes[h].up.store(false, Ordering::SeqCst);
                    Fault::Crash(h)
                }
                _ => {
                    let o = (h + 1 + rng.random_range(0..HUBS - 1)) % HUBS;
                    sim.partition(hosts[h].as_str(), hosts[o].as_str());
                    Fault::Cut(h, o)
                }
            };
            let d = Duration::from_millis(rng.random_range(1000..6000));
            history.push(format!("{:?} at {:?} for {:?}", f, now, d));
            active = Some((f, now + d));
        }
        // A revocation asked at a hub of the majority, mid-run.
        if revoke_asked == 2 && now >= Duration::from_secs(40) {
            let asked = members.iter().filter(|m| m.done).nth(3).map(|m| m.key);
            let up = (0..HUBS).find(|h| {
                hubs.probes[*h].up.load(Ordering::SeqCst)
                    && !matches!(active, Some((Fault::Isolate(x), _)) if x == *h)
            });
            if let (Some(k), Some(h)) = (asked, up) {
                hubs.probes[h].revoke.lock().unwrap().push(k);
                revoke_asked += 1;
            }
        }
        // Members: register through a random hub until answered.
        {
            let answers = hubs.answers.lock().unwrap();
            for a in &answers[seen..] {
                let Some(m) = members.iter_mut().find(|m| m.key == a.to) else {
                    continue;
                };
                match &a.msg {
                    Control::RegisterAck { .. } => m.done = true,
                    Control::Nack { code, .. } if *code != ErrorCode::Busy => m.done = true,
                    _ => {}
                }
            }
            seen = answers.len();
        }
        // Answered members register again now and then, as peers do after
        // a hub restart (a hub with a stale book answers those alone).
        for m in members.iter_mut().filter(|m| now >= m.next) {
            let h = rng.random_range(0..HUBS);
            if hubs.probes[h].up.load(Ordering::SeqCst) {
                hubs.probes[h]
                    .inbox
                    .lock()
                    .unwrap()
                    .push((m.key, vec![m.addr]));
            }
            let wait = if m.done { 3000..10_000 } else { 300..900 };
            m.next = now + Duration::from_millis(rng.random_range(wait));
        }
        // After the faults: done once everyone has an answer and the books agree.
        if now > faults_end && active.is_none() {
            let books = hubs.books();
            let agree = books.iter().all(|b| b.is_some() && *b == books[0]);
            let answered = members.iter().all(|m| m.done);
            let revokes_done = hubs.revocations.lock().unwrap().len() == revoke_asked;
            if agree && answered && revokes_done {
                break;
            }
            assert!(
                now < faults_end + Duration::from_secs(90),
                "seed {seed}: no agreement 90 s after the faults ended: answered {}/{}, books {:?}\n{}",
                members.iter().filter(|m| m.done).count(),
                NODES,
                books.iter().map(|b| b.as_ref().map(|b| (b.owners.len(), b.revoked.len()))).collect::<Vec<_>>(),
                history.join("\n")
            );
        }
    }
    // Let the last pushes settle, then check the history.
    for _ in 0..3000 {
        sim.step().expect("simulation step");
    }
    let book = hubs.books()[0].clone().expect("a book");
    for (h, b) in hubs.books().iter().enumerate() {
        assert_eq!(
            b.as_deref(),
            Some(&*book),
            "seed {seed}: hub {h}'s book differs\n{}",
            history.join("\n")
        );
    }
    let answers = hubs.answers.lock().unwrap().clone();
    let addr_of: BTreeMap<PublicKey, IpAddr> = members.iter().map(|m| (m.key, m.addr)).collect();
    let mut acked: BTreeMap<IpAddr, BTreeSet<PublicKey>> = BTreeMap::new();
    let (mut in_use, mut busy) = (0, 0);
    for a in &answers {
        match &a.msg {
            Control::RegisterAck { .. } => {
                acked.entry(addr_of[&a.to]).or_default().insert(a.to);
            }
            Control::Nack {
                code: ErrorCode::AddressInUse,
                ..
            } => in_use += 1,
            Control::Nack {
                code: ErrorCode::Busy,
                ..
            } => busy += 1,
            _ => {}
        }
    }
    for (addr, keys) in &acked {
        let live: Vec<&PublicKey> = keys.iter().filter(|k| !book.revoked.contains(*k)).collect();
        assert!(
            live.len() <= 1,
            "seed {seed}: {addr} was acknowledged to {} keys\n{}",
            live.len(),
            history.join("\n")
        );
        for k in live {
            assert_eq!(
                book.owners.get(addr),
                Some(k),
                "seed {seed}: the acknowledged owner of {addr} is lost\n{}",
                history.join("\n")
            );
        }
    }
    assert!(
        in_use > 0,
        "seed {seed}: the nodes never contended for an address"
    );
    for r in hubs.revocations.lock().unwrap().iter() {
        if r.result.is_ok() {
            assert!(
                book.revoked.contains(&r.key),
                "seed {seed}: revocation at hub {} was confirmed but is not in the book",
                r.hub
            );
        }
    }
    for (h, p) in hubs.probes.iter().enumerate() {
        let s = p.status.lock().unwrap().clone().expect("hub status");
        let c = s.cluster.expect("cluster status");
        assert!(c.leader.is_some(), "seed {seed}: hub {h} knows no leader");
        for k in &book.revoked {
            assert!(
                !s.members.iter().any(|m| m.key == short_key(k)),
                "seed {seed}: hub {h} still lists a revoked key"
            );
        }
    }
    eprintln!(
        "seed {seed}: {} answers, {busy} busy, {} refused as in use, {} owners, {} revoked, revocations {:?}, {} faults",
        answers.len(),
        in_use,
        book.owners.len(),
        book.revoked.len(),
        hubs.revocations
            .lock()
            .unwrap()
            .iter()
            .map(|r| (r.hub, r.result.is_ok()))
            .collect::<Vec<_>>(),
        history.len()
    );
    let history = answers
        .iter()
        .map(|a| format!("{} {} {:?} {:?}", a.hub, a.to[0], a.msg, a.at))
        .collect();
    (history, busy)
}

#[test]
fn three_hubs_agree_on_owners_and_revocations_under_partitions_and_crashes() {
    let _guard = fastmesh_tests::watchdog(
        "three_hubs_agree_on_owners_and_revocations_under_partitions_and_crashes",
        std::time::Duration::from_secs(600),
    );
    let mut busy = 0;
    for seed in [1, 2, 3] {
        busy += run(seed).1;
    }
    // A hub cut off for longer than a proposal waits (4 s) answers "busy".
    assert!(
        busy > 0,
        "no registration ever met a hub without a majority"
    );
}

#[test]
fn a_seed_replays_the_same_history() {
    let _guard = fastmesh_tests::watchdog(
        "a_seed_replays_the_same_history",
        std::time::Duration::from_secs(600),
    );
    let a = run(4).0;
    let b = run(4).0;
    assert!(a.len() > 40);
    assert_eq!(a, b, "the same seed gave two histories");
}

/// Step until `cond` holds, at most `limit` of simulated time.
fn step_until(sim: &mut turmoil::Sim<'_>, limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = sim.elapsed() + limit;
    while sim.elapsed() < end {
        if cond() {
            return true;
        }
        sim.step().expect("simulation step");
    }
    cond()
}

#[test]
fn an_allow_list_reloaded_at_one_hub_applies_at_every_hub() {
    let _guard = fastmesh_tests::watchdog(
        "an_allow_list_reloaded_at_one_hub_applies_at_every_hub",
        std::time::Duration::from_secs(600),
    );
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(120))
        .tick_duration(Duration::from_millis(1))
        .rng_seed(5)
        .build();
    let hubs = Hubs::build(&mut sim, HUBS, Duration::from_secs(1), 5);
    let (k1, k2, k3) = (node_key(1), node_key(2), node_key(3));
    let answer_to = |hubs: &Hubs, key: PublicKey, hub: usize| -> Option<Control> {
        let a = hubs.answers.lock().unwrap();
        a.iter()
            .rev()
            .find(|a| a.to == key && a.hub == hub)
            .map(|a| a.msg.clone())
    };
    let register = |hubs: &Hubs, key: PublicKey, hub: usize, last: u8| {
        hubs.probes[hub]
            .inbox
            .lock()
            .unwrap()
            .push((key, vec![IpAddr::from([10, 77, 0, last])]));
    };
    let acked = |m: Option<Control>| matches!(m, Some(Control::RegisterAck { .. }));
    assert!(step_until(&mut sim, Duration::from_secs(20), || {
        hubs.probes.iter().all(|p| {
            p.status
                .lock()
                .unwrap()
                .as_ref()
                .is_some_and(|s| s.cluster.as_ref().is_some_and(|c| c.leader.is_some()))
        })
    }));
    register(&hubs, k1, 0, 1);
    register(&hubs, k2, 2, 2);
    assert!(
        step_until(&mut sim, Duration::from_secs(10), || {
            acked(answer_to(&hubs, k1, 0)) && acked(answer_to(&hubs, k2, 2))
        }),
        "both nodes admitted before any allow-list"
    );
    // An operator reloads hub 1 with a list that names only k1.
    hubs.probes[1]
        .allow
        .lock()
        .unwrap()
        .push(Some(BTreeSet::from([k1])));
    let listed = Some(BTreeSet::from([k1]));
    assert!(
        step_until(&mut sim, Duration::from_secs(10), || {
            hubs.books()
                .iter()
                .all(|b| b.as_ref().is_some_and(|b| b.allowed == listed))
        }),
        "every hub's book has the list"
    );
    // Hub 2 drops its unlisted member and refuses a new unlisted key.
    assert!(
        step_until(&mut sim, Duration::from_secs(5), || {
            hubs.probes[2]
                .status
                .lock()
                .unwrap()
                .as_ref()
                .is_some_and(|s| !s.members.iter().any(|m| m.key == short_key(&k2)))
        }),
        "hub 2 still lists a member the allow-list leaves out"
    );
    register(&hubs, k3, 2, 3);
    register(&hubs, k1, 2, 1);
    assert!(step_until(&mut sim, Duration::from_secs(10), || {
        acked(answer_to(&hubs, k1, 2))
            && matches!(
                answer_to(&hubs, k3, 2),
                Some(Control::Nack {
                    code: ErrorCode::NotListed,
                    ..
                })
            )
    }));
    // A reload at a hub whose own file did not change (hub 0 never had a
    // list) proposes nothing: the list stays.
    hubs.probes[0].allow.lock().unwrap().push(None);
    step_until(&mut sim, Duration::from_secs(3), || false);
    assert!(hubs
        .books()
        .iter()
        .all(|b| b.as_ref().is_some_and(|b| b.allowed == listed)));
    // Hub 1's operator removes the list: anyone is admitted again, everywhere.
    hubs.probes[1].allow.lock().unwrap().push(None);
    assert!(step_until(&mut sim, Duration::from_secs(10), || {
        hubs.books().iter().all(|b| {
            b.as_ref()
                .is_some_and(|b| b.allow_set && b.allowed.is_none())
        })
    }));
    register(&hubs, k3, 1, 3);
    assert!(step_until(&mut sim, Duration::from_secs(10), || acked(
        answer_to(&hubs, k3, 1)
    )));
}
