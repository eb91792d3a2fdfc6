#!/usr/bin/env bash
# Base-to-novel protocol: train on the base classes, test on base and on novel, for each seed;
# then print base / novel / HM averaged over seeds.
#
# usage: bash scripts/base2new.sh <trainer> <dataset> [--refiner] [--seeds "1 2 3"] [--root DIR]
#            [--out DIR] [--shots K] [--cfg NAME] [--load-epoch N] [KEY VALUE ...]
#   trainer: CoOp | CoCoOp | MaPLe | PromptKD | PromptSRC | ZeroshotCLIP;  dataset: a name under
#   configs/datasets/, or a folder of your own images (PATH/<class>/*.jpg: image_folder.yaml
#   with DATASET.FOLDER PATH; its runs and summary are named after the folder)
#   KEY VALUE pairs are config overrides passed to every run.
# Environment: PYTHON (default python), DATA (default --root), TEACHERS (PromptKD's teacher
# checkpoints, default teacher_model: TEACHERS/<DATASET.NAME, or the folder's name>/
# VLPromptLearner/model-best.pth.tar), FEATURE_STORE (a folder: every run reads the test
# images' features from it, --feature-store), ENGINE (auto, dassl or standalone: every run's
# --engine).
set -euo pipefail

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-1}"; }

[[ $# -ge 2 ]] || usage
TRAINER=$1
DATASET=$2
DATASET_ARG=$2
shift 2

REFINER=0
SEEDS="1 2 3"
ROOT=${DATA:-data}
OUT=output
SHOTS=""
CFG=""
LOAD_EPOCH=""
EXTRA=()

PY=${PYTHON:-python}
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/common.sh
source "$SCRIPT_DIR/common.sh"
parse_options "$@"

set_trainer_defaults "$TRAINER"
[[ -n $SHOTS ]] || SHOTS=$DEFAULT_SHOTS
[[ -n $CFG ]] || CFG=$DEFAULT_CFG
set_method "$TRAINER" "$REFINER"

CFG_FILE=configs/trainers/$TRAINER/$CFG.yaml
require_config "$CFG_FILE"
dataset_config "$DATASET"  # DATASET_CFG, DATASET (the runs' folder name), FOLDER_OPTS
[[ -n $LOAD_EPOCH ]] || LOAD_EPOCH=$(max_epoch "$CFG_FILE" "${EXTRA[@]+"${EXTRA[@]}"}")

METHOD_OPTS=(DATASET.NUM_SHOTS "$SHOTS" "${FOLDER_OPTS[@]+"${FOLDER_OPTS[@]}"}")
TEST_SUB=(DATASET.SUBSAMPLE_CLASSES new)
TRAIN_SUB=(DATASET.SUBSAMPLE_CLASSES base)
if [[ $TRAINER == PromptKD ]]; then
    # distils on all training images of all classes whatever SUBSAMPLE_CLASSES says; it only
    # picks the classes the final test scores (base after training, new for the test step)
    METHOD_OPTS+=(TRAINER.MODAL base2novel TRAINER.PROMPTKD.KD_WEIGHT "$(promptkd_kd_weight "$DATASET_ARG")")
    if ! has_key TRAINER.PROMPTKD.TEACHER_CKPT "${EXTRA[@]+"${EXTRA[@]}"}"; then
        METHOD_OPTS+=(TRAINER.PROMPTKD.TEACHER_CKPT "$(promptkd_teacher_ckpt "$DATASET_ARG")")
    fi
fi

feature_store_flag
engine_flag
COMMON=(--root "$ROOT" --trainer "$TRAINER"
        --dataset-config-file "$DATASET_CFG" --config-file "$CFG_FILE"
        "${STORE_FLAG[@]+"${STORE_FLAG[@]}"}" "${ENGINE_FLAG[@]+"${ENGINE_FLAG[@]}"}")
SUB_DIR=$DATASET/shots_$SHOTS/$METHOD/$CFG

for SEED in $SEEDS; do
    TRAIN_DIR=$OUT/base2new/train_base/$SUB_DIR/seed$SEED
    TEST_DIR=$OUT/base2new/test_new/$SUB_DIR/seed$SEED
    if [[ $TRAINER == ZeroshotCLIP ]]; then
        run_once "$TRAIN_DIR" "$PY" -m textrefiner.train "${COMMON[@]}" --seed "$SEED" --output-dir "$TRAIN_DIR" \
            --eval-only "${METHOD_OPTS[@]}" DATASET.SUBSAMPLE_CLASSES base "${EXTRA[@]+"${EXTRA[@]}"}"
        run_once "$TEST_DIR" "$PY" -m textrefiner.train "${COMMON[@]}" --seed "$SEED" --output-dir "$TEST_DIR" \
            --eval-only "${METHOD_OPTS[@]}" DATASET.SUBSAMPLE_CLASSES new "${EXTRA[@]+"${EXTRA[@]}"}"
        continue
    fi
    run_once "$TRAIN_DIR" "$PY" -m textrefiner.train "${COMMON[@]}" --seed "$SEED" --output-dir "$TRAIN_DIR" \
        "${REFINER_FLAG[@]+"${REFINER_FLAG[@]}"}" "${METHOD_OPTS[@]}" "${TRAIN_SUB[@]+"${TRAIN_SUB[@]}"}" \
        "${EXTRA[@]+"${EXTRA[@]}"}"
    LOAD=()
    [[ -z $LOAD_EPOCH ]] || LOAD=(--load-epoch "$LOAD_EPOCH")
    run_once "$TEST_DIR" "$PY" -m textrefiner.train "${COMMON[@]}" --seed "$SEED" --output-dir "$TEST_DIR" \
        --model-dir "$TRAIN_DIR" "${LOAD[@]+"${LOAD[@]}"}" --eval-only \
        "${REFINER_FLAG[@]+"${REFINER_FLAG[@]}"}" "${METHOD_OPTS[@]}" "${TEST_SUB[@]}" "${EXTRA[@]+"${EXTRA[@]}"}"
done

echo
"$PY" -m textrefiner.results "$OUT" --base2new-summary --dataset "$DATASET" --method "$METHOD" \
    --cfg "$CFG" --shots "$SHOTS"
