#!/usr/bin/env bash
# Every GPU check and GPU figure of molden in one run, for a lent GPU machine (BENCHMARKS.md "GPU").
#
#   bash examples/gpu/check_gpu.sh OUT DATA
#
# OUT: results folder. DATA: a folder with the caches the CPU machine built (no qm9pack on the GPU
# machine, and EMT generation is CPU work):
#   molden preprocess qm9 --out DATA/qm9_20k.h5 --limit 20000 --val 0.1 --test 0.1
#   molden preprocess qm9 --out DATA/qm9_20k_55.h5 --limit 20000 --val 0.1 --test 0.1 --cutoff 5.5
#   molden preprocess qm9 --out DATA/qm9_400.h5 --limit 400 --val 60 --test 40   # the tests' QM9 fixture
#   molden preprocess emt --out DATA/emt300.h5 --emt-systems 300 --workers 2
# and, optionally, DATA/s2ef_best.pt: a force field trained on emt300.h5 (e.g. RESULTS.md's
# exp3_painn_plain/best.pt), for relaxations to fmax with both L-BFGS guesses on the GPU.
# Phase 1 runs the CUDA tests, beside six short trainings (longer versions of RESULTS.md's
# experiments 1, 3 and 4) when EXPERIMENTS=1; phase 2 runs the benchmarks alone on the quiet
# GPU, most wanted first. Every step has its own time limit, so one that hangs costs only its
# share. On an H200 (2026-12-04): CUDA tests 50 s, kill-and-resume 60–100 s, DDP 40 s, relax 25 s
# (64 systems) and 80 s (256: ASE's loop is the cost), radius backends 30 s, train suite 35 s.
set -u -o pipefail
status=0  # the first failed step's exit code; every step still runs
check() { local rc=$?; [ $rc -eq 0 ] || { echo "!! failed ($rc): $1"; [ $status -ne 0 ] || status=$rc; }; }
OUT=${1:?usage: check_gpu.sh OUT DATA}
DATA=${2:?usage: check_gpu.sh OUT DATA}
TRAIN_MINUTES=${TRAIN_MINUTES:-2.5}
mkdir -p "$OUT/runs"
stamp() { echo "== $(date -u +%H:%M:%S) $*"; }
export PYTHONUNBUFFERED=1

stamp machine
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import sys, torch, triton, numpy, ase; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, 'ase', ase.__version__, torch.cuda.get_device_name())"
nproc

# ---------------------------------------------------------------- phase 1: trainings + tests
train() {  # NAME ARGS...: one run in the background, its output in OUT/runs/NAME.log
  local name=$1; shift
  timeout 300 molden finetune --device cuda --threads 2 --seed 0 --time-limit "$TRAIN_MINUTES" --log-every 50 \
    --out "$OUT/runs/$name" "$@" > "$OUT/runs/$name.log" 2>&1 &
}
if [ "${EXPERIMENTS:-0}" = 1 ]; then
stamp trainings start
S2EF=(--data "$DATA/emt300.h5" --task s2ef --model painn_paper --val-split val_id --eval-every 250 --steps 4000)
train exp3_painn_plain "${S2EF[@]}"
train exp3_painn_dens "${S2EF[@]}" --dens
IS2RE=(--data "$DATA/emt300.h5" --task is2re --model painn_paper --val-split val_id --max-graphs 16 --eval-every 250
       --warmup-steps 50 --steps 4000)
train exp4_painn_plain "${IS2RE[@]}"
train exp4_painn_nn "${IS2RE[@]}" --noisy-nodes-sigma 0.3
QM9=(--data "$DATA/qm9_20k.h5" --task qm9 --target homo --model gns_qm9_cpu --change block_iterations=3 --max-graphs 64
     --lr 5e-4 --warmup-steps 200 --eval-every 250 --steps 6000)
train exp1_gns3_plain "${QM9[@]}"
train exp1_gns3_nn "${QM9[@]}" --noisy-nodes-sigma 0.02
fi

stamp tests
MOLDEN_TEST_QM9_CACHE="$DATA/qm9_400.h5" timeout 120 python3 -m pytest -q -p no:cacheprovider \
  tests/test_radius_graph.py tests/test_edges.py tests/test_batch.py tests/test_verlet.py \
  "tests/test_triton_radius.py::test_triton_kernel_on_cuda_matches_ase" \
  "tests/test_triton_radius.py::test_triton_backend_on_cuda_waits_once_for_its_output_size" \
  tests/test_training.py -k "cuda or CUDA or bf16" \
  2>&1 | tail -40; check "CUDA tests"
MOLDEN_TEST_QM9_CACHE="$DATA/qm9_400.h5" timeout 200 python3 -m pytest -q -p no:cacheprovider \
  tests/test_training_resume.py -k "cuda" 2>&1 | tail -30; check "CUDA resume and DDP tests"
