//! Stream fallback: frames over TCP, or TLS on port 443, where UDP does not
//! pass.
//!
//! [`Streamed`] wraps the node's datagram socket and is itself a [`Datagram`],
//! so the protocol above does not change: a frame keeps its end-to-end
//! encryption and only its envelope differs (a 2-byte length prefix on a
//! byte stream instead of a UDP header).
//!
//! * **On a hub** ([`Streamed::listen`]) every accepted connection is given an
//!   address in the IPv6 discard-only prefix `100::/64` (RFC 6666), unique per
//!   connection. Frames read from it look to the node like datagrams from that
//!   address, so the member's session follows it like any roaming endpoint,
//!   and sends to it go down the connection. Such an address is never a
//!   candidate for other peers ([`is_stream_addr`]).
//! * **On a peer** ([`Streamed::set_hubs`]) the fallback is transparent: a hub
//!   keeps its UDP address in the node. When frames to that address go
//!   unanswered ([`FallbackConfig`]), the wrapper dials the hub's stream
//!   targets in order (TCP, then TLS), and while one is connected frames to the
//!   hub travel on it and frames read from it are handed up as coming from the
//!   hub's UDP address. Every [`FallbackConfig::udp_retry`] one frame also goes
//!   by UDP; the first UDP datagram that comes back from the hub ends the
//!   fallback and closes the connection.
//!
//! Bounds: connections a hub accepts ([`MAX_CONNS`]), frames waiting to be
//! read ([`RX_QUEUE`]) and to be written per connection ([`TX_QUEUE`]); what
//! does not fit is dropped and counted, as a full UDP socket would drop it
//! (the sessions recover like from loss). A hub closes a connection on which
//! nothing arrived for [`ACCEPT_IDLE`].

use crate::inbox::{lock, Inbox};
use crate::io::Datagram;
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::bytes::Bytes;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

/// Connections a hub holds at most; more are closed at once, counted.
pub const MAX_CONNS: usize = 4096;
/// Frames read from streams and not yet taken by the node.
pub const RX_QUEUE: usize = 4096;
/// Frames waiting to be written on one connection.
pub const TX_QUEUE: usize = 1024;
/// A hub closes a connection that brought nothing for this long.
pub const ACCEPT_IDLE: Duration = Duration::from_secs(60);
/// Longest wait between dials of a hub that keeps failing.
pub const MAX_REDIAL: Duration = Duration::from_secs(30);
/// Time for a TCP connect or a TLS handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether `a` names a stream connection on a hub (the discard-only prefix
/// `100::/64`), not a UDP endpoint: never a candidate for direct paths.
pub fn is_stream_addr(a: &SocketAddr) -> bool {
    match a {
        SocketAddr::V6(v) => v.ip().segments()[..4] == [0x100, 0, 0, 0],
        SocketAddr::V4(_) => false,
    }
}

fn stream_addr(id: u64, port: u16) -> SocketAddr {
    let ip = Ipv6Addr::from((0x0100_u128 << 112) | id as u128);
    SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0))
}

/// One way to reach a hub by stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Plain TCP to this address.
    Tcp(SocketAddr),
    /// TLS to this address, with this server name (SNI; none for an IP
    /// address). The certificate is not checked: TLS is only an envelope that
    /// networks passing nothing but HTTPS let through; the Noise session
    /// inside authenticates the hub by its key.
    Tls(SocketAddr, ServerName<'static>),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Tcp(a) => write!(f, "tcp://{a}"),
            Target::Tls(a, _) => write!(f, "tls://{a}"),
        }
    }
}

/// A hub a peer may fall back to: its UDP address (as the node knows it) and
/// its stream targets, tried in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRoute {
    /// The hub's UDP address.
    pub udp: SocketAddr,
    /// Stream targets, first tried first.
    pub targets: Vec<Target>,
}

