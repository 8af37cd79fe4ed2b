"""Data-parallel meta-training: 4 (simulated) devices give the parameters of 1."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

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
np.save(sys.argv[2], np.asarray(ravel_pytree(state.params)[0]))
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
