#!/usr/bin/env bash
# README's test command: makes sure NVRTC is available (PyPI wheel in ./.venv when
# no CUDA toolkit is found), builds the kernels (a kernel that fails to compile
# fails the run), and runs every test. GPU tests skip without a GPU unless
# FEATCLOUD_REQUIRE_GPU=1.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/nvrtc.sh
export FEATCLOUD_REQUIRE_KERNELS=1
cargo test --release "$@"
