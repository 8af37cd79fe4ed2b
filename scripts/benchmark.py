"""Times the real jitted meta-training step on Omniglot episode shapes.

Same flags and model as the PyTorch peer (../shared/bench/peer_torchfunc.py):

    python scripts/benchmark.py --n-way 5 --k-spt 1 --k-qry 15 --task-num 32 --inner-steps 1
    python scripts/benchmark.py ... --compare-peer /tmp/peer/bin/python

It times ``maml.train``'s own training chunk (episodes sampled on the device
from a resident image bank, second-order meta-gradient, Adam update, donated
state) over ``--steps`` meta-steps per device call, and prints one JSON line:
``tasks_per_s``, ``s_per_step``, ``compile_s``, memory, the device. With
``--compare-peer PYTHON`` it runs the peer with that interpreter in the same
invocation, alternating ours and theirs ``--rounds`` times, and adds the
peer's figures and the ratio of the medians; both sides' per-round rates and
each round's ratio are in the line too, for the spread. With ``--profile DIR`` one more
call runs under ``jax.profiler`` (a Perfetto trace in DIR) and the JSON line
gains a summary of it: the device time a step spends in XLA ops, the fraction
of the traced window in which an op ran (low means launch- or host-bound), and
the ops that cost most.

The image bank is random uint8 data of Omniglot's shape (1100 classes x 20
drawings x 28 x 28) unless ``--data-dir`` points at the prepared dataset: the
step's computation is the same either way, as it is for the peer's random
tensors.
"""

