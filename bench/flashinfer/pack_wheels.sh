#!/usr/bin/env bash
# On a machine with PyPI access: download FlashInfer 0.7.2.post1 and the one dependency the GPU
# image lacks, and pack them into <ROOT>/.whl/carry/ (.whl/ is in .gitignore) to bring to the GPU
# machine, which has no network; install.sh unpacks them there.
#   usage: bash bench/flashinfer/pack_wheels.sh [ROOT]   (default: this repository's root)
# The GPU image runs CPython 3.12 on x86-64 (the tvm-ffi wheel is built per Python version);
# PYTHON_VERSION=3.x overrides that.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "${1:-$here/../..}" && pwd); W=$ROOT/.whl; C=$W/carry
FI=0.7.2.post1 TVM_FFI=0.1.15.post2
dl() {
  python3 -m pip download --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
    --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$W" "$@"
}
dl "flashinfer-python==$FI"        # 62 MB py3-none-any wheel
dl "apache-tvm-ffi==$TVM_FFI"      # 3.3 MB
mkdir -p "$C"; tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
# A wheel is a zip: unpack it with Python's zipfile (no unzip needed).
python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
  "$W/flashinfer_python-$FI-py3-none-any.whl" "$tmp"
# As an xz tarball the 62 MB wheel is ~17.5 MB and unpacks in seconds.
tar -C "$tmp" -cf - flashinfer "flashinfer_python-$FI.dist-info" | xz -6 -T0 > "$C/flashinfer_python-$FI.tar.xz"
cp "$W"/apache_tvm_ffi-$TVM_FFI-*.whl "$C/"
ls -la "$C"
