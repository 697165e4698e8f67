//! Where a [`crate::world::World`] runs: turmoil, or [`Quick`], a smaller
//! deterministic runtime of this crate for big worlds.
//!
//! turmoil 0.7 visits every link of the topology for every host on every
//! 1-ms step (links are registered between all pairs of hosts), so one step
//! costs O(hosts³) even when nothing moves: 101 idle hosts take 94 s of wall
//! time for 60 simulated seconds on this project's 2-core machine
//! (`docs/benchmarks.md`, "Simulator speed"). [`Quick`] runs every host as
//! its own `LocalSet` inside one current-thread tokio runtime with paused
//! time, so the clock jumps from one timer to the next and an idle world
//! costs nothing; datagrams go through [`QuickNet`], a switch that hands each
//! one to the socket bound at its destination at once (the worlds' latency,
//! loss and the rest come from [`crate::Impaired`], as with turmoil).
//! Crashing a host drops its `LocalSet`, with every task, actor and socket
//! in it; partitions drop datagrams between two hosts in both directions.
//!
//! Determinism: one thread, FIFO task queues, a clock that moves only when
//! every task waits, and a switch that delivers in the order of sends.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::Duration;
use transport::Datagram;

/// What a host's software returns (turmoil's convention).
pub type HostResult = Result<(), Box<dyn std::error::Error>>;

/// A host's software: built anew on every (re)start.
type Software = Rc<dyn Fn(Binder) -> Pin<Box<dyn Future<Output = HostResult>>>>;

/// The simulator a world runs in: hosts, their clock, crashes and partitions.
pub trait Fabric {
    /// Add a host running `software` (started at once and after each
    /// [`Fabric::bounce`]); it binds its sockets with the [`Binder`] it gets.
    fn host<F, Fut>(&mut self, name: &str, software: F)
    where
        F: Fn(Binder) -> Fut + 'static,
        Fut: Future<Output = HostResult> + 'static;
    /// Advance the clock by one step.
    fn step(&mut self) -> Result<(), String>;
    /// Simulated time since the start.
    fn elapsed(&self) -> Duration;
    /// Stop a host's software; its sockets go with it.
    fn crash(&mut self, name: &str);
    /// Start a host's software again (after a crash, or killing it first).
    fn bounce(&mut self, name: &str);
    /// Drop every datagram between two hosts.
    fn partition(&mut self, a: &str, b: &str);
    /// Undo [`Fabric::partition`].
    fn repair(&mut self, a: &str, b: &str);
}

impl Fabric for turmoil::Sim<'static> {
    fn host<F, Fut>(&mut self, name: &str, software: F)
    where
        F: Fn(Binder) -> Fut + 'static,
        Fut: Future<Output = HostResult> + 'static,
    {
        turmoil::Sim::host(self, name, move || software(Binder::Turmoil));
    }
    fn step(&mut self) -> Result<(), String> {
        turmoil::Sim::step(self)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
    fn elapsed(&self) -> Duration {
        turmoil::Sim::elapsed(self)
    }
    fn crash(&mut self, name: &str) {
        turmoil::Sim::crash(self, name)
    }
    fn bounce(&mut self, name: &str) {
        turmoil::Sim::bounce(self, name)
    }
    fn partition(&mut self, a: &str, b: &str) {
        turmoil::Sim::partition(self, a, b)
    }
    fn repair(&mut self, a: &str, b: &str) {
        turmoil::Sim::repair(self, a, b)
    }
}

/// How a host binds sockets and finds other hosts, in the fabric it runs in.
#[derive(Clone)]
pub enum Binder {
    /// Inside a turmoil host.
    Turmoil,
    /// Inside a [`Quick`] host with this address.
    Quick(QuickNet, IpAddr),
}

impl Binder {
    /// A UDP socket on `port` of this host.
    pub async fn bind(&self, port: u16) -> io::Result<SimUdp> {
        match self {
            Binder::Turmoil => {
                let s = turmoil::net::UdpSocket::bind((IpAddr::from([0, 0, 0, 0]), port)).await?;
                Ok(SimUdp::Turmoil(crate::turmoil_net::TurmoilUdp(s)))
            }
            Binder::Quick(net, ip) => net.bind(SocketAddr::new(*ip, port)).map(SimUdp::Quick),
        }
    }

