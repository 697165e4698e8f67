//! `fastmesh-lab hubload N [SECS] [HEARTBEAT]`: N simulated members against
//! one real `fastmesh hub`, to measure what a hub costs at scale.
//!
//! The hub runs in one namespace; the load generator (`hubload-gen`) runs in
//! another, as one process: one `Node` (the real protocol core, real Noise
//! handshakes, real registration, heartbeats and peer-map deltas) and one UDP
//! socket per member, the members spread over up to 250 source addresses
//! (the hub limits handshakes per source address). Members do not talk to
//! each other: the load is the hub's.
//!
//! Phases, printed as they end: all N join at once (time until every one is
//! registered); steady state for SECS (the parent samples the hub's CPU and
//! RSS, the generator counts frames per member each way); one change (one
//! more member joins: time until all N hold the new map version).
//!
//! With MAP `on-demand` (the hub's `--peer-map on-demand`) no member gets a
//! map; the last phase is then: one more member joins, all N look it up at
//! once (time until all N hold its record), and its record changes (it
//! registers again under another name: time until all N see the change).

use anyhow::{bail, Context, Result};
use fastmesh_actors::peermap::PeerMap;
use fastmesh_actors::store::parse_key_hex;
use fastmesh_tests::lab::{proc_cpu_secs, proc_status, Lab};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};
use transport::crypto::{EntropySource, StaticKeypair};
use transport::wire::{Control, IpNet, PublicKey};
use transport::{Driver, Event, Node, NodeConfig};

/// Most source addresses the generator spreads its members over.
const SOURCES: u32 = 250;

/// `fastmesh-lab hubload N [SECS] [HEARTBEAT]`.
pub fn hubload(args: &[&str]) -> Result<()> {
    let n: u32 = args
        .first()
        .context("usage: fastmesh-lab hubload N [SECS] [HEARTBEAT]")?
        .parse()
        .context("N")?;
    let secs: u64 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(30);
    let hb: f64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(10.0);
    let map = args.get(3).copied().unwrap_or("full");
    if !["full", "on-demand"].contains(&map) {
        bail!("MAP: full or on-demand");
    }
    if !(1..=60_000).contains(&n) {
        bail!("N between 1 and 60000");
    }
    let mut lab = Lab::new("fmh", 54, 1)?;
    lab.start_hub_with(0, hb, &["--peer-map", map])?;
    let hub_pid = lab.pid(0).context("hub pid")?;
    // The generator's source addresses: .3 to .252 of its /24 (.1 is the
    // router, .2 the node's own).
    let gen = lab.nodes[1].underlay;
    let sources = n.min(SOURCES);
    let dev = format!("{}b1", lab.prefix);
    let mut batch = String::new();
    for i in 0..sources {
        let o = gen.octets();
        batch.push_str(&format!(
            "addr add {}.{}.{}.{}/24 dev {dev}\n",
            o[0],
            o[1],
            o[2],
            3 + i
        ));
    }
    let file = lab.path("addrs.batch");
    std::fs::write(&file, batch)?;
    lab.exec(1, "ip", &["-batch", &file])?;
    let hub_spec = lab.hub_spec(0)?;
    let (hub_key, hub_addr) = hub_spec.split_once('@').context("hub spec")?;
    let me = std::env::current_exe()?.to_string_lossy().into_owned();
    let nk = lab.path("network.key");
    let (ns, hb_s, secs_s) = (n.to_string(), hb.to_string(), secs.to_string());
    let gen_prefix = format!(
        "{}.{}.{}",
        gen.octets()[0],
        gen.octets()[1],
        gen.octets()[2]
    );
    let rss0 = proc_status(hub_pid, "VmRSS");
    let mut child = lab.spawn(
        1,
        "hubload.log",
        &me,
        &[
            "hubload-gen",
            hub_key,
            hub_addr,
            &nk,
            &ns,
            &secs_s,
            &hb_s,
            &gen_prefix,
            &sources.to_string(),
            map,
        ],
    )?;
    // Steady state: the generator prints "steady" when it starts its window.
    let log = std::path::PathBuf::from(lab.path("hubload.log"));
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut sampled = None;
    let mut failed = None;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if sampled.is_none() && text.contains("steady start") {
            let c0 = proc_cpu_secs(hub_pid);
            let t0 = Instant::now();
            // The window, less a second at each end.
            std::thread::sleep(Duration::from_secs(secs.saturating_sub(2).max(1)));
            let cpu = (proc_cpu_secs(hub_pid) - c0) / t0.elapsed().as_secs_f64();
            sampled = Some((cpu, proc_status(hub_pid, "VmRSS")));
        }
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                // Still show what the hub counted: it tells why.
                failed = Some(format!("{text}\n(generator: {status})"));
            }
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("generator did not finish:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = std::fs::read_to_string(&log)?;
    if failed.is_none() {
        print!("{text}");
    }
    // What the hub dropped or refused, and what its kernel dropped before
    // the hub read it (a join that needs retries shows why here).
    if let Ok(o) = lab.exec(0, "cat", &["/proc/net/snmp"]) {
        let text = String::from_utf8_lossy(&o.stdout);
        let udp: Vec<&str> = text.lines().filter(|l| l.starts_with("Udp:")).collect();
        if let [names, values] = udp[..] {
            let field = |f: &str| {
                names
                    .split_whitespace()
                    .position(|n| n == f)
                    .and_then(|i| values.split_whitespace().nth(i))
                    .unwrap_or("?")
                    .to_string()
            };
            println!(
                "hub's namespace: {} UDP datagrams received, {} dropped for a full receive buffer",
                field("InDatagrams"),
                field("RcvbufErrors")
            );
        }
    }
    if let Ok(v) = lab.status(0) {
        if let Some(c) = v["status"]["counters"].as_object() {
            let drops: Vec<String> = c
                .iter()
                .filter(|(k, v)| {
                    !k.starts_with("udp_")
                        && !k.starts_with("plane_")
                        && v.as_u64().is_some_and(|n| n > 0)
                })
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            println!(
                "hub counters (drops, refusals): {}",
                if drops.is_empty() {
                    "none".into()
                } else {
                    drops.join(", ")
                }
            );
        }
    }
    if let Some(text) = failed {
        bail!("generator failed:\n{text}\n{}", lab.logs());
    }
    let (cpu, rss) = sampled.context("no steady window")?;
    println!(
        "hub at steady state: {:.1}% of one core, RSS {:.1} MB (at start {:.1} MB)",
        cpu * 100.0,
        rss as f64 / 1024.0,
        rss0 as f64 / 1024.0
    );
    Ok(())
}

