#!/usr/bin/env bash
# Gather, here (with PyPI), every wheel benchmarks/gpu_check.py needs on a GPU machine without
# network whose Python already has torch, torchvision, numpy, tqdm, regex, tensorboard, packaging,
# Pillow, matplotlib and PyYAML: the packages textrefiner imports that such a machine lacks
# (openai-clip, ftfy and its wcwidth, yacs) and textrefiner's own wheel, into an ignored folder
# (default .gpu_wheels/) that travels with the run. Checks the 64 MiB a run may carry.
#
#   bash benchmarks/gpu_wheels.sh [FOLDER]
# then, on the GPU machine (benchmarks/README.md, "On a GPU machine"):
#   python3 -m pip install -q --no-index --no-deps --find-links .gpu_wheels --target /tmp/site \
#     openai-clip ftfy wcwidth yacs textrefiner && PYTHONPATH=/tmp/site python3 benchmarks/gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.gpu_wheels}
PYTHON=${PYTHON:-python3}
LIMIT_MIB=${LIMIT_MIB:-64}
# The versions this project's tests run with.
DOWNLOAD=(ftfy==6.3.1 wcwidth==0.9.5 yacs==0.1.8)
BUILD=(openai-clip==1.0.1)  # published as a source archive only: built here (pure Python)

rm -rf "$DEST"
mkdir -p "$DEST"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation py -d "$DEST" "${DOWNLOAD[@]}"
"$PYTHON" -m pip wheel -q --no-deps -w "$DEST" "${BUILD[@]}"
"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" .
ls -l "$DEST"

# What a run carries: the wheels plus the working tree (tracked and untracked-not-ignored files).
wheels=$(du -sk "$DEST" | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | du -ck --files0-from=- 2>/dev/null \
  | tail -1 | cut -f1)
total=$(( (wheels + tree) / 1024 ))
echo "wheels $(( wheels / 1024 )) MiB + working tree $(( tree / 1024 )) MiB = ${total} MiB (limit ${LIMIT_MIB} MiB)"
if (( wheels + tree > LIMIT_MIB * 1024 )); then
  echo "gpu_wheels: over the ${LIMIT_MIB} MiB a run may carry: leave out what is not needed" >&2
  exit 1
fi