    /// The address of host `name`.
    pub fn lookup(&self, name: &str) -> IpAddr {
        match self {
            Binder::Turmoil => turmoil::lookup(name),
            Binder::Quick(net, _) => net.lookup(name).expect("unknown host"),
        }
    }
}

/// A UDP socket of either fabric.
pub enum SimUdp {
    /// turmoil's.
    Turmoil(crate::turmoil_net::TurmoilUdp),
    /// [`QuickNet`]'s.
    Quick(QuickUdp),
}

either_datagram!(SimUdp { Turmoil, Quick });

/// Datagrams a [`QuickUdp`] holds before it drops new ones (a socket's
/// receive buffer).
pub const QUICK_RCVBUF: usize = 1024;

#[derive(Default)]
struct Inbox {
    q: VecDeque<(SocketAddr, Vec<u8>)>,
    wakers: Vec<Waker>,
}

#[derive(Default)]
struct NetState {
    names: BTreeMap<String, IpAddr>,
    sockets: BTreeMap<SocketAddr, Arc<Mutex<Inbox>>>,
    cut: BTreeSet<(IpAddr, IpAddr)>,
    sent: u64,
    dropped: u64,
}

/// [`Quick`]'s network: a switch from each datagram's sender to the socket
/// bound at its destination.
#[derive(Clone, Default)]
pub struct QuickNet(Arc<Mutex<NetState>>);

impl QuickNet {
    fn state(&self) -> std::sync::MutexGuard<'_, NetState> {
        self.0.lock().expect("quick net lock")
    }

    fn bind(&self, addr: SocketAddr) -> io::Result<QuickUdp> {
        let mut st = self.state();
        if st.sockets.contains_key(&addr) {
            return Err(io::ErrorKind::AddrInUse.into());
        }
        let inbox = Arc::new(Mutex::new(Inbox::default()));
        st.sockets.insert(addr, inbox.clone());
        Ok(QuickUdp {
            addr,
            net: self.clone(),
            inbox,
        })
    }

    fn lookup(&self, name: &str) -> Option<IpAddr> {
        self.state().names.get(name).copied()
    }

    /// Datagrams sent so far.
    pub fn sent(&self) -> u64 {
        self.state().sent
    }

    /// Datagrams dropped: no socket at the destination, a partition, or a
    /// full receive buffer.
    pub fn dropped(&self) -> u64 {
        self.state().dropped
    }

    fn deliver(&self, from: SocketAddr, to: SocketAddr, buf: &[u8]) {
        let inbox = {
            let mut st = self.state();
            st.sent += 1;
            let key = (from.ip().min(to.ip()), from.ip().max(to.ip()));
            match st.sockets.get(&to) {
                Some(i) if !st.cut.contains(&key) => i.clone(),
                _ => {
                    st.dropped += 1;
                    return;
                }
            }
        };
        let wakers = {
            let mut i = inbox.lock().expect("inbox lock");
            if i.q.len() >= QUICK_RCVBUF {
                drop(i);
                self.state().dropped += 1;
                return;
            }
            i.q.push_back((from, buf.to_vec()));
            std::mem::take(&mut i.wakers)
        };
        for w in wakers {
            w.wake();
        }
    }
}

/// A UDP socket on a [`QuickNet`].
pub struct QuickUdp {
    addr: SocketAddr,
    net: QuickNet,
    inbox: Arc<Mutex<Inbox>>,
}

impl QuickUdp {
    fn send_now(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.net.deliver(self.addr, to, buf);
        Ok(buf.len())
    }

    fn recv_now(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let (from, data) = self
            .inbox
            .lock()
            .map_err(|_| io::Error::other("inbox lock"))?
            .q
            .pop_front()
            .ok_or(io::ErrorKind::WouldBlock)?;
        let n = data.len().min(buf.len());
        buf[..n].copy_from_slice(&data[..n]);
        Ok((n, from))
    }

