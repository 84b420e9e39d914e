#!/usr/bin/env bash
# README's test command: makes sure NVRTC is available (PyPI wheel in ./.venv when
# no CUDA toolkit is found), builds the kernels (a kernel that fails to compile
# fails the run) and the CPU emulator of them (cargo feature `emu`, host C++
# compiler), and runs every test, the Python package's included (scripts/python-test.sh:
# PyTorch from PyPI into ./.venv). The GPU test suites run on the emulated device
# (FEATCLOUD_DEVICE=emu, the default here); on a GPU machine set
# FEATCLOUD_DEVICE=gpu FEATCLOUD_REQUIRE_GPU=1 so nothing passes by skipping.
# Afterwards it prints how many tests ran on the emulated device.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/nvrtc.sh
export FEATCLOUD_REQUIRE_KERNELS=1
export FEATCLOUD_DEVICE="${FEATCLOUD_DEVICE:-emu}"
# Every test that got a device appends its name here (featcloud::cuda::test_device).
export FEATCLOUD_DEVICE_LOG="${FEATCLOUD_DEVICE_LOG:-$PWD/target/device-tests.log}"
mkdir -p "$(dirname "$FEATCLOUD_DEVICE_LOG")"
: > "$FEATCLOUD_DEVICE_LOG"
cargo test --release --features emu "$@"
# The example (a user's own training loop on the CUDA head) on the same device; it
# fails when its loss does not decrease.
cargo run --quiet --release --features emu --example custom_trainer > target/custom_trainer.log
grep "mean loss" target/custom_trainer.log
# The Python package (featcloud.torch) and its tests.
bash scripts/python-test.sh
n=$(sort -u "$FEATCLOUD_DEVICE_LOG" | grep -c . || true)
echo "device tests executed on FEATCLOUD_DEVICE=$FEATCLOUD_DEVICE (not skipped): $n"
