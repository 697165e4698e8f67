//! fastmesh simulation.
//!
//! * [`des`]: a discrete-event network that runs sans-IO nodes over seeded
//!   impaired links in simulated time (fast, bit-for-bit reproducible).
//! * [`traffic`]: self-checking inner packets.
//! * [`turmoil_net`]: turmoil adapters for the transport traits, an in-memory
//!   packet device, and a builder for N nodes over seeded impaired links.
//! * [`world`]: a hub and N peers running the real actors in turmoil.
//! * [`nat`]: a NAT in front of a turmoil host (cone or random ports).

#![warn(missing_docs)]

pub mod bulk;
pub mod des;
pub mod nat;
pub mod traffic;
pub mod turmoil_net;
pub mod world;
