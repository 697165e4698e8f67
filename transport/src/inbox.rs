//! Datagrams that arrived some other way than the wrapped socket (a stream,
//! an extra socket), queued for the node: the part of a [`Datagram`]
//! wrapper that merges them into its receive calls.

use crate::io::Datagram;
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};
use tokio::sync::Notify;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A bounded queue of (datagram, sender) with a wake-up for readers.
pub(crate) struct Inbox {
    q: Mutex<VecDeque<(Vec<u8>, SocketAddr)>>,
    ready: Notify,
    cap: usize,
}

impl Inbox {
    pub(crate) fn new(cap: usize) -> Inbox {
        Inbox {
            q: Mutex::default(),
            ready: Notify::new(),
            cap,
        }
    }

    /// Queue a datagram; false (dropped) if the queue is full.
    pub(crate) fn push(&self, d: Vec<u8>, from: SocketAddr) -> bool {
        let mut q = lock(&self.q);
        if q.len() >= self.cap {
            return false;
        }
        q.push_back((d, from));
        drop(q);
        self.ready.notify_one();
        true
    }

    /// Take one into `buf` (cut to its length).
    pub(crate) fn pop(&self, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
        let (f, from) = lock(&self.q).pop_front()?;
        let n = f.len().min(buf.len());
        buf[..n].copy_from_slice(&f[..n]);
        Some((n, from))
    }

    /// Take up to one per buffer, described like [`Datagram::try_recv_batch`].
    pub(crate) fn pop_batch(
        &self,
        bufs: &mut [Vec<u8>],
        out: &mut [(usize, usize, SocketAddr)],
    ) -> usize {
        let mut k = 0;
        while k < bufs.len().min(out.len()) {
            match self.pop(&mut bufs[k]) {
                Some((n, from)) => {
                    out[k] = (n, n.max(1), from);
                    k += 1;
                }
                None => break,
            }
        }
        k
    }

    /// Wait until the queue holds something or `udp` is readable.
    pub(crate) async fn readable<D: Datagram>(&self, udp: &D) -> io::Result<()> {
        loop {
            if !lock(&self.q).is_empty() {
                return Ok(());
            }
            // A datagram queued after the check above leaves a permit, so
            // this wait ends at once.
            tokio::select! {
                biased;
                _ = self.ready.notified() => {}
                r = udp.readable() => return r,
            }
        }
    }
}
