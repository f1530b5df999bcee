#!/usr/bin/env bash
# GPU benchmark of flowers_jax against torchvision: one prepared run for a machine with one
# GPU (an H200: Python 3.12, jax CUDA, torch, torchvision, flax, optax, orbax; no tensorflow,
# ml_collections or clu; no network). Writes JSON, logs and a merged table under $OUT.
#
#   OUT=/tmp/gpu bash scripts/gpu_bench.sh            # all phases, about 9 minutes
#   BUDGET_S=300 PHASES="train" bash scripts/gpu_bench.sh
#
# Phases (each model in its own process, so that its JAX peak_bytes_in_use is its own and
# JAX, which does not preallocate here, and torch share the GPU without starving each other):
#   env      versions, nvidia-smi, and a check that the benchmark imports no tensorflow
#   train    batch 128, 224 px: torch float32, torch AMP bf16 + channels_last, JAX bf16, JAX f32
#   compile  torch.compile (AMP + channels_last) rows for resnet18 and vit_b16
#   eval     inference, bf16 / AMP only
#   input    the device input path end to end on Flowers-sized JPEGs (benchmark.py device_input:
#            augment, synthetic-batch and end-to-end img/s; the host tf.data path needs
#            tensorflow, which this machine lacks: benchmark.py input measures it elsewhere)
# A phase starts only while less than BUDGET_S seconds have passed; each process is killed
# after STEP_TIMEOUT_S. Results then go to docs/benchmarks.md by hand.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/gpu_bench}
PY=${PY:-python}
BUDGET_S=${BUDGET_S:-480}
STEP_TIMEOUT_S=${STEP_TIMEOUT_S:-150}
PHASES=${PHASES:-env train compile eval input}
MODELS=${MODELS:-resnet18 efficientnet_b0 vit_b16 resnet18_deform_after_conv1 resnet18_deform_parallel_conv1}
COMMON=(--batch "${BATCH:-128}" --size "${SIZE:-224}" --steps "${STEPS:-20}" --warmup 3)
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # torch runs in the same process
# The checkout's package and the benchmark modules, without installing (the GPU machine has no
# network for the package's dependencies).
export PYTHONPATH="$PWD:$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
START=$SECONDS

in_budget() {  # in_budget PHASE: true while the phase is wanted and time is left
  [[ " $PHASES " == *" $1 "* ]] || return 1
  if (( SECONDS - START >= BUDGET_S )); then
    echo ">> skipping $1: ${BUDGET_S}s budget spent" | tee -a "$OUT/skipped.txt"
    return 1
  fi
}

bench() {  # bench NAME ARGS...: one benchmark process, log and JSON under $OUT/NAME.*
  local name=$1; shift
  echo ">> [$((SECONDS - START))s] $name: $*"
  timeout "$STEP_TIMEOUT_S" "$PY" scripts/benchmark.py "$@" --out "$OUT/$name.json" \
      > "$OUT/$name.log" 2>&1
  local rc=$?
  (( rc == 0 )) || echo "   exit $rc (see $OUT/$name.log)"
  grep -E '^  [a-z]' "$OUT/$name.log" | grep -vE '^  (train|eval):' || tail -3 "$OUT/$name.log"
}

if in_budget env; then
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$PY" - <<'EOF'
import importlib, sys
for m in ('jax', 'jaxlib', 'flax', 'optax', 'orbax.checkpoint', 'torch', 'torchvision', 'numpy'):
  try:
    print(m, importlib.import_module(m).__version__)
  except Exception as e:  # noqa: BLE001
    print(m, 'missing:', type(e).__name__)
import jax, torch
print('jax devices', jax.devices(), 'torch cuda', torch.cuda.is_available(), sys.version)
EOF
    "$PY" -X importtime scripts/benchmark.py train --models resnet18 --batch 8 --size 32 \
        --steps 1 --warmup 0 --dtypes float32 --torch-compile off 2> "$OUT/importtime.txt" \
        | tail -4
    echo "tensorflow modules imported: $(grep -c '| *tensorflow' "$OUT/importtime.txt")"
  } 2>&1 | tee "$OUT/env.txt"
fi

if in_budget train; then
  for m in $MODELS; do
    in_budget train || break
    bench "train_$m" train --models "$m" "${COMMON[@]}" --dtypes bfloat16,float32 \
        --torch-compile off
  done
fi

if in_budget compile; then
  for m in resnet18 vit_b16; do
    in_budget compile || break
    bench "compile_$m" train --models "$m" "${COMMON[@]}" --dtypes bfloat16 \
        --frameworks torch --torch-compile only
  done
fi

if in_budget eval; then
  for m in $MODELS; do
    in_budget eval || break
    bench "eval_$m" eval --models "$m" "${COMMON[@]}" --dtypes bfloat16 --torch-compile off
  done
fi

if in_budget input; then
  bench input_device device_input --models resnet18,efficientnet_b0 --batch "${BATCH:-128}" \
      --size "${SIZE:-224}" --images 1024 --steps "${STEPS:-20}" --dtype bfloat16
  cat "$OUT/input_device.log" | tee -a "$OUT/summary_input.txt"
fi

# One table per mode from every JSON written above.
"$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import glob, json, os, sys, types
from benchmarks import _common
out = sys.argv[1]
for mode in ('train', 'eval'):
  runs = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, '*.json')))]
  runs = [r for r in runs if r['config']['mode'] == mode]
  if not runs:
    continue
  rows = [row for r in runs for row in r['results']]
  args = types.SimpleNamespace(**runs[0]['config'])
  env = runs[0]['env']
  print(f"\n{env.get('jax_device')} | jax {env.get('jax')} | torch {env.get('torch')} | "
        f"torchvision {env.get('torchvision')} | python {env.get('python')}")
  print(_common.table(rows, args) + '\n\n' + _common.side_by_side(rows))
  with open(os.path.join(out, f'gpu_{mode}.json'), 'w') as f:
    json.dump({'config': runs[0]['config'], 'env': env, 'results': rows}, f, indent=2)
EOF
echo ">> done in $((SECONDS - START))s; results in $OUT"
