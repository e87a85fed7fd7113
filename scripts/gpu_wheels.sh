#!/usr/bin/env bash
# Download the wheels the GPU check carries to a machine without network (see docs/gpu-check.md) into .whl/:
# what the GPU image lacks (Python 3.12, torch + CUDA, transformers, huggingface_hub, accelerate, peft, safetensors,
# imageio, Pillow are there). Everything a device call carries must fit in 64 MiB.
#   diffusers 0.42.x   the pipeline's base (~6 MiB)
#   imageio-ffmpeg 0.6 ships the ffmpeg binary (~28 MiB; 0.8's wheel is 65 MiB and does not fit)
#   ftfy, wcwidth      the official prompt cleaning (ftfy is pure python; wcwidth ~1 MiB)
# (pytest, psutil and the rest of what the check runs are in the GPU image.)
# Usage: scripts/gpu_wheels.sh [DIR]   (default .whl; needs network, run it here, not on the GPU machine)
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.whl}"
mkdir -p "$dest"
python3 -m pip download --quiet --dest "$dest" --only-binary=:all: --no-deps \
    --python-version 3.12 --implementation cp --abi cp312 --platform manylinux2014_x86_64 \
    "diffusers>=0.42,<0.43" "imageio-ffmpeg==0.6.0" "ftfy>=6.1" "wcwidth"
ls -l "$dest"
total=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
echo "total: $((total / 1024 / 1024)) MiB ($total bytes)"
if [ "$total" -gt $((60 * 1024 * 1024)) ]; then
    echo "error: the wheels exceed 60 MiB; a device call carries 64 MiB with the working tree" >&2
    exit 1
fi
