use sim::des::pair;
use sim::traffic::{self, Kind};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;
use transport::impair::LinkSpec;
use transport::NodeConfig;

#[test]
fn smoke() {
    let (mut net, _ka, kb) = pair(1, NodeConfig::default(), LinkSpec::latency(Duration::from_millis(10)));
    let (a, b) = (Ipv4Addr::new(10, 9, 0, 1), Ipv4Addr::new(10, 9, 0, 2));
    for i in 0..100u32 {
        let at = Duration::from_millis(i as u64);
        net.send_at(at, 0, kb, traffic::packet(a, b, Kind::Tcp, 1, i, 500));
        net.send_at(at, 0, kb, traffic::packet(a, b, Kind::Udp, 2, i, 300));
    }
    net.run_until(Duration::from_secs(5));
    let rx: Vec<Vec<u8>> = net.node(1).rx.iter().map(|d| d.pkt.clone()).collect();
    let s = traffic::verify(rx, &BTreeMap::from([(1, 100)])).unwrap();
    println!("{s:?} events {:?}", net.node(1).events);
    assert_eq!(s.udp, 100);
}
