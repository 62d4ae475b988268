#!/usr/bin/env bash
# The main job: installs what is missing, builds, and live-migrates a running
# test VM between two local processes over gRPC on loopback, then prints the
# statistics of both sides.
#   receiver: pmlmig receive --listen 127.0.0.1:PORT --verify --exit-after 2s
#   source:   pmlmig run ... --migrate-to 127.0.0.1:PORT --verify
# Extra arguments go to the source's `pmlmig run` (e.g. --memory 4G --streams 2).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh build
PMLMIG=build/tools/pmlmig
PORT=${PMLMIG_DEMO_PORT:-7400}

echo "== receiver: pmlmig receive --listen 127.0.0.1:$PORT --verify --exit-after 2s"
"$PMLMIG" receive --listen "127.0.0.1:$PORT" --verify --exit-after 2s --wait 60s --attempts 1 &
receiver=$!
trap 'kill $receiver 2>/dev/null || true' EXIT
sleep 0.5

echo "== source: pmlmig run --memory 1G --vcpus 1 --workload hotset:fraction=0.05,share=0.9 --migrate-to 127.0.0.1:$PORT --verify $*"
status=0
"$PMLMIG" run --memory 1G --vcpus 1 --workload hotset:fraction=0.05,share=0.9 \
  --migrate-after 1s --migrate-to "127.0.0.1:$PORT" --verify "$@" || status=$?
wait $receiver || status=$?
trap - EXIT
exit $status
