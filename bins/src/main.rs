//! `fastmesh`: the hub, the peer, key generation and status, in one binary.

mod config;
mod control;
mod fallback;
mod metrics;
mod netcheck;
mod ping;
mod portmap;
mod reload;
mod routing;

use actix::prelude::*;

/// jemalloc gives memory back to the system after a burst (glibc's malloc
/// kept a hub at 200 MB after 1,000 members joined, 35 MB of it in use).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use anyhow::{anyhow, bail, Context as _, Result};
use clap::{Args, Parser, Subcommand};
use config::*;
use fastmesh_actors::dataplane::{Dataplane, NoDevice, TunReader};
use fastmesh_actors::heartbeat::HeartbeatConfig;
use fastmesh_actors::hub::{GetHubStatus, RegistryActor, Revoke};
use fastmesh_actors::registry::RegistryConfig;
use fastmesh_actors::store::{key_hex, OwnerStore};
use fastmesh_actors::supervisor::{Fatal, GetNodeStatus, Leave, PeerSetup, Supervisor};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use transport::crypto::StaticKeypair;
use transport::{Admission, Node, NodeConfig, SessionConfig};

#[derive(Parser)]
#[command(
    name = "fastmesh",
    version,
    about = "A mesh VPN for servers on lossy, long-distance links",
    long_about = "fastmesh puts your servers on one private IP network.\n\n\
        One node with a public address runs `fastmesh hub`; every server runs \
        `fastmesh peer`, which creates a TUN device with the server's overlay \
        address and sends packets straight to the other peers over UDP, \
        encrypted, with KCP retransmission for TCP flows.\n\n\
        First steps:\n  \
        fastmesh keygen --out network.key      # once; copy to every node (the network secret)\n  \
        fastmesh keygen --out hub.key          # on the hub; prints the hub's public key\n  \
        fastmesh hub --key hub.key --network-key network.key --listen 0.0.0.0:4800\n  \
        fastmesh keygen --out node.key         # on each peer\n  \
        sudo fastmesh peer --key node.key --network-key network.key \\\n       \
        --hub HUBPUBKEY@hub.example.org:4800 --address 10.99.0.2/24\n  \
        sudo fastmesh status"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a key file (mode 0600) and print its public key.
    Keygen {
        /// Where to write the key.
        #[arg(long, short)]
        out: PathBuf,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Print the public key of a key file (what peers pass in --hub).
    Pubkey {
        /// The key file.
        key: PathBuf,
    },
    /// Run a hub: the registry peers join through (needs a reachable UDP port).
    Hub(HubArgs),
    /// Run a peer: create the TUN device and join the mesh (needs root or CAP_NET_ADMIN).
    Peer(PeerArgs),
    /// Revoke a node key on a running hub: the node leaves every peer's map at
    /// once, its address is freed, and it can never register again.
    Revoke {
        /// The node's public key (64 hex digits, as `fastmesh pubkey` prints it).
        key: String,
        /// The hub's control socket.
        #[arg(long, default_value = "/run/fastmesh/hub.sock")]
        control: PathBuf,
    },
    /// Ping a peer through the mesh (ICMP echo to its overlay address) and
    /// show, for each probe, the path taken: the direct endpoint or the
    /// relaying hub. Needs root (raw ICMP socket).
    Ping {
        /// The peer: its name, an overlay address, or the start of its key.
        peer: String,
        /// Probes to send, one per second.
        #[arg(long, short = 'c', default_value_t = 4)]
        count: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// The node's control socket.
        #[arg(long, default_value = "/run/fastmesh/fm0.sock")]
        control: PathBuf,
    },
    /// Read the node's config file again and apply what can change at run
    /// time, without restarting sessions (the same as SIGHUP).
    Reload {
        /// The node's control socket.
        #[arg(long, default_value = "/run/fastmesh/fm0.sock")]
        control: PathBuf,
    },
    /// What this node's hubs see of its network: the endpoint each sees it
    /// at, whether its NAT keeps one mapping for all destinations, the RTT
    /// to each hub and whether UDP to each works.
    Netcheck {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// The node's control socket.
        #[arg(long, default_value = "/run/fastmesh/fm0.sock")]
        control: PathBuf,
    },
    /// Show a running node's state: peers, paths, RTT, loss, traffic.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Refresh the table in place every second until interrupted.
        #[arg(long, conflicts_with = "json")]
        watch: bool,
        /// The node's control socket.
        #[arg(long, default_value = "/run/fastmesh/fm0.sock")]
        control: PathBuf,
    },
}

