"""Second-order tools over parameter pytrees: Hessian-vector products and what they drive.

Everything here sees a scalar function ``f(params)`` of a pytree of float
arrays (for example ``lambda p: meta_loss(loss_fn, p, support, query, ...)``)
and never forms a Hessian unless asked to (``hessian``): Lanczos, the top
eigenpairs, the stochastic Lanczos quadrature spectral density and conjugate
gradients only ever call ``hvp``. All functions are pure and jit-able (pass
``f`` and the static integers through ``functools.partial`` or a closure).

Lanczos and the spectral density work on the flattened parameter vector
(``jax.flatten_util.ravel_pytree``); eigenvectors come back as pytrees with a
leading axis of size ``k`` on every leaf.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

PyTree = Any
ScalarFn = Callable[[PyTree], jax.Array]
MatVec = Callable[[PyTree], PyTree]


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
    """The inner product ``sum_i <a_i, b_i>`` of two pytrees of the same structure."""
    leaves = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.vdot(x, y), a, b))
    return sum(leaves, start=jnp.zeros((), jnp.result_type(*leaves)))


def hvp(f: ScalarFn, params: PyTree, v: PyTree) -> PyTree:
    """The Hessian-vector product ``(d^2 f / d params^2) v``, without forming the Hessian.

    Forward over reverse: the JVP of ``grad f``, one forward pass over the
    backward pass (the cheapest of the three; the two below agree to rounding).

    Args:
      f: scalar function of a pytree, ``f(params) -> ()``.
      params: pytree of float arrays, the point at which the Hessian is taken.
      v: pytree shaped like ``params``.

    Returns:
      A pytree shaped like ``params``.
    """
    return jax.jvp(jax.grad(f), (params,), (v,))[1]


def hvp_reverse_over_reverse(f: ScalarFn, params: PyTree, v: PyTree) -> PyTree:
    """``hvp`` as the gradient of ``<grad f, v>`` (the JAX tutorial's version)."""
    return jax.grad(lambda p: tree_vdot(jax.grad(f)(p), v))(params)


def hvp_reverse_over_forward(f: ScalarFn, params: PyTree, v: PyTree) -> PyTree:
    """``hvp`` as the gradient of the directional derivative ``jvp(f, v)``; a
    ``jax.custom_vjp`` in ``f`` (the ``phases`` convolution of ``maml.ops``) does
    not allow it."""
    return jax.grad(lambda p: jax.jvp(f, (p,), (v,))[1])(params)


def hessian(f: ScalarFn, params: PyTree) -> tuple[jax.Array, Callable[[jax.Array], PyTree]]:
    """The dense Hessian of ``f`` in the flattened parameters, one ``hvp`` per basis vector.

    Only for small models: it costs ``n`` Hessian-vector products (vmapped)
    and ``n^2`` memory, ``n`` the total number of parameters.

    Returns:
      ``(H, unravel)``: ``H`` is ``(n, n)`` in the order of
      ``ravel_pytree(params)``; ``unravel`` maps a length-``n`` vector (a row
      or column of ``H``) back to a pytree shaped like ``params``.
    """
    flat, unravel = ravel_pytree(params)
    basis = jnp.eye(flat.size, dtype=flat.dtype)

    def column(e):
        return ravel_pytree(hvp(f, params, unravel(e)))[0]

    # H e_i is the i-th column; stacking columns as rows gives H^T = H.
    return jax.vmap(column)(basis), unravel


class LanczosResult(NamedTuple):
    """The output of ``num_iters`` Lanczos steps, ``A V^T ~= V^T T``.

    Attributes:
      alphas: ``(m,)``, the diagonal of the tridiagonal matrix ``T``.
      betas: ``(m - 1,)``, its off-diagonal (zero where Lanczos restarted
        after an invariant subspace was exhausted).
      basis: ``(m, n)``, orthonormal Lanczos vectors as rows, flattened
        in the order of ``ravel_pytree(params)``.
    """

    alphas: jax.Array
    betas: jax.Array
    basis: jax.Array

    def tridiagonal(self) -> jax.Array:
        """The dense ``(m, m)`` tridiagonal matrix ``T``."""
        return jnp.diag(self.alphas) + jnp.diag(self.betas, 1) + jnp.diag(self.betas, -1)


def _orthogonalize(w: jax.Array, basis: jax.Array) -> jax.Array:
    # Twice is enough (Kahan-Parlett): one classical Gram-Schmidt pass loses
    # orthogonality when w is nearly in the span; zero rows of basis are inert.
    w = w - basis.T @ (basis @ w)
    return w - basis.T @ (basis @ w)


def _lanczos_flat(
    matvec: Callable[[jax.Array], jax.Array], v0: jax.Array, num_iters: int, key: jax.Array
) -> LanczosResult:
    """Lanczos with full reorthogonalization on flat vectors, from ``v0``."""
    n = v0.size
    dtype = v0.dtype
    eps = jnp.finfo(dtype).eps
    basis = jnp.zeros((num_iters, n), dtype).at[0].set(v0 / jnp.linalg.norm(v0))
    alphas = jnp.zeros((num_iters,), dtype)
    # One slot more than T's off-diagonal, so the loop's write is never into an empty array.
    betas = jnp.zeros((num_iters,), dtype)

    def body(i, carry):
        basis, alphas, betas, scale = carry
        v = basis[i]
        w = matvec(v)
        alpha = jnp.vdot(w, v)
        w = _orthogonalize(w, basis)
        beta = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, jnp.maximum(jnp.abs(alpha), beta))
        # An invariant subspace is exhausted (w vanished to rounding): go on
        # from a fresh random direction orthogonal to the basis, with beta = 0,
        # so T becomes block diagonal and stays a valid projection of A.
        breakdown = beta <= jnp.sqrt(n).astype(dtype) * eps * scale
        fresh = _orthogonalize(jax.random.normal(jax.random.fold_in(key, i), (n,), dtype), basis)
        fresh = fresh / jnp.linalg.norm(fresh)
        next_v = jnp.where(breakdown, fresh, w / jnp.where(breakdown, 1.0, beta))
        beta = jnp.where(breakdown, 0.0, beta)
        alphas = alphas.at[i].set(alpha)
        is_last = i + 1 >= num_iters
        # Writing at index i + 1 past the end is dropped by JAX's scatter.
        basis = basis.at[i + 1].set(next_v, mode="drop")
        betas = betas.at[i].set(jnp.where(is_last, 0.0, beta))
        return basis, alphas, betas, scale

    init = (basis, alphas, betas, jnp.zeros((), dtype))
    basis, alphas, betas, _ = jax.lax.fori_loop(0, num_iters, body, init)
    return LanczosResult(alphas, betas[: num_iters - 1], basis)


