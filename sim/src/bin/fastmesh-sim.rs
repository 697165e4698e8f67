//! `fastmesh-sim chaos`: random fault schedules against a simulated mesh.
//!
//!     fastmesh-sim chaos --seed S [--only I,J,..] [--no-shrink]
//!     fastmesh-sim chaos --seeds N [--from S]
//!     (both take --peers N --hubs H --faults K --window SECS, and --quick
//!     to run on sim::fabric::Quick instead of turmoil, --flows K to have
//!     each peer send to K others instead of all, --nat K to put peers
//!     0..K behind NATs whose mappings schedules may flush, --raft to have
//!     the hubs share one registry through Raft, --leave to have peers
//!     leave as on shutdown and join again)
//!     fastmesh-sim floor N
//!     fastmesh-sim world [--peers N] [--secs S] [--loss P] [--latency MS] [--probe-ms MS] [--turmoil]
//!
//! One seed prints its schedule and what the run found; on a violation it
//! shrinks the schedule (faults removed one at a time while the run still
//! fails) and prints the command that replays the small one. Many seeds
//! print one line each and a summary table. Exit status 1 on any violation.

use sim::chaos::{run, schedule, shrink, ChaosConfig, Outcome};
use sim::fabric::{Fabric, Quick};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// jemalloc: glibc's malloc took a tenth of a 100-peer world's time.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn usage() -> ExitCode {
    eprintln!(
        "usage: fastmesh-sim chaos (--seed S [--only I,J,..] [--no-shrink] | --seeds N [--from S])\n\
         \x20                        [--peers N] [--hubs H] [--faults K] [--window SECS] [--quick] [--raft] [--leave] [--flows K] [--nat K]"
    );
    ExitCode::from(2)
}

