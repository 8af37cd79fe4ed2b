"""Implicit MAML against its closed form on quadratics and against unrolled differentiation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from maml import MLP, functional, imaml, second_order

# Every test runs in float64 (conftest's x64 fixture restores the flag after).
pytestmark = pytest.mark.usefixtures("x64")


def quadratic_loss(phi, batch):
    A, b = batch
    return 0.5 * phi @ A @ phi - b @ phi


def quadratic_task(n, seed):
    """An SPD support quadratic and a query quadratic: ``((A_s, b_s), (A_q, b_q))``."""
    keys = jax.random.split(jax.random.key(seed), 4)
    a = jax.random.normal(keys[0], (n, n), jnp.float64)
    A_s = a @ a.T / n + 0.1 * jnp.eye(n)
    c = jax.random.normal(keys[1], (n, n), jnp.float64)
    A_q = c @ c.T / n + 0.1 * jnp.eye(n)
    b_s = jax.random.normal(keys[2], (n,), jnp.float64)
    b_q = jax.random.normal(keys[3], (n,), jnp.float64)
    return (A_s, b_s), (A_q, b_q)


def closed_form(theta, support, query, lam):
    """Exact ``phi*``, query loss and meta-gradient ``(I + A_s / lam)^{-1} grad L_q(phi*)``."""
    (A_s, b_s), (A_q, b_q) = support, query
    n = theta.size
    phi = np.linalg.solve(A_s + lam * np.eye(n), b_s + lam * theta)
    grad_query = A_q @ phi - b_q
    meta_grad = np.linalg.solve(np.eye(n) + A_s / lam, grad_query)
    return phi, quadratic_loss(phi, query), meta_grad


def converged_kwargs(support, lam, num_cg_steps):
    # Step size 1 / (L + lam) makes gradient descent contract by 1 - (mu + lam) / (L + lam).
    L = float(np.linalg.eigvalsh(support[0]).max())
    return dict(inner_lr=1.0 / (L + lam), num_inner_steps=500, lam=lam, num_cg_steps=num_cg_steps)


@pytest.mark.parametrize("lam", [0.5, 2.0])
def test_meta_gradient_matches_closed_form_on_quadratic(lam):
    n = 6
    support, query = quadratic_task(n, seed=0)
    theta = jnp.linspace(-1.0, 1.0, n)
    kwargs = converged_kwargs(support, lam, num_cg_steps=n)
    loss, grad = jax.jit(
        lambda t, s, q: imaml.imaml_loss_and_grad(quadratic_loss, t, s, q, **kwargs)
    )(theta, support, query)
    phi, expected_loss, expected_grad = closed_form(theta, support, query, lam)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-10)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-8, atol=1e-12)
    # The implicit gradient is not the plain query gradient: the test can fail.
    assert np.linalg.norm(expected_grad - (query[0] @ phi - query[1])) > 1e-2
    # It is the true gradient of the meta-objective theta -> L_q(phi*(theta)).
    exact = jax.grad(lambda t: closed_form_loss(t, support, query, lam))(theta)
    np.testing.assert_allclose(grad, exact, rtol=1e-8, atol=1e-12)


def closed_form_loss(theta, support, query, lam):
    (A_s, b_s) = support
    phi = jnp.linalg.solve(A_s + lam * jnp.eye(theta.size), b_s + lam * theta)
    return quadratic_loss(phi, query)


def test_adapt_proximal_converges_to_proximal_solution():
    n, lam = 5, 1.0
    support, query = quadratic_task(n, seed=1)
    theta = jnp.ones(n)
    kwargs = converged_kwargs(support, lam, num_cg_steps=n)
    del kwargs["num_cg_steps"]
    phi = imaml.adapt_proximal(quadratic_loss, theta, support, **kwargs)
    np.testing.assert_allclose(phi, closed_form(theta, support, query, lam)[0], rtol=1e-10)
    same = imaml.adapt_proximal(quadratic_loss, theta, support, **{**kwargs, "num_inner_steps": 0})
    np.testing.assert_array_equal(same, theta)


def test_too_few_cg_steps_are_inexact():
    n, lam = 8, 0.3
    support, query = quadratic_task(n, seed=2)
    theta = jnp.zeros(n)
    expected = closed_form(theta, support, query, lam)[2]
    errors = []
    for num_cg_steps in (1, n):
        kwargs = converged_kwargs(support, lam, num_cg_steps)
        _, grad = imaml.imaml_loss_and_grad(quadratic_loss, theta, support, query, **kwargs)
        errors.append(np.linalg.norm(grad - expected) / np.linalg.norm(expected))
    assert errors[0] > 1e-2
    assert errors[1] < 1e-8


@pytest.mark.parametrize("num_cg_steps", [1, 2])
def test_meta_gradient_is_num_cg_steps_of_cg_on_the_implicit_system(num_cg_steps):
    n, lam = 8, 0.3
    support, query = quadratic_task(n, seed=2)
    theta = jnp.zeros(n)
    kwargs = converged_kwargs(support, lam, num_cg_steps)
    _, grad = imaml.imaml_loss_and_grad(quadratic_loss, theta, support, query, **kwargs)
    (A_s, _), (A_q, b_q) = support, query
    phi = closed_form(theta, support, query, lam)[0]
    expected = second_order.conjugate_gradient(
        lambda v: v + A_s @ v / lam, A_q @ phi - b_q, num_iters=num_cg_steps
    )
    np.testing.assert_allclose(grad, expected, rtol=1e-8)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"lam": 0.0}, "lam must be > 0, got 0.0"),  # was a NaN gradient
        ({"lam": -1.0}, "lam must be > 0, got -1.0"),  # was a finite, wrong one
        ({"lam": jnp.array(float("nan"))}, "lam must be > 0, got nan"),
        ({"num_cg_steps": 0}, "num_cg_steps must be >= 1, got 0"),  # was a zero gradient
    ],
)
def test_bad_lam_or_cg_steps_are_refused(override, message):
    support, query = quadratic_task(4, seed=0)
    kwargs = {**converged_kwargs(support, 1.0, 4), "num_inner_steps": 2, **override}
    with pytest.raises(ValueError, match=message):
        imaml.imaml_loss_and_grad(quadratic_loss, jnp.zeros(4), support, query, **kwargs)


def test_a_traced_lam_is_not_checked_but_works():
    support, query = quadratic_task(4, seed=0)
    kwargs = converged_kwargs(support, 0.5, 4)
    del kwargs["lam"]
    grad = jax.jit(
        lambda lam: imaml.imaml_loss_and_grad(
            quadratic_loss, jnp.zeros(4), support, query, lam=lam, **kwargs
        )[1]
    )(0.5)
    np.testing.assert_allclose(grad, closed_form(jnp.zeros(4), support, query, 0.5)[2], rtol=1e-8)


def test_large_lam_gives_the_query_gradient_at_theta():
    # lam -> infinity pins phi* to theta and (I + H / lam) to I.
    n, lam = 5, 1e7
    support, query = quadratic_task(n, seed=3)
    theta = jnp.linspace(0.5, -0.5, n)
    loss, grad = imaml.imaml_loss_and_grad(
        quadratic_loss,
        theta,
        support,
        query,
        inner_lr=1e-8,
        num_inner_steps=50,
        lam=lam,
        num_cg_steps=n,
    )
    np.testing.assert_allclose(loss, quadratic_loss(theta, query), rtol=1e-6)
    # What is left is O(||A_s|| / lam).
    np.testing.assert_allclose(grad, query[0] @ theta - query[1], rtol=1e-5, atol=1e-6)


def mlp_task(seed):
    apply_fn, params = functional(MLP((1, 8, 1), rngs=nnx.Rngs(seed), param_dtype=jnp.float64))
    kx, kq = jax.random.split(jax.random.key(seed + 10))
    xs = jax.random.uniform(kx, (10, 1), jnp.float64, -3.0, 3.0)
    xq = jax.random.uniform(kq, (10, 1), jnp.float64, -3.0, 3.0)

    def loss_fn(p, batch):
        x, y = batch
        return jnp.mean((apply_fn(p, x) - y) ** 2)

    return loss_fn, params, (xs, jnp.sin(xs)), (xq, jnp.sin(xq))


def frozen_bias_rates(params):
    """adapt_norm=False's per-leaf rates: the biases kept out of the inner loop."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: 0.0 if "bias" in jax.tree_util.keystr(path) else 0.05, params
    )