stamp waiting for the trainings
wait
stamp trainings done
for log in "$OUT"/runs/*.log; do echo "--- $log"; tail -4 "$log"; done
# One archive per PaiNN run (its best.pt is about 11 MB), the two small QM9 runs together.
if [ "${EXPERIMENTS:-0}" = 1 ]; then
(cd "$OUT/runs" && for r in exp3_painn_plain exp3_painn_dens exp4_painn_plain exp4_painn_nn; do
   tar czf "../$r.tgz" --exclude=last.pt --exclude='*.png' "$r" "$r.log"; done
 tar czf ../exp1_gns3.tgz --exclude=last.pt --exclude='*.png' exp1_*)
fi
rm -rf "$OUT/runs"

# ---------------------------------------------------------------- phase 2: benchmarks
stamp relax benchmark
for n in 64 256; do  # one size per call, so a time-out loses one table, not both
  timeout $((n == 64 ? 60 : 150)) python3 -m molden.bench.relax --device cuda --sizes $n --steps 5 --repeats 1 \
    --threads 8 --json "$OUT/relax_cuda_$n.json" 2>&1 | tail -14; check "relax benchmark, $n systems"
  tar rf "$OUT/bench.tar" -C "$OUT" "relax_cuda_$n.json" 2>/dev/null && rm -f "$OUT/relax_cuda_$n.json"
done
stamp relax benchmark, 50 steps without ASE  # deep L-BFGS histories: where the compact step should show
timeout 150 python3 -m molden.bench.relax --device cuda --sizes 64 256 --steps 50 --repeats 3 --no-ase --threads 8 \
  --json "$OUT/relax_cuda_50.json" 2>&1 | tail -16; check "relax benchmark, 50 steps"
tar rf "$OUT/bench.tar" -C "$OUT" relax_cuda_50.json 2>/dev/null && rm -f "$OUT/relax_cuda_50.json"
stamp optimiser cost per step  # the optimisers alone (free random forces): launches, not arithmetic
timeout 90 python3 -m molden.bench.optimizer_step --device cuda --systems 64 --memory 100 --steps 120 --threads 8 \
  --json "$OUT/optimizer_step_cuda.json" 2>&1 | tail -24; check "optimizer step benchmark"
tar rf "$OUT/bench.tar" -C "$OUT" optimizer_step_cuda.json 2>/dev/null && rm -f "$OUT/optimizer_step_cuda.json"
if [ -f "$DATA/s2ef_best.pt" ]; then  # to fmax on the GPU: the scaled guess's fewer force calls, in seconds
  for guess in fixed scaled; do
    stamp "relax to fmax, L-BFGS guess $guess"
    timeout 120 molden relax "$DATA/emt300.h5" --split test_id --model "$DATA/s2ef_best.pt" --method lbfgs \
      --lbfgs-guess $guess --device cuda --out "$OUT/relax_$guess.extxyz" 2>&1 | tail -8; check "relax to fmax, $guess"
    tar rf "$OUT/bench.tar" -C "$OUT" "relax_$guess.json" 2>/dev/null && rm -f "$OUT"/relax_$guess.*
  done
fi
stamp verlet lists  # molden relax's radius graph on the GPU, against a search at every call (BENCHMARKS.md)
timeout 90 python3 -m molden.bench.verlet --device cuda --sizes 1 64 256 --calls 30 --skins 0.5 1.0 \
  --relax-repeats 4 --json "$OUT/verlet_cuda.json" 2>&1 | tail -14; check "verlet benchmark"
tar rf "$OUT/bench.tar" -C "$OUT" verlet_cuda.json 2>/dev/null && rm -f "$OUT/verlet_cuda.json"
stamp radius backends and vesin-torch
timeout 80 python3 examples/gpu/radius_backends.py --out "$OUT/radius_cuda.json" 2>&1 | tail -25; check "radius backends"
tar rf "$OUT/bench.tar" -C "$OUT" radius_cuda.json 2>/dev/null && rm -f "$OUT/radius_cuda.json"
stamp benchmark train
timeout 70 molden benchmark --suite train --device cuda --cache "$DATA/qm9_20k.h5" --out "$OUT/b_train" 2>&1 | tail -25
check "train benchmark"
tar rf "$OUT/bench.tar" -C "$OUT" b_train 2>/dev/null && rm -rf "$OUT/b_train"
stamp graph after noise, filtered against searched  # the corruption alone, edges checked every batch
timeout 60 python3 -m molden.bench.graph_after_noise --searched "$DATA/qm9_20k.h5" --filtered "$DATA/qm9_20k_55.h5" \
  --objective noisy_nodes --batch 128 --repeats 40 --device cuda --json "$OUT/graph_after_noise_cuda.json" 2>&1 | tail -3
check "graph after noise benchmark"
tar rf "$OUT/bench.tar" -C "$OUT" graph_after_noise_cuda.json 2>/dev/null && rm -f "$OUT/graph_after_noise_cuda.json"
stamp benchmark train, graph after noise filtered from a 5.5 Å cache  # the same, without the search
timeout 70 molden benchmark --suite train --device cuda --cache "$DATA/qm9_20k_55.h5" --out "$OUT/b_train_55" 2>&1 | tail -25
check "train benchmark (5.5 Å cache)"
stamp done
tar rf "$OUT/bench.tar" -C "$OUT" b_train_55 2>/dev/null && rm -rf "$OUT/b_train_55"
ls -la "$OUT"
exit $status