def _check_num_iters(num_iters: int, n: int) -> int:
    if num_iters < 1:
        raise ValueError(f"num_iters must be >= 1, got {num_iters}")
    # More than n orthonormal vectors do not exist in R^n.
    return min(num_iters, n)


def lanczos(matvec: MatVec, params: PyTree, *, num_iters: int, key: jax.Array) -> LanczosResult:
    """Lanczos tridiagonalization of a symmetric linear operator on pytrees.

    Args:
      matvec: symmetric linear map from pytrees shaped like ``params`` to the
        same, e.g. ``lambda v: hvp(f, params, v)``.
      params: pytree fixing the structure, shapes and dtype (values unused).
      num_iters: static number of Lanczos steps ``m`` (20-100 is typical);
        capped at the number of parameters ``n``.
      key: PRNG key for the Gaussian starting vector (and for restarts after
        an exhausted invariant subspace).

    Returns:
      A ``LanczosResult`` with ``alphas (m,)``, ``betas (m - 1,)`` and the
      flattened orthonormal ``basis (m, n)``; eigenvalues of
      ``result.tridiagonal()`` (Ritz values) approximate the extreme
      eigenvalues of the operator.
    """
    flat, unravel = ravel_pytree(params)
    num_iters = _check_num_iters(num_iters, flat.size)
    start_key, restart_key = jax.random.split(key)
    v0 = jax.random.normal(start_key, flat.shape, flat.dtype)

    def flat_matvec(x):
        return ravel_pytree(matvec(unravel(x)))[0]

    return _lanczos_flat(flat_matvec, v0, num_iters, restart_key)