/// What every member shares with the run.
#[derive(Default)]
struct Shared {
    registered: u32,
    frames_tx: u64,
    frames_rx: u64,
    /// Each member's peer-map version.
    versions: Vec<u64>,
    /// Deltas that did not apply (a gap: the member resynchronises).
    failures: u64,
    /// Refusals from the hub.
    nacks: u64,
    /// Woken when a member registers or its map version moves.
    changed: Rc<tokio::sync::Notify>,
    /// Members not registered yet, by the state of their hub session.
    waiting: BTreeMap<u32, String>,
    /// On demand: what members are asked to do now.
    phase: Phase,
    /// On demand: the key of the member all look up, and which of its
    /// records each member holds (0 none, 1 the first, 2 the changed one).
    target: Option<PublicKey>,
    held: Vec<u8>,
    /// Records members received (theirs and others').
    records: u64,
}

/// What the on-demand members do next (on a poke).
#[derive(Default, Clone, Copy, PartialEq)]
enum Phase {
    #[default]
    Idle,
    /// Every member looks this address up.
    Lookup(IpAddr),
    /// The target registers again under another name.
    Rename,
}

/// One member's output to its socket.
struct Out<'a> {
    sock: &'a tokio::net::UdpSocket,
    sent: u64,
    events: Vec<Event>,
}

impl Driver for Out<'_> {
    fn transmit(&mut self, to: SocketAddr, frame: &[u8]) -> bool {
        // A full socket buffer drops the frame (KCP resends control).
        let _ = self.sock.try_send_to(frame, to);
        self.sent += 1;
        true
    }
    fn deliver(&mut self, _from: &PublicKey, _pkt: Vec<u8>) {}
    fn event(&mut self, _peer: PublicKey, _ep: Option<SocketAddr>, event: Event) {
        self.events.push(event);
    }
}

