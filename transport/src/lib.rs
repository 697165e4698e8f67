//! fastmesh transport: the I/O half. The protocol itself is the sans-IO
//! [`proto`] crate; this crate moves its bytes through real devices.
//!
//! ```text
//! outbound:  TUN (PacketDevice::recv_many, TSO split) --> Node::send_ip ... Node::poll_transmit
//!            --> Datagram::try_send_gso (UDP GSO)
//! inbound:   Datagram::try_recv_batch (recvmmsg + UDP GRO) --> Node::handle_datagram ... Node::poll_rx
//!            --> PacketDevice::try_send_many (TUN, TCP GRO coalescing)
//! ```
//!
//! * [`io`]: the [`Datagram`] and [`PacketDevice`] traits and their tokio UDP
//!   ([`FastUdp`]) and tun-rs implementations.
//!
//! The protocol modules are re-exported under their own names
//! (`transport::session`, `transport::wire`, ...) so that the layers above
//! name one crate for "what moves bytes between nodes".

#![warn(missing_docs)]

mod inbox;
pub mod io;
pub mod spray;
pub mod stream;

pub use io::{os_entropy, Datagram, FastUdp, PacketDevice};
pub use proto::{cc, crypto, driver, ip, node, path, session, split, wire};
pub use proto::{Admission, Driver, Event, FlowMode, KcpProfile, Node, NodeConfig, NodeStats};
pub use proto::{SessionConfig, SessionStats};
pub use spray::Sprayed;
pub use stream::Streamed;
