//! Session settings: the KCP preset, which packets use KCP, sizes and timers.

use crate::wire;
use std::time::Duration;

/// KCP tuning presets. Parameters: (nodelay, flush interval ms, fast-resend
/// threshold in duplicate acks, minimum RTO ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KcpProfile {
    /// Conservative: (false, 40, 0, 100). RTO doubles on each loss, no fast resend.
    Normal,
    /// Default: (true, 20, 2, 30). RTO grows by half, fast resend after 2 acks.
    #[default]
    Fast,
    /// Lowest latency: (true, 10, 1, 10). Resends after one out-of-order ack.
    Turbo,
}

impl KcpProfile {
    /// (nodelay, interval ms, fast resend, min RTO ms).
    pub fn params(self) -> (bool, u32, u32, u32) {
        match self {
            KcpProfile::Normal => (false, 40, 0, 100),
            KcpProfile::Fast => (true, 20, 2, 30),
            KcpProfile::Turbo => (true, 10, 1, 10),
        }
    }

    /// All profiles, for benchmarks.
    pub const ALL: [KcpProfile; 3] = [KcpProfile::Normal, KcpProfile::Fast, KcpProfile::Turbo];
}

impl std::str::FromStr for KcpProfile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "normal" => Ok(KcpProfile::Normal),
            "fast" => Ok(KcpProfile::Fast),
            "turbo" => Ok(KcpProfile::Turbo),
            o => Err(format!("unknown KCP profile {o:?} (normal, fast, turbo)")),
        }
    }
}

/// Which inner packets use KCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FlowMode {
    /// TCP flows each get a KCP conversation; everything else is a datagram.
    #[default]
    Auto,
    /// Everything reliable: TCP per flow, other packets share one conversation.
    AllKcp,
    /// Everything as datagrams (the inner transports recover on their own).
    AllDatagram,
}

/// Session settings. Durations are wall-clock spans; sizes are bytes.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// KCP preset.
    pub profile: KcpProfile,
    /// Which packets use KCP.
    pub flow_mode: FlowMode,
    /// Largest UDP payload to send (1452 fits a 1500-byte path over IPv6).
    pub path_mtu: usize,
    /// Most KCP conversations this side opens (flows beyond share one).
    pub max_convs: usize,
    /// A conversation idle this long with nothing unacknowledged is closed.
    pub conv_idle: Duration,
    /// KCP receive window in segments (bounds memory per conversation).
    pub rcv_wnd: u16,
    /// Ping interval when idle; also the keepalive interval.
    pub keepalive: Duration,
    /// Accept flow and stream conversations the remote opens. Hubs do not
    /// (they carry no inner traffic of their own; a member's session with a
    /// hub is its control conversation and relayed frames), which bounds
    /// what a member can make a hub hold: see docs/security.md.
    pub remote_flows: bool,
    /// Search each session's path MTU as soon as it is up (peers), or only
    /// once this side sends data on it (a hub, whose sessions carry control
    /// messages and frames it relays without reading).
    pub pmtu_at_start: bool,
    /// Silence after which the link is declared dead.
    pub dead_after: Duration,
    /// First handshake retry delay (doubles up to 8x).
    pub handshake_retry: Duration,
    /// IP packets held while no session exists.
    pub max_pending: usize,
    /// Packets a KCP conversation may hold unsent before new ones are dropped.
    pub max_backlog: usize,
    /// Rate cap for the controller, bytes/s.
    pub max_rate: f64,
    /// Session keys are replaced by a new handshake after this long...
    pub rekey_after: Duration,
    /// ...or after this many frames sent under them, whichever comes first.
    pub rekey_after_messages: u64,
    /// Forward error correction for KCP data frames when the path loses
    /// packets (see `session::fec`).
    pub fec: bool,
    /// After a rotation, frames under the previous keys are accepted this
    /// long (they may still be in flight), then refused.
    pub old_key_window: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            profile: KcpProfile::Fast,
            flow_mode: FlowMode::Auto,
            path_mtu: 1452,
            max_convs: 256,
            conv_idle: Duration::from_secs(60),
            rcv_wnd: 4096,
            keepalive: Duration::from_secs(5),
            remote_flows: true,
            pmtu_at_start: true,
            dead_after: Duration::from_secs(20),
            handshake_retry: Duration::from_secs(1),
            max_pending: 256,
            max_backlog: 4096,
            max_rate: 2.5e9 / 8.0 * 4.0,
            rekey_after: Duration::from_secs(120),
            rekey_after_messages: 1 << 40,
            fec: true,
            old_key_window: Duration::from_secs(10),
        }
    }
}

impl SessionConfig {
    /// A hub's sessions: the defaults, without conversations opened by
    /// members (only the control conversation).
    pub fn hub() -> SessionConfig {
        SessionConfig {
            remote_flows: false,
            pmtu_at_start: false,
            ..SessionConfig::default()
        }
    }

    /// Largest plaintext (inner type byte + payload) that fits `path_mtu`.
    /// A hub relaying the frame adds [`wire::RELAY_OVERHEAD`]; the sockets let
    /// the kernel fragment such frames rather than reserve room in every
    /// frame (which cost a third of the throughput in the namespace bench).
    pub fn plain_budget(&self) -> usize {
        self.path_mtu - wire::DATA_OVERHEAD
    }

    /// Largest inner IP packet that never needs more than one UDP datagram,
    /// on either path (datagram: 1 type byte; KCP: plus a 24-byte segment
    /// header and room for the FEC wrapping, [`super::fec::FEC_RESERVE`]).
    /// This is the TUN MTU to configure.
    pub fn tun_mtu(&self) -> usize {
        self.plain_budget() - 1 - kcp::KCP_OVERHEAD - super::fec::FEC_RESERVE
    }
}
