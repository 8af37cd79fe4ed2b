"""hvp, dense Hessians, Lanczos, SLQ density and CG against dense linear algebra (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from maml import MLP, functional, meta_loss
from maml import second_order as so

# Every test runs in float64 (conftest's x64 fixture restores the flag after).
pytestmark = pytest.mark.usefixtures("x64")


def mlp_problem(sizes=(2, 6, 1), seed=0):
    """A float64 MLP regression loss and data: ``(loss_fn, params, support, query)``."""
    apply_fn, params = functional(MLP(sizes, rngs=nnx.Rngs(seed), param_dtype=jnp.float64))
    kx, kq = jax.random.split(jax.random.key(seed + 1))
    xs = jax.random.normal(kx, (8, sizes[0]), jnp.float64)
    xq = jax.random.normal(kq, (8, sizes[0]), jnp.float64)

    def loss_fn(p, batch):
        x, y = batch
        return jnp.mean((apply_fn(p, x) - y) ** 2)

    return loss_fn, params, (xs, jnp.sin(xs[:, :1])), (xq, jnp.sin(xq[:, :1]))


def dense_hessian(f, params):
    flat, unravel = ravel_pytree(params)
    return np.asarray(jax.jit(jax.hessian(lambda z: f(unravel(z))))(flat))


def random_like(params, seed):
    flat, unravel = ravel_pytree(params)
    return unravel(jax.random.normal(jax.random.key(seed), flat.shape, flat.dtype))


# The three formulations of H v, which agree to rounding.
HVPS = (so.hvp, so.hvp_reverse_over_reverse, so.hvp_reverse_over_forward)


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


@pytest.mark.parametrize("hvp", HVPS)
def test_hvp_matches_dense_hessian_on_mlp(hvp):
    loss_fn, params, support, _ = mlp_problem()
    f = lambda p: loss_fn(p, support)  # noqa: E731
    v = random_like(params, 3)
    hv = jax.jit(lambda p, v: hvp(f, p, v))(params, v)
    assert jax.tree.structure(hv) == jax.tree.structure(params)
    np.testing.assert_allclose(flat(hv), dense_hessian(f, params) @ flat(v), atol=1e-12)


def test_hvp_matches_dense_hessian_on_meta_loss():
    loss_fn, params, support, query = mlp_problem(sizes=(1, 5, 1))

    def f(p):
        return meta_loss(loss_fn, p, support, query, inner_lr=0.1, num_inner_steps=2)

    v = random_like(params, 4)
    expected = dense_hessian(f, params) @ flat(v)
    all_modes = jax.jit(lambda p, v: [hvp(f, p, v) for hvp in HVPS])
    for hv in all_modes(params, v):
        np.testing.assert_allclose(flat(hv), expected, atol=1e-11)


def test_hvp_modes_agree_on_a_smooth_pytree_function():
    params = {"a": jnp.array([0.3, -1.2, 0.7]), "b": {"c": jnp.array([[0.5, 2.0], [-0.4, 1.1]])}}

    def f(p):
        return jnp.sum(jnp.tanh(p["a"]) ** 3) * jnp.sum(jnp.sin(p["b"]["c"]) * p["a"][:2])

    v = random_like(params, 5)
    all_modes = jax.jit(lambda p, v: [hvp(f, p, v) for hvp in HVPS])
    results = [flat(hv) for hv in all_modes(params, v)]
    assert np.linalg.norm(results[0]) > 1e-3
    for r in results[1:]:
        np.testing.assert_allclose(r, results[0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(results[0], dense_hessian(f, params) @ flat(v), atol=1e-12)


def test_hessian_matches_jax_hessian_and_unravels():
    loss_fn, params, support, _ = mlp_problem()
    f = lambda p: loss_fn(p, support)  # noqa: E731

    def hessian_and_first_row(p):
        H, unravel = so.hessian(f, p)
        return H, unravel(H[0])

    H, row = jax.jit(hessian_and_first_row)(params)
    expected = dense_hessian(f, params)
    assert H.shape == expected.shape
    np.testing.assert_allclose(H, expected, atol=1e-12)
    np.testing.assert_allclose(H, H.T, atol=1e-12)
    assert jax.tree.structure(row) == jax.tree.structure(params)
    assert jax.tree.map(jnp.shape, row) == jax.tree.map(jnp.shape, params)


def test_lanczos_is_an_orthonormal_tridiagonalization():
    loss_fn, params, support, _ = mlp_problem()
    f = lambda p: loss_fn(p, support)  # noqa: E731
    H = dense_hessian(f, params)
    m = 12
    result = jax.jit(lambda p, k: so.lanczos(lambda v: so.hvp(f, p, v), p, num_iters=m, key=k))(
        params, jax.random.key(0)
    )
    V = np.asarray(result.basis)
    assert V.shape == (m, H.shape[0])
    np.testing.assert_allclose(V @ V.T, np.eye(m), atol=1e-12)
    np.testing.assert_allclose(V @ H @ V.T, np.asarray(result.tridiagonal()), atol=1e-10)


def test_top_eigenpairs_match_eigvalsh():
    loss_fn, params, support, _ = mlp_problem(sizes=(2, 8, 1))
    f = lambda p: loss_fn(p, support)  # noqa: E731
    H = dense_hessian(f, params)
    n = H.shape[0]
    exact = np.linalg.eigvalsh(H)[::-1]
    k = 4
    top = jax.jit(lambda p, key: so.top_eigenpairs(f, p, k=k, num_iters=n, key=key))
    values, vectors = top(params, jax.random.key(1))
    np.testing.assert_allclose(values, exact[:k], rtol=1e-9, atol=1e-12)
    U = np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(vectors))
    assert jax.tree.map(jnp.shape, vectors) == jax.tree.map(lambda x: (k, *x.shape), params)
    np.testing.assert_allclose(np.linalg.norm(U, axis=1), 1.0, rtol=1e-10)
    np.testing.assert_allclose(U @ H, np.asarray(values)[:, None] * U, atol=1e-8)
    # With fewer Lanczos steps than parameters the extreme eigenvalue is still found.
    few, _ = jax.jit(lambda p, key: so.top_eigenpairs(f, p, k=1, num_iters=n // 2, key=key))(
        params, jax.random.key(2)
    )
    np.testing.assert_allclose(few, exact[:1], rtol=1e-6)


def test_lanczos_survives_repeated_eigenvalues():
    # Two distinct eigenvalues: the Krylov space is exhausted after two steps.
    d = jnp.array([1.0] * 6 + [10.0] * 4)
    f = lambda p: 0.5 * jnp.sum(d * p**2)  # noqa: E731
    values, _ = so.top_eigenpairs(f, jnp.zeros(10), k=5, num_iters=10, key=jax.random.key(0))
    np.testing.assert_allclose(values, [10.0] * 4 + [1.0], atol=1e-10)


def test_lanczos_with_one_step_or_one_parameter():
    # m = 1: T is the Rayleigh quotient of the start vector, with no off-diagonal.
    d = jnp.arange(1.0, 9.0)
    f = lambda p: 0.5 * jnp.sum(d * p**2)  # noqa: E731
    result = so.lanczos(lambda v: d * v, jnp.zeros(8), num_iters=1, key=jax.random.key(0))
    assert result.alphas.shape == (1,) and result.betas.shape == (0,)
    v = np.asarray(result.basis[0])
    np.testing.assert_allclose(result.alphas[0], v @ (np.asarray(d) * v), rtol=1e-12)
    grid, density = so.spectral_density(
        f, jnp.zeros(8), num_iters=1, num_probes=2, key=jax.random.key(1)
    )
    assert np.all(np.isfinite(density))
    # A single parameter: Lanczos stops at n = 1 step, which is exact.
    g = lambda p: 2.0 * p[0] ** 2  # noqa: E731
    values, _ = so.top_eigenpairs(g, jnp.zeros(1), k=1, num_iters=10, key=jax.random.key(2))
    np.testing.assert_allclose(values, [4.0], rtol=1e-12)


def test_spectral_density_is_exact_for_a_diagonal_hessian():
    # Rademacher probes see every eigenvalue of a diagonal matrix with weight 1/n.
    d = jnp.array([1.0] * 6 + [10.0] * 4)
    f = lambda p: 0.5 * jnp.sum(d * p**2)  # noqa: E731
    # (The density is normalised by construction: its total mass checks nothing.)
    for sigma in (0.2, None):  # None: the default broadening and grid
        grid, density = jax.jit(
            lambda p, k, s=sigma: so.spectral_density(
                f, p, num_iters=10, num_probes=4, key=k, sigma=s
            )
        )(jnp.zeros(10), jax.random.key(0))
        low = jnp.trapezoid(jnp.where(grid < 5.0, density, 0.0), grid)
        np.testing.assert_allclose(low, 0.6, atol=1e-3)
        assert abs(float(grid[jnp.argmax(density)]) - 1.0) < 0.05
        assert float(grid[0]) < 1.0 and float(grid[-1]) > 10.0  # the grid spans both
    # The default broadening is 1% of the Ritz values' range, here 0.09.
    grid = jnp.linspace(0.0, 11.0, 500)
    densities = [
        so.spectral_density(
            f, jnp.zeros(10), num_iters=10, num_probes=4, key=jax.random.key(0), grid=grid, sigma=s
        )[1]
        for s in (None, 0.09)
    ]
    np.testing.assert_allclose(*densities, rtol=1e-3, atol=1e-6)


def test_spectral_density_moments_with_fewer_lanczos_steps_than_parameters():
    # A diagonal Hessian of 40 distinct eigenvalues and 5 Lanczos steps: the nodes are
    # Ritz values, not eigenvalues, but m-step Gauss quadrature is exact for
    # polynomials of degree <= 2m - 1, and every unit Rademacher probe v has
    # v^T H^j v = mean(d^j). So the density's moments are the eigenvalues' (plus the
    # Gaussian broadening's): the quadrature weights, not just the nodes, are right.
    d = jnp.linspace(0.5, 20.0, 40) ** 1.3
    f = lambda p: 0.5 * jnp.sum(d * p**2)  # noqa: E731
    sigma = 0.1
    grid = jnp.linspace(float(d.min()) - 2.0, float(d.max()) + 2.0, 20_000)
    _, density = so.spectral_density(
        f, jnp.zeros(40), num_iters=5, num_probes=3, key=jax.random.key(0), grid=grid, sigma=sigma
    )

    def moment(j):
        return float(jnp.trapezoid(grid**j * density, grid))

    mean = lambda x: float(jnp.mean(x))  # noqa: E731
    np.testing.assert_allclose(moment(1), mean(d), rtol=1e-7)
    np.testing.assert_allclose(moment(2), mean(d**2) + sigma**2, rtol=1e-7)
    np.testing.assert_allclose(moment(3), mean(d**3) + 3 * sigma**2 * mean(d), rtol=1e-7)


def test_spectral_density_mass_sits_at_the_eigenvalues():
    loss_fn, params, support, _ = mlp_problem(sizes=(2, 8, 1))
    f = lambda p: loss_fn(p, support)  # noqa: E731
    eigenvalues = np.linalg.eigvalsh(dense_hessian(f, params))
    n = eigenvalues.size
    sigma = 0.05
    grid = jnp.linspace(eigenvalues.min() - 1.0, eigenvalues.max() + 1.0, 2000)
    slq = jax.jit(
        lambda p, k: so.spectral_density(
            f, p, num_iters=n, num_probes=200, key=k, grid=grid, sigma=sigma
        )
    )
    grid, density = slq(params, jax.random.key(3))
    exact = np.exp(-0.5 * ((np.asarray(grid)[:, None] - eigenvalues) / sigma) ** 2).sum(1)
    exact /= np.trapezoid(exact, grid)
    # Cumulative distributions: SLQ against the broadened eigenvalue histogram.
    dx = np.diff(np.asarray(grid))[0]
    cdf, exact_cdf = np.cumsum(density) * dx, np.cumsum(exact) * dx
    assert np.max(np.abs(cdf - exact_cdf)) < 0.1
    # No mass far from every eigenvalue.
    far = np.min(np.abs(np.asarray(grid)[:, None] - eigenvalues), axis=1) > 6 * sigma
    assert np.trapezoid(np.where(far, density, 0.0), grid) < 1e-3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sigma": 0.0}, "sigma must be positive, got 0.0"),
        ({"sigma": -1.0}, "sigma must be positive"),
        ({"num_grid_points": 1}, "num_grid_points must be >= 2, got 1"),
        ({"grid": jnp.zeros(1)}, r"grid must be one-dimensional with >= 2 points, got \(1,\)"),
        ({"grid": jnp.zeros((2, 2))}, "grid must be one-dimensional"),
    ],
)
def test_spectral_density_refuses_a_broadening_or_grid_that_gives_no_density(kwargs, message):
    f = lambda p: jnp.sum(p**2)  # noqa: E731
    with pytest.raises(ValueError, match=message):
        so.spectral_density(
            f, jnp.zeros(3), num_iters=3, num_probes=1, key=jax.random.key(0), **kwargs
        )


def spd_matrix(n, seed):
    a = jax.random.normal(jax.random.key(seed), (n, n), jnp.float64)
    return a @ a.T / n + 0.1 * jnp.eye(n)


def test_conjugate_gradient_matches_dense_solve():
    A = spd_matrix(12, 0)
    b = jnp.arange(12.0) - 5.0
    x = jax.jit(lambda b: so.conjugate_gradient(lambda v: A @ v, b, num_iters=60))(b)
    np.testing.assert_allclose(x, np.linalg.solve(A, b), rtol=1e-8)
    # One iteration is not a solve: the test above can fail.
    x1 = so.conjugate_gradient(lambda v: A @ v, b, num_iters=1)
    assert np.linalg.norm(x1 - np.linalg.solve(A, b)) > 1e-2


def test_conjugate_gradient_on_pytrees_with_initial_guess():
    A = spd_matrix(5, 1)
    unravel = ravel_pytree({"w": jnp.zeros((2, 2)), "b": jnp.zeros(1)})[1]

    def matvec(tree):
        return unravel(A @ ravel_pytree(tree)[0])

    b = unravel(jnp.array([1.0, -2.0, 0.5, 3.0, -1.0]))
    expected = np.linalg.solve(A, flat(b))
    x = so.conjugate_gradient(matvec, b, num_iters=20)
    np.testing.assert_allclose(flat(x), expected, rtol=1e-8)
    # Started at the solution, it stays there: one iteration from zero does not
    # get there (5 would, which would not test x0).
    x = so.conjugate_gradient(matvec, b, num_iters=1, x0=unravel(jnp.asarray(expected)))
    np.testing.assert_allclose(flat(x), expected, rtol=1e-8)
    x = so.conjugate_gradient(matvec, b, num_iters=1)
    assert np.linalg.norm(flat(x) - expected) > 1e-2 * np.linalg.norm(expected)
    # The gradient is the backward solve's, which starts from zero whatever x0 is.
    c = jnp.linspace(-1.0, 1.0, 5)

    def gradient(x0):
        def objective(b):
            return c @ ravel_pytree(so.conjugate_gradient(matvec, b, num_iters=1, x0=x0))[0]

        return flat(jax.grad(objective)(b))

    np.testing.assert_allclose(gradient(unravel(jnp.asarray(expected))), gradient(None), rtol=1e-12)


def test_conjugate_gradient_differentiates_and_survives_a_zero_residual():
    A = spd_matrix(6, 2)
    b, c = jnp.arange(6.0) - 2.5, jnp.linspace(-1.0, 1.0, 6)

    def objective(b):
        return c @ so.conjugate_gradient(lambda v: A @ v, b, num_iters=30)

    # d/db of c^T A^{-1} b is A^{-1} c: reverse mode through the loop.
    np.testing.assert_allclose(jax.grad(objective)(b), np.linalg.solve(A, c), rtol=1e-7)
    # b = 0: zero residual from the start, so every step divides 0 by 0 unless guarded;
    # the solve is exactly 0, and its gradient is still A^{-1} c (backpropagating
    # through the frozen iterations gave 0).
    zero = jnp.zeros(6)
    assert np.all(np.asarray(so.conjugate_gradient(lambda v: A @ v, zero, num_iters=5)) == 0)
    np.testing.assert_allclose(jax.grad(objective)(zero), np.linalg.solve(A, c), rtol=1e-7)
    # The gradient with respect to the operator: d(c^T A^{-1} b)/dA = -A^{-T} c b^T A^{-T}.
    dA = jax.grad(lambda A: c @ so.conjugate_gradient(lambda v: A @ v, b, num_iters=30))(A)
    x, y = np.linalg.solve(A, b), np.linalg.solve(A, c)
    np.testing.assert_allclose(dA, -np.outer(y, x), rtol=1e-6, atol=1e-9)


def test_conjugate_gradient_refuses_no_iterations():
    with pytest.raises(ValueError, match="num_iters must be >= 1, got 0"):
        so.conjugate_gradient(lambda v: v, jnp.ones(3), num_iters=0)


def test_conjugate_gradient_spends_no_matvec_on_a_zero_initial_guess():
    A, b, calls = spd_matrix(4, 3), jnp.ones(4), []

    def matvec(v):
        jax.debug.callback(lambda: calls.append(None))  # once per product computed
        return A @ v

    jax.block_until_ready(so.conjugate_gradient(matvec, b, num_iters=3))
    jax.effects_barrier()
    assert len(calls) == 3  # the loop's three products
    jax.block_until_ready(so.conjugate_gradient(matvec, b, num_iters=3, x0=jnp.zeros(4)))
    jax.effects_barrier()
    assert len(calls) == 3 + 4  # A @ x0, then the loop


def test_top_eigenpairs_refuses_more_eigenpairs_than_lanczos_steps():
    # k = 3 from 2 Lanczos steps would return 2 eigenvalues, not the 3 asked for.
    f = lambda p: jnp.sum(jnp.arange(1.0, 6.0) * p**2)  # noqa: E731
    with pytest.raises(ValueError, match=r"k must be in \[1, min\(num_iters, n\)\], got 3"):
        so.top_eigenpairs(f, jnp.zeros(5), k=3, num_iters=2, key=jax.random.key(0))


def test_conjugate_gradient_tolerance_is_relative_to_the_residual_norm():
    # tol bounds ||r|| / ||b||, not its square: tol = 1e-6 gives a solve to ~1e-6, not 1e-3.
    A = spd_matrix(30, 4)
    b = jnp.sin(jnp.arange(30.0))
    x = so.conjugate_gradient(lambda v: A @ v, b, num_iters=200, tol=1e-6)
    residual = np.linalg.norm(b - A @ x) / np.linalg.norm(b)
    assert residual <= 1e-6
    # It stops there: far from converged to rounding.
    assert residual > 1e-14
