//! A NAT in front of one simulated host, as a [`Datagram`] wrapper.
//!
//! The simulators route host to host with no address translation, so the NAT is
//! modelled at the host's socket: a pool of sockets bound on seeded random
//! ports stands for the NAT's public ports.
//!
//! * [`NatKind::Cone`]: one public port for every destination (Linux
//!   masquerade keeps the source port when it can).
//! * [`NatKind::Random`]: a new public port for each destination (masquerade
//!   `fully-random`, a "symmetric" NAT): the port the hub sees is not the one
//!   another peer would have to use.
//!
//! Both filter like a stateful firewall: a datagram arriving on a public port
//! is passed in only if the host sent to that exact address from that port in
//! the last [`MAPPING_TIMEOUT`]; the rest are dropped and counted. A flush
//! forgets every mapping (a NAT reboot, or conntrack -F): a cone NAT keeps its
//! port, a random one hands out new ports from then on.

use crate::fabric::{Binder, SimUdp};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;
use tokio::time::Instant;
use transport::Datagram;

/// How the NAT maps ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    /// One public port for all destinations.
    Cone,
    /// A new random public port per destination.
    Random,
}

/// How long a mapping lets answers in after the last datagram out.
pub const MAPPING_TIMEOUT: Duration = Duration::from_secs(30);

/// Public ports a random NAT hands out before it reuses them.
const POOL: usize = 16;

struct NatState {
    /// Destination -> pool index (random kind).
    map: BTreeMap<SocketAddr, usize>,
    /// Next pool socket for a new mapping.
    next: usize,
    /// (pool index, remote) -> last datagram out.
    opened: BTreeMap<(usize, SocketAddr), Instant>,
}

/// A host's socket behind a NAT.
pub struct SimNat {
    kind: NatKind,
    pool: Vec<Arc<SimUdp>>,
    state: Mutex<NatState>,
    dropped: AtomicU64,
}

impl SimNat {
    /// A NAT of `kind` on this host (`binder`) whose public ports come from `seed`.
    pub async fn bind(binder: &Binder, kind: NatKind, seed: u64) -> io::Result<SimNat> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n = match kind {
            NatKind::Cone => 1,
            NatKind::Random => POOL,
        };
        let mut pool = Vec::with_capacity(n);
        while pool.len() < n {
            let port: u16 = rng.random_range(20_000..60_000);
            if let Ok(s) = binder.bind(port).await {
                pool.push(Arc::new(s));
            }
        }
        Ok(SimNat {
            kind,
            pool,
            state: Mutex::new(NatState {
                map: BTreeMap::new(),
                next: 0,
                opened: BTreeMap::new(),
            }),
            dropped: AtomicU64::new(0),
        })
    }

    /// Forget every mapping.
    pub fn flush(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.map.clear();
            s.opened.clear();
        }
    }

    /// Inbound datagrams the filter dropped.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn state(&self) -> io::Result<std::sync::MutexGuard<'_, NatState>> {
        self.state.lock().map_err(|_| io::Error::other("nat lock"))
    }

    /// The public port (pool index) for datagrams to `to`; opens the filter.
    fn map_out(&self, to: SocketAddr) -> io::Result<usize> {
        let mut s = self.state()?;
        let i = match self.kind {
            NatKind::Cone => 0,
            NatKind::Random => match s.map.get(&to) {
                Some(&i) => i,
                None => {
                    let i = s.next % self.pool.len();
                    s.next += 1;
                    // The port now belongs to `to` alone.
                    s.map.retain(|_, v| *v != i);
                    s.opened.retain(|(p, _), _| *p != i);
                    s.map.insert(to, i);
                    i
                }
            },
        };
        s.opened.insert((i, to), Instant::now());
        Ok(i)
    }

    fn allowed(&self, i: usize, from: SocketAddr) -> bool {
        self.state().is_ok_and(|s| {
            s.opened
                .get(&(i, from))
                .is_some_and(|t| t.elapsed() < MAPPING_TIMEOUT)
        })
    }
}

impl Datagram for SimNat {
    fn send_to(
        &self,
        buf: &[u8],
        to: SocketAddr,
    ) -> impl Future<Output = io::Result<usize>> + Send {
        let r = self.map_out(to).map(|i| self.pool[i].clone());
        async move { r?.send_to(buf, to).await }
    }
    fn recv_from(
        &self,
        buf: &mut [u8],
    ) -> impl Future<Output = io::Result<(usize, SocketAddr)>> + Send {
        crate::turmoil_net::recv_when_readable(self, buf)
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.pool[0].local_addr()
    }
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        let mut futs: Vec<Pin<Box<dyn Future<Output = io::Result<()>> + Send + '_>>> = self
            .pool
            .iter()
            .map(|s| Box::pin(s.readable()) as Pin<Box<dyn Future<Output = _> + Send + '_>>)
            .collect();
        std::future::poll_fn(move |cx| {
            for f in futs.iter_mut() {
                if let Poll::Ready(r) = f.as_mut().poll(cx) {
                    return Poll::Ready(r);
                }
            }
            Poll::Pending
        })
    }
    fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        for (i, s) in self.pool.iter().enumerate() {
            loop {
                match s.try_recv_from(buf) {
                    Ok((n, from)) => {
                        if self.allowed(i, from) {
                            return Ok((n, from));
                        }
                        self.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
        }
        Err(io::ErrorKind::WouldBlock.into())
    }
    fn try_send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        let i = self.map_out(to)?;
        self.pool[i].try_send_to(buf, to)
    }
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
        let s = self.pool[0].clone();
        async move { s.writable().await }
    }
}
