//! Sessions between two nodes wired back to back with a fake clock: no
//! sockets, no runtime, every frame visible.

use crate::crypto::{EntropySource, StaticKeypair};
use crate::driver::Driver;
use crate::node::{Node, NodeConfig};
use crate::session::Event;
use crate::wire::PublicKey;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

const WALL: u64 = 1_700_000_000_000;

#[derive(Default)]
struct Out {
    frames: Vec<(SocketAddr, Vec<u8>)>,
    rx: Vec<(PublicKey, Vec<u8>)>,
    events: Vec<(PublicKey, Event)>,
}

impl Driver for Out {
    fn transmit(&mut self, to: SocketAddr, frame: &[u8]) -> bool {
        self.frames.push((to, frame.to_vec()));
        true
    }
    fn deliver(&mut self, from: &PublicKey, pkt: Vec<u8>) {
        self.rx.push((*from, pkt));
    }
    fn event(&mut self, peer: PublicKey, _ep: Option<SocketAddr>, event: Event) {
        self.events.push((peer, event));
    }
}

struct Side {
    node: Node,
    addr: SocketAddr,
    out: Out,
}

fn side(key_seed: u64, entropy: u64, addr: &str, now: Duration) -> Side {
    Side {
        node: Node::new(
            NodeConfig::default(),
            StaticKeypair::from_seed(key_seed),
            [3; 32],
            WALL + now.as_millis() as u64,
            EntropySource::seeded(entropy),
        ),
        addr: addr.parse().unwrap(),
        out: Out::default(),
    }
}

/// A hub: its session settings, admitting any node with the network key.
fn hub_side(now: Duration) -> Side {
    Side {
        node: Node::new(
            NodeConfig {
                session: crate::SessionConfig::hub(),
                admission: crate::node::Admission::AnyWithNetworkKey,
                ..NodeConfig::default()
            },
            StaticKeypair::from_seed(2),
            [3; 32],
            WALL + now.as_millis() as u64,
            EntropySource::seeded(99),
        ),
        addr: "192.0.2.2:4000".parse().unwrap(),
        out: Out::default(),
    }
}

/// A member (A) and its hub, the member knowing the hub's address.
fn member_and_hub(now: Duration) -> (Side, Side, PublicKey) {
    let mut a = side(1, 7, "192.0.2.1:4000", now);
    let hub = hub_side(now);
    let kh = *hub.node.public_key();
    a.node.add_peer(kh, Some(hub.addr));
    (a, hub, kh)
}

/// Both poll sequences, frames handed across, until nothing moves. Every
/// frame `a` sends is also appended to `seen`.
fn pump(a: &mut Side, b: &mut Side, now: Duration, seen: &mut Vec<Vec<u8>>) {
    loop {
        a.node.service(now, &mut a.out);
        b.node.service(now, &mut b.out);
        let fa = std::mem::take(&mut a.out.frames);
        let fb = std::mem::take(&mut b.out.frames);
        if fa.is_empty() && fb.is_empty() {
            return;
        }
        for (_, mut f) in fa {
            seen.push(f.clone());
            b.node.handle_datagram(now, a.addr, &mut f);
        }
        for (_, mut f) in fb {
            a.node.handle_datagram(now, b.addr, &mut f);
        }
    }
}

fn tcp(i: u32) -> Vec<u8> {
    let (s, d) = (Ipv4Addr::new(10, 1, 0, 1), Ipv4Addr::new(10, 1, 0, 2));
    crate::ip::build_v4(s, d, crate::ip::PROTO_TCP, 4000, 80, &i.to_le_bytes(), 200)
}

/// A and B knowing each other, A's handshake started.
fn connecting(a_entropy: u64, now: Duration) -> (Side, Side) {
    let mut a = side(1, a_entropy, "192.0.2.1:4000", now);
    let mut b = side(2, 99, "192.0.2.2:4000", now);
    let (ka, kb) = (*a.node.public_key(), *b.node.public_key());
    a.node.add_peer(kb, Some(b.addr));
    b.node.add_peer(ka, Some(a.addr));
    a.node.connect(now, &kb).unwrap();
    (a, b)
}

/// A and B established, with one TCP flow (a KCP conversation) from A.
fn established(a_entropy: u64, now: Duration) -> (Side, Side, Vec<Vec<u8>>) {
    let (mut a, mut b) = connecting(a_entropy, now);
    let kb = *b.node.public_key();
    let mut seen = Vec::new();
    pump(&mut a, &mut b, now, &mut seen);
    a.node.send_ip(now, &kb, &tcp(0)).unwrap();
    pump(&mut a, &mut b, now + Duration::from_millis(30), &mut seen);
    (a, b, seen)
}

