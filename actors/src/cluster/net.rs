//! Raft's RPCs between hubs, over any byte stream.
//!
//! A connection starts with a Noise handshake (`Noise_IKpsk1`, as between
//! peers, with its own prologue so the two can never be confused): the
//! dialling hub proves its static key and the network key, and the answering
//! hub serves only keys on its hub list. Then each message is msgpack,
//! length-prefixed, sealed in Noise transport frames of at most 64 KiB. One
//! request at a time per connection; Raft opens one client per target for
//! replication and one for votes.

use super::{Batch, ClusterConfig, HubPeer, HubRaft, Outcome, ProposeError, Raft};
use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed,
    StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Snapshot, SnapshotMeta, Vote};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use transport::wire::PublicKey;

/// The handshake between hubs.
pub const HUB_NOISE: &str = "Noise_IKpsk1_25519_ChaChaPoly_BLAKE2s";
/// Bound into every hub-to-hub handshake.
pub const HUB_PROLOGUE: &[u8] = b"fastmesh/hubs/1";
/// Largest message (a snapshot of the book with ~1M addresses).
pub const MAX_MESSAGE: usize = 64 << 20;
/// Plaintext per Noise frame (65,535 minus the tag).
const CHUNK: usize = 65_535 - 16;
/// Longest a dial plus handshake may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// This hub's keys, for hub-to-hub handshakes.
#[derive(Clone)]
pub struct HubKeys {
    /// Static private key.
    pub private: [u8; 32],
    /// The network pre-shared key.
    pub psk: [u8; 32],
}

/// Opens byte streams to other hubs.
pub trait Dialer: Clone + Send + Sync + 'static {
    /// A connection.
    type Conn: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static;
    /// Connect to `addr` (host:port).
    fn dial(&self, addr: &str) -> impl Future<Output = io::Result<Self::Conn>> + Send;
}

/// Kernel TCP.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpDialer;

impl Dialer for TcpDialer {
    type Conn = tokio::net::TcpStream;
    fn dial(&self, addr: &str) -> impl Future<Output = io::Result<Self::Conn>> + Send {
        let addr = addr.to_string();
        async move {
            let s = tokio::net::TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            Ok(s)
        }
    }
}

/// A proposal sent to the leader by a hub that is not it.
pub trait Forward: Send + Sync + 'static {
    /// Ask hub `leader` to propose `batch`.
    fn forward(
        &self,
        leader: u64,
        batch: Batch,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<Outcome>, ProposeError>> + Send + '_>>;
}

#[derive(Serialize, Deserialize)]
enum Request {
    Append(AppendEntriesRequest<HubRaft>),
    Vote(VoteRequest<u64>),
    Install(InstallSnapshotRequest<HubRaft>),
    Snapshot {
        vote: Vote<u64>,
        meta: SnapshotMeta<u64, BasicNode>,
        data: Vec<u8>,
    },
    Forward(Batch),
}

#[derive(Serialize, Deserialize)]
enum Response {
    Append(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    Install(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    Snapshot(Result<SnapshotResponse<u64>, Fatal<u64>>),
    Forward(Result<Vec<Outcome>, String>),
}

fn noise_err(e: snow::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("noise: {e}"))
}

fn builder(keys: &HubKeys) -> Result<snow::Builder<'_>, snow::Error> {
    let params: snow::params::NoiseParams = HUB_NOISE.parse()?;
    snow::Builder::new(params)
        .local_private_key(&keys.private)?
        .psk(1, &keys.psk)?
        .prologue(HUB_PROLOGUE)
}

async fn write_hs<S: AsyncWrite + Unpin>(s: &mut S, msg: &[u8]) -> io::Result<()> {
    s.write_all(&(msg.len() as u16).to_be_bytes()).await?;
    s.write_all(msg).await?;
    s.flush().await
}

async fn read_hs<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<Vec<u8>> {
    let n = s.read_u16().await? as usize;
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).await?;
    Ok(b)
}

