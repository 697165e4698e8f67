//! Stream conversations: the long hop of a split TCP connection.
//!
//! A split connection (see [`crate::split`]) is carried as a byte stream in
//! its own KCP conversation, whose id has [`STREAM_BIT`] set so the receiver
//! knows the messages in it are [`StreamMsg`]s, not IP packets. Each KCP
//! message is one `StreamMsg`; data is cut into pieces that fill one KCP
//! segment, so no inner IP or TCP header and no inner acknowledgement ever
//! crosses the long hop.
//!
//! Both directions are bounded. Sending: [`Session::stream_room`] says how
//! many bytes may be queued now (a conversation holds at most about twice
//! the controller's inflight cap), and the proxy reads no more than that
//! from its local socket, so a slow path closes the local TCP window.
//! Receiving: a conversation keeps at most [`STREAM_RX_MAX`] bytes of
//! decoded messages; past that KCP keeps segments in its own receive window
//! (whose size the sender sees), so a slow local receiver stops the remote
//! sender instead of growing memory here.

use super::Session;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// Paths with a smoothed RTT at least this long get split TCP (shorter
/// ones only if they lose packets).
pub const SPLIT_MIN_RTT: Duration = Duration::from_millis(10);

/// Set in the conversation id of every stream conversation.
pub const STREAM_BIT: u32 = 1 << 31;

/// Decoded stream bytes a conversation holds for the proxy before it leaves
/// further segments in KCP's receive window.
pub const STREAM_RX_MAX: usize = 256 * 1024;

/// A stream conversation closed by its owner is dropped once everything it
/// sent was acknowledged and it has been quiet this long.
pub const STREAM_LINGER: Duration = Duration::from_secs(2);

/// Why the far side did not take a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The destination answered the connection attempt with a reset.
    Reset = 0,
    /// The destination did not answer (or its address is not the remote's).
    Unreachable = 1,
    /// The remote does not split connections (turned off, or at its limit):
    /// send the connection's packets as they are.
    Declined = 2,
}

/// One message of a stream conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamMsg {
    /// First message: connect from `src` to `dst` (the addresses and ports
    /// the application used; `src` belongs to the sender, `dst` to the
    /// receiver).
    Open {
        /// The connecting side.
        src: SocketAddr,
        /// The listening side.
        dst: SocketAddr,
    },
    /// The destination accepted the connection.
    Accept,
    /// The destination did not.
    Refuse(Refusal),
    /// Bytes of the connection, in order.
    Data(Vec<u8>),
    /// The sender's side will send no more (a TCP FIN, half-close).
    Fin,
    /// The connection was reset (a TCP RST, or its state was lost).
    Reset,
}

/// Something for the proxy about a stream conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEvent {
    /// Messages wait ([`Session::stream_take`]).
    Readable(u32),
    /// The conversation is gone (closed, reset by the remote, or the
    /// remote restarted): its connection is lost.
    Gone(u32),
}

/// A stream message that did not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadStreamMsg;

impl StreamMsg {
    /// Append the encoding to `v`.
    pub fn encode_into(&self, v: &mut Vec<u8>) {
        match self {
            StreamMsg::Open { src, dst } => {
                v.push(0);
                match (src.ip(), dst.ip()) {
                    (IpAddr::V4(s), IpAddr::V4(d)) => {
                        v.push(4);
                        v.extend_from_slice(&s.octets());
                        v.extend_from_slice(&src.port().to_be_bytes());
                        v.extend_from_slice(&d.octets());
                        v.extend_from_slice(&dst.port().to_be_bytes());
                    }
                    (s, d) => {
                        v.push(6);
                        v.extend_from_slice(&v6(s).octets());
                        v.extend_from_slice(&src.port().to_be_bytes());
                        v.extend_from_slice(&v6(d).octets());
                        v.extend_from_slice(&dst.port().to_be_bytes());
                    }
                }
            }
            StreamMsg::Accept => v.push(1),
            StreamMsg::Refuse(r) => {
                v.push(2);
                v.push(*r as u8);
            }
            StreamMsg::Data(d) => {
                v.push(3);
                v.extend_from_slice(d);
            }
            StreamMsg::Fin => v.push(4),
            StreamMsg::Reset => v.push(5),
        }
    }

