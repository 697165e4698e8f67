//! Configuration: a TOML file, overridden by command-line flags, resolved into
//! checked settings with clear errors.

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
use transport::crypto::StaticKeypair;
use transport::wire::{IpNet, PublicKey};
use transport::KcpProfile;

/// Overhead between the UDP payload size and the largest inner packet.
pub fn frame_overhead() -> usize {
    1452 - transport::node::tun_mtu_for(1452)
}

/// Default TUN MTU: inner packets never fragment on a 1500-byte path, IPv4 or
/// IPv6 underlay (1500 - 40 IPv6 - 8 UDP = 1452 bytes of UDP payload).
pub fn default_mtu() -> u16 {
    transport::node::tun_mtu_for(1452) as u16
}

/// Parse "10.1.2.3/24" or "fd00::3/64".
pub fn parse_net(s: &str) -> Result<IpNet> {
    let n: IpNet = s
        .parse()
        .map_err(|e| anyhow!("bad address {s:?}: {e} (e.g. 10.99.0.2/24)"))?;
    if n.prefix == 0 {
        bail!("bad address {s:?}: prefix must be at least 1");
    }
    if n.addr.is_unspecified() || n.addr.is_multicast() || n.addr.is_loopback() {
        bail!("bad address {s:?}: not usable as a host address");
    }
    Ok(n)
}

/// Parse a subnet route, "192.168.5.0/24" or "fd05::/48": a network
/// address (host bits zero), not the default route.
pub fn parse_route(s: &str) -> Result<IpNet> {
    let n: IpNet = s
        .parse()
        .map_err(|e| anyhow!("bad route {s:?}: {e} (e.g. 192.168.5.0/24)"))?;
    if n.prefix == 0 {
        bail!("bad route {s:?}: a default route is not supported");
    }
    if n.network() != n {
        bail!(
            "bad route {s:?}: host bits are set; did you mean {}?",
            n.network()
        );
    }
    if n.addr.is_multicast() || n.addr.is_loopback() {
        bail!("bad route {s:?}: not a unicast network");
    }
    Ok(n)
}

/// Parse "PUBKEY@HOST:PORT" (key as 64 hex digits).
pub fn parse_hub(s: &str) -> Result<(PublicKey, SocketAddr)> {
    let (k, a) = s.split_once('@').ok_or_else(|| {
        anyhow!(
            "bad hub {s:?}: want PUBKEY@HOST:PORT (the key `fastmesh pubkey` prints for the hub)"
        )
    })?;
    let key = fastmesh_actors::store::parse_key_hex(k)
        .ok_or_else(|| anyhow!("bad hub {s:?}: the key must be 64 hex digits"))?;
    let addr = a
        .to_socket_addrs()
        .with_context(|| format!("bad hub {s:?}: cannot resolve {a:?}"))?
        .next()
        .ok_or_else(|| anyhow!("bad hub {s:?}: {a:?} resolves to nothing"))?;
    Ok((key, addr))
}

/// Parse a duration in seconds ("5", "0.5").
pub fn secs(x: f64, what: &str) -> Result<Duration> {
    if !(0.05..=3600.0).contains(&x) {
        bail!("{what} must be between 0.05 and 3600 seconds, got {x}");
    }
    Ok(Duration::from_secs_f64(x))
}

/// Parse a KCP profile name.
pub fn parse_profile(s: &str) -> Result<KcpProfile> {
    match s {
        "normal" => Ok(KcpProfile::Normal),
        "fast" => Ok(KcpProfile::Fast),
        "turbo" => Ok(KcpProfile::Turbo),
        _ => bail!("bad KCP profile {s:?}: want normal, fast or turbo"),
    }
}

/// Read a TOML file into `T`, rejecting unknown keys.
pub fn read_toml<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow!("config file {}: {e}", path.display()))
}

