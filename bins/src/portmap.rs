//! Port mapping on the router in front of a peer (UPnP IGD, then PCP or
//! NAT-PMP).
//!
//! A peer behind a NAT that picks a new port for every destination cannot
//! be reached by hole punching. If its router speaks UPnP IGD, PCP or
//! NAT-PMP, the peer asks it to forward one public UDP port to the peer's
//! socket and offers that address to the hubs as one more candidate; the
//! other peers probe it like any other and go direct when it answers. The
//! lease is renewed at half its length and removed when the peer stops.

use anyhow::{anyhow, Context, Result};
use igd_next::{Gateway, PortMappingProtocol, SearchOptions};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::num::NonZeroU16;
use std::sync::mpsc;
use std::time::Duration;

/// How long a mapping is asked for; renewed at half of it.
const LEASE_SECS: u32 = 3600;
const DESCRIPTION: &str = "fastmesh";

/// A mapping the router holds for us.
pub struct Mapping {
    how: How,
    /// The public address other peers can send to.
    pub external: SocketAddr,
}

enum How {
    Igd {
        gateway: Gateway,
        internal: SocketAddr,
    },
    /// PCP or NAT-PMP (the crate's client is async: it runs on a runtime
    /// of its own in the mapping's thread).
    Pcp {
        rt: tokio::runtime::Runtime,
        map: crab_nat::PortMapping,
    },
}

impl Mapping {
    /// Which protocol the router answered.
    pub fn protocol(&self) -> &'static str {
        match &self.how {
            How::Igd { .. } => "UPnP IGD",
            How::Pcp { map, .. } => match map.mapping_type() {
                crab_nat::PortMappingType::NatPmp => "NAT-PMP",
                crab_nat::PortMappingType::Pcp { .. } => "PCP",
            },
        }
    }
}

/// Map a public UDP port to `port` on this host: UPnP IGD first (the router
/// found by SSDP within `timeout`), then PCP and NAT-PMP at the default
/// gateway. The same port number if it is free there, any other one if not.
pub fn map_udp(port: u16, timeout: Duration) -> Result<Mapping> {
    match map_igd(port, timeout) {
        Ok(m) => Ok(m),
        Err(igd) => map_pcp(port).map_err(|pcp| anyhow!("{igd:#}; {pcp:#}")),
    }
}

fn map_igd(port: u16, timeout: Duration) -> Result<Mapping> {
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
        how: How::Igd { gateway, internal },
        external: SocketAddr::new(ip, ext_port),
    })
}

/// The default IPv4 gateway (from `/proc/net/route`).
fn default_gateway() -> Result<Ipv4Addr> {
    let t = std::fs::read_to_string("/proc/net/route").context("cannot read /proc/net/route")?;
    gateway_in(&t).ok_or_else(|| anyhow!("no default IPv4 gateway"))
}

/// The gateway of the default route in a `/proc/net/route` table.
fn gateway_in(table: &str) -> Option<Ipv4Addr> {
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (dest, gw) = (f.get(1)?, f.get(2)?);
        if *dest != "00000000" {
            return None;
        }
        // Hex in host (little-endian) byte order.
        let v = u32::from_str_radix(gw, 16).ok()?;
        let ip = Ipv4Addr::from(v.to_le_bytes());
        (!ip.is_unspecified()).then_some(ip)
    })
}

fn map_pcp(port: u16) -> Result<Mapping> {
    let gw = IpAddr::V4(default_gateway()?);
    let probe = UdpSocket::bind("0.0.0.0:0")?;
    probe.connect((gw, 5351))?;
    let client = probe.local_addr()?.ip();
    let internal = NonZeroU16::new(port).ok_or_else(|| anyhow!("port 0"))?;
    let timeouts = crab_nat::TimeoutConfig {
        initial_timeout: Duration::from_millis(250),
        max_retries: 2,
        max_retry_timeout: Some(Duration::from_secs(1)),
    };
    let opts = crab_nat::PortMappingOptions {
        external_port: Some(internal),
        lifetime_seconds: Some(LEASE_SECS),
        timeout_config: Some(timeouts),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (map, ip) = rt.block_on(async {
        let map =
            crab_nat::PortMapping::new(gw, client, crab_nat::InternetProtocol::Udp, internal, opts)
                .await
                .map_err(|e| anyhow!("no PCP or NAT-PMP answer from gateway {gw}: {e}"))?;
        let ip = match map.mapping_type() {
            crab_nat::PortMappingType::Pcp { external_ip, .. } => external_ip,
            crab_nat::PortMappingType::NatPmp => {
                match crab_nat::natpmp::external_address(gw, Some(timeouts)).await {
                    Ok(ip) => IpAddr::V4(ip),
                    Err(e) => {
                        let _ = map.try_drop().await;
                        return Err(anyhow!("gateway {gw} did not give its public address: {e}"));
                    }
                }
            }
        };
        Ok((map, ip))
    })?;
    let ip = match ip {
        // PCP carries IPv4 addresses as IPv4-mapped IPv6 ones.
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    if ip.is_unspecified() || is_private(ip) {
        let _ = rt.block_on(map.try_drop());
        return Err(anyhow!(
            "gateway {gw}'s public address {ip} is not public (a NAT behind another NAT): mapping dropped"
        ));
    }
    let external = SocketAddr::new(ip, map.external_port().get());
    Ok(Mapping {
        how: How::Pcp { rt, map },
        external,
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
    pub fn keep(mut self, stop: mpsc::Receiver<()>) {
        let lease = match &self.how {
            How::Igd { .. } => LEASE_SECS,
            How::Pcp { map, .. } => map.lifetime().max(60),
        };
        let half = Duration::from_secs(u64::from(lease) / 2);
        // Renew on each timeout; a stop message or a dropped sender ends it.
        while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(half) {
            let renewed = match &mut self.how {
                How::Igd { gateway, internal } => gateway
                    .add_port(
                        PortMappingProtocol::UDP,
                        self.external.port(),
                        *internal,
                        LEASE_SECS,
                        DESCRIPTION,
                    )
                    .map_err(|e| e.to_string()),
                How::Pcp { rt, map } => rt.block_on(map.renew()).map_err(|e| e.to_string()),
            };
            if let Err(e) = renewed {
                tracing::warn!(external = %self.external, "port mapping not renewed: {e}");
            }
        }
        match self.how {
            How::Igd { gateway, .. } => {
                let _ = gateway.remove_port(PortMappingProtocol::UDP, self.external.port());
            }
            How::Pcp { rt, map } => {
                let _ = rt.block_on(map.try_drop());
            }
        }
        tracing::info!(external = %self.external, "port mapping removed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_gateway_is_read_from_the_route_table() {
        let t = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n\
                 eth0\t0010A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\n\
                 eth0\t00000000\t0110A8C0\t0003\t0\t0\t0\t00000000\n";
        assert_eq!(gateway_in(t), Some(Ipv4Addr::new(192, 168, 16, 1)));
        assert_eq!(gateway_in("Iface\tDestination\tGateway\n"), None);
        assert_eq!(gateway_in("h\neth0\t00000000\tzz\n"), None);
    }
}