fn restarts(s: &Side) -> usize {
    s.out
        .events
        .iter()
        .filter(|(_, e)| *e == Event::PeerRestarted)
        .count()
}

#[test]
fn handshake_then_a_tcp_flow_gets_its_own_conversation() {
    let (a, b, _) = established(7, Duration::ZERO);
    let ka = *a.node.public_key();
    let s = b.node.session(&ka).unwrap();
    assert!(s.is_established());
    assert_eq!(b.out.rx.len(), 1, "the TCP segment arrived");
    assert_eq!(b.out.rx[0].1, tcp(0));
    // The flow's conversation and the control conversation.
    assert!(s.stats().convs >= 1, "{:?}", s.stats());
}

#[test]
fn a_replayed_initiation_from_an_earlier_incarnation_changes_nothing() {
    // A's first life: capture its handshake initiation.
    let t0 = Duration::from_secs(1);
    let (a_old, _, seen) = established(7, t0);
    let init = seen
        .iter()
        .find(|f| {
            f.len() == crate::wire::INIT_FRAME_LEN && f[1] == crate::wire::TYPE_HANDSHAKE_INIT
        })
        .expect("A sent an initiation")
        .clone();
    drop(a_old);

    // A restarts (same key, new incarnation) and talks to a B that knew
    // nothing of the first life; B's conversation with the new A is open.
    let t1 = Duration::from_secs(5);
    let (mut a, mut b, _) = established(8, t1);
    let ka = *a.node.public_key();
    let kb = *b.node.public_key();
    let convs = b.node.session(&ka).unwrap().stats().convs;
    let path = b.node.session(&ka).unwrap().path();
    let handshakes = b.node.session(&ka).unwrap().stats().handshakes;
    assert_eq!(restarts(&b), 0);

    // Someone replays the old initiation from elsewhere.
    let attacker: SocketAddr = "203.0.113.9:666".parse().unwrap();
    let t2 = t1 + Duration::from_millis(100);
    let mut f = init.clone();
    b.node.handle_datagram(t2, attacker, &mut f);
    b.node.service(t2, &mut b.out);
    let answers: Vec<_> = std::mem::take(&mut b.out.frames);
    let s = b.node.session(&ka).unwrap();
    assert_eq!(restarts(&b), 0, "no restart was reported");
    assert_eq!(s.stats().convs, convs, "conversations kept");
    assert_eq!(s.path(), path, "path kept");
    assert_eq!(s.stats().handshakes, handshakes);
    assert!(
        answers.iter().all(|(to, _)| *to != attacker),
        "nothing answered to the replayer"
    );

    // And the session goes on: the next TCP segment arrives.
    let before = b.out.rx.len();
    a.node.send_ip(t2, &kb, &tcp(1)).unwrap();
    pump(
        &mut a,
        &mut b,
        t2 + Duration::from_millis(30),
        &mut Vec::new(),
    );
    assert_eq!(b.out.rx.len(), before + 1);
}

#[test]
fn a_genuine_restart_resets_conversations_once_the_new_keys_are_used() {
    let t0 = Duration::from_secs(1);
    let (_a_old, mut b, _) = established(7, t0);
    let ka = StaticKeypair::from_seed(1).public;
    let kb = *b.node.public_key();
    assert!(b.node.session(&ka).unwrap().stats().convs >= 1);
    // A comes back with a new incarnation and a later clock.
    let t1 = Duration::from_secs(3);
    let mut a = side(1, 8, "192.0.2.1:4000", t1);
    a.node.add_peer(kb, Some(b.addr));
    a.node.connect(t1, &kb).unwrap();
    // The initiation alone changes nothing yet...
    a.node.service(t1, &mut a.out);
    for (_, mut f) in std::mem::take(&mut a.out.frames) {
        b.node.handle_datagram(t1, a.addr, &mut f);
    }
    b.node.service(t1, &mut b.out);
    assert_eq!(
        restarts(&b),
        0,
        "not before the initiator proves it is live"
    );
    // ...its first frame under the new keys does.
    for (_, mut f) in std::mem::take(&mut b.out.frames) {
        a.node.handle_datagram(t1, b.addr, &mut f);
    }
    pump(&mut a, &mut b, t1, &mut Vec::new());
    assert_eq!(restarts(&b), 1);
    a.node.send_ip(t1, &kb, &tcp(5)).unwrap();
    let before = b.out.rx.len();
    pump(
        &mut a,
        &mut b,
        t1 + Duration::from_millis(30),
        &mut Vec::new(),
    );
    assert_eq!(
        b.out.rx.len(),
        before + 1,
        "a new flow works after the reset"
    );
}

