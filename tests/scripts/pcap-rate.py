#!/usr/bin/env python3
"""Sending rate of a node at fine grain, from the capture that
`FASTMESH_BENCH_PCAP=FILE fastmesh-lab wan ...` writes (node 1's UDP during
the first transfer through the mesh).

    python3 tests/scripts/pcap-rate.py FILE [STEP_S] [SPAN_S]

Prints the node's outgoing UDP payload rate (Mbit/s) per STEP_S (0.025)
for SPAN_S (1.0) seconds from its first frame above 1000 bytes (the
transfer's first full frame), then the average over the span.
"""
import subprocess
import sys


def main():
    path = sys.argv[1]
    step = float(sys.argv[2]) if len(sys.argv) > 2 else 0.025
    span = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
    out = subprocess.run(["tcpdump", "-r", path, "-tt", "-n"],
                         capture_output=True, text=True).stdout  # a capture cut by kill ends short: tcpdump exits 1
    sent = []
    for line in out.splitlines():
        f = line.split()
        # "TIME IFACE Out IP SRC > DST: UDP, length N"
        if len(f) < 8 or f[2] != "Out":
            continue
        try:
            sent.append((float(f[0]), int(f[-1])))
        except ValueError:
            continue
    first = next((t for t, n in sent if n > 1000), None)
    if first is None:
        sys.exit("no full-size frame in the capture")
    buckets = [0] * int(round(span / step))
    for t, n in sent:
        k = int((t - first) / step)
        if 0 <= k < len(buckets):
            buckets[k] += n
    print(" ".join("%.0f" % (b * 8 / step / 1e6) for b in buckets))
    print("average over %.2f s from the first full frame: %.1f Mbit/s"
          % (span, sum(buckets) * 8 / span / 1e6))


if __name__ == "__main__":
    main()