#[derive(Args)]
struct HubArgs {
    /// TOML config file; flags override its values.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// UDP address to listen on [default: [::]:4800, IPv6 and IPv4; 0.0.0.0:4800 without IPv6].
    #[arg(long)]
    listen: Option<String>,
    /// The hub's key file (from `fastmesh keygen`).
    #[arg(long)]
    key: Option<PathBuf>,
    /// The network key file shared by every node.
    #[arg(long)]
    network_key: Option<PathBuf>,
    /// Directory for the membership table [default: /var/lib/fastmesh].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Heartbeat interval in seconds [default: 5].
    #[arg(long)]
    heartbeat: Option<f64>,
    /// Drop a member after this many silent heartbeats [default: 6; fewer drops live peers on lossy links].
    #[arg(long)]
    expire_beats: Option<u32>,
    /// Control socket for `fastmesh status` [default: /run/fastmesh/hub.sock].
    #[arg(long)]
    control: Option<PathBuf>,
    /// Admit only the node keys listed in this file (one public key per line,
    /// `#` comments); without it, anyone holding the network key may join.
    #[arg(long)]
    allow: Option<PathBuf>,
    /// Do not relay frames between members that cannot reach each other
    /// directly (relaying is on by default; the hub only forwards frames it
    /// cannot read).
    #[arg(long)]
    no_relay: bool,
    /// Admit subnet routes that overlap another member's (several gateways
    /// into one site) [default: refuse the second advertiser].
    #[arg(long)]
    allow_route_overlap: bool,
    /// How members learn about each other: "full" (every member holds every
    /// record, pushed as it changes) or "on-demand" (a member fetches a
    /// record when a packet or a handshake needs it, and hears only about
    /// the records it holds: for networks of thousands) [default: full].
    #[arg(long)]
    peer_map: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9480 [default: off].
    #[arg(long)]
    metrics: Option<String>,
    /// TCP address for peers that cannot use UDP, or "off" [default: the
    /// UDP listen address; skipped with a warning if taken].
    #[arg(long)]
    tcp_listen: Option<String>,
    /// TLS address for peers on networks that pass only HTTPS, e.g.
    /// [::]:443 [default: off].
    #[arg(long)]
    tls_listen: Option<String>,
    /// TLS certificate chain (PEM) [default: self-signed, made at start;
    /// peers do not check it, the Noise session inside authenticates].
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM), with --tls-cert.
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// This hub's id among several hubs that share one registry (Raft);
    /// needs --cluster-hub for every hub [default: this hub alone].
    #[arg(long)]
    cluster_id: Option<u64>,
    /// TCP address for the other hubs, e.g. 0.0.0.0:4801 [default: the
    /// address this hub's --cluster-hub entry gives].
    #[arg(long)]
    cluster_listen: Option<String>,
    /// A hub of the cluster as ID=PUBKEY@HOST:PORT (its hub-to-hub TCP
    /// address); list every hub, this one included, the same on all.
    #[arg(long = "cluster-hub")]
    cluster_hubs: Vec<String>,
}

#[derive(Args)]
struct PeerArgs {
    /// TOML config file; flags override its values.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// A hub as PUBKEY@HOST:PORT; repeat for several hubs.
    #[arg(long = "hub")]
    hubs: Vec<String>,
    /// This node's overlay address with prefix, e.g. 10.99.0.2/24.
    #[arg(long)]
    address: Option<String>,
    /// Optional IPv6 overlay address with prefix, e.g. fd99::2/64.
    #[arg(long)]
    address6: Option<String>,
    /// UDP address to listen on [default: [::]:4800, IPv6 and IPv4; 0.0.0.0:4800 without IPv6].
    #[arg(long)]
    listen: Option<String>,
    /// TUN device name [default: fm0].
    #[arg(long)]
    tun: Option<String>,
    /// TUN MTU [default: 1387, so direct frames, FEC included, fit a 1500-byte path unfragmented].
    #[arg(long)]
    mtu: Option<u16>,
    /// KCP profile: normal, fast or turbo [default: fast].
    #[arg(long)]
    profile: Option<String>,
    /// This node's key file (from `fastmesh keygen`).
    #[arg(long)]
    key: Option<PathBuf>,
    /// The network key file shared by every node.
    #[arg(long)]
    network_key: Option<PathBuf>,
    /// Name shown in status [default: host name].
    #[arg(long)]
    name: Option<String>,
    /// Control socket for `fastmesh status` [default: /run/fastmesh/<tun>.sock].
    #[arg(long)]
    control: Option<PathBuf>,
    /// Heartbeat interval in seconds until the hub sets it [default: 5].
    #[arg(long)]
    heartbeat: Option<f64>,
    /// Do not use TUN segmentation offload (TSO/GRO); read and write one packet at a time.
    #[arg(long)]
    no_offload: bool,
    /// Do not split TCP: carry inner TCP connections as packets, and decline
    /// peers' split connections (they then send theirs as packets too).
    #[arg(long)]
    no_split_tcp: bool,
    /// Do not ask the router for a port mapping (UPnP IGD, PCP, NAT-PMP) to
    /// offer as a candidate [default: ask, when listening on all addresses over IPv4].
    #[arg(long)]
    no_port_mapping: bool,
    /// A subnet this node routes for (site to site), e.g. 192.168.5.0/24;
    /// repeat for several. The other peers send packets for it here.
    #[arg(long = "route")]
    routes: Vec<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9480 [default: off].
    #[arg(long)]
    metrics: Option<String>,
    /// Where UDP to a hub goes unanswered, reach it by these instead, in
    /// order: "tcp,tls", "tcp", "tls" or "off" [default: tcp,tls]. TCP goes to
    /// the hub's UDP port number, TLS to --tls-port.
    #[arg(long)]
    fallback: Option<String>,
    /// The hubs' TLS port for the fallback [default: 443].
    #[arg(long)]
    tls_port: Option<u16>,
}

/// Unicast addresses of this host's interfaces, except loopback, link-local
/// IPv6 and the device `skip` (the mesh's TUN); IPv6 ones only if `v6`
/// (a socket bound to `[::]` also reaches IPv4). Sorted, at most 16.
fn local_addresses(skip: &str, v6: bool) -> Vec<std::net::IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_flags & libc::IFF_LOOPBACK as u32 != 0 {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        if name.to_bytes() == skip.as_bytes() {
            continue;
        }
        // SAFETY: ifa_addr points at a sockaddr of the family it names.
        let ip = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let a = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    Some(std::net::IpAddr::from(
                        u32::from_be(a.sin_addr.s_addr).to_be_bytes(),
                    ))
                }
                libc::AF_INET6 if v6 => {
                    let a = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
                    // Link-local needs a scope id a peer cannot use.
                    (ip.segments()[0] & 0xffc0 != 0xfe80).then_some(std::net::IpAddr::V6(ip))
                }
                _ => None,
            }
        };
        if let Some(ip) = ip {
            out.push(ip);
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out.sort();
    out.dedup();
    out.truncate(16);
    out
}