/// Deliver `frames` from `from` to `to` at `now`.
fn deliver(to: &mut Side, from: SocketAddr, now: Duration, frames: Vec<(SocketAddr, Vec<u8>)>) {
    for (_, mut f) in frames {
        to.node.handle_datagram(now, from, &mut f);
    }
}

#[test]
fn crossed_initiations_leave_both_sides_on_the_same_keys() {
    // A accepts B's initiation (keys K1, unconfirmed at A) and then starts
    // its own (K2) before anything under K1 arrived; B completes K1, then
    // accepts A's. A gets B's answer for K2 first and a frame B sent under
    // K1 after it. A must stay on K2 (the newer keys, which B takes up on
    // A's next frame): were it to go back to K1 while B moves to K2, each
    // side would drop the other's keys after the old-key window and the
    // pair would be deaf both ways.
    let t0 = Duration::from_secs(1);
    let (mut a, mut b, _) = established(7, t0);
    let (ka, kb) = (*a.node.public_key(), *b.node.public_key());
    let t1 = Duration::from_secs(2);
    b.node.connect(t1, &ka).unwrap();
    b.node.service(t1, &mut b.out);
    deliver(&mut a, b.addr, t1, std::mem::take(&mut b.out.frames));
    a.node.service(t1, &mut a.out);
    let k1_answer = std::mem::take(&mut a.out.frames);
    a.node.connect(t1, &kb).unwrap();
    a.node.service(t1, &mut a.out);
    let k2_init = std::mem::take(&mut a.out.frames);
    // B: K1 completes (B confirms it with a frame under K1), then A's
    // initiation is accepted (B answers it).
    deliver(&mut b, a.addr, t1, k1_answer);
    b.node.service(t1, &mut b.out);
    let k1_confirm = std::mem::take(&mut b.out.frames);
    deliver(&mut b, a.addr, t1, k2_init);
    b.node.service(t1, &mut b.out);
    let k2_answer: Vec<_> = std::mem::take(&mut b.out.frames)
        .into_iter()
        .filter(|(_, f)| f[1] == crate::wire::TYPE_HANDSHAKE_RESP)
        .collect();
    assert_eq!(k2_answer.len(), 1, "B answered A's initiation");
    // A: the answer for K2 first, then B's frame under K1.
    deliver(&mut a, b.addr, t1, k2_answer);
    a.node.service(t1, &mut a.out);
    deliver(&mut a, b.addr, t1, k1_confirm);
    pump(&mut a, &mut b, t1, &mut Vec::new());
    // Past the old-key window, both directions keep carrying packets.
    let (rx_a, rx_b) = (a.out.rx.len(), b.out.rx.len());
    let mut now = t1;
    for i in 0..30 {
        now += Duration::from_secs(1);
        a.node.send_ip(now, &kb, &tcp(100 + i)).unwrap();
        b.node.send_ip(now, &ka, &tcp(200 + i)).unwrap();
        pump(&mut a, &mut b, now, &mut Vec::new());
        pump(
            &mut a,
            &mut b,
            now + Duration::from_millis(30),
            &mut Vec::new(),
        );
    }
    assert_eq!(b.out.rx.len(), rx_b + 30, "A to B after the crossing");
    assert_eq!(a.out.rx.len(), rx_a + 30, "B to A after the crossing");
}

#[test]
fn a_hub_holds_no_conversations_its_members_open() {
    // A member's TCP flows toward a hub would each open a KCP conversation
    // there (up to 1,536 per member, 4,096-segment windows): a hub refuses
    // them and keeps only the control conversation.
    let now = Duration::from_secs(1);
    let mut a = side(1, 7, "192.0.2.1:4000", now);
    let mut hub = hub_side(now);
    let kh = *hub.node.public_key();
    let ka = *a.node.public_key();
    a.node.add_peer(kh, Some(hub.addr));
    a.node.connect(now, &kh).unwrap();
    pump(&mut a, &mut hub, now, &mut Vec::new());
    // Control messages (conversation 0) go through.
    let hb = crate::wire::Control::Heartbeat {
        seq: 1,
        map_version: 0,
    };
    assert!(a.node.send_control_reliable(now, &kh, &hb));
    for i in 0..50u16 {
        let (s, d) = (Ipv4Addr::new(10, 1, 0, 1), Ipv4Addr::new(10, 1, 0, 2));
        let pkt = crate::ip::build_v4(s, d, crate::ip::PROTO_TCP, 5000 + i, 80, b"x", 200);
        a.node.send_ip(now, &kh, &pkt).unwrap();
    }
    for t in 0..20u64 {
        pump(
            &mut a,
            &mut hub,
            now + Duration::from_millis(10 * t),
            &mut Vec::new(),
        );
    }
    let convs = hub.node.session(&ka).unwrap().stats().convs;
    assert!(
        convs <= 1,
        "the hub holds {convs} conversations of the member"
    );
    assert!(
        hub.out
            .events
            .iter()
            .any(|(_, e)| matches!(e, Event::Control(crate::wire::Control::Heartbeat { .. }))),
        "the control message arrived"
    );
    assert!(hub.out.rx.is_empty(), "no inner packet was delivered");
}

