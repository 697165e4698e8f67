//! fastmesh protocol core, sans-IO: nothing here reads a clock, owns a socket
//! or spawns a task. Every input carries `now`; outputs are polled.
//!
//! ```text
//! outbound:  IP packet --Node::send_ip--> Session --TCP? KCP conv per flow : datagram-->
//!            pacer (KCP data only) --seal (ChaCha20-Poly1305)--> Node::poll_transmit --> driver sends
//! inbound:   driver receives --> Node::handle_datagram --index--> Session --open, replay check-->
//!            KCP reassembly / datagram --> Node::poll_rx --> driver writes to TUN
//! ```
//!
//! * [`wire`]: frame header views, the KCP segment view, control messages.
//! * [`crypto`]: Noise IKpsk1 handshake, AEAD, replay window.
//! * [`session`]: one remote node (keys, KCP conversations per flow, pacing).
//! * [`node`]: every session of one socket; demultiplexing, admission, relay.
//! * [`driver`]: the one poll sequence every driver of a [`Node`] follows.
//! * [`path`]: direct candidates and relays, probed and chosen.
//! * [`cc`]: rate control and pacing for KCP.
//! * [`pmtu`]: path MTU discovery (padded probes, search, black holes).
//! * [`ip`]: inner IP header parsing (flows, ownership checks).
//! * [`split`]: split TCP, terminating inner connections on each side (smoltcp).

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod cc;
pub mod crypto;
pub mod driver;
pub mod ip;
pub mod node;
pub mod path;
pub mod pmtu;
pub mod session;
pub mod split;
pub mod wire;

pub use driver::Driver;
pub use node::{Admission, Node, NodeConfig, NodeStats};
pub use session::{Event, FlowMode, KcpProfile, SessionConfig, SessionStats};
