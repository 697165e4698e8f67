//! Wire format: the outer frames on UDP and the control messages inside sessions.
//!
//! Every UDP payload fastmesh sends starts with the same two bytes: the protocol
//! version and the frame type. Field offsets live here and nowhere else; untrusted
//! bytes are only read through [`Frame::parse`], which checks lengths before any
//! field is touched (a checked view in the style of smoltcp's `new_checked`).
//!
//! ```text
//! HandshakeInit  | ver | 1 | 0 0 | sender_idx u32le | noise msg 1               (120 B total)
//! HandshakeResp  | ver | 2 | 0 0 | sender_idx u32le | receiver_idx u32le | noise msg 2 (68 B)
//! Data           | ver | 3 | 0 0 | receiver_idx u32le | counter u64le | AEAD(ciphertext+tag)
//! ```
//!
//! `docs/wire.md` describes every frame and field.

use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};

pub mod segment;

/// The protocol version carried in byte 0 of every frame.
pub const VERSION: u8 = 1;

/// Frame type byte of a Noise handshake initiation.
pub const TYPE_HANDSHAKE_INIT: u8 = 1;
/// Frame type byte of a Noise handshake response.
pub const TYPE_HANDSHAKE_RESP: u8 = 2;
/// Frame type byte of an encrypted data frame.
pub const TYPE_DATA: u8 = 3;

/// Length of the data-frame header (version, type, reserved, receiver index, counter).
pub const DATA_HEADER_LEN: usize = 16;
/// Length of the Poly1305 tag appended to every ciphertext.
pub const TAG_LEN: usize = 16;
/// Header length of a handshake initiation before the Noise message.
pub const INIT_HEADER_LEN: usize = 8;
/// Header length of a handshake response before the Noise message.
pub const RESP_HEADER_LEN: usize = 12;
/// Noise `IKpsk1` message 1 length with our 16-byte payload (timestamp, incarnation):
/// e(32) + s(32+16) + payload(16+16).
pub const NOISE_INIT_LEN: usize = 32 + 48 + 16 + 16;
/// Noise `IKpsk1` message 2 length with our 8-byte payload (incarnation): e(32) + payload(8+16).
pub const NOISE_RESP_LEN: usize = 32 + 8 + 16;
/// Total length of a handshake initiation frame.
pub const INIT_FRAME_LEN: usize = INIT_HEADER_LEN + NOISE_INIT_LEN;
/// Total length of a handshake response frame.
pub const RESP_FRAME_LEN: usize = RESP_HEADER_LEN + NOISE_RESP_LEN;

/// Bytes a data frame adds around its plaintext (header + tag).
pub const DATA_OVERHEAD: usize = DATA_HEADER_LEN + TAG_LEN;

/// Bytes a hub relay adds around a whole frame: its own data frame around an
/// inner-type byte and the 32-byte key of the other end.
pub const RELAY_OVERHEAD: usize = DATA_OVERHEAD + 1 + 32;

/// Largest UDP payload fastmesh ever sends or accepts.
pub const MAX_FRAME: usize = 65_507;

/// First plaintext byte inside a data frame: what the rest of the plaintext is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Inner {
    /// A whole inner IP packet sent as an unreliable datagram.
    Ip = 0,
    /// One or more KCP segments (the KCP header carries the conversation id).
    Kcp = 1,
    /// A [`Control`] message encoded with MessagePack.
    Control = 2,
    /// Nothing: a keepalive that proves liveness and confirms a fresh session.
    Keepalive = 3,
    /// A whole frame of another session, after the 32-byte key of the node it
    /// is for (peer to hub) or from (hub to peer): relaying through a hub.
    Relay = 4,
    /// KCP segments sent as a member of a forward-error-correction group:
    /// group u16le, index u8, then the segments (see `session::fec`).
    FecData = 5,
    /// A Reed–Solomon parity shard of a group: group u16le, index u8, data
    /// frames k u8, parity frames m u8, then the shard.
    FecParity = 6,
    /// Path MTU probe: probe id u32le, then padding to the size probed. Sent
    /// with the don't-fragment bit; answered with [`Control::MtuAck`] on the
    /// path it came by.
    MtuProbe = 7,
    /// A piece of a plaintext larger than the path carries: id u16le,
    /// index u8, count u8, then the piece (see `session::frag`).
    Fragment = 8,
}

