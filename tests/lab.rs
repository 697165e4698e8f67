//! A network-namespace lab for end-to-end tests, the demo and the benchmark:
//! a router namespace joined by veth pairs to one namespace per node (node 0
//! is the hub), running the real `fastmesh` binary. Everything the lab creates
//! (namespaces, processes, files) is removed when it is dropped, also when a
//! test panics.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// UDP port of every node.
pub const PORT: u16 = 4800;

/// The `fastmesh` binary: `$FASTMESH_BIN`, or next to the running executable
/// (target/<profile>/ or its deps/ directory).
pub fn fastmesh_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("FASTMESH_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().map(Path::to_path_buf);
    while let Some(d) = dir {
        let cand = d.join("fastmesh");
        if cand.is_file() {
            return Ok(cand);
        }
        dir = d.parent().map(Path::to_path_buf);
        if dir.as_ref().is_some_and(|d| d.ends_with("target")) {
            break;
        }
    }
    bail!("fastmesh binary not found next to {}: run `cargo build --workspace` first, or set FASTMESH_BIN", exe.display())
}

/// Run a command; error with its output if it fails.
pub fn sh(cmd: &str, args: &[&str]) -> Result<Output> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(out)
}

/// `defaults` with `extra` applied: a flag already there takes the new
/// value, others are appended.
fn with_overrides(mut v: Vec<String>, extra: &[&str]) -> Vec<String> {
    let mut i = 0;
    while i < extra.len() {
        let flag = extra[i];
        let val = extra.get(i + 1).filter(|_| flag.starts_with("--"));
        match (v.iter().position(|x| x == flag), val) {
            (Some(j), Some(val)) if j + 1 < v.len() => {
                v[j + 1] = val.to_string();
                i += 2;
            }
            _ => {
                v.push(flag.to_string());
                i += 1;
            }
        }
    }
    v
}

/// Check what the lab needs: root, `ip`, `nft`.
pub fn preflight() -> Result<()> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the namespace lab needs root (network namespaces, TUN); run under sudo");
    }
    for t in ["ip", "nft"] {
        if Command::new(t).arg("-V").output().is_err() {
            bail!("`{t}` not found: install iproute2 and nftables (apt-get install iproute2 nftables)");
        }
    }
    Ok(())
}

/// One node of the lab.
#[derive(Debug, Clone)]
pub struct LabNode {
    /// Namespace name.
    pub ns: String,
    /// Underlay address.
    pub underlay: Ipv4Addr,
    /// IPv6 underlay address, once [`Lab::enable_ipv6`] gave it one.
    pub underlay6: Option<String>,
    /// Overlay address (peers only).
    pub overlay: Ipv4Addr,
    /// Overlay IPv6 address (peers only).
    pub overlay6: String,
    /// Control socket.
    pub control: PathBuf,
}

/// The lab.
pub struct Lab {
    /// Name prefix of everything created.
    pub prefix: String,
    /// Router namespace.
    pub router: String,
    /// Nodes; 0 is the hub.
    pub nodes: Vec<LabNode>,
    /// Working directory (keys, logs, hub data).
    pub dir: PathBuf,
    bin: PathBuf,
    procs: Vec<Option<Child>>,
    hub_pub: String,
    namespaces: Vec<String>,
    /// The WAN router process in the router namespace, if any.
    wan: Option<Child>,
}

/// A NAT in front of a node: a namespace between it and the router doing
/// nftables masquerade, with a stateful filter that drops unsolicited
/// inbound datagrams (as home routers do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// `masquerade`: Linux keeps the source port when it can, so one mapping
    /// serves every destination (endpoint-independent mapping); inbound
    /// passes only from where the node sent to (port-restricted cone).
    Cone,
    /// `masquerade fully-random`: a new random port for every destination
    /// (endpoint-dependent mapping, a "symmetric" NAT): hole punching fails.
    Random,
    /// [`Nat::Random`] that also runs a UPnP IGD daemon (Debian's miniupnpd)
    /// for its LAN, with the public-looking address 11.(200+net).`k`.2
    /// beside 10.(200+net).`k`.2 (miniupnpd refuses to map behind a private
    /// external address). Mappings it makes are DNAT rules.
    RandomUpnp,
    /// [`Nat::RandomUpnp`] with UPnP IGD off: the daemon answers only PCP
    /// and NAT-PMP (UDP 5351), as many routers do.
    RandomPmp,
    /// Behind the same NAT as node `j` (an earlier node), on its own LAN
    /// segment 172.16.`k`.0/24 that the NAT routes to node `j`'s segment
    /// without translation (two machines at one site).
    SameAs(usize),
}

impl Lab {
    /// Create the router and `peers + 1` node namespaces. `prefix` (≤ 5
    /// characters) and `net` (0..=50) keep concurrent labs apart.
    pub fn new(prefix: &str, net: u8, peers: usize) -> Result<Lab> {
        Lab::with_nat(prefix, net, peers, &[])
    }

