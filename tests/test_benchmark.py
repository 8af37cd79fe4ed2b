"""scripts/benchmark.py times the real training step and prints one JSON line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_prints_one_json_line():
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
    assert abs(out["tasks_per_s"] - out["task_num"] / out["s_per_step"]) < 1e-6 * out["tasks_per_s"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task-num", "0"], "--task-num=0"),
        (["--task-num", "3", "--cpu-devices", "2"], "multiple of --cpu-devices=2"),
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
