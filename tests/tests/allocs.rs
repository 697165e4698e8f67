//! How many heap allocations the sans-IO core makes per inner packet, measured
//! with a counting allocator on two nodes wired back to back (no network, no
//! actors: the actor layer adds none per packet, see docs/architecture.md).
//! The test prints the counts and fails if they grow past the budget.

use sim::traffic::{self, Kind};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;
use transport::Node;

struct Counting;

thread_local! {
    static ON: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let _ = ON.try_with(|on| {
            if on.get() {
                let _ = COUNT.try_with(|c| c.set(c.get() + 1));
            }
        });
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        let _ = ON.try_with(|on| {
            if on.get() {
                let _ = COUNT.try_with(|c| c.set(c.get() + 1));
            }
        });
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn counted<T>(f: impl FnOnce() -> T) -> (T, u64) {
    COUNT.with(|c| c.set(0));
    ON.with(|o| o.set(true));
    let r = f();
    ON.with(|o| o.set(false));
    (r, COUNT.with(|c| c.get()))
}

struct Pair {
    a: Node,
    b: Node,
    ka: [u8; 32],
    kb: [u8; 32],
    now: Duration,
    buf: Vec<u8>,
}

const A: &str = fastmesh_tests::NODE_A;
const B: &str = fastmesh_tests::NODE_B;

impl Pair {
    fn new() -> Pair {
        let (a, b, ka, kb) = fastmesh_tests::two_nodes(1, [7u8; 32]);
        let mut p = Pair {
            a,
            b,
            ka,
            kb,
            now: Duration::ZERO,
            buf: Vec::with_capacity(2048),
        };
        p.a.connect(p.now, &kb).unwrap();
        for _ in 0..50 {
            p.exchange();
            p.tick(Duration::from_millis(5));
        }
        assert!(p.a.session(&kb).unwrap().is_established());
        p
    }

    /// Move every ready frame across (both ways) until quiet.
    fn exchange(&mut self) -> (u64, u64) {
        let (mut a_frames, mut b_frames) = (0, 0);
        loop {
            let mut moved = false;
            if self.a.poll_timeout().is_some_and(|t| t <= self.now) {
                self.a.handle_timeout(self.now);
            }
            while self.a.poll_transmit(self.now, &mut self.buf).is_some() {
                self.b
                    .handle_datagram(self.now, A.parse::<SocketAddr>().unwrap(), &mut self.buf);
                a_frames += 1;
                moved = true;
            }
            if self.b.poll_timeout().is_some_and(|t| t <= self.now) {
                self.b.handle_timeout(self.now);
            }
            while self.b.poll_transmit(self.now, &mut self.buf).is_some() {
                self.a
                    .handle_datagram(self.now, B.parse::<SocketAddr>().unwrap(), &mut self.buf);
                b_frames += 1;
                moved = true;
            }
            if !moved {
                return (a_frames, b_frames);
            }
        }
    }

    fn tick(&mut self, d: Duration) {
        self.now += d;
    }
}

/// Allocations per packet for `n` packets of `kind`: (sender node, receiver
/// node). Every call on the sending node counts for the sender (handing
/// packets in, timers, sealing, processing acks), every call on the receiving
/// node for the receiver (opening, reassembly, delivery, acks).
fn per_packet(kind: Kind, n: u32) -> (f64, f64) {
    let mut p = Pair::new();
    let (src, dst) = (Ipv4Addr::new(10, 9, 0, 1), Ipv4Addr::new(10, 9, 0, 2));
    let pkts: Vec<Vec<u8>> = (0..n)
        .map(|i| traffic::packet(src, dst, kind, 1, i, 1200))
        .collect();
    let (mut sender, mut receiver) = (0u64, 0u64);
    let mut delivered = 0u32;
    let (ka, kb) = (p.ka, p.kb);
    let (a_addr, b_addr): (SocketAddr, SocketAddr) = (A.parse().unwrap(), B.parse().unwrap());
    let mut chunks = pkts.chunks(4);
    // 4 packets per millisecond (about 5 MB/s, a steady flow), then drain.
    for _ in 0..4000 {
        let chunk = chunks.next().unwrap_or(&[]);
        if chunk.is_empty() && delivered == n {
            break;
        }
        let now = p.now;
        let Pair { a, b, buf, .. } = &mut p;
        let (_, c) = counted(|| {
            for pkt in chunk {
                a.send_ip(now, &kb, pkt).unwrap();
            }
            if a.poll_timeout().is_some_and(|t| t <= now) {
                a.handle_timeout(now);
            }
        });
        sender += c;
        loop {
            let (to, c) = counted(|| a.poll_transmit(now, buf));
            sender += c;
            if to.is_none() {
                break;
            }
            let (_, c) = counted(|| b.handle_datagram(now, a_addr, buf));
            receiver += c;
        }
        let (got, c) = counted(|| {
            if b.poll_timeout().is_some_and(|t| t <= now) {
                b.handle_timeout(now);
            }
            let mut got = 0;
            while let Some((from, _pkt)) = b.poll_rx() {
                assert_eq!(from, ka);
                got += 1;
            }
            got
        });
        delivered += got;
        receiver += c;
        loop {
            let (to, c) = counted(|| b.poll_transmit(now, buf));
            receiver += c;
            if to.is_none() {
                break;
            }
            let (_, c) = counted(|| a.handle_datagram(now, b_addr, buf));
            sender += c;
        }
        p.tick(Duration::from_millis(1));
    }
    assert_eq!(
        delivered,
        n,
        "every packet delivered: {}",
        p.a.session(&kb).unwrap().debug_timers()
    );
    (sender as f64 / n as f64, receiver as f64 / n as f64)
}

#[test]
fn allocations_per_packet_stay_within_budget() {
    let (us, ur) = per_packet(Kind::Udp, 2000);
    let (ts, tr) = per_packet(Kind::Tcp, 2000);
    println!("allocations per packet: UDP send {us:.2} receive {ur:.2}; TCP (KCP) send {ts:.2} receive {tr:.2}");
    // Budget: what the core does today; a change that adds per-packet
    // allocations fails here and has to say why.
    assert!(us <= 3.0, "UDP send {us}");
    assert!(ur <= 2.0, "UDP receive {ur}");
    assert!(ts <= 7.5, "TCP send {ts}");
    assert!(tr <= 7.0, "TCP receive {tr}");
}
