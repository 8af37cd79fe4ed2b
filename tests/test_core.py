"""The MAML core against finite differences, closed forms and the stop-gradient formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import maml

INNER_LR = 0.05


def mlp(dtype=jnp.float64, sizes=(1, 8, 8, 1)):
    return maml.functional(maml.MLP(sizes, rngs=nnx.Rngs(0), param_dtype=dtype))


def regression_data(key, n, dtype=jnp.float64):
    kx, kn = jax.random.split(key)
    x = jax.random.uniform(kx, (n, 1), dtype, -3, 3)
    return x, jnp.sin(x) + 0.1 * jax.random.normal(kn, (n, 1), dtype)


def mse_loss(apply_fn):
    return lambda p, batch: jnp.mean((apply_fn(p, batch[0]) - batch[1]) ** 2)


def central_differences(f, params, eps=1e-6):
    flat, unravel = ravel_pytree(params)
    basis = jnp.eye(flat.size, dtype=flat.dtype)
    return jax.vmap(
        lambda e: (f(unravel(flat + eps * e)) - f(unravel(flat - eps * e))) / (2 * eps)
    )(basis)


@pytest.mark.parametrize("num_inner_steps", [1, 3])
def test_meta_gradient_matches_finite_differences(x64, num_inner_steps):
    apply_fn, params = mlp()
    loss_fn = mse_loss(apply_fn)
    support = regression_data(jax.random.key(1), 10)
    query = regression_data(jax.random.key(2), 10)

    def f(p):
        return maml.meta_loss(
            loss_fn, p, support, query, inner_lr=INNER_LR, num_inner_steps=num_inner_steps
        )

    grad = ravel_pytree(jax.jit(jax.grad(f))(params))[0]
    fd = central_differences(jax.jit(f), params)
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-7)
    # The inner steps matter: the meta-gradient is not the plain query gradient.
    plain = ravel_pytree(jax.grad(loss_fn)(params, query))[0]
    assert np.linalg.norm(grad - plain) > 1e-3 * np.linalg.norm(plain)


def test_zero_inner_steps_is_plain_gradient(x64):
    apply_fn, params = mlp()
    loss_fn = mse_loss(apply_fn)
    support, query = regression_data(jax.random.key(1), 5), regression_data(jax.random.key(2), 5)
    assert maml.adapt(loss_fn, params, support, inner_lr=0.1, num_inner_steps=0) is params
    meta = jax.grad(maml.meta_loss, argnums=1)(
        loss_fn, params, support, query, inner_lr=0.1, num_inner_steps=0
    )
    plain = jax.grad(loss_fn)(params, query)
    jax.tree.map(np.testing.assert_array_equal, meta, plain)


@pytest.mark.parametrize("num_inner_steps", [1, 2])
def test_first_order_is_query_gradient_at_adapted_params(x64, num_inner_steps):
    apply_fn, params = mlp()
    loss_fn = mse_loss(apply_fn)
    support, query = regression_data(jax.random.key(1), 10), regression_data(jax.random.key(2), 10)
    kwargs = dict(inner_lr=INNER_LR, num_inner_steps=num_inner_steps)
    fo = jax.grad(lambda p: maml.meta_loss(loss_fn, p, support, query, first_order=True, **kwargs))(
        params
    )
    adapted = maml.adapt(loss_fn, params, support, **kwargs)
    expected = jax.grad(loss_fn)(adapted, query)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14), fo, expected
    )
    # Second order differs from first order: the Hessian term is not zero here.
    so = jax.grad(lambda p: maml.meta_loss(loss_fn, p, support, query, **kwargs))(params)
    diff = ravel_pytree(so)[0] - ravel_pytree(fo)[0]
    assert np.linalg.norm(diff) > 1e-3 * np.linalg.norm(ravel_pytree(so)[0])


def test_first_and_second_order_agree_for_linear_model_with_zero_curvature(x64):
    # The Hessian of a loss linear in the parameters is zero, so the two must agree.
    def loss_fn(w, batch):
        x, y = batch
        return jnp.mean(x @ w * y)

    w = jnp.array([0.3, -0.2])
    support = (jnp.array([[1.0, 2.0], [0.5, -1.0]]), jnp.array([1.0, -1.0]))
    query = (jnp.array([[2.0, 1.0]]), jnp.array([0.5]))
    so, fo = (
        jax.grad(maml.meta_loss, argnums=1)(
            loss_fn, w, support, query, inner_lr=0.3, num_inner_steps=2, first_order=f
        )
        for f in (False, True)
    )
    np.testing.assert_allclose(so, fo, rtol=1e-12)


@pytest.mark.parametrize("num_inner_steps", [1, 4])
def test_linear_least_squares_closed_form(x64, num_inner_steps):
    # loss(w) = 0.5 * mean((X w - y)^2) has gradient A w - b with A = X^T X / n,
    # b = X^T y / n, so k inner steps give w_k = M^k w + sum_i M^i lr b_s with
    # M = I - lr A_s, and the MAML gradient is (M^T)^k (A_q w_k - b_q).
    key_s, key_q, key_w = jax.random.split(jax.random.key(0), 3)
    xs, xq = jax.random.normal(key_s, (8, 3)), jax.random.normal(key_q, (6, 3))
    ys, yq = xs @ jnp.array([1.0, -2.0, 0.5]) + 0.3, xq @ jnp.array([0.5, 1.0, 1.0])
    w = jax.random.normal(key_w, (3,))
    lr = 0.1

    def loss_fn(w, batch):
        x, y = batch
        return 0.5 * jnp.mean((x @ w - y) ** 2)

    a_s, b_s = xs.T @ xs / 8, xs.T @ ys / 8
    a_q, b_q = xq.T @ xq / 6, xq.T @ yq / 6
    m = jnp.eye(3) - lr * a_s
    w_k = w
    for _ in range(num_inner_steps):
        w_k = m @ w_k + lr * b_s
    expected = jnp.linalg.matrix_power(m.T, num_inner_steps) @ (a_q @ w_k - b_q)

    adapted = maml.adapt(loss_fn, w, (xs, ys), inner_lr=lr, num_inner_steps=num_inner_steps)
    np.testing.assert_allclose(adapted, w_k, rtol=1e-12)
    grad = jax.grad(maml.meta_loss, argnums=1)(
        loss_fn, w, (xs, ys), (xq, yq), inner_lr=lr, num_inner_steps=num_inner_steps
    )
    np.testing.assert_allclose(grad, expected, rtol=1e-10)


def test_tutorial_snippet_is_the_one_step_special_case(x64):
    def loss_fn(p, d):
        return jnp.sum((jnp.tanh(p * d[0]) - d[1]) ** 2)

    p, d, lr = jnp.array([0.4, -0.7]), (jnp.array([1.0, 2.0]), jnp.array([0.3, 0.1])), 0.2
    tutorial = jax.grad(lambda p, d: loss_fn(p - lr * jax.grad(loss_fn)(p, d), d))(p, d)
    ours = jax.grad(maml.meta_loss, argnums=1)(loss_fn, p, d, d, inner_lr=lr, num_inner_steps=1)
    np.testing.assert_allclose(ours, tutorial, rtol=1e-14)


def test_per_leaf_inner_lr_freezes_leaves(x64):
    apply_fn, params = mlp()
    loss_fn = mse_loss(apply_fn)
    support = regression_data(jax.random.key(1), 5)
    lrs = jax.tree.map(lambda _: 0.1, params)
    lrs["layers"][0]["kernel"] = 0.0
    adapted = maml.adapt(loss_fn, params, support, inner_lr=lrs, num_inner_steps=2)
    np.testing.assert_array_equal(adapted["layers"][0]["kernel"], params["layers"][0]["kernel"])
    assert not np.allclose(adapted["layers"][1]["kernel"], params["layers"][1]["kernel"])


@pytest.mark.parametrize("rates", [{"layers": {0: 0.1}}, [0.1, 0.2], {}, None])
def test_per_leaf_inner_lr_of_another_structure_is_refused(rates):
    apply_fn, params = mlp(jnp.float32, sizes=(1, 4, 1))
    support = (jnp.ones((3, 1)), jnp.ones((3, 1)))
    with pytest.raises(ValueError, match="inner_lr must be a scalar or a pytree shaped like"):
        maml.adapt(mse_loss(apply_fn), params, support, inner_lr=rates, num_inner_steps=1)


def test_remat_gives_the_same_meta_gradient(x64):
    apply_fn, params = mlp()
    loss_fn = mse_loss(apply_fn)
    support, query = regression_data(jax.random.key(1), 5), regression_data(jax.random.key(2), 5)
    grads = [
        jax.grad(maml.meta_loss, argnums=1)(
            loss_fn, params, support, query, inner_lr=0.05, num_inner_steps=3, remat=r
        )
        for r in (False, True)
    ]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), *grads)
    # The same numbers whether or not remat is applied: check that it is.
    primitives = [
        {eqn.primitive.name for eqn in jax.make_jaxpr(
            lambda p, r=r: jax.grad(maml.meta_loss, argnums=1)(
                loss_fn, p, support, query, inner_lr=0.05, num_inner_steps=3, remat=r
            )
        )(params).jaxpr.eqns}
        for r in (False, True)
    ]  # fmt: skip
    assert "remat2" not in primitives[0] and "remat2" in primitives[1]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_jit_vmap_grad_over_tasks(x64, dtype):
    apply_fn, params = mlp(dtype)
    loss_fn = mse_loss(apply_fn)
    keys = jax.random.split(jax.random.key(3), 4)
    support = jax.vmap(lambda k: regression_data(k, 5, dtype))(keys)
    query = jax.vmap(lambda k: regression_data(jax.random.fold_in(k, 1), 5, dtype))(keys)
    kwargs = dict(inner_lr=0.05, num_inner_steps=2)

    batched = jax.jit(
        jax.value_and_grad(lambda p: maml.batched_meta_loss(loss_fn, p, support, query, **kwargs))
    )
    loss, grads = batched(params)
    assert loss.dtype == dtype
    assert all(g.dtype == dtype for g in jax.tree.leaves(grads))
    # The mean of per-task meta-gradients, computed one task at a time.
    per_task = [
        jax.grad(maml.meta_loss, argnums=1)(
            loss_fn,
            params,
            jax.tree.map(lambda a, i=i: a[i], support),
            jax.tree.map(lambda a, i=i: a[i], query),
            **kwargs,
        )
        for i in range(4)
    ]
    mean = jax.tree.map(lambda *g: sum(g) / 4, *per_task)
    tol = 1e-5 if dtype == jnp.float32 else 1e-12
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=tol, atol=tol), grads, mean)


def test_negative_inner_steps_rejected():
    with pytest.raises(ValueError, match="num_inner_steps"):
        maml.adapt(lambda p, b: p, jnp.zeros(()), None, inner_lr=0.1, num_inner_steps=-1)


def test_adaptation_trajectory_measures_each_step(x64):
    apply_fn, params = mlp()
    loss_fn = mse_loss(apply_fn)
    support, query = (regression_data(jax.random.key(s), 10) for s in (3, 4))
    lrs = jax.tree.map(lambda _: INNER_LR, params)
    lrs["layers"][0]["bias"] = 0.0  # per-leaf rates go through as in adapt

    def measure(p):  # a vector per step: the query residuals
        return apply_fn(p, query[0])[:, 0] - query[1][:, 0]

    trajectory = jax.jit(
        lambda p: maml.core.adaptation_trajectory(
            loss_fn, measure, p, support, inner_lr=lrs, num_inner_steps=3
        )
    )(params)
    assert trajectory.shape == (4, 10)
    for k in range(4):
        adapted = maml.adapt(loss_fn, params, support, inner_lr=lrs, num_inner_steps=k)
        np.testing.assert_allclose(trajectory[k], measure(adapted), rtol=1e-12, atol=1e-14)


def test_adaptation_trajectory_of_zero_steps_is_the_initial_measure(x64):
    apply_fn, params = mlp()
    loss_fn = mse_loss(apply_fn)
    support, query = (regression_data(jax.random.key(s), 6) for s in (3, 4))

    def measure(p):
        return loss_fn(p, query)

    trajectory = jax.jit(
        lambda p: maml.core.adaptation_trajectory(
            loss_fn, measure, p, support, inner_lr=INNER_LR, num_inner_steps=0
        )
    )(params)
    assert trajectory.shape == (1,)
    np.testing.assert_allclose(trajectory[0], measure(params), rtol=1e-12)
    with pytest.raises(ValueError, match="num_inner_steps must be >= 0, got -1"):
        maml.core.adaptation_trajectory(
            loss_fn, measure, params, support, inner_lr=INNER_LR, num_inner_steps=-1
        )


@pytest.mark.parametrize("per_leaf", [False, True])
def test_float64_rates_keep_float32_params_float32(x64, per_leaf):
    # A NumPy float64 rate is not weakly typed: under x64, p - lr * g made the adapted
    # leaves float64, and the lax.scan of adaptation_trajectory refused its carry.
    apply_fn, params = mlp(jnp.float32, sizes=(1, 4, 1))
    loss_fn = mse_loss(apply_fn)
    support = regression_data(jax.random.key(1), 5, jnp.float32)
    rate = np.float64(0.1)
    inner_lr = jax.tree.map(lambda _: rate, params) if per_leaf else rate
    adapted = maml.adapt(loss_fn, params, support, inner_lr=inner_lr, num_inner_steps=2)
    assert {x.dtype for x in jax.tree.leaves(adapted)} == {jnp.dtype(jnp.float32)}
    expected = maml.adapt(loss_fn, params, support, inner_lr=0.1, num_inner_steps=2)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), adapted, expected
    )
    trajectory = maml.core.adaptation_trajectory(
        loss_fn,
        lambda p: loss_fn(p, support),
        params,
        support,
        inner_lr=inner_lr,
        num_inner_steps=2,
    )
    np.testing.assert_allclose(trajectory[-1], loss_fn(expected, support), rtol=1e-5)