/// `fastmesh-lab hubload-gen HUBKEY HUBADDR NETKEYFILE N SECS HB PREFIX SOURCES`
/// (run by `hubload` in its namespace).
pub fn generator(args: &[&str]) -> Result<()> {
    let [hub_key, hub_addr, nk, n, secs, hb, prefix, sources, map] = args else {
        bail!("hubload-gen: 9 arguments");
    };
    let on_demand = *map == "on-demand";
    let hub_key = parse_key_hex(hub_key).context("hub key")?;
    let hub_addr: SocketAddr = hub_addr.parse()?;
    let psk = parse_key_hex(std::fs::read_to_string(nk)?.trim()).context("network key")?;
    let n: u32 = n.parse()?;
    let secs: u64 = secs.parse()?;
    let hb = Duration::from_secs_f64(hb.parse()?);
    let sources: u32 = sources.parse()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let shared = Rc::new(RefCell::new(Shared {
            versions: vec![0; n as usize + 1],
            held: vec![0; n as usize + 1],
            ..Shared::default()
        }));
        // Members read the phase from `shared` whenever this moves (a watch
        // misses no change, unlike a notification to whoever waits now).
        let (poke_tx, poke) = tokio::sync::watch::channel(0u32);
        let epoch = tokio::time::Instant::now();
        let addr = |i: u32| -> IpAddr { format!("{prefix}.{}", 3 + i % sources).parse().unwrap() };
        let t0 = Instant::now();
        for i in 0..n {
            let m = Member::new(i, addr(i), hub_key, hub_addr, psk, hb, poke.clone()).await?;
            tokio::task::spawn_local(m.run(shared.clone(), epoch));
        }
        let changed = shared.borrow().changed.clone();
        // Phase 1: all join (progress every 5 s: a slow join shows whether
        // everyone is slow or a few stragglers are left).
        loop {
            if until(&changed, Duration::from_secs(5), || shared.borrow().registered >= n).await {
                break;
            }
            let k = shared.borrow().registered;
            if t0.elapsed() > Duration::from_secs(300) {
                bail!("only {k} of {n} registered after 300 s");
            }
            let mut states: BTreeMap<String, u32> = BTreeMap::new();
            for st in shared.borrow().waiting.values() {
                *states.entry(st.clone()).or_default() += 1;
            }
            println!("  {k} of {n} registered after {:.0} s; the others' hub sessions: {states:?}", t0.elapsed().as_secs_f64());
        }
        println!(
            "{n} members joining at once: all registered after {:.2} s",
            t0.elapsed().as_secs_f64()
        );
        // Let the joins' map pushes settle (one heartbeat and a bit).
        tokio::time::sleep(hb + Duration::from_secs(2)).await;
        // Phase 2: steady state.
        let (tx0, rx0) = {
            let s = shared.borrow();
            (s.frames_tx, s.frames_rx)
        };
        println!("steady start");
        let w = Instant::now();
        tokio::time::sleep(Duration::from_secs(secs)).await;
        let dt = w.elapsed().as_secs_f64();
        let (tx1, rx1) = {
            let s = shared.borrow();
            (s.frames_tx, s.frames_rx)
        };
        println!(
            "steady state ({n} idle members, heartbeat {:.0} s): {:.2} frames/s per member to the hub, {:.2} from it",
            hb.as_secs_f64(),
            (tx1 - tx0) as f64 / dt / n as f64,
            (rx1 - rx0) as f64 / dt / n as f64
        );
        if on_demand {
            let extra = Member::new(n, addr(n), hub_key, hub_addr, psk, hb, poke.clone()).await?;
            return on_demand_change(n, shared, &poke_tx, epoch, extra).await;
        }
        // Phase 3: one change reaches everyone.
        let t1 = Instant::now();
        let extra = Member::new(n, addr(n), hub_key, hub_addr, psk, hb, poke.clone()).await?;
        let version = Rc::new(RefCell::new(None));
        tokio::task::spawn_local(extra.run_reporting(shared.clone(), epoch, version.clone()));
        if !until(&changed, Duration::from_secs(60), || version.borrow().is_some()).await {
            bail!("the extra member did not register");
        }
        let v = version.borrow().expect("checked");
        let registered_after = t1.elapsed();
        let have = |s: &Shared| s.versions[..n as usize].iter().filter(|&&x| x >= v).count();
        if !until(&changed, Duration::from_secs(120), || {
            have(&shared.borrow()) >= n as usize
        })
        .await
        {
            bail!(
                "{} of {n} members hold version {v} after 120 s",
                have(&shared.borrow())
            );
        }
        println!(
            "one change (a member joins, registered after {:.3} s): seen by all {n} after {:.3} s",
            registered_after.as_secs_f64(),
            t1.elapsed().as_secs_f64()
        );
        let (f, k) = (shared.borrow().failures, shared.borrow().nacks);
        println!("deltas that did not apply (the member resynchronised): {f}; refusals: {k}");
        Ok(())
    })
}

