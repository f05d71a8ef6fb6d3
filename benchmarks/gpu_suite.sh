#!/usr/bin/env bash
# The whole GPU benchmark set in one call on one H100/H200 (issue 9), peers in the same call.
#
#   bash benchmarks/gpu_suite.sh            # one GPU, about 8 minutes
#   HALF=1 bash benchmarks/gpu_suite.sh     # the update half: losses, train step, RL step
#   HALF=2 bash benchmarks/gpu_suite.sh     # the rollout half: sampler and its peers
#   TINY=1 bash benchmarks/gpu_suite.sh     # small shapes on the CPU: checks the script itself
#
# Each half fits one device call of at most 5 minutes; gpu_summary.py reads whichever logs exist.
# Imports only jax, flax, optax, numpy, transformers and torch (plus covjax). The Tunix peer runs
# when its wheel is unpacked: TUNIX_WHEEL (default .whl/google_tunix-0.1.7-py3-none-any.whl,
# from `pip download --no-deps google-tunix==0.1.7 -d .whl/`) and TUNIX_PROBE (default
# build/peers/tunix_probe.py, else ../shared/peers/tunix_probe.py); without them the suite
# prints a "tunix peer | not run" row. Logs and RESULT lines go to
# $OUT (default build/gpu_suite); the last thing printed is one markdown table.
set -uo pipefail
cd "$(dirname "$0")/.." || exit
export OUT=${OUT:-build/gpu_suite}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
TUNIX_WHEEL=${TUNIX_WHEEL:-.whl/google_tunix-0.1.7-py3-none-any.whl}
TUNIX_PROBE=${TUNIX_PROBE:-build/peers/tunix_probe.py}
[[ -f $TUNIX_PROBE || ! -f ../shared/peers/tunix_probe.py ]] || TUNIX_PROBE=../shared/peers/tunix_probe.py
PY=${PYTHON:-python3}

if [[ -n "${TINY:-}" ]]; then
  losses_args=(--size cpu --repeats 3) train_args=(--tiny --peer torch)
  sampler_args=(--tiny) rl_args=(--tiny)
else
  losses_args=(--size paper --primitives) train_args=(--peer torch)
  sampler_args=(--batch "64,256" --peer transformers) rl_args=()
fi

bench() {  # name timeout_s command...: runs one benchmark, its output to the screen and $OUT/name.log
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
}

HALF=${HALF:-all}
if [[ $HALF != 2 ]]; then
  bench losses 60 "$PY" benchmarks/losses.py "${losses_args[@]}"
  bench train_step 130 "$PY" benchmarks/train_step.py "${train_args[@]}"
  bench token_counts 30 "$PY" benchmarks/train_step.py --token-count
  bench rl_step 100 "$PY" benchmarks/rl_step.py "${rl_args[@]}"
fi
if [[ $HALF != 1 ]]; then
  bench sampler 150 "$PY" benchmarks/sampler.py "${sampler_args[@]}"
  if [[ -z "${TINY:-}" && -f "$TUNIX_WHEEL" && -f "$TUNIX_PROBE" ]]; then
    rm -rf build/tunix && "$PY" -m zipfile -e "$TUNIX_WHEEL" build/tunix
    PYTHONPATH=build/tunix bench tunix 100 "$PY" "$TUNIX_PROBE" --size 0.5b \
      --batch "64,256" --prompt_len 128 --new_tokens 256
  else  # never a silent skip: the missing peer is a row of its own
    why="wheel $TUNIX_WHEEL or probe $TUNIX_PROBE absent (BENCHMARKS.md: bringing the peer)"
    [[ -z "${TINY:-}" ]] || why="TINY=1 (CPU shapes)"
    echo "| tunix peer | not run | $why |" | tee "$OUT/tunix.log"
  fi
fi
"$PY" benchmarks/gpu_summary.py "$OUT"