fn main() {
    let cli = Cli::parse();
    reload::init_logging();
    if transport::crypto::NULL_CIPHER {
        tracing::warn!(
            "this build has the insecure-null-cipher feature: data frames are NOT encrypted or authenticated (benchmarks only)"
        );
    }
    let r = match cli.cmd {
        Cmd::Keygen { out, force } => write_new_key(&out, force).map(|kp| {
            println!("{}", key_hex(&kp.public));
            eprintln!("wrote {} (mode 0600); public key above", out.display());
        }),
        Cmd::Pubkey { key } => load_key(&key, "key file")
            .map(|k| println!("{}", key_hex(&StaticKeypair::from_private(k).public))),
        Cmd::Hub(a) => run_hub(a),
        Cmd::Peer(a) => run_peer(a),
        Cmd::Status {
            json,
            watch,
            control,
        } => status(json, watch, control),
        Cmd::Netcheck { json, control } => netcheck(json, control),
        Cmd::Reload { control } => reload_cmd(control),
        Cmd::Ping {
            peer,
            count,
            json,
            control,
        } => ping::run(control, &peer, count.max(1), json),
        Cmd::Revoke { key, control } => revoke(&key, control),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn reload_cmd(control: PathBuf) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let v = rt.block_on(control::request(&control, "reload"))?;
    match v["kind"].as_str() {
        Some("reloaded") => {
            println!("{}", v["message"].as_str().unwrap_or(""));
            Ok(())
        }
        _ => bail!("{}", v["error"].as_str().unwrap_or("unexpected answer")),
    }
}

fn netcheck(json: bool, control: PathBuf) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let r = netcheck::report(&rt.block_on(control::query(&control))?)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", netcheck::text(&r));
    }
    Ok(())
}

fn status(json: bool, watch: bool, control: PathBuf) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if watch {
        // Clear the screen and redraw every second; a node that stops
        // answering ends the watch with its error.
        loop {
            let v = rt.block_on(control::query(&control))?;
            print!("\x1b[H\x1b[2J{}", control::table(&v));
            use std::io::Write;
            std::io::stdout().flush()?;
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    let v = rt.block_on(control::query(&control))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", control::table(&v));
    }
    Ok(())
}