/// `fastmesh-sim floor N`: what turmoil costs with N hosts that only sleep
/// (one timer a second each), for 60 simulated seconds at its 1-ms step:
/// the floor under any turmoil world of that many hosts.
fn floor(args: &[String]) -> ExitCode {
    let Some(n) = args
        .first()
        .and_then(|a| a.parse::<usize>().ok())
        .filter(|n| (1..=250).contains(n))
    else {
        eprintln!("usage: fastmesh-sim floor HOSTS (1..250)");
        return ExitCode::from(2);
    };
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(70))
        .build();
    for i in 0..n {
        sim.host(format!("h{i}"), || async {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    let t = Instant::now();
    while sim.elapsed() < Duration::from_secs(60) {
        if let Err(e) = sim.step() {
            eprintln!("step: {e}");
            return ExitCode::FAILURE;
        }
    }
    println!(
        "turmoil, {n} idle hosts: 60 s simulated in {:.1} s wall",
        t.elapsed().as_secs_f64()
    );
    ExitCode::SUCCESS
}

/// `fastmesh-sim world`: how fast the simulator runs a mesh of N peers and
/// one hub (1-s heartbeats) that formed and then stays up for S simulated
/// seconds over links with the given loss and one-way latency.
fn world(args: &[String]) -> ExitCode {
    let (mut peers, mut secs, mut loss, mut latency) = (10usize, 60u64, 0.01f64, 10u64);
    let mut probe_ms = 1000u64;
    let mut use_turmoil = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--turmoil" {
            use_turmoil = true;
            continue;
        }
        let v = it.next().cloned().unwrap_or_default();
        let ok = match a.as_str() {
            "--peers" => v.parse().map(|x| peers = x).is_ok() && (2..=250).contains(&peers),
            "--secs" => v.parse().map(|x| secs = x).is_ok(),
            "--loss" => v.parse().map(|x| loss = x).is_ok() && (0.0..1.0).contains(&loss),
            "--latency" => v.parse().map(|x| latency = x).is_ok(),
            "--probe-ms" => v.parse().map(|x| probe_ms = x).is_ok(),
            _ => false,
        };
        if !ok {
            eprintln!("usage: fastmesh-sim world [--peers 2..250] [--secs S] [--loss 0..1] [--latency MS] [--probe-ms MS] [--turmoil]");
            return ExitCode::from(2);
        }
    }
    let limit = Duration::from_secs(120 + secs + 10);
    let probe_every = Duration::from_millis(probe_ms);
    let ok = if use_turmoil {
        let mut sim = turmoil::Builder::new()
            .simulation_duration(limit)
            .rng_seed(1)
            .build();
        world_in(&mut sim, "turmoil", peers, secs, loss, latency, probe_every)
    } else {
        let mut sim = Quick::new(Duration::from_millis(1), limit);
        let ok = world_in(&mut sim, "quick", peers, secs, loss, latency, probe_every);
        println!("  datagrams sent in all: {}", sim.net().sent());
        ok
    };
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn world_in(
    sim: &mut impl Fabric,
    fabric: &str,
    peers: usize,
    secs: u64,
    loss: f64,
    latency: u64,
    probe_every: Duration,
) -> bool {
    use sim::impair::LinkSpec;
    use sim::world::{World, WorldConfig};
    let dir = std::env::temp_dir().join(format!("fastmesh-world-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("{}: {e}", dir.display());
        return false;
    }
    let form_limit = Duration::from_secs(120);
    let mut w = World::build(
        sim,
        WorldConfig {
            peers,
            probe_every,
            memory_budget: transport::node::MEMORY_BUDGET,
            raft: false,
            on_demand: false,
            heartbeat: Duration::from_secs(1),
            spec: LinkSpec {
                loss,
                ..LinkSpec::latency(Duration::from_millis(latency))
            },
            seed: 1,
            store_dir: dir,
            hubs: 1,
            nat: vec![],
        },
    );
    let t = Instant::now();
    let formed = w.run_until(sim, form_limit, |w| w.all_connected());
    let form_wall = t.elapsed();
    let Some(formed) = formed else {
        eprintln!("the mesh of {peers} did not form within {form_limit:?}");
        return false;
    };
    let t = Instant::now();
    w.run_until(sim, Duration::from_secs(secs), |_| false);
    let run_wall = t.elapsed();
    let up = w
        .peers
        .iter()
        .filter(|p| p.status().is_some_and(|s| s.peers.len() == peers - 1))
        .count();
    println!(
        "{fabric}, {peers} peers: formed in {:.1} s simulated ({:.1} s wall); then {secs} s simulated in {:.1} s wall; {up} of {peers} peers list all others at the end",
        formed.as_secs_f64(),
        form_wall.as_secs_f64(),
        run_wall.as_secs_f64()
    );
    up == peers
}

fn line(seed: u64, o: &Outcome, wall: Duration) -> String {
    format!(
        "seed {seed}: {} faults, {:.0} s simulated in {:.1} s, {} packets checked, {} missing from reliable flows, inner TCP {} completed / {} broken / {} KB checked, most held {} KB,{} recovered {}, {}",
        o.faults,
        o.simulated.as_secs_f64(),
        wall.as_secs_f64(),
        o.delivered,
        o.gaps,
        o.tcp_completed,
        o.tcp_broken,
        o.tcp_bytes / 1000,
        o.max_held / 1000,
        if o.raft_applied > 0 {
            format!(" Raft log applied to {},", o.raft_applied)
        } else {
            String::new()
        },
        o.recovered_after
            .map_or("never".to_string(), |d| format!("after {:.1} s", d.as_secs_f64())),
        if o.violations.is_empty() {
            "ok".to_string()
        } else {
            format!("{} VIOLATIONS", o.violations.len())
        }
    )
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("world") {
        return world(&args[1..]);
    }
    if args.first().map(String::as_str) == Some("floor") {
        return floor(&args[1..]);
    }
    if args.first().map(String::as_str) != Some("chaos") {
        return usage();
    }
    let mut cfg = ChaosConfig::default();
    let (mut seed, mut seeds, mut from, mut only, mut no_shrink) = (None, None, 1u64, None, false);
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().unwrap_or_default();
        let num = |s: String| s.parse::<u64>().ok();
        match a.as_str() {
            "--seed" => seed = num(val()),
            "--seeds" => seeds = num(val()),
            "--from" => match num(val()) {
                Some(v) => from = v,
                None => return usage(),
            },
            "--only" => {
                let v: Option<Vec<usize>> = val().split(',').map(|x| x.parse().ok()).collect();
                match v {
                    Some(v) => only = Some(v),
                    None => return usage(),
                }
            }
            "--no-shrink" => no_shrink = true,
            "--quick" => cfg.quick = true,
            "--raft" => cfg.raft = true,
            "--leave" => cfg.leave = true,
            "--flows" => match num(val()) {
                Some(v) if v >= 1 => cfg.flows_per_peer = Some(v as usize),
                _ => return usage(),
            },
            "--peers" => match num(val()) {
                Some(v) if v >= 3 => cfg.peers = v as usize,
                _ => return usage(),
            },
            "--hubs" => match num(val()) {
                Some(v) if v >= 1 => cfg.hubs = v as usize,
                _ => return usage(),
            },
            "--faults" => match num(val()) {
                Some(v) if v >= 1 => cfg.faults = v as usize,
                _ => return usage(),
            },
            "--nat" => match num(val()) {
                Some(v) => cfg.nat_peers = v as usize,
                _ => return usage(),
            },
            "--window" => match num(val()) {
                Some(v) if v >= 2 => cfg.window = Duration::from_secs(v),
                _ => return usage(),
            },
            _ => return usage(),
        }
    }
    match (seed, seeds) {
        (Some(s), None) => {
            let full = schedule(&cfg, s);
            let idx: Vec<usize> = only.unwrap_or_else(|| (0..full.len()).collect());
            if idx.iter().any(|&i| i >= full.len()) {
                eprintln!("--only: seed {s} has {} faults", full.len());
                return ExitCode::from(2);
            }
            let sched: Vec<_> = idx.iter().map(|&i| full[i].clone()).collect();
            println!(
                "seed {s}, {} peers, {} hubs, schedule:",
                cfg.peers, cfg.hubs
            );
            for (i, f) in idx.iter().zip(&sched) {
                println!("  [{i}] {f}");
            }
            let t = Instant::now();
            let o = run(&cfg, s, &sched);
            println!("{}", line(s, &o, t.elapsed()));
            for v in &o.violations {
                println!("  {v}");
            }
            if o.violations.is_empty() {
                return ExitCode::SUCCESS;
            }
            if !no_shrink && sched.len() > 1 {
                println!("shrinking...");
                let keep = shrink(&cfg, s, &sched);
                let kept: Vec<usize> = keep.iter().map(|&k| idx[k]).collect();
                println!("still fails with {} of {} faults:", kept.len(), sched.len());
                for &k in &kept {
                    println!("  [{k}] {}", full[k]);
                }
                let list: Vec<String> = kept.iter().map(|k| k.to_string()).collect();
                println!(
                    "replay: fastmesh-sim chaos --seed {s} --peers {} --hubs {} --faults {} --window {}{}{}{}{}{} --only {}",
                    cfg.peers,
                    cfg.hubs,
                    cfg.faults,
                    cfg.window.as_secs(),
                    if cfg.quick { " --quick" } else { "" },
                    if cfg.raft { " --raft" } else { "" },
                    if cfg.leave { " --leave" } else { "" },
                    cfg.flows_per_peer.map(|k| format!(" --flows {k}")).unwrap_or_default(),
                    if cfg.nat_peers > 0 { format!(" --nat {}", cfg.nat_peers) } else { String::new() },
                    list.join(",")
                );
            }
            ExitCode::FAILURE
        }
        (None, Some(n)) => {
            let (mut faults, mut simulated, mut bad) = (0usize, Duration::ZERO, Vec::new());
            let (mut completed, mut broken) = (0u64, 0u64);
            let t = Instant::now();
            for s in from..from + n {
                let t1 = Instant::now();
                let o = run(&cfg, s, &schedule(&cfg, s));
                println!("{}", line(s, &o, t1.elapsed()));
                for v in o.violations.iter().take(3) {
                    println!("  {v}");
                }
                faults += o.faults;
                simulated += o.simulated;
                completed += o.tcp_completed;
                broken += o.tcp_broken;
                if !o.violations.is_empty() {
                    bad.push(s);
                }
            }
            println!();
            println!("| seeds run | faults injected | simulated hours | wall s | inner TCP completed / broken | seeds with violations |");
            println!("|---:|---:|---:|---:|---:|---|");
            println!(
                "| {n} | {faults} | {:.2} | {:.0} | {completed} / {broken} | {} |",
                simulated.as_secs_f64() / 3600.0,
                t.elapsed().as_secs_f64(),
                if bad.is_empty() {
                    "none".to_string()
                } else {
                    format!("{bad:?}")
                }
            );
            if bad.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        _ => usage(),
    }
}