    fn poll_readable(&self, waker: &Waker) -> Poll<io::Result<()>> {
        let mut i = self
            .inbox
            .lock()
            .map_err(|_| io::Error::other("inbox lock"))?;
        if !i.q.is_empty() {
            return Poll::Ready(Ok(()));
        }
        if !i.wakers.iter().any(|w| w.will_wake(waker)) {
            i.wakers.push(waker.clone());
        }
        Poll::Pending
    }
}

impl Datagram for QuickUdp {
    fn send_to(
        &self,
        buf: &[u8],
        to: SocketAddr,
    ) -> impl Future<Output = io::Result<usize>> + Send {
        std::future::ready(self.send_now(buf, to))
    }
    fn recv_from(
        &self,
        buf: &mut [u8],
    ) -> impl Future<Output = io::Result<(usize, SocketAddr)>> + Send {
        crate::turmoil_net::recv_when_readable(self, buf)
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        std::future::poll_fn(|cx| self.poll_readable(cx.waker()))
    }
    fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.recv_now(buf)
    }
    fn try_send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.send_now(buf, to)
    }
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
        std::future::ready(Ok(()))
    }
}

impl Drop for QuickUdp {
    fn drop(&mut self) {
        if let Ok(mut st) = self.net.0.lock() {
            st.sockets.remove(&self.addr);
        }
    }
}

struct QuickHost {
    ip: IpAddr,
    software: Software,
    running: Option<tokio::task::JoinHandle<HostResult>>,
}

/// A deterministic runtime for big worlds (see the module docs).
pub struct Quick {
    rt: tokio::runtime::Runtime,
    local: tokio::task::LocalSet,
    net: QuickNet,
    hosts: BTreeMap<String, QuickHost>,
    start: tokio::time::Instant,
    tick: Duration,
    limit: Duration,
    failed: Rc<RefCell<Option<String>>>,
}

impl Quick {
    /// A runtime whose [`Fabric::step`] advances `tick` and that refuses to
    /// run past `limit`.
    pub fn new(tick: Duration, limit: Duration) -> Quick {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("tokio runtime");
        let start = {
            let _g = rt.enter();
            tokio::time::Instant::now()
        };
        Quick {
            rt,
            local: tokio::task::LocalSet::new(),
            net: QuickNet::default(),
            hosts: BTreeMap::new(),
            start,
            tick,
            limit,
            failed: Rc::default(),
        }
    }

    /// The network, for its counters.
    pub fn net(&self) -> &QuickNet {
        &self.net
    }

    fn start_host(&mut self, name: &str) {
        let Some(h) = self.hosts.get_mut(name) else {
            return;
        };
        let fut = (h.software)(Binder::Quick(self.net.clone(), h.ip));
        let failed = self.failed.clone();
        let name = name.to_string();
        h.running = Some(self.local.spawn_local(async move {
            // The host's own set: dropping it (a crash) drops every task the
            // software spawned, actors and sockets included.
            let own = tokio::task::LocalSet::new();
            let r = own.run_until(fut).await;
            if let Err(e) = &r {
                failed
                    .borrow_mut()
                    .get_or_insert(format!("host {name}: {e}"));
            }
            r
        }));
    }

    fn stop_host(&mut self, name: &str) {
        if let Some(t) = self.hosts.get_mut(name).and_then(|h| h.running.take()) {
            t.abort();
            // Let the runtime drop the aborted host now, as turmoil does.
            self.local.block_on(&self.rt, tokio::task::yield_now());
        }
    }
}