/// A lost control segment is resent after the control conversation's
/// timeout floor (200 ms), not the data profile's 30 ms: a busy hub answers
/// late, and a short timeout made it resend everything in flight to every
/// member over and over.
#[test]
fn a_lost_control_segment_waits_for_the_control_timeout_floor() {
    let now = Duration::from_secs(10);
    let (mut a, mut b, _) = established(7, now);
    let kb = *b.node.public_key();
    let ka = *a.node.public_key();
    let retransmits = |a: &Side| a.node.session(&kb).unwrap().stats().retransmits;
    // Let the TCP flow's segment be acknowledged first, and the control
    // conversation measure a round trip of next to nothing (so its own
    // timeout would be as short as its floor lets it be).
    let mut seen = Vec::new();
    for t in 1..=50u64 {
        let at = now + Duration::from_millis(20 * t);
        if t % 5 == 0 && t <= 40 {
            let m = crate::wire::Control::Heartbeat {
                seq: t,
                map_version: 3,
            };
            assert!(a.node.send_control_reliable(at, &kb, &m));
        }
        pump(&mut a, &mut b, at, &mut seen);
    }
    let before = retransmits(&a);
    let sent = now + Duration::from_millis(1100);
    let hb = crate::wire::Control::Heartbeat {
        seq: 7,
        map_version: 3,
    };
    assert!(a.node.send_control_reliable(sent, &kb, &hb));
    // Everything A sends for the next 150 ms is lost.
    let mut later = 0;
    for t in 0..=15u64 {
        a.node
            .service(sent + Duration::from_millis(10 * t), &mut a.out);
        if t > 0 {
            later += a.out.frames.len();
        }
        a.out.frames.clear();
    }
    assert_eq!(retransmits(&a), before, "resent before the floor");
    // A control message is not data: it does not set the session pinging
    // every 10 ms as a transfer does (a hub pushing a change to every member
    // made every member session ping at that rate for a second).
    assert!(
        later <= 2,
        "{later} frames in the 150 ms after a control message"
    );
    for t in 16..=60u64 {
        pump(
            &mut a,
            &mut b,
            sent + Duration::from_millis(10 * t),
            &mut seen,
        );
    }
    assert!(retransmits(&a) > before, "never resent");
    assert!(
        b.out
            .events
            .iter()
            .any(|(k, e)| *k == ka && matches!(e, Event::Control(c) if *c == hb)),
        "the control message arrived in the end"
    );
}

#[test]
fn a_new_session_without_data_goes_quiet_once_its_path_is_measured() {
    // A node's clock starts near zero: a session that never carried data
    // once counted as busy until the clock passed one second, and pinged
    // every 10 ms until then (a hub admitting a thousand members at once
    // sent them a thousand pings a second each way).
    let now = Duration::ZERO;
    let (mut a, mut b) = connecting(7, now);
    let kb = *b.node.public_key();
    let mut seen = Vec::new();
    let mut settled_at = None;
    let mut after = 0;
    for t in 0..=150u64 {
        let at = Duration::from_millis(10 * t);
        let before = seen.len();
        pump(&mut a, &mut b, at, &mut seen);
        let st = a.node.session(&kb).expect("session").stats();
        if settled_at.is_none() && st.pmtu_settled {
            settled_at = Some(at);
        } else if settled_at.is_some() {
            after += seen.len() - before;
        }
    }
    // The path-MTU search (which pings busily: an unanswered probe counts
    // only if something else came back) settles at once on this path ...
    let settled_at = settled_at.expect("the path-MTU search settled");
    assert!(settled_at <= Duration::from_millis(200), "{settled_at:?}");
    // ... and then the session is quiet: no ping every 10 ms. Its only
    // other frames are the capacity trains a peer session sends once its
    // path is measured (here every answer comes in the same step, so no
    // train gives an estimate and all `TRAINS` go).
    let train = a.node.session(&kb).unwrap().stats().capacity_probes as usize;
    assert!(train > 0, "no capacity train");
    assert!(train <= (super::train::TRAINS * super::train::TRAIN_LEN) as usize);
    // Besides those, A answers B's trains. (The first trains may go in
    // the step that settled the search, before `after` counts.) Busy
    // pings would be over a hundred.
    let answers = b
        .node
        .session(a.node.public_key())
        .expect("session")
        .stats()
        .capacity_probes as usize;
    assert!(
        after <= 5 + train + answers,
        "{after} frames from A after {settled_at:?}, with trains of {train} and {answers} answers"
    );
}

