//! `fastmesh-fuzz`: runs the seeded mutation fuzzer of `fastmesh_tests::fuzz`
//! (used where cargo-fuzz cannot run: it needs a nightly toolchain).
//!
//!     fastmesh-fuzz frame|control|ip|node|inner|handshake|all COUNT [SEED]

use fastmesh_tests::fuzz::{run, TARGETS};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!(
            "usage: fastmesh-fuzz {}|all COUNT [SEED]",
            TARGETS.join("|")
        );
        std::process::exit(2);
    }
    let count: u64 = args[1].parse().expect("COUNT");
    let seed: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    // Silence the default panic message; crashes are reported by `crash`.
    std::panic::set_hook(Box::new(|_| {}));
    let targets: Vec<&str> = if args[0] == "all" {
        TARGETS.to_vec()
    } else {
        vec![args[0].as_str()]
    };
    for t in targets {
        let start = Instant::now();
        let s = match run(t, count, seed) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{e} (seed {seed})");
                std::process::exit(1);
            }
        };
        println!(
            "{t}: {} inputs ({} refused and counted), 0 crashes, {:.1} s ({:.0} inputs/s), seed {seed}",
            s.inputs,
            s.rejected,
            start.elapsed().as_secs_f64(),
            s.inputs as f64 / start.elapsed().as_secs_f64()
        );
    }
}
