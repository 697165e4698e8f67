//! Stream fallback settings of the binaries: which ways a peer tries to reach
//! a hub when UDP does not pass, and a hub's TLS identity.
//!
//! TLS here is an envelope for networks that pass only HTTPS; frames inside
//! are Noise-encrypted and authenticated as on UDP, so a hub's certificate
//! may be self-signed (generated at start when none is given) and peers do
//! not check it.

use anyhow::{anyhow, bail, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use transport::stream::{HubRoute, Target};

/// The ways a peer may reach a hub besides UDP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallback {
    /// TCP to the hub's UDP port number.
    pub tcp: bool,
    /// TLS to this port of the hub's host (None: no TLS).
    pub tls_port: Option<u16>,
}

impl Fallback {
    /// From `--fallback` ("tcp,tls", "tcp", "tls" or "off") and `--tls-port`.
    pub fn parse(spec: &str, tls_port: u16) -> Result<Fallback> {
        let mut f = Fallback {
            tcp: false,
            tls_port: None,
        };
        for w in spec.split(',').map(str::trim) {
            match w {
                "tcp" => f.tcp = true,
                "tls" => f.tls_port = Some(tls_port),
                "off" | "none" => {}
                _ => bail!(
                    "bad fallback {spec:?}: want a list of tcp and tls (e.g. \"tcp,tls\"), or off"
                ),
            }
        }
        if tls_port == 0 {
            bail!("TLS port 0");
        }
        Ok(f)
    }

    /// A hub's stream targets from its spec "PUBKEY@HOST:PORT" resolved to
    /// `udp`: TCP to the same address, then TLS to the host's TLS port (with
    /// HOST as the server name when it is a name).
    pub fn route(&self, spec: &str, udp: SocketAddr) -> HubRoute {
        let host = spec
            .split_once('@')
            .map(|(_, a)| a)
            .and_then(|a| a.rsplit_once(':'))
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
            .unwrap_or("");
        let mut targets = Vec::new();
        if self.tcp {
            targets.push(Target::Tcp(udp));
        }
        if let Some(p) = self.tls_port {
            let by_ip = ServerName::IpAddress(udp.ip().into());
            let name = if host.is_empty() || host.parse::<IpAddr>().is_ok() {
                by_ip
            } else {
                ServerName::try_from(host.to_string()).unwrap_or(by_ip)
            };
            targets.push(Target::Tls(SocketAddr::new(udp.ip(), p), name));
        }
        HubRoute { udp, targets }
    }
}

/// The hub's TLS settings: the certificate chain and key from PEM files, or
/// a self-signed certificate made now.
pub fn server_tls(cert: Option<&Path>, key: Option<&Path>) -> Result<Arc<rustls::ServerConfig>> {
    let (chain, key) = match (cert, key) {
        (Some(c), Some(k)) => {
            let chain = CertificateDer::pem_file_iter(c)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| anyhow!("cannot read TLS certificate {}: {e}", c.display()))?;
            if chain.is_empty() {
                bail!("no certificate in {}", c.display());
            }
            let key = PrivateKeyDer::from_pem_file(k)
                .map_err(|e| anyhow!("cannot read TLS key {}: {e}", k.display()))?;
            (chain, key)
        }
        (None, None) => {
            let c = rcgen::generate_simple_self_signed(vec!["fastmesh".into()])
                .context("cannot make a self-signed TLS certificate")?;
            let key = PrivateKeyDer::Pkcs8(c.key_pair.serialize_der().into());
            (vec![c.cert.der().clone()], key)
        }
        _ => bail!("--tls-cert and --tls-key go together"),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| anyhow!("TLS certificate and key do not fit: {e}"))?;
    cfg.alpn_protocols = vec![transport::stream::TLS_ALPN.to_vec()];
    Ok(Arc::new(cfg))
}

/// Bind a TCP listener for stream fallback (IPv6 sockets also take IPv4).
pub fn bind_tcp(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if addr.is_ipv6() {
        s.set_only_v6(false)?;
    }
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_specs_and_routes() {
        let f = Fallback::parse("tcp,tls", 443).unwrap();
        let udp: SocketAddr = "192.0.2.1:4800".parse().unwrap();
        let r = f.route(&format!("{}@hub.example:4800", "ab".repeat(32)), udp);
        assert_eq!(r.targets.len(), 2);
        assert_eq!(r.targets[0], Target::Tcp(udp));
        assert_eq!(
            r.targets[1],
            Target::Tls(
                "192.0.2.1:443".parse().unwrap(),
                ServerName::try_from("hub.example").unwrap()
            )
        );
        let r = Fallback::parse("tls", 8443).unwrap().route(
            "k@[2001:db8::1]:4800",
            "[2001:db8::1]:4800".parse().unwrap(),
        );
        assert_eq!(r.targets.len(), 1);
        assert!(
            matches!(&r.targets[0], Target::Tls(a, ServerName::IpAddress(_)) if a.port() == 8443)
        );
        assert!(Fallback::parse("off", 443)
            .unwrap()
            .route("k@h:1", udp)
            .targets
            .is_empty());
        assert!(Fallback::parse("udp", 443).is_err());
        assert!(Fallback::parse("tls", 0).is_err());
    }

    #[test]
    fn tls_identity_from_files_or_made_up() {
        assert!(server_tls(None, None).is_ok());
        let d = std::env::temp_dir().join(format!("fm-tls-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let c = rcgen::generate_simple_self_signed(vec!["hub".into()]).unwrap();
        let (cp, kp) = (d.join("c.pem"), d.join("k.pem"));
        std::fs::write(&cp, c.cert.pem()).unwrap();
        std::fs::write(&kp, c.key_pair.serialize_pem()).unwrap();
        assert!(server_tls(Some(&cp), Some(&kp)).is_ok());
        // A key that is not the certificate's, a missing file, half a pair.
        let other = rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap();
        std::fs::write(&kp, other.key_pair.serialize_pem()).unwrap();
        assert!(server_tls(Some(&cp), Some(&kp)).is_err());
        assert!(server_tls(Some(&d.join("none.pem")), Some(&kp)).is_err());
        assert!(server_tls(Some(&cp), None).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }
}