#[test]
fn a_session_with_a_hub_searches_its_path_mtu_without_busy_pings() {
    // A session whose path-MTU search has not settled pings every 10-50 ms
    // (an unanswered probe counts against its size only if the path
    // answered something else meanwhile). 10,000 members doing that with
    // their hub while it admitted them kept the hub too busy to answer
    // their registrations (`hubload 10000`). A member's session with a hub
    // (a relay) carries control messages: it searches with its probes
    // alone, and the hub's answers to them are what comes back.
    let now = Duration::ZERO;
    let (mut a, mut b) = connecting(7, now);
    let kb = *b.node.public_key();
    a.node.set_relays(&[kb]);
    let mut seen = Vec::new();
    let mut after = 0;
    // Reliable control messages (a registration) change nothing.
    let m = crate::wire::Control::Heartbeat {
        seq: 1,
        map_version: 0,
    };
    for t in 0..=150u64 {
        let at = Duration::from_millis(10 * t);
        let before = seen.len();
        pump(&mut a, &mut b, at, &mut seen);
        if at > Duration::from_millis(200) {
            after += seen.len() - before;
        }
        if t % 50 == 25 {
            assert!(a.node.send_control_reliable(at, &kb, &m));
        }
    }
    let st = a.node.session(&kb).expect("session").stats();
    println!(
        "A: {after} frames after 200 ms, {} probes, settled {}",
        st.pmtu_probes, st.pmtu_settled
    );
    assert!(st.handshakes >= 1, "established");
    assert!(
        st.pmtu_settled && st.pmtu == 1452,
        "searched: {} {}",
        st.pmtu,
        st.pmtu_settled
    );
    // Besides its answers to B's capacity trains (B is a peer here, not a
    // hub: it sends them; A, with B as its hub, does not).
    let answers = b
        .node
        .session(a.node.public_key())
        .expect("session")
        .stats()
        .capacity_probes;
    assert_eq!(st.capacity_probes, 0);
    assert!(
        after <= 10 + answers as usize,
        "{after} frames from A in 1.3 s without data, {answers} of them answers"
    );
}

#[test]
fn control_messages_to_a_silent_peer_keep_a_small_window_in_flight() {
    // A hub pushing maps to a thousand members at once kept up to 128
    // control segments in flight to each, and when the members' acks were
    // lost in its own full receive buffer it sent them all again at every
    // timeout (`fastmesh-lab hubload 1000`: 460,000 datagrams in ten
    // seconds, joins of 80-220 s). What is resent while nothing comes back
    // is bounded by the control window, not by what is queued.
    let now = Duration::from_secs(10);
    let (mut a, mut b, _) = established(7, now);
    let kb = *b.node.public_key();
    let mut seen = Vec::new();
    pump(&mut a, &mut b, now + Duration::from_millis(50), &mut seen);
    let before = a.node.session(&kb).unwrap().stats().retransmits;
    let sent = now + Duration::from_millis(100);
    for seq in 0..200u64 {
        let m = crate::wire::Control::Heartbeat {
            seq,
            map_version: 3,
        };
        assert!(a.node.send_control_reliable(sent, &kb, &m));
    }
    // Nothing A sends arrives for two seconds.
    for t in 0..=200u64 {
        a.node
            .service(sent + Duration::from_millis(10 * t), &mut a.out);
        a.out.frames.clear();
    }
    let resent = a.node.session(&kb).unwrap().stats().retransmits - before;
    // Four or five timeouts (200 ms, then growing by half) in two seconds.
    println!("{resent} control segments resent");
    assert!(resent > 0, "nothing resent");
    assert!(resent <= 100, "{resent} control segments resent");
    // And once the path works again, everything arrives in order.
    for t in 201..=600u64 {
        pump(
            &mut a,
            &mut b,
            sent + Duration::from_millis(10 * t),
            &mut seen,
        );
    }
    let got: Vec<u64> = b
        .out
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::Control(crate::wire::Control::Heartbeat { seq, .. }) => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(got, (0..200).collect::<Vec<_>>());
}

