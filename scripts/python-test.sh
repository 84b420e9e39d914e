#!/usr/bin/env bash
# The Python package's tests (part of README's test command, run by scripts/test.sh):
# installs PyTorch, pytest and numpy from PyPI into ./.venv if missing, builds and installs
# the package from ./python (PyO3 + maturin; the CUDA kernels are compiled in when NVRTC is
# found, as for the crate), and runs python/tests and the two example trainers.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/nvrtc.sh
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
if ! "$py" -c "import torch, pytest, numpy" >/dev/null 2>&1; then
    echo "python tests: installing torch, pytest and numpy from PyPI into ./.venv"
    "$py" -m pip install --quiet --disable-pip-version-check "torch>=2.1" "pytest>=7" numpy
fi
"$py" -m pip install --quiet --disable-pip-version-check ./python
# Run from python/ so that `import featcloud` is the installed package, not a source tree.
(cd python && "../$py" -m pytest -q tests)
# The example trainer end to end (it fails if a model's loss does not decrease).
"$py" examples/torch_train.py
# Its class-parallel variant: two processes under torchrun, gloo on the CPU.
"$py" -m torch.distributed.run --standalone --nproc_per_node 2 examples/torch_train_parallel.py --epochs 20 --sample-rate 0.5
