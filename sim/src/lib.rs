//! fastmesh simulation.
//!
//! * [`impair`]: seeded sans-IO impairment stages (loss, burst loss, delay,
//!   jitter, reordering, duplication, bottleneck) and [`Impaired`], the
//!   datagram wrapper that applies them on tokio's (turmoil's) clock.
//! * [`fabric`]: where a world runs: turmoil, or a quicker runtime for big worlds.
//! * [`des`]: a discrete-event network that runs sans-IO nodes over seeded
//!   impaired links in simulated time (fast, bit-for-bit reproducible).
//! * [`traffic`]: self-checking inner packets.
//! * [`turmoil_net`]: turmoil adapters for the transport traits, an in-memory
//!   packet device, and a builder for N nodes over seeded impaired links.
//! * [`world`]: a hub and N peers running the real actors in turmoil.
//! * [`pumps`]: traffic between a world's peers at fixed rates, and what arrived.
//! * [`tcp_host`]: real TCP endpoints (smoltcp) on a node's TUN side, for
//!   the discrete-event network.
//! * [`nat`]: a NAT in front of a turmoil host (cone or random ports).

#![warn(missing_docs)]
#![forbid(unsafe_code)]
// The Datagram and PacketDevice impls here spell out the `+ Send` futures their
// traits require rather than relying on `async fn` inference.
#![allow(clippy::manual_async_fn)]

pub mod bulk;
pub mod chaos;
pub mod des;
pub mod fabric;
pub mod impair;
pub mod impaired;
pub mod nat;
pub mod pumps;
pub mod tcp_host;
pub mod traffic;
pub mod turmoil_net;
pub mod world;

pub use impaired::Impaired;
