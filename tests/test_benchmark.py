"""scripts/benchmark.py times the real training step and prints one JSON line."""

import gzip
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_prints_one_json_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "benchmark.py"),
            "--n-way",
            "2",
            "--k-spt",
            "1",
            "--k-qry",
            "2",
            "--task-num",
            "2",
            "--inner-steps",
            "2",
            "--steps",
            "2",
            "--warmup",
            "0",
            "--rounds",
            "1",
            "--conv-impl",
            "lax",
            "--cpu-devices",
            "2",
            "--profile",
            str(tmp_path / "profile"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["task_num"] == 2 and out["inner_steps"] == 2 and out["platform"] == "cpu"
    assert out["num_devices"] == 2
    assert out["tasks_per_s"] > 0 and out["compile_s"] > 0
    assert out["temp_mib"] > 0  # compiled scratch memory, reported on the CPU too
    assert abs(out["tasks_per_s"] - out["task_num"] / out["s_per_step"]) < 1e-6 * out["tasks_per_s"]
    profile = out["profile"]
    assert "error" not in profile, profile
    assert profile["where"] == "host" and profile["ops_per_step"] > 10
    assert 0 < profile["busy_ms_per_step"] <= profile["window_ms_per_step"]
    assert 0 < profile["busy_fraction"] <= 1
    # Small enough to bring back from a device machine (the HLO protos, image bank
    # and all, made it 20 MB).
    assert sum(f.stat().st_size for f in (tmp_path / "profile").rglob("*")) < 4 * 2**20
    saved = json.loads((tmp_path / "profile" / "profile_summary.json").read_text())
    assert saved["top_ops"][:5] == profile["top_ops"]


def test_trace_summary_counts_device_ops_and_their_union(tmp_path):
    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts" / "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
    ]

    def op(pid, ts, dur, name):
        return {"ph": "X", "pid": pid, "tid": 7, "ts": ts, "dur": dur, "args": {"hlo_op": name}}

    # Two overlapping kernels, a gap, a third; a host-side launch that must not count.
    events = [op(2, 0, 10, "a"), op(2, 5, 10, "b"), op(2, 20, 10, "a"), op(1, 0, 100, "a")]
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": meta + events}, f)
    summary = benchmark.summarize_trace(path, steps=2)
    assert summary["where"] == "device" and summary["ops_per_step"] == 1.5
    assert summary["busy_ms_per_step"] == pytest.approx(0.0125)  # 25 us of 30 over 2 steps
    assert summary["window_ms_per_step"] == pytest.approx(0.015)
    assert summary["busy_fraction"] == pytest.approx(25 / 30)
    top = summary["top_ops"]
    assert [o["hlo_op"] for o in top] == ["a", "b"]
    assert top[0]["calls_per_step"] == 1 and top[0]["share"] == pytest.approx(20 / 30)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task-num", "0"], "--task-num=0"),
        (["--task-num", "3", "--cpu-devices", "2"], "must be a multiple of the 2 devices"),
        (["--k-spt", "10"], "--k-spt + --k-qry = 25 is invalid"),
        (["--n-way", "500"], "--n-way=500 is invalid: it must be at most 423"),
        (["--conv-impl", "fft"], "invalid choice: 'fft'"),
        (["--inner-lr", "0"], "--inner-lr=0.0 is invalid"),
        (["--compare-peer", "/no/such/python"], "--compare-peer=/no/such/python is not"),
        pytest.param(
            ["--compare-peer", sys.executable],
            "cannot import torch and numpy: ModuleNotFound",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("torch") is not None, reason="torch is installed here"
            ),
        ),
        (["--profile", "/dev/null/profile"], "--profile=/dev/null/profile cannot be made"),
    ],
)
def test_benchmark_rejects_bad_sizes(args, message):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 2 and message in result.stderr


def test_benchmark_refuses_a_meta_batch_the_visible_devices_do_not_divide():
    # Devices it does not set itself (a 3-GPU node): was a ConfigError traceback.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=3")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--task-num", "4"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: --task-num=4 must be a multiple of the 3 devices")


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts" / "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    return benchmark


def test_a_tilde_in_profile_is_the_home_directory(tmp_path, monkeypatch):
    # The shell leaves the ~ of "--profile=~/trace" as it is: the trace went to ./~/trace.
    monkeypatch.setenv("HOME", str(tmp_path))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    args = _load_benchmark().parse_args(["--profile=~/trace"])
    assert args.profile == str(tmp_path / "trace") and (tmp_path / "trace").is_dir()


