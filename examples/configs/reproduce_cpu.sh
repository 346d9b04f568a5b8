#!/usr/bin/env bash
# Every CPU twin of examples/configs, end to end, with one seed: the data, the six trainings
# (pre-training before the fine-tuning that starts from it) and the test evaluations, then a
# table against the expected metrics (expected_cpu.json, which says on what machine they were
# measured). Resumable: a finished run is kept, an interrupted one resumed, an existing cache reused.
#
#   bash examples/configs/reproduce_cpu.sh DATA_DIR RUNS_DIR [SEED]
#
# About 40 minutes of one core per seed on a 2-core x86 VM (torch 2.13, --threads 1). Two seeds
# at once, sharing the caches: make the caches first (the first command), then start both.
#   bash examples/configs/reproduce_cpu.sh data runs_s0 0 && bash examples/configs/reproduce_cpu.sh data runs_s1 1 &
set -euo pipefail

DATA=${1:?usage: reproduce_cpu.sh DATA_DIR RUNS_DIR [SEED]}
RUNS=${2:?usage: reproduce_cpu.sh DATA_DIR RUNS_DIR [SEED]}
SEED=${3:-0}
THREADS=${THREADS:-1}
HERE=$(cd "$(dirname "$0")" && pwd)
MOLDEN=${MOLDEN:-molden}
mkdir -p "$DATA" "$RUNS/eval"

cache() {  # cache FILE ARGS...: preprocess into FILE unless it is there
    local file=$1; shift
    [ -f "$file" ] || $MOLDEN preprocess "$@" --out "$file"
}
cache "$DATA/qm9_12k.h5"     qm9 --limit 12000 --val 1000 --test 1000 --cutoff 5.5
cache "$DATA/qm9_12k_k20.h5" qm9 --limit 12000 --val 1000 --test 1000 --max-neighbors 20
cache "$DATA/emt.h5"         emt --workers 2

train() {  # train NAME COMMAND CONFIG CACHE [OPTIONS...]: skipped when finished, resumed when interrupted
    local name=$1 command=$2 config=$3 data=$4; shift 4
    local out="$RUNS/$name" again=()
    # summary.json is written at every stop: a run interrupted or out of time continues
    grep -qE '"stopped": "(completed|early stopping)' "$out/summary.json" 2>/dev/null && { echo "$name: finished before, kept"; return; }
    if [ -f "$out/last.pt" ]; then again=(--resume)
    # Stopped before its first checkpoint: nothing to keep (molden refuses a folder of anything else).
    elif [ -d "$out" ]; then again=(--overwrite); fi
    $MOLDEN "$command" --config "$HERE/$config" --data "$data" --out "$out" --seed "$SEED" --threads "$THREADS" \
        "${again[@]}" "$@"
}
evaluate() {  # evaluate NAME CACHE SPLIT [OPTIONS...]
    local name=$1 data=$2 split=$3; shift 3
    local out="$RUNS/eval/$name.$split.json"
    [ -f "$out" ] || $MOLDEN evaluate "$RUNS/$name/best.pt" --data "$data" --split "$split" --threads "$THREADS" \
        --out "$out" "$@"
}

train qm9_homo_noisy_nodes       finetune qm9_homo_noisy_nodes_cpu.yaml     "$DATA/qm9_12k.h5"
train pcqm4mv2_pretrain          pretrain pcqm4mv2_pretrain_cpu.yaml        "$DATA/qm9_12k_k20.h5"
train qm9_homo_from_pretrained   finetune qm9_homo_from_pretrained_cpu.yaml "$DATA/qm9_12k_k20.h5" \
    --init "$RUNS/pcqm4mv2_pretrain/best.pt"
train oc20_is2re_noisy_nodes     finetune oc20_is2re_noisy_nodes_cpu.yaml   "$DATA/emt.h5"
train s2ef_dens                  finetune s2ef_dens_cpu.yaml                "$DATA/emt.h5"
train forcenet_s2ef              finetune forcenet_s2ef_cpu.yaml            "$DATA/emt.h5"

evaluate qm9_homo_noisy_nodes     "$DATA/qm9_12k.h5"     test
evaluate qm9_homo_from_pretrained "$DATA/qm9_12k_k20.h5" test
for split in test_id test_ood_ads test_ood_cat test_ood_both; do
    evaluate oc20_is2re_noisy_nodes "$DATA/emt.h5" "$split" --frames initial   # IS2RE: from the initial structures
    evaluate s2ef_dens              "$DATA/emt.h5" "$split"
    evaluate forcenet_s2ef          "$DATA/emt.h5" "$split"
done

python "$HERE/check_cpu.py" "$RUNS"
