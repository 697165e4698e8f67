//! Path probing between two nodes (sans-IO, discrete-event network).

use sim::des::pair;
use sim::impair::LinkSpec;
use std::time::Duration;
use transport::path::Via;
use transport::NodeConfig;

#[test]
fn direct_probes_are_answered_and_a_silent_relay_is_not_chosen() {
    let (mut net, ka, kb) = pair(
        3,
        NodeConfig::default(),
        LinkSpec::latency(Duration::from_millis(10)),
    );
    // A relay that does not exist: its probes go nowhere.
    let ghost = [9u8; 32];
    net.node_mut(0).node.set_relays(&[ghost]);
    net.node_mut(1).node.set_relays(&[ghost]);
    net.run_for(Duration::from_secs(10));
    for (i, k) in [(0, kb), (1, ka)] {
        let s = net.node(i).node.session(&k).unwrap();
        let direct = s
            .paths()
            .stats()
            .iter()
            .find(|p| matches!(p.via, Via::Direct(_)))
            .unwrap()
            .clone();
        assert!(direct.streak >= 5, "{:?}", s.paths());
        let rtt = direct.srtt.unwrap();
        assert!(
            rtt >= Duration::from_millis(20) && rtt < Duration::from_millis(30),
            "{rtt:?}"
        );
        assert!(matches!(s.path(), Some(Via::Direct(_))), "{:?}", s.paths());
    }
}
