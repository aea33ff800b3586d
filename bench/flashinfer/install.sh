# Sourced by the run_*.sh scripts on the GPU machine, from the repository root, with .whl/carry
# present (made by bench/flashinfer/pack_wheels.sh on a machine with PyPI access):
# installs FlashInfer into /tmp/site and sets the environment its JIT build needs.
site=/tmp/site; mkdir -p "$site"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/carry/*.whl || exit 1
python3 -c "import glob,tarfile; tarfile.open(glob.glob('.whl/carry/flashinfer_python-*.tar.xz')[0]).extractall('$site', filter='data')" || exit 1
export PYTHONPATH=$site PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export FLASHINFER_WORKSPACE_BASE=/tmp/fiws TVM_FFI_CACHE_DIR=/tmp/tvmffi
