#!/usr/bin/env bash
# All GPU checks in one prepared run, within a wall-clock budget (seconds, $1,
# default 540): the benchmark against the PyTorch peer on shapes A, B, C, the
# memory of remat, then Finn's Table-1 Omniglot runs, each trained for as long
# as the budget allows (a run cut short saves a checkpoint) and evaluated.
# Results go to $OUT (default ./gpu_out): bench.jsonl, one log per step, and
# runs.tar.gz with every run's metrics, eval.json and last checkpoint.
#
# Needs the Omniglot cache (MAML_CACHE_DIR, default ./.cache/maml) rather than
# tensorflow-datasets; wheels in ./.whl are installed first when present. The
# device machine gets the checkout only, not ../shared: carry a copy of the peer
# as .peer/peer_torchfunc.py (cp ../shared/bench/peer_torchfunc.py .peer/) and
# of Lake et al.'s runs as .runs/all_runs.zip, which ",background" 20-way runs
# are evaluated on. BENCH=0 skips the benchmarks; PLAN="variant cap reserve;..."
# replaces the training plan, e.g. PLAN="20way1shot,background 560 0".
set -u
budget=${1:-540}
start=$(date +%s)
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export MAML_CACHE_DIR=${MAML_CACHE_DIR:-$PWD/.cache/maml}
# Carried wheels: ml_collections always; flax only where the installed one
# lacks the NNX API used here.
install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target /tmp/site "$@" && export PYTHONPATH=$PYTHONPATH:/tmp/site; }
ls .whl/ml_collections-*.whl >/dev/null 2>&1 && install .whl/ml_collections-*.whl
python3 -c "from flax import nnx; nnx.List, nnx.to_pure_dict" 2>/dev/null \
  || { ls .whl/flax-*.whl >/dev/null 2>&1 && install .whl/flax-*.whl; }
left() { echo $((budget - ($(date +%s) - start))); }
log() { echo "[$(($(date +%s) - start))s] $*" | tee -a "$OUT/session.log"; }

nvidia-smi -L | tee -a "$OUT/session.log"
python3 -c "import jax, flax, optax, orbax.checkpoint, ml_collections; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/session.log"

bench() {  # name, then benchmark flags
  local name=$1; shift
  log "bench $name $*"
  timeout 150 python3 scripts/benchmark.py "$@" >>"$OUT/bench.jsonl" 2>>"$OUT/bench.err" \
    || log "bench $name failed: $(tail -2 "$OUT/bench.err")"
}
if [ "${BENCH:-1}" != 0 ]; then
peer_script=.peer/peer_torchfunc.py
[ -f "$peer_script" ] || peer_script=../shared/bench/peer_torchfunc.py
peer=(--compare-peer python3 --peer-script "$peer_script" --steps 100 --peer-steps 20 --rounds 2)
bench A --n-way 5 --k-spt 1 --k-qry 15 --task-num 32 --inner-steps 1 --inner-lr 0.4 "${peer[@]}"
bench B --n-way 20 --k-spt 1 --k-qry 15 --task-num 16 --inner-steps 5 --inner-lr 0.1 "${peer[@]}"
bench C --n-way 5 --k-spt 5 --k-qry 15 --task-num 32 --inner-steps 5 --inner-lr 0.4 "${peer[@]}"
bench A-phases --n-way 5 --k-spt 1 --k-qry 15 --task-num 32 --inner-steps 1 --inner-lr 0.4 --conv-impl phases --steps 100 --rounds 2
bench B-remat --n-way 20 --k-spt 1 --k-qry 15 --task-num 16 --inner-steps 5 --inner-lr 0.1 --remat --steps 50 --rounds 2
tail -n +1 "$OUT/bench.jsonl"
fi

runs=$OUT/runs
mkdir -p "$runs"
train_and_eval() {  # variant, seconds for training
  local variant=$1 seconds=$2 dir=$runs/${1//,/_}
  log "train $variant for at most ${seconds}s"
  timeout -s INT -k 20 "$seconds" python3 scripts/train.py \
    --config="maml/configs/omniglot.py:$variant" --workdir="$dir" >"$OUT/train_${1//,/_}.log" 2>&1
  log "train $variant exit $? at step $(tail -1 "$dir/metrics.jsonl" 2>/dev/null | cut -c1-120)"
  timeout 90 python3 scripts/evaluate.py --config="maml/configs/omniglot.py:$variant" \
    --workdir="$dir" >"$OUT/eval_${1//,/_}.log" 2>&1
  log "eval $variant exit $?: $(grep -A4 -- '---' "$OUT/eval_${1//,/_}.log" | tail -3 | tr '\n' ' ')"
  if [[ $variant == 20way1shot*background* ]]; then
    runs_zip=.runs/all_runs.zip
    [ -f "$runs_zip" ] || runs_zip=../shared/data/omniglot_one_shot_runs/all_runs.zip
    timeout 90 python3 scripts/evaluate_one_shot_runs.py --config="maml/configs/omniglot.py:$variant" \
      --workdir="$dir" --runs="$runs_zip" >"$OUT/one_shot_runs_${1//,/_}.log" 2>&1
    log "one-shot runs $variant exit $?: $(grep -- '<- report step' "$OUT/one_shot_runs_${1//,/_}.log")"
  fi
}
# Finn's Table 1 in order of cost; each run gets at most its cap and leaves the
# later ones their minimum (a run cut short saves a checkpoint and is evaluated).
plan=("5way1shot 220 120" "20way1shot 330 60" "5way5shot 240 0" "20way5shot 400 0")
[ -n "${PLAN:-}" ] && IFS=';' read -r -a plan <<<"$PLAN"
for item in "${plan[@]}"; do
  read -r variant cap reserve <<<"$item"
  share=$(( $(left) - reserve - 60 ))
  [ "$share" -gt "$cap" ] && share=$cap
  [ "$share" -lt 45 ] && { log "no time left for $variant"; continue; }
  train_and_eval "$variant" "$share"
done
tar -czf "$OUT/runs.tar.gz" -C "$OUT" runs && rm -rf "$runs"
log "done"