impl Inner {
    /// Decode the inner-type byte.
    pub fn from_u8(b: u8) -> Option<Inner> {
        match b {
            0 => Some(Inner::Ip),
            1 => Some(Inner::Kcp),
            2 => Some(Inner::Control),
            3 => Some(Inner::Keepalive),
            4 => Some(Inner::Relay),
            5 => Some(Inner::FecData),
            6 => Some(Inner::FecParity),
            7 => Some(Inner::MtuProbe),
            8 => Some(Inner::Fragment),
            _ => None,
        }
    }
}

/// Why bytes from the network were not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Fewer bytes than the smallest frame of the claimed type.
    #[error("frame truncated: {0} bytes")]
    Truncated(usize),
    /// Version byte is not [`VERSION`].
    #[error("unsupported protocol version {0}")]
    Version(u8),
    /// Unknown frame type byte.
    #[error("unknown frame type {0}")]
    Type(u8),
    /// Reserved bytes are not zero.
    #[error("reserved bits set")]
    Reserved,
    /// Larger than any frame fastmesh sends.
    #[error("frame too large: {0} bytes")]
    TooLarge(usize),
    /// A handshake frame whose length is not the fixed handshake length.
    #[error("bad handshake length {0}")]
    HandshakeLength(usize),
}

/// A checked, borrowed view of one UDP payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Noise message 1 from an initiator.
    HandshakeInit {
        /// Index the initiator wants data frames addressed to.
        sender_index: u32,
        /// The Noise message.
        noise: &'a [u8],
    },
    /// Noise message 2 from a responder.
    HandshakeResp {
        /// Index the responder wants data frames addressed to.
        sender_index: u32,
        /// The initiator's index, echoed.
        receiver_index: u32,
        /// The Noise message.
        noise: &'a [u8],
    },
    /// An encrypted data frame.
    Data {
        /// Index chosen by the receiver of this frame at handshake time.
        receiver_index: u32,
        /// Per-direction counter; the AEAD nonce and the replay-window position.
        counter: u64,
        /// The 16 header bytes, authenticated as associated data.
        header: &'a [u8],
        /// Ciphertext followed by the tag.
        ciphertext: &'a [u8],
    },
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl<'a> Frame<'a> {
    /// Parse untrusted bytes. Never panics; every length is checked first.
    pub fn parse(b: &'a [u8]) -> Result<Frame<'a>, FrameError> {
        if b.len() < 2 {
            return Err(FrameError::Truncated(b.len()));
        }
        if b.len() > MAX_FRAME {
            return Err(FrameError::TooLarge(b.len()));
        }
        if b[0] != VERSION {
            return Err(FrameError::Version(b[0]));
        }
        match b[1] {
            TYPE_HANDSHAKE_INIT => {
                if b.len() != INIT_FRAME_LEN {
                    return Err(FrameError::HandshakeLength(b.len()));
                }
                if b[2] != 0 || b[3] != 0 {
                    return Err(FrameError::Reserved);
                }
                Ok(Frame::HandshakeInit {
                    sender_index: u32_at(b, 4),
                    noise: &b[INIT_HEADER_LEN..],
                })
            }
            TYPE_HANDSHAKE_RESP => {
                if b.len() != RESP_FRAME_LEN {
                    return Err(FrameError::HandshakeLength(b.len()));
                }
                if b[2] != 0 || b[3] != 0 {
                    return Err(FrameError::Reserved);
                }
                Ok(Frame::HandshakeResp {
                    sender_index: u32_at(b, 4),
                    receiver_index: u32_at(b, 8),
                    noise: &b[RESP_HEADER_LEN..],
                })
            }
            TYPE_DATA => {
                if b.len() < DATA_HEADER_LEN + TAG_LEN {
                    return Err(FrameError::Truncated(b.len()));
                }
                if b[2] != 0 || b[3] != 0 {
                    return Err(FrameError::Reserved);
                }
                let mut c = [0u8; 8];
                c.copy_from_slice(&b[8..16]);
                Ok(Frame::Data {
                    receiver_index: u32_at(b, 4),
                    counter: u64::from_le_bytes(c),
                    header: &b[..DATA_HEADER_LEN],
                    ciphertext: &b[DATA_HEADER_LEN..],
                })
            }
            t => Err(FrameError::Type(t)),
        }
    }
}

/// Write a data-frame header into `out[..16]`.
pub fn write_data_header(out: &mut [u8], receiver_index: u32, counter: u64) {
    out[0] = VERSION;
    out[1] = TYPE_DATA;
    out[2] = 0;
    out[3] = 0;
    out[4..8].copy_from_slice(&receiver_index.to_le_bytes());
    out[8..16].copy_from_slice(&counter.to_le_bytes());
}

/// Write a handshake-initiation header into `out[..8]`.
pub fn write_init_header(out: &mut [u8], sender_index: u32) {
    out[0] = VERSION;
    out[1] = TYPE_HANDSHAKE_INIT;
    out[2] = 0;
    out[3] = 0;
    out[4..8].copy_from_slice(&sender_index.to_le_bytes());
}

/// Write a handshake-response header into `out[..12]`.
pub fn write_resp_header(out: &mut [u8], sender_index: u32, receiver_index: u32) {
    out[0] = VERSION;
    out[1] = TYPE_HANDSHAKE_RESP;
    out[2] = 0;
    out[3] = 0;
    out[4..8].copy_from_slice(&sender_index.to_le_bytes());
    out[8..12].copy_from_slice(&receiver_index.to_le_bytes());
}

// ---------------------------------------------------------------------------
// Control messages
// ---------------------------------------------------------------------------

/// Largest encoded control message accepted or produced.
pub const CONTROL_CAP: usize = 16 * 1024;

/// Most peers in one [`Control::PeerMapDelta`] (larger maps are sent in several).
pub const MAX_UPSERTS: usize = 64;
/// Most removals in one delta.
pub const MAX_REMOVALS: usize = 256;
/// Most addresses or endpoints in one list.
pub const MAX_ADDRS: usize = 8;
/// Most subnet routes one member advertises.
pub const MAX_ROUTES: usize = 8;
/// Longest member name a hub keeps and passes on, in bytes (longer names
/// are cut at a character boundary): one peer-map record then stays under
/// a kilobyte, so every record fits a delta.
pub const MAX_NAME: usize = 64;

/// `name` cut to at most [`MAX_NAME`] bytes at a character boundary.
pub fn bounded_name(name: &str) -> &str {
    if name.len() <= MAX_NAME {
        return name;
    }
    let mut end = MAX_NAME;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// Deserialize a list of at most `N` items without trusting the declared length:
/// the vector grows as items actually decode, so a forged length prefix cannot
/// make the decoder allocate.
fn bounded<'de, D, T, const N: usize>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct V<T, const N: usize>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>, const N: usize> serde::de::Visitor<'de> for V<T, N> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a list of at most {N} items")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Vec<T>, A::Error> {
            if a.size_hint().is_some_and(|n| n > N) {
                return Err(serde::de::Error::invalid_length(
                    a.size_hint().unwrap_or(0),
                    &self,
                ));
            }
            let mut v = Vec::new();
            while let Some(x) = a.next_element()? {
                if v.len() == N {
                    return Err(serde::de::Error::invalid_length(N + 1, &self));
                }
                v.push(x);
            }
            Ok(v)
        }
    }
    d.deserialize_seq(V::<T, N>(std::marker::PhantomData))
}