@pytest.mark.parametrize("frozen", [None, "bias"])
def test_matches_unrolled_gradient_on_mlp_when_converged(frozen):
    # With the inner loop converged, differentiating through every inner step
    # and the implicit function theorem give the same meta-gradient; also with
    # some leaves kept out of the inner loop (rate 0), as adapt_norm=False does.
    loss_fn, params, support, query = mlp_task(0)
    inner_lr = 0.05
    if frozen:
        inner_lr = frozen_bias_rates(params)
    kwargs = dict(inner_lr=inner_lr, num_inner_steps=600, lam=4.0)
    _, grad = jax.jit(
        lambda p: imaml.imaml_loss_and_grad(loss_fn, p, support, query, num_cg_steps=40, **kwargs)
    )(params)

    def unrolled(p):
        return loss_fn(imaml.adapt_proximal(loss_fn, p, support, **kwargs), query)

    expected = jax.jit(jax.grad(unrolled))(params)
    flat, flat_expected = (ravel_pytree(t)[0] for t in (grad, expected))
    assert jnp.linalg.norm(flat_expected) > 1e-3
    np.testing.assert_allclose(flat, flat_expected, rtol=1e-6, atol=1e-9)
    if frozen:
        phi = imaml.adapt_proximal(loss_fn, params, support, **kwargs)
        direct = jax.grad(loss_fn)(phi, query)
        leaves = [jax.tree_util.tree_leaves_with_path(t) for t in (params, phi, expected, direct)]
        for (path, theta), (_, phi_leaf), (_, meta), (_, plain) in zip(*leaves, strict=True):
            if frozen in jax.tree_util.keystr(path):
                # Frozen leaves stay at theta, and their meta-gradient is not just
                # the direct query gradient: the test can fail.
                np.testing.assert_array_equal(phi_leaf, theta)
                assert np.linalg.norm(meta - plain) > 1e-3


