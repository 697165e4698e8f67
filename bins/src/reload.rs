//! Reload (SIGHUP, or `fastmesh reload`): the config file is read again and
//! what can change at run time is applied without touching any session;
//! what cannot is named. Everything is checked before anything is applied,
//! so a bad file changes nothing.
//!
//! At run time: on a hub the allow-list, relaying on/off and the log level;
//! on a peer its hubs and the log level. Everything else needs a restart.

use crate::config::{parse_hub, read_toml, secs, HubFile, PeerFile};
use anyhow::{anyhow, Result};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;
use tracing_subscriber::{reload, EnvFilter, Registry};
use transport::wire::PublicKey;

static LOG: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Set up logging to stderr with a filter a reload can replace.
pub fn init_logging() {
    use tracing_subscriber::prelude::*;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    let _ = LOG.set(handle);
}

fn log_filter(spec: &str) -> Result<EnvFilter> {
    EnvFilter::try_new(spec).map_err(|e| anyhow!("bad log level {spec:?}: {e}"))
}

fn set_log(f: EnvFilter) -> Result<()> {
    LOG.get()
        .ok_or_else(|| anyhow!("logging was not set up for reloads"))?
        .reload(f)
        .map_err(|e| anyhow!("cannot change the log level: {e}"))
}

fn config(path: &Option<PathBuf>) -> Result<&Path> {
    path.as_deref().ok_or_else(|| {
        anyhow!("started without --config: there is no file to read again (flags change only with a restart)")
    })
}

/// What a hub's reload applies (computed before anything is applied).
pub struct HubChange {
    /// The allow-list: None admits anyone with the network key.
    pub allow: Option<BTreeSet<[u8; 32]>>,
    /// Relay frames between members.
    pub relay: bool,
    /// New log filter, if the file sets one.
    log: Option<(String, EnvFilter)>,
    /// New heartbeat interval and silent beats before expiry, if changed.
    pub timing: Option<(Duration, u32)>,
    /// Settings that differ from the running ones and need a restart.
    pub not_applied: Vec<&'static str>,
}

