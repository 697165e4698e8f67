//! A short run of every fuzz target (the long runs and their totals are in
//! docs/security.md). A crash prints the input and fails the run.

#[test]
fn every_fuzz_target_survives_a_short_run() {
    for (target, n) in [
        ("frame", 200_000),
        ("control", 100_000),
        ("ip", 200_000),
        ("node", 100_000),
        ("handshake", 3_000),
    ] {
        let done = fastmesh_tests::fuzz::run(target, n, 42);
        assert!(done >= n, "{target}: {done}");
    }
}
