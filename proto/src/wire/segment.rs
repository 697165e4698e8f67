//! A checked view of KCP segments, as they appear after the [`Inner::Kcp`]
//! type byte: one or more segments back to back, each a 24-byte header
//! (all fields little-endian) and its payload.
//!
//! ```text
//! 0      4     5     6      8      12     16     20     24
//! | conv | cmd | frg | wnd  |  ts  |  sn  | una  | len  | payload (len bytes)
//! ```
//!
//! [`Inner::Kcp`]: super::Inner::Kcp

/// Length of a KCP segment header.
pub const SEGMENT_HEADER_LEN: usize = 24;

/// KCP command of a data segment.
pub const CMD_PUSH: u8 = 81;

const CONV: usize = 0;
const CMD: usize = 4;
const SN: usize = 12;
const LEN: usize = 20;

/// One segment header, checked to be whole (its payload may be cut short;
/// [`Segments`] stops there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment<'a> {
    header: &'a [u8; SEGMENT_HEADER_LEN],
}

fn le32(b: &[u8; SEGMENT_HEADER_LEN], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl<'a> Segment<'a> {
    /// The first segment header of `buf`, if `buf` holds a whole header.
    pub fn new_checked(buf: &'a [u8]) -> Option<Segment<'a>> {
        let header = buf.get(..SEGMENT_HEADER_LEN)?.try_into().ok()?;
        Some(Segment { header })
    }

    /// Conversation id.
    pub fn conv(&self) -> u32 {
        le32(self.header, CONV)
    }

    /// Command (data, ack, window probe, window answer).
    pub fn cmd(&self) -> u8 {
        self.header[CMD]
    }

    /// Is this a data segment?
    pub fn is_push(&self) -> bool {
        self.cmd() == CMD_PUSH
    }

    /// Sequence number.
    pub fn sn(&self) -> u32 {
        le32(self.header, SN)
    }

    /// Declared payload length.
    pub fn payload_len(&self) -> usize {
        le32(self.header, LEN) as usize
    }
}

/// The segments of one KCP datagram, in order. Iteration ends at the first
/// header that is not whole; a payload that runs past the end ends it after
/// that segment.
#[derive(Debug, Clone)]
pub struct Segments<'a> {
    rest: &'a [u8],
}

/// Iterate over the segments in `buf`.
pub fn segments(buf: &[u8]) -> Segments<'_> {
    Segments { rest: buf }
}

impl<'a> Iterator for Segments<'a> {
    type Item = Segment<'a>;
    fn next(&mut self) -> Option<Segment<'a>> {
        let s = Segment::new_checked(self.rest)?;
        let next = SEGMENT_HEADER_LEN
            .saturating_add(s.payload_len())
            .min(self.rest.len());
        self.rest = &self.rest[next..];
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(conv: u32, cmd: u8, sn: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&conv.to_le_bytes());
        v.extend_from_slice(&[cmd, 0, 0, 1]);
        v.extend_from_slice(&7u32.to_le_bytes());
        v.extend_from_slice(&sn.to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn reads_back_to_back_segments() {
        let mut b = seg(5, 82, 0, &[]);
        b.extend(seg(5, CMD_PUSH, 9, b"hello"));
        b.extend(seg(5, CMD_PUSH, 10, b"x"));
        let v: Vec<_> = segments(&b)
            .map(|s| (s.conv(), s.is_push(), s.sn()))
            .collect();
        assert_eq!(v, [(5, false, 0), (5, true, 9), (5, true, 10)]);
    }

    #[test]
    fn agrees_with_the_kcp_crate_on_the_conversation() {
        let b = seg(0xdead_beef, CMD_PUSH, 1, b"abc");
        assert_eq!(Segment::new_checked(&b).unwrap().conv(), kcp::get_conv(&b));
        assert_eq!(SEGMENT_HEADER_LEN, kcp::KCP_OVERHEAD);
    }

    #[test]
    fn stops_at_a_cut_header_and_at_an_overlong_payload() {
        let mut b = seg(1, CMD_PUSH, 3, b"abcdef");
        b.truncate(SEGMENT_HEADER_LEN + 2); // payload cut short: one segment, then end
        b.extend_from_slice(&[0; 10]);
        assert_eq!(segments(&b).count(), 1);
        assert!(Segment::new_checked(&b[..SEGMENT_HEADER_LEN - 1]).is_none());
        assert_eq!(segments(&[]).count(), 0);
        // A declared length near u32::MAX does not overflow.
        let mut h = seg(1, CMD_PUSH, 3, b"");
        h[LEN..LEN + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(segments(&h).count(), 1);
    }
}