def top_eigenpairs(
    f: ScalarFn, params: PyTree, *, k: int, num_iters: int, key: jax.Array
) -> tuple[jax.Array, PyTree]:
    """The ``k`` largest (algebraic) Hessian eigenvalues of ``f`` at ``params``, by Lanczos.

    Args:
      f: scalar function of a pytree.
      params: pytree of float arrays.
      k: static number of eigenpairs, ``k <= num_iters``.
      num_iters: static number of Lanczos steps (exact when ``>= n``).
      key: PRNG key.

    Returns:
      ``(eigenvalues, eigenvectors)``: eigenvalues ``(k,)`` in descending
      order; eigenvectors a pytree shaped like ``params`` with a leading
      axis of size ``k`` on every leaf, each of unit norm.
    """
    flat, unravel = ravel_pytree(params)
    if not 1 <= k <= min(num_iters, flat.size):
        raise ValueError(f"k must be in [1, min(num_iters, n)], got {k}")
    result = lanczos(lambda v: hvp(f, params, v), params, num_iters=num_iters, key=key)
    ritz_values, ritz_vectors = jnp.linalg.eigh(result.tridiagonal())
    order = jnp.argsort(ritz_values)[::-1][:k]
    eigenvalues = ritz_values[order]
    vectors = ritz_vectors[:, order].T @ result.basis
    return eigenvalues, jax.vmap(unravel)(vectors)


def spectral_density(
    f: ScalarFn,
    params: PyTree,
    *,
    num_iters: int,
    num_probes: int,
    key: jax.Array,
    grid: jax.Array | None = None,
    sigma: float | jax.Array | None = None,
    num_grid_points: int = 1000,
) -> tuple[jax.Array, jax.Array]:
    """Hessian eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al. 2019).

    Each of ``num_probes`` Rademacher probes ``v`` (scaled to unit norm) runs
    ``num_iters`` Lanczos steps; the eigen-decomposition ``T = U diag(tau) U^T``
    gives the Gauss quadrature of the probe's spectral measure, nodes ``tau_j``
    with weights ``U[0, j]^2``. The density is the probe average of
    ``sum_j U[0, j]^2 N(t; tau_j, sigma^2)``, an unbiased estimate of the
    Gaussian-broadened eigenvalue histogram ``(1/n) sum_i N(t; lambda_i, sigma^2)``
    when the Lanczos quadrature is exact.

    Args:
      f: scalar function of a pytree.
      params: pytree of float arrays.
      num_iters: static Lanczos steps per probe.
      num_probes: static number of probes.
      key: PRNG key.
      grid: ``(g,)`` points at which to evaluate the density; by default
        ``num_grid_points`` points spanning the Ritz values plus a margin.
      sigma: Gaussian broadening; by default 1% of the Ritz value range.
      num_grid_points: size of the default grid.

    Returns:
      ``(grid, density)``, both ``(g,)``, the density normalized so that its
      trapezoidal integral over ``grid`` is 1.
    """
    flat, unravel = ravel_pytree(params)
    n = flat.size
    num_iters = _check_num_iters(num_iters, n)
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    # Each of these gave NaN, inf or a negative "density" without a word.
    if grid is None and num_grid_points < 2:
        raise ValueError(f"num_grid_points must be >= 2, got {num_grid_points}")
    if grid is not None and (jnp.ndim(grid) != 1 or jnp.shape(grid)[0] < 2):
        raise ValueError(f"grid must be one-dimensional with >= 2 points, got {jnp.shape(grid)}")
    if isinstance(sigma, int | float) and not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")

    def flat_hvp(x):
        return ravel_pytree(hvp(f, params, unravel(x)))[0]

    def one_probe(probe_key):
        sign_key, restart_key = jax.random.split(probe_key)
        v0 = jax.random.rademacher(sign_key, (n,), flat.dtype) / jnp.sqrt(n).astype(flat.dtype)
        result = _lanczos_flat(flat_hvp, v0, num_iters, restart_key)
        nodes, vectors = jnp.linalg.eigh(result.tridiagonal())
        return nodes, vectors[0] ** 2

    nodes, weights = jax.vmap(one_probe)(jax.random.split(key, num_probes))
    lo, hi = jnp.min(nodes), jnp.max(nodes)
    if sigma is None:
        sigma = 0.01 * (hi - lo) + jnp.finfo(flat.dtype).eps * (1.0 + jnp.abs(hi))
    if grid is None:
        margin = 5.0 * sigma + 0.05 * (hi - lo)
        grid = jnp.linspace(lo - margin, hi + margin, num_grid_points, dtype=flat.dtype)
    diffs = grid[:, None, None] - nodes[None]
    gaussians = jnp.exp(-0.5 * (diffs / sigma) ** 2) / (sigma * jnp.sqrt(2.0 * jnp.pi))
    density = jnp.sum(gaussians * weights[None], axis=(1, 2)) / num_probes
    return grid, density / jnp.trapezoid(density, grid)


