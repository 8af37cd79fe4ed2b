"""scripts/benchmark.py times the real training step and prints one JSON line."""

import gzip
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

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
        (["--task-num", "3", "--cpu-devices", "2"], "multiple of --cpu-devices=2"),
        (["--k-spt", "10"], "--k-spt + --k-qry = 25 is invalid"),
        (["--n-way", "500"], "--n-way=500 is invalid: it must be at most 423"),
        (["--conv-impl", "fft"], "invalid choice: 'fft'"),
        (["--inner-lr", "0"], "--inner-lr=0.0 is invalid"),
        (["--compare-peer", "/no/such/python"], "--compare-peer=/no/such/python is not"),
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