@pytest.mark.parametrize("per_leaf", [False, True])
def test_rate_zero_adapts_nothing(per_leaf):
    # A rate of 0 freezes, given as one scalar or per leaf: nothing is adapted,
    # phi* = theta, and the meta-gradient is the query gradient at theta.
    loss_fn, params, support, query = mlp_task(1)
    inner_lr = jax.tree.map(lambda _: 0.0, params) if per_leaf else 0.0
    kwargs = dict(inner_lr=inner_lr, num_inner_steps=3, lam=1.0, num_cg_steps=5)
    loss, grad = jax.jit(lambda p: imaml.imaml_loss_and_grad(loss_fn, p, support, query, **kwargs))(
        params
    )
    expected_loss, expected = jax.value_and_grad(loss_fn)(params, query)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-12)
    flat, flat_expected = (ravel_pytree(t)[0] for t in (grad, expected))
    np.testing.assert_allclose(flat, flat_expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("damping", [{}, dict(cg_damping=1.0, lam_damping=2.0)])
def test_batched_is_the_mean_over_tasks(damping):
    n = 4
    tasks = [quadratic_task(n, seed) for seed in range(3)]
    support = jax.tree.map(lambda *xs: jnp.stack(xs), *[t[0] for t in tasks])
    query = jax.tree.map(lambda *xs: jnp.stack(xs), *[t[1] for t in tasks])
    theta = jnp.full(n, 0.2)
    kwargs = dict(inner_lr=0.1, num_inner_steps=100, lam=1.0, num_cg_steps=n, **damping)
    loss, grad = jax.jit(
        lambda t, s, q: imaml.batched_imaml_loss_and_grad(quadratic_loss, t, s, q, **kwargs)
    )(theta, support, query)
    single = jax.jit(lambda s, q: imaml.imaml_loss_and_grad(quadratic_loss, theta, s, q, **kwargs))
    singles = [single(s, q) for s, q in tasks]
    np.testing.assert_allclose(loss, np.mean([s[0] for s in singles]), rtol=1e-12)
    np.testing.assert_allclose(grad, np.mean([s[1] for s in singles], axis=0), rtol=1e-10)
    assert np.ptp(np.stack([s[0] for s in singles])) > 1e-3


@pytest.mark.parametrize("num_inner_steps", [1, 2])
def test_adapt_proximal_takes_exactly_num_inner_steps(num_inner_steps):
    # phi <- phi - lr (A phi - b + lam (phi - theta)) by hand, far from converged.
    n, lam, lr = 4, 0.5, 0.1
    support, _ = quadratic_task(n, seed=4)
    A, b = support
    theta = jnp.linspace(-1.0, 1.0, n)
    phi = theta
    for _ in range(num_inner_steps):
        phi = phi - lr * (A @ phi - b + lam * (phi - theta))
    ours = imaml.adapt_proximal(
        quadratic_loss, theta, support, inner_lr=lr, num_inner_steps=num_inner_steps, lam=lam
    )
    np.testing.assert_allclose(ours, phi, rtol=1e-13, atol=1e-15)


def test_float64_rate_and_lam_keep_float32_params_float32():
    # NumPy float64 scalars are not weakly typed: under x64 they made the float32
    # fori_loop carries (the proximal steps, CG) float64, and the loops refused them.
    support, query = jax.tree.map(lambda a: a.astype(jnp.float32), quadratic_task(4, seed=0))
    theta = jnp.linspace(-1.0, 1.0, 4, dtype=jnp.float32)
    kwargs = dict(num_inner_steps=200, num_cg_steps=4)
    loss, grad = imaml.imaml_loss_and_grad(
        quadratic_loss,
        theta,
        support,
        query,
        inner_lr=np.float64(0.1),
        lam=np.float64(1.0),
        **kwargs,
    )
    assert loss.dtype == grad.dtype == jnp.float32
    expected = imaml.imaml_loss_and_grad(
        quadratic_loss, theta, support, query, inner_lr=0.1, lam=1.0, **kwargs
    )[1]
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
    # A leaf the inner loop does not adapt takes the other branch of the meta-gradient.
    params = {"a": theta, "b": jnp.zeros((), jnp.float32)}

    def loss_fn(p, batch):
        return quadratic_loss(p["a"], batch) + p["b"] * jnp.sum(p["a"])

    rates = {"a": np.float64(0.1), "b": np.float64(0.0)}
    _, grads = imaml.imaml_loss_and_grad(
        loss_fn, params, support, query, inner_lr=rates, lam=np.float64(1.0), **kwargs
    )
    assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("num_cg_steps", [1, 2, 6])
def test_cg_residual_is_the_solves_relative_residual(num_cg_steps):
    # On a 6-dimensional quadratic, H = A_s everywhere: the residual written out.
    n, lam = 6, 0.5
    support, query = quadratic_task(n, seed=0)
    theta = jnp.linspace(-1.0, 1.0, n)
    kwargs = converged_kwargs(support, lam, num_cg_steps=num_cg_steps)
    loss, grad, residual = imaml.imaml_loss_and_grad(
        quadratic_loss, theta, support, query, **kwargs, return_cg_residual=True
    )
    plain = imaml.imaml_loss_and_grad(quadratic_loss, theta, support, query, **kwargs)
    np.testing.assert_array_equal(loss, plain[0])
    np.testing.assert_array_equal(grad, plain[1])
    phi = imaml.adapt_proximal(
        quadratic_loss,
        theta,
        support,
        inner_lr=kwargs["inner_lr"],
        num_inner_steps=kwargs["num_inner_steps"],
        lam=lam,
    )
    b = query[0] @ phi - query[1]
    expected = np.linalg.norm(b - (np.eye(n) + support[0] / lam) @ grad) / np.linalg.norm(b)
    np.testing.assert_allclose(residual, expected, rtol=1e-6, atol=1e-12)
    if num_cg_steps < n:
        assert residual > 1e-3  # a partial solve shows
    else:
        assert residual < 1e-8  # n steps solve it
    # Batched: the mean over tasks.
    stack = lambda *trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)  # noqa: E731
    other = quadratic_task(n, seed=1)
    _, _, mean = imaml.batched_imaml_loss_and_grad(
        quadratic_loss,
        theta,
        stack(support, other[0]),
        stack(query, other[1]),
        **kwargs,
        return_cg_residual=True,
    )
    second = imaml.imaml_loss_and_grad(
        quadratic_loss, theta, *other, **kwargs, return_cg_residual=True
    )[2]
    np.testing.assert_allclose(mean, (residual + second) / 2, rtol=1e-10, atol=1e-14)


