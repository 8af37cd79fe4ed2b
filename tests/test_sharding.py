"""Data-parallel meta-training: 4 (simulated) devices, or 2 processes, give the parameters of 1."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from jax.flatten_util import ravel_pytree

ROOT = Path(__file__).resolve().parents[1]

TRAIN = """
import sys, jax, numpy as np
from jax.flatten_util import ravel_pytree
from maml import train
from maml.configs import sinusoid
config = sinusoid.get_config("tiny")
config.update(num_steps=20, log_every=10, checkpoint_every=20, meta_batch_size=8)
state = train.train_and_evaluate(config, sys.argv[1])
assert len(state.params["layers"][0]["kernel"].sharding.device_set) == jax.device_count()
exp = train.build_experiment(config)
if jax.device_count() > 1:  # the tasks are split, not each device doing all of them
    chunk = train.make_train_chunk(exp, train.root_keys(config.seed)[0])
    assert "all-reduce" in chunk.lower(state, 1).compile().as_text()
# Evaluation needs no meta-batch that the devices divide (6 over 4).
config.meta_batch_size = 6
assert train.restore_params(config, sys.argv[1])[2] == 20
# 8 tasks a batch split over the 4 devices, 6 not (replicated): the same tasks either way.
curves = [
    train.make_adaptation_curve(exp, exp.task, inner_lr=config.inner_lr, num_inner_steps=2,
                                batch_size=b)(state.params, jax.random.key(7), num_tasks=12)
    for b in (8, 6)
]
np.save(sys.argv[2], np.concatenate([np.asarray(ravel_pytree(state.params)[0])]
                                    + [c.ravel() for c in curves]))
print(jax.device_count())
"""


def start(tmp_path, num_devices):
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
        JAX_PLATFORMS="cpu",
    )
    out = tmp_path / f"params{num_devices}.npy"
    process = subprocess.Popen(
        [sys.executable, "-c", TRAIN, str(tmp_path / f"run{num_devices}"), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    return process, out


def finish(process, out, num_devices):
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-2000:]
    assert stdout.split()[-1] == str(num_devices)
    return np.load(out)


def test_four_devices_match_one(tmp_path):
    # Side by side: each process spends most of its time importing and compiling.
    runs = {n: start(tmp_path, n) for n in (1, 4)}
    one, four = (finish(*runs[n], n) for n in (1, 4))
    np.testing.assert_allclose(four, one, rtol=1e-5, atol=1e-6)
    assert not np.array_equal(one, np.zeros_like(one))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def train_script(workdir, *args):
    command = [
        sys.executable,
        str(ROOT / "scripts" / "train.py"),
        "--config=maml/configs/sinusoid.py:tiny",
        f"--workdir={workdir}",
        "--config.num_steps=20",
        "--config.log_every=10",
        "--config.checkpoint_every=20",
        "--config.meta_batch_size=8",
        "--config.eval_every=10",
        "--config.num_val_tasks=8",
        *args,
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )


def two_ranks(workdir, *args):
    """scripts/train.py --multihost as ranks 0 and 1 of one run, on this host."""
    address = f"localhost:{free_port()}"
    flags = f"--coordinator_address={address}", "--num_processes=2", "--cpu_devices=1"
    return [
        train_script(workdir, "--multihost", *flags, f"--process_id={rank}", *args)
        for rank in (0, 1)
    ]


def stderr_of(processes, timeout=120):
    """Each process's stderr once all have ended; any still running after that is killed."""
    try:
        return [p.communicate(timeout=timeout)[1] for p in processes]
    finally:
        for p in processes:
            p.kill()


def test_two_processes_match_one_process_on_two_devices(tmp_path):
    # scripts/train.py --multihost: two processes on this host, one CPU device each,
    # joined by jax.distributed (gloo collectives), train one model on a two-device
    # mesh; one process owning both devices must end with the same parameters.
    from maml import train
    from maml.configs import sinusoid

    processes = two_ranks(tmp_path / "multihost")
    processes.append(train_script(tmp_path / "single", "--cpu_devices=2"))
    stderrs = []
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-2000:]
        stderrs.append(stderr)
    assert "sharded over 2 cpu device(s) in 2 process(es)" in stderrs[0]
    assert "sharded over" not in stderrs[1]  # only process 0 reports
    assert "sharded over 2 cpu device(s) in 1 process(es)" in stderrs[2]

    config = sinusoid.get_config("tiny")
    config.update(meta_batch_size=8)
    # Both checkpoints: the latest, and the best validation's (its manager saves
    # the same steps as the latest's, which with two processes needs its own
    # barrier keys).
    for which in ("latest", "best"):
        params, steps = {}, {}
        for name in ("multihost", "single"):
            _, restored, steps[name] = train.restore_params(config, tmp_path / name, which)
            params[name] = np.asarray(ravel_pytree(restored)[0])
        assert steps["multihost"] == steps["single"]
        assert which == "best" or steps["single"] == 20
        np.testing.assert_allclose(params["multihost"], params["single"], rtol=1e-5, atol=1e-6)
    # Only process 0 logs: one line per chunk, not two. The validation tasks,
    # split over the two processes' devices, score as on one process.
    records = {
        name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]
        for name in ("multihost", "single")
    }
    assert [r["step"] for r in records["multihost"]] == [10, 20]
    np.testing.assert_allclose(
        [r["val_mse"] for r in records["multihost"]],
        [r["val_mse"] for r in records["single"]],
        rtol=1e-5,
    )


def test_a_signal_to_one_process_stops_all_at_one_saved_step(tmp_path):
    # Ctrl-C on one host (or a scheduler's SIGTERM reaching ranks a moment apart):
    # the processes used to stop at different points of collective work and hang.
    processes = two_ranks(
        tmp_path, "--config.num_steps=1000000", "--config.checkpoint_every=1000000"
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline and all(p.poll() is None for p in processes)
        time.sleep(0.5)
    processes[0].send_signal(signal.SIGTERM)
    errors = stderr_of(processes)
    assert [p.returncode for p in processes] == [143, 130], errors[0][-2000:] + errors[1][-2000:]
    step = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert f"interrupted: saved a checkpoint at step {step}" in errors[0]
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [step]


def test_a_run_in_progress_refuses_every_process_of_a_second_one(tmp_path):
    import fcntl

    with open(tmp_path / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a run in progress holds it
        processes = two_ranks(tmp_path)
        errors = stderr_of(processes)
    # Process 1 used to abort (134) with the distributed runtime's fatal-error dump.
    assert [p.returncode for p in processes] == [2, 2], errors[0][-2000:] + errors[1][-2000:]
    for error in errors:
        assert (
            error.strip()
            .splitlines()[-1]
            .startswith(f"error: another run is training in {tmp_path}")
        )
        assert "Traceback" not in error
    assert not (tmp_path / "metrics.jsonl").exists()


def test_process_flags_without_multihost_are_refused(tmp_path):
    # Each host would otherwise train alone, as process 0, into the shared workdir.
    process = train_script(tmp_path, "--num_processes=2", "--process_id=1")
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2 and not (tmp_path / "metrics.jsonl").exists()
    expected = "error: --num_processes, --process_id without --multihost: add --multihost"
    assert stderr.strip() == expected
