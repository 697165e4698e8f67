//! Tagged inner packets for tests and benchmarks: each carries its flow, its
//! sequence number and a body derived from both, so a receiver can check
//! completeness, order, duplicates and corruption.

use std::net::Ipv4Addr;
use transport::ip::{self, PROTO_TCP, PROTO_UDP};

/// Kind of inner traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// A TCP segment (goes over KCP in auto mode).
    Tcp,
    /// A UDP datagram (goes as a datagram in auto mode).
    Udp,
}

/// Header bytes before the tag: IPv4 (20) + ports/L4 stub (8).
pub const TAG_AT: usize = 28;
/// Smallest tagged packet.
pub const MIN_LEN: usize = TAG_AT + 12;

/// Build a tagged IPv4 packet of `len` bytes from `src` to `dst`.
pub fn packet(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    kind: Kind,
    flow: u16,
    seq: u32,
    len: usize,
) -> Vec<u8> {
    let len = len.max(MIN_LEN);
    let proto = if kind == Kind::Tcp {
        PROTO_TCP
    } else {
        PROTO_UDP
    };
    let mut p = ip::build_v4(src, dst, proto, 10_000 + flow, 80, &[], len);
    p[TAG_AT..TAG_AT + 2].copy_from_slice(&flow.to_le_bytes());
    p[TAG_AT + 2..TAG_AT + 6].copy_from_slice(&seq.to_le_bytes());
    fill(&mut p[TAG_AT + 12..], flow, seq);
    let sum = checksum(&p[TAG_AT + 12..]);
    p[TAG_AT + 6..TAG_AT + 10].copy_from_slice(&sum.to_le_bytes());
    p
}

fn fill(b: &mut [u8], flow: u16, seq: u32) {
    let mut x = (flow as u32).wrapping_mul(2_654_435_761) ^ seq.wrapping_mul(40_503);
    for v in b.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *v = x as u8;
    }
}

fn checksum(b: &[u8]) -> u32 {
    b.iter().fold(0x811c_9dc5u32, |h, &v| {
        (h ^ v as u32).wrapping_mul(0x0100_0193)
    })
}

/// What a tagged packet says about itself, if intact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    /// Flow id.
    pub flow: u16,
    /// Sequence number within the flow.
    pub seq: u32,
    /// TCP or UDP.
    pub kind: Kind,
}

/// Read back a tagged packet; `None` if it is not one or its body was altered.
pub fn read(p: &[u8]) -> Option<Tag> {
    if p.len() < MIN_LEN {
        return None;
    }
    let info = ip::parse(p)?;
    let kind = match info.proto {
        PROTO_TCP => Kind::Tcp,
        PROTO_UDP => Kind::Udp,
        _ => return None,
    };
    let flow = u16::from_le_bytes([p[TAG_AT], p[TAG_AT + 1]]);
    let seq = u32::from_le_bytes([p[TAG_AT + 2], p[TAG_AT + 3], p[TAG_AT + 4], p[TAG_AT + 5]]);
    let sum = u32::from_le_bytes([p[TAG_AT + 6], p[TAG_AT + 7], p[TAG_AT + 8], p[TAG_AT + 9]]);
    let mut expect = vec![0u8; p.len() - TAG_AT - 12];
    fill(&mut expect, flow, seq);
    (expect == p[TAG_AT + 12..] && checksum(&expect) == sum).then_some(Tag { flow, seq, kind })
}

/// Check a receiver's packets. TCP flows must be complete (if `expect` says
/// so), in order and without duplicates; UDP packets must not repeat; nothing
/// may be corrupt. Returns a description of the first violation.
pub fn verify(
    received: impl IntoIterator<Item = Vec<u8>>,
    expect_tcp: &std::collections::BTreeMap<u16, u32>,
) -> Result<Summary, String> {
    use std::collections::{BTreeMap, BTreeSet};
    let mut next: BTreeMap<u16, u32> = BTreeMap::new();
    let mut udp_seen: BTreeSet<(u16, u32)> = BTreeSet::new();
    let mut s = Summary::default();
    for p in received {
        let t = read(&p).ok_or_else(|| format!("corrupt packet of {} bytes", p.len()))?;
        match t.kind {
            Kind::Tcp => {
                let n = next.entry(t.flow).or_insert(0);
                if t.seq != *n {
                    return Err(format!(
                        "tcp flow {} expected seq {} got {}",
                        t.flow, n, t.seq
                    ));
                }
                *n += 1;
                s.tcp += 1;
            }
            Kind::Udp => {
                if !udp_seen.insert((t.flow, t.seq)) {
                    return Err(format!("udp flow {} seq {} duplicated", t.flow, t.seq));
                }
                s.udp += 1;
            }
        }
    }
    for (f, &n) in expect_tcp {
        let got = next.get(f).copied().unwrap_or(0);
        if got != n {
            return Err(format!("tcp flow {f}: {got} of {n} delivered"));
        }
    }
    Ok(s)
}

/// Counts of verified packets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// TCP packets delivered in order.
    pub tcp: u64,
    /// Distinct UDP packets delivered.
    pub udp: u64,
}
