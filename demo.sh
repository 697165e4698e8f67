#!/usr/bin/env bash
# The first minute with fastmesh: builds the binaries, then creates a hub and
# three peers in network namespaces on this machine, pings and transfers
# across the mesh, prints the status tables, and removes everything again.
# Needs root (namespaces, TUN), iproute2, nftables and ping.
set -euo pipefail
cd "$(dirname "$0")"
if [ "$(id -u)" -ne 0 ]; then
  echo "demo.sh needs root: sudo ./demo.sh" >&2
  exit 1
fi
need=()
for pair in ip:iproute2 nft:nftables ping:iputils-ping; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
if [ "${#need[@]}" -gt 0 ]; then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
fi
cargo build --release --locked -p fastmesh-bins -p fastmesh-tests --bins
exec target/release/fastmesh-lab demo
