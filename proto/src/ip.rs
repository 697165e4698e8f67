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

/// Bytes of data in an unfragmented TCP packet (0 for anything else).
pub fn tcp_payload_len(p: &[u8]) -> usize {
    tcp_header(p).map_or(0, |t| t.len().saturating_sub(usize::from(t[12] >> 4) * 4))
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

/// Whether the sender of `p` forbids fragmenting it on the way: IPv4 with
/// the DF bit (what Linux sets while it does path MTU discovery), and every
/// IPv6 packet (routers never fragment IPv6).
pub fn dont_fragment(p: &[u8]) -> bool {
    match p.first().map(|b| b >> 4) {
        Some(4) => p.len() >= 20 && p[6] & 0x40 != 0,
        Some(6) => true,
        _ => false,
    }
}

/// The Internet checksum (RFC 1071) of `data`, starting from `sum`.
fn checksum(mut sum: u32, data: &[u8]) -> u16 {
    let mut it = data.chunks_exact(2);
    for w in &mut it {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [b] = it.remainder() {
        sum += u32::from(*b) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The ICMP error telling the sender of `p` that it is larger than `mtu`
/// (IPv4 "fragmentation needed", IPv6 "packet too big"), as if sent by the
/// router towards `p`'s destination: its source address is that destination
/// (a node's own address would be dropped by the kernel as martian). It
/// quotes as much of `p` as the minimum MTU allows. None if `p` is not IP,
/// is itself an ICMP error, or for IPv6 when `mtu` is below 1280 (IPv6 links
/// must carry 1280 bytes; the tunnel then fragments below the inner layer).
pub fn too_big(p: &[u8], mtu: usize) -> Option<Vec<u8>> {
    let info = parse(p)?;
    match (info.src, info.dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            if info.proto == 1 && icmp_is_error(p, 20, &[3, 4, 5, 11, 12]) {
                return None;
            }
            let quote = &p[..p.len().min(576 - 28)];
            let mut v = vec![0u8; 28 + quote.len()];
            v[0] = 0x45;
            let total = v.len() as u16;
            v[2..4].copy_from_slice(&total.to_be_bytes());
            v[8] = 64;
            v[9] = 1; // ICMP
            v[12..16].copy_from_slice(&dst.octets());
            v[16..20].copy_from_slice(&src.octets());
            let c = checksum(0, &v[..20]);
            v[10..12].copy_from_slice(&c.to_be_bytes());
            v[20] = 3; // destination unreachable
            v[21] = 4; // fragmentation needed and DF set
            v[26..28].copy_from_slice(&(mtu.min(0xffff) as u16).to_be_bytes());
            v[28..].copy_from_slice(quote);
            let c = checksum(0, &v[20..]);
            v[22..24].copy_from_slice(&c.to_be_bytes());
            Some(v)
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            if mtu < 1280 || info.proto == 58 && icmp_is_error(p, 40, &[1, 2, 3, 4]) {
                return None;
            }
            let quote = &p[..p.len().min(1280 - 48)];
            let len = 8 + quote.len();
            let mut v = vec![0u8; 40 + len];
            v[0] = 0x60;
            v[4..6].copy_from_slice(&(len as u16).to_be_bytes());
            v[6] = 58; // ICMPv6
            v[7] = 64;
            v[8..24].copy_from_slice(&dst.octets());
            v[24..40].copy_from_slice(&src.octets());
            v[40] = 2; // packet too big
            v[44..48].copy_from_slice(&(mtu as u32).to_be_bytes());
            v[48..].copy_from_slice(quote);
            let mut pseudo = 0u32;
            for w in v[8..40].chunks_exact(2) {
                pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]));
            }
            pseudo += len as u32 + 58;
            let c = checksum(pseudo, &v[40..]);
            v[42..44].copy_from_slice(&c.to_be_bytes());
            Some(v)
        }
        _ => None,
    }
}