impl HubChange {
    /// Read the hub's config file again. `flag_allow` and `flag_no_relay`
    /// are the command line's, which win over the file as at startup (so
    /// does `timing_by_flag`: --heartbeat or --expire-beats given);
    /// `running` is the file as it was read at startup.
    pub fn read(
        path: &Option<PathBuf>,
        running: &HubFile,
        flag_allow: &Option<PathBuf>,
        flag_no_relay: bool,
        timing_by_flag: bool,
        load_allow: impl Fn(&Path) -> Result<BTreeSet<[u8; 32]>>,
    ) -> Result<HubChange> {
        let f: HubFile = read_toml(config(path)?)?;
        let allow = match flag_allow.as_ref().or(f.allow.as_ref()) {
            Some(p) => Some(load_allow(p)?),
            None => None,
        };
        let log = match &f.log {
            Some(l) => Some((l.clone(), log_filter(l)?)),
            None => None,
        };
        let mut not_applied = Vec::new();
        let mut timing = None;
        if f.heartbeat != running.heartbeat || f.expire_beats != running.expire_beats {
            if timing_by_flag {
                not_applied.push("heartbeat (--heartbeat or --expire-beats set it)");
            } else {
                timing = Some((
                    secs(f.heartbeat.unwrap_or(5.0), "heartbeat")?,
                    f.expire_beats.unwrap_or(6).max(1),
                ));
            }
        }
        let fixed: [(&'static str, bool); 15] = [
            ("peer_map", f.peer_map != running.peer_map),
            ("listen", f.listen != running.listen),
            ("key", f.key != running.key),
            ("network_key", f.network_key != running.network_key),
            ("data_dir", f.data_dir != running.data_dir),
            ("control", f.control != running.control),
            ("metrics", f.metrics != running.metrics),
            (
                "allow_route_overlap",
                f.allow_route_overlap != running.allow_route_overlap,
            ),
            ("tcp_listen", f.tcp_listen != running.tcp_listen),
            ("tls_listen", f.tls_listen != running.tls_listen),
            ("tls_cert", f.tls_cert != running.tls_cert),
            ("tls_key", f.tls_key != running.tls_key),
            ("cluster_id", f.cluster_id != running.cluster_id),
            ("cluster_listen", f.cluster_listen != running.cluster_listen),
            ("cluster_hubs", f.cluster_hubs != running.cluster_hubs),
        ];
        for (name, changed) in fixed {
            if changed {
                not_applied.push(name);
            }
        }
        Ok(HubChange {
            allow,
            relay: !flag_no_relay && f.relay.unwrap_or(true),
            log,
            timing,
            not_applied,
        })
    }

    /// Apply the log level; the caller applies the rest to its actors.
    /// Returns what a log line and `fastmesh reload` report.
    pub fn apply_log(&mut self) -> Result<String> {
        let mut parts = vec![
            match &self.allow {
                Some(k) => format!("allow-list of {} keys", k.len()),
                None => "no allow-list (anyone with the network key)".into(),
            },
            format!("relaying {}", if self.relay { "on" } else { "off" }),
        ];
        if let Some((hb, beats)) = self.timing {
            parts.push(format!(
                "heartbeat {} s, members dropped after {beats} silent",
                hb.as_secs_f64()
            ));
        }
        if let Some((spec, f)) = self.log.take() {
            set_log(f)?;
            parts.push(format!("log level {spec}"));
        }
        Ok(summary(parts, &self.not_applied))
    }
}

fn summary(applied: Vec<String>, not_applied: &[&str]) -> String {
    let mut s = format!("reloaded: {}", applied.join(", "));
    if !not_applied.is_empty() {
        s.push_str(&format!(
            "; changed but not applied until a restart: {}",
            not_applied.join(", ")
        ));
    }
    s
}

/// What a peer's reload applies.
pub struct PeerChange {
    /// The hubs from the file, when they changed and no --hub flag set them.
    pub hubs: Option<Vec<(PublicKey, SocketAddr)>>,
    /// Their specs as written ("PUBKEY@HOST:PORT"), in the same order.
    pub hub_specs: Vec<String>,
    /// A new heartbeat interval (used until a hub sets one), if changed.
    pub heartbeat: Option<Duration>,
    /// What a log line and `fastmesh reload` report.
    pub message: String,
}

/// A peer's reload: its hubs (unless --hub flags set them at startup) and
/// the log level; every other changed setting is named.
pub fn peer(
    path: &Option<PathBuf>,
    running: &PeerFile,
    hubs_by_flag: bool,
    heartbeat_by_flag: bool,
) -> Result<PeerChange> {
    let f: PeerFile = read_toml(config(path)?)?;
    let log = match &f.log {
        Some(l) => Some((l.clone(), log_filter(l)?)),
        None => None,
    };
    let mut not_applied: Vec<&str> = Vec::new();
    let mut hubs = None;
    let mut hub_specs = Vec::new();
    if f.hubs != running.hubs {
        if hubs_by_flag {
            not_applied.push("hubs (--hub flags set them)");
        } else {
            let specs = f.hubs.clone().unwrap_or_default();
            if specs.is_empty() {
                return Err(anyhow!("no hub in the file: a peer needs at least one"));
            }
            hubs = Some(
                specs
                    .iter()
                    .map(|h| parse_hub(h))
                    .collect::<Result<Vec<_>>>()?,
            );
            hub_specs = specs;
        }
    }
    let mut heartbeat = None;
    if f.heartbeat != running.heartbeat {
        if heartbeat_by_flag {
            not_applied.push("heartbeat (--heartbeat set it)");
        } else {
            heartbeat = Some(secs(f.heartbeat.unwrap_or(5.0), "heartbeat")?);
        }
    }
    let fixed: [(&'static str, bool); 17] = [
        ("address", f.address != running.address),
        ("address6", f.address6 != running.address6),
        ("listen", f.listen != running.listen),
        ("tun", f.tun != running.tun),
        ("mtu", f.mtu != running.mtu),
        ("profile", f.profile != running.profile),
        ("key", f.key != running.key),
        ("network_key", f.network_key != running.network_key),
        ("name", f.name != running.name),
        ("offload", f.offload != running.offload),
        ("split_tcp", f.split_tcp != running.split_tcp),
        ("port_mapping", f.port_mapping != running.port_mapping),
        ("control", f.control != running.control),
        ("metrics", f.metrics != running.metrics),
        ("routes", f.routes != running.routes),
        ("fallback", f.fallback != running.fallback),
        ("tls_port", f.tls_port != running.tls_port),
    ];
    not_applied.extend(fixed.iter().filter(|x| x.1).map(|x| x.0));
    let mut parts = Vec::new();
    if let Some(h) = &hubs {
        parts.push(format!("{} hubs", h.len()));
    }
    if let Some(h) = heartbeat {
        parts.push(format!(
            "heartbeat {} s until a hub sets one",
            h.as_secs_f64()
        ));
    }
    if let Some((spec, filter)) = log {
        set_log(filter)?;
        parts.push(format!("log level {spec}"));
    }
    if parts.is_empty() {
        parts.push("nothing that changes at run time".into());
    }
    Ok(PeerChange {
        hubs,
        hub_specs,
        heartbeat,
        message: summary(parts, &not_applied),
    })
}

/// A reload that failed leaves everything as it was; say so.
pub fn failed(e: &anyhow::Error) -> String {
    format!("reload failed, nothing changed: {e:#}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> Option<PathBuf> {
        let p = std::env::temp_dir().join(format!(
            "fastmesh-reload-{}-{}.toml",
            std::process::id(),
            text.len()
        ));
        std::fs::write(&p, text).unwrap();
        Some(p)
    }

    #[test]
    fn a_hub_reload_reads_what_changes_and_names_what_does_not() {
        let running = HubFile {
            heartbeat: Some(5.0),
            ..HubFile::default()
        };
        let no_list = |_: &Path| -> Result<BTreeSet<[u8; 32]>> { Ok(BTreeSet::new()) };
        let p = file("relay = false\nheartbeat = 2\nlisten = \"0.0.0.0:9\"\n");
        let c = HubChange::read(&p, &running, &None, false, false, no_list).unwrap();
        assert!(!c.relay);
        assert!(c.allow.is_none());
        assert_eq!(c.not_applied, vec!["listen"]);
        assert_eq!(c.timing, Some((Duration::from_secs(2), 6)));
        // Set by --heartbeat at start: the file's value is named, not applied.
        let c = HubChange::read(&p, &running, &None, false, true, no_list).unwrap();
        assert_eq!(c.timing, None);
        assert_eq!(c.not_applied.len(), 2, "{:?}", c.not_applied);
        let p = file("heartbeat = 0.001\n");
        assert!(HubChange::read(&p, &running, &None, false, false, no_list).is_err());
        // The command line's --no-relay wins over the file, as at startup.
        let p = file("relay = true\nheartbeat = 5.0\n");
        let c = HubChange::read(&p, &running, &None, true, false, no_list).unwrap();
        assert!(!c.relay && c.not_applied.is_empty());
        // Errors come before anything is applied.
        let bad = |_: &Path| -> Result<BTreeSet<[u8; 32]>> { Err(anyhow!("no such file")) };
        let p = file("allow = \"/nonexistent\"\n");
        assert!(HubChange::read(&p, &running, &None, false, false, bad).is_err());
        let p = file("log = \"[[[\"\n");
        let e = HubChange::read(&p, &running, &None, false, false, no_list)
            .err()
            .unwrap();
        assert!(e.to_string().contains("bad log level"), "{e}");
        let e = HubChange::read(&None, &running, &None, false, false, no_list)
            .err()
            .unwrap();
        assert!(e.to_string().contains("started without --config"), "{e}");
    }
}
