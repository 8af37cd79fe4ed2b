"""Invariants of the sinusoid task family's sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maml.tasks.sinusoid import Sinusoid


def test_shapes_and_ranges():
    task = Sinusoid(num_support=5, num_query=7)
    ep = jax.jit(task.sample, static_argnums=1)(jax.random.key(0), 2000)
    (xs, ys), (xq, yq) = ep["support"], ep["query"]
    assert xs.shape == ys.shape == (2000, 5, 1)
    assert xq.shape == yq.shape == (2000, 7, 1)
    a, p = np.asarray(ep["amplitude"]), np.asarray(ep["phase"])
    assert 0.1 <= a.min() and a.max() <= 5.0
    assert 0.0 <= p.min() and p.max() <= np.pi
    for x in (xs, xq):
        assert -5.0 <= float(x.min()) and float(x.max()) <= 5.0
    # The ranges are covered, not just respected.
    assert a.min() < 0.2 and a.max() > 4.9 and p.min() < 0.05 and p.max() > 3.09
    for x in (xs, xq):
        assert float(x.min()) < -4.95 and float(x.max()) > 4.95
    # Amplitude and phase are independent: a two-dimensional family of tasks.
    assert abs(np.corrcoef(a, p)[0, 1]) < 0.1
    np.testing.assert_allclose(ys, a[:, None, None] * np.sin(xs - p[:, None, None]), atol=1e-5)
    np.testing.assert_allclose(yq, a[:, None, None] * np.sin(xq - p[:, None, None]), atol=1e-5)


def test_support_and_query_share_the_task_but_not_the_points():
    ep = Sinusoid().sample(jax.random.key(1), 3)
    assert not np.any(np.isin(np.asarray(ep["support"][0]), np.asarray(ep["query"][0])))


def test_keys_decide_everything():
    task = Sinusoid()
    a, b = task.sample(jax.random.key(2), 4), task.sample(jax.random.key(2), 4)
    c = task.sample(jax.random.key(3), 4)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.allclose(a["amplitude"], c["amplitude"])


def test_loss_and_metric_are_mse():
    predictions, targets = jnp.array([1.0, 3.0]), jnp.array([0.0, 1.0])
    assert float(Sinusoid.loss(predictions, targets)) == 2.5
    assert float(Sinusoid.metrics(predictions, targets)["mse"]) == 2.5


def test_the_dtype_is_of_every_float(x64):
    # Float64 runs check meta-gradients against finite differences: inputs too.
    ep = Sinusoid(dtype=jnp.float64).sample(jax.random.key(0), 2)
    assert {x.dtype for x in jax.tree.leaves(ep)} == {jnp.dtype(jnp.float64)}


@pytest.mark.parametrize("num_support, num_query", [(-1, 10), (0, 5), (5, -2)])
def test_counts_below_one_are_refused(num_support, num_query):
    # (-1, 10) sampled 8 support and 1 query points without a word.
    with pytest.raises(ValueError, match="num_support and num_query must be >= 1"):
        Sinusoid(num_support=num_support, num_query=num_query)
