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

/// Bytes an inbox holds at most, whatever the count.
pub(crate) const INBOX_BYTES: usize = 8 << 20;

/// Queued datagrams with their senders, and their total length.
type Queue = (VecDeque<(Vec<u8>, SocketAddr)>, usize);

/// A bounded queue of (datagram, sender) with a wake-up for readers:
/// at most `cap` datagrams and [`INBOX_BYTES`] bytes.
pub(crate) struct Inbox {
    q: Mutex<Queue>,
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
        if q.0.len() >= self.cap || q.1 + d.len() > INBOX_BYTES {
            return false;
        }
        q.1 += d.len();
        q.0.push_back((d, from));
        drop(q);
        self.ready.notify_one();
        true
    }

    /// Take one into `buf` (cut to its length).
    pub(crate) fn pop(&self, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
        let (f, from) = {
            let mut q = lock(&self.q);
            let x = q.0.pop_front()?;
            q.1 -= x.0.len();
            x
        };
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
            if !lock(&self.q).0.is_empty() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_by_count_and_bytes() {
        let from = SocketAddr::from(([192, 0, 2, 1], 1));
        let inbox = Inbox::new(3);
        for _ in 0..3 {
            assert!(inbox.push(vec![0; 10], from));
        }
        assert!(!inbox.push(vec![0; 10], from), "count");
        let mut buf = [0u8; 4];
        assert_eq!(inbox.pop(&mut buf), Some((4, from)), "cut to the buffer");
        let big = Inbox::new(1000);
        assert!(big.push(vec![0; INBOX_BYTES - 5], from));
        assert!(!big.push(vec![0; 6], from), "bytes");
        assert!(big.push(vec![0; 5], from));
        let mut b = vec![0u8; INBOX_BYTES];
        assert!(big.pop(&mut b).is_some());
        assert!(big.push(vec![0; 6], from), "room again after a pop");
    }
}
