//! The hubs' Raft storage: the log, the vote and the book's latest snapshot,
//! kept in memory and written through to a [`Disk`] before Raft is told an
//! operation is done (a restarted hub comes back with what it acknowledged).
//!
//! Two files: `raft-log` (vote, commit index, entries since the last purge)
//! and `raft-snapshot` (the book as of a log index). The log stays short:
//! a snapshot every few hundred entries lets Raft purge what it covers.

use super::{Book, HubRaft};
use openraft::storage::{LogState, RaftLogReader, RaftSnapshotBuilder, RaftStorage, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, SnapshotMeta, StorageError,
    StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;
use std::ops::RangeBounds;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// Where a hub's Raft state lives: named blobs, each replaced atomically.
pub trait Disk: Send + Sync + 'static {
    /// The blob `name`, if it was ever saved.
    fn load(&self, name: &str) -> io::Result<Option<Vec<u8>>>;
    /// Replace the blob `name`; durable when this returns.
    fn save(&self, name: &str, bytes: &[u8]) -> io::Result<()>;
}

/// Files in a directory (written to a temporary name, synced, renamed).
#[derive(Debug, Clone)]
pub struct DirDisk(pub PathBuf);

impl Disk for DirDisk {
    fn load(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.0.join(name)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
    fn save(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        use std::io::Write;
        let tmp = self.0.join(format!(".{name}.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.0.join(name))?;
        // The rename itself must survive a power cut.
        std::fs::File::open(&self.0)?.sync_all()
    }
}

/// Memory that outlives the hub using it (a simulated crash keeps it, as a
/// real crash keeps the disk).
#[derive(Debug, Default)]
pub struct MemDisk(Mutex<BTreeMap<String, Vec<u8>>>);

impl Disk for MemDisk {
    fn load(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        Ok(self.0.lock().expect("disk lock").get(name).cloned())
    }
    fn save(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        self.0
            .lock()
            .expect("disk lock")
            .insert(name.to_string(), bytes.to_vec());
        Ok(())
    }
}

const LOG: &str = "raft-log";
const SNAPSHOT: &str = "raft-snapshot";

#[derive(Serialize, Deserialize, Default)]
struct LogFile {
    vote: Option<Vote<u64>>,
    committed: Option<LogId<u64>>,
    last_purged: Option<LogId<u64>>,
    entries: Vec<Entry<HubRaft>>,
}

#[derive(Serialize, Deserialize)]
struct SnapFile {
    meta: SnapshotMeta<u64, BasicNode>,
    data: Vec<u8>,
}

struct Inner {
    disk: Arc<dyn Disk>,
    vote: Option<Vote<u64>>,
    committed: Option<LogId<u64>>,
    last_purged: Option<LogId<u64>>,
    log: BTreeMap<u64, Entry<HubRaft>>,
    book: Book,
    applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
    snapshot: Option<SnapFile>,
    snapshots_built: u64,
    book_tx: watch::Sender<Arc<Book>>,
}

/// The storage of one hub's Raft (cheap to clone: the log reader and the
/// snapshot builder are clones).
#[derive(Clone)]
pub struct HubStore(Arc<Mutex<Inner>>);

fn io_err(subject: ErrorSubject<u64>, verb: ErrorVerb, e: io::Error) -> StorageError<u64> {
    StorageError::from_io_error(subject, verb, e)
}

fn bad_data(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl HubStore {
    /// Open the state on `disk` (empty if none); also returns the book as
    /// of the snapshot, updated as entries are applied.
    pub fn open(disk: Arc<dyn Disk>) -> Result<(HubStore, watch::Receiver<Arc<Book>>), String> {
        let log: LogFile = match disk.load(LOG).map_err(|e| format!("raft log: {e}"))? {
            Some(b) => rmp_serde::from_slice(&b).map_err(|e| format!("raft log: {e}"))?,
            None => LogFile::default(),
        };
        let snap: Option<SnapFile> = match disk
            .load(SNAPSHOT)
            .map_err(|e| format!("raft snapshot: {e}"))?
        {
            Some(b) => Some(rmp_serde::from_slice(&b).map_err(|e| format!("raft snapshot: {e}"))?),
            None => None,
        };
        let (book, applied, membership) = match &snap {
            Some(s) => (
                rmp_serde::from_slice::<Book>(&s.data)
                    .map_err(|e| format!("raft snapshot: {e}"))?,
                s.meta.last_log_id,
                s.meta.last_membership.clone(),
            ),
            None => (Book::default(), None, StoredMembership::default()),
        };
        let (book_tx, book_rx) = watch::channel(Arc::new(book.clone()));
        let inner = Inner {
            disk,
            vote: log.vote,
            committed: log.committed,
            last_purged: log.last_purged,
            log: log
                .entries
                .into_iter()
                .map(|e| (e.log_id.index, e))
                .collect(),
            book,
            applied,
            membership,
            snapshot: snap,
            snapshots_built: 0,
            book_tx,
        };
        Ok((HubStore(Arc::new(Mutex::new(inner))), book_rx))
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().expect("raft store lock")
    }
}

impl Inner {
    fn write_log(&self) -> io::Result<()> {
        let f = LogFile {
            vote: self.vote,
            committed: self.committed,
            last_purged: self.last_purged,
            entries: self.log.values().cloned().collect(),
        };
        let bytes = rmp_serde::to_vec(&f).map_err(bad_data)?;
        self.disk.save(LOG, &bytes)
    }

    fn install(&mut self, s: SnapFile) -> io::Result<()> {
        let book: Book = rmp_serde::from_slice(&s.data).map_err(bad_data)?;
        self.disk
            .save(SNAPSHOT, &rmp_serde::to_vec(&s).map_err(bad_data)?)?;
        self.book = book;
        self.applied = s.meta.last_log_id;
        self.membership = s.meta.last_membership.clone();
        self.snapshot = Some(s);
        self.book_tx.send_replace(Arc::new(self.book.clone()));
        Ok(())
    }
}

impl RaftLogReader<HubRaft> for HubStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + std::fmt::Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<HubRaft>>, StorageError<u64>> {
        Ok(self
            .inner()
            .log
            .range(range)
            .map(|(_, e)| e.clone())
            .collect())
    }
}

impl RaftSnapshotBuilder<HubRaft> for HubStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<HubRaft>, StorageError<u64>> {
        let mut g = self.inner();
        g.snapshots_built += 1;
        let data = rmp_serde::to_vec(&g.book)
            .map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Read, bad_data(e)))?;
        let id = match g.applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, g.snapshots_built),
            None => format!("empty-{}", g.snapshots_built),
        };
        let meta = SnapshotMeta {
            last_log_id: g.applied,
            last_membership: g.membership.clone(),
            snapshot_id: id,
        };
        let file = SnapFile {
            meta: meta.clone(),
            data: data.clone(),
        };
        let bytes = rmp_serde::to_vec(&file)
            .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, bad_data(e)))?;
        g.disk
            .save(SNAPSHOT, &bytes)
            .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?;
        g.snapshot = Some(file);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(std::io::Cursor::new(data)),
        })
    }
}

