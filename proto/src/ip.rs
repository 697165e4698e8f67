//! Just enough IPv4/IPv6 parsing to route a packet and find its flow.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

/// The fields of an IP packet fastmesh looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpInfo {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Transport protocol number (for IPv6, the first next-header).
    pub proto: u8,
    /// Source and destination ports for unfragmented TCP/UDP.
    pub ports: Option<(u16, u16)>,
}

/// Parse the IP header of `p`. Returns `None` for anything that is not a
/// well-formed IPv4 or IPv6 packet (truncated, bad header length, bad version).
pub fn parse(p: &[u8]) -> Option<IpInfo> {
    let (proto, whole, l4) = transport_part(p)?;
    let (src, dst) = if p[0] >> 4 == 4 {
        (
            IpAddr::V4(Ipv4Addr::new(p[12], p[13], p[14], p[15])),
            IpAddr::V4(Ipv4Addr::new(p[16], p[17], p[18], p[19])),
        )
    } else {
        let mut s = [0u8; 16];
        s.copy_from_slice(&p[8..24]);
        let mut d = [0u8; 16];
        d.copy_from_slice(&p[24..40]);
        (IpAddr::V6(Ipv6Addr::from(s)), IpAddr::V6(Ipv6Addr::from(d)))
    };
    Some(IpInfo {
        src,
        dst,
        proto,
        ports: ports(proto, whole, l4),
    })
}

/// The transport protocol, whether this is the first and only fragment, and
/// the bytes after the IP header (up to the IP length), or None if malformed.
/// For IPv6 the protocol is the first next-header.
fn transport_part(p: &[u8]) -> Option<(u8, bool, &[u8])> {
    match p.first()? >> 4 {
        4 if p.len() >= 20 => {
            let ihl = (p[0] & 0x0f) as usize * 4;
            let total = u16::from_be_bytes([p[2], p[3]]) as usize;
            if ihl < 20 || total < ihl || total > p.len() {
                return None;
            }
            let frag = u16::from_be_bytes([p[6], p[7]]);
            // No MF flag, offset 0.
            Some((p[9], frag & 0x3fff == 0, &p[ihl..total]))
        }
        6 if p.len() >= 40 => {
            let plen = u16::from_be_bytes([p[4], p[5]]) as usize;
            if 40 + plen > p.len() {
                return None;
            }
            Some((p[6], true, &p[40..40 + plen]))
        }
        _ => None,
    }
}

fn ports(proto: u8, whole: bool, l4: &[u8]) -> Option<(u16, u16)> {
    if whole && (proto == PROTO_TCP || proto == PROTO_UDP) && l4.len() >= 4 {
        Some((
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        ))
    } else {
        None
    }
}

/// A transport flow, direction-independent: both directions of one TCP
/// connection map to the same key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowKey {
    /// Protocol number.
    pub proto: u8,
    /// The lower (address, port) endpoint.
    pub a: (IpAddr, u16),
    /// The higher (address, port) endpoint.
    pub b: (IpAddr, u16),
}

impl IpInfo {
    /// The flow key for TCP/UDP packets with ports.
    pub fn flow(&self) -> Option<FlowKey> {
        let (sp, dp) = self.ports?;
        let x = (self.src, sp);
        let y = (self.dst, dp);
        let (a, b) = if x <= y { (x, y) } else { (y, x) };
        Some(FlowKey {
            proto: self.proto,
            a,
            b,
        })
    }
}

/// TCP flag bits (the 14th header byte).
pub const TCP_FIN: u8 = 0x01;
/// SYN.
pub const TCP_SYN: u8 = 0x02;
/// RST.
pub const TCP_RST: u8 = 0x04;
/// ACK.
pub const TCP_ACK: u8 = 0x10;

/// The TCP header and payload of an unfragmented TCP packet (at least the
/// 20-byte fixed header), or None.
pub fn tcp_header(p: &[u8]) -> Option<&[u8]> {
    match transport_part(p)? {
        (PROTO_TCP, true, l4) if l4.len() >= 20 => Some(l4),
        _ => None,
    }
}

/// The flags of an unfragmented TCP packet.
pub fn tcp_flags(p: &[u8]) -> Option<u8> {
    tcp_header(p).map(|t| t[13])
}

/// True for a TCP segment that carries no data and no SYN, FIN or RST: a pure
/// acknowledgement (possibly with SACK blocks or a window update). TCP's
/// acknowledgements are cumulative, so losing one costs nothing the next one
/// does not repair; such segments need no retransmission and must not wait
/// behind one.
pub fn tcp_pure_ack(p: &[u8]) -> bool {
    let Some((PROTO_TCP, true, l4)) = transport_part(p) else {
        return false;
    };
    if l4.len() < 20 {
        return false;
    }
    let doff = (l4[12] >> 4) as usize * 4;
    let flags = l4[13];
    const FIN: u8 = 0x01;
    const SYN: u8 = 0x02;
    const RST: u8 = 0x04;
    const ACK: u8 = 0x10;
    doff >= 20 && l4.len() == doff && flags & ACK != 0 && flags & (FIN | SYN | RST) == 0
}

