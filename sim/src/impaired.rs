//! [`Impaired`]: a [`Datagram`] wrapper that runs what a socket receives
//! through seeded [`crate::impair`] pipelines, released on tokio's clock (so
//! turmoil's simulated clock drives it in the simulator).

use crate::impair::{Held, LinkSpec, Pipeline};
use std::collections::{BTreeMap, BinaryHeap};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use transport::Datagram;

/// A fault laid over a socket's links at run time (the chaos runner's loss
/// bursts, latency spikes, reordering, duplication and bandwidth drops):
/// while it holds a spec, what the socket receives goes through that spec's
/// pipeline too, after the socket's own.
#[derive(Clone, Default)]
pub struct ChaosKnob(Arc<Mutex<(u64, Option<LinkSpec>)>>);

impl ChaosKnob {
    /// Lay `spec` over the links (`None`: take the fault away).
    pub fn set(&self, spec: Option<LinkSpec>) {
        if let Ok(mut k) = self.0.lock() {
            k.0 += 1;
            k.1 = spec;
        }
    }

    fn get(&self) -> (u64, Option<LinkSpec>) {
        self.0.lock().map(|k| k.clone()).unwrap_or((0, None))
    }
}

struct ImpairState {
    links: BTreeMap<SocketAddr, Pipeline>,
    /// Per sender, the pipeline of the knob's spec and its generation.
    extra: BTreeMap<SocketAddr, (u64, Pipeline)>,
    extra_out: Vec<Duration>,
    held: BinaryHeap<Held<(SocketAddr, Vec<u8>)>>,
    seq: u64,
    scratch: Vec<Duration>,
}

/// Impairs the datagrams a socket *receives*, per sending address, with seeded
/// [`LinkSpec`] pipelines: loss, burst loss, delay and jitter, reordering,
/// duplication and a bottleneck. Released packets come out of `recv_from` at
/// their computed time (tokio time, so turmoil's simulated clock drives it).
///
/// Wrap both ends to impair both directions; wrappers nest (`Impaired<Impaired<U>>`).
pub struct Impaired<D> {
    inner: D,
    spec: Box<dyn Fn(SocketAddr) -> LinkSpec + Send + Sync>,
    seed: u64,
    epoch: tokio::time::Instant,
    state: Mutex<ImpairState>,
    knob: Option<ChaosKnob>,
    /// Receive buffer of [`Impaired::pull_inner`], allocated once: zeroing
    /// 64 KiB on every poll was a fifth of a big world's run time.
    rx: Mutex<Vec<u8>>,
}

impl<D: Datagram> Impaired<D> {
    /// Every sender gets the same `spec` (each with its own seeded RNG).
    pub fn new(inner: D, spec: LinkSpec, seed: u64) -> Impaired<D> {
        Impaired::per_source(inner, move |_| spec.clone(), seed)
    }

    /// The spec for each sending address comes from `spec`.
    pub fn per_source(
        inner: D,
        spec: impl Fn(SocketAddr) -> LinkSpec + Send + Sync + 'static,
        seed: u64,
    ) -> Impaired<D> {
        Impaired {
            inner,
            spec: Box::new(spec),
            seed,
            epoch: tokio::time::Instant::now(),
            state: Mutex::new(ImpairState {
                links: BTreeMap::new(),
                extra: BTreeMap::new(),
                extra_out: Vec::new(),
                held: BinaryHeap::new(),
                seq: 0,
                scratch: Vec::new(),
            }),
            knob: None,
            rx: Mutex::new(vec![0u8; 65_536]),
        }
    }

    /// Also apply whatever `knob` holds, as it changes.
    pub fn with_knob(mut self, knob: ChaosKnob) -> Impaired<D> {
        self.knob = Some(knob);
        self
    }

    /// The wrapped socket.
    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// Datagrams dropped so far by all links.
    pub fn dropped(&self) -> u64 {
        self.state
            .lock()
            .map(|s| s.links.values().map(|p| p.dropped()).sum())
            .unwrap_or(0)
    }

    fn now(&self) -> Duration {
        tokio::time::Instant::now().duration_since(self.epoch)
    }