/// A node's long-term X25519 public key.
pub type PublicKey = [u8; 32];

/// An overlay address with its prefix length, e.g. `10.7.0.3/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IpNet {
    /// The node's own address.
    pub addr: IpAddr,
    /// Prefix length of the overlay network.
    pub prefix: u8,
}

impl IpNet {
    /// Bits in an address of this family.
    fn bits(&self) -> u8 {
        if self.addr.is_ipv4() {
            32
        } else {
            128
        }
    }

    /// `ip` with every bit after the first `prefix` cleared, as a u128
    /// (IPv4 in the low 32 bits), or `None` if `ip` is of the other family.
    fn masked(&self, ip: &IpAddr) -> Option<u128> {
        let (v, bits) = match ip {
            IpAddr::V4(a) if self.addr.is_ipv4() => (u32::from(*a) as u128, 32u32),
            IpAddr::V6(a) if self.addr.is_ipv6() => (u128::from(*a), 128),
            _ => return None,
        };
        let p = (self.prefix as u32).min(bits);
        let host = if p == 0 {
            u128::MAX
        } else {
            (1u128 << (bits - p)).wrapping_sub(1)
        };
        let host = if bits == 32 { host & 0xffff_ffff } else { host };
        Some(v & !host)
    }

    /// The network this prefix denotes (host bits cleared).
    pub fn network(&self) -> IpNet {
        let m = self.masked(&self.addr).unwrap_or(0);
        let addr = if self.addr.is_ipv4() {
            IpAddr::from((m as u32).to_be_bytes())
        } else {
            IpAddr::from(m.to_be_bytes())
        };
        IpNet {
            addr,
            prefix: self.prefix.min(self.bits()),
        }
    }