import argparse
import gzip
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maml import analysis, train
from maml.configs import ConfigError, validate
from maml.configs import omniglot as omniglot_config
from maml.ops import CONV_IMPLS
from maml.tasks.omniglot import DatasetNotFoundError, Omniglot

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT.parent / "shared" / "bench" / "peer_torchfunc.py"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags, checked before any compute (a bad one: argparse's usage line, exit 2)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-way", type=int, default=5)
    p.add_argument("--k-spt", type=int, default=1)
    p.add_argument("--k-qry", type=int, default=15)
    p.add_argument("--task-num", type=int, default=32)
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--inner-lr", type=float, default=0.4)
    p.add_argument("--steps", type=int, default=20, help="meta-steps per timed device call")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after compiling")
    p.add_argument("--rounds", type=int, default=3, help="timed calls (and peer runs)")
    p.add_argument("--first-order", action="store_true")
    p.add_argument("--algorithm", default="maml", choices=("maml", "fomaml", "imaml"))
    p.add_argument("--remat", action="store_true", help="rematerialise the inner steps")
    p.add_argument("--conv-impl", default="patches", choices=CONV_IMPLS)
    p.add_argument("--data-dir", default="", help="use the real Omniglot images")
    p.add_argument(
        "--compare-peer",
        metavar="PYTHON",
        default="",
        help="interpreter with torch to run the peer with, interleaved",
    )
    p.add_argument("--peer-script", default=str(PEER))
    p.add_argument("--peer-steps", type=int, default=0, help="peer steps (default --steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", metavar="DIR", default="", help="trace one more call into DIR")
    p.add_argument(
        "--cpu-devices",
        type=int,
        help="on the CPU, split the cores into this many XLA devices and shard the tasks "
        "(default: JAX's, 1 or XLA_FLAGS=--xla_force_host_platform_device_count)",
    )
    args = p.parse_args(argv)
    for name in ("n_way", "k_spt", "k_qry", "task_num", "steps", "rounds", "cpu_devices"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.first_order:  # the peer's flag, for fomaml
        if args.algorithm == "imaml":
            p.error("--first-order is first-order MAML: drop it or --algorithm=imaml")
        args.algorithm = "fomaml"
    for name in ("inner_steps", "warmup", "peer_steps"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 0")
    if args.steps >= 2**31:  # a scan's length: JAX counts it in 32-bit integers
        p.error(f"--steps={args.steps} must be below 2**31")
    if args.compare_peer:
        if not shutil.which(args.compare_peer):
            p.error(f"--compare-peer={args.compare_peer} is not an executable Python")
        if not Path(args.peer_script).is_file():
            p.error(f"--peer-script={args.peer_script} does not exist")
        try:  # here, not after our side has compiled and run
            check = subprocess.run(
                [args.compare_peer, "-c", "import numpy, torch"],
                capture_output=True,
                text=True,
                timeout=300,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            p.error(f"--compare-peer={args.compare_peer} does not run: {e}")
        if check.returncode:
            last = (check.stderr.strip().splitlines() or ["no output"])[-1]
            p.error(f"--compare-peer={args.compare_peer} cannot import torch and numpy: {last}")
    if args.profile:
        args.profile = os.path.expanduser(args.profile)  # the shell leaves the ~ of --profile=~/x
        try:  # here, not after the timings
            Path(args.profile).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            p.error(f"--profile={args.profile} cannot be made: {e}")
    try:  # what the shapes ask of Omniglot: drawings per class, classes
        validate(make_config(args))
    except ConfigError as e:
        p.error(
            str(e)
            .replace("config.num_shots", "--k-spt")
            .replace("config.num_query", "--k-qry")
            .replace("config.num_ways", "--n-way")
            .replace("config.meta_batch_size", "--task-num")
            .replace("config.num_inner_steps", "--inner-steps")
            .replace("config.inner_lr", "--inner-lr")
            .replace("config.seed", "--seed")
        )
    return args


def make_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """The Omniglot config with the flags' shapes, algorithm and settings (no validation runs)."""
    config = omniglot_config.get_config()
    config.lock()  # a field the config lacks is an error, not a silent no-op
    config.update(
        num_ways=args.n_way,
        num_shots=args.k_spt,
        num_query=args.k_qry,
        meta_batch_size=args.task_num,
        num_inner_steps=args.inner_steps,
        inner_lr=args.inner_lr,
        algorithm=args.algorithm,
        remat=args.remat,
        conv_impl=args.conv_impl,
        seed=args.seed,
        data_dir=args.data_dir,
        eval_every=0,
    )
    return config


def build(args: argparse.Namespace) -> train.Experiment:
    """The experiment, on random images of Omniglot's shape unless ``--data-dir`` is set."""
    config = make_config(args)
    if args.data_dir:
        try:
            return train.build_experiment(config, "train")
        except DatasetNotFoundError as e:
            message = str(e).replace("--config.data_dir", "--data-dir")
            # No flag here downloads it.
            message = re.sub(r", or set --config\.download=True[^)]*\)", "", message)
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)
    rng = np.random.default_rng(args.seed)
    images = jnp.asarray(rng.integers(0, 256, (1100, 20, 28, 28), dtype=np.uint8))
    task = Omniglot(
        images=images,
        num_ways=args.n_way,
        num_shots=args.k_spt,
        num_query=args.k_qry,
        rotate=config.rotate,
    )
    return train.build_experiment(config, task=task)


def time_ours(
    args: argparse.Namespace,
) -> tuple[dict, Callable[[], float], Callable[[str], dict]]:
    """Compiles and warms up the training chunk of ``--steps`` meta-steps.

    Returns:
      ``(result, timed, profiled)``: the compile time, memory and device as a dict;
      ``timed()``, the seconds of one more device call; ``profiled(log_dir)``, one
      more call under ``jax.profiler``, its ``summarize_trace``.
    """
    exp = build(args)
    train_key, _ = train.root_keys(args.seed)
    chunk = train.make_train_chunk(exp, train_key)
    state = train.init_state(exp)
    t0 = time.perf_counter()
    compiled = chunk.lower(state, args.steps).compile()
    compile_s = time.perf_counter() - t0
    memory = analysis.compiled_memory(compiled) or {}
    for _ in range(args.warmup):
        state, metrics = chunk(state, args.steps)
    jax.block_until_ready(state)

    def timed():
        nonlocal state
        t = time.perf_counter()
        state, metrics = chunk(state, args.steps)
        jax.block_until_ready((state, metrics))
        loss = float(metrics["loss"][-1])
        if not np.isfinite(loss):
            raise FloatingPointError(f"meta-loss became {loss}")
        return time.perf_counter() - t

    result = {
        "impl": "maml-jax",
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.default_backend(),
        "num_devices": jax.device_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "compile_s": compile_s,
        "temp_mib": memory["temp"] / 2**20 if "temp" in memory else None,
    }

    def profiled(log_dir: str) -> dict:
        nonlocal state
        # Without the HLO protos: they hold the image bank (a compile-time
        # constant), 20 MB of incompressible bytes in the trace's XPlane file.
        options = jax.profiler.ProfileOptions()
        options.enable_hlo_proto = False
        with jax.profiler.trace(log_dir, create_perfetto_trace=True, profiler_options=options):
            state, metrics = chunk(state, args.steps)
            jax.block_until_ready((state, metrics))
        traces = sorted(Path(log_dir).glob("plugins/profile/*/perfetto_trace.json.gz"))
        if not traces:
            raise FileNotFoundError(f"jax.profiler wrote no perfetto_trace.json.gz in {log_dir}")
        summary = summarize_trace(traces[-1], args.steps)
        Path(log_dir, "profile_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    return result, timed, profiled


def summarize_trace(path: Path, steps: int, *, top: int = 12) -> dict:
    """Per-step totals of the XLA ops in a Perfetto trace of ``steps`` meta-steps.

    Ops are the trace's events tagged with an ``hlo_op``; where the trace has a
    device (``/device:...``) process, only its events count, so that on a GPU
    these are the kernels as the device ran them. ``busy_fraction`` is the
    share of the window from the first op's start to the last op's end in
    which at least one op ran.
    """
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    processes = {
        e["pid"]: e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    ops = [
        e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {}) and e["dur"] > 0
    ]
    device = [e for e in ops if processes.get(e["pid"], "").startswith("/device:")]
    ops = device or ops
    if not ops:
        raise ValueError(f"no XLA ops in the trace {path}")
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in ops)
    busy, end = 0.0, spans[0][0]
    for start, stop in spans:  # the length of the union of the op intervals
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    window = end - spans[0][0]
    by_op: dict[str, list[float]] = {}
    for e in ops:
        by_op.setdefault(e["args"]["hlo_op"], []).append(e["dur"])
    total = sum(e["dur"] for e in ops)
    ranked = sorted(by_op.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {
        "where": "device" if device else "host",
        "ops_per_step": len(ops) / steps,
        "op_ms_per_step": total / 1e3 / steps,
        "busy_ms_per_step": busy / 1e3 / steps,
        "window_ms_per_step": window / 1e3 / steps,
        "busy_fraction": busy / window if window else 1.0,
        "top_ops": [
            {
                "hlo_op": name,
                "ms_per_step": sum(durs) / 1e3 / steps,
                "calls_per_step": len(durs) / steps,
                "share": sum(durs) / total,
            }
            for name, durs in ranked
        ],
    }


def run_peer(args: argparse.Namespace) -> dict:
    """Runs the PyTorch peer once on the same shapes; returns its JSON line as a dict."""
    steps = args.peer_steps or args.steps
    device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    cmd = [
        args.compare_peer,
        args.peer_script,
        "--device",
        device,
        "--n-way",
        str(args.n_way),
        "--k-spt",
        str(args.k_spt),
        "--k-qry",
        str(args.k_qry),
        "--task-num",
        str(args.task_num),
        "--inner-steps",
        str(args.inner_steps),
        "--inner-lr",
        str(args.inner_lr),
        "--steps",
        str(steps),
        "--warmup",
        str(max(args.warmup, 1)),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise PeerError(f"the peer failed (exit status {out.returncode}): {last}")
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise PeerError(f"the peer printed no JSON line: {out.stdout.strip()[-200:]!r}") from None


class PeerError(RuntimeError):
    """The peer did not run, or did not report."""


def main(argv: Sequence[str] | None = None) -> None:
    """Times ours (and the peer, interleaved) and prints one JSON line."""
    args = parse_args(argv)
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    if args.task_num % jax.device_count():
        print(
            f"error: --task-num={args.task_num} must be a multiple of the "
            f"{jax.device_count()} devices the tasks are sharded over, or use fewer devices "
            "(--cpu-devices on the CPU, CUDA_VISIBLE_DEVICES on GPUs)",
            file=sys.stderr,
        )
        sys.exit(2)
    if args.compare_peer and args.algorithm != "maml":
        print("error: the peer runs second-order MAML only; drop --compare-peer", file=sys.stderr)
        sys.exit(2)
    try:
        result, timed, profiled = time_ours(args)
    except jax.errors.JaxRuntimeError as e:
        reason = train.out_of_memory_reason(e)
        if reason is None:
            raise
        print(
            f"error: out of memory at --task-num={args.task_num} ({reason}): lower it, "
            "or pass --remat",
            file=sys.stderr,
        )
        sys.exit(2)
    ours, peers, peer_error = [], [], None
    for _ in range(args.rounds):
        ours.append(timed())
        if args.compare_peer and not peer_error:
            try:
                peers.append(run_peer(args))
            except PeerError as e:  # our timings still stand: printed, then exit 2
                peer_error = str(e)
    s_per_step = statistics.median(ours) / args.steps
    # Both sides' tasks/s as the median of per-round rates, so the ratio is a
    # ratio of medians for an even --rounds too.
    rates = [args.task_num * args.steps / t for t in ours]
    tasks_per_s = statistics.median(rates)
    result.update(
        n_way=args.n_way,
        k_spt=args.k_spt,
        k_qry=args.k_qry,
        task_num=args.task_num,
        inner_steps=args.inner_steps,
        algorithm=args.algorithm,
        remat=args.remat,
        conv_impl=args.conv_impl,
        steps=args.steps,
        s_per_step=s_per_step,
        tasks_per_s=tasks_per_s,
        tasks_per_s_rounds=rates,  # the spread a single median hides
        peak_mem_mib=(analysis.device_peak_bytes() or 0) / 2**20 or None,
    )
    if peer_error:
        result["peer_error"] = peer_error
    elif peers:
        peer_rates = [p["tasks_per_s"] for p in peers]
        peer_tps = statistics.median(peer_rates)
        result.update(
            peer_tasks_per_s=peer_tps,
            peer_tasks_per_s_rounds=peer_rates,
            peer_peak_mem_mib=peers[-1].get("peak_mem_mib"),
            speedup_vs_peer=result["tasks_per_s"] / peer_tps,
            # Round i's call of ours and the peer run right after it: how far the
            # ratio moves within one invocation, which the ratio of medians does not say.
            speedup_per_round=[r / q for r, q in zip(rates, peer_rates, strict=True)],
        )
    if args.profile:
        try:
            summary = profiled(args.profile)
            result["profile"] = {**summary, "top_ops": summary["top_ops"][:5]}
        except Exception as e:  # the timings above stand without the profile
            result["profile"] = {"error": f"{type(e).__name__}: {e}"}
            print(f"warning: profiling failed: {result['profile']['error']}", file=sys.stderr)
    print(json.dumps(result))
    if peer_error:
        print(f"error: {peer_error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