def conjugate_gradient(
    matvec: MatVec,
    b: PyTree,
    *,
    num_iters: int,
    x0: PyTree | None = None,
    tol: float = 1e-10,
) -> PyTree:
    """Solves ``A x = b`` for a symmetric positive definite operator ``A`` on pytrees.

    Runs at most ``num_iters`` conjugate gradient iterations in a
    ``lax.fori_loop`` (so it is jit-able and vmap-able); once the residual norm
    falls to ``tol * ||b - A x0||`` the iterate is frozen. It is differentiable through
    ``lax.custom_linear_solve``: the gradient with respect to ``b`` (and to
    whatever ``matvec`` closes over) is another CG solve with ``A``, the implicit
    gradient of ``A^{-1} b``, exact when CG has converged, and defined at
    ``b = 0`` (where backpropagating through the iterations would give 0).

    Args:
      matvec: ``x -> A x`` on pytrees shaped like ``b``, e.g. an ``hvp`` closure.
      b: right-hand side pytree.
      num_iters: static maximum number of iterations, ``>= 1`` (exact in exact
        arithmetic after ``n`` iterations).
      x0: initial guess shaped like ``b``; zeros by default. CG solves for the
        correction ``A^{-1} (b - A x0)``, so the gradient does not depend on it.
      tol: relative residual tolerance.

    Returns:
      ``x``, a pytree shaped like ``b``.
    """
    if num_iters < 1:
        raise ValueError(f"num_iters must be >= 1, got {num_iters}")

    def solve(matvec, b):
        return _cg_iterations(matvec, b, num_iters=num_iters, tol=tol)

    if x0 is None:  # no matvec spent on A @ 0
        return jax.lax.custom_linear_solve(matvec, b, solve, symmetric=True)
    # From x0: the correction solves A d = b - A x0 from zero, as the backward
    # solves do (their right-hand sides are others: x0 would be no head start).
    x0 = jax.lax.stop_gradient(x0)
    residual = jax.tree.map(lambda bi, ai: bi - ai, b, matvec(x0))
    correction = jax.lax.custom_linear_solve(matvec, residual, solve, symmetric=True)
    return jax.tree.map(lambda xi, di: xi + di, x0, correction)


def _cg_iterations(matvec: MatVec, b: PyTree, *, num_iters: int, tol: float) -> PyTree:
    """``num_iters`` CG iterations for ``A x = b`` from ``x = 0`` (residual ``b``)."""
    threshold = (tol**2) * tree_vdot(b, b)

    def axpy(a, x, y):
        return jax.tree.map(lambda xi, yi: a * xi + yi, x, y)

    def body(_, carry):
        x, r, p, rs = carry
        active = rs > threshold
        ap = matvec(p)
        pap = tree_vdot(p, ap)
        alpha = jnp.where(active & (pap != 0), rs / jnp.where(pap != 0, pap, 1.0), 0.0)
        x = axpy(alpha, p, x)
        r = axpy(-alpha, ap, r)
        rs_new = tree_vdot(r, r)
        beta = jnp.where(active & (rs != 0), rs_new / jnp.where(rs != 0, rs, 1.0), 0.0)
        p_new = axpy(beta, p, r)
        p = jax.tree.map(lambda a, b_: jnp.where(active, a, b_), p_new, p)
        rs = jnp.where(active, rs_new, rs)
        return x, r, p, rs

    init = (jax.tree.map(jnp.zeros_like, b), b, b, tree_vdot(b, b))
    x, *_ = jax.lax.fori_loop(0, num_iters, body, init)
    return x