def test_a_wrong_data_dir_names_only_the_benchmarks_flags(tmp_path, monkeypatch, capsys):
    # It told the user to set --config.download=True, a flag the benchmark has not.
    monkeypatch.setenv("MAML_CACHE_DIR", str(tmp_path / "cache"))  # no cache: the data is read
    benchmark = _load_benchmark()
    with pytest.raises(SystemExit) as info:
        benchmark.build(benchmark.parse_args(["--data-dir", str(tmp_path)]))
    error = capsys.readouterr().err.strip()
    assert info.value.code == 2 and error.startswith("error: Omniglot")
    assert "--data-dir or TFDS_DATA_DIR" in error and "--config." not in error


@pytest.mark.parametrize(
    "args, message",
    [  # 2**31 overflowed JAX's 32-bit counts with a traceback; validation named config fields
        (["--steps", str(2**31)], "--steps=2147483648 must be below 2**31"),
        (["--inner-steps", str(2**31)], "--inner-steps=2147483648 is invalid"),
        (["--task-num", str(2**31)], "--task-num=2147483648 is invalid"),
    ],
)
def test_benchmark_refuses_counts_past_32_bits(capsys, args, message):
    with pytest.raises(SystemExit) as info:
        _load_benchmark().parse_args(args)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 2 and message in error and "config." not in error


def test_benchmark_out_of_memory_is_one_line(monkeypatch, capsys):
    import jax

    def time_ours(args):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 9 bytes.")

    benchmark = _load_benchmark()
    monkeypatch.setattr(benchmark, "time_ours", time_ours)
    with pytest.raises(SystemExit) as info:
        benchmark.main(["--task-num", "4096"])
    assert info.value.code == 2
    assert (
        capsys.readouterr().err
        == "error: out of memory at --task-num=4096 (Out of memory allocating 9 bytes): "
        "lower it, or pass --remat\n"
    )


def test_first_order_flag_is_fomaml():
    benchmark = _load_benchmark()
    args = benchmark.parse_args(["--first-order"])
    assert args.algorithm == "fomaml" and benchmark.make_config(args).algorithm == "fomaml"
    assert benchmark.make_config(benchmark.parse_args([])).algorithm == "maml"
    with pytest.raises(SystemExit) as info:
        benchmark.parse_args(["--first-order", "--algorithm", "imaml"])
    assert info.value.code == 2