/// An authenticated connection to another hub.
pub struct Channel<S> {
    s: S,
    noise: snow::TransportState,
    /// The other hub's static key.
    pub remote: PublicKey,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Channel<S> {
    /// Dial side: prove our key, check theirs is `remote`.
    pub async fn initiate(mut s: S, keys: &HubKeys, remote: &PublicKey) -> io::Result<Self> {
        let mut hs = builder(keys)
            .and_then(|b| b.remote_public_key(remote))
            .and_then(|b| b.build_initiator())
            .map_err(noise_err)?;
        let mut buf = vec![0u8; 256];
        let n = hs.write_message(&[], &mut buf).map_err(noise_err)?;
        write_hs(&mut s, &buf[..n]).await?;
        let msg2 = read_hs(&mut s).await?;
        hs.read_message(&msg2, &mut buf).map_err(noise_err)?;
        let noise = hs.into_transport_mode().map_err(noise_err)?;
        Ok(Channel {
            s,
            noise,
            remote: *remote,
        })
    }

    /// Answer side: accept only a key `allowed` approves.
    pub async fn accept(
        mut s: S,
        keys: &HubKeys,
        allowed: impl Fn(&PublicKey) -> bool,
    ) -> io::Result<Self> {
        let mut hs = builder(keys)
            .and_then(|b| b.build_responder())
            .map_err(noise_err)?;
        let msg1 = read_hs(&mut s).await?;
        let mut buf = vec![0u8; 256];
        hs.read_message(&msg1, &mut buf).map_err(noise_err)?;
        let remote: PublicKey = hs
            .get_remote_static()
            .and_then(|r| r.try_into().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no static key"))?;
        if !allowed(&remote) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "key {} is not on this hub's cluster list",
                    crate::store::key_hex(&remote)
                ),
            ));
        }
        let n = hs.write_message(&[], &mut buf).map_err(noise_err)?;
        write_hs(&mut s, &buf[..n]).await?;
        let noise = hs.into_transport_mode().map_err(noise_err)?;
        Ok(Channel { s, noise, remote })
    }

    /// Send one message.
    pub async fn send(&mut self, msg: &[u8]) -> io::Result<()> {
        if msg.len() > MAX_MESSAGE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "message too large",
            ));
        }
        let mut plain = Vec::with_capacity(4 + msg.len());
        plain.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        plain.extend_from_slice(msg);
        let mut out = Vec::with_capacity(plain.len() + plain.len() / CHUNK * 18 + 18);
        let mut buf = vec![0u8; 65_535];
        for chunk in plain.chunks(CHUNK) {
            let n = self
                .noise
                .write_message(chunk, &mut buf)
                .map_err(noise_err)?;
            out.extend_from_slice(&(n as u16).to_be_bytes());
            out.extend_from_slice(&buf[..n]);
        }
        self.s.write_all(&out).await?;
        self.s.flush().await
    }

    /// Receive one message.
    pub async fn recv(&mut self) -> io::Result<Vec<u8>> {
        let mut plain: Vec<u8> = Vec::new();
        let mut buf = vec![0u8; 65_535];
        loop {
            let ct = read_hs(&mut self.s).await?;
            let n = self.noise.read_message(&ct, &mut buf).map_err(noise_err)?;
            plain.extend_from_slice(&buf[..n]);
            if plain.len() >= 4 {
                let want = u32::from_be_bytes([plain[0], plain[1], plain[2], plain[3]]) as usize;
                if want > MAX_MESSAGE {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "message too large",
                    ));
                }
                if plain.len() > want + 4 {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "trailing bytes"));
                }
                if plain.len() == want + 4 {
                    plain.drain(..4);
                    return Ok(plain);
                }
            }
        }
    }
}

/// Raft's network: a client per target hub.
#[derive(Clone)]
pub struct HubNetwork<D: Dialer> {
    cfg: Arc<ClusterConfig>,
    keys: HubKeys,
    dialer: D,
}

impl<D: Dialer> HubNetwork<D> {
    /// Clients for the hubs of `cfg`.
    pub fn new(cfg: ClusterConfig, keys: HubKeys, dialer: D) -> Self {
        HubNetwork {
            cfg: Arc::new(cfg),
            keys,
            dialer,
        }
    }

    fn client(&self, target: u64) -> HubClient<D> {
        HubClient {
            target,
            peer: self.cfg.hub(target).cloned(),
            keys: self.keys.clone(),
            dialer: self.dialer.clone(),
            chan: None,
        }
    }
}

/// One hub's connection to another.
pub struct HubClient<D: Dialer> {
    target: u64,
    peer: Option<HubPeer>,
    keys: HubKeys,
    dialer: D,
    chan: Option<Channel<D::Conn>>,
}

impl<D: Dialer> HubClient<D> {
    async fn call(&mut self, req: &Request, ttl: Duration) -> io::Result<Response> {
        let body = rmp_serde::to_vec(req)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let r = tokio::time::timeout(ttl, self.exchange(&body)).await;
        let r = match r {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "no answer in time")),
        };
        if r.is_err() {
            // A half-used stream cannot be trusted for the next request.
            self.chan = None;
        }
        let bytes = r?;
        rmp_serde::from_slice(&bytes)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
    }

    async fn exchange(&mut self, body: &[u8]) -> io::Result<Vec<u8>> {
        if self.chan.is_none() {
            let peer = self.peer.as_ref().ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("hub {} is not listed", self.target),
                )
            })?;
            let connect = async {
                let s = self.dialer.dial(&peer.addr).await?;
                Channel::initiate(s, &self.keys, &peer.key).await
            };
            let chan = tokio::time::timeout(CONNECT_TIMEOUT, connect)
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
            self.chan = Some(chan);
        }
        let chan = self.chan.as_mut().expect("connected above");
        chan.send(body).await?;
        chan.recv().await
    }
}

