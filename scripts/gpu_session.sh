#!/usr/bin/env bash
# All GPU checks in one prepared run, within a wall-clock budget (seconds, $1,
# default 540): the benchmark against the PyTorch peer on shapes A, B, C, the
# memory of remat, then Finn's Table-1 Omniglot runs, each trained for as long
# as the budget allows (a run cut short saves a checkpoint) and evaluated.
# Results go to $OUT (default ./gpu_out), as few files as the device tool brings
# back (8, two folders down at most): session.log, bench.jsonl (one JSON line
# per benchmark, A's with a profile summary), logs.tar.gz (every step's log and
# A's Perfetto trace, re-packed after each step) and run_VARIANT.tar.gz per
# training run (metrics, eval.json, checkpoints, best_checkpoint).
#
# Needs the Omniglot cache (MAML_CACHE_DIR, default ./.cache/maml) rather than
# tensorflow-datasets; wheels in ./.whl are installed first when present. The
# device machine gets the checkout only, not ../shared: carry a copy of the peer
# as .peer/peer_torchfunc.py (cp ../shared/bench/peer_torchfunc.py .peer/) and
# of Lake et al.'s runs as .runs/all_runs.zip, which ",background" 20-way runs
# are evaluated on. BENCH=0 skips the benchmarks; PLAN="variant cap reserve;..."
# replaces the training plan, e.g. PLAN="20way1shot,background 470 0". A run
# cut short comes back as run_NAME.tar.gz; carried as .runs/run_NAME.tar.gz
# into a later call, the same plan item resumes it from its last checkpoint.
# What is missing is named in session.log and stops the run (exit 2) at once.
#
# A session's 15 minutes of device time hold one such call, not two (the
# machine's start counts too): `bash scripts/gpu_session.sh 590` with the device
# tool's timeout_s 600, which leaves the last archive 10 s (with less device time
# left, a budget that much smaller). Archives are written beside and renamed, so a
# call cut off early still returns whole ones. It stops at once where JAX sees no
# GPU; ALLOW_CPU=1 runs it anyway (a dry run on a CPU machine, with a stub nvidia-smi).
#
# Before the call, in the checkout (all git-ignored; then carry .cache .whl .peer .runs):
#   python3 -c "from maml.tasks.omniglot import load_images as l; \
#     l(data_dir='../shared/data/tfds', cache_dir='.cache/maml')"   # 25 MB, ~20 s
#   mkdir -p .whl .peer .runs && cp /opt/pypi/files/ml_collections-*.whl .whl/
#   cp ../shared/bench/peer_torchfunc.py .peer/
#   cp ../shared/data/omniglot_one_shot_runs/all_runs.zip .runs/
set -u
budget=${1:-540}
start=$(date +%s)
OUT=${OUT:-$PWD/gpu_out}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
logs=$work/logs runs=$work/runs
mkdir -p "$OUT" "$logs" "$runs"
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
eval_seconds() { local t=$(( $(left) - 10 )); echo $(( t > 90 ? 90 : t )); }  # what is left, at most 90
log() { echo "[$(($(date +%s) - start))s] $*" | tee -a "$OUT/session.log"; }
# Written beside, then renamed: a call cut off mid-write keeps the previous archive.
pack() { tar -czf "$OUT/.$1.part" -C "$2" "$3" && mv -f "$OUT/.$1.part" "$OUT/$1"; }
pack_logs() { pack logs.tar.gz "$work" logs; }

nvidia-smi -L | tee -a "$OUT/session.log"
python3 -c "import jax, flax, optax, orbax.checkpoint, ml_collections; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/session.log"

# What was not carried fails here, in seconds, not step by step in the logs.
plan=("5way5shot 330 60" "20way1shot 330 0" "20way5shot 400 0" "5way1shot 220 0")
[ -n "${PLAN:-}" ] && IFS=';' read -r -a plan <<<"$PLAN"
# Whether a variant is scored on Lake's runs: 20-way 1-shot on the background split,
# its parts in any order.
lake() { [[ ,$1, == *,20way1shot,* && ,$1, == *,background,* ]]; }
missing=()
python3 -c "import ml_collections" 2>/dev/null || missing+=("ml_collections (carry its wheel in .whl/)")
# A CUDA plugin that fails to load leaves JAX on the CPU: the whole budget would
# go to CPU training. ALLOW_CPU=1 for a dry run on a machine without a GPU.
[ "${ALLOW_CPU:-0}" = 1 ] || python3 -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" \
  2>/dev/null || missing+=("a JAX GPU backend (jax.default_backend() is not gpu; ALLOW_CPU=1 to run anyway)")