/// The last phase on demand: `extra` joins, all `n` look it up at once,
/// then its record changes.
async fn on_demand_change(
    n: u32,
    shared: Rc<RefCell<Shared>>,
    poke: &tokio::sync::watch::Sender<u32>,
    epoch: tokio::time::Instant,
    extra: Member,
) -> Result<()> {
    let changed = shared.borrow().changed.clone();
    let t1 = Instant::now();
    let target_addr = extra.overlay();
    shared.borrow_mut().target = Some(extra.node.public_key().to_owned());
    let version = Rc::new(RefCell::new(None));
    let reg0 = shared.borrow().registered;
    tokio::task::spawn_local(extra.run_reporting(shared.clone(), epoch, version));
    if !until(&changed, Duration::from_secs(60), || {
        shared.borrow().registered > reg0
    })
    .await
    {
        bail!("the extra member did not register");
    }
    println!(
        "one more member registered after {:.3} s",
        t1.elapsed().as_secs_f64()
    );
    let records0 = shared.borrow().records;
    let t2 = Instant::now();
    shared.borrow_mut().phase = Phase::Lookup(target_addr);
    poke.send_modify(|v| *v += 1);
    let have = |s: &Shared, g: u8| s.held[..n as usize].iter().filter(|&&x| x >= g).count();
    if !until(&changed, Duration::from_secs(120), || {
        have(&shared.borrow(), 1) >= n as usize
    })
    .await
    {
        bail!(
            "{} of {n} members hold its record after 120 s",
            have(&shared.borrow(), 1)
        );
    }
    println!(
        "all {n} members look it up at once: all hold its record after {:.3} s",
        t2.elapsed().as_secs_f64()
    );
    // Let the pairing records (its copy of every asker's) arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t3 = Instant::now();
    shared.borrow_mut().phase = Phase::Rename;
    poke.send_modify(|v| *v += 1);
    if !until(&changed, Duration::from_secs(120), || {
        have(&shared.borrow(), 2) >= n as usize
    })
    .await
    {
        bail!(
            "{} of {n} members saw its change after 120 s",
            have(&shared.borrow(), 2)
        );
    }
    println!(
        "one change (its record changes): seen by all {n} after {:.3} s",
        t3.elapsed().as_secs_f64()
    );
    let (k, r) = (shared.borrow().nacks, shared.borrow().records - records0);
    println!("records received in the last phase: {r} (the asked member's and the askers'); refusals: {k}");
    Ok(())
}

/// Wait until `done()` holds, woken by the members' notifications (no
/// polling); false if `limit` passes first.
async fn until(
    changed: &tokio::sync::Notify,
    limit: Duration,
    mut done: impl FnMut() -> bool,
) -> bool {
    let end = tokio::time::Instant::now() + limit;
    while !done() {
        tokio::select! {
            _ = changed.notified() => {}
            _ = tokio::time::sleep_until(end) => return done(),
        }
    }
    true
}

struct Member {
    i: u32,
    node: Node,
    sock: tokio::net::UdpSocket,
    hub: PublicKey,
    hb: Duration,
    map: PeerMap,
    poke: tokio::sync::watch::Receiver<u32>,
    /// The name it registers under now.
    name: String,
}

