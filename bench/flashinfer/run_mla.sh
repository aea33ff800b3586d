#!/usr/bin/env bash
# On the GPU machine, from the repository root (see install.sh): runs mla.py. Its first run of
# each backend JIT-builds FlashInfer's MLA module (a minute or two on a fresh machine).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/install.sh"
python3 "$here/mla.py" "$@"
