#!/usr/bin/env bash
# On the GPU machine, from the repository root (see install.sh): runs rope.py. Its first calls
# JIT-build FlashInfer's rope and page modules (about a minute).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/install.sh"
python3 "$here/rope.py" "$@"
