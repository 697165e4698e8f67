#!/bin/bash
# Where an idle ping through the mesh spends its time, hop by hop.
#
#   sudo tests/scripts/ping-hops.sh [FASTMESH_BIN] [ROUNDS]
#
# Brings up `fastmesh-lab up` (hub and two peers in namespaces), then per
# round sends 300 pings 10 ms apart from peer 1 to peer 2 while tcpdump
# records both peers' TUN and underlay interfaces, and prints, per peer and
# direction, how long a packet spent inside fastmesh: from the ICMP packet on
# TUN to its UDP frame on the wire (TUN->UDP) and back (UDP->TUN). Needs
# tcpdump and python3; the release build of fastmesh-lab.
set -euo pipefail
BIN=${1:-$(pwd)/target/release/fastmesh}
ROUNDS=${2:-2}
source "$(dirname "$0")/lab-up.sh"
lab_up "$BIN"
DST=$MESH
ip netns exec fmup-n1 ping -c 20 -i 0.05 -q "$DST" > /dev/null
for r in $(seq 1 "$ROUNDS"); do
  caps=()
  for n in 1 2; do
    ip netns exec fmup-n$n timeout 6 tcpdump -i any -n -tt -w "$OUT/cap$n.pcap" 'icmp or udp' > /dev/null 2>&1 &
    caps+=($!)
  done
  sleep 1
  echo "round $r: $(ip netns exec fmup-n1 ping -c 300 -i 0.01 -q "$DST" | tail -1)"
  wait "${caps[@]}" || true
  python3 - "$OUT/cap1.pcap" "$OUT/cap2.pcap" <<'PY'
import subprocess, sys, statistics as st
def lines(f):
    out = subprocess.run(['tcpdump', '-r', f, '-n', '-tt'], capture_output=True, text=True).stdout
    return [(float(l.split()[0]), l) for l in out.splitlines()]
def pct(a, p):
    a = sorted(a)
    return a[min(len(a) - 1, int(p * len(a)))]
# An echo request or reply is one 84-byte IP packet on TUN and one frame of
# 117 bytes (UDP payload) on the underlay.
FRAME = 'length 117'
for f, who in ((sys.argv[1], 'peer 1 (pings)'), (sys.argv[2], 'peer 2 (echoes)')):
    L = lines(f)
    out, inn = [], []
    for i, (t, l) in enumerate(L):
        if 'ICMP echo' in l and ' Out ' in l:
            for t2, l2 in L[i + 1:i + 20]:
                if ' Out ' in l2 and FRAME in l2:
                    out.append((t2 - t) * 1e6)
                    break
        if 'ICMP echo' in l and ' In ' in l:
            for t0, l0 in reversed(L[max(0, i - 20):i]):
                if ' In ' in l0 and FRAME in l0:
                    inn.append((t - t0) * 1e6)
                    break
    for name, d in (('TUN->UDP', out), ('UDP->TUN', inn)):
        if d:
            print(f'  {who} {name}: {len(d)} packets, avg {st.mean(d):.0f} p50 {pct(d, .5):.0f} p90 {pct(d, .9):.0f} p99 {pct(d, .99):.0f} us')
PY
done