/// When a peer falls back to a stream.
#[derive(Debug, Clone)]
pub struct FallbackConfig {
    /// Frames to a hub never answered over UDP: fall back after this long.
    pub never_heard: Duration,
    /// Frames to a hub that did answer before: fall back after this long
    /// unanswered (above the heartbeat interval, so that a one-way keepalive
    /// between heartbeats is not taken for a dead path).
    pub after_heard: Duration,
    /// While on a stream, one frame this often also goes by UDP.
    pub udp_retry: Duration,
    /// A connected stream that brings nothing for this long while frames go
    /// into it is given up for the next target.
    pub stream_silent: Duration,
    /// After a failed dial, wait this long before the next.
    pub redial: Duration,
}

impl Default for FallbackConfig {
    fn default() -> Self {
        FallbackConfig {
            never_heard: Duration::from_secs(4),
            after_heard: Duration::from_secs(12),
            udp_retry: Duration::from_secs(2),
            stream_silent: Duration::from_secs(15),
            redial: Duration::from_secs(2),
        }
    }
}

/// Stream counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Connections accepted (hub).
    pub accepted: u64,
    /// Connections refused: over [`MAX_CONNS`], or a failed TLS handshake.
    pub refused: u64,
    /// Connections open now.
    pub open: u64,
    /// Frames read from streams.
    pub frames_rx: u64,
    /// Frames queued to streams.
    pub frames_tx: u64,
    /// Frames dropped: read queue full, write queue full, or no connection.
    pub dropped: u64,
    /// Times a peer moved a hub to a stream.
    pub fallbacks: u64,
    /// Times a peer moved a hub back to UDP.
    pub returns: u64,
    /// Dials that failed (connect, TLS, or a stream that never answered).
    pub dial_failed: u64,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
    frames_rx: AtomicU64,
    frames_tx: AtomicU64,
    dropped: AtomicU64,
    fallbacks: AtomicU64,
    returns: AtomicU64,
    dial_failed: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// How a peer reaches one hub now.
enum Mode {
    Udp,
    Dialing,
    Stream {
        tx: mpsc::Sender<Bytes>,
        /// Last frame read from the stream (or when it connected).
        last_rx: Instant,
    },
}

struct HubLink {
    targets: Vec<Target>,
    /// The target the next dial tries.
    next: usize,
    mode: Mode,
    /// Connection generation: a finished connection task only resets the
    /// mode if it is still the current one.
    conn_gen: u64,
    /// First frame sent since the last UDP datagram from the hub.
    unanswered_since: Option<Instant>,
    /// Some UDP datagram ever came from the hub.
    heard: bool,
    next_udp_retry: Instant,
    dial_not_before: Instant,
    /// Dials failed in a row (the wait before the next one doubles).
    fails: u32,
}

struct Shared {
    rx: Inbox,
    /// Hub: connections by their stream address.
    conns: Mutex<BTreeMap<SocketAddr, mpsc::Sender<Bytes>>>,
    /// Peer: hubs by UDP address.
    hubs: Mutex<BTreeMap<SocketAddr, HubLink>>,
    has_hubs: AtomicBool,
    cfg: Mutex<FallbackConfig>,
    tls_client: Arc<rustls::ClientConfig>,
    next_id: AtomicU64,
    next_gen: AtomicU64,
    /// Bumped when a hub moves between UDP and a stream.
    epoch: AtomicU64,
    n: Counters,
}

impl Shared {
    /// A frame read from a stream, handed up as if from `from`.
    fn push_rx(&self, frame: Vec<u8>, from: SocketAddr) {
        if self.rx.push(frame, from) {
            bump(&self.n.frames_rx);
        } else {
            bump(&self.n.dropped);
        }
    }

    fn queue(&self, tx: &mpsc::Sender<Bytes>, buf: &[u8]) {
        match tx.try_send(Bytes::copy_from_slice(buf)) {
            Ok(()) => bump(&self.n.frames_tx),
            Err(_) => bump(&self.n.dropped),
        }
    }
}

/// A datagram socket with stream fallback (see the module documentation).
pub struct Streamed<D> {
    udp: D,
    sh: Arc<Shared>,
}

