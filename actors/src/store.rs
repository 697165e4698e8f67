//! The hub's durable table of which node key owns which overlay address.
//!
//! A small text file, one `address hex-key` per line, replaced atomically: the
//! new table is written to a temporary file in the same directory, synced, and
//! renamed over the old one, then the directory is synced. A crash at any point
//! (even `kill -9`) leaves either the old or the new table, never a mix.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use transport::wire::PublicKey;

/// Why the table could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// A line is not `address hex-key`.
    #[error("{path}:{line}: {what}")]
    Parse {
        /// File.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        what: String,
    },
}

/// The ownership table on disk.
#[derive(Debug, Clone)]
pub struct OwnerStore {
    path: PathBuf,
}

/// Hex of a key.
pub fn key_hex(k: &PublicKey) -> String {
    k.iter().map(|b| format!("{b:02x}")).collect()
}

/// A key from 64 hex digits.
pub fn parse_key_hex(s: &str) -> Option<PublicKey> {
    let s = s.trim();
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(k)
}

impl OwnerStore {
    /// A store at `path` (created on first save).
    pub fn new(path: impl Into<PathBuf>) -> OwnerStore {
        OwnerStore { path: path.into() }
    }

    /// Where the table lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read the table; a missing file is an empty table.
    pub fn load(&self) -> Result<BTreeMap<IpAddr, PublicKey>, StoreError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(source) => {
                return Err(StoreError::Io {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let mut out = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |what: &str| StoreError::Parse {
                path: self.path.clone(),
                line: i + 1,
                what: what.to_string(),
            };
            if line.starts_with("revoked ") {
                continue;
            }
            let mut parts = line.split_whitespace();
            let addr: IpAddr = parts
                .next()
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| err("bad address"))?;
            let key = parts
                .next()
                .and_then(parse_key_hex)
                .ok_or_else(|| err("bad key (want 64 hex digits)"))?;
            if parts.next().is_some() {
                return Err(err("trailing text"));
            }
            out.insert(addr, key);
        }
        Ok(out)
    }

    /// Read the revoked keys (`revoked <hex-key>` lines).
    pub fn load_revoked(&self) -> Result<BTreeSet<PublicKey>, StoreError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
            Err(source) => {
                return Err(StoreError::Io {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let mut out = BTreeSet::new();
        for (i, line) in text.lines().enumerate() {
            if let Some(k) = line.trim().strip_prefix("revoked ") {
                let key = parse_key_hex(k).ok_or_else(|| StoreError::Parse {
                    path: self.path.clone(),
                    line: i + 1,
                    what: "bad revoked key (want 64 hex digits)".into(),
                })?;
                out.insert(key);
            }
        }
        Ok(out)
    }

    /// Replace the table (owners and revoked keys) atomically.
    pub fn save(
        &self,
        owners: &BTreeMap<IpAddr, PublicKey>,
        revoked: &BTreeSet<PublicKey>,
    ) -> Result<(), StoreError> {
        let io = |source| StoreError::Io {
            path: self.path.clone(),
            source,
        };
        let mut text = String::from(
            "# fastmesh hub: overlay address -> node key (do not edit while the hub runs)\n",
        );
        for (a, k) in owners {
            text.push_str(&format!("{a} {}\n", key_hex(k)));
        }
        for k in revoked {
            text.push_str(&format!("revoked {}\n", key_hex(k)));
        }
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let tmp = self.path.with_extension("tmp");
        {
            let mut f = fs::File::create(&tmp).map_err(io)?;
            f.write_all(text.as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        fs::rename(&tmp, &self.path).map_err(io)?;
        if let Ok(d) = fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("fastmesh-store-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn round_trip_and_missing_file() {
        let d = tmpdir("rt");
        let s = OwnerStore::new(d.join("owners"));
        assert!(s.load().unwrap().is_empty());
        let mut m = BTreeMap::new();
        m.insert(IpAddr::from([10, 0, 0, 1]), [7u8; 32]);
        m.insert("fd00::1".parse().unwrap(), [9u8; 32]);
        let none = BTreeSet::new();
        s.save(&m, &none).unwrap();
        assert_eq!(s.load().unwrap(), m);
        m.remove(&IpAddr::from([10, 0, 0, 1]));
        let revoked = BTreeSet::from([[3u8; 32]]);
        s.save(&m, &revoked).unwrap();
        assert_eq!(s.load().unwrap(), m);
        assert_eq!(s.load_revoked().unwrap(), revoked);
        assert!(!d.join("owners.tmp").exists());
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn corrupt_file_is_a_clear_error() {
        let d = tmpdir("bad");
        let p = d.join("owners");
        fs::write(&p, "10.0.0.1 zz\n").unwrap();
        let e = OwnerStore::new(&p).load().unwrap_err().to_string();
        assert!(e.contains(":1:") && e.contains("bad key"), "{e}");
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_leftover_temp_file_does_not_matter() {
        // A crash between writing the temp file and renaming leaves the old table.
        let d = tmpdir("crash");
        let s = OwnerStore::new(d.join("owners"));
        let mut m = BTreeMap::new();
        m.insert(IpAddr::from([10, 0, 0, 1]), [7u8; 32]);
        s.save(&m, &BTreeSet::new()).unwrap();
        fs::write(d.join("owners.tmp"), "garbage").unwrap();
        assert_eq!(s.load().unwrap(), m);
        fs::remove_dir_all(d).unwrap();
    }
}
