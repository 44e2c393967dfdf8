#!/usr/bin/env bash
# The wheels the GPU check needs on a device machine and that its image lacks (device KINDS.md lists what it
# has: torch, accelerate, transformers, huggingface-hub, typer, pyarrow, pandas, xxhash, ... but no diffusers
# or datasets): diffusers and datasets at the versions installed here, and the pure-Python packages they import
# that the image does not hold (importlib_metadata for diffusers; dill and multiprocess for datasets).
# They go to .whl/ (ignored by git), which the device command carries and installs with --no-deps.
#   bash benchmarks/device_wheels.sh            # run in the activated virtual environment
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(diffusers datasets importlib_metadata dill multiprocess)
pins=()
for name in "${PACKAGES[@]}"; do
    pins+=("$name==$(python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
rm -rf .whl
python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${pins[@]}"
ls -l .whl
du -sh .whl