impl Member {
    async fn new(
        i: u32,
        ip: IpAddr,
        hub: PublicKey,
        hub_addr: SocketAddr,
        psk: [u8; 32],
        hb: Duration,
        poke: tokio::sync::watch::Receiver<u32>,
    ) -> Result<Member> {
        let sock = tokio::net::UdpSocket::bind(SocketAddr::new(ip, 0))
            .await
            .with_context(|| format!("bind {ip}"))?;
        let kp = StaticKeypair::from_seed(0x4855_4200_0000 + i as u64);
        let me = kp.public;
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut node = Node::new(
            NodeConfig::default(),
            kp,
            psk,
            wall,
            EntropySource::seeded(i as u64 ^ 0x6c6f_6164),
        );
        // As a peer's supervisor does: its sessions time keepalives by it.
        node.set_heartbeat(hb);
        node.add_peer(hub, Some(hub_addr));
        // As a peer does: its hubs are relays, their sessions carry control.
        node.set_relays(&[hub]);
        Ok(Member {
            i,
            node,
            sock,
            hub,
            hb,
            map: PeerMap::new(me),
            poke,
            name: format!("load{i}"),
        })
    }

    fn overlay(&self) -> IpAddr {
        let o = self.i.to_be_bytes();
        IpAddr::V4(Ipv4Addr::new(10, 100 + o[1], o[2], o[3]))
    }

    fn register_msg(&self) -> Control {
        Control::Register {
            overlay: vec![IpNet {
                addr: self.overlay(),
                prefix: 8,
            }],
            local_endpoints: vec![],
            name: self.name.clone(),
            have_version: self.map.version(),
            routes: vec![],
            lookups: true,
        }
    }

    async fn run(self, shared: Rc<RefCell<Shared>>, epoch: tokio::time::Instant) {
        self.run_reporting(shared, epoch, Rc::new(RefCell::new(None)))
            .await
    }