impl<D: Datagram> Streamed<D> {
    /// Wrap `udp`. Without [`Streamed::listen`] or [`Streamed::set_hubs`] it
    /// behaves exactly like `udp`.
    pub fn new(udp: D) -> Self {
        Streamed {
            udp,
            sh: Arc::new(Shared {
                rx: Inbox::new(RX_QUEUE),
                conns: Mutex::default(),
                hubs: Mutex::default(),
                has_hubs: AtomicBool::new(false),
                cfg: Mutex::new(FallbackConfig::default()),
                tls_client: Arc::new(tls_client_config()),
                next_id: AtomicU64::new(1),
                next_gen: AtomicU64::new(1),
                epoch: AtomicU64::new(0),
                n: Counters::default(),
            }),
        }
    }

    /// The wrapped socket.
    pub fn inner(&self) -> &D {
        &self.udp
    }

    /// Set when to fall back.
    pub fn set_fallback_config(&self, cfg: FallbackConfig) {
        *lock(&self.sh.cfg) = cfg;
    }

    /// The hubs a peer may fall back to. A hub kept from before keeps its
    /// state (and its connection); one no longer listed is dropped.
    pub fn set_hubs(&self, hubs: Vec<HubRoute>) {
        let now = Instant::now();
        let mut map = lock(&self.sh.hubs);
        let mut old = std::mem::take(&mut *map);
        for h in hubs {
            let link = match old.remove(&h.udp) {
                Some(mut l) if l.targets == h.targets => {
                    l.next = l.next.min(h.targets.len().saturating_sub(1));
                    l
                }
                _ => HubLink {
                    targets: h.targets,
                    next: 0,
                    mode: Mode::Udp,
                    conn_gen: 0,
                    unanswered_since: None,
                    heard: false,
                    next_udp_retry: now,
                    dial_not_before: now,
                    fails: 0,
                },
            };
            map.insert(h.udp, link);
        }
        self.sh.has_hubs.store(!map.is_empty(), Ordering::Relaxed);
    }

    /// Each hub's stream in use: its UDP address and the target (None on UDP).
    pub fn hub_links(&self) -> Vec<(SocketAddr, Option<String>)> {
        lock(&self.sh.hubs)
            .iter()
            .map(|(a, l)| {
                let on = match l.mode {
                    Mode::Stream { .. } => Some(l.targets[l.next].to_string()),
                    _ => None,
                };
                (*a, on)
            })
            .collect()
    }

    /// The counters.
    pub fn stats(&self) -> StreamStats {
        let n = &self.sh.n;
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let open = lock(&self.sh.conns).len()
            + lock(&self.sh.hubs)
                .values()
                .filter(|l| matches!(l.mode, Mode::Stream { .. }))
                .count();
        StreamStats {
            accepted: g(&n.accepted),
            refused: g(&n.refused),
            open: open as u64,
            frames_rx: g(&n.frames_rx),
            frames_tx: g(&n.frames_tx),
            dropped: g(&n.dropped),
            fallbacks: g(&n.fallbacks),
            returns: g(&n.returns),
            dial_failed: g(&n.dial_failed),
        }
    }