def test_cg_residual_with_a_frozen_leaf_is_the_adapted_blocks():
    # adapt_norm=False's per-leaf rates: the system is I + H_aa / lam on the adapted
    # leaves only, checked against the dense Hessian.
    loss_fn, params, support, query = mlp_task(0)
    rates = frozen_bias_rates(params)
    kwargs = dict(inner_lr=rates, num_inner_steps=5, lam=1.0, num_cg_steps=2)
    _, grad, residual = imaml.imaml_loss_and_grad(
        loss_fn, params, support, query, **kwargs, return_cg_residual=True
    )
    phi = imaml.adapt_proximal(loss_fn, params, support, inner_lr=rates, num_inner_steps=5, lam=1.0)
    flat_phi, unravel = ravel_pytree(phi)
    H = jax.hessian(lambda f: loss_fn(unravel(f), support))(flat_phi)
    mask = ravel_pytree(jax.tree.map(lambda p, r: jnp.full(p.shape, r != 0), params, rates))[0]
    a = np.flatnonzero(np.asarray(mask))
    assert 0 < a.size < flat_phi.size
    b = ravel_pytree(jax.grad(loss_fn)(phi, query))[0][a]
    g = ravel_pytree(grad)[0][a]
    r = b - (g + np.asarray(H)[np.ix_(a, a)] @ g / 1.0)
    expected = np.linalg.norm(r) / np.linalg.norm(b)
    assert expected > 1e-3  # a partial solve: the test can fail
    np.testing.assert_allclose(residual, expected, rtol=1e-8)