    /// Like [`Lab::new`], with node `k` behind `nat[k]` where given (node 0,
    /// the hub, is never behind one). A NATed node has the private address
    /// 172.16.`k`.2; its NAT namespace `{prefix}-x{k}` holds the public
    /// address 10.(200+net).`k`.2.
    pub fn with_nat(prefix: &str, net: u8, peers: usize, nat: &[Option<Nat>]) -> Result<Lab> {
        preflight()?;
        let bin = fastmesh_bin()?;
        let dir =
            std::env::temp_dir().join(format!("fastmesh-lab-{prefix}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let router = format!("{prefix}-r");
        let mut lab = Lab {
            prefix: prefix.into(),
            router: router.clone(),
            nodes: Vec::new(),
            dir,
            bin,
            procs: Vec::new(),
            hub_pub: String::new(),
            namespaces: Vec::new(),
            wan: None,
        };
        // A leftover from a killed run would make `ip netns add` fail.
        lab.remove_namespaces_named(peers + 1);
        if nat.iter().any(Option::is_some) {
            sh("modprobe", &["nf_conntrack"]).ok();
        }
        sh("ip", &["netns", "add", &router])?;
        lab.namespaces.push(router.clone());
        lab.ns(&router, "ip", &["link", "set", "lo", "up"])?;
        lab.ns(&router, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        for k in 0..=peers {
            let node_nat = nat.get(k).copied().flatten().filter(|_| k > 0);
            let ns = format!("{prefix}-n{k}");
            sh("ip", &["netns", "add", &ns])?;
            lab.namespaces.push(ns.clone());
            if let Some(mode) = node_nat {
                lab.add_nat_node(net, k, &ns, mode)?;
                continue;
            }
            let sub = 200 + net;
            lab.link(
                (
                    &router,
                    &format!("{prefix}a{k}"),
                    Ipv4Addr::new(10, sub, k as u8, 1),
                ),
                (
                    &ns,
                    &format!("{prefix}b{k}"),
                    Ipv4Addr::new(10, sub, k as u8, 2),
                ),
            )?;
            lab.nodes.push(LabNode {
                ns,
                underlay: Ipv4Addr::new(10, sub, k as u8, 2),
                underlay6: None,
                overlay: Ipv4Addr::new(10, 99, net, k as u8),
                overlay6: format!("fd99:{net}::{k}"),
                control: lab.dir.join(format!("n{k}.sock")),
            });
            lab.procs.push(None);
        }
        // Keys.
        lab.fastmesh(&["keygen", "--out", &lab.path("network.key")])?;
        let out = lab.fastmesh(&["keygen", "--out", &lab.path("n0.key")])?;
        lab.hub_pub = String::from_utf8_lossy(&out.stdout).trim().to_string();
        for k in 1..=peers {
            lab.fastmesh(&["keygen", "--out", &lab.path(&format!("n{k}.key"))])?;
        }
        Ok(lab)
    }

    fn remove_namespaces_named(&self, n: usize) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.router])
            .output();
        for k in 0..=n {
            for kind in ["n", "x", "l"] {
                let _ = Command::new("ip")
                    .args(["netns", "del", &format!("{}-{kind}{k}", self.prefix)])
                    .output();
            }
        }
    }

