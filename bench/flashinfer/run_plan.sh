#!/usr/bin/env bash
# On the GPU machine, from the repository root (see install.sh): runs plan.py. Its JIT build of
# the decode and prefill modules (fa3 too on sm_90) takes a minute or two on a fresh machine.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/install.sh"
python3 "$here/plan.py" "$@"