    /// Drive the member; `version` gets the map version its registration
    /// produced (the hub's version in the first delta it receives).
    async fn run_reporting(
        mut self,
        shared: Rc<RefCell<Shared>>,
        epoch: tokio::time::Instant,
        version: Rc<RefCell<Option<u64>>>,
    ) {
        let hub = self.hub;
        let _ = self.node.connect(epoch.elapsed(), &hub);
        let mut buf = vec![0u8; 2048];
        let mut registered = false;
        let mut next_hb: Option<tokio::time::Instant> = None;
        let mut seq = 0u64;
        let mut last_register = tokio::time::Instant::now();
        // The lookup of the last phase went out (since the last registration).
        let mut asked = false;
        // Frames received (for the state of members not registered yet).
        let mut rx = 0u64;
        loop {
            let now = epoch.elapsed();
            let mut out = Out {
                sock: &self.sock,
                sent: 0,
                events: Vec::new(),
            };
            let next = self.node.service(now, &mut out);
            let (sent, events) = (out.sent, out.events);
            shared.borrow_mut().frames_tx += sent;
            for e in events {
                match e {
                    Event::Established | Event::PeerRestarted | Event::Recovered => {
                        let m = self.register_msg();
                        self.node.send_control_reliable(epoch.elapsed(), &hub, &m);
                        last_register = tokio::time::Instant::now();
                    }
                    Event::Control(Control::RegisterAck { .. }) => {
                        // A registration again: the hub forgot what we
                        // held; ask again, as a peer does for every record
                        // it keeps.
                        let target = shared.borrow().target;
                        if let (Some(t), true) = (target, shared.borrow().held[self.i as usize] > 0)
                        {
                            let m = Control::Lookup {
                                addrs: vec![],
                                keys: vec![t],
                            };
                            self.node.send_control_reliable(epoch.elapsed(), &hub, &m);
                        }
                        if let (Phase::Lookup(a), false) = (shared.borrow().phase, asked) {
                            if shared.borrow().target != Some(*self.node.public_key()) {
                                let m = Control::Lookup {
                                    addrs: vec![a],
                                    keys: vec![],
                                };
                                self.node.send_control_reliable(epoch.elapsed(), &hub, &m);
                                asked = true;
                            }
                        }
                        if !registered {
                            registered = true;
                            shared.borrow_mut().registered += 1;
                            shared.borrow().changed.notify_one();
                        }
                        next_hb = Some(tokio::time::Instant::now() + self.hb);
                    }
                    Event::Control(Control::PeerMapDelta {
                        from_version,
                        to_version,
                        upserts,
                        removals,
                        ..
                    }) => {
                        if self
                            .map
                            .apply(from_version, to_version, &upserts, &removals)
                            .is_err()
                        {
                            shared.borrow_mut().failures += 1;
                        }
                        shared.borrow_mut().versions[self.i as usize] = self.map.version();
                        if version.borrow().is_none() && registered {
                            *version.borrow_mut() = Some(to_version);
                        }
                        shared.borrow().changed.notify_one();
                    }
                    Event::Control(Control::Nack { code, .. }) => {
                        shared.borrow_mut().nacks += 1;
                        if code == transport::wire::ErrorCode::NotAllowed {
                            // The hub expired us (our heartbeats were lost
                            // while it was busy): register again, as a peer does.
                            let m = self.register_msg();
                            self.node.send_control_reliable(epoch.elapsed(), &hub, &m);
                            asked = false;
                        }
                    }
                    Event::Control(Control::Records { upserts, .. }) => {
                        let mut s = shared.borrow_mut();
                        s.records += upserts.len() as u64;
                        if let Some(t) = s.target {
                            if let Some(p) = upserts.iter().find(|p| p.key == t) {
                                s.held[self.i as usize] =
                                    if p.name.ends_with("-moved") { 2 } else { 1 };
                                s.changed.notify_one();
                            }
                        }
                    }
                    _ => {}
                }
            }
            if !registered {
                let st = match self.node.session(&hub) {
                    None => "no session".to_string(),
                    Some(s) => {
                        let x = s.stats();
                        let n = self.node.stats();
                        format!(
                            "established {} handshaking {} dead {} handshakes {} retransmits {} control backlog {} unknown index {} rx {}",
                            s.is_established(),
                            s.handshaking(),
                            s.is_dead(),
                            x.handshakes,
                            x.retransmits,
                            x.control_backlog_dropped,
                            n.unknown_index.min(3),
                            rx.min(3)
                        )
                    }
                };
                shared.borrow_mut().waiting.insert(self.i, st);
            } else {
                shared.borrow_mut().waiting.remove(&self.i);
            }
            if !registered && last_register.elapsed() > Duration::from_secs(5) {
                // Lost registration (or handshake): start over, as the
                // supervisor does: a fresh handshake, and the registration
                // again as a datagram (a session that stays established
                // raises no event to send it on).
                let _ = self.node.connect(epoch.elapsed(), &hub);
                let m = self.register_msg();
                self.node.send_control(&hub, &m);
                last_register = tokio::time::Instant::now();
            }
            let wake = next
                .map(|t| epoch + t)
                .into_iter()
                .chain(next_hb)
                .min()
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(1));
            tokio::select! {
                biased;
                r = self.sock.recv_from(&mut buf) => {
                    if let Ok((k, from)) = r {
                        shared.borrow_mut().frames_rx += 1;
                        rx += 1;
                        self.node.handle_datagram(epoch.elapsed(), from, &mut buf[..k]);
                    }
                }
                _ = tokio::time::sleep_until(wake) => {}
                _ = self.poke.changed() => {
                    let phase = shared.borrow().phase;
                    let me = *self.node.public_key();
                    match phase {
                        Phase::Lookup(a) if shared.borrow().target != Some(me) => {
                            let m = Control::Lookup { addrs: vec![a], keys: vec![] };
                            self.node.send_control_reliable(epoch.elapsed(), &hub, &m);
                            asked = true;
                        }
                        Phase::Rename if shared.borrow().target == Some(me) => {
                            self.name = format!("load{}-moved", self.i);
                            let m = self.register_msg();
                            self.node.send_control_reliable(epoch.elapsed(), &hub, &m);
                        }
                        _ => {}
                    }
                }
            }
            if next_hb.is_some_and(|t| t <= tokio::time::Instant::now()) {
                seq += 1;
                let m = Control::Heartbeat {
                    seq,
                    map_version: self.map.version(),
                };
                self.node.send_control(&hub, &m);
                next_hb = Some(tokio::time::Instant::now() + self.hb);
            }
        }
    }
}
