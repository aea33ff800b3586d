#!/usr/bin/env bash
# On the GPU machine, from the repository root (see install.sh): runs prefill_mask.py. Its JIT
# build of the fa2 prefill module takes a minute or two on a fresh machine.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/install.sh"
python3 "$here/prefill_mask.py" "$@"