#[test]
fn a_new_flows_first_frame_goes_twice_so_one_loss_costs_no_timeout() {
    // Whichever single frame A sends for a new flow is lost, B still gets
    // the flow's first packet at once instead of after KCP's initial
    // 200-ms timeout (the conversation has no round trip measured yet).
    let now = Duration::ZERO;
    let mut sent = None;
    for lost in 0.. {
        let (mut a, mut b) = connecting(7, now);
        let kb = *b.node.public_key();
        pump(&mut a, &mut b, now, &mut Vec::new());
        let t = now + Duration::from_millis(30);
        a.node.send_ip(t, &kb, &tcp(0)).unwrap();
        a.node.service(t, &mut a.out);
        let frames = std::mem::take(&mut a.out.frames);
        sent = Some(frames.len());
        if lost >= frames.len() {
            break;
        }
        for (i, (_, mut f)) in frames.into_iter().enumerate() {
            if i != lost {
                b.node.handle_datagram(t, a.addr, &mut f);
            }
        }
        b.node.service(t, &mut b.out);
        assert_eq!(b.out.rx.len(), 1, "frame {lost} of the flow's first lost");
        assert_eq!(b.out.rx[0].1, tcp(0));
        let st = a.node.session(&kb).unwrap().stats();
        assert_eq!(st.open_copies, 1, "{st:?}");
    }
    assert!(sent.is_some_and(|n| n >= 2), "{sent:?} frames");
}

/// Frames a member sends its hub over nine idle minutes, heartbeating it
/// every 10 s (the hub answering each), with the sessions told the
/// interval or not.
fn idle_member_frames(told: bool) -> usize {
    let hb = Duration::from_secs(10);
    let t0 = Duration::ZERO;
    let (mut a, mut b, kb) = member_and_hub(t0);
    let ka = *a.node.public_key();
    a.node.set_relays(&[kb]);
    if told {
        a.node.set_heartbeat(hb);
        b.node.set_heartbeat(hb);
    }
    a.node.connect(t0, &kb).unwrap();
    let mut seen = Vec::new();
    let mut from_a = 0;
    for t in 0..=60_000u64 {
        let at = Duration::from_millis(10 * t);
        if t == 100 {
            // A registration and its answer: the control conversation.
            let m = crate::wire::Control::Heartbeat {
                seq: 0,
                map_version: 0,
            };
            assert!(a.node.send_control_reliable(at, &kb, &m));
            assert!(b.node.send_control_reliable(at, &ka, &m));
        }
        if t % 1000 == 100 {
            let m = crate::wire::Control::Heartbeat {
                seq: t,
                map_version: 0,
            };
            assert!(a.node.send_control(&kb, &m));
            let m = crate::wire::Control::HeartbeatAck {
                seq: t,
                observed: a.addr,
                interval_ms: None,
            };
            assert!(b.node.send_control(&ka, &m));
        }
        let before = seen.len();
        pump(&mut a, &mut b, at, &mut seen);
        if at >= Duration::from_secs(60) {
            from_a += seen.len() - before;
        }
    }
    from_a
}

#[test]
fn heartbeats_are_the_keepalives_of_an_idle_session() {
    // With 10-s heartbeats, an idle session also sent a keepalive 5 s after
    // each one and pinged every 20 s: a hub's 10,000 members sent it 0.41
    // frames a second each, four times their heartbeats (`hubload`).
    let told = idle_member_frames(true);
    let untold = idle_member_frames(false);
    println!("member to hub in 540 idle s: {told} frames told the interval, {untold} not");
    // 54 heartbeats; the rest (pings and their answers, a keepalive after
    // a late heartbeat) at most a third as many.
    assert!(told <= 54 + 36, "{told} frames");
    assert!(untold >= told + 60, "without the interval: {untold}");
}

