//! Path MTU discovery over simulated links whose MTU is below 1500 bytes
//! (the discrete-event network drops larger don't-fragment probes and
//! carries other large datagrams as two fragments, each subject to loss).

use sim::des::{establish, pair_idle_with, Net};
use sim::impair::LinkSpec;
use sim::tcp_host::{start_transfer, TcpHost, HOST_A, HOST_B};
use std::cell::Cell;
use std::net::Ipv4Addr;
use std::rc::Rc;
use std::time::Duration;
use transport::wire::PublicKey;
use transport::{ip, NodeConfig};

/// UDP payload of a 1280-byte IPv4 path, and of a 1420-byte one.
const V4_1280: usize = 1280 - 28;
const V4_1420: usize = 1420 - 28;

fn cfg(split: bool) -> NodeConfig {
    sim::tcp_host::node_config(split)
}

fn link() -> LinkSpec {
    LinkSpec::latency(Duration::from_millis(15)).with_rate(50_000_000, 400_000)
}

/// Two nodes over `link()` whose MTU is `mtu` both ways from the start,
/// session up, TCP hosts attached.
fn lab(seed: u64, mtu: Option<usize>, split: bool) -> (Net, PublicKey, PublicKey) {
    let (mut net, ka, kb) = pair_idle_with(seed, cfg(split), cfg(split), link());
    net.set_mtu(0, 1, mtu, true);
    net.set_mtu(1, 0, mtu, true);
    establish(&mut net, ka, kb);
    let tun = net.node(0).node.session_config().tun_mtu();
    net.attach_host(0, TcpHost::new(HOST_A, tun, 4 << 20));
    net.attach_host(1, TcpHost::new(HOST_B, tun, 4 << 20));
    net.route(HOST_B, kb);
    net.route(HOST_A, ka);
    (net, ka, kb)
}

/// Frames on the wire (both ways) larger than `limit`, counted from now on.
fn count_oversize(net: &mut Net, limit: usize) -> Rc<Cell<u64>> {
    let n = Rc::new(Cell::new(0));
    let c = n.clone();
    net.set_tap(Box::new(move |_, _, d| {
        if d.len() > limit {
            c.set(c.get() + 1);
        }
        true
    }));
    n
}

fn settled(net: &Net, i: usize, k: &PublicKey) -> (usize, bool) {
    let s = net.node(i).node.session(k).expect("session").stats();
    (s.pmtu, s.pmtu_settled)
}

/// Goodput in Mbit/s of a checksummed 8 MB transfer.
fn transfer(net: &mut Net) -> f64 {
    let (st, snd, bps) = sim::tcp_host::transfer(net, 8 << 20, 5001, Duration::from_secs(60));
    assert!(!snd.refused && !snd.reset, "{snd:?}");
    assert_eq!(st.read, 8 << 20, "every byte");
    assert!(!st.corrupt, "in order, intact");
    assert!(st.fin_at.is_some());
    bps / 1e6
}

#[test]
fn frames_fit_a_narrow_path_from_the_start() {
    for split in [false, true] {
        let (mut net, _, _) = lab(1, None, split);
        net.run_for(Duration::from_secs(1));
        let full = transfer(&mut net);
        for path in [V4_1280, V4_1420] {
            let (mut net, ka, kb) = lab(2, Some(path), split);
            net.run_for(Duration::from_secs(1));
            for (i, k) in [(0, kb), (1, ka)] {
                let (m, ok) = settled(&net, i, &k);
                assert!(ok, "search settled");
                assert!(m <= path && m + 16 >= path, "path {path}: settled at {m}");
            }
            let big = count_oversize(&mut net, path);
            let rate = transfer(&mut net);
            println!(
                "split {split}, path {path}: {rate:.1} Mbit/s, full-size path {full:.1}, \
                 frames over the MTU {}",
                big.get()
            );
            assert!(rate >= 0.5 * full, "{rate} vs {full}");
            // Nothing needs fragmenting once the size is known.
            assert_eq!(big.get(), 0, "frames larger than the path");
            if !split {
                let s = net.node(0).node.session(&kb).unwrap().stats();
                let t = net.node(1).node.session(&ka).unwrap().stats();
                assert!(
                    s.mss_clamped >= 1 && t.mss_clamped >= 1,
                    "SYN and SYN-ACK clamped"
                );
            }
        }
    }
}

#[test]
fn a_path_that_narrows_during_a_transfer_is_found_and_the_transfer_finishes() {
    // A router that fragments what no longer fits, and a link that drops it.
    for fragment in [true, false] {
        narrows_during_a_transfer(fragment);
    }
}