/// Build a minimal IPv4 packet (for tests, simulations and benchmarks): a 20-byte
/// header and an L4 header carrying the ports, padded with `payload` to `total` bytes.
pub fn build_v4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    sport: u16,
    dport: u16,
    payload: &[u8],
    total: usize,
) -> Vec<u8> {
    let total = total.max(28);
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    let n = payload.len().min(total - 28);
    p[28..28 + n].copy_from_slice(&payload[..n]);
    p
}

/// Build a minimal IPv6 packet: a 40-byte header and an 8-byte L4 header with
/// the ports, then `payload`, padded to at least `total` bytes.
pub fn build_v6(
    src: std::net::Ipv6Addr,
    dst: std::net::Ipv6Addr,
    proto: u8,
    sport: u16,
    dport: u16,
    payload: &[u8],
    total: usize,
) -> Vec<u8> {
    let total = total.max(48 + payload.len());
    let mut p = vec![0u8; total];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
    p[6] = proto;
    p[7] = 64;
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    p[40..42].copy_from_slice(&sport.to_be_bytes());
    p[42..44].copy_from_slice(&dport.to_be_bytes());
    p[48..48 + payload.len()].copy_from_slice(payload);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_tcp_flow_is_symmetric() {
        let a = Ipv4Addr::new(10, 0, 0, 1);
        let b = Ipv4Addr::new(10, 0, 0, 2);
        let p = build_v4(a, b, PROTO_TCP, 4000, 80, b"x", 60);
        let q = build_v4(b, a, PROTO_TCP, 80, 4000, b"y", 60);
        let (ip, iq) = (parse(&p).unwrap(), parse(&q).unwrap());
        assert_eq!(ip.dst, IpAddr::V4(b));
        assert_eq!(ip.flow(), iq.flow());
        assert_ne!(
            ip.flow(),
            parse(&build_v4(a, b, PROTO_TCP, 4001, 80, b"", 60))
                .unwrap()
                .flow()
        );
    }

    #[test]
    fn pure_acks_are_recognised() {
        let a = Ipv4Addr::new(10, 0, 0, 1);
        let b = Ipv4Addr::new(10, 0, 0, 2);
        let mut ack = build_v4(a, b, PROTO_TCP, 4000, 80, &[], 40);
        ack[20 + 12] = 5 << 4; // 20-byte TCP header
        ack[20 + 13] = 0x10; // ACK
        assert!(tcp_pure_ack(&ack));
        let mut data = build_v4(a, b, PROTO_TCP, 4000, 80, &[], 41);
        data[20 + 12] = 5 << 4;
        data[20 + 13] = 0x18; // PSH|ACK with one byte of data
        assert!(!tcp_pure_ack(&data));
        let mut fin = ack.clone();
        fin[20 + 13] = 0x11; // FIN|ACK
        assert!(!tcp_pure_ack(&fin));
        let mut syn = ack.clone();
        syn[20 + 13] = 0x12; // SYN|ACK
        assert!(!tcp_pure_ack(&syn));
        let mut udp = ack.clone();
        udp[9] = PROTO_UDP;
        assert!(!tcp_pure_ack(&udp));
        assert!(!tcp_pure_ack(&ack[..30]));
        let v6 = build_v6(
            "fd00::1".parse().unwrap(),
            "fd00::2".parse().unwrap(),
            PROTO_TCP,
            1,
            2,
            &[],
            60,
        );
        let mut v6 = v6;
        v6[40 + 12] = 5 << 4;
        v6[40 + 13] = 0x10;
        assert!(tcp_pure_ack(&v6));
    }

    #[test]
    fn v6_parses_and_junk_does_not() {
        let mut p = vec![0u8; 48];
        p[0] = 0x60;
        p[5] = 8;
        p[6] = PROTO_UDP;
        p[23] = 1;
        p[39] = 2;
        p[40..42].copy_from_slice(&53u16.to_be_bytes());
        let i = parse(&p).unwrap();
        assert_eq!(i.ports, Some((53, 0)));
        assert_eq!(i.dst, "::2".parse::<IpAddr>().unwrap());
        assert!(parse(&p[..39]).is_none());
        assert!(parse(&[0x45; 10]).is_none());
        assert!(parse(&[]).is_none());
        assert!(parse(&[0x20; 64]).is_none());
    }
}