#[test]
fn a_member_gets_in_at_its_next_retry_once_its_hub_keeps_up() {
    // A hub swamped by a join drops initiations (its rate limit, a full
    // receive buffer) and answers the rest late. Its members back off to
    // one initiation per 8 s; once the hub answers within that, the next
    // one completes.
    let t0 = Duration::from_secs(1);
    let (mut a, mut hub, kh) = member_and_hub(t0);
    a.node.set_relays(&[kh]);
    a.node.connect(t0, &kh).unwrap();
    // The hub hears nothing for the first 10 s, then hears frames 1.5 s
    // after they left until 30 s, then at once.
    let mut in_flight: Vec<(Duration, Vec<u8>)> = Vec::new();
    let mut established_at = None;
    for t in 0..6000u64 {
        let now = t0 + Duration::from_millis(10 * t);
        let late = if now < Duration::from_secs(31) {
            Duration::from_millis(1500)
        } else {
            Duration::from_millis(5)
        };
        a.node.service(now, &mut a.out);
        for (_, f) in std::mem::take(&mut a.out.frames) {
            in_flight.push((now + late, f));
        }
        let (due, keep): (Vec<_>, Vec<_>) = in_flight.drain(..).partition(|(at, _)| *at <= now);
        in_flight = keep;
        for (_, mut f) in due {
            if now >= Duration::from_secs(11) || now < Duration::from_secs(2) {
                hub.node.handle_datagram(now, a.addr, &mut f);
            }
        }
        hub.node.service(now, &mut hub.out);
        for (_, mut f) in std::mem::take(&mut hub.out.frames) {
            a.node.handle_datagram(now, hub.addr, &mut f);
        }
        if established_at.is_none() && a.node.session(&kh).is_some_and(|s| s.is_established()) {
            established_at = Some(now);
        }
    }
    // Heard from 11 s on; the next retry within 8 s, answered 1.5 s late.
    assert!(
        established_at.is_some_and(|t| t <= Duration::from_secs(21)),
        "established at {established_at:?}; member {:?}; hub {:?}",
        a.node.stats(),
        hub.node.stats()
    );
}

#[test]
fn two_initiations_in_one_millisecond_still_complete() {
    // A retry and a restart by the owner in the same millisecond once
    // carried the same timestamp: the hub answered the first (already
    // replaced at the member) and refused the second as a replay, and the
    // member never got in (`hubload 10000`).
    let t0 = Duration::from_secs(1);
    let (mut a, mut hub, kh) = member_and_hub(t0);
    a.node.connect(t0, &kh).unwrap();
    a.node.service(t0, &mut a.out);
    a.node.connect(t0, &kh).unwrap();
    pump(&mut a, &mut hub, t0, &mut Vec::new());
    assert_eq!(hub.node.stats().init_refused, 0, "{:?}", hub.node.stats());
    assert!(a.node.session(&kh).unwrap().is_established());
}

#[test]
fn long_heartbeats_still_keep_nat_mappings_open() {
    // Told a 60-s heartbeat interval, a session still sends something at
    // least every 25 s (a NAT's UDP mapping commonly lasts 30 s), and does
    // not call its link dead between heartbeats.
    let t0 = Duration::ZERO;
    let (mut a, mut b, kb) = member_and_hub(t0);
    a.node.set_relays(&[kb]);
    a.node.set_heartbeat(Duration::from_secs(60));
    b.node.set_heartbeat(Duration::from_secs(60));
    a.node.connect(t0, &kb).unwrap();
    let mut seen = Vec::new();
    let (mut last, mut longest) = (Duration::ZERO, Duration::ZERO);
    for t in 0..=30_000u64 {
        let at = Duration::from_millis(10 * t);
        let before = seen.len();
        pump(&mut a, &mut b, at, &mut seen);
        if seen.len() > before {
            longest = longest.max(at - last);
            last = at;
        }
    }
    assert!(
        longest <= Duration::from_secs(25),
        "A silent for {longest:?}"
    );
    assert!(
        !a.out.events.iter().any(|(_, e)| *e == Event::DeadLink),
        "no dead link"
    );
}

/// A sends `n` TCP packets (a KCP flow) to B over a path that drops every
/// `drop_every`-th frame from A to B (none if 0); B's ack copies.
fn ack_copies_at_receiver(drop_every: usize, n: u32) -> u64 {
    let t0 = Duration::from_secs(1);
    let (mut a, mut b, _) = established(7, t0);
    let (ka, kb) = (*a.node.public_key(), *b.node.public_key());
    let mut sent = 0usize;
    for i in 0..n {
        let now = t0 + Duration::from_millis(i as u64);
        a.node.send_ip(now, &kb, &tcp(1000 + i)).unwrap();
        for _ in 0..4 {
            a.node.service(now, &mut a.out);
            for (_, mut f) in std::mem::take(&mut a.out.frames) {
                sent += 1;
                if drop_every == 0 || !sent.is_multiple_of(drop_every) {
                    b.node.handle_datagram(now, a.addr, &mut f);
                }
            }
            b.node.service(now, &mut b.out);
            for (_, mut f) in std::mem::take(&mut b.out.frames) {
                a.node.handle_datagram(now, b.addr, &mut f);
            }
        }
    }
    b.node.peer_stats(&ka).unwrap().ack_copies
}

