//! How many heap allocations the sans-IO core makes per inner packet, measured
//! with a counting allocator on two nodes wired back to back (no network, no
//! actors: the actor layer adds none per packet, see docs/architecture.md).
//! The test prints the counts and fails if they grow past the budget.

use fastmesh_tests::Frames;
use sim::traffic::{self, Kind};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

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

const A: &str = fastmesh_tests::NODE_A;
const B: &str = fastmesh_tests::NODE_B;

/// Allocations per packet for `n` packets of `kind`: (sender node, receiver
/// node). Both nodes run their poll sequence ([`transport::Node::service`]) into a
/// [`Frames`] driver whose buffers are reused, so what is counted is the
/// core's own work: every call on the sending node counts for the sender
/// (handing packets in, timers, sealing, processing acks), every call on the
/// receiving node for the receiver (opening, reassembly, delivery, acks).
fn per_packet(kind: Kind, n: u32) -> (f64, f64) {
    let (mut a, mut b, ka, kb) = fastmesh_tests::two_nodes(1, [7u8; 32]);
    let (a_addr, b_addr): (SocketAddr, SocketAddr) = (A.parse().unwrap(), B.parse().unwrap());
    let mut now = Duration::ZERO;
    a.connect(now, &kb).unwrap();
    for _ in 0..50 {
        fastmesh_tests::exchange(&mut a, a_addr, &mut b, b_addr, now);
        now += Duration::from_millis(5);
    }
    assert!(a.session(&kb).unwrap().is_established());

    let (src, dst) = (Ipv4Addr::new(10, 9, 0, 1), Ipv4Addr::new(10, 9, 0, 2));
    let pkts: Vec<Vec<u8>> = (0..n)
        .map(|i| traffic::packet(src, dst, kind, 1, i, 1200))
        .collect();
    let (mut fa, mut fb) = (Frames::default(), Frames::default());
    let (mut sender, mut receiver) = (0u64, 0u64);
    let mut chunks = pkts.chunks(4);
    // 4 packets per millisecond (about 5 MB/s, a steady flow), then drain.
    for _ in 0..4000 {
        let chunk = chunks.next().unwrap_or(&[]);
        if chunk.is_empty() && fb.delivered == u64::from(n) {
            break;
        }
        let (_, c) = counted(|| {
            for pkt in chunk {
                a.send_ip(now, &kb, pkt).unwrap();
            }
            a.service(now, &mut fa);
        });
        sender += c;
        let (_, c) = counted(|| {
            fa.hand_to(&mut b, a_addr, now);
            b.service(now, &mut fb);
        });
        receiver += c;
        let (_, c) = counted(|| fb.hand_to(&mut a, b_addr, now));
        sender += c;
        now += Duration::from_millis(1);
    }
    assert_eq!(
        fb.delivered,
        u64::from(n),
        "every packet delivered: {}",
        a.session(&kb).unwrap().debug_timers()
    );
    assert!(fb.senders.iter().all(|k| *k == ka), "only from A");
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
