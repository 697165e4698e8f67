//! The command line without privileges: help, keys, config errors.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn fastmesh(args: &[&str]) -> (Option<i32>, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_fastmesh"))
        .args(args)
        .output()
        .expect("run fastmesh");
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("fastmesh-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn help_explains_first_steps() {
    let (code, out, _) = fastmesh(&["--help"]);
    assert_eq!(code, Some(0));
    for w in ["keygen", "hub", "peer", "status", "First steps"] {
        assert!(out.contains(w), "--help lacks {w}:\n{out}");
    }
    let (_, out, _) = fastmesh(&["peer", "--help"]);
    for w in [
        "--hub",
        "--address",
        "--address6",
        "--mtu",
        "--profile",
        "--key",
        "--tun",
        "--listen",
    ] {
        assert!(out.contains(w), "peer --help lacks {w}");
    }
    // The MTU default it names is the one the code uses.
    let mtu = format!("default: {}", transport::node::tun_mtu_for(1452));
    assert!(out.contains(&mtu), "peer --help does not say {mtu}:\n{out}");
}

#[test]
fn keygen_writes_0600_and_pubkey_matches() {
    let d = tmp("keygen");
    let k = d.join("a.key");
    let (code, out, err) = fastmesh(&["keygen", "--out", k.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    let public = out.trim().to_string();
    assert_eq!(public.len(), 64);
    let mode = std::fs::metadata(&k).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let (_, out, _) = fastmesh(&["pubkey", k.to_str().unwrap()]);
    assert_eq!(out.trim(), public);
    // No silent overwrite.
    let (code, _, err) = fastmesh(&["keygen", "--out", k.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("refusing to overwrite"), "{err}");
    // A world-readable key is refused with the fix.
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, err) = fastmesh(&["pubkey", k.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("readable by others") && err.contains("chmod 600"),
        "{err}"
    );
    // Garbage is not a key.
    let g = d.join("g.key");
    std::fs::write(&g, "hello").unwrap();
    std::fs::set_permissions(&g, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, _, err) = fastmesh(&["pubkey", g.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("not a fastmesh key"), "{err}");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn config_file_errors_are_clear() {
    let d = tmp("config");
    let c = d.join("peer.toml");
    std::fs::write(&c, "adress = \"10.0.0.1/24\"\n").unwrap();
    let (code, _, err) = fastmesh(&["peer", "--config", c.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("unknown field") && err.contains("adress"),
        "{err}"
    );
    let (code, _, err) = fastmesh(&["peer", "--config", d.join("missing.toml").to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("cannot read config file"), "{err}");
    // Missing essentials are named.
    std::fs::write(&c, "address = \"10.0.0.1/24\"\n").unwrap();
    let (code, _, err) = fastmesh(&["peer", "--config", c.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no hub"), "{err}");
    let (code, _, err) = fastmesh(&["status", "--control", d.join("none.sock").to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no fastmesh node answers"), "{err}");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn hub_allow_list_errors_are_clear() {
    let d = tmp("allow");
    let bad = d.join("allow");
    std::fs::write(&bad, "# members\nnot-a-key\n").unwrap();
    let args = |allow: &std::path::Path| {
        vec![
            "hub".to_string(),
            "--key".into(),
            d.join("k").to_string_lossy().into_owned(),
            "--network-key".into(),
            d.join("n").to_string_lossy().into_owned(),
            "--allow".into(),
            allow.to_string_lossy().into_owned(),
        ]
    };
    let a = args(&bad);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let (code, _, err) = fastmesh(&a);
    assert_eq!(code, Some(1));
    assert!(err.contains(":2: not a public key"), "{err}");
    std::fs::write(&bad, "# nobody\n").unwrap();
    let (code, _, err) = fastmesh(&a);
    assert_eq!(code, Some(1));
    assert!(err.contains("lists no keys"), "{err}");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn status_watch_and_metrics_errors_are_clear() {
    // No node: the watch ends at once with the reason, not a blank screen.
    let (code, _, err) = fastmesh(&["status", "--watch", "--control", "/nonexistent/fm.sock"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no fastmesh node answers"), "{err}");
    let (code, _, err) = fastmesh(&["ping", "peer2", "--control", "/nonexistent/fm.sock"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no fastmesh node answers"), "{err}");
    // A metrics address that cannot be bound stops the hub before it starts.
    let d = tmp("metrics");
    let (hub, net) = (d.join("hub.key"), d.join("net.key"));
    for k in [&hub, &net] {
        assert_eq!(
            fastmesh(&["keygen", "--out", k.to_str().unwrap()]).0,
            Some(0)
        );
    }
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, _, err) = fastmesh(&[
        "hub",
        "--key",
        hub.to_str().unwrap(),
        "--network-key",
        net.to_str().unwrap(),
        "--data-dir",
        d.join("data").to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--control",
        d.join("hub.sock").to_str().unwrap(),
        "--metrics",
        &addr,
    ]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains(&format!("cannot listen for metrics on {addr}")),
        "{err}"
    );
    let (code, _, err) = fastmesh(&["status", "--json", "--watch"]);
    assert_eq!(code, Some(2), "--json and --watch conflict: {err}");
}