    /// Accept stream connections on `l` (a hub), TLS first if `tls` is given.
    /// Runs until the listener fails; spawn it.
    pub fn listen(
        &self,
        l: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let sh = self.sh.clone();
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        async move {
            let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
            loop {
                let (s, from) = match l.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of descriptors and the like: not fatal.
                        tracing::debug!(error = %e, "stream accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if lock(&sh.conns).len() >= MAX_CONNS {
                    bump(&sh.n.refused);
                    continue;
                }
                let _ = s.set_nodelay(true);
                let id = sh.next_id.fetch_add(1, Ordering::Relaxed);
                let addr = stream_addr(id, port);
                let (sh, acceptor) = (sh.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let (tx, rx) = mpsc::channel(TX_QUEUE);
                    match acceptor {
                        None => {
                            bump(&sh.n.accepted);
                            lock(&sh.conns).insert(addr, tx);
                            serve(&sh, s, addr, rx, ACCEPT_IDLE, || {}).await;
                        }
                        Some(a) => match tokio::time::timeout(CONNECT_TIMEOUT, a.accept(s)).await {
                            Ok(Ok(t)) => {
                                bump(&sh.n.accepted);
                                lock(&sh.conns).insert(addr, tx);
                                serve(&sh, t, addr, rx, ACCEPT_IDLE, || {}).await;
                            }
                            _ => {
                                tracing::debug!(%from, "TLS handshake failed");
                                bump(&sh.n.refused);
                                return;
                            }
                        },
                    }
                    lock(&sh.conns).remove(&addr);
                    tracing::debug!(%from, stream = %addr, "stream closed");
                });
            }
        }
    }

    /// Route one frame for `to`: true if it (also) goes by UDP.
    fn before_send(&self, buf: &[u8], to: SocketAddr) -> bool {
        if is_stream_addr(&to) {
            match lock(&self.sh.conns).get(&to) {
                Some(tx) => self.sh.queue(tx, buf),
                None => bump(&self.sh.n.dropped),
            }
            return false;
        }
        if !self.sh.has_hubs.load(Ordering::Relaxed) {
            return true;
        }
        let mut hubs = lock(&self.sh.hubs);
        let Some(h) = hubs.get_mut(&to) else {
            return true;
        };
        let now = Instant::now();
        let cfg = lock(&self.sh.cfg).clone();
        let since = *h.unanswered_since.get_or_insert(now);
        match &h.mode {
            Mode::Stream { tx, last_rx } => {
                if now.saturating_duration_since(*last_rx) >= cfg.stream_silent {
                    tracing::warn!(hub = %to, via = %h.targets[h.next], "stream to hub silent; trying the next way");
                    bump(&self.sh.n.dial_failed);
                    h.fails += 1;
                    h.next = (h.next + 1) % h.targets.len();
                    h.mode = Mode::Udp;
                    bump(&self.sh.epoch);
                    return true;
                }
                self.sh.queue(tx, buf);
                if now >= h.next_udp_retry {
                    h.next_udp_retry = now + cfg.udp_retry;
                    return true;
                }
                false
            }
            Mode::Dialing => true,
            Mode::Udp => {
                let wait = if h.heard {
                    cfg.after_heard
                } else {
                    cfg.never_heard
                };
                if !h.targets.is_empty()
                    && now.saturating_duration_since(since) >= wait
                    && now >= h.dial_not_before
                {
                    h.mode = Mode::Dialing;
                    h.conn_gen = self.sh.next_gen.fetch_add(1, Ordering::Relaxed);
                    let target = h.targets[h.next].clone();
                    tracing::info!(hub = %to, via = %target, unanswered_s = now.saturating_duration_since(since).as_secs(), "UDP to hub unanswered; trying a stream");
                    tokio::spawn(dial(self.sh.clone(), to, target, h.conn_gen));
                }
                true
            }
        }
    }

    /// UDP datagrams arrived from these senders: a hub among them answers by UDP.
    fn heard_udp(&self, from: impl Iterator<Item = SocketAddr>) {
        if !self.sh.has_hubs.load(Ordering::Relaxed) {
            return;
        }
        let mut hubs = lock(&self.sh.hubs);
        for a in from {
            let Some(h) = hubs.get_mut(&a) else {
                continue;
            };
            h.unanswered_since = None;
            h.heard = true;
            if matches!(h.mode, Mode::Stream { .. }) {
                tracing::info!(hub = %a, "UDP to hub works again; leaving the stream");
                bump(&self.sh.n.returns);
                bump(&self.sh.epoch);
                // Dropping the sender ends the connection.
                h.mode = Mode::Udp;
            }
        }
    }

    fn pop_rx(&self, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
        self.sh.rx.pop(buf)
    }
}

