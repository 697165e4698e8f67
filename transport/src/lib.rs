//! fastmesh transport: everything that moves bytes between nodes. No actors.
//!
//! ```text
//! outbound:  IP packet --Node::send_ip--> Session --TCP? KCP conv per flow : datagram-->
//!            pacer (KCP data only) --seal (ChaCha20-Poly1305)--> Node::poll_transmit --> Datagram::send_to
//! inbound:   Datagram::recv_from --> Node::handle_datagram --index--> Session --open, replay check-->
//!            KCP reassembly / datagram --> Node::poll_rx --> PacketDevice::send
//! ```
//!
//! * [`io`]: the [`Datagram`] and [`PacketDevice`] traits, tokio UDP and tun-rs
//!   implementations, and the seeded [`Impaired`] wrapper.
//! * [`impair`]: sans-IO impairment stages (loss, burst loss, delay, jitter,
//!   reordering, duplication, bottleneck).
//! * [`wire`]: frame header view and control messages.
//! * [`crypto`]: Noise IKpsk1 handshake, AEAD, replay window.
//! * [`session`] / [`node`]: the sans-IO protocol core, clock injected.
//! * [`cc`]: rate control and pacing for KCP.

#![warn(missing_docs)]

pub mod cc;
pub mod crypto;
pub mod impair;
pub mod io;
pub mod ip;
pub mod node;
pub mod path;
pub mod session;
pub mod wire;

pub use io::{Datagram, FastUdp, Impaired, PacketDevice};
pub use node::{Admission, Node, NodeConfig, NodeStats};
pub use session::{Event, FlowMode, KcpProfile, SessionConfig, SessionStats};