#[test]
fn a_receiver_that_sees_loss_sends_its_acks_twice() {
    // B sends nothing but acks, so its rate controller has no loss of its
    // own to go by; the gaps in what it receives show the path loses frames.
    let lossy = ack_copies_at_receiver(10, 600);
    let clean = ack_copies_at_receiver(0, 600);
    println!("ack copies: {lossy} at 10% loss, {clean} without");
    assert!(lossy > 20, "{lossy}");
    assert_eq!(clean, 0);
}

/// Parity frames A sends for `n` packets of `size` bytes on one flow, 20 ms
/// apart, on a fresh session, and how many of A's frames were over 1,000
/// bytes.
fn parity_for_packets(n: u32, size: usize) -> (u64, usize) {
    let now = Duration::ZERO;
    let (mut a, mut b, _) = established(7, now);
    let kb = *b.node.public_key();
    let parity = |a: &Side| a.node.session(&kb).unwrap().stats().fec_parity;
    let before = parity(&a);
    let (s, d) = (Ipv4Addr::new(10, 1, 0, 1), Ipv4Addr::new(10, 1, 0, 2));
    let mut seen = Vec::new();
    for i in 1..=n {
        let t = now + Duration::from_millis(30 + 20 * u64::from(i));
        let p = crate::ip::build_v4(s, d, crate::ip::PROTO_TCP, 4000, 80, &i.to_le_bytes(), size);
        a.node.send_ip(t, &kb, &p).unwrap();
        pump(&mut a, &mut b, t, &mut seen);
        // The open group's window (at least 3 ms) has passed.
        pump(&mut a, &mut b, t + Duration::from_millis(10), &mut seen);
    }
    let big = seen.iter().filter(|f| f.len() > 1000).count();
    (parity(&a) - before, big)
}

#[test]
fn small_packets_get_a_copy_while_the_paths_loss_is_unmeasured() {
    // A new session's first messages on a lossy path: without parity each
    // loss costs a retransmission timeout, and later messages wait for it.
    let (small, _) = parity_for_packets(4, 200);
    assert!(small >= 4, "{small} parity frames for 4 small packets");
    // Once the loss is measured (none on this path), parity stops.
    let (many, _) = parity_for_packets(40, 200);
    assert!(many < 20, "{many} parity frames for 40 small packets");
    // Full-size packets (a flow that is not split) do not pay for a guess:
    // each goes once.
    let (_, big) = parity_for_packets(4, 1200);
    assert_eq!(big, 4);
}

#[test]
fn a_lone_small_frame_gets_its_parity_at_once() {
    // Nothing queued behind a message: its parity goes with it, not a
    // group window later (which each repaired message would wait).
    let now = Duration::ZERO;
    let (mut a, mut b, _) = established(7, now);
    let kb = *b.node.public_key();
    let parity = |a: &Side| a.node.session(&kb).unwrap().stats().fec_parity;
    let t = now + Duration::from_millis(50);
    // Whatever group the opening left has closed by now.
    pump(
        &mut a,
        &mut b,
        t - Duration::from_millis(5),
        &mut Vec::new(),
    );
    let before = parity(&a);
    a.node.send_ip(t, &kb, &tcp(1)).unwrap();
    pump(&mut a, &mut b, t, &mut Vec::new());
    assert!(
        parity(&a) > before,
        "no parity at the instant the message went"
    );
}

/// A bulk stream's timeout outlasts the round trip of the last segment of a
/// full window, which is as much as the rate controller lets into flight
/// (twice the bandwidth-delay product: up to one BDP of it waits in the
/// bottleneck's queue). A shorter timeout resends, with nothing lost,
/// whatever sits behind a queue the controller itself built.
#[test]
fn a_bulk_timeout_outlasts_the_queue_a_full_window_builds() {
    for rtt_ms in [10u64, 50, 200] {
        let mut cc = crate::cc::RateControl::new(1e6, 1e9);
        cc.on_rtt(Duration::from_secs(1), Duration::from_millis(rtt_ms));
        // At the rate the window is sized for, its last byte is sent this
        // long after its first: the round trip of the last segment.
        let full_window_rtt_ms = cc.inflight_cap() / 1e6 * 1e3;
        let floor = super::mux::bulk_rto_floor(cc.min_rtt());
        assert!(
            f64::from(floor) > full_window_rtt_ms,
            "{rtt_ms} ms path: timeout floor {floor} ms, full window {full_window_rtt_ms:.0} ms"
        );
    }
}
