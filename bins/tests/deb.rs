//! The Debian package: `cargo deb` (cargo-deb, installed by .ci/run) builds
//! it from the release binary; its files, modes, configuration files and
//! service units are what docs/deploy.md promises, and the default configs
//! parse as the binary reads them.

use std::process::Command;

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().expect("run command");
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn the_deb_holds_the_binary_units_and_configs() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let have = Command::new(&cargo)
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        have,
        "cargo-deb is missing: cargo install cargo-deb --locked (.ci/run does)"
    );
    let out = run(Command::new(&cargo).current_dir(root).args([
        "deb",
        "-p",
        "fastmesh-bins",
        "--locked",
    ]));
    let deb = out
        .lines()
        .rev()
        .find(|l| l.trim_end().ends_with(".deb"))
        .unwrap_or_else(|| panic!("no .deb path in cargo deb's output: {out}"))
        .trim()
        .to_string();
    let list = run(Command::new("dpkg-deb").args(["-c", &deb]));
    for (path, mode) in [
        ("./usr/bin/fastmesh", "-rwxr-xr-x"),
        ("./lib/systemd/system/fastmesh-hub.service", "-rw-r--r--"),
        ("./lib/systemd/system/fastmesh-peer.service", "-rw-r--r--"),
        ("./etc/fastmesh/hub.toml", "-rw-r--r--"),
        ("./etc/fastmesh/peer.toml", "-rw-r--r--"),
        ("./usr/share/doc/fastmesh/deploy.md", "-rw-r--r--"),
    ] {
        assert!(
            list.lines()
                .any(|l| l.starts_with(mode) && l.ends_with(path)),
            "{path} ({mode}) missing:\n{list}"
        );
    }
    let fields = run(Command::new("dpkg-deb").args(["-f", &deb, "Package", "Section", "Depends"]));
    assert!(fields.contains("Package: fastmesh"), "{fields}");
    assert!(fields.contains("Section: net"), "{fields}");
    assert!(fields.contains("libc6"), "{fields}");
    let dir = std::env::temp_dir().join(format!("fastmesh-deb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    run(Command::new("dpkg-deb").args(["-x", &deb, dir.to_str().unwrap()]));
    let conffiles = run(Command::new("dpkg-deb").args(["--info", &deb, "conffiles"]));
    assert!(
        conffiles.contains("/etc/fastmesh/hub.toml")
            && conffiles.contains("/etc/fastmesh/peer.toml")
    );
    let unit =
        |name: &str| std::fs::read_to_string(dir.join("lib/systemd/system").join(name)).unwrap();
    let peer = unit("fastmesh-peer.service");
    assert!(
        peer.contains("CapabilityBoundingSet=CAP_NET_ADMIN\n"),
        "{peer}"
    );
    assert!(
        peer.contains("AmbientCapabilities=CAP_NET_ADMIN\n"),
        "{peer}"
    );
    let hub = unit("fastmesh-hub.service");
    assert!(
        hub.contains("CapabilityBoundingSet=\n") && hub.contains("StateDirectory=fastmesh"),
        "{hub}"
    );
    for u in [&peer, &hub] {
        assert!(u.contains("ExecReload=/bin/kill -HUP $MAINPID"), "{u}");
        assert!(u.contains("Restart=on-failure"), "{u}");
    }
    // The packaged binary runs, and rejects nothing in the default configs
    // but what an operator must fill in (keys that do not exist yet).
    let bin = dir.join("usr/bin/fastmesh");
    let o = Command::new(&bin)
        .args([
            "hub",
            "--config",
            dir.join("etc/fastmesh/hub.toml").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("/etc/fastmesh/hub.key"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