/// Is `p` an ICMP message (header at `off`) of one of the error `types`?
fn icmp_is_error(p: &[u8], off: usize, types: &[u8]) -> bool {
    p.get(off).is_some_and(|t| types.contains(t))
}

/// Lower the MSS option of a TCP SYN (or SYN-ACK) to at most `mss`, fixing
/// the TCP checksum; true if the packet was changed. Anything else (not a
/// SYN, no MSS option, MSS already small enough) is left alone.
pub fn clamp_mss(p: &mut [u8], mss: u16) -> bool {
    let Some((PROTO_TCP, true, _)) = transport_part(p) else {
        return false;
    };
    let ihl = if p[0] >> 4 == 4 {
        (p[0] & 0x0f) as usize * 4
    } else {
        40
    };
    let Some(tcp) = p.get_mut(ihl..) else {
        return false;
    };
    if tcp.len() < 20 || tcp[13] & TCP_SYN == 0 {
        return false;
    }
    let doff = ((tcp[12] >> 4) as usize * 4).min(tcp.len());
    let mut i = 20;
    while i < doff {
        match tcp[i] {
            0 => break,
            1 => i += 1,
            kind => {
                let len = tcp.get(i + 1).copied().unwrap_or(0) as usize;
                if len < 2 || i + len > doff {
                    break;
                }
                if kind == 2 && len == 4 {
                    let old = u16::from_be_bytes([tcp[i + 2], tcp[i + 3]]);
                    if old <= mss {
                        return false;
                    }
                    tcp[i + 2..i + 4].copy_from_slice(&mss.to_be_bytes());
                    // RFC 1624: HC' = ~(~HC + ~m + m').
                    let hc = u16::from_be_bytes([tcp[16], tcp[17]]);
                    let mut sum = u32::from(!hc) + u32::from(!old) + u32::from(mss);
                    while sum >> 16 != 0 {
                        sum = (sum & 0xffff) + (sum >> 16);
                    }
                    tcp[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
                    return true;
                }
                i += len;
            }
        }
    }
    false
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
    fn pure_acks_and_tcp_data_are_recognised() {
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
        assert_eq!(tcp_payload_len(&ack), 0);
        assert_eq!(tcp_payload_len(&data), 1);
        assert_eq!(tcp_payload_len(&udp), 0);
        assert_eq!(tcp_payload_len(&ack[..30]), 0);
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

    #[test]
    fn too_big_answers_verify_and_quote_the_packet() {
        use smoltcp::phy::ChecksumCapabilities;
        use smoltcp::wire::{
            Icmpv4DstUnreachable, Icmpv4Message, Icmpv4Packet, Icmpv6Packet, Icmpv6Repr,
            Ipv4Packet, Ipv6Packet,
        };
        let a = Ipv4Addr::new(10, 0, 0, 1);
        let b = Ipv4Addr::new(10, 0, 0, 2);
        let mut p = build_v4(a, b, PROTO_UDP, 4000, 53, b"x", 1400);
        assert!(!dont_fragment(&p));
        p[6] = 0x40; // DF
        assert!(dont_fragment(&p));
        let v = too_big(&p, 1200).unwrap();
        let ip = Ipv4Packet::new_checked(&v[..]).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!((ip.src_addr(), ip.dst_addr()), (b, a));
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum());
        assert_eq!(icmp.msg_type(), Icmpv4Message::DstUnreachable);
        assert_eq!(
            Icmpv4DstUnreachable::from(icmp.msg_code()),
            Icmpv4DstUnreachable::FragRequired
        );
        // The quote (truncated, as routers send it) starts with the packet.
        assert_eq!(icmp.data(), &p[..icmp.data().len()]);
        assert_eq!(u16::from_be_bytes([v[26], v[27]]), 1200);
        assert!(v.len() <= 576);
        // Never an error about an error.
        assert!(too_big(&v, 1200).is_none());

        let (a6, b6): (Ipv6Addr, Ipv6Addr) =
            ("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap());
        let p6 = build_v6(a6, b6, PROTO_UDP, 1, 2, &[], 1400);
        assert!(dont_fragment(&p6));
        assert!(too_big(&p6, 1200).is_none(), "below the IPv6 minimum");
        let v6 = too_big(&p6, 1300).unwrap();
        let ip6 = Ipv6Packet::new_checked(&v6[..]).unwrap();
        assert_eq!((ip6.src_addr(), ip6.dst_addr()), (b6, a6));
        let icmp6 = Icmpv6Packet::new_checked(ip6.payload()).unwrap();
        assert!(icmp6.verify_checksum(&b6, &a6));
        match Icmpv6Repr::parse(&b6, &a6, &icmp6, &ChecksumCapabilities::default()).unwrap() {
            Icmpv6Repr::PktTooBig { mtu, .. } => assert_eq!(mtu, 1300),
            other => panic!("{other:?}"),
        }
        assert!(v6.len() <= 1280);
        assert!(too_big(&v6, 1300).is_none());
    }

    #[test]
    fn mss_clamping_lowers_the_option_and_keeps_the_checksum_valid() {
        use smoltcp::phy::ChecksumCapabilities;
        use smoltcp::wire::{
            IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr,
            TcpSeqNumber,
        };
        let a = Ipv4Addr::new(10, 0, 0, 1);
        let b = Ipv4Addr::new(10, 0, 0, 2);
        let syn = |mss: Option<u16>, control: TcpControl| {
            let repr = TcpRepr {
                src_port: 4000,
                dst_port: 80,
                control,
                seq_number: TcpSeqNumber(7),
                ack_number: None,
                window_len: 1000,
                window_scale: Some(7),
                max_seg_size: mss,
                sack_permitted: true,
                sack_ranges: [None; 3],
                timestamp: None,
                payload: &[],
            };
            let caps = ChecksumCapabilities::default();
            let tlen = repr.buffer_len();
            let mut buf = vec![0u8; 20 + tlen];
            Ipv4Repr {
                src_addr: a,
                dst_addr: b,
                next_header: IpProtocol::Tcp,
                payload_len: tlen,
                hop_limit: 64,
            }
            .emit(&mut Ipv4Packet::new_unchecked(&mut buf[..]), &caps);
            repr.emit(
                &mut TcpPacket::new_unchecked(&mut buf[20..]),
                &IpAddress::Ipv4(a),
                &IpAddress::Ipv4(b),
                &caps,
            );
            buf
        };
        let parse = |p: &[u8]| {
            let t = TcpPacket::new_checked(&p[20..]).unwrap();
            assert!(t.verify_checksum(&IpAddress::Ipv4(a), &IpAddress::Ipv4(b)));
            TcpRepr::parse(
                &t,
                &IpAddress::Ipv4(a),
                &IpAddress::Ipv4(b),
                &ChecksumCapabilities::default(),
            )
            .unwrap()
            .max_seg_size
        };
        let mut p = syn(Some(1460), TcpControl::Syn);
        assert!(clamp_mss(&mut p, 1100));
        assert_eq!(parse(&p), Some(1100));
        // Already small enough, no option, not a SYN: untouched.
        let mut p = syn(Some(900), TcpControl::Syn);
        assert!(!clamp_mss(&mut p, 1100));
        assert_eq!(parse(&p), Some(900));
        let mut p = syn(None, TcpControl::Syn);
        assert!(!clamp_mss(&mut p, 1100));
        let mut p = syn(None, TcpControl::None);
        assert!(!clamp_mss(&mut p, 1100));
        // Truncated or garbled options never panic.
        let mut p = syn(Some(1460), TcpControl::Syn);
        let n = p.len();
        for cut in 20..n {
            let mut q = p[..cut].to_vec();
            let _ = clamp_mss(&mut q, 1000);
        }
        p[20 + 21] = 0xff; // option length past the header
        let _ = clamp_mss(&mut p, 1000);
    }
}
