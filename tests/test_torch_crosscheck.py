"""The exact meta-gradient against PyTorch's, computed the way the benchmark's peer
computes it (``torch.func``: ``functional_call`` + ``grad`` in the inner loop, ``vmap``
over tasks, one backward), on Finn's conv4 with the same weights and episodes, in
float64: an independent implementation of the model (SAME padding, batch-statistics
BatchNorm) and of second-order MAML. Task by task, or with vmap over a BatchNorm
written in plain ops, torch agrees with us to about 5e-15; the peer's own way, vmap
over ``nn.BatchNorm2d``, does not (the xfail below): its meta-loss agrees to 1e-15,
but its meta-gradient is 0.03-1.65% off per parameter array (torch 2.13.0, CPU), so
the peer times a slightly inexact second-order step (cf. pytorch/functorch#534, "batch_norm
backward batching rule is incorrect for grad_input").

torch is not a dependency: name an interpreter that has it (the peer's venv),

    MAML_TORCH_PYTHON=/tmp/peer/bin/python python3 -m pytest tests/test_torch_crosscheck.py

and the test runs; without it, it is skipped.
"""

import os
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from maml.core import batched_meta_loss
from maml.models import ConvNet, functional

TORCH_PYTHON = os.environ.get("MAML_TORCH_PYTHON")
pytestmark = pytest.mark.skipif(
    not TORCH_PYTHON, reason="MAML_TORCH_PYTHON (an interpreter with torch) is not set"
)