fn unreachable<E: std::error::Error>(e: io::Error) -> RPCError<u64, BasicNode, E> {
    RPCError::Unreachable(Unreachable::new(&e))
}

fn mismatch<E: std::error::Error>() -> RPCError<u64, BasicNode, E> {
    RPCError::Network(NetworkError::new(&io::Error::new(
        io::ErrorKind::InvalidData,
        "answer does not match the request",
    )))
}

impl<D: Dialer> HubClient<D> {
    /// Send `req`; `pick` takes the answer of the matching kind.
    async fn rpc<T, E: std::error::Error>(
        &mut self,
        req: Request,
        ttl: Duration,
        pick: impl FnOnce(Response) -> Option<Result<T, E>>,
    ) -> Result<T, RPCError<u64, BasicNode, E>> {
        match self.call(&req, ttl).await {
            Ok(resp) => match pick(resp) {
                Some(r) => r.map_err(|e| RemoteError::new(self.target, e).into()),
                None => Err(mismatch()),
            },
            Err(e) => Err(unreachable(e)),
        }
    }
}

impl<D: Dialer> RaftNetwork<HubRaft> for HubClient<D> {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<HubRaft>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.rpc(Request::Append(rpc), option.hard_ttl(), |r| match r {
            Response::Append(r) => Some(r),
            _ => None,
        })
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<HubRaft>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        self.rpc(Request::Install(rpc), option.hard_ttl(), |r| match r {
            Response::Install(r) => Some(r),
            _ => None,
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.rpc(Request::Vote(rpc), option.hard_ttl(), |r| match r {
            Response::Vote(r) => Some(r),
            _ => None,
        })
        .await
    }

    /// The whole snapshot in one message (the book is small: ~50 bytes an
    /// address).
    async fn full_snapshot(
        &mut self,
        vote: Vote<u64>,
        snapshot: Snapshot<HubRaft>,
        _cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<u64>, StreamingError<HubRaft, Fatal<u64>>> {
        let req = Request::Snapshot {
            vote,
            meta: snapshot.meta.clone(),
            data: snapshot.snapshot.into_inner(),
        };
        match self.call(&req, option.hard_ttl()).await {
            Ok(Response::Snapshot(r)) => r.map_err(|e| RemoteError::new(self.target, e).into()),
            Ok(_) => Err(StreamingError::Network(NetworkError::new(&io::Error::new(
                io::ErrorKind::InvalidData,
                "answer does not match the request",
            )))),
            Err(e) => Err(StreamingError::Unreachable(Unreachable::new(&e))),
        }
    }
}

impl<D: Dialer> RaftNetworkFactory<HubRaft> for HubNetwork<D> {
    type Network = HubClient<D>;
    async fn new_client(&mut self, target: u64, _node: &BasicNode) -> HubClient<D> {
        self.client(target)
    }
}

impl<D: Dialer> Forward for HubNetwork<D> {
    fn forward(
        &self,
        leader: u64,
        batch: Batch,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<Outcome>, ProposeError>> + Send + '_>> {
        Box::pin(async move {
            let mut c = self.client(leader);
            match c
                .call(&Request::Forward(batch), super::PROPOSE_TIMEOUT)
                .await
            {
                Ok(Response::Forward(r)) => r.map_err(ProposeError::NoQuorum),
                Ok(_) => Err(ProposeError::NoQuorum("bad answer from the leader".into())),
                Err(e) => Err(ProposeError::NoQuorum(format!("leader {leader}: {e}"))),
            }
        })
    }
}

/// Serve one connection from another hub until it closes; requests go to
/// `raft`. Connections from keys not on `cfg`'s list are refused.
pub async fn serve<S>(conn: S, raft: Raft, cfg: Arc<ClusterConfig>, keys: HubKeys) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let accept = Channel::accept(conn, &keys, |k| cfg.hubs.iter().any(|h| h.key == *k));
    let mut chan = tokio::time::timeout(CONNECT_TIMEOUT, accept)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))??;
    loop {
        let req = match chan.recv().await {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        let req: Request = rmp_serde::from_slice(&req)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        let resp = match req {
            Request::Append(r) => Response::Append(raft.append_entries(r).await),
            Request::Vote(r) => Response::Vote(raft.vote(r).await),
            Request::Install(r) => Response::Install(raft.install_snapshot(r).await),
            Request::Snapshot { vote, meta, data } => {
                let snap = Snapshot {
                    meta,
                    snapshot: Box::new(std::io::Cursor::new(data)),
                };
                Response::Snapshot(raft.install_full_snapshot(vote, snap).await)
            }
            // Only the leader's own log takes it: no second forward, so a
            // stale leader hint can never make requests loop.
            Request::Forward(b) => Response::Forward(
                raft.client_write(b)
                    .await
                    .map(|r| r.data)
                    .map_err(|e| e.to_string()),
            ),
        };
        let body = rmp_serde::to_vec(&resp)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        chan.send(&body).await?;
    }
}