    /// Node `k` in `ns` behind a NAT namespace: router <-> NAT <-> node.
    fn add_nat_node(&mut self, net: u8, k: usize, ns: &str, mode: Nat) -> Result<()> {
        if let Nat::SameAs(j) = mode {
            // A second LAN segment of node j's NAT: out through it like node
            // j, to node j's segment untranslated.
            let x = format!("{}-x{j}", self.prefix);
            self.lan_segment(net, k, &x, ns)?;
            let d = format!("{}d{k}", self.prefix);
            self.ns(
                &x,
                "nft",
                &[
                    "add", "rule", "ip", "fmnat", "pass", "iifname", &d, "accept",
                ],
            )?;
            return Ok(());
        }
        let prefix = self.prefix.clone();
        let router = self.router.clone();
        let x = format!("{prefix}-x{k}");
        sh("ip", &["netns", "add", &x])?;
        self.namespaces.push(x.clone());
        let sub = 200 + net;
        let (a, c) = (format!("{prefix}a{k}"), format!("{prefix}c{k}"));
        self.link(
            (&router, &a, Ipv4Addr::new(10, sub, k as u8, 1)),
            (&x, &c, Ipv4Addr::new(10, sub, k as u8, 2)),
        )?;
        self.ns(&x, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        self.lan_segment(net, k, &x, ns)?;
        let how = match mode {
            Nat::Random | Nat::RandomUpnp | Nat::RandomPmp => "masquerade fully-random",
            _ => "masquerade",
        };
        let d = format!("{prefix}d{k}");
        let upnp = matches!(mode, Nat::RandomUpnp | Nat::RandomPmp);
        // What the port-mapping daemon forwards (DNAT) passes the filter.
        let (pass_mapped, local_upnp) = if upnp {
            (
                "ct status dnat accept; ",
                format!("iifname \"{d}\" accept; "),
            )
        } else {
            ("", String::new())
        };
        let rules = format!(
            "table ip fmnat {{\n\
             chain post {{ type nat hook postrouting priority srcnat; policy accept; oifname \"{c}\" {how}; }}\n\
             chain local {{ type filter hook input priority filter; policy drop; ct state established,related accept; iifname \"lo\" accept; {local_upnp}}}\n\
             chain pass {{ type filter hook forward priority filter; policy drop; ct state established,related accept; {pass_mapped}iifname \"{d}\" accept; }}\n\
             }}\n"
        );
        let f = self.path(&format!("nat{k}.nft"));
        std::fs::write(&f, rules)?;
        self.ns(&x, "nft", &["-f", &f])?;
        if upnp {
            let igd = mode == Nat::RandomUpnp;
            self.start_upnp(&x, &router, sub, k, [&a, &c, &d], igd)?;
        }
        Ok(())
    }

    /// Run miniupnpd in NAT namespace `x` for LAN device `d`, external
    /// device `c` (router side `a`), and wait until it listens: UPnP IGD,
    /// NAT-PMP and PCP, or without `igd` only the latter two.
    fn start_upnp(
        &mut self,
        x: &str,
        router: &str,
        sub: u8,
        k: usize,
        [a, c, d]: [&str; 3],
        igd: bool,
    ) -> Result<()> {
        let public = format!("11.{sub}.{k}.2");
        self.ns(x, "ip", &["addr", "add", &format!("{public}/24"), "dev", c])?;
        self.ns(
            router,
            "ip",
            &["addr", "add", &format!("11.{sub}.{k}.1/24"), "dev", a],
        )?;
        // miniupnpd's nftables back end keeps its rules in these chains.
        let chains = "table inet filter {\n\
             chain miniupnpd { }\n\
             chain forward { type filter hook forward priority filter; policy accept; jump miniupnpd; }\n\
             chain prerouting_miniupnpd { }\n\
             chain postrouting_miniupnpd { }\n\
             chain pre { type nat hook prerouting priority dstnat; policy accept; jump prerouting_miniupnpd; }\n\
             chain post { type nat hook postrouting priority srcnat; policy accept; jump postrouting_miniupnpd; }\n\
             }\n";
        let f = self.path(&format!("upnp{k}.nft"));
        std::fs::write(&f, chains)?;
        self.ns(x, "nft", &["-f", &f])?;
        let conf = format!(
            "ext_ifname={c}\next_ip={public}\nlistening_ip={d}\nenable_upnp={}\n\
             enable_natpmp=yes\nsecure_mode=yes\nsystem_uptime=yes\n\
             uuid=3b9a1c4e-7d2f-4a8b-9c3d-5e6f7a8b9c{k:02x}\n\
             allow 1024-65535 172.16.{k}.0/24 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n",
            if igd { "yes" } else { "no" }
        );
        let cf = self.path(&format!("miniupnpd{k}.conf"));
        std::fs::write(&cf, conf)?;
        let log = std::fs::File::create(self.dir.join(format!("miniupnpd{k}.log")))?;
        let pid = self.path(&format!("miniupnpd{k}.pid"));
        Command::new("ip")
            .args([
                "netns",
                "exec",
                x,
                "miniupnpd",
                "-f",
                &cf,
                "-d",
                "-4",
                "-P",
                &pid,
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| anyhow!("miniupnpd (Debian package miniupnpd-nftables): {e}"))?;
        // Killed with the namespace's other processes when the lab drops.
        let port = if igd { ":1900 " } else { ":5351 " };
        let listening = || {
            Command::new("ip")
                .args(["netns", "exec", x, "ss", "-uln"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains(port))
                .unwrap_or(false)
        };
        self.wait(Duration::from_secs(10), |_| listening())
            .map_err(|e| {
                anyhow!(
                    "miniupnpd did not start: {e}\n{}",
                    self.log(&format!("miniupnpd{k}.log"))
                )
            })?;
        Ok(())
    }

    /// The LAN segment 172.16.`k`.0/24 between NAT namespace `x` (.1) and
    /// node `k` in `ns` (.2, default route via the NAT), and the node's record.
    fn lan_segment(&mut self, net: u8, k: usize, x: &str, ns: &str) -> Result<()> {
        self.link(
            (
                x,
                &format!("{}d{k}", self.prefix),
                Ipv4Addr::new(172, 16, k as u8, 1),
            ),
            (
                ns,
                &format!("{}b{k}", self.prefix),
                Ipv4Addr::new(172, 16, k as u8, 2),
            ),
        )?;
        self.nodes.push(LabNode {
            ns: ns.to_string(),
            underlay: Ipv4Addr::new(172, 16, k as u8, 2),
            underlay6: None,
            overlay: Ipv4Addr::new(10, 99, net, k as u8),
            overlay6: format!("fd99:{net}::{k}"),
            control: self.dir.join(format!("n{k}.sock")),
        });
        self.procs.push(None);
        Ok(())
    }

    /// A veth link from `up` (namespace, device, address) to `down`, each
    /// end with its address in a /24; `down` gets its loopback up and a
    /// default route via `up`'s address. Real links carry MTU-sized
    /// packets: both ends segment GSO/TSO aggregates, so loss rules drop
    /// packets one by one, not 64 KB at a time.
    fn link(&self, up: (&str, &str, Ipv4Addr), down: (&str, &str, Ipv4Addr)) -> Result<()> {
        let ((un, ud, ua), (dn, dd, da)) = (up, down);
        sh(
            "ip",
            &[
                "link", "add", ud, "netns", un, "type", "veth", "peer", "name", dd, "netns", dn,
            ],
        )?;
        for (n, d, a) in [(un, ud, ua), (dn, dd, da)] {
            self.ns(n, "ip", &["link", "set", d, "gso_max_segs", "1"])?;
            self.ns(n, "ip", &["addr", "add", &format!("{a}/24"), "dev", d])?;
            self.ns(n, "ip", &["link", "set", d, "up"])?;
        }
        self.ns(dn, "ip", &["link", "set", "lo", "up"])?;
        self.ns(
            dn,
            "ip",
            &["route", "add", "default", "via", &ua.to_string()],
        )?;
        Ok(())
    }

    /// IPv6 on the underlay: node `k` (not behind a NAT) gets
    /// fdc8:`net`:`k`::2/64, the router fdc8:`net`:`k`::1 and forwards
    /// IPv6. With `ipv4` false the router stops forwarding IPv4: nodes
    /// reach each other over IPv6 only (an IPv6-only provider).
    pub fn enable_ipv6(&mut self, net: u8, ipv4: bool) -> Result<()> {
        let router = self.router.clone();
        self.ns(
            &router,
            "sysctl",
            &["-qw", "net.ipv6.conf.all.forwarding=1"],
        )?;
        if !ipv4 {
            self.ns(&router, "sysctl", &["-qw", "net.ipv4.ip_forward=0"])?;
        }
        for k in 0..self.nodes.len() {
            let (a, b) = (
                format!("{}a{k}", self.prefix),
                format!("{}b{k}", self.prefix),
            );
            let ns = self.nodes[k].ns.clone();
            if self.ns(&ns, "ip", &["link", "show", &b]).is_err() {
                continue; // behind a NAT, or not a node of the router
            }
            let gw = format!("fdc8:{net}:{k}::1");
            let me = format!("fdc8:{net}:{k}::2");
            self.ns(
                &router,
                "ip",
                &["-6", "addr", "add", &format!("{gw}/64"), "dev", &a, "nodad"],
            )?;
            self.ns(
                &ns,
                "ip",
                &["-6", "addr", "add", &format!("{me}/64"), "dev", &b, "nodad"],
            )?;
            self.ns(&ns, "ip", &["-6", "route", "add", "default", "via", &gw])?;
            self.nodes[k].underlay6 = Some(me);
        }
        Ok(())
    }

    /// A LAN behind peer `k` (site to site): a namespace `{prefix}-l{k}`
    /// holding a host at 192.168.`net`.2 whose default route is peer `k`
    /// at 192.168.`net`.1; peer `k` forwards IP. The host is appended to
    /// [`Lab::nodes`] (its `overlay` is its LAN address, what other peers
    /// reach it by) and its index returned, so `exec` and `spawn` work.
    pub fn add_lan_host(&mut self, k: usize, net: u8) -> Result<usize> {
        let ns = format!("{}-l{k}", self.prefix);
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        sh("ip", &["netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        let node_ns = self.nodes[k].ns.clone();
        let host = Ipv4Addr::new(192, 168, net, 2);
        self.link(
            (
                &node_ns,
                &format!("{}g{k}", self.prefix),
                Ipv4Addr::new(192, 168, net, 1),
            ),
            (&ns, &format!("{}h{k}", self.prefix), host),
        )?;
        self.ns(&node_ns, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        self.nodes.push(LabNode {
            ns,
            underlay: host,
            underlay6: None,
            overlay: host,
            overlay6: String::new(),
            control: self.dir.join("lan.sock"),
        });
        self.procs.push(None);
        Ok(self.nodes.len() - 1)
    }

    /// Forget every NAT mapping of node `k`'s NAT (as a NAT reboot or a
    /// mapping timeout would).
    pub fn flush_nat(&self, k: usize) -> Result<()> {
        let x = format!("{}-x{k}", self.prefix);
        self.ns(&x, "conntrack", &["-F"]).map(|_| ())
    }

    /// A path inside the lab directory.
    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    /// Run the fastmesh binary in the root namespace.
    pub fn fastmesh(&self, args: &[&str]) -> Result<Output> {
        sh(self.bin.to_str().unwrap_or("fastmesh"), args)
    }

    /// Run a command in namespace `ns`; error if it fails.
    pub fn ns(&self, ns: &str, cmd: &str, args: &[&str]) -> Result<Output> {
        let mut a = vec!["netns", "exec", ns, cmd];
        a.extend_from_slice(args);
        sh("ip", &a)
    }

    /// Run a command in node `k`'s namespace, returning its output whatever the status.
    pub fn exec(&self, k: usize, cmd: &str, args: &[&str]) -> Result<Output> {
        let mut a = vec!["netns", "exec", &self.nodes[k].ns, cmd];
        a.extend_from_slice(args);
        Ok(Command::new("ip").args(&a).output()?)
    }

    /// Spawn a command in node `k`'s namespace (output to `log`).
    pub fn spawn(&self, k: usize, log: &str, cmd: &str, args: &[&str]) -> Result<Child> {
        let f = std::fs::File::create(self.dir.join(log))?;
        let mut a = vec!["netns", "exec", &self.nodes[k].ns, cmd];
        a.extend_from_slice(args);
        Ok(Command::new("ip")
            .args(&a)
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()?)
    }

    /// The hub's public key.
    pub fn hub_key(&self) -> &str {
        &self.hub_pub
    }

    /// Start (or restart) the hub in node 0 with `heartbeat` seconds.
    pub fn start_hub(&mut self, heartbeat: f64) -> Result<()> {
        self.start_hub_at(0, heartbeat)
    }

    /// Start (or restart) a hub in node `k` (a second hub when `k` > 0; its
    /// log is `hub{k}.log`, or `hub.log` for node 0).
    pub fn start_hub_at(&mut self, k: usize, heartbeat: f64) -> Result<()> {
        self.start_hub_with(k, heartbeat, &[])
    }

    /// [`Lab::start_hub_at`] with extra flags.
    pub fn start_hub_with(&mut self, k: usize, heartbeat: f64, extra: &[&str]) -> Result<()> {
        let args = self.hub_args(k, Some(heartbeat), extra);
        self.start_hub_args(k, &args)
    }

    /// The arguments that start a hub in node `k` (no `--heartbeat` flag
    /// without `heartbeat`: the hub's config file or default decides).
    pub fn hub_args(&self, k: usize, heartbeat: Option<f64>, extra: &[&str]) -> Vec<String> {
        let listen = format!("{}:{PORT}", self.nodes[k].underlay);
        let data = if k == 0 {
            "hubdata".to_string()
        } else {
            format!("hubdata{k}")
        };
        let mut args: Vec<String> = [
            "hub",
            "--listen",
            &listen,
            "--key",
            &self.path(&format!("n{k}.key")),
            "--network-key",
            &self.path("network.key"),
            "--data-dir",
            &self.path(&data),
            "--control",
            &self.nodes[k].control.to_string_lossy(),
        ]
        .map(String::from)
        .to_vec();
        if let Some(hb) = heartbeat {
            args.push("--heartbeat".into());
            args.push(hb.to_string());
        }
        with_overrides(args, extra)
    }

    /// Start a hub in node `k` with exactly these arguments.
    pub fn start_hub_args(&mut self, k: usize, args: &[String]) -> Result<()> {
        let bin = self.bin.to_string_lossy().into_owned();
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = if k == 0 {
            "hub.log".to_string()
        } else {
            format!("hub{k}.log")
        };
        let c = self.spawn(k, &log, &bin, &argv)?;
        self.procs[k] = Some(c);
        Ok(())
    }

    /// `PUBKEY@ADDR:PORT` of a hub running in node `k`.
    pub fn hub_spec(&self, k: usize) -> Result<String> {
        let out = self.fastmesh(&["pubkey", &self.path(&format!("n{k}.key"))])?;
        let key = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok(format!("{key}@{}:{PORT}", self.nodes[k].underlay))
    }

    /// The arguments that start peer `k` (for tests that vary them).
    pub fn peer_args(&self, k: usize, extra: &[&str]) -> Vec<String> {
        let n = &self.nodes[k];
        let v: Vec<String> = [
            "peer",
            "--hub",
            &format!("{}@{}:{PORT}", self.hub_pub, self.nodes[0].underlay),
            "--address",
            &format!("{}/24", n.overlay),
            "--address6",
            &format!("{}/64", n.overlay6),
            "--listen",
            &format!("0.0.0.0:{PORT}"),
            "--tun",
            "fm0",
            "--key",
            &self.path(&format!("n{k}.key")),
            "--network-key",
            &self.path("network.key"),
            "--name",
            &format!("peer{k}"),
            "--control",
            &n.control.to_string_lossy(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        with_overrides(v, extra)
    }

    /// Start peer `k` with exactly these arguments.
    pub fn start_peer_args(&mut self, k: usize, args: &[String]) -> Result<()> {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let bin = self.bin.to_string_lossy().into_owned();
        let c = self.spawn(k, &format!("peer{k}.log"), &bin, &argv)?;
        self.procs[k] = Some(c);
        Ok(())
    }

    /// Start peer `k` with extra flags.
    pub fn start_peer(&mut self, k: usize, extra: &[&str]) -> Result<()> {
        let args = self.peer_args(k, extra);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let bin = self.bin.to_string_lossy().into_owned();
        let c = self.spawn(k, &format!("peer{k}.log"), &bin, &argv)?;
        self.procs[k] = Some(c);
        Ok(())
    }

    /// Send `sig` to node `k`'s process (false if it has none).
    pub fn signal(&self, k: usize, sig: i32) -> bool {
        match &self.procs[k] {
            // SAFETY: plain kill(2) on our own child.
            Some(c) => unsafe { libc::kill(c.id() as i32, sig) == 0 },
            None => false,
        }
    }

    /// Kill node `k`'s process with SIGKILL and wait for it.
    pub fn kill9(&mut self, k: usize) {
        if let Some(mut c) = self.procs[k].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stop node `k`'s process with SIGTERM; returns its exit status.
    pub fn stop(&mut self, k: usize) -> Option<std::process::ExitStatus> {
        let mut c = self.procs[k].take()?;
        // SAFETY: plain kill(2) on our own child.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(s)) = c.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        c.wait().ok()
    }

    /// Process id of node `k`'s fastmesh process.
    pub fn pid(&self, k: usize) -> Option<u32> {
        self.procs[k].as_ref().map(|c| c.id())
    }

    /// Is node `k`'s process still running (without reaping it)?
    pub fn running_pid(&self, k: usize) -> bool {
        self.pid(k).is_some_and(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .map(|s| {
                    !s.rsplit_once(')')
                        .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
                })
                .unwrap_or(false)
        })
    }

    /// Is node `k`'s process still running?
    pub fn running(&mut self, k: usize) -> bool {
        self.procs[k]
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// A node's log so far.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    /// Status JSON of node `k`.
    pub fn status(&self, k: usize) -> Result<Value> {
        let out = self.fastmesh(&[
            "status",
            "--json",
            "--control",
            &self.nodes[k].control.to_string_lossy(),
        ])?;
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Status table of node `k`.
    pub fn status_table(&self, k: usize) -> String {
        self.fastmesh(&[
            "status",
            "--control",
            &self.nodes[k].control.to_string_lossy(),
        ])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|e| format!("{e:#}"))
    }

    /// True when peer `k` is registered and has an established path to every other peer.
    pub fn peer_ready(&self, k: usize) -> bool {
        self.peer_ready_with(k, self.nodes.len() - 2)
    }

    /// Peer `k` is registered with every hub it lists and has `peers` peers
    /// up (for labs with several hubs or peers behind NATs).
    pub fn peer_ready_with(&self, k: usize, peers: usize) -> bool {
        self.status(k).is_ok_and(|v| {
            let s = &v["status"];
            s["hubs"]
                .as_array()
                .is_some_and(|h| h.iter().all(|h| h["state"] == "registered"))
                && s["peers"]
                    .as_array()
                    .is_some_and(|p| p.len() == peers && p.iter().all(|p| p["state"] == "up"))
        })
    }

    /// Members the hub lists (None if it does not answer).
    pub fn hub_members(&self) -> Option<usize> {
        self.status(0)
            .ok()
            .and_then(|v| v["status"]["members"].as_array().map(|m| m.len()))
    }

    /// Wait until a socket listens on `port` in node `k`'s namespace (TCP, or
    /// UDP with `udp`), so a client started next finds its server.
    pub fn wait_listening(&self, k: usize, port: u16, udp: bool) -> Result<Duration> {
        let filter = format!("sport = :{port}");
        let flag = if udp { "-Hlun" } else { "-Hltn" };
        self.wait(Duration::from_secs(10), |l| {
            l.exec(k, "ss", &[flag, &filter])
                .is_ok_and(|o| !String::from_utf8_lossy(&o.stdout).trim().is_empty())
        })
    }

    /// Poll `cond` every 100 ms until it holds or `timeout` passes.
    pub fn wait(&self, timeout: Duration, mut cond: impl FnMut(&Lab) -> bool) -> Result<Duration> {
        let t = Instant::now();
        while t.elapsed() < timeout {
            if cond(self) {
                return Ok(t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(anyhow!("condition not met within {timeout:?}"))
    }

    /// Put a WAN between all nodes: every packet the router forwards goes
    /// through `fastmesh-lab wan-router` (at `lab_exe`) with `spec`, seeded
    /// with `seed`. Called again, it replaces the spec; `None` removes the WAN.
    pub fn set_wan(
        &mut self,
        lab_exe: &Path,
        spec: Option<crate::wan::WanSpec>,
        seed: u64,
    ) -> Result<()> {
        use crate::wan::{WAN_DEV, WAN_TABLE};
        let r = self.router.clone();
        if let Some(mut c) = self.wan.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let ip = |l: &Lab, args: &[&str]| l.ns(&r, "ip", args);
        let Some(spec) = spec else {
            let _ = ip(self, &["route", "flush", "table", WAN_TABLE]);
            while ip(self, &["rule", "del", "lookup", WAN_TABLE]).is_ok() {}
            return Ok(());
        };
        // While the router restarts (its TUN device, and the route through
        // it, gone), forwarded packets hit this blackhole instead of taking
        // the main table's undelayed path: a short outage, not a fast path
        // that would teach the sessions a sub-millisecond RTT.
        ip(
            self,
            &[
                "route",
                "replace",
                "blackhole",
                "default",
                "table",
                WAN_TABLE,
                "metric",
                "1000",
            ],
        )?;
        let rules = ip(self, &["rule", "show", "lookup", WAN_TABLE])?;
        if rules.stdout.is_empty() {
            for k in 0..self.nodes.len() {
                let veth = format!("{}a{k}", self.prefix);
                // A node on another node's NAT segment has no veth of its own here.
                let _ = ip(
                    self,
                    &[
                        "rule", "add", "iif", &veth, "lookup", WAN_TABLE, "priority", "100",
                    ],
                );
            }
        }
        let f = std::fs::File::create(self.dir.join("wan.log"))?;
        let mut a: Vec<String> = vec![
            "netns".into(),
            "exec".into(),
            r.clone(),
            lab_exe.display().to_string(),
            "wan-router".into(),
            WAN_DEV.into(),
        ];
        a.extend(spec.args());
        a.push(seed.to_string());
        self.wan = Some(
            Command::new("ip")
                .args(&a)
                .stdin(Stdio::null())
                .stdout(f.try_clone()?)
                .stderr(f)
                .spawn()?,
        );
        self.wait(Duration::from_secs(5), |l| {
            ip(l, &["link", "show", WAN_DEV]).is_ok()
        })
        .map_err(|e| anyhow!("WAN router did not come up: {e}\n{}", self.log("wan.log")))?;
        for k in ["all", "default", WAN_DEV] {
            let key = format!("net.ipv4.conf.{k}.rp_filter=0");
            self.ns(&r, "sysctl", &["-qw", &key])?;
        }
        ip(self, &["link", "set", WAN_DEV, "up"])?;
        ip(
            self,
            &[
                "route", "replace", "default", "dev", WAN_DEV, "table", WAN_TABLE, "metric", "1",
            ],
        )?;
        Ok(())
    }

    /// Drop `pct` percent of the packets the router forwards (each direction), 0 to clear.
    pub fn set_loss(&self, pct: u32) -> Result<()> {
        let _ = self.ns(&self.router, "nft", &["delete", "table", "inet", "fmloss"]);
        if pct == 0 {
            return Ok(());
        }
        let rules = format!(
            "table inet fmloss {{\n chain impair {{\n  type filter hook forward priority 0; policy accept;\n  \
             numgen random mod 100 < {pct} counter drop\n }}\n}}\n"
        );
        let f = self.path("loss.nft");
        std::fs::write(&f, rules)?;
        self.ns(&self.router, "nft", &["-f", &f])?;
        Ok(())
    }

    /// Firewall node `k` (not behind a NAT) as a network that passes no UDP:
    /// every UDP datagram on its underlay link is dropped both ways, and so
    /// are TCP segments to the ports in `tcp_ports` (a network that passes
    /// only HTTPS). `None` removes the rules.
    pub fn block_udp(&self, k: usize, tcp_ports: Option<&[u16]>) -> Result<()> {
        let ns = &self.nodes[k].ns;
        let _ = self.ns(ns, "nft", &["delete", "table", "inet", "fmblock"]);
        let Some(ports) = tcp_ports else {
            return Ok(());
        };
        let dev = format!("{}b{k}", self.prefix);
        let mut rules = format!(
            "table inet fmblock {{\n chain out {{\n  type filter hook output priority 0; policy accept;\n  \
             oifname \"{dev}\" meta l4proto udp counter drop\n"
        );
        for p in ports {
            rules.push_str(&format!("  oifname \"{dev}\" tcp dport {p} counter drop\n"));
        }
        rules.push_str(&format!(
            " }}\n chain in {{\n  type filter hook input priority 0; policy accept;\n  \
             iifname \"{dev}\" meta l4proto udp counter drop\n }}\n}}\n"
        ));
        let f = self.path(&format!("block{k}.nft"));
        std::fs::write(&f, rules)?;
        self.ns(ns, "nft", &["-f", &f])?;
        Ok(())
    }

    /// Count the UDP datagrams node `k` sends to anything but the hubs in
    /// `hubs` (and the overlay): a counter read by [`Lab::udp_out_count`].
    pub fn count_udp_out(&self, k: usize, hubs: &[Ipv4Addr]) -> Result<()> {
        let ns = &self.nodes[k].ns;
        let _ = self.ns(ns, "nft", &["delete", "table", "ip", "fmcount"]);
        let set: Vec<String> = hubs.iter().map(|h| h.to_string()).collect();
        let rules = format!(
            "table ip fmcount {{\n chain out {{\n  type filter hook output priority 0; policy accept;\n  \
             ip daddr != {{ {}, 10.99.0.0/16 }} meta l4proto udp counter\n }}\n}}\n",
            set.join(", ")
        );
        let f = self.path(&format!("count{k}.nft"));
        std::fs::write(&f, rules)?;
        self.ns(ns, "nft", &["-f", &f])?;
        Ok(())
    }

    /// Datagrams counted since [`Lab::count_udp_out`].
    pub fn udp_out_count(&self, k: usize) -> Result<u64> {
        let o = self.ns(
            &self.nodes[k].ns,
            "nft",
            &["list", "table", "ip", "fmcount"],
        )?;
        let t = String::from_utf8_lossy(&o.stdout);
        let n = t
            .split("packets ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| anyhow!("no counter in {t}"))?;
        Ok(n)
    }

    /// Start the hub (1-s heartbeats) and peers 1..=`peers` with default
    /// settings; return once every peer is ready, or an error with the logs.
    pub fn start_mesh(&mut self, peers: usize, timeout: Duration) -> Result<()> {
        self.start_hub(1.0)?;
        for k in 1..=peers {
            self.start_peer(k, &[])?;
        }
        self.wait(timeout, |l| (1..=peers).all(|k| l.peer_ready(k)))
            .map(|_| ())
            .map_err(|e| anyhow::anyhow!("mesh did not come up: {e}\n{}", self.logs()))
    }

    /// Set the MTU of every underlay link (both ends of each node's veth
    /// to the router; nodes behind NATs are not covered): a path whose
    /// largest packet is `mtu` bytes, as PPPoE, cloud VPCs or IPv6 tunnels give.
    pub fn set_mtu(&self, mtu: u32) -> Result<()> {
        let m = mtu.to_string();
        for (k, n) in self.nodes.iter().enumerate() {
            let a = format!("{}a{k}", self.prefix);
            let b = format!("{}b{k}", self.prefix);
            self.ns(&self.router, "ip", &["link", "set", &a, "mtu", &m])?;
            self.ns(&n.ns, "ip", &["link", "set", &b, "mtu", &m])?;
        }
        Ok(())
    }

    /// Everything in the logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for k in 0..self.nodes.len() {
            let name = if k == 0 {
                "hub.log".to_string()
            } else if self.dir.join(format!("hub{k}.log")).exists() {
                format!("hub{k}.log")
            } else {
                format!("peer{k}.log")
            };
            let l = self.log(&name);
            let tail: Vec<&str> = l.lines().rev().take(30).collect();
            s.push_str(&format!("--- {name} (last lines)\n"));
            for line in tail.into_iter().rev() {
                s.push_str(line);
                s.push('\n');
            }
        }
        s
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in self.procs.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Kill anything else still running in our namespaces (clients, iperf3).
        for ns in &self.namespaces {
            if let Ok(o) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    if let Ok(p) = pid.parse::<i32>() {
                        // SAFETY: kill(2) of a process inside our own namespace.
                        unsafe {
                            libc::kill(p, libc::SIGKILL);
                        }
                    }
                }
            }
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        if std::env::var_os("FASTMESH_KEEP_LAB").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Bytes per second as Mbit/s.
pub fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64() / 1e6
}

/// A numeric field of `/proc/PID/status` (e.g. `VmRSS`, in KiB, or
/// `voluntary_ctxt_switches`); 0 if unreadable.
pub fn proc_status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.split(':').next() == Some(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time (user + system) a process has used, in seconds.
pub fn proc_cpu_secs(pid: u32) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = clk_tck();
    let get = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (get(11) + get(12)) / tick
}

/// Busy CPU time of the whole machine (all cores, everything but idle and iowait), seconds.
pub fn system_busy_secs() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let line = s.lines().next().unwrap_or("");
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 8 {
        return 0.0;
    }
    // user nice system idle iowait irq softirq steal
    (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / clk_tck()
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}