    fn take_ready(&self, buf: &mut [u8]) -> Result<Option<(usize, SocketAddr)>, Option<Duration>> {
        let mut st = self.state.lock().expect("impair lock");
        let now = self.now();
        match st.held.peek() {
            Some(h) if h.at <= now => {
                let h = st.held.pop().expect("peeked");
                let (from, data) = h.item;
                let n = data.len().min(buf.len());
                buf[..n].copy_from_slice(&data[..n]);
                Ok(Some((n, from)))
            }
            Some(h) => Err(Some(h.at)),
            None => Err(None),
        }
    }

    fn admit(&self, data: &[u8], from: SocketAddr) {
        let mut guard = self.state.lock().expect("impair lock");
        let st = &mut *guard;
        let now = self.now();
        let seed = || self.seed ^ addr_seed(from);
        let link = st
            .links
            .entry(from)
            .or_insert_with(|| (self.spec)(from).build(seed()));
        st.scratch.clear();
        link.apply(now, data.len(), &mut st.scratch);
        if let Some((gen, spec)) = self.knob.as_ref().map(ChaosKnob::get) {
            match spec {
                Some(spec) => {
                    let e = st
                        .extra
                        .entry(from)
                        .or_insert_with(|| (u64::MAX, Pipeline::new(vec![])));
                    if e.0 != gen {
                        *e = (
                            gen,
                            spec.build(seed() ^ gen.wrapping_mul(0x2545_f491_4f6c_dd1d)),
                        );
                    }
                    st.extra_out.clear();
                    for &t in &st.scratch {
                        e.1.apply(t, data.len(), &mut st.extra_out);
                    }
                    std::mem::swap(&mut st.scratch, &mut st.extra_out);
                }
                None => {
                    st.extra.clear();
                }
            }
        }
        for i in 0..st.scratch.len() {
            let at = st.scratch[i];
            st.seq += 1;
            let seq = st.seq;
            st.held.push(Held {
                at,
                seq,
                item: (from, data.to_vec()),
            });
        }
    }
}

impl<D: Datagram> Impaired<D> {
    /// Admit every datagram the inner socket has ready, without waiting.
    fn pull_inner(&self) -> io::Result<()> {
        let mut tmp = self
            .rx
            .lock()
            .map_err(|_| io::Error::other("impair rx lock"))?;
        loop {
            match self.inner.try_recv_from(&mut tmp) {
                Ok((n, from)) => self.admit(&tmp[..n], from),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}

fn addr_seed(a: SocketAddr) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in a.to_string().bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    h
}

impl<D: Datagram> Datagram for Impaired<D> {
    fn send_to(
        &self,
        buf: &[u8],
        to: SocketAddr,
    ) -> impl Future<Output = io::Result<usize>> + Send {
        self.inner.send_to(buf, to)
    }

    fn recv_from(
        &self,
        buf: &mut [u8],
    ) -> impl Future<Output = io::Result<(usize, SocketAddr)>> + Send {
        async move {
            let mut tmp = vec![0u8; 65_536];
            loop {
                let next = match self.take_ready(buf) {
                    Ok(Some(r)) => return Ok(r),
                    Ok(None) => unreachable!("take_ready returns Err when nothing is ready"),
                    Err(next) => next,
                };
                let sleep = async {
                    match next {
                        Some(at) => tokio::time::sleep_until(self.epoch + at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    r = self.inner.recv_from(&mut tmp) => {
                        let (n, from) = r?;
                        self.admit(&tmp[..n], from);
                    }
                    _ = sleep => {}
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        async move {
            loop {
                let next = match self.state.lock() {
                    Ok(st) => st.held.peek().map(|h| h.at),
                    Err(_) => None,
                };
                if next.is_some_and(|at| at <= self.now()) {
                    return Ok(());
                }
                let sleep = async {
                    match next {
                        Some(at) => tokio::time::sleep_until(self.epoch + at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    r = self.inner.readable() => {
                        r?;
                        // Move what arrived into the impairment pipeline; it may
                        // all be dropped or delayed, so look again.
                        self.pull_inner()?;
                    }
                    _ = sleep => return Ok(()),
                }
            }
        }
    }

    fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.pull_inner()?;
        match self.take_ready(buf) {
            Ok(Some(r)) => Ok(r),
            _ => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn try_send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.inner.try_send_to(buf, to)
    }

    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
        self.inner.writable()
    }
}
