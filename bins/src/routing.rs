//! Subnet routes (site to site) on the host: the subnets other members
//! advertise are routed into the mesh's TUN device with `ip route`, and a
//! node that advertises subnets is checked for IP forwarding.

use std::collections::BTreeSet;
use tokio::sync::mpsc::UnboundedReceiver;
use transport::wire::IpNet;

/// Metric of the routes fastmesh installs: above the kernel's connected
/// routes (metric 0), so a subnet this host is itself on stays local, and
/// `ip route replace` never replaces a route fastmesh did not install.
pub const ROUTE_METRIC: u32 = 512;

/// Keep the routes via `tun` equal to each set received, until the sender
/// is gone. The device's routes vanish with it when the process exits.
pub async fn install(tun: String, mut rx: UnboundedReceiver<BTreeSet<IpNet>>) {
    let mut installed = BTreeSet::new();
    while let Some(want) = rx.recv().await {
        for n in installed.difference(&want) {
            ip_route("del", n, &tun).await;
        }
        for n in want.difference(&installed) {
            ip_route("replace", n, &tun).await;
        }
        installed = want;
    }
}

async fn ip_route(verb: &str, n: &IpNet, tun: &str) {
    let family = if n.addr.is_ipv4() { "-4" } else { "-6" };
    let net = n.to_string();
    let metric = ROUTE_METRIC.to_string();
    let args = [family, "route", verb, &net, "dev", tun, "metric", &metric];
    match tokio::process::Command::new("ip").args(args).output().await {
        Ok(o) if o.status.success() => {
            tracing::info!(route = %net, %verb, dev = %tun, "subnet route");
        }
        Ok(o) => tracing::warn!(
            route = %net,
            %verb,
            error = %String::from_utf8_lossy(&o.stderr).trim(),
            "ip route failed: packets for this subnet will not enter the mesh"
        ),
        Err(e) => tracing::warn!(
            route = %net,
            error = %e,
            "cannot run `ip` (install iproute2): subnet routes are not installed"
        ),
    }
}

/// Warn when this node advertises subnets of a family the kernel does not
/// forward: packets would reach this node and stop there.
pub fn warn_if_not_forwarding(routes: &[IpNet]) {
    let checks = [
        (true, "/proc/sys/net/ipv4/ip_forward", "net.ipv4.ip_forward"),
        (
            false,
            "/proc/sys/net/ipv6/conf/all/forwarding",
            "net.ipv6.conf.all.forwarding",
        ),
    ];
    for (v4, path, key) in checks {
        if !routes.iter().any(|r| r.addr.is_ipv4() == v4) {
            continue;
        }
        let on = std::fs::read_to_string(path).is_ok_and(|s| s.trim() == "1");
        if !on {
            tracing::warn!(
                "this node routes for subnets but {key} is not 1: packets for them will \
                 stop here (enable it with `sysctl -w {key}=1`)"
            );
        }
    }
}