    /// The encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode_into(&mut v);
        v
    }

    /// Decode one message (a whole KCP message).
    pub fn decode(b: &[u8]) -> Result<StreamMsg, BadStreamMsg> {
        let (&tag, rest) = b.split_first().ok_or(BadStreamMsg)?;
        let bare = |m: StreamMsg| {
            if rest.is_empty() {
                Ok(m)
            } else {
                Err(BadStreamMsg)
            }
        };
        match tag {
            0 => {
                let (&fam, a) = rest.split_first().ok_or(BadStreamMsg)?;
                let n = match fam {
                    4 => 4,
                    6 => 16,
                    _ => return Err(BadStreamMsg),
                };
                if a.len() != 2 * (n + 2) {
                    return Err(BadStreamMsg);
                }
                let ep = |x: &[u8]| -> SocketAddr {
                    let ip = if n == 4 {
                        IpAddr::V4(Ipv4Addr::new(x[0], x[1], x[2], x[3]))
                    } else {
                        let mut o = [0u8; 16];
                        o.copy_from_slice(&x[..16]);
                        IpAddr::V6(Ipv6Addr::from(o))
                    };
                    SocketAddr::new(ip, u16::from_be_bytes([x[n], x[n + 1]]))
                };
                Ok(StreamMsg::Open {
                    src: ep(&a[..n + 2]),
                    dst: ep(&a[n + 2..]),
                })
            }
            1 => bare(StreamMsg::Accept),
            2 => match rest {
                [0] => Ok(StreamMsg::Refuse(Refusal::Reset)),
                [1] => Ok(StreamMsg::Refuse(Refusal::Unreachable)),
                [2] => Ok(StreamMsg::Refuse(Refusal::Declined)),
                _ => Err(BadStreamMsg),
            },
            3 if !rest.is_empty() => Ok(StreamMsg::Data(rest.to_vec())),
            4 => bare(StreamMsg::Fin),
            5 => bare(StreamMsg::Reset),
            _ => Err(BadStreamMsg),
        }
    }
}

fn v6(a: IpAddr) -> Ipv6Addr {
    match a {
        IpAddr::V6(x) => x,
        IpAddr::V4(x) => x.to_ipv6_mapped(),
    }
}

/// Is `id` a stream conversation?
pub fn is_stream(id: u32) -> bool {
    id & STREAM_BIT != 0
}

impl Session {
    /// Open a stream conversation for a connection from `src` to `dst` and
    /// send its [`StreamMsg::Open`]. None if there is no session yet or this
    /// side's conversation limit is reached (the caller sends the
    /// connection's packets unsplit).
    pub fn open_stream(&mut self, now: Duration, src: SocketAddr, dst: SocketAddr) -> Option<u32> {
        self.current.as_ref()?;
        if self.own_convs() >= self.cfg.max_convs && !self.evict_idle(now) {
            return None;
        }
        let id = loop {
            let id = ((self.next_conv << 1) & !STREAM_BIT) | self.my_bit | STREAM_BIT;
            self.next_conv = self.next_conv.wrapping_add(1).max(1);
            if !self.convs.contains_key(&id) && !self.tombstone_set.contains(&id) {
                break id;
            }
        };
        self.conv(now, id);
        self.stats.streams_opened += 1;
        self.stream_send(now, id, &StreamMsg::Open { src, dst });
        Some(id)
    }

    /// Does splitting a new TCP connection to this peer pay? Yes unless
    /// the path is known to be short and clean (RTT under
    /// [`SPLIT_MIN_RTT`], no loss measured without a queue): there the end
    /// hosts' TCPs lose nothing to the path, and terminating every
    /// connection costs CPU that a fast LAN-like path turns into lost
    /// throughput (a flat namespace link: ~300 Mbit/s split against ~650
    /// as packets, `fastmesh-lab bench`). Unknown RTT counts as long.
    pub fn split_worthwhile(&self) -> bool {
        match self.srtt {
            None => true,
            Some(rtt) => rtt >= SPLIT_MIN_RTT || self.cc.clean_loss() >= super::fec::MIN_LOSS,
        }
    }

    /// Bytes of data one [`StreamMsg::Data`] should carry (it then fills one
    /// KCP segment).
    pub fn stream_chunk(&self) -> usize {
        self.kcp_mtu() - kcp::KCP_OVERHEAD - 1
    }

    /// Bytes of data `conv` takes now (0 if it does not exist or is full).
    pub fn stream_room(&self, conv: u32) -> usize {
        let Some(c) = self.convs.get(&conv) else {
            return 0;
        };
        let cap = (2.0 * self.cc.inflight_cap() / self.avg_seg) as usize + 64;
        let limit = cap.clamp(256, usize::from(self.cfg.rcv_wnd));
        let used = c.queue.len() + c.kcp.wait_snd();
        limit.saturating_sub(used) * self.stream_chunk()
    }

    /// Messages of `conv` waiting to enter KCP.
    pub fn stream_queued(&self, conv: u32) -> usize {
        self.convs.get(&conv).map_or(0, |c| c.queue.len())
    }