    /// True if `ip` is inside this prefix.
    pub fn contains(&self, ip: &IpAddr) -> bool {
        self.masked(ip).is_some() && self.masked(ip) == self.masked(&self.addr)
    }

    /// True if the two prefixes share an address (one contains the other).
    pub fn overlaps(&self, other: &IpNet) -> bool {
        if self.prefix <= other.prefix {
            self.contains(&other.addr)
        } else {
            other.contains(&self.addr)
        }
    }
}

impl std::str::FromStr for IpNet {
    type Err = String;

    /// "10.1.2.3/24", "fd00::/48" (any prefix length the family allows).
    fn from_str(s: &str) -> Result<IpNet, String> {
        let (a, p) = s.split_once('/').ok_or("want ADDRESS/PREFIX")?;
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{a:?} is not an IP address"))?;
        let prefix: u8 = p
            .parse()
            .map_err(|_| format!("{p:?} is not a prefix length"))?;
        let n = IpNet { addr, prefix };
        if prefix > n.bits() {
            return Err(format!("prefix must be at most {}", n.bits()));
        }
        Ok(n)
    }
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// What the hub knows of one member of the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// The member's long-term public key.
    pub key: PublicKey,
    /// Overlay addresses owned by the member (IPv4 and/or IPv6).
    #[serde(deserialize_with = "bounded::<_, _, MAX_ADDRS>")]
    pub overlay: Vec<IpNet>,
    /// UDP endpoints: the one the hub observed first, then the member's own candidates.
    #[serde(deserialize_with = "bounded::<_, _, MAX_ADDRS>")]
    pub endpoints: Vec<SocketAddr>,
    /// Free-form name for status displays.
    pub name: String,
    /// Subnets reachable through the member (site-to-site routes): packets
    /// to them go to this member, and packets from them are accepted only
    /// from it. `addr` is the network address, host bits zero.
    #[serde(default, deserialize_with = "bounded::<_, _, MAX_ROUTES>")]
    pub routes: Vec<IpNet>,
}

impl PeerInfo {
    /// Bytes of this record encoded as it sits in a
    /// [`Control::PeerMapDelta`]'s list.
    pub fn encoded_len(&self) -> usize {
        let mut v = Vec::with_capacity(128);
        rmp_serde::encode::write(&mut v, self).map_or(CONTROL_CAP, |_| v.len())
    }
}

/// Machine-readable reason in [`Control::Nack`] and [`Control::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The requested overlay address is owned by another key.
    AddressInUse,
    /// The node is not allowed in this network.
    NotAllowed,
    /// The message was not understood.
    BadRequest,
    /// The receiver is overloaded; retry later.
    Busy,
    /// The node's key was revoked by the hub's operator.
    Revoked,
    /// The hub admits only listed keys, and this one is not listed.
    NotListed,
    /// An advertised route overlaps one another key advertises.
    RouteInUse,
}