def _stub_torch(tmp_path, monkeypatch):
    """An empty ``torch`` module for the subprocesses: the interpreter given as
    --compare-peer is checked to import torch before our side compiles."""
    (tmp_path / "stub").mkdir()
    (tmp_path / "stub" / "torch.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "stub"))


@pytest.mark.parametrize(
    "peer_code, message",
    [
        ("import sys; sys.exit('RuntimeError: CUDA out of memory')", "exit status 1): Runtime"),
        ("print('no json here')", "the peer printed no JSON line: 'no json here'"),
    ],
)
def test_a_failing_peer_keeps_our_timings(tmp_path, monkeypatch, capsys, peer_code, message):
    benchmark = _load_benchmark()
    monkeypatch.setattr(benchmark, "time_ours", lambda args: ({}, lambda: 1.0, None))
    peer = tmp_path / "peer.py"
    peer.write_text(peer_code)
    _stub_torch(tmp_path, monkeypatch)
    with pytest.raises(SystemExit) as info:
        benchmark.main(["--steps", "2", "--rounds", "2", "--compare-peer", sys.executable,
                        "--peer-script", str(peer)])  # fmt: skip
    assert info.value.code == 2
    captured = capsys.readouterr()
    out = json.loads(captured.out)  # our timings, printed before the error
    assert out["tasks_per_s"] == pytest.approx(32 * 2) and message in out["peer_error"]
    assert "speedup_vs_peer" not in out
    assert captured.err.strip() == f"error: {out['peer_error']}"


def test_ratio_is_of_medians_and_peer_gets_our_shapes(tmp_path, monkeypatch, capsys):
    """The ratio is ours over the peer's, of the medians (not the median of per-round
    ratios, 0.625 here); the peer gets our shapes and always warms up."""
    benchmark = _load_benchmark()
    seconds = iter([1.0, 2.0])  # per call of --steps 4 of --task-num 6: 24 then 12 tasks/s
    monkeypatch.setattr(benchmark, "time_ours", lambda args: ({}, lambda: next(seconds), None))
    peer, calls = tmp_path / "peer.py", tmp_path / "calls.jsonl"
    peer.write_text(
        "import json, sys\n"
        f"calls = {str(calls)!r}\n"
        "with open(calls, 'a') as f:\n"
        "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "rate = [24.0, 48.0][len(open(calls).readlines()) - 1]\n"
        "print('peer log line')\n"
        "print(json.dumps({'tasks_per_s': rate}))\n"
    )
    argv = ["--task-num", "6", "--n-way", "3", "--k-spt", "2", "--k-qry", "4", "--steps", "4"]
    argv += ["--inner-steps", "2", "--inner-lr", "0.3", "--rounds", "2", "--peer-steps", "3"]
    argv += ["--warmup", "0"]  # ours; the peer's first (cuDNN autotuning) step is never timed
    _stub_torch(tmp_path, monkeypatch)
    benchmark.main([*argv, "--compare-peer", sys.executable, "--peer-script", str(peer)])
    out = json.loads(capsys.readouterr().out)
    assert out["tasks_per_s"] == pytest.approx(18.0)  # the median of 24 and 12
    assert out["peer_tasks_per_s"] == pytest.approx(36.0)  # the median of 24 and 48
    assert out["speedup_vs_peer"] == pytest.approx(0.5)  # above 1: ours is faster
    # The spread behind the medians: each side's rounds, and each round's ratio.
    assert out["tasks_per_s_rounds"] == pytest.approx([24.0, 12.0])
    assert out["peer_tasks_per_s_rounds"] == pytest.approx([24.0, 48.0])
    assert out["speedup_per_round"] == pytest.approx([1.0, 0.25])
    assert out["s_per_step"] == pytest.approx(1.5 / 4)
    runs = [json.loads(line) for line in calls.read_text().splitlines()]
    assert len(runs) == 2
    flags = dict(zip(runs[0][::2], runs[0][1::2], strict=True))
    assert flags == {
        "--device": "cpu", "--n-way": "3", "--k-spt": "2", "--k-qry": "4", "--task-num": "6",
        "--inner-steps": "2", "--inner-lr": "0.3", "--steps": "3", "--warmup": "1",
    }  # fmt: skip


def test_time_ours_times_one_call_of_steps_after_compile_and_warmup(monkeypatch):
    """A fake clock and an asynchronous fake chunk: compiling costs 100 s, the warmup
    call 10 s and each timed call 1 s a step, paid when its result is waited for."""
    benchmark = _load_benchmark()
    clock, pending, calls = [0.0], [0.0], []

    def wait(x):  # jax.block_until_ready: the dispatched work finishes now
        clock[0] += pending[0]
        pending[0] = 0.0
        return x

    class Chunk:
        def lower(self, state, steps):
            def compile():
                clock[0] += 100.0
                return "compiled"

            return types.SimpleNamespace(compile=compile)

        def __call__(self, state, steps):
            calls.append(steps)
            pending[0] += 10.0 if len(calls) == 1 else 1.0 * steps
            return state + 1, {"loss": np.full(steps, 0.5 if state < 2 else np.nan)}

    fake_train = types.SimpleNamespace(
        root_keys=lambda seed: (None, None),
        make_train_chunk=lambda exp, key: Chunk(),
        init_state=lambda exp: 0,
    )
    monkeypatch.setattr(benchmark, "build", lambda args: None)
    monkeypatch.setattr(benchmark, "train", fake_train)
    monkeypatch.setattr(benchmark, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(benchmark.analysis, "compiled_memory", lambda c: {"temp": 3 * 2**20})
    monkeypatch.setattr(benchmark.jax, "block_until_ready", wait)
    args = benchmark.parse_args(["--steps", "3", "--warmup", "1"])
    result, timed, _ = benchmark.time_ours(args)
    assert result["compile_s"] == 100.0 and result["temp_mib"] == 3.0
    assert calls == [3]  # the warmup, waited for before any timing
    assert timed() == 3.0 and calls == [3, 3]
    with pytest.raises(FloatingPointError, match="meta-loss became nan"):
        timed()  # the state advances from call to call: the third sees a NaN loss
