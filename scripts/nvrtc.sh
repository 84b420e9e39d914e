# Sourced by scripts/test.sh, scripts/gpu-bundle.sh and .ci/run: makes NVRTC
# findable by the build script (build/nvrtc.rs), installing the pinned PyPI wheel into ./.venv if needed.
NVRTC_WHEEL="nvidia-cuda-nvrtc-cu12==12.9.86"
have_nvrtc() {
  [ -n "${NVRTC_PATH:-}" ] && [ -e "$NVRTC_PATH" ] && return 0
  for d in "${CUDA_HOME:-/nonexistent}/lib64" "${CUDA_PATH:-/nonexistent}/lib64" /usr/local/cuda/lib64 .venv/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib; do
    ls "$d"/libnvrtc.so* >/dev/null 2>&1 && return 0
  done
  return 1
}
if ! have_nvrtc; then
  echo "nvrtc: not found; installing $NVRTC_WHEEL into ./.venv"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check "$NVRTC_WHEEL"
fi