/// Control messages, carried encrypted inside sessions (hub ↔ peer and peer ↔ peer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    /// Peer → hub: join or refresh membership.
    Register {
        /// Overlay addresses the node claims.
        #[serde(deserialize_with = "bounded::<_, _, MAX_ADDRS>")]
        overlay: Vec<IpNet>,
        /// Local candidate endpoints (for hole punching).
        #[serde(deserialize_with = "bounded::<_, _, MAX_ADDRS>")]
        local_endpoints: Vec<SocketAddr>,
        /// Display name.
        name: String,
        /// Peer-map version the node already holds (0 = none).
        have_version: u64,
        /// Subnets the node routes for (see [`PeerInfo::routes`]).
        #[serde(default, deserialize_with = "bounded::<_, _, MAX_ROUTES>")]
        routes: Vec<IpNet>,
        /// The node can work from records fetched on demand
        /// ([`Control::Lookup`]) instead of the whole map. Absent (false)
        /// from older nodes, which always get the whole map.
        #[serde(default)]
        lookups: bool,
    },
    /// Hub → peer: registration accepted.
    RegisterAck {
        /// The endpoint the hub saw the registration come from.
        observed: SocketAddr,
        /// Heartbeat interval the hub expects, in milliseconds.
        heartbeat_ms: u32,
        /// The hub sends this member no peer map: it asks for the records
        /// it needs with [`Control::Lookup`] and gets [`Control::Records`].
        #[serde(default)]
        on_demand: bool,
    },
    /// Any → any: a request was refused.
    Nack {
        /// Why.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
    /// Hub → peer: changes of the peer map from `from_version` to `to_version`.
    PeerMapDelta {
        /// Version the delta applies to (0 = a full snapshot follows).
        from_version: u64,
        /// Version after applying.
        to_version: u64,
        /// Members added or changed (at most [`MAX_UPSERTS`]).
        #[serde(deserialize_with = "bounded::<_, _, MAX_UPSERTS>")]
        upserts: Vec<PeerInfo>,
        /// Members removed (at most [`MAX_REMOVALS`]).
        #[serde(deserialize_with = "bounded::<_, _, MAX_REMOVALS>")]
        removals: Vec<PublicKey>,
        /// Of `removals`, the keys the hub revoked: a peer drops these on
        /// word from any hub it is registered with, not only the one whose
        /// map it follows, and takes them back from no hub. (Absent from
        /// older hubs' deltas.)
        #[serde(default, deserialize_with = "bounded::<_, _, MAX_REMOVALS>")]
        revoked: Vec<PublicKey>,
    },
    /// Peer → hub or peer → peer: liveness, with the sender's peer-map version.
    Heartbeat {
        /// Sequence number, echoed in the ack.
        seq: u64,
        /// Peer-map version the sender holds.
        map_version: u64,
    },
    /// Reply to a heartbeat.
    HeartbeatAck {
        /// Echoed sequence number.
        seq: u64,
        /// Endpoint the heartbeat was seen from.
        observed: SocketAddr,
        /// A hub's heartbeat interval now (None from a peer): members
        /// follow a hub whose interval changed (a reload) without
        /// registering again. Absent in acks from older nodes.
        #[serde(default)]
        interval_ms: Option<u32>,
    },
    /// Peer → hub: please coordinate a direct path to `target`.
    PunchRequest {
        /// Key of the peer to reach.
        target: PublicKey,
    },
    /// Hub → peer: send to `peer` at these candidates now.
    PunchNotify {
        /// Key of the other side.
        peer: PublicKey,
        /// Candidate endpoints to try, best first.
        #[serde(deserialize_with = "bounded::<_, _, MAX_ADDRS>")]
        candidates: Vec<SocketAddr>,
    },
    /// RTT probe; the receiver echoes `ts_us` in a [`Control::Pong`].
    Ping {
        /// Sender's clock in microseconds.
        ts_us: u64,
    },
    /// Echo of a [`Control::Ping`].
    Pong {
        /// The ping's `ts_us`.
        ts_us: u64,
    },
    /// Receiver report for rate control: cumulative counts of data frames received.
    Feedback {
        /// Data frames received and authenticated.
        frames: u64,
        /// Highest data-frame counter seen, plus one.
        highest: u64,
        /// Wire bytes of those frames.
        bytes: u64,
    },
    /// The receiver no longer knows KCP conversation `conv`; the sender must drop it.
    ConvReset {
        /// The KCP conversation id.
        conv: u32,
    },
    /// Peer → hub: the node is shutting down; drop it from the map now.
    Leave,
    /// Generic error notice.
    Error {
        /// Why.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
    /// Path probe: sent on one path to a peer; answered on the path it came by.
    PathProbe {
        /// Probe id, echoed.
        id: u32,
    },
    /// Answer to a [`Control::PathProbe`].
    PathAck {
        /// The probe's id.
        id: u32,
    },
    /// Answer to an [`Inner::MtuProbe`]: a frame of its size got through.
    MtuAck {
        /// The probe's id.
        id: u32,
    },
    /// Peer → hub (on-demand members): send me the records of the members
    /// owning these overlay addresses (or routing for them) and of these
    /// keys, and tell me when they change or leave.
    Lookup {
        /// Overlay destinations a packet wants.
        #[serde(deserialize_with = "bounded::<_, _, MAX_ADDRS>")]
        addrs: Vec<IpAddr>,
        /// Keys (a node that opened a session with us, a record to renew).
        #[serde(deserialize_with = "bounded::<_, _, MAX_UPSERTS>")]
        keys: Vec<PublicKey>,
    },
    /// Peer → hub (on-demand members): stop telling me about these keys.
    Forget {
        /// Keys dropped from the member's records.
        #[serde(deserialize_with = "bounded::<_, _, MAX_REMOVALS>")]
        keys: Vec<PublicKey>,
    },
    /// Hub → peer (on-demand members): records asked for, or records the
    /// member holds that changed or left. Not versioned: a record is whole.
    Records {
        /// Members added or changed (at most [`MAX_UPSERTS`]).
        #[serde(deserialize_with = "bounded::<_, _, MAX_UPSERTS>")]
        upserts: Vec<PeerInfo>,
        /// Members that left.
        #[serde(deserialize_with = "bounded::<_, _, MAX_REMOVALS>")]
        removals: Vec<PublicKey>,
        /// Of `removals`, the keys the hub revoked.
        #[serde(deserialize_with = "bounded::<_, _, MAX_REMOVALS>")]
        revoked: Vec<PublicKey>,
        /// Looked-up addresses no online member owns or routes.
        #[serde(deserialize_with = "bounded::<_, _, MAX_ADDRS>")]
        missing: Vec<IpAddr>,
    },
}

/// Why a control message could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Input or output exceeds [`CONTROL_CAP`].
    #[error("control message of {0} bytes exceeds the cap")]
    TooLarge(usize),
    /// MessagePack decoding failed.
    #[error("malformed control message: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    /// MessagePack encoding failed.
    #[error("control message encoding failed: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
}