fn revoke(key: &str, control: PathBuf) -> Result<()> {
    if fastmesh_actors::store::parse_key_hex(key).is_none() {
        bail!("bad key {key:?}: want 64 hex digits (`fastmesh pubkey KEYFILE` prints it)");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let v = rt.block_on(control::request(&control, &format!("revoke {key}")))?;
    match v["kind"].as_str() {
        Some("revoked") => {
            println!(
                "{}",
                if v["newly"] == true {
                    "revoked"
                } else {
                    "was already revoked"
                }
            );
            Ok(())
        }
        _ => bail!("{}", v["error"].as_str().unwrap_or("the hub refused")),
    }
}

fn load_allow_list(p: &Path) -> Result<std::collections::BTreeSet<[u8; 32]>> {
    let text = std::fs::read_to_string(p)
        .with_context(|| format!("cannot read allow-list {}", p.display()))?;
    let mut keys = std::collections::BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let k = fastmesh_actors::store::parse_key_hex(line).ok_or_else(|| {
            anyhow!(
                "{}:{}: not a public key (want 64 hex digits, as `fastmesh pubkey` prints)",
                p.display(),
                i + 1
            )
        })?;
        keys.insert(k);
    }
    if keys.is_empty() {
        bail!(
            "allow-list {} lists no keys: nobody could join",
            p.display()
        );
    }
    Ok(keys)
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Bind the UDP socket at `listen`, or by default at `[::]:4800` (IPv6 and
/// IPv4 on one socket), falling back to `0.0.0.0:4800` on a host without
/// IPv6.
fn bind_udp_or_default(listen: Option<String>) -> Result<std::net::UdpSocket> {
    match listen {
        Some(l) => bind_udp(&l),
        None => bind_udp("[::]:4800").or_else(|e| {
            tracing::debug!(error = %e, "no IPv6 socket; listening on IPv4 only");
            bind_udp("0.0.0.0:4800")
        }),
    }
}

fn parse_listen(listen: &str) -> Result<SocketAddr> {
    listen.parse().map_err(|_| {
        anyhow!("bad listen address {listen:?}: want IP:PORT, e.g. 0.0.0.0:4800 or [::]:4800")
    })
}

fn bind_udp(listen: &str) -> Result<std::net::UdpSocket> {
    let addr = parse_listen(listen)?;
    let domain = socket2::Domain::for_address(addr);
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    if addr.is_ipv6() {
        // `[::]` serves IPv4 peers too, whatever net.ipv6.bindv6only says.
        s.set_only_v6(false)?;
    }
    // Large buffers absorb bursts at high rates; root may exceed the sysctl limits.
    for size in [8 << 20, 4 << 20, 1 << 20] {
        if s.set_recv_buffer_size(size).is_ok() && s.set_send_buffer_size(size).is_ok() {
            break;
        }
    }
    force_buffers(&s, 8 << 20);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())
        .with_context(|| format!("cannot bind UDP {addr}"))?;
    Ok(s.into())
}

/// SO_RCVBUFFORCE/SO_SNDBUFFORCE (root only) so the buffers are not capped by
/// net.core.rmem_max; ignored without privileges.
fn force_buffers(s: &socket2::Socket, size: libc::c_int) {
    use std::os::fd::AsRawFd;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        // SAFETY: valid fd, option value is a c_int of the stated size.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &size as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

fn run_hub(a: HubArgs) -> Result<()> {
    let f: HubFile = match &a.config {
        Some(p) => read_toml(p)?,
        None => HubFile::default(),
    };
    let running = f.clone();
    let (cfg_path, flag_allow) = (a.config.clone(), a.allow.clone());
    let timing_by_flag = a.heartbeat.is_some() || a.expire_beats.is_some();
    let listen = a.listen.or(f.listen);
    let key_path = a.key.or(f.key).ok_or_else(|| {
        anyhow!("no hub key: pass --key FILE (create one with `fastmesh keygen --out hub.key`)")
    })?;
    let net_path = a.network_key.or(f.network_key).ok_or_else(|| {
        anyhow!("no network key: pass --network-key FILE (the same file on every node)")
    })?;
    let data_dir = a
        .data_dir
        .or(f.data_dir)
        .unwrap_or_else(|| PathBuf::from("/var/lib/fastmesh"));
    let heartbeat = secs(a.heartbeat.or(f.heartbeat).unwrap_or(5.0), "heartbeat")?;
    let expire_beats = a.expire_beats.or(f.expire_beats).unwrap_or(6).max(1);
    let control = a
        .control
        .or(f.control)
        .unwrap_or_else(|| PathBuf::from("/run/fastmesh/hub.sock"));
    let allow = match a.allow.or(f.allow) {
        Some(p) => Some(load_allow_list(&p)?),
        None => None,
    };
    let key = StaticKeypair::from_private(load_key(&key_path, "hub key")?);
    let psk = load_key(&net_path, "network key")?;
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    let cluster_hubs = if a.cluster_hubs.is_empty() {
        f.cluster_hubs.clone().unwrap_or_default()
    } else {
        a.cluster_hubs.clone()
    };
    let cluster_cfg = cluster_config(a.cluster_id.or(f.cluster_id), &cluster_hubs, &key)?;
    let cluster_l = match &cluster_cfg {
        Some(c) => {
            let at = match a.cluster_listen.clone().or(f.cluster_listen.clone()) {
                Some(l) => l,
                None => c.hub(c.me).map(|h| h.addr.clone()).unwrap_or_default(),
            };
            let l = std::net::TcpListener::bind(&at)
                .with_context(|| format!("cannot listen for other hubs on TCP {at}"))?;
            l.set_nonblocking(true)?;
            Some(l)
        }
        None => None,
    };
    let store = OwnerStore::new(data_dir.join("owners"));
    // With several hubs the book lives in their shared log; this hub's own
    // owner file is not read.
    let (owners, revoked) = if cluster_cfg.is_some() {
        Default::default()
    } else {
        (store.load()?, store.load_revoked()?)
    };
    let sock = bind_udp_or_default(listen)?;
    let udp_at = sock.local_addr()?;
    // Stream fallback: TCP on the UDP address unless told otherwise (a
    // taken port only warns), TLS where asked.
    let tcp_l = match a.tcp_listen.or(f.tcp_listen) {
        Some(t) if t == "off" => None,
        Some(t) => {
            let at = parse_listen(&t)?;
            Some(fallback::bind_tcp(at).with_context(|| format!("cannot listen on TCP {at}"))?)
        }
        None => match fallback::bind_tcp(udp_at) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "no TCP fallback for peers: cannot listen on TCP {udp_at} (set --tcp-listen)");
                None
            }
        },
    };
    let tls_l = match a.tls_listen.or(f.tls_listen) {
        Some(t) => {
            let at = parse_listen(&t)?;
            let cfg = fallback::server_tls(
                a.tls_cert.or(f.tls_cert).as_deref(),
                a.tls_key.or(f.tls_key).as_deref(),
            )?;
            let l = fallback::bind_tcp(at).with_context(|| format!("cannot listen on TLS {at}"))?;
            Some((l, cfg))
        }
        None => None,
    };
    tracing::info!(
        listen = %udp_at,
        tcp = ?tcp_l.as_ref().and_then(|l| l.local_addr().ok()),
        tls = ?tls_l.as_ref().and_then(|l| l.0.local_addr().ok()),
        key = %key_hex(&key.public),
        members_known = owners.len(),
        "hub starting"
    );
    let metrics_l = match a.metrics.or(f.metrics) {
        Some(m) => Some(metrics::bind(&m)?),
        None => None,
    };
    let no_relay = a.no_relay || f.relay == Some(false);
    let allow_route_overlap = a.allow_route_overlap || f.allow_route_overlap == Some(true);
    let on_demand = match a.peer_map.as_deref().or(f.peer_map.as_deref()) {
        None | Some("full") => false,
        Some("on-demand") => true,
        Some(other) => bail!("peer_map {other:?}: want \"full\" or \"on-demand\""),
    };
    if on_demand {
        tracing::info!("members fetch peer records on demand (peer_map = \"on-demand\")");
    }
    if no_relay {
        tracing::info!("relaying disabled (--no-relay)");
    }
    let hub_keys = fastmesh_actors::cluster::net::HubKeys {
        private: key.private,
        psk,
    };
    let sys = actix::System::new();
    sys.block_on(async move {
        let cluster = match (cluster_cfg, cluster_l) {
            (Some(cfg), Some(l)) => Some(start_cluster(cfg, hub_keys, &data_dir, l).await?),
            _ => None,
        };
        let sock = Arc::new(transport::Streamed::new(transport::FastUdp::new(sock)?));
        if let Some(l) = tcp_l {
            actix::spawn(sock.listen(tokio::net::TcpListener::from_std(l)?, None));
        }
        if let Some((l, cfg)) = tls_l {
            actix::spawn(sock.listen(tokio::net::TcpListener::from_std(l)?, Some(cfg)));
        }
        let node = Node::new(
            NodeConfig {
                admission: Admission::AnyWithNetworkKey,
                session: SessionConfig::hub(),
                relay: !no_relay,
                ..NodeConfig::default()
            },
            key,
            psk,
            wall_ms(),
            transport::os_entropy()?,
        );
        let reg_ctx = Context::<RegistryActor>::new();
        let plane = Dataplane::<_, NoDevice>::new(
            node,
            sock.clone(),
            None,
            reg_ctx.address().recipient(),
            None,
        )
        .start();
        let mut registry = fastmesh_actors::registry::Registry::new(
            RegistryConfig {
                heartbeat,
                expire_beats,
                allow_route_overlap,
                on_demand,
                ..RegistryConfig::default()
            },
            owners,
            // Versions of a restarted hub start above any it handed out before.
            wall_ms() << 16,
        );
        registry.set_revoked(revoked);
        if let Some(keys) = allow {
            tracing::info!(keys = keys.len(), "admitting only listed keys");
            registry.set_allowed(Some(keys), &mut Vec::new());
        }
        let reg = RegistryActor::new(registry, Some(store), plane.clone().recipient())
            .with_snapshot(plane.clone().recipient());
        let reg = match cluster {
            Some(c) => reg.with_cluster(c),
            None => reg,
        };
        let reg = reg_ctx.run(reg);
        let do_reload: std::rc::Rc<dyn Fn() -> Result<String>> = {
            let (reg, plane) = (reg.clone(), plane.clone());
            std::rc::Rc::new(move || {
                let mut c = reload::HubChange::read(
                    &cfg_path,
                    &running,
                    &flag_allow,
                    a.no_relay,
                    timing_by_flag,
                    load_allow_list,
                )?;
                let msg = c.apply_log()?;
                reg.do_send(fastmesh_actors::hub::SetAllowed(c.allow.take()));
                if let Some((heartbeat, expire_beats)) = c.timing {
                    reg.do_send(fastmesh_actors::hub::SetTiming {
                        heartbeat,
                        expire_beats,
                    });
                }
                plane.do_send(fastmesh_actors::dataplane::Cmd::SetRelaying(c.relay));
                tracing::info!("{msg}");
                Ok(msg)
            })
        };
        on_sighup(do_reload.clone());
        let listener = control::bind(&control)?;
        let r2 = reg.clone();
        let sock_c = sock.clone();
        actix::spawn(control::serve(listener, move |line: String| {
            let r = r2.clone();
            let rl = do_reload.clone();
            let streams = sock_c.stats();
            async move {
                if line == "reload" {
                    return reload_answer(&*rl);
                }
                if let Some(k) = line.strip_prefix("revoke ") {
                    let Some(key) = fastmesh_actors::store::parse_key_hex(k) else {
                        return serde_json::json!({"kind": "error", "error": "bad key"});
                    };
                    return match r.send(Revoke(key)).await {
                        Ok(Ok(newly)) => serde_json::json!({"kind": "revoked", "newly": newly}),
                        Ok(Err(e)) => serde_json::json!({"kind": "error", "error": e}),
                        Err(e) => serde_json::json!({"kind": "error", "error": e.to_string()}),
                    };
                }
                match r.send(GetHubStatus).await {
                    Ok(s) => {
                        let mut v = serde_json::json!({"kind": "hub", "status": s});
                        v["status"]["streams"] = control::streams_json(&streams);
                        v
                    }
                    Err(e) => serde_json::json!({"kind": "error", "error": e.to_string()}),
                }
            }
        }));
        if let Some(l) = metrics_l {
            let r3 = reg.clone();
            let sock_m = sock.clone();
            actix::spawn(metrics::serve(l, move || {
                let r = r3.clone();
                let streams = sock_m.stats();
                async move {
                    match r.send(GetHubStatus).await {
                        Ok(s) => metrics::hub_text(&s, &streams),
                        Err(_) => String::new(),
                    }
                }
            }));
        }
        own_task(shutdown_signal()).await;
        tracing::info!("hub stopping");
        let _ = std::fs::remove_file(&control);
        Ok::<(), anyhow::Error>(())
    })
}