impl RaftStorage<HubRaft> for HubStore {
    type LogReader = HubStore;
    type SnapshotBuilder = HubStore;

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError<u64>> {
        let mut g = self.inner();
        g.vote = Some(*vote);
        g.write_log()
            .map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError<u64>> {
        Ok(self.inner().vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<u64>>,
    ) -> Result<(), StorageError<u64>> {
        let mut g = self.inner();
        g.committed = committed;
        g.write_log()
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, StorageError<u64>> {
        Ok(self.inner().committed)
    }

    async fn get_log_state(&mut self) -> Result<LogState<HubRaft>, StorageError<u64>> {
        let g = self.inner();
        let last = g
            .log
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(g.last_purged);
        Ok(LogState {
            last_purged_log_id: g.last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn append_to_log<I>(&mut self, entries: I) -> Result<(), StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<HubRaft>> + Send,
    {
        let mut g = self.inner();
        for e in entries {
            g.log.insert(e.log_id.index, e);
        }
        g.write_log()
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))
    }

    async fn delete_conflict_logs_since(
        &mut self,
        log_id: LogId<u64>,
    ) -> Result<(), StorageError<u64>> {
        let mut g = self.inner();
        g.log.split_off(&log_id.index);
        g.write_log()
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }

    async fn purge_logs_upto(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        let mut g = self.inner();
        let keep = g.log.split_off(&(log_id.index + 1));
        g.log = keep;
        g.last_purged = Some(log_id);
        g.write_log()
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }

    async fn last_applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>), StorageError<u64>> {
        let g = self.inner();
        Ok((g.applied, g.membership.clone()))
    }

    async fn apply_to_state_machine(
        &mut self,
        entries: &[Entry<HubRaft>],
    ) -> Result<Vec<Vec<super::Outcome>>, StorageError<u64>> {
        let mut g = self.inner();
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            g.applied = Some(e.log_id);
            match &e.payload {
                EntryPayload::Blank => out.push(Vec::new()),
                EntryPayload::Normal(batch) => {
                    let r = batch.0.iter().map(|c| g.book.apply(c)).collect();
                    out.push(r);
                }
                EntryPayload::Membership(m) => {
                    g.membership = StoredMembership::new(Some(e.log_id), m.clone());
                    out.push(Vec::new());
                }
            }
        }
        let book = Arc::new(g.book.clone());
        g.book_tx.send_replace(book);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<std::io::Cursor<Vec<u8>>>, StorageError<u64>> {
        Ok(Box::new(std::io::Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<std::io::Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<u64>> {
        let file = SnapFile {
            meta: meta.clone(),
            data: snapshot.into_inner(),
        };
        self.inner()
            .install(file)
            .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<HubRaft>>, StorageError<u64>> {
        Ok(self.inner().snapshot.as_ref().map(|s| Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(std::io::Cursor::new(s.data.clone())),
        }))
    }
}
