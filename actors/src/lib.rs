//! fastmesh actors: thin actix actors around pure, clock-free state machines.
//!
//! ```text
//!   peer:  TunReader --TunBatch (one message per batch)--> Dataplane (Node: every peer's Session, UDP socket)
//!          Dataplane --NetEvent (control messages, link events)--> Supervisor --Cmd--> Dataplane
//!          Supervisor --Sample/Update--> PeerActor (one per remote peer: record, path state, rates)
//!   hub:   Dataplane (no TUN) --NetEvent--> RegistryActor --Cmd::Send--> Dataplane
//! ```
//!
//! Pure state machines (unit-tested with a fake clock): [`registry::Registry`]
//! (hub membership and deltas), [`peermap::PeerMap`] and [`peermap::Router`]
//! (peer's map and routes), [`heartbeat::Heartbeats`] (when to register,
//! heartbeat, re-register, restart). Actors use only `Actor::start`,
//! `do_send`/`send`, `add_stream` and `run_interval`, so they run unchanged
//! inside turmoil hosts and in the binaries.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod cluster;
pub mod dataplane;
pub mod heartbeat;
pub mod hub;
pub mod peer;
pub mod peermap;
pub mod registry;
pub mod store;
pub mod supervisor;