/// Dial `target` for the hub at `hub` and carry frames on it until it ends.
async fn dial(sh: Arc<Shared>, hub: SocketAddr, target: Target, gen: u64) {
    let connected = async {
        let tcp_to = match &target {
            Target::Tcp(a) | Target::Tls(a, _) => *a,
        };
        let s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(tcp_to))
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        let _ = s.set_nodelay(true);
        Ok::<_, io::Error>(s)
    };
    let (tx, rx) = mpsc::channel(TX_QUEUE);
    // The mode holds the only sender: leaving the stream closes it.
    let set_stream = |sh: &Shared, tx: mpsc::Sender<Bytes>| {
        let mut hubs = lock(&sh.hubs);
        match hubs.get_mut(&hub) {
            Some(h) if h.conn_gen == gen => {
                h.mode = Mode::Stream {
                    tx,
                    last_rx: Instant::now(),
                };
                h.next_udp_retry = Instant::now();
                h.fails = 0;
                bump(&sh.n.fallbacks);
                bump(&sh.epoch);
                tracing::info!(%hub, via = %target, "hub reached by stream");
                true
            }
            _ => false,
        }
    };
    let on_frame = || {
        if let Some(h) = lock(&sh.hubs).get_mut(&hub) {
            if let (true, Mode::Stream { last_rx, .. }) = (h.conn_gen == gen, &mut h.mode) {
                *last_rx = Instant::now();
            }
        }
    };
    let result = match connected.await {
        Err(e) => Err(e),
        Ok(s) => match &target {
            Target::Tcp(_) => {
                if set_stream(&sh, tx) {
                    serve(&sh, s, hub, rx, Duration::MAX, on_frame).await;
                }
                Ok(())
            }
            Target::Tls(_, name) => {
                let c = tokio_rustls::TlsConnector::from(sh.tls_client.clone());
                match tokio::time::timeout(CONNECT_TIMEOUT, c.connect(name.clone(), s)).await {
                    Ok(Ok(t)) => {
                        if set_stream(&sh, tx) {
                            serve(&sh, t, hub, rx, Duration::MAX, on_frame).await;
                        }
                        Ok(())
                    }
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(io::ErrorKind::TimedOut.into()),
                }
            }
        },
    };
    let mut hubs = lock(&sh.hubs);
    let Some(h) = hubs.get_mut(&hub) else {
        return;
    };
    if h.conn_gen != gen {
        return;
    }
    let cfg = lock(&sh.cfg).clone();
    if let Err(e) = result {
        h.fails += 1;
        // Each target's failure is told once; a hub that stays down is
        // retried less and less often, quietly.
        if h.fails as usize <= h.targets.len() {
            tracing::warn!(%hub, via = %target, error = %e, "stream to hub failed");
        } else {
            tracing::debug!(%hub, via = %target, error = %e, "stream to hub failed");
        }
        bump(&sh.n.dial_failed);
        h.next = (h.next + 1) % h.targets.len().max(1);
    }
    if !matches!(h.mode, Mode::Udp) {
        // Failed, or the connection ended under us: next send dials again
        // (UDP is still unanswered).
        if matches!(h.mode, Mode::Stream { .. }) {
            bump(&sh.epoch);
        }
        h.mode = Mode::Udp;
    }
    let backoff = cfg.redial * 2u32.pow(h.fails.saturating_sub(1).min(4));
    h.dial_not_before = Instant::now() + backoff.min(MAX_REDIAL);
}

/// The largest frame a stream carries: a relayed frame of a 9,000-byte TUN
/// MTU with room to spare. A longer length prefix ends the connection.
pub const MAX_STREAM_FRAME: usize = 16 * 1024;

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(2)
        .max_frame_length(MAX_STREAM_FRAME)
        .new_codec()
}

/// Carry frames on one connection: frames read are handed up as from `from`,
/// frames from `out` are written. Ends when either side ends, or when nothing
/// was read for `idle`.
async fn serve<S: AsyncRead + AsyncWrite + Send + 'static>(
    sh: &Arc<Shared>,
    s: S,
    from: SocketAddr,
    mut out: mpsc::Receiver<Bytes>,
    idle: Duration,
    on_frame: impl Fn(),
) {
    let (r, w) = tokio::io::split(s);
    let mut rd = FramedRead::new(r, codec());
    let mut writer = tokio::spawn(async move {
        let mut wr = FramedWrite::new(w, codec());
        while let Some(f) = out.recv().await {
            if wr.feed(f).await.is_err() {
                return;
            }
            while let Ok(f) = out.try_recv() {
                if wr.feed(f).await.is_err() {
                    return;
                }
            }
            if SinkExt::<Bytes>::flush(&mut wr).await.is_err() {
                return;
            }
        }
    });
    loop {
        // The writer ends when our side leaves the stream (its sender is
        // dropped) or the connection fails: then so does the reader.
        let next = tokio::select! {
            biased;
            n = read_frame(&mut rd, idle) => n,
            _ = &mut writer => break,
        };
        match next {
            Some(Ok(f)) => {
                on_frame();
                sh.push_rx(f.to_vec(), from);
            }
            _ => break,
        }
    }
    writer.abort();
}