/// Read a key file: 64 hex digits, readable only by its owner.
pub fn load_key(path: &Path, what: &str) -> Result<[u8; 32]> {
    let meta = std::fs::metadata(path).with_context(|| {
        format!(
            "cannot read {what} {}: create one with `fastmesh keygen --out {}`",
            path.display(),
            path.display()
        )
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "{what} {} is readable by others (mode {mode:o}); fix with: chmod 600 {}",
            path.display(),
            path.display()
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {what} {}", path.display()))?;
    fastmesh_actors::store::parse_key_hex(text.trim()).ok_or_else(|| {
        anyhow!(
            "{what} {} is not a fastmesh key (want 64 hex digits)",
            path.display()
        )
    })
}

/// Write a new random key to `path` with mode 0600; returns the key pair.
pub fn write_new_key(path: &Path, force: bool) -> Result<StaticKeypair> {
    if path.exists() && !force {
        bail!(
            "{} exists; refusing to overwrite a key (use --force)",
            path.display()
        );
    }
    let kp = StaticKeypair::generate(&mut transport::os_entropy()?);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true).mode(0o600);
    let mut f = opts
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    // An existing file keeps its mode on open; force 0600.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    use std::io::Write;
    writeln!(f, "{}", fastmesh_actors::store::key_hex(&kp.private))?;
    f.sync_all()?;
    Ok(kp)
}

/// Hub settings as a config file holds them.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubFile {
    /// UDP listen address.
    pub listen: Option<String>,
    /// Hub key file.
    pub key: Option<PathBuf>,
    /// Network key file.
    pub network_key: Option<PathBuf>,
    /// Where the membership table lives.
    pub data_dir: Option<PathBuf>,
    /// Heartbeat interval, seconds.
    pub heartbeat: Option<f64>,
    /// Heartbeats of silence before a member is dropped.
    pub expire_beats: Option<u32>,
    /// Control socket path.
    pub control: Option<PathBuf>,
    /// Allow-list file of node public keys.
    pub allow: Option<PathBuf>,
    /// Relay frames between members that have no direct path (default true).
    pub relay: Option<bool>,
    /// Admit subnet routes that overlap another member's (default false).
    pub allow_route_overlap: Option<bool>,
    /// "full" or "on-demand" (`--peer-map`).
    pub peer_map: Option<String>,
    /// Prometheus metrics listen address (`--metrics`).
    pub metrics: Option<String>,
    /// Log filter (as RUST_LOG), applied on reload.
    pub log: Option<String>,
    /// TCP fallback listen address, or "off" (`--tcp-listen`).
    pub tcp_listen: Option<String>,
    /// TLS fallback listen address (`--tls-listen`).
    pub tls_listen: Option<String>,
    /// TLS certificate chain, PEM (`--tls-cert`).
    pub tls_cert: Option<PathBuf>,
    /// TLS private key, PEM (`--tls-key`).
    pub tls_key: Option<PathBuf>,
    /// This hub's id among several hubs (`--cluster-id`).
    pub cluster_id: Option<u64>,
    /// Hub-to-hub TCP listen address (`--cluster-listen`).
    pub cluster_listen: Option<String>,
    /// Every hub of the cluster, "ID=PUBKEY@HOST:PORT" (`--cluster-hub`).
    pub cluster_hubs: Option<Vec<String>>,
}

/// Peer settings as a config file holds them.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerFile {
    /// Hubs, "PUBKEY@HOST:PORT".
    pub hubs: Option<Vec<String>>,
    /// Overlay IPv4 (or IPv6) address with prefix.
    pub address: Option<String>,
    /// Optional second (IPv6) overlay address with prefix.
    pub address6: Option<String>,
    /// UDP listen address.
    pub listen: Option<String>,
    /// TUN device name.
    pub tun: Option<String>,
    /// TUN MTU.
    pub mtu: Option<u16>,
    /// KCP profile.
    pub profile: Option<String>,
    /// Node key file.
    pub key: Option<PathBuf>,
    /// Network key file.
    pub network_key: Option<PathBuf>,
    /// Display name.
    pub name: Option<String>,
    /// Control socket path.
    pub control: Option<PathBuf>,
    /// Heartbeat interval, seconds (until the hub says otherwise).
    pub heartbeat: Option<f64>,
    /// TUN segmentation offload (default true).
    pub offload: Option<bool>,
    /// Split TCP: terminate inner TCP connections at each peer and carry
    /// them as streams (default true).
    pub split_tcp: Option<bool>,
    /// Ask the router for a UPnP port mapping to offer as a candidate
    /// (default true; `--no-port-mapping`).
    pub port_mapping: Option<bool>,
    /// Prometheus metrics listen address (`--metrics`).
    pub metrics: Option<String>,
    /// Log filter (as RUST_LOG), applied on reload.
    pub log: Option<String>,
    /// Subnets this peer routes for, e.g. ["192.168.5.0/24"].
    pub routes: Option<Vec<String>>,
    /// Stream fallback to the hubs: "tcp,tls", "tcp", "tls" or "off" (`--fallback`).
    pub fallback: Option<String>,
    /// The hubs' TLS port (`--tls-port`).
    pub tls_port: Option<u16>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_only_as_networks() {
        let n = parse_route("192.168.5.0/24").unwrap();
        assert_eq!(n.to_string(), "192.168.5.0/24");
        assert_eq!(parse_route("fd05::/48").unwrap().prefix, 48);
        let e = parse_route("192.168.5.1/24").unwrap_err().to_string();
        assert!(e.contains("did you mean 192.168.5.0/24"), "{e}");
        for bad in [
            "0.0.0.0/0",
            "::/0",
            "10.0.0.0/33",
            "10.0.0.0",
            "x/8",
            "224.0.0.0/4",
        ] {
            assert!(parse_route(bad).is_err(), "{bad}");
        }
    }
}