/// The hub cluster from `--cluster-id` and `--cluster-hub` (None: this hub alone).
fn cluster_config(
    id: Option<u64>,
    hubs: &[String],
    key: &StaticKeypair,
) -> Result<Option<fastmesh_actors::cluster::ClusterConfig>> {
    use fastmesh_actors::cluster::{parse_hub_peer, ClusterConfig};
    let me = match (id, hubs.is_empty()) {
        (None, true) => return Ok(None),
        (Some(_), true) => bail!(
            "--cluster-id needs --cluster-hub ID=PUBKEY@HOST:PORT for every hub, this one included"
        ),
        (None, false) => bail!("--cluster-hub needs --cluster-id (this hub's id in the list)"),
        (Some(me), false) => me,
    };
    let hubs = hubs
        .iter()
        .map(|s| parse_hub_peer(s).map_err(|e| anyhow!("--cluster-hub {e}")))
        .collect::<Result<Vec<_>>>()?;
    let cfg = ClusterConfig { me, hubs };
    cfg.check(&key.public)
        .map_err(|e| anyhow!("cluster: {e}"))?;
    Ok(Some(cfg))
}

/// Start this hub's Raft (state in `data_dir`) and serve the other hubs on `l`.
async fn start_cluster(
    cfg: fastmesh_actors::cluster::ClusterConfig,
    keys: fastmesh_actors::cluster::net::HubKeys,
    data_dir: &std::path::Path,
    l: std::net::TcpListener,
) -> Result<fastmesh_actors::cluster::Cluster> {
    use fastmesh_actors::cluster::{net, store::DirDisk, Cluster};
    let disk = Arc::new(DirDisk(data_dir.to_path_buf()));
    tracing::info!(
        id = cfg.me,
        hubs = cfg.hubs.len(),
        "joining the hub cluster"
    );
    let c = Cluster::start(cfg.clone(), keys.clone(), disk, net::TcpDialer)
        .await
        .map_err(|e| anyhow!("cluster: {e}"))?;
    let l = tokio::net::TcpListener::from_std(l)?;
    let (raft, cfg) = (c.raft.clone(), Arc::new(cfg));
    // Raft needs a few connections per hub; strangers get at most the rest
    // of this many, each for the 2 s a handshake may take.
    let slots = Arc::new(tokio::sync::Semaphore::new(64));
    actix::spawn(async move {
        loop {
            match l.accept().await {
                Ok((s, from)) => {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        tracing::debug!(%from, "too many hub connections; closed");
                        continue;
                    };
                    let _ = s.set_nodelay(true);
                    let (raft, cfg, keys) = (raft.clone(), cfg.clone(), keys.clone());
                    tokio::spawn(async move {
                        if let Err(e) = net::serve(s, raft, cfg, keys).await {
                            tracing::debug!(%from, %e, "hub connection ended");
                        }
                        drop(slot);
                    });
                }
                Err(e) => {
                    tracing::warn!(%e, "cannot accept a hub connection");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(c)
}

/// Reload on every SIGHUP (which then no longer ends the process).
fn on_sighup(f: std::rc::Rc<dyn Fn() -> Result<String>>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; use `fastmesh reload`");
        return;
    };
    actix::spawn(async move {
        while hup.recv().await.is_some() {
            if let Err(e) = f() {
                tracing::warn!("{}", reload::failed(&e));
            }
        }
    });
}

/// The control socket's answer to `reload`.
fn reload_answer(f: &dyn Fn() -> Result<String>) -> serde_json::Value {
    match f() {
        Ok(m) => serde_json::json!({"kind": "reloaded", "message": m}),
        Err(e) => {
            let m = reload::failed(&e);
            tracing::warn!("{m}");
            serde_json::json!({"kind": "error", "error": m})
        }
    }
}

/// Run `fut` as a task of its own and wait for its output (None if the
/// runtime dropped the task). The future a `block_on` runs is polled each
/// time any task wakes (the local task set polls it on every tick): a select
/// over the shutdown signals there ran for every packet, thousands of
/// instructions per ping (callgrind, `tests/scripts/ping-instr.sh`).
/// Waiting on a oneshot costs next to nothing.
async fn own_task<T: 'static>(fut: impl std::future::Future<Output = T> + 'static) -> Option<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    actix::spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.await.ok()
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn check_tun_access() -> Result<()> {
    if !Path::new("/dev/net/tun").exists() {
        bail!(
            "/dev/net/tun does not exist: load the tun module (`modprobe tun`), or give the \
             container the device (docker: --device /dev/net/tun --cap-add NET_ADMIN)"
        );
    }
    Ok(())
}

fn tun_error(e: std::io::Error, name: &str) -> anyhow::Error {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => anyhow!(
            "cannot create TUN device {name}: permission denied. fastmesh peer needs root or \
             CAP_NET_ADMIN (run with sudo, or `setcap cap_net_admin+ep $(which fastmesh)`)"
        ),
        _ if e.raw_os_error() == Some(libc::EPERM) => anyhow!(
            "cannot create TUN device {name}: operation not permitted. fastmesh peer needs root \
             or CAP_NET_ADMIN (run with sudo)"
        ),
        _ if e.raw_os_error() == Some(libc::EBUSY) => {
            anyhow!("cannot create TUN device {name}: it is in use (another fastmesh peer?)")
        }
        _ => anyhow!("cannot create TUN device {name}: {e}"),
    }
}

fn run_peer(a: PeerArgs) -> Result<()> {
    let f: PeerFile = match &a.config {
        Some(p) => read_toml(p)?,
        None => PeerFile::default(),
    };
    let running = f.clone();
    let cfg_path = a.config.clone();
    let hubs_by_flag = !a.hubs.is_empty();
    let heartbeat_by_flag = a.heartbeat.is_some();
    let hub_specs = if a.hubs.is_empty() {
        f.hubs.unwrap_or_default()
    } else {
        a.hubs
    };
    if hub_specs.is_empty() {
        bail!("no hub: pass --hub PUBKEY@HOST:PORT (at least one)");
    }
    let hubs = hub_specs
        .iter()
        .map(|s| parse_hub(s))
        .collect::<Result<Vec<_>>>()?;
    let fb = fallback::Fallback::parse(
        a.fallback
            .as_deref()
            .or(f.fallback.as_deref())
            .unwrap_or("tcp,tls"),
        a.tls_port.or(f.tls_port).unwrap_or(443),
    )?;
    let stream_routes =
        move |specs: &[String], hubs: &[(transport::wire::PublicKey, SocketAddr)]| {
            specs
                .iter()
                .zip(hubs)
                .map(|(s, (_, udp))| fb.route(s, *udp))
                .collect::<Vec<_>>()
        };
    let first_routes = stream_routes(&hub_specs, &hubs);
    let address = a.address.or(f.address).ok_or_else(|| {
        anyhow!("no overlay address: pass --address, e.g. --address 10.99.0.2/24")
    })?;
    let mut overlay = vec![parse_net(&address)?];
    if let Some(a6) = a.address6.or(f.address6) {
        let n = parse_net(&a6)?;
        if n.addr.is_ipv4() == overlay[0].addr.is_ipv4() {
            bail!("--address6 {a6:?} must be of the other IP family than --address");
        }
        overlay.push(n);
    }
    let listen = a.listen.or(f.listen);
    let tun_name = a.tun.or(f.tun).unwrap_or_else(|| "fm0".into());
    let mtu = a.mtu.or(f.mtu).unwrap_or_else(default_mtu);
    if !(576..=9000).contains(&mtu) {
        bail!("MTU {mtu} out of range 576..=9000");
    }
    let profile = parse_profile(&a.profile.or(f.profile).unwrap_or_else(|| "fast".into()))?;
    let key_path = a.key.or(f.key).ok_or_else(|| {
        anyhow!("no node key: pass --key FILE (create one with `fastmesh keygen --out node.key`)")
    })?;
    let net_path = a.network_key.or(f.network_key).ok_or_else(|| {
        anyhow!("no network key: pass --network-key FILE (the same file on every node)")
    })?;
    let name = a
        .name
        .or(f.name)
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "peer".into());
    let control = a
        .control
        .or(f.control)
        .unwrap_or_else(|| PathBuf::from(format!("/run/fastmesh/{tun_name}.sock")));
    let heartbeat = secs(a.heartbeat.or(f.heartbeat).unwrap_or(5.0), "heartbeat")?;
    let fallback_cfg = transport::stream::FallbackConfig {
        // Above the heartbeat interval: the hub answers each heartbeat.
        after_heard: (heartbeat * 5 / 2).max(Duration::from_secs(12)),
        ..Default::default()
    };
    let key = StaticKeypair::from_private(load_key(&key_path, "node key")?);
    let psk = load_key(&net_path, "network key")?;
    check_tun_access()?;
    let metrics_l = match a.metrics.or(f.metrics) {
        Some(m) => Some(metrics::bind(&m)?),
        None => None,
    };
    let sock = bind_udp_or_default(listen)?;
    let local = sock.local_addr()?;
    if let Some((_, h)) = hubs.iter().find(|(_, h)| h.is_ipv6() && local.is_ipv4()) {
        bail!("hub {h} is an IPv6 address but this node listens on IPv4 ({local}): listen on [::]:{} instead", local.port());
    }
    // A socket bound to one address was placed there on purpose: no port
    // mapping then.
    let port_mapping = !a.no_port_mapping
        && f.port_mapping.unwrap_or(true)
        && local.ip().is_unspecified()
        && !hubs.iter().all(|(_, h)| h.is_ipv6());

    let route_args = if a.routes.is_empty() {
        f.routes.clone().unwrap_or_default()
    } else {
        a.routes.clone()
    };
    let routes = route_args
        .iter()
        .map(|r| parse_route(r))
        .collect::<Result<Vec<_>>>()?;
    if routes.len() > transport::wire::MAX_ROUTES {
        bail!(
            "{} routes: at most {} per node",
            routes.len(),
            transport::wire::MAX_ROUTES
        );
    }
    if !routes.is_empty() {
        routing::warn_if_not_forwarding(&routes);
    }
    let offload = !a.no_offload && f.offload.unwrap_or(true);
    let split_tcp = !a.no_split_tcp && f.split_tcp.unwrap_or(true);
    let mut b = tun_rs::DeviceBuilder::new()
        .name(&tun_name)
        .mtu(mtu)
        .offload(offload);
    for n in &overlay {
        match n.addr {
            std::net::IpAddr::V4(v4) => b = b.ipv4(v4, n.prefix, None),
            std::net::IpAddr::V6(v6) => b = b.ipv6(v6, n.prefix),
        }
    }
    let dev = b.build_sync().map_err(|e| tun_error(e, &tun_name))?;
    tracing::info!(
        tun = %tun_name,
        mtu,
        offload,
        split_tcp,
        %local,
        key = %key_hex(&key.public),
        overlay = ?overlay.iter().map(|n| format!("{}/{}", n.addr, n.prefix)).collect::<Vec<_>>(),
        "peer starting"
    );
    let session = SessionConfig {
        profile,
        path_mtu: mtu as usize + frame_overhead(),
        ..SessionConfig::default()
    };
    let local_endpoints = if local.ip().is_unspecified() {
        // Every address of this host the socket can use (not loopback, not
        // the mesh's own device): peers on the same LAN reach us there.
        let port = sock.local_addr().map_or(local.port(), |a| a.port());
        local_addresses(&tun_name, local.is_ipv6())
            .into_iter()
            .map(|ip| SocketAddr::new(ip, port))
            .take(transport::wire::MAX_ADDRS - 1)
            .collect()
    } else {
        vec![local]
    };
    tracing::debug!(?local_endpoints, "local candidates");
    // The router is asked for a port mapping in the background; a mapping
    // it grants joins the candidates (registered again with the hubs).
    // Dropping `stop_mapping` at exit removes it; `mapping_gone` says when.
    let (stop_mapping, stop_rx) = std::sync::mpsc::channel::<()>();
    let (gone_tx, mapping_gone) = std::sync::mpsc::channel::<()>();
    let mapped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mapping = port_mapping.then(|| {
        let (port, mut eps) = (local.port(), local_endpoints.clone());
        let mapped = mapped.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            match portmap::map_udp(port, Duration::from_secs(2)) {
                Ok(m) => {
                    tracing::info!(external = %m.external, protocol = m.protocol(), "the router maps a public port to this node");
                    eps.insert(0, m.external);
                    eps.truncate(transport::wire::MAX_ADDRS - 1);
                    let _ = tx.send(eps);
                    mapped.store(true, std::sync::atomic::Ordering::SeqCst);
                    m.keep(stop_rx);
                    let _ = gone_tx.send(());
                }
                Err(e) => tracing::debug!("no port mapping: {e:#}"),
            }
        });
        rx
    });
    let setup = PeerSetup {
        me: key.public,
        overlay,
        name,
        local_endpoints,
        hubs,
        heartbeat: HeartbeatConfig {
            interval: heartbeat,
            ..HeartbeatConfig::default()
        },
        routes,
    };
    let sys = actix::System::new();
    let code = sys.block_on(async move {
        let sock = Arc::new(transport::Streamed::new(transport::Sprayed::new(
            transport::FastUdp::new(sock)?,
        )));
        sock.set_fallback_config(fallback_cfg);
        sock.set_hubs(first_routes);
        let dev = Arc::new(tun_rs::AsyncDevice::new(dev)?);
        let node = Node::new(
            NodeConfig {
                admission: Admission::KnownPeers,
                session,
                split: transport::split::SplitConfig {
                    enabled: split_tcp,
                    ..Default::default()
                },
                ..NodeConfig::default()
            },
            key,
            psk,
            wall_ms(),
            transport::os_entropy()?,
        );
        let (fatal_tx, mut fatal_rx) = tokio::sync::mpsc::unbounded_channel::<Fatal>();
        let sup_ctx = Context::<Supervisor>::new();
        let plane_ctx = Context::<
            Dataplane<
                transport::Streamed<transport::Sprayed<transport::FastUdp>>,
                tun_rs::AsyncDevice,
            >,
        >::new();
        let (reader, recycle) = TunReader::new(
            dev.clone(),
            plane_ctx.address().recipient(),
            mtu as usize + 64,
        );
        let plane = plane_ctx.run(Dataplane::new(
            node,
            sock.clone(),
            Some(dev),
            sup_ctx.address().recipient(),
            Some(recycle),
        ));
        reader.start();
        let (routes_tx, routes_rx) = tokio::sync::mpsc::unbounded_channel();
        actix::spawn(routing::install(tun_name.clone(), routes_rx));
        let sup = sup_ctx.run(
            Supervisor::new(
                setup,
                plane.clone().recipient(),
                plane.recipient(),
                Some(fatal_tx),
            )
            .with_route_sink(routes_tx),
        );
        if let Some(rx) = mapping {
            let s = sup.clone();
            actix::spawn(async move {
                if let Ok(eps) = rx.await {
                    s.do_send(fastmesh_actors::supervisor::SetLocalEndpoints(eps));
                }
            });
        }
        let sup_r = sup.clone();
        let sock_r = sock.clone();
        let do_reload: std::rc::Rc<dyn Fn() -> Result<String>> = std::rc::Rc::new(move || {
            let c = reload::peer(&cfg_path, &running, hubs_by_flag, heartbeat_by_flag)?;
            if let Some(h) = c.heartbeat {
                sup_r.do_send(fastmesh_actors::supervisor::SetHeartbeat(h));
            }
            if let Some(h) = c.hubs {
                sock_r.set_hubs(stream_routes(&c.hub_specs, &h));
                sup_r.do_send(fastmesh_actors::supervisor::SetHubs(h));
            }
            tracing::info!("{}", c.message);
            Ok(c.message)
        });
        on_sighup(do_reload.clone());
        let listener = control::bind(&control)?;
        let s2 = sup.clone();
        let sock_c = sock.clone();
        actix::spawn(control::serve(listener, move |line: String| {
            let s = s2.clone();
            let rl = do_reload.clone();
            let links = sock_c.hub_links();
            let streams = sock_c.stats();
            let punch = sock_c.inner().stats();
            async move {
                if line == "reload" {
                    return reload_answer(&*rl);
                }
                match s.send(GetNodeStatus).await {
                    Ok(st) => {
                        let mut v = serde_json::json!({"kind": "peer", "status": st});
                        control::add_hub_streams(&mut v, &links);
                        v["status"]["streams"] = control::streams_json(&streams);
                        v["status"]["punch"] = control::punch_json(&punch);
                        v
                    }
                    Err(e) => serde_json::json!({"kind": "error", "error": e.to_string()}),
                }
            }
        }));
        if let Some(l) = metrics_l {
            let s3 = sup.clone();
            let sock_m = sock.clone();
            actix::spawn(metrics::serve(l, move || {
                let s = s3.clone();
                let streams = sock_m.stats();
                async move {
                    match s.send(GetNodeStatus).await {
                        Ok(st) => metrics::peer_text(&st, &streams),
                        Err(_) => String::new(),
                    }
                }
            }));
        }
        let code = own_task(async move {
            tokio::select! {
                _ = shutdown_signal() => {
                    tracing::info!("peer stopping; telling the hubs");
                    // Returns once the leave messages are on the socket.
                    let _ = tokio::time::timeout(Duration::from_secs(1), sup.send(Leave)).await;
                    0
                }
                f = fatal_rx.recv() => {
                    match f {
                        Some(Fatal::Refused(m)) => eprintln!("error: the hub refused this node: {m}"),
                        None => eprintln!("error: supervisor stopped"),
                    }
                    2
                }
            }
        })
        .await
        .unwrap_or(2);
        let _ = std::fs::remove_file(&control);
        Ok::<i32, anyhow::Error>(code)
    })?;
    // Remove a port mapping: one request to the router, not waited for
    // longer than 2 s (the router may be gone).
    drop(stop_mapping);
    if mapped.load(std::sync::atomic::Ordering::SeqCst) {
        let _ = mapping_gone.recv_timeout(Duration::from_secs(2));
    }
    // The TUN device disappears with the process.
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}
