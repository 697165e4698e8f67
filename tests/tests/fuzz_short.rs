//! A short run of every fuzz target (the long runs and their totals are in
//! docs/security.md). A panic fails the test with the target and the input;
//! each target must also have reached the code under test: some of its
//! mutated inputs were refused and counted there.

#[test]
fn every_fuzz_target_survives_a_short_run() {
    for (target, n) in [
        ("frame", 200_000),
        ("control", 100_000),
        ("ip", 200_000),
        ("node", 100_000),
        ("inner", 50_000),
        ("handshake", 3_000),
    ] {
        let s = fastmesh_tests::fuzz::run(target, n, 42).unwrap_or_else(|e| panic!("{e}"));
        println!("{target}: {s:?}");
        assert_eq!(s.inputs, n, "{target}");
        assert!(s.rejected > 0, "{target}: no input was refused: {s:?}");
    }
}

#[test]
fn an_unknown_target_is_an_error() {
    assert_eq!(
        fastmesh_tests::fuzz::run("nope", 1, 1),
        Err(fastmesh_tests::fuzz::FuzzError::UnknownTarget(
            "nope".into()
        ))
    );
}