cache=$MAML_CACHE_DIR/omniglot-3.0.0-28.npz
[ ${#plan[@]} -gt 0 ] && [ ! -f "$cache" ] && missing+=("the Omniglot cache $cache (carry .cache)")
for item in "${plan[@]}"; do  # a malformed item would end the plan loop in a bash error
  read -r v c r extra <<<"$item"
  [[ -n ${v:-} && ${c:-} =~ ^[0-9]+$ && ${r:-0} =~ ^-?[0-9]+$ && -z ${extra:-} ]] \
    || missing+=("a plan item 'variant cap [reserve]', variant without spaces (got '$item')")
  lake "${v:-}" && [ ! -f .runs/all_runs.zip ] \
    && [ ! -f ../shared/data/omniglot_one_shot_runs/all_runs.zip ] && missing+=(".runs/all_runs.zip")
done
[ "${BENCH:-1}" != 0 ] && [ ! -f .peer/peer_torchfunc.py ] \
  && [ ! -f ../shared/bench/peer_torchfunc.py ] && missing+=(".peer/peer_torchfunc.py")
if [ ${#missing[@]} -gt 0 ]; then
  for m in "${missing[@]}"; do log "missing: $m"; done
  exit 2
fi

bench() {  # name, then benchmark flags
  local name=$1; shift
  [ "$(left)" -lt 160 ] && { log "no time left for bench $name"; return; }
  log "bench $name $*"
  timeout 150 python3 scripts/benchmark.py "$@" >>"$OUT/bench.jsonl" 2>>"$logs/bench.err" \
    || log "bench $name failed: $(tail -2 "$logs/bench.err")"
  pack_logs
}
if [ "${BENCH:-1}" != 0 ]; then
peer_script=.peer/peer_torchfunc.py
[ -f "$peer_script" ] || peer_script=../shared/bench/peer_torchfunc.py
peer=(--compare-peer python3 --peer-script "$peer_script" --steps 100 --peer-steps 20 --rounds 2)
bench A --n-way 5 --k-spt 1 --k-qry 15 --task-num 32 --inner-steps 1 --inner-lr 0.4 "${peer[@]}"
bench B --n-way 20 --k-spt 1 --k-qry 15 --task-num 16 --inner-steps 5 --inner-lr 0.1 "${peer[@]}"
bench C --n-way 5 --k-spt 5 --k-qry 15 --task-num 32 --inner-steps 5 --inner-lr 0.4 "${peer[@]}"
# Where A's step goes: kernel time, device idle share, the costliest ops.
bench A-profile --n-way 5 --k-spt 1 --k-qry 15 --task-num 32 --inner-steps 1 --inner-lr 0.4 \
  --steps 10 --rounds 1 --profile "$logs/profile_A"
# The Perfetto trace and its summary are what comes back; the raw XPlane is large.
# (perfetto_trace.json.gz is kept; HOST.trace.json.gz is a second copy of it)
rm -f "$logs"/profile_A/plugins/profile/*/*.xplane.pb "$logs"/profile_A/plugins/profile/*/*.trace.json.gz
pack_logs
# Is A bound by kernel launches? The same step with XLA's CUDA graphs (command
# buffers) off, then with the scan's loop body captured too.
a_alone=(--n-way 5 --k-spt 1 --k-qry 15 --task-num 32 --inner-steps 1 --inner-lr 0.4 --steps 100 --rounds 2)
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" bench A-no-graphs "${a_alone[@]}"
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE" \
  bench A-graph-loops "${a_alone[@]}"
bench A-phases --n-way 5 --k-spt 1 --k-qry 15 --task-num 32 --inner-steps 1 --inner-lr 0.4 --conv-impl phases --steps 100 --rounds 2
bench B-remat --n-way 20 --k-spt 1 --k-qry 15 --task-num 16 --inner-steps 5 --inner-lr 0.1 --remat --steps 50 --rounds 2
tail -n +1 "$OUT/bench.jsonl"
fi

train_and_eval() {  # variant, seconds for training
  local variant=$1 seconds=$2 name=${1//,/_}
  local dir=$runs/$name
  # A run brought back by an earlier call and carried as .runs/run_NAME.tar.gz resumes.
  if [ -f ".runs/run_$name.tar.gz" ]; then
    tar -xzf ".runs/run_$name.tar.gz" -C "$runs" && log "resuming $variant from .runs/run_$name.tar.gz"
    # The last call's results (the caller still has them): kept, they would come back
    # beside this call's checkpoints as if they were of them.
    rm -f "$dir"/eval*.json "$dir"/one_shot_runs*.json "$dir"/plots/eval*.png
  fi
  log "train $variant for at most ${seconds}s"
  # SIGINT is honoured between chunks of log_every steps: 100 keeps a chunk well
  # inside the 30 s grace before SIGKILL (500, the default, need not be).
  timeout -s INT -k 30 "$seconds" python3 scripts/train.py \
    --config="maml/configs/omniglot.py:$variant" --workdir="$dir" --config.log_every=100 \
    >"$logs/train_$name.log" 2>&1
  local rc=$?
  log "train $variant exit $rc at step $(tail -1 "$dir/metrics.jsonl" 2>/dev/null | cut -c1-120)"
  [ "$rc" = 0 ] || [ "$rc" = 124 ] || log "train $variant: $(tail -1 "$logs/train_$name.log")"
  # (orbax creates checkpoints/ before its first save: look for a step's folder)
  find "$dir/checkpoints" -mindepth 1 -maxdepth 1 -type d -regex '.*/[0-9]+' 2>/dev/null | grep -q . \
    || { log "no checkpoint of $variant to evaluate"; pack_logs; return; }
  # Back in $OUT before evaluating: if the device call's limit cuts what follows,
  # the checkpoint still comes back.
  pack "run_$name.tar.gz" "$runs" "$name"
  pack_logs
  local t rows
  # Lake's 20 runs (seconds) before the 600 test tasks, which may not fit after them.
  if lake "$variant"; then
    runs_zip=.runs/all_runs.zip
    [ -f "$runs_zip" ] || runs_zip=../shared/data/omniglot_one_shot_runs/all_runs.zip
    t=$(eval_seconds)
    if [ "$t" -lt 20 ]; then
      log "no time left to score Lake's runs"
    else
      timeout -k 5 "$t" python3 scripts/evaluate_one_shot_runs.py \
        --config="maml/configs/omniglot.py:$variant" --workdir="$dir" --runs="$runs_zip" \
        >"$logs/one_shot_runs_$name.log" 2>&1
      rc=$?
      rows=$(grep -- '<- report step' "$logs/one_shot_runs_$name.log")
      log "one-shot runs $variant exit $rc: ${rows:-$(tail -1 "$logs/one_shot_runs_$name.log")}"
      pack "run_$name.tar.gz" "$runs" "$name"
    fi
  fi
  t=$(eval_seconds)
  [ "$t" -lt 20 ] && { log "no time left to evaluate $variant"; pack_logs; return; }
  timeout -k 5 "$t" python3 scripts/evaluate.py --config="maml/configs/omniglot.py:$variant" \
    --workdir="$dir" >"$logs/eval_$name.log" 2>&1
  rc=$?
  # The table's rows after 1, 3 and 5 steps (Finn reports 3 at 5-way, 5 at 20-way).
  rows=$(grep -E '^ +[135] \|' "$logs/eval_$name.log" | tr -s ' \n' ' ')
  log "eval $variant exit $rc: ${rows:-$(tail -1 "$logs/eval_$name.log")}"
  pack "run_$name.tar.gz" "$runs" "$name"  # now with eval.json
  pack_logs
}
# Finn's Table 1 (the plan above), the rows not yet reproduced on a GPU first
# (5-way 1-shot, done in 132 s on an H100, last). Each item is "variant cap
# reserve": the run trains for at most cap seconds and leaves reserve seconds,
# plus 60 for its own evaluation, to the items after it; a run cut short saves
# a checkpoint and is evaluated. Evaluations get what is left, at most 90 s.
for item in "${plan[@]}"; do
  read -r variant cap reserve <<<"$item"
  share=$(( $(left) - reserve - 60 ))
  [ "$share" -gt "$cap" ] && share=$cap
  [ "$share" -lt 45 ] && { log "no time left for $variant (${share}s of training, under 45)"; continue; }
  train_and_eval "$variant" "$share"
done
log "done"
