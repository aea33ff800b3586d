#!/usr/bin/env bash
# On the GPU machine, from the repository root (see install.sh): runs decode.py. Its JIT build
# of the decode modules takes about a minute on a fresh machine.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/install.sh"
python3 "$here/decode.py" "$@"