# Runs in the torch interpreter: argv[1] holds the weights and episodes, and the
# meta-loss and its gradient are written back to it.
TORCH_SIDE = r"""
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

torch.set_default_dtype(torch.float64)
path, batching, norm = sys.argv[1:4]
data = dict(np.load(path))
num_blocks, steps, lr = int(data["num_blocks"]), int(data["steps"]), float(data["lr"])


class SamePad(nn.Module):  # XLA's SAME: an odd total padding puts the extra row last
    def forward(self, x):
        def pads(size):
            total = max((-(-size // 2) - 1) * 2 + 3 - size, 0)
            return total // 2, total - total // 2

        (top, bottom), (left, right) = pads(x.shape[-2]), pads(x.shape[-1])
        return F.pad(x, (left, right, top, bottom))


class ManualBatchNorm(nn.Module):  # BatchNorm2d's maths in plain ops (biased variance)
    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        scale = (self.weight / torch.sqrt(var.flatten() + 1e-5))[None, :, None, None]
        return (x - mean) * scale + self.bias[None, :, None, None]


def batch_norm(channels):
    if norm == "manual":
        return ManualBatchNorm(channels)
    return nn.BatchNorm2d(channels, affine=True, track_running_stats=False)


layers, c_in = [], 1
channels = data["blocks.0.conv.kernel"].shape[-1]
for _ in range(num_blocks):
    layers += [
        SamePad(),
        nn.Conv2d(c_in, channels, 3, stride=2, padding=0),
        batch_norm(channels),
        nn.ReLU(),
    ]
    c_in = channels
layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, data["head.bias"].size)]
net = nn.Sequential(*layers).train()
ours = {}
for i in range(num_blocks):
    ours[f"{4 * i + 1}.weight"] = data[f"blocks.{i}.conv.kernel"].transpose(3, 2, 0, 1)  # HWIO
    ours[f"{4 * i + 1}.bias"] = data[f"blocks.{i}.conv.bias"]
    ours[f"{4 * i + 2}.weight"] = data[f"blocks.{i}.norm.scale"]
    ours[f"{4 * i + 2}.bias"] = data[f"blocks.{i}.norm.bias"]
ours[f"{4 * num_blocks + 2}.weight"] = data["head.kernel"].T
ours[f"{4 * num_blocks + 2}.bias"] = data["head.bias"]
params = {k: torch.tensor(v, requires_grad=True) for k, v in ours.items()}
assert set(params) == set(dict(net.named_parameters()))


def task_loss(x_spt, y_spt, x_qry, y_qry):  # the peer's loss_for_task, on these params
    def compute_loss(p, x, y):
        return F.cross_entropy(functional_call(net, p, x), y)

    new_params = params
    for _ in range(steps):
        grads = grad(compute_loss)(new_params, x_spt, y_spt)
        new_params = {k: new_params[k] - lr * g for k, g in grads.items()}
    return compute_loss(new_params, x_qry, y_qry)


nchw = lambda x: torch.tensor(x.transpose(0, 1, 4, 2, 3))  # (tasks, n, H, W, C) -> NCHW
labels = lambda y: torch.tensor(y, dtype=torch.int64)
episode = nchw(data["x_spt"]), labels(data["y_spt"]), nchw(data["x_qry"]), labels(data["y_qry"])
if batching == "vmap":  # the peer's way
    loss = vmap(task_loss)(*episode).mean()
else:  # one task at a time
    loss = torch.stack([task_loss(*task) for task in zip(*episode)]).mean()
loss.backward()
out = {"loss": loss.detach().numpy()}
for k, v in ours.items():
    out["grad." + k] = params[k].grad.numpy()
np.savez(path, **out)
"""


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """Our float64 meta-loss and meta-gradient (two inner steps) and the npz of the
    weights and episodes they were computed on."""
    num_ways, shots, queries, tasks, steps, lr = 5, 1, 3, 2, 2, 0.4
    with jax.enable_x64(True):
        model = ConvNet(num_ways, rngs=nnx.Rngs(0), param_dtype=jnp.float64)  # patches conv
        apply_fn, params = functional(model)
        # Away from the initialisation (zero biases, unit scales), where terms could vanish.
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        noisy = [
            leaf + 0.1 * jax.random.normal(k, leaf.shape, leaf.dtype)
            for leaf, k in zip(leaves, keys, strict=True)
        ]
        params = jax.tree.unflatten(treedef, noisy)
        kx, kq = jax.random.split(jax.random.key(2))

        def labels(n):
            return jnp.tile(jnp.repeat(jnp.arange(num_ways), n), (tasks, 1))

        support = (
            jax.random.uniform(kx, (tasks, num_ways * shots, 28, 28, 1), jnp.float64),
            labels(shots),
        )
        query = (
            jax.random.uniform(kq, (tasks, num_ways * queries, 28, 28, 1), jnp.float64),
            labels(queries),
        )

        def loss_fn(p, batch):
            x, y = batch
            return optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y).mean()

        value, grads = jax.jit(
            jax.value_and_grad(batched_meta_loss, argnums=1),
            static_argnums=0,
            static_argnames=("num_inner_steps",),
        )(loss_fn, params, support, query, inner_lr=lr, num_inner_steps=steps)

    def name(path):
        return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)

    flat = {
        name(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    grads = {
        name(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]
    }
    path = tmp_path_factory.mktemp("crosscheck") / "inputs.npz"
    episode = dict(x_spt=support[0], y_spt=support[1], x_qry=query[0], y_qry=query[1])
    np.savez(
        path,
        num_blocks=len(model.blocks),
        steps=steps,
        lr=lr,
        **flat,
        **{k: np.asarray(v) for k, v in episode.items()},
    )
    return float(value), grads, path, len(model.blocks)


@pytest.mark.parametrize(
    "batching, norm",
    [
        ("loop", "native"),  # torch.func per task, BatchNorm2d
        ("vmap", "manual"),  # vmap over tasks, BatchNorm as plain ops
        pytest.param(
            "vmap",
            "native",  # the peer's way
            marks=pytest.mark.xfail(
                reason="measured with torch 2.13.0 (CPU): vmap over BatchNorm2d gives a "
                "second-order meta-gradient 0.03-1.65% off the exact one per parameter array "
                "(max relative difference), while the meta-loss agrees to 1e-15",
                strict=False,
            ),
        ),
    ],
)
def test_meta_gradient_equals_torch_funcs(ours, tmp_path, batching, norm):
    value, grads, inputs, num_blocks = ours
    path = tmp_path / "crosscheck.npz"
    shutil.copy(inputs, path)
    result = subprocess.run(
        [TORCH_PYTHON, "-c", TORCH_SIDE, str(path), batching, norm],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = dict(np.load(path))
    np.testing.assert_allclose(theirs["loss"], value, rtol=1e-12)
    matching = {
        f"{4 * num_blocks + 2}.weight": grads["head.kernel"].T,
        f"{4 * num_blocks + 2}.bias": grads["head.bias"],
    }
    for i in range(num_blocks):
        matching[f"{4 * i + 1}.weight"] = grads[f"blocks.{i}.conv.kernel"].transpose(3, 2, 0, 1)
        matching[f"{4 * i + 2}.weight"] = grads[f"blocks.{i}.norm.scale"]
        matching[f"{4 * i + 2}.bias"] = grads[f"blocks.{i}.norm.bias"]
        # Conv biases feed BatchNorm, which removes them: their exact gradient is 0,
        # and both sides' are rounding noise.
        assert np.max(np.abs(grads[f"blocks.{i}.conv.bias"])) < 1e-10
        assert np.max(np.abs(theirs[f"grad.{4 * i + 1}.bias"])) < 1e-10
    for name, mine in matching.items():
        other = theirs[f"grad.{name}"]
        scale = np.max(np.abs(other))
        assert scale > 1e-6, name  # a gradient there to compare
        np.testing.assert_allclose(mine, other, rtol=1e-9, atol=1e-12 * scale, err_msg=name)