impl Fabric for Quick {
    fn host<F, Fut>(&mut self, name: &str, software: F)
    where
        F: Fn(Binder) -> Fut + 'static,
        Fut: Future<Output = HostResult> + 'static,
    {
        let n = self.hosts.len() as u32 + 1;
        let ip = IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(192, 168, 0, 0)) + n));
        self.net.state().names.insert(name.to_string(), ip);
        let software: Software = Rc::new(move |b| Box::pin(software(b)));
        self.hosts.insert(
            name.to_string(),
            QuickHost {
                ip,
                software,
                running: None,
            },
        );
        self.start_host(name);
    }

    fn step(&mut self) -> Result<(), String> {
        if self.elapsed() >= self.limit {
            return Err(format!("simulation ran past its limit of {:?}", self.limit));
        }
        let tick = self.tick;
        self.local
            .block_on(&self.rt, async move { tokio::time::sleep(tick).await });
        for (name, h) in &mut self.hosts {
            if h.running.as_ref().is_some_and(|t| t.is_finished()) {
                let t = h.running.take().expect("checked");
                if let Err(e) = self.rt.block_on(t) {
                    if e.is_panic() {
                        std::panic::resume_unwind(e.into_panic());
                    }
                }
                if let Some(f) = self.failed.borrow_mut().take() {
                    return Err(f);
                }
                return Err(format!("host {name} stopped"));
            }
        }
        Ok(())
    }

    fn elapsed(&self) -> Duration {
        let _g = self.rt.enter();
        tokio::time::Instant::now() - self.start
    }

    fn crash(&mut self, name: &str) {
        self.stop_host(name);
    }

    fn bounce(&mut self, name: &str) {
        self.stop_host(name);
        self.start_host(name);
    }

    fn partition(&mut self, a: &str, b: &str) {
        if let (Some(x), Some(y)) = (self.net.lookup(a), self.net.lookup(b)) {
            self.net.state().cut.insert((x.min(y), x.max(y)));
        }
    }

    fn repair(&mut self, a: &str, b: &str) {
        if let (Some(x), Some(y)) = (self.net.lookup(a), self.net.lookup(b)) {
            self.net.state().cut.remove(&(x.min(y), x.max(y)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two hosts: a pinger and an echo; a partition stops the echoes, a
    /// repair brings them back, and a crashed echo host unbinds its socket.
    #[test]
    fn quick_hosts_exchange_datagrams_partitions_and_crashes() {
        let mut q = Quick::new(Duration::from_millis(1), Duration::from_secs(60));
        q.host("echo", |b: Binder| async move {
            let s = b.bind(7).await?;
            let mut buf = [0u8; 64];
            loop {
                let (n, from) = s.recv_from(&mut buf).await?;
                s.send_to(&buf[..n], from).await?;
            }
        });
        let got = Rc::new(RefCell::new(Vec::<Duration>::new()));
        let g = got.clone();
        q.host("ping", move |b: Binder| {
            let g = g.clone();
            async move {
                let s = Arc::new(b.bind(9).await?);
                let echo = SocketAddr::new(b.lookup("echo"), 7);
                let r = s.clone();
                let start = tokio::time::Instant::now();
                tokio::task::spawn_local(async move {
                    let mut buf = [0u8; 64];
                    while r.recv_from(&mut buf).await.is_ok() {
                        g.borrow_mut().push(start.elapsed());
                    }
                });
                loop {
                    s.send_to(b"ping", echo).await?;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        });
        let run = |q: &mut Quick, secs: u64| {
            let until = q.elapsed() + Duration::from_secs(secs);
            while q.elapsed() < until {
                q.step().expect("step");
            }
        };
        run(&mut q, 5);
        let five = got.borrow().len();
        assert!((4..=6).contains(&five), "{five} echoes in 5 s");
        q.partition("ping", "echo");
        run(&mut q, 5);
        assert_eq!(got.borrow().len(), five, "no echo through a partition");
        q.repair("echo", "ping");
        run(&mut q, 5);
        let healed = got.borrow().len();
        assert!(healed >= five + 4, "{healed} echoes after the repair");
        let dropped = q.net().dropped();
        q.crash("echo");
        run(&mut q, 3);
        assert_eq!(got.borrow().len(), healed, "a crashed host answers nothing");
        assert!(
            q.net().dropped() >= dropped + 2,
            "pings to a crashed host are dropped"
        );
        q.bounce("echo");
        run(&mut q, 3);
        assert!(
            got.borrow().len() >= healed + 2,
            "the restarted host answers again"
        );
    }
}