    /// Queue `msg` on stream conversation `conv` (data no larger than
    /// [`Session::stream_chunk`], after checking [`Session::stream_room`]).
    /// False if the conversation is gone.
    pub fn stream_send(&mut self, now: Duration, conv: u32, msg: &StreamMsg) -> bool {
        if !self.convs.contains_key(&conv) {
            return false;
        }
        self.pmtu_wanted = true;
        let idle = self.queued == 0
            && self.paced_len == 0
            && self
                .last_kcp_tx
                .is_none_or(|t| now.saturating_sub(t) >= super::IDLE_RESTART)
            && self.convs.values().all(|c| c.kcp.wait_snd() == 0);
        let c = self.conv(now, conv);
        c.queue.push_back(msg.encode());
        c.last_active = now;
        self.queued += 1;
        self.dirty = true;
        if let StreamMsg::Data(d) = msg {
            self.stats.stream_tx_bytes += d.len() as u64;
        }
        if idle {
            self.cc.restart_from_idle(now);
        }
        true
    }

    /// The next message received on `conv`, in order.
    pub fn stream_take(&mut self, now: Duration, conv: u32) -> Option<StreamMsg> {
        let c = self.convs.get_mut(&conv)?;
        let m = c.rx_msgs.pop_front()?;
        if let StreamMsg::Data(d) = &m {
            c.rx_bytes -= d.len();
        }
        self.pull_stream(now, conv);
        Some(m)
    }

    /// Put back the unconsumed rest of a message just taken from `conv`
    /// (the local socket took only part of the data).
    pub fn stream_unread(&mut self, conv: u32, msg: StreamMsg) {
        if let Some(c) = self.convs.get_mut(&conv) {
            if let StreamMsg::Data(d) = &msg {
                c.rx_bytes += d.len();
            }
            c.rx_msgs.push_front(msg);
        }
    }

    /// The proxy is done with `conv`: drop it once what it sent is
    /// acknowledged and it has been quiet for [`STREAM_LINGER`].
    pub fn stream_close(&mut self, conv: u32) {
        if let Some(c) = self.convs.get_mut(&conv) {
            c.closing = true;
        }
    }

    /// Whether stream events wait for the proxy.
    pub fn has_stream_events(&self) -> bool {
        !self.streams_gone.is_empty() || !self.streams_ready.is_empty()
    }

    /// Next stream event.
    pub fn poll_stream_event(&mut self) -> Option<StreamEvent> {
        if let Some(g) = self.streams_gone.pop_front() {
            return Some(StreamEvent::Gone(g));
        }
        self.streams_ready.pop_first().map(StreamEvent::Readable)
    }

    /// Move messages of stream conversation `id` out of KCP while its
    /// decoded backlog is under [`STREAM_RX_MAX`].
    pub(super) fn pull_stream(&mut self, now: Duration, id: u32) {
        let Some(c) = self.convs.get_mut(&id) else {
            return;
        };
        let mut got = false;
        let mut bad = 0;
        while c.rx_bytes < STREAM_RX_MAX {
            let Ok(n) = c.kcp.peeksize() else { break };
            let mut m = vec![0u8; n];
            match c.kcp.recv(&mut m) {
                Ok(k) => m.truncate(k),
                Err(_) => break,
            }
            match StreamMsg::decode(&m) {
                Ok(msg) => {
                    if let StreamMsg::Data(d) = &msg {
                        c.rx_bytes += d.len();
                    }
                    c.rx_msgs.push_back(msg);
                    got = true;
                }
                Err(_) => bad += 1,
            }
        }
        if got {
            // Taking messages may reopen KCP's receive window: tell the
            // sender soon (KCP answers its window probes on a flush).
            c.ack_owed.get_or_insert(now);
            self.streams_ready.insert(id);
        }
        self.stats.malformed += bad;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn messages_round_trip() {
        let v4 = |p| SocketAddr::from(([10, 7, 0, 2], p));
        let v6a = |p| SocketAddr::new("fd00::7".parse().unwrap(), p);
        for m in [
            StreamMsg::Open {
                src: v4(40000),
                dst: v4(22),
            },
            StreamMsg::Open {
                src: v6a(1),
                dst: v6a(65535),
            },
            StreamMsg::Accept,
            StreamMsg::Refuse(Refusal::Reset),
            StreamMsg::Refuse(Refusal::Unreachable),
            StreamMsg::Refuse(Refusal::Declined),
            StreamMsg::Data(vec![1, 2, 3]),
            StreamMsg::Fin,
            StreamMsg::Reset,
        ] {
            assert_eq!(StreamMsg::decode(&m.encode()), Ok(m));
        }
    }

    #[test]
    fn malformed_messages_are_refused() {
        for b in [
            &[][..],
            &[0, 5],
            &[0, 4, 1, 2],
            &[1, 0],
            &[2, 3],
            &[3],
            &[6],
            &[4, 4],
        ] {
            assert_eq!(StreamMsg::decode(b), Err(BadStreamMsg), "{b:?}");
        }
    }

    proptest! {
        #[test]
        fn decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(m) = StreamMsg::decode(&b) {
                prop_assert_eq!(m.encode(), b);
            }
        }
    }
}
