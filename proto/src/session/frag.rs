//! Fragmentation of frames larger than the path carries, above IP.
//!
//! Path MTU discovery ([`crate::pmtu`]) sizes new frames to the path, but
//! some plaintexts were cut before the path narrowed (KCP segments already
//! sent keep their size through every retransmission) or are larger than any
//! frame the path carries (an inner datagram as large as the TUN MTU). Once
//! the path is known not to carry them, the session splits such a plaintext
//! into `Fragment` plaintexts (inner type 8: id u16le, index u8, count u8,
//! then a piece), each sealed as its own frame, and the receiver joins them
//! before dispatching the whole. IP fragmentation would do the same where
//! routers fragment and nothing filters fragments; a link that drops large
//! packets (or a firewall that drops fragments) needs this.
//!
//! The receiver keeps at most [`MAX_PARTIAL`] incomplete plaintexts; a new
//! one evicts the oldest, so a lost piece costs only its plaintext (KCP
//! resends it; a datagram is lost as it would be anyway).

use crate::wire::Inner;
use std::collections::VecDeque;

/// Header of a fragment after its inner-type byte: id u16le, index, count.
pub const FRAG_HEADER: usize = 4;
/// Most pieces one plaintext is cut into: what needs cutting is a frame
/// cut for a wider path (at most 1452 bytes, 65 more when relayed), so two
/// pieces are the rule on any path that carries the base size.
pub const MAX_PIECES: usize = 4;
/// Incomplete plaintexts a receiver holds (with [`MAX_PIECES`], a few KB
/// per session at most, however many sessions a hub has).
pub const MAX_PARTIAL: usize = 4;
/// Largest plaintext joined from pieces.
pub const MAX_JOINED: usize = 8 * 1024;

/// Cut `plain` into fragment plaintexts of at most `budget` bytes each.
/// None if it would take more than [`MAX_PIECES`] or the budget is too small.
pub fn split(plain: &[u8], id: u16, budget: usize) -> Option<Vec<Vec<u8>>> {
    let room = budget.checked_sub(1 + FRAG_HEADER).filter(|r| *r >= 64)?;
    let count = plain.len().div_ceil(room);
    if !(2..=MAX_PIECES).contains(&count) {
        return None;
    }
    Some(
        plain
            .chunks(room)
            .enumerate()
            .map(|(i, c)| {
                let mut v = Vec::with_capacity(1 + FRAG_HEADER + c.len());
                v.push(Inner::Fragment as u8);
                v.extend_from_slice(&id.to_le_bytes());
                v.push(i as u8);
                v.push(count as u8);
                v.extend_from_slice(c);
                v
            })
            .collect(),
    )
}

struct Partial {
    id: u16,
    pieces: Vec<Option<Vec<u8>>>,
    have: usize,
    bytes: usize,
}

/// Joins fragments into whole plaintexts.
#[derive(Default)]
pub struct Reassembly {
    partial: VecDeque<Partial>,
    /// Incomplete plaintexts evicted by newer ones.
    pub evicted: u64,
}

/// Why a fragment was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FragError {
    /// Shorter than its header, a count of 0, 1 or more than [`MAX_PIECES`],
    /// an index past the count, a count differing from the other pieces',
    /// or a whole larger than [`MAX_JOINED`].
    Malformed,
}

impl Reassembly {
    /// A fragment's body (after the inner-type byte). Returns the whole
    /// plaintext once its last piece is in.
    pub fn on_fragment(&mut self, body: &[u8]) -> Result<Option<Vec<u8>>, FragError> {
        if body.len() <= FRAG_HEADER {
            return Err(FragError::Malformed);
        }
        let id = u16::from_le_bytes([body[0], body[1]]);
        let (idx, count) = (body[2] as usize, body[3] as usize);
        let piece = &body[FRAG_HEADER..];
        if !(2..=MAX_PIECES).contains(&count) || idx >= count {
            return Err(FragError::Malformed);
        }
        let pos = match self.partial.iter().position(|p| p.id == id) {
            Some(i) => i,
            None => {
                if self.partial.len() >= MAX_PARTIAL {
                    self.partial.pop_front();
                    self.evicted += 1;
                }
                self.partial.push_back(Partial {
                    id,
                    pieces: vec![None; count],
                    have: 0,
                    bytes: 0,
                });
                self.partial.len() - 1
            }
        };
        let p = &mut self.partial[pos];
        if p.pieces.len() != count || p.bytes + piece.len() > MAX_JOINED {
            self.partial.remove(pos);
            return Err(FragError::Malformed);
        }
        if p.pieces[idx].is_none() {
            p.pieces[idx] = Some(piece.to_vec());
            p.have += 1;
            p.bytes += piece.len();
        }
        if p.have < count {
            return Ok(None);
        }
        let p = self.partial.remove(pos).expect("present");
        let mut whole = Vec::with_capacity(p.bytes);
        for piece in p.pieces.into_iter().flatten() {
            whole.extend_from_slice(&piece);
        }
        Ok(Some(whole))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_and_join_in_any_order() {
        let plain: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
        assert!(split(&plain, 9, 600).is_none(), "more than MAX_PIECES");
        let parts = split(&plain, 9, 1200).unwrap();
        assert_eq!(parts.len(), 3);
        assert!(parts.iter().all(|p| p.len() <= 1200));
        let mut r = Reassembly::default();
        assert_eq!(r.on_fragment(&parts[2][1..]), Ok(None));
        assert_eq!(r.on_fragment(&parts[0][1..]), Ok(None));
        // A duplicate changes nothing.
        assert_eq!(r.on_fragment(&parts[0][1..]), Ok(None));
        assert_eq!(r.on_fragment(&parts[1][1..]), Ok(Some(plain)));
    }

    #[test]
    fn small_or_huge_plaintexts_are_not_split() {
        assert!(split(&[0; 100], 1, 1200).is_none());
        assert!(split(&[0; 100_000], 1, 1200).is_none());
        assert!(split(&[0; 2000], 1, 40).is_none());
    }

    #[test]
    fn bad_fragments_are_refused_and_memory_stays_bounded() {
        let mut r = Reassembly::default();
        assert!(r.on_fragment(&[1, 0, 0]).is_err());
        assert!(r.on_fragment(&[1, 0, 0, 1, 9]).is_err(), "count 1");
        assert!(r.on_fragment(&[1, 0, 5, 3, 9]).is_err(), "index past count");
        assert!(
            r.on_fragment(&[1, 0, 0, 200, 9]).is_err(),
            "too many pieces"
        );
        assert_eq!(r.on_fragment(&[1, 0, 0, 3, 9]), Ok(None));
        assert!(r.on_fragment(&[1, 0, 1, 4, 9]).is_err(), "count changed");
        // Many incomplete plaintexts: only the newest few are kept.
        for id in 0..100u16 {
            let b = id.to_le_bytes();
            assert_eq!(r.on_fragment(&[b[0], b[1], 0, 2, 1]), Ok(None));
        }
        assert_eq!(r.partial.len(), MAX_PARTIAL);
        assert!(r.evicted >= 95);
    }
}
