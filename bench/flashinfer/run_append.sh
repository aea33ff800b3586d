#!/usr/bin/env bash
# On the GPU machine, from the repository root (see install.sh): runs append.py. Its first call
# JIT-builds FlashInfer's page module (~45 s).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/install.sh"
python3 "$here/append.py" "$@"
