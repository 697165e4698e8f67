#!/bin/bash
# Added round-trip time of an idle mesh: pings through the mesh and, in
# between, to the same peer's underlay address (no tunnel), interleaved.
#
#   sudo tests/scripts/ping-idle.sh [FASTMESH_BIN] [ROUNDS] [COUNT]
#
# Brings up `fastmesh-lab up` (hub and two peers in namespaces), then per
# round sends COUNT pings 10 ms apart from peer 1 to peer 2 over the mesh and
# COUNT to peer 2's underlay address, and prints each round's avg / p99 and,
# over all rounds, the mesh's added avg and p99 (ms). Needs the release
# build of fastmesh-lab.
set -euo pipefail
BIN=${1:-$(pwd)/target/release/fastmesh}
ROUNDS=${2:-3}
COUNT=${3:-200}
source "$(dirname "$0")/lab-up.sh"
lab_up "$BIN"
ip netns exec fmup-n1 ping -c 20 -i 0.05 -q "$MESH" > /dev/null
for r in $(seq 1 "$ROUNDS"); do
  for what in wire mesh; do
    dst=$WIRE
    [ $what = mesh ] && dst=$MESH
    ip netns exec fmup-n1 ping -c "$COUNT" -i 0.01 -W 1 "$dst" | sed -n 's/.*time=\([0-9.]*\).*/\1/p' > "$OUT/$what.$r"
  done
done
python3 - "$OUT" "$ROUNDS" <<'PY'
import sys
out, rounds = sys.argv[1], int(sys.argv[2])
def load(w, r):
    return [float(x) for x in open(f'{out}/{w}.{r}')]
def stats(a):
    a = sorted(a)
    return sum(a) / len(a), a[min(len(a) - 1, int(0.99 * len(a)))]
all_ = {'wire': [], 'mesh': []}
for r in range(1, rounds + 1):
    row = []
    for w in ('wire', 'mesh'):
        t = load(w, r)
        all_[w] += t
        row.append('%s %.3f / %.3f' % (w, *stats(t)))
    print(f'round {r}: ' + '   '.join(row))
(wa, wp), (ma, mp) = stats(all_['wire']), stats(all_['mesh'])
print(f'all: wire {wa:.3f} / {wp:.3f}  mesh {ma:.3f} / {mp:.3f}  added {ma - wa:+.3f} avg, {mp - wp:+.3f} p99 ms')
PY
