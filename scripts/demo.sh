#!/usr/bin/env bash
# The main job: installs what is missing, builds, and runs a test VM with a
# write workload on KVM, showing its write rate each second and a summary.
# Extra arguments go to `pmlmig run` (e.g. --memory 4G --vcpus 2).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh build
exec build/tools/pmlmig run --memory 1G --vcpus 2 --workload random --duration 5s --check "$@"