fn narrows_during_a_transfer(fragment: bool) {
    let (mut net, ka, kb) = lab(3, None, false);
    net.run_for(Duration::from_secs(1));
    assert_eq!(settled(&net, 0, &kb).0, 1452);
    // 20 MB at 10 Mbit/s: about 17 s, longer than a confirmation period.
    net.set_link(0, 1, link().with_rate(10_000_000, 100_000));
    let (k, _) = start_transfer(&mut net, 20 << 20, 5002);
    net.run_for(Duration::from_secs(2));
    // The path's MTU drops to 1280 both ways.
    net.set_mtu(0, 1, Some(V4_1280), fragment);
    net.set_mtu(1, 0, Some(V4_1280), fragment);
    let limit = net.now() + Duration::from_secs(90);
    while net.now() < limit && net.host(1).apps[k].stats.fin_at.is_none() {
        net.run_for(Duration::from_millis(100));
    }
    let st = net.host(1).apps[k].stats.clone();
    assert_eq!(st.read, 20 << 20, "every byte");
    assert!(!st.corrupt && st.fin_at.is_some());
    // The sender (the receiver sends only small acks, so it has nothing to
    // confirm: its large frames, if any, would still arrive fragmented).
    let s = net.node(0).node.session(&kb).unwrap().stats();
    let r = net.node(1).node.session(&ka).unwrap().stats();
    println!(
        "fragmenting link {fragment}: sender frame size {} settled {} black holes {}, \
         plaintexts sent in fragments {}, joined {}",
        s.pmtu, s.pmtu_settled, s.pmtu_black_holes, s.frag_tx, r.frag_rx
    );
    if !fragment {
        // Segments cut before the drop could only get through in pieces.
        assert!(s.frag_tx > 0 && r.frag_rx > 0);
    }
    assert!(
        s.pmtu_black_holes >= 1,
        "the sender saw its size stop working"
    );
    assert!(s.pmtu <= V4_1280 && s.pmtu + 16 >= V4_1280, "{}", s.pmtu);
}

#[test]
fn a_datagram_larger_than_the_path_still_arrives_and_its_sender_learns_the_size() {
    let (mut net, ka, kb) = pair_idle_with(4, cfg(false), cfg(false), link());
    net.set_mtu(0, 1, Some(V4_1280), true);
    net.set_mtu(1, 0, Some(V4_1280), true);
    establish(&mut net, ka, kb);
    net.run_for(Duration::from_secs(1));
    let a = Ipv4Addr::new(10, 0, 0, 1);
    let b = Ipv4Addr::new(10, 0, 0, 2);
    let size = net.node(0).node.session_config().tun_mtu();
    let mut df = ip::build_v4(a, b, ip::PROTO_UDP, 4000, 53, b"big", size);
    df[6] = 0x40;
    let plain = ip::build_v4(a, b, ip::PROTO_UDP, 4000, 54, b"big", size);
    let now = net.now();
    net.send_at(now, 0, kb, df.clone());
    net.send_at(now + Duration::from_millis(200), 0, kb, plain.clone());
    net.run_for(Duration::from_secs(1));
    let got: Vec<&Vec<u8>> = net.node(1).rx.iter().map(|d| &d.pkt).collect();
    assert!(got.contains(&&df), "the DF datagram arrived (fragmented)");
    assert!(got.contains(&&plain), "the other one too");
    // Back at the sender: one ICMP "fragmentation needed" for the DF one
    // only, from the destination, with the size that fits.
    let icmp: Vec<&Vec<u8>> = net
        .node(0)
        .rx
        .iter()
        .map(|d| &d.pkt)
        .filter(|p| p.len() > 28 && p[9] == 1 && p[20] == 3 && p[21] == 4)
        .collect();
    assert_eq!(icmp.len(), 1, "{icmp:?}");
    let mtu = u16::from_be_bytes([icmp[0][26], icmp[0][27]]) as usize;
    assert!(mtu < size && mtu > 1100, "{mtu}");
    assert_eq!(&icmp[0][12..16], &b.octets(), "from the destination");
    assert_eq!(&icmp[0][44..48], &b.octets(), "quoting the packet");
    let s = net.node(0).node.session(&kb).unwrap().stats();
    assert_eq!(s.too_big_sent, 1);
}

#[test]
fn a_path_that_carries_only_small_frames_is_reported() {
    let (mut net, _ka, kb) = lab(5, None, false);
    net.run_for(Duration::from_secs(1));
    let (k, _) = start_transfer(&mut net, 20 << 20, 5003);
    net.run_for(Duration::from_millis(500));
    // Nothing above 400 bytes passes any more, fragments neither.
    net.set_mtu(0, 1, Some(400), false);
    net.set_mtu(1, 0, Some(400), false);
    net.run_for(Duration::from_secs(5));
    let s = net.node(0).node.session(&kb).unwrap().stats();
    println!(
        "black holes {}, frame size {}, read {}",
        s.pmtu_black_holes,
        s.pmtu,
        net.host(1).apps[k].stats.read
    );
    assert!(s.pmtu_black_holes >= 1, "the full size stopped working");
    // Not even base-size frames pass: the direct path counts as losing all
    // data (with a hub, traffic moves to the relay: the namespace test
    // `a_direct_path_that_drops_large_frames_is_left_for_the_relay`).
    assert!(s.pmtu_base_fails >= 1, "not even 1232 bytes pass");
}
