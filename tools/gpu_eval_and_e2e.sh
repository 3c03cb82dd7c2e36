#!/usr/bin/env bash
# One device call: the bundled model's quality-vs-speed report and the Wan-1.3B e2e forward benchmark.
# Usage on the GPU machine, from the repo root: bash tools/gpu_eval_and_e2e.sh  (writes under $OUT)
set -uo pipefail
source tools/devsetup.sh || exit 1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/eval"
cd /tmp  # keep the repo root off sys.path (its dit_sparse/ lacks the mapped subpackages)
R=$OLDPWD
timeout ${EVAL_TIMEOUT:-300} python3 -m dit_sparse.pipelines.cli eval --methods ${METHODS:-semantic,pooled,window3d,full+skip,semantic+skip} \
  --sparsities ${SPARSITIES:-0.75,0.9,0.95} --prompts ${PROMPTS:-8} --steps 30 --out "$OUT/eval" 2>&1 | tee "$OUT/eval.log" | grep -v "it/s]"
timeout ${E2E_TIMEOUT:-240} python3 -m dit_sparse.pipelines.cli bench e2e --models ${E2E_MODELS:-wan1.3b-480p} \
  --methods "${E2E_METHODS:-semantic;semantic[replan_every=5];window3d;window3d[block=128];pooled}" --sparsities 0.9,0.95 --reps 3 --out "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.log"
