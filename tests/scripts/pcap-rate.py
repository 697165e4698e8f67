#!/usr/bin/env python3
"""Sending rate of a node at fine grain, from the capture that
`FASTMESH_BENCH_PCAP=FILE fastmesh-lab wan ...` writes (all of node 1's
packets, TUN and underlay, during the first transfer through the mesh).

    python3 tests/scripts/pcap-rate.py FILE [STEP_S] [SPAN_S]

Prints, per STEP_S (0.025) for SPAN_S (1.0) seconds from the node's first
UDP frame above 1000 bytes (the transfer's first full frame), the node's
outgoing UDP payload rate (Mbit/s), then the average over the span; and on
a second line the inner TCP data the application handed to the proxy
(TCP payload going out on a device other than the underlay's), whose rate
says whether the sender waited for the application or for the path.
"""
import re
import subprocess
import sys


def main():
    path = sys.argv[1]
    step = float(sys.argv[2]) if len(sys.argv) > 2 else 0.025
    span = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
    out = subprocess.run(["tcpdump", "-r", path, "-tt", "-n"],
                         capture_output=True, text=True).stdout  # a capture cut by kill ends short: tcpdump exits 1
    udp, tcp = [], []
    for line in out.splitlines():
        f = line.split()
        # "TIME IFACE Out IP SRC > DST: UDP, length N" (underlay) or
        # "TIME IFACE Out IP SRC > DST: Flags [..], ..., length N" (inner TCP)
        if len(f) < 8 or f[2] != "Out":
            continue
        m = re.search(r"length (\d+)$", line)
        if not m:
            continue
        t, n = float(f[0]), int(m.group(1))
        if " UDP, " in line:
            udp.append((t, n, f[1]))
        elif " Flags [" in line:
            tcp.append((t, n, f[1]))
    first = next(((t, dev) for t, n, dev in udp if n > 1000), None)
    if first is None:
        sys.exit("no full-size frame in the capture")
    first, underlay = first

    def rates(recs):
        buckets = [0] * int(round(span / step))
        for t, n, dev in recs:
            k = int((t - first) / step)
            if 0 <= k < len(buckets):
                buckets[k] += n
        return buckets

    u = rates(udp)
    print(" ".join("%.0f" % (b * 8 / step / 1e6) for b in u))
    print("average over %.2f s from the first full frame: %.1f Mbit/s"
          % (span, sum(u) * 8 / span / 1e6))
    inner = rates([r for r in tcp if r[2] != underlay])
    if any(inner):
        print("inner TCP data into the proxy: "
              + " ".join("%.0f" % (b * 8 / step / 1e6) for b in inner))


if __name__ == "__main__":
    main()
