#!/usr/bin/env bash
# Offline demo, no network and no dataset needed, on the CPU: base-to-novel for zero-shot CLIP,
# CoOp and CoOp + TextRefiner on a synthetic colour-and-shape dataset, with a tiny CLIP that is
# shipped with the package (textrefiner/demo/clip_tiny.pt, the same weights on every machine).
# A toy: it shows prompt learning at work in miniature, not the paper's numbers.
# It is the `demo` sweep (textrefiner/sweep/specs/demo.yaml): zero-shot seed 1, CoOp and CoOp + TR
# seeds 1 2 3, on either engine (they give the same run), JOBS runs at a time.
#
# usage: bash scripts/demo.sh [OUT_DIR]      (default output/demo)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:-output/demo}
PY=${PYTHON:-python}
# The toy models are too small to gain from threads; one per process does not spin-wait on a busy CPU.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

"$PY" -m textrefiner.sweep.cli demo --out "$OUT" --jobs "${JOBS:-2}"
echo
echo "== Base-to-novel on the synthetic demo (tiny pretrained CLIP; 6 base + 6 novel classes, chance 16.7%) =="
"$PY" -m textrefiner.results "$OUT" | sed -n '/^|/p'  # the table alone
echo
echo "Report: $OUT/report/results.md, results.csv and the picture results.png"
echo "What it shows: CoOp's learned prompt beats zero-shot CLIP on base classes; CoOp+TR keeps" \
  "that and gains on novel ones, so its HM is the highest (a toy: one test image = 0.56 points)."

# What the cache of CoOp + TR (seed 1, trained on the base classes) learned, on the novel
# classes' test images, where the refinement changed predictions (docs/explain.md).
echo
NOVEL=$("$PY" -c "from textrefiner.data import synthetic_classnames; print(','.join(synthetic_classnames(12)[6:]))")
"$PY" -m textrefiner.explain --model-dir "$OUT/base2new/train_base/synthetic_shapes/shots_16/CoOp+TR/demo_tiny/seed1" \
  --classnames "$NOVEL" --set DATASET.SUBSAMPLE_CLASSES new --output-dir "$OUT/explain"
echo "What TextRefiner learned (CoOp + TR seed 1, novel classes): open $OUT/explain/index.html" \
  "in a browser (docs/explain.md says what to read in it)."
