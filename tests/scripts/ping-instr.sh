#!/bin/bash
# Instructions each peer's process executes per ping through an idle mesh
# (valgrind's callgrind: a count, not a time, so it does not move with the
# machine's state the way ping times do).
#
#   sudo tests/scripts/ping-instr.sh [FASTMESH_BIN] [PINGS]
#
# Brings up `fastmesh-lab up` with both peers under callgrind, sends PINGS
# pings 20 ms apart from peer 1 to peer 2, then leaves the mesh idle for as
# long, and prints per peer (instructions while pinging - instructions
# while idle) / PINGS. ANNOTATE=yes (or no) also prints each peer's top
# functions while pinging, with (or without) what they call. Needs valgrind and the release build of
# fastmesh-lab.
set -euo pipefail
BIN=${1:-$(pwd)/target/release/fastmesh}
PINGS=${2:-500}
source "$(dirname "$0")/lab-up.sh"
cat > "$OUT/wrap.sh" <<W
#!/bin/sh
case "\$1" in
  peer) exec valgrind --tool=callgrind --callgrind-out-file=$OUT/cg.%p "$BIN" "\$@" ;;
  *) exec "$BIN" "\$@" ;;
esac
W
chmod +x "$OUT/wrap.sh"
lab_up "$OUT/wrap.sh" 120
ip netns exec fmup-n1 ping -c 20 -i 0.1 -q "$MESH" > /dev/null
sleep 2
total() { callgrind_annotate --auto=no --threshold=100 "$1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}'; }
for p in $P1 $P2; do callgrind_control -z "$p" > /dev/null 2>&1; done
start=$(date +%s.%N)
ip netns exec fmup-n1 ping -c "$PINGS" -i 0.02 -q "$MESH" | tail -1
secs=$(echo "$(date +%s.%N) - $start" | bc)
for p in $P1 $P2; do callgrind_control -d "$p" > /dev/null 2>&1; callgrind_control -z "$p" > /dev/null 2>&1; done
sleep "$secs"
for p in $P1 $P2; do callgrind_control -d "$p" > /dev/null 2>&1; done
sleep 1
for p in $P1 $P2; do
  busy=$(total "$OUT/cg.$p.1")
  idle=$(total "$OUT/cg.$p.2")
  name=peer1; [ "$p" = "$P2" ] && name=peer2
  echo "$name: $(( (busy - idle) / PINGS )) instructions per ping (pinging $busy, idle $idle over ${secs%.*} s)"
  # ANNOTATE=yes: the top functions with what they call; ANNOTATE=no: alone.
  if [ -n "${ANNOTATE:-}" ]; then
    callgrind_annotate --auto=no --inclusive="$ANNOTATE" --threshold=100 "$OUT/cg.$p.1" 2>/dev/null | sed -n '/file:function/,$p' | head -60 | cut -c1-200
  fi
done
