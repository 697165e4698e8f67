# Sourced by the ping scripts: bring up `fastmesh-lab up` (hub and two peers
# in namespaces fmup-*) with FASTMESH_BIN=$1 (or a wrapper), wait for it, and
# remove it all on exit. Sets OUT (a scratch directory), MESH and WIRE (peer
# 2's overlay and underlay addresses), P1 and P2 (the peers' process ids).
#
#   lab_up FASTMESH_BIN [WAIT_SECONDS]
LAB=$(pwd)/target/release/fastmesh-lab
OUT=$(mktemp -d)
UP=
lab_down() {
  if [ -n "$UP" ]; then
    kill "$UP" 2>/dev/null || true
    # The lab's hub and peers name its directory on their command lines.
    pkill -f "fastmesh-lab-fmup-$UP/" 2>/dev/null || true
  fi
  sleep 1
  [ -n "$UP" ] && rm -rf "${TMPDIR:-/tmp}/fastmesh-lab-fmup-$UP"
  for n in fmup-n0 fmup-n1 fmup-n2 fmup-r; do ip netns del $n 2>/dev/null || true; done
  rm -rf "$OUT"
}
trap lab_down EXIT
lab_up() {
  FASTMESH_BIN=$1 "$LAB" up 900 > "$OUT/up.log" 2>&1 &
  UP=$!
  for _ in $(seq 1 "${2:-60}"); do sleep 1; grep -q 'up for' "$OUT/up.log" && break; done
  grep -q 'up for' "$OUT/up.log" || { cat "$OUT/up.log"; exit 1; }
  MESH=$(awk '/^fmup-n2:/ {print $5}' "$OUT/up.log")
  MESH=${MESH%/*}
  WIRE=$(awk '/^fmup-n2:/ {print $3}' "$OUT/up.log")
  WIRE=${WIRE%:*}
  P1=$(awk '/^fmup-n1:/ {print $NF}' "$OUT/up.log")
  P2=$(awk '/^fmup-n2:/ {print $NF}' "$OUT/up.log")
}
