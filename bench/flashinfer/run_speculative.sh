#!/usr/bin/env bash
# On the GPU machine, from the repository root (see install.sh): runs speculative.py. Its JIT
# build of the prefill (fa2, fa3) and decode modules takes a minute or two on a fresh machine.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/install.sh"
python3 "$here/speculative.py" "$@"