/// The next frame, or None at the end, on an error, or after `idle`
/// without one (never with `Duration::MAX`).
async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut FramedRead<R, LengthDelimitedCodec>,
    idle: Duration,
) -> Option<io::Result<tokio_util::bytes::BytesMut>> {
    if idle == Duration::MAX {
        rd.next().await
    } else {
        tokio::time::timeout(idle, rd.next()).await.ok().flatten()
    }
}

/// TLS client settings: any certificate (see [`Target::Tls`]), signatures
/// still checked so the handshake is well formed.
fn tls_client_config() -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut c = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    c.alpn_protocols = vec![TLS_ALPN.to_vec()];
    c
}

/// The application protocol both ends name in the TLS handshake: what an
/// HTTPS client to a web server names, so the handshake looks like one.
pub const TLS_ALPN: &[u8] = b"http/1.1";

/// Accepts any server certificate: the hub is authenticated by the Noise
/// handshake carried inside, not by TLS.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl<D: Datagram> Datagram for Streamed<D> {
    fn send_to(
        &self,
        buf: &[u8],
        to: SocketAddr,
    ) -> impl Future<Output = io::Result<usize>> + Send {
        let udp = self.before_send(buf, to);
        async move {
            if udp {
                self.udp.send_to(buf, to).await
            } else {
                Ok(buf.len())
            }
        }
    }

    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        loop {
            if let Some(x) = self.pop_rx(buf) {
                return Ok(x);
            }
            match self.udp.try_recv_from(buf) {
                Ok((n, from)) => {
                    self.heard_udp(std::iter::once(from));
                    return Ok((n, from));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            self.readable().await?;
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    async fn readable(&self) -> io::Result<()> {
        self.sh.rx.readable(&self.udp).await
    }

    fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        if let Some(x) = self.pop_rx(buf) {
            return Ok(x);
        }
        let (n, from) = self.udp.try_recv_from(buf)?;
        self.heard_udp(std::iter::once(from));
        Ok((n, from))
    }

    fn try_send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        if self.before_send(buf, to) {
            self.udp.try_send_to(buf, to)
        } else {
            Ok(buf.len())
        }
    }

    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
        self.udp.writable()
    }

    fn try_send_probe(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        if is_stream_addr(&to) {
            // No path MTU to find on a stream.
            return Err(io::ErrorKind::Unsupported.into());
        }
        self.udp.try_send_probe(buf, to)
    }

    fn max_gso_segments(&self) -> usize {
        self.udp.max_gso_segments()
    }

    fn try_send_gso(&self, buf: &[u8], segment: usize, to: SocketAddr) -> io::Result<usize> {
        let hub = is_stream_addr(&to)
            || (self.sh.has_hubs.load(Ordering::Relaxed) && lock(&self.sh.hubs).contains_key(&to));
        if !hub {
            return self.udp.try_send_gso(buf, segment, to);
        }
        // Frames to a hub (rare, small): each routed on its own.
        let mut n = 0;
        for c in buf.chunks(segment.max(1)) {
            if self.before_send(c, to) {
                if let Err(e) = self.udp.try_send_to(c, to) {
                    if n == 0 {
                        return Err(e);
                    }
                    break;
                }
            }
            n += 1;
        }
        Ok(n)
    }

    fn stream_epoch(&self) -> u64 {
        self.sh.epoch.load(Ordering::Relaxed)
    }

    fn open_ports(&self, dest: SocketAddr) {
        self.udp.open_ports(dest)
    }

    fn spray(&self, ip: std::net::IpAddr) {
        self.udp.spray(ip)
    }

    fn on_stream(&self, to: SocketAddr) -> bool {
        is_stream_addr(&to)
            || lock(&self.sh.hubs)
                .get(&to)
                .is_some_and(|h| matches!(h.mode, Mode::Stream { .. }))
    }

    fn try_recv_gro(&self, buf: &mut [u8]) -> io::Result<(usize, usize, SocketAddr)> {
        if let Some((n, from)) = self.pop_rx(buf) {
            return Ok((n, n.max(1), from));
        }
        let r = self.udp.try_recv_gro(buf)?;
        self.heard_udp(std::iter::once(r.2));
        Ok(r)
    }

    fn try_recv_batch(
        &self,
        bufs: &mut [Vec<u8>],
        out: &mut [(usize, usize, SocketAddr)],
    ) -> io::Result<usize> {
        let k = self.sh.rx.pop_batch(bufs, out);
        if k > 0 {
            return Ok(k);
        }
        let k = self.udp.try_recv_batch(bufs, out)?;
        self.heard_udp(out[..k].iter().map(|o| o.2));
        Ok(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UdpSocket;

    /// A UDP socket whose sends to one address can be blocked (a firewall).
    struct Firewalled {
        sock: UdpSocket,
        blocked: SocketAddr,
        on: AtomicBool,
    }

    impl Firewalled {
        fn pass(&self, to: SocketAddr) -> bool {
            to != self.blocked || !self.on.load(Ordering::Relaxed)
        }
    }

    impl Datagram for Firewalled {
        async fn send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
            if !self.pass(to) {
                return Ok(buf.len());
            }
            self.sock.send_to(buf, to).await
        }
        async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
            self.sock.recv_from(buf).await
        }
        fn local_addr(&self) -> io::Result<SocketAddr> {
            self.sock.local_addr()
        }
        async fn readable(&self) -> io::Result<()> {
            self.sock.readable().await
        }
        fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
            self.sock.try_recv_from(buf)
        }
        fn try_send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
            if !self.pass(to) {
                return Ok(buf.len());
            }
            self.sock.try_send_to(buf, to)
        }
        async fn writable(&self) -> io::Result<()> {
            self.sock.writable().await
        }
    }

    fn tls_server() -> Arc<rustls::ServerConfig> {
        let c = rcgen::generate_simple_self_signed(vec!["hub.example".into()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(c.key_pair.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![c.cert.der().clone()], key)
            .unwrap();
        cfg.alpn_protocols = vec![TLS_ALPN.to_vec()];
        Arc::new(cfg)
    }

    /// A hub that echoes every frame to where it came from, with a stream
    /// listener; returns it, its UDP address and its stream address.
    async fn echo_hub(
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> (Arc<Streamed<UdpSocket>>, SocketAddr, SocketAddr) {
        let hub = Arc::new(Streamed::new(UdpSocket::bind("127.0.0.1:0").await.unwrap()));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = l.local_addr().unwrap();
        tokio::spawn(hub.listen(l, tls));
        let h = hub.clone();
        tokio::spawn(async move {
            let mut buf = vec![0; 2048];
            while let Ok((n, from)) = h.recv_from(&mut buf).await {
                let _ = h.send_to(&buf[..n], from).await;
            }
        });
        let udp = hub.local_addr().unwrap();
        (hub, udp, tcp)
    }

    /// Send numbered frames to `to` until one comes back for which `done`
    /// holds; returns the sender of that answer (bounded: 400 rounds).
    async fn until_answer(
        peer: &Streamed<Firewalled>,
        to: SocketAddr,
        mut done: impl FnMut(&Streamed<Firewalled>) -> bool,
    ) -> SocketAddr {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let mut buf = vec![0; 2048];
        for i in 0u32..400 {
            tick.tick().await;
            peer.send_to(&i.to_be_bytes(), to).await.unwrap();
            while let Ok((n, from)) = peer.try_recv_from(&mut buf) {
                assert_eq!(n, 4, "frames keep their bounds on a stream");
                if done(peer) {
                    return from;
                }
            }
        }
        panic!("no answer: {:?}", peer.stats());
    }

    async fn falls_back_and_returns(tls: bool) {
        let (hub, hub_udp, tcp) = echo_hub(tls.then(tls_server)).await;
        let peer = Streamed::new(Firewalled {
            sock: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            blocked: hub_udp,
            on: AtomicBool::new(true),
        });
        peer.set_fallback_config(FallbackConfig {
            never_heard: Duration::from_millis(200),
            udp_retry: Duration::from_millis(100),
            ..FallbackConfig::default()
        });
        let target = if tls {
            Target::Tls(tcp, ServerName::try_from("hub.example").unwrap())
        } else {
            Target::Tcp(tcp)
        };
        peer.set_hubs(vec![HubRoute {
            udp: hub_udp,
            targets: vec![target.clone()],
        }]);
        // UDP to the hub blocked: the answer comes by the stream, under the
        // hub's UDP address, and the hub saw a stream address.
        let from = until_answer(&peer, hub_udp, |_| true).await;
        assert_eq!(from, hub_udp);
        assert_eq!(peer.stats().fallbacks, 1);
        assert_eq!(peer.hub_links(), vec![(hub_udp, Some(target.to_string()))]);
        assert_eq!(hub.stats().accepted, 1);
        assert!(hub.stats().frames_rx > 0);
        // Unblocked: a UDP retry reaches the hub, its echo comes back by
        // UDP and the peer leaves the stream.
        peer.inner().on.store(false, Ordering::Relaxed);
        until_answer(&peer, hub_udp, |p| p.stats().returns == 1).await;
        assert_eq!(peer.hub_links(), vec![(hub_udp, None)]);
        // The hub drops the connection the peer closed (checked every
        // 10 ms, for at most 2 s).
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let closed = async {
            while hub.stats().open != 0 {
                tick.tick().await;
            }
        };
        let r = tokio::time::timeout(Duration::from_secs(2), closed).await;
        assert!(r.is_ok(), "{:?}", hub.stats());
    }

    #[tokio::test]
    async fn a_peer_falls_back_to_tcp_and_returns_to_udp() {
        falls_back_and_returns(false).await;
    }

    #[tokio::test]
    async fn a_peer_falls_back_to_tls_and_returns_to_udp() {
        falls_back_and_returns(true).await;
    }

    #[tokio::test]
    async fn a_dead_target_is_skipped_for_the_next() {
        let (_hub, hub_udp, tcp) = echo_hub(None).await;
        // A port nobody listens on first.
        let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead_addr = dead.local_addr().unwrap();
        drop(dead);
        let peer = Streamed::new(Firewalled {
            sock: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            blocked: hub_udp,
            on: AtomicBool::new(true),
        });
        peer.set_fallback_config(FallbackConfig {
            never_heard: Duration::from_millis(100),
            redial: Duration::from_millis(50),
            ..FallbackConfig::default()
        });
        peer.set_hubs(vec![HubRoute {
            udp: hub_udp,
            targets: vec![Target::Tcp(dead_addr), Target::Tcp(tcp)],
        }]);
        until_answer(&peer, hub_udp, |_| true).await;
        let s = peer.stats();
        assert_eq!((s.dial_failed, s.fallbacks), (1, 1), "{s:?}");
    }

    #[tokio::test]
    async fn garbage_and_unknown_stream_addresses_are_dropped_not_fatal() {
        let (hub, _udp, tcp) = echo_hub(None).await;
        // A frame for a stream address with no connection: counted.
        hub.try_send_to(b"x", stream_addr(999, 1)).unwrap();
        assert_eq!(hub.stats().dropped, 1);
        assert!(is_stream_addr(&stream_addr(7, 443)));
        assert!(!is_stream_addr(&"[2001:db8::1]:4800".parse().unwrap()));
        assert!(!is_stream_addr(&"10.0.0.1:4800".parse().unwrap()));
        // A TLS client at a plain listener and random bytes: the listener
        // carries on and still serves a real client afterwards.
        use tokio::io::AsyncWriteExt;
        let mut s = TcpStream::connect(tcp).await.unwrap();
        s.write_all(&[0xff; 3000]).await.unwrap();
        drop(s);
        let peer = Streamed::new(Firewalled {
            sock: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            blocked: _udp,
            on: AtomicBool::new(true),
        });
        peer.set_fallback_config(FallbackConfig {
            never_heard: Duration::from_millis(100),
            ..FallbackConfig::default()
        });
        peer.set_hubs(vec![HubRoute {
            udp: _udp,
            targets: vec![Target::Tcp(tcp)],
        }]);
        until_answer(&peer, _udp, |_| true).await;
    }
}
