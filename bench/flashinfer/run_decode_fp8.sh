#!/usr/bin/env bash
# On the GPU machine, from the repository root (see install.sh): runs decode_fp8.py. The first
# plan of each decode path JIT-builds its fp8 module (about a minute each on a fresh machine).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/install.sh"
python3 "$here/decode_fp8.py" "$@"