impl Control {
    /// Encode, appending to `out`. Fails if the encoding exceeds [`CONTROL_CAP`].
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ControlError> {
        let start = out.len();
        rmp_serde::encode::write(out, self)?;
        let n = out.len() - start;
        if n > CONTROL_CAP {
            out.truncate(start);
            return Err(ControlError::TooLarge(n));
        }
        Ok(())
    }

    /// Encode into a fresh vector.
    pub fn encode(&self) -> Result<Vec<u8>, ControlError> {
        let mut v = Vec::with_capacity(64);
        self.encode_into(&mut v)?;
        Ok(v)
    }

    /// Decode untrusted bytes. Inputs above the cap are refused before parsing;
    /// lists are bounded ([`MAX_UPSERTS`], [`MAX_REMOVALS`], [`MAX_ADDRS`]) and
    /// grow only as items decode, and strings are at most as long as the input,
    /// so no allocation exceeds [`CONTROL_CAP`].
    pub fn decode(b: &[u8]) -> Result<Control, ControlError> {
        if b.len() > CONTROL_CAP {
            return Err(ControlError::TooLarge(b.len()));
        }
        Ok(rmp_serde::from_slice(b)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_header_roundtrip() {
        let mut b = vec![0u8; DATA_HEADER_LEN + TAG_LEN + 5];
        write_data_header(&mut b, 0xdead_beef, 77);
        match Frame::parse(&b).unwrap() {
            Frame::Data {
                receiver_index,
                counter,
                header,
                ciphertext,
            } => {
                assert_eq!(receiver_index, 0xdead_beef);
                assert_eq!(counter, 77);
                assert_eq!(header.len(), DATA_HEADER_LEN);
                assert_eq!(ciphertext.len(), TAG_LEN + 5);
            }
            f => panic!("wrong frame {f:?}"),
        }
    }

    #[test]
    fn rejects_short_wrong_version_reserved() {
        assert_eq!(Frame::parse(&[]), Err(FrameError::Truncated(0)));
        assert_eq!(Frame::parse(&[9, 3]), Err(FrameError::Version(9)));
        assert_eq!(Frame::parse(&[VERSION, 99]), Err(FrameError::Type(99)));
        let mut b = vec![0u8; DATA_HEADER_LEN + TAG_LEN];
        write_data_header(&mut b, 1, 1);
        b[2] = 1;
        assert_eq!(Frame::parse(&b), Err(FrameError::Reserved));
        assert_eq!(
            Frame::parse(&b[..DATA_HEADER_LEN + TAG_LEN - 1]),
            Err(FrameError::Truncated(31))
        );
    }

    #[test]
    fn handshake_lengths_are_exact() {
        let mut b = vec![0u8; INIT_FRAME_LEN];
        write_init_header(&mut b, 5);
        assert!(matches!(
            Frame::parse(&b),
            Ok(Frame::HandshakeInit {
                sender_index: 5,
                ..
            })
        ));
        b.push(0);
        assert_eq!(
            Frame::parse(&b),
            Err(FrameError::HandshakeLength(INIT_FRAME_LEN + 1))
        );
        let mut r = vec![0u8; RESP_FRAME_LEN];
        write_resp_header(&mut r, 6, 7);
        assert!(matches!(
            Frame::parse(&r),
            Ok(Frame::HandshakeResp {
                sender_index: 6,
                receiver_index: 7,
                ..
            })
        ));
    }

    #[test]
    fn list_limits_just_inside_and_just_past() {
        let delta = |n: usize| Control::PeerMapDelta {
            from_version: 1,
            to_version: 2,
            upserts: Vec::new(),
            removals: vec![[7u8; 32]; n],
            revoked: Vec::new(),
        };
        let ok = delta(MAX_REMOVALS).encode().unwrap();
        assert_eq!(Control::decode(&ok).unwrap(), delta(MAX_REMOVALS));
        let past = delta(MAX_REMOVALS + 1).encode().unwrap();
        assert!(matches!(
            Control::decode(&past),
            Err(ControlError::Decode(_))
        ));
    }

    #[test]
    fn control_cap_enforced_both_ways() {
        let big = Control::Error {
            code: ErrorCode::BadRequest,
            message: "x".repeat(CONTROL_CAP),
        };
        assert!(matches!(big.encode(), Err(ControlError::TooLarge(_))));
        let just_inside = Control::Error {
            code: ErrorCode::BadRequest,
            message: "x".repeat(CONTROL_CAP - 64),
        };
        let enc = just_inside.encode().unwrap();
        assert_eq!(Control::decode(&enc).unwrap(), just_inside);
        assert!(matches!(
            Control::decode(&vec![0u8; CONTROL_CAP + 1]),
            Err(ControlError::TooLarge(_))
        ));
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn prefixes_contain_overlap_and_normalise() {
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("10.0.0.0".parse::<IpNet>().is_err());
        assert!("x/8".parse::<IpNet>().is_err());
        assert_eq!(net("::/0").prefix, 0);
        let lan = net("192.168.5.0/24");
        assert!(lan.contains(&"192.168.5.77".parse().unwrap()));
        assert!(!lan.contains(&"192.168.6.1".parse().unwrap()));
        assert!(!lan.contains(&"::ffff:192.168.5.1".parse().unwrap()));
        assert!(net("0.0.0.0/0").contains(&"8.8.8.8".parse().unwrap()));
        assert!(net("10.0.0.1/32").contains(&"10.0.0.1".parse().unwrap()));
        assert!(!net("10.0.0.1/32").contains(&"10.0.0.2".parse().unwrap()));
        assert!(lan.overlaps(&net("192.168.0.0/16")));
        assert!(net("192.168.0.0/16").overlaps(&lan));
        assert!(!lan.overlaps(&net("192.168.4.0/24")));
        assert!(!lan.overlaps(&net("fd00::/8")));
        assert_eq!(net("192.168.5.9/24").network(), lan);
        assert_eq!(net("fd00:1:2:3::9/48").network(), net("fd00:1:2::/48"));
        let v6 = net("fd00:1:2::/48");
        assert!(v6.contains(&"fd00:1:2:ffff::1".parse().unwrap()));
        assert!(!v6.contains(&"fd00:1:3::1".parse().unwrap()));
        assert_eq!(lan.to_string(), "192.168.5.0/24");
    }

    #[test]
    fn records_without_routes_still_decode() {
        // A record as a node without subnet routes encodes it: four fields.
        #[derive(Serialize)]
        struct Old {
            key: PublicKey,
            overlay: Vec<IpNet>,
            endpoints: Vec<SocketAddr>,
            name: String,
        }
        let old = Old {
            key: [7; 32],
            overlay: vec![net("10.0.0.7/24")],
            endpoints: vec![],
            name: "old".into(),
        };
        let b = rmp_serde::to_vec(&old).unwrap();
        let p: PeerInfo = rmp_serde::from_slice(&b).unwrap();
        assert_eq!(p.name, "old");
        assert!(p.routes.is_empty());
    }
}
