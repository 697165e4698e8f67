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

/// `impl Datagram` for an enum of two socket kinds, each a `Datagram`
/// itself: every call goes to the variant's (`recv_from` through readiness).
macro_rules! either_datagram {
    ($ty:ident { $a:ident, $b:ident }) => {
        impl transport::Datagram for $ty {
            fn send_to(
                &self,
                buf: &[u8],
                to: std::net::SocketAddr,
            ) -> impl std::future::Future<Output = std::io::Result<usize>> + Send {
                async move {
                    match self {
                        $ty::$a(s) => s.send_to(buf, to).await,
                        $ty::$b(s) => s.send_to(buf, to).await,
                    }
                }
            }
            fn recv_from(
                &self,
                buf: &mut [u8],
            ) -> impl std::future::Future<Output = std::io::Result<(usize, std::net::SocketAddr)>> + Send
            {
                $crate::turmoil_net::recv_when_readable(self, buf)
            }
            fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
                match self {
                    $ty::$a(s) => s.local_addr(),
                    $ty::$b(s) => s.local_addr(),
                }
            }
            fn readable(&self) -> impl std::future::Future<Output = std::io::Result<()>> + Send {
                async move {
                    match self {
                        $ty::$a(s) => s.readable().await,
                        $ty::$b(s) => s.readable().await,
                    }
                }
            }
            fn try_recv_from(
                &self,
                buf: &mut [u8],
            ) -> std::io::Result<(usize, std::net::SocketAddr)> {
                match self {
                    $ty::$a(s) => s.try_recv_from(buf),
                    $ty::$b(s) => s.try_recv_from(buf),
                }
            }
            fn try_send_to(&self, buf: &[u8], to: std::net::SocketAddr) -> std::io::Result<usize> {
                match self {
                    $ty::$a(s) => s.try_send_to(buf, to),
                    $ty::$b(s) => s.try_send_to(buf, to),
                }
            }
            fn writable(&self) -> impl std::future::Future<Output = std::io::Result<()>> + Send {
                async move {
                    match self {
                        $ty::$a(s) => s.writable().await,
                        $ty::$b(s) => s.writable().await,
                    }
                }
            }
        }
    };
}

pub mod bulk;
pub mod chaos;
pub mod des;
pub mod fabric;
pub mod hubs;
pub mod impair;
pub mod impaired;
pub mod nat;
pub mod pumps;
pub mod streams;
pub mod tcp_host;
pub mod traffic;
pub mod turmoil_net;
pub mod world;

pub use impaired::Impaired;
