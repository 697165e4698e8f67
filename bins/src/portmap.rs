//! Port mapping on the router in front of a peer (UPnP IGD).
//!
//! A peer behind a NAT that picks a new port for every destination cannot
//! be reached by hole punching. If its router speaks UPnP IGD, the peer
//! asks it to forward one public UDP port to the peer's socket and offers
//! that address to the hubs as one more candidate; the other peers probe
//! it like any other and go direct when it answers. The lease is renewed
//! at half its length and removed when the peer stops.

use anyhow::{anyhow, Context, Result};
use igd_next::{Gateway, PortMappingProtocol, SearchOptions};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::mpsc;
use std::time::Duration;

/// How long a mapping is asked for; renewed at half of it.
const LEASE_SECS: u32 = 3600;
const DESCRIPTION: &str = "fastmesh";

/// A mapping the router holds for us.
pub struct Mapping {
    gateway: Gateway,
    internal: SocketAddr,
    /// The public address other peers can send to.
    pub external: SocketAddr,
}

/// Find the router (SSDP, up to `timeout`) and map a public UDP port to
/// `port` on this host: the same port number if it is free there, any
/// other one if not.
pub fn map_udp(port: u16, timeout: Duration) -> Result<Mapping> {
    let gateway = igd_next::search_gateway(SearchOptions {
        timeout: Some(timeout),
        single_search_timeout: Some(timeout),
        ..Default::default()
    })
    .map_err(|e| anyhow!("no UPnP gateway answered: {e}"))?;
    // Our address on the router's side: the one the kernel would use to
    // reach it.
    let probe = UdpSocket::bind("0.0.0.0:0")?;
    probe.connect(gateway.addr)?;
    let internal = SocketAddr::new(probe.local_addr()?.ip(), port);
    let ext_port = match gateway.add_port(
        PortMappingProtocol::UDP,
        port,
        internal,
        LEASE_SECS,
        DESCRIPTION,
    ) {
        Ok(()) => port,
        Err(_) => gateway
            .add_any_port(PortMappingProtocol::UDP, internal, LEASE_SECS, DESCRIPTION)
            .with_context(|| format!("gateway {} refused a UDP mapping", gateway.addr))?,
    };
    let ip = gateway
        .get_external_ip()
        .with_context(|| format!("gateway {} did not give its public address", gateway.addr))?;
    if ip.is_unspecified() || is_private(ip) {
        let _ = gateway.remove_port(PortMappingProtocol::UDP, ext_port);
        return Err(anyhow!(
            "gateway {}'s public address {ip} is not public (a NAT behind another NAT): mapping dropped",
            gateway.addr
        ));
    }
    Ok(Mapping {
        gateway,
        internal,
        external: SocketAddr::new(ip, ext_port),
    })
}

fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v) => {
            let o = v.octets();
            // 100.64.0.0/10: carrier-grade NAT, another NAT in front.
            v.is_private()
                || v.is_loopback()
                || v.is_link_local()
                || (o[0] == 100 && o[1] & 0xc0 == 64)
        }
        IpAddr::V6(_) => false,
    }
}

impl Mapping {
    /// Renew the lease at half its length until `stop` fires (or its
    /// sender is dropped), then remove the mapping.
    pub fn keep(self, stop: mpsc::Receiver<()>) {
        let half = Duration::from_secs(u64::from(LEASE_SECS) / 2);
        // Renew on each timeout; a stop message or a dropped sender ends it.
        while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(half) {
            if let Err(e) = self.gateway.add_port(
                PortMappingProtocol::UDP,
                self.external.port(),
                self.internal,
                LEASE_SECS,
                DESCRIPTION,
            ) {
                tracing::warn!(external = %self.external, "port mapping not renewed: {e}");
            }
        }
        let _ = self
            .gateway
            .remove_port(PortMappingProtocol::UDP, self.external.port());
        tracing::info!(external = %self.external, "port mapping removed");
    }
}