@pytest.mark.parametrize("num_cg_steps", [3, 40])
def test_damping_is_the_undamped_gradient_at_a_larger_lam_scaled(num_cg_steps):
    # The reference code's damped system at lam 2, cg_damping 1, lam_damping 10 is
    # 2 (I + H / 24): with phi* = theta (0 inner steps, so the inner loop's lam does
    # not matter), its gradient is half the undamped one at lam 24, frozen leaves
    # included; CG's iterates scale too, so also a partial solve.
    loss_fn, params, support, query = mlp_task(0)
    kwargs = dict(inner_lr=frozen_bias_rates(params), num_inner_steps=0, num_cg_steps=num_cg_steps)
    _, damped, residual = imaml.imaml_loss_and_grad(
        loss_fn,
        params,
        support,
        query,
        **kwargs,
        lam=2.0,
        cg_damping=1.0,
        lam_damping=10.0,
        return_cg_residual=True,
    )
    _, undamped, plain_residual = imaml.imaml_loss_and_grad(
        loss_fn, params, support, query, **kwargs, lam=24.0, return_cg_residual=True
    )
    flat, flat_undamped = (ravel_pytree(t)[0] for t in (damped, undamped))
    np.testing.assert_allclose(flat, flat_undamped / 2, rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(residual, plain_residual, rtol=1e-9, atol=1e-13)
    # And not the undamped gradient at lam 2: the test can fail.
    _, at_lam = imaml.imaml_loss_and_grad(loss_fn, params, support, query, **kwargs, lam=2.0)
    assert np.linalg.norm(ravel_pytree(at_lam)[0] - flat) > 1e-3


def test_damped_system_against_the_dense_hessian():
    # With inner steps, phi* moves and the damping solves
    # ((1 + c) I + H_aa / (lam + d)) g_a = grad_a; a frozen leaf gets
    # (grad_f - H_fa g_a / (lam + d)) / (1 + c).
    loss_fn, params, support, query = mlp_task(1)
    rates = frozen_bias_rates(params)
    c, d, lam = 0.5, 3.0, 1.0
    _, grad, residual = imaml.imaml_loss_and_grad(
        loss_fn,
        params,
        support,
        query,
        inner_lr=rates,
        num_inner_steps=5,
        lam=lam,
        num_cg_steps=60,
        cg_damping=c,
        lam_damping=d,
        return_cg_residual=True,
    )
    phi = imaml.adapt_proximal(loss_fn, params, support, inner_lr=rates, num_inner_steps=5, lam=lam)
    flat_phi, unravel = ravel_pytree(phi)
    H = np.asarray(jax.hessian(lambda f: loss_fn(unravel(f), support))(flat_phi))
    mask = ravel_pytree(jax.tree.map(lambda p, r: jnp.full(p.shape, r != 0), params, rates))[0]
    a, f = np.flatnonzero(np.asarray(mask)), np.flatnonzero(~np.asarray(mask))
    q = np.asarray(ravel_pytree(jax.grad(loss_fn)(phi, query))[0])
    g_a = np.linalg.solve((1 + c) * np.eye(a.size) + H[np.ix_(a, a)] / (lam + d), q[a])
    expected = np.empty_like(q)
    expected[a] = g_a
    expected[f] = (q[f] - H[np.ix_(f, a)] @ g_a / (lam + d)) / (1 + c)
    np.testing.assert_allclose(ravel_pytree(grad)[0], expected, rtol=1e-8, atol=1e-12)
    assert residual < 1e-8


@pytest.mark.parametrize("name", ["cg_damping", "lam_damping"])
def test_negative_damping_is_refused(name):
    loss_fn, params, support, query = mlp_task(0)
    kwargs = dict(inner_lr=0.05, num_inner_steps=1, lam=1.0, num_cg_steps=2)
    with pytest.raises(ValueError, match=f"{name} must be >= 0"):
        imaml.imaml_loss_and_grad(loss_fn, params, support, query, **kwargs, **{name: -1.0})


@pytest.mark.parametrize("frozen", [None, "bias"])
def test_proximal_evaluation_takes_imamls_inner_steps(frozen):
    # core.adaptation_trajectory with proximal_lambda (evaluate.py's
    # eval_proximal_lambda) measures each of adapt_proximal's iterates, frozen leaves
    # included; without it, plain SGD's (a different trajectory: the test can fail).
    from maml import core

    loss_fn, params, support, query = mlp_task(2)
    inner_lr = frozen_bias_rates(params) if frozen else 0.05
    kwargs = dict(inner_lr=inner_lr, num_inner_steps=4)

    def query_loss(p):
        return loss_fn(p, query)

    trajectory = core.adaptation_trajectory(
        loss_fn, query_loss, params, support, proximal_lambda=3.0, **kwargs
    )
    expected = [
        query_loss(
            imaml.adapt_proximal(
                loss_fn, params, support, **{**kwargs, "num_inner_steps": n}, lam=3.0
            )
        )
        for n in range(5)
    ]
    np.testing.assert_allclose(trajectory, expected, rtol=1e-12)
    plain = core.adaptation_trajectory(loss_fn, query_loss, params, support, **kwargs)
    assert np.abs(plain[-1] - trajectory[-1]) > 1e-4
