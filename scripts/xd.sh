#!/usr/bin/env bash
# Cross-dataset / cross-domain protocol: train on all ImageNet classes (few-shot), then test the
# same model on the other datasets and on ImageNet-V2/-Sketch/-A/-R; print a table at the end.
#
# usage: bash scripts/xd.sh <trainer> [--refiner] [--seeds "1 2 3"] [--root DIR] [--out DIR]
#            [--shots K] [--cfg NAME] [--load-epoch N] [--targets "dtd eurosat ..."] [KEY VALUE ...]
#   trainer: CoOp | CoCoOp | MaPLe | PromptSRC | ZeroshotCLIP (PromptKD distils on each target set,
#   a different protocol)
# Environment: PYTHON (default python), DATA (default --root), FEATURE_STORE (a folder: every run
# reads the test images' features from it, --feature-store), ENGINE (auto, dassl or standalone:
# every run's --engine).
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-1}"; }

[[ $# -ge 1 ]] || usage
TRAINER=$1
shift

REFINER=0
SEEDS="1 2 3"
ROOT=${DATA:-data}
OUT=output
SHOTS=16
CFG=""
LOAD_EPOCH=""
TARGETS="caltech101 oxford_pets stanford_cars oxford_flowers food101 fgvc_aircraft sun397 dtd eurosat ucf101
         imagenetv2 imagenet_sketch imagenet_a imagenet_r"
EXTRA=()

PY=${PYTHON:-python}
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/common.sh
source "$SCRIPT_DIR/common.sh"
parse_options "$@"

if [[ $TRAINER == PromptKD ]]; then
    echo "xd.sh covers training on ImageNet only; PromptKD's cross-dataset recipe distils on each target set." >&2
    exit 1
fi
set_trainer_defaults "$TRAINER"
case $TRAINER in  # their ImageNet recipes: MaPLe 2 epochs, depth 3; PromptSRC depth 3, GPA 6 / 10
    MaPLe|PromptSRC) DEFAULT_CFG=${DEFAULT_CFG}_cross_datasets ;;
esac
[[ -n $CFG ]] || CFG=$DEFAULT_CFG
set_method "$TRAINER" "$REFINER"

CFG_FILE=configs/trainers/$TRAINER/$CFG.yaml
require_config "$CFG_FILE"
[[ -n $LOAD_EPOCH ]] || LOAD_EPOCH=$(max_epoch "$CFG_FILE" "${EXTRA[@]+"${EXTRA[@]}"}")
LOAD=()
[[ -z $LOAD_EPOCH ]] || LOAD=(--load-epoch "$LOAD_EPOCH")
feature_store_flag
engine_flag
COMMON=(--root "$ROOT" --trainer "$TRAINER" --config-file "$CFG_FILE"
        "${STORE_FLAG[@]+"${STORE_FLAG[@]}"}" "${ENGINE_FLAG[@]+"${ENGINE_FLAG[@]}"}")
SUB_DIR=shots_$SHOTS/$METHOD/$CFG

for SEED in $SEEDS; do
    TRAIN_DIR=$OUT/xd/train/imagenet/$SUB_DIR/seed$SEED
    MODEL=()
    if [[ $TRAINER == ZeroshotCLIP ]]; then
        TEST_SETS="imagenet $TARGETS"
    else
        TEST_SETS=$TARGETS
        MODEL=(--model-dir "$TRAIN_DIR" "${LOAD[@]+"${LOAD[@]}"}")
        run_once "$TRAIN_DIR" "$PY" -m textrefiner.train "${COMMON[@]}" --seed "$SEED" \
            --dataset-config-file configs/datasets/imagenet.yaml --output-dir "$TRAIN_DIR" \
            "${REFINER_FLAG[@]+"${REFINER_FLAG[@]}"}" DATASET.NUM_SHOTS "$SHOTS" DATASET.SUBSAMPLE_CLASSES all \
            "${EXTRA[@]+"${EXTRA[@]}"}"
    fi
    for TARGET in $TEST_SETS; do
        TEST_DIR=$OUT/xd/test/$TARGET/$SUB_DIR/seed$SEED
        run_once "$TEST_DIR" "$PY" -m textrefiner.train "${COMMON[@]}" --seed "$SEED" \
            --dataset-config-file "configs/datasets/$TARGET.yaml" --output-dir "$TEST_DIR" \
            "${MODEL[@]+"${MODEL[@]}"}" --eval-only "${REFINER_FLAG[@]+"${REFINER_FLAG[@]}"}" \
            "${EXTRA[@]+"${EXTRA[@]}"}"
    done
done

echo
"$PY" -m textrefiner.results "$OUT" --xd-summary --method "$METHOD" --cfg "$CFG" --shots "$SHOTS"
