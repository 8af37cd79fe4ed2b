"""Diagnostics of meta-gradients and curvature, shared by ``scripts/meta_gradient.py`` and
``scripts/analyze_curvature.py``.

Two groups of functions:

* Meta-gradients: the exact second-order MAML meta-gradient (optionally with
  rematerialised inner steps), first-order MAML's and iMAML's, all as
  ``grad_fn(params, support, query) -> grads`` over a meta-batch (a leading
  task axis on every leaf of ``support`` and ``query``); pytree norms, cosine
  similarities, a central finite-difference check of a gradient along a
  random unit direction, and the compile-excluded time and compiled memory
  of a jitted function.
* Curvature: top Hessian eigenvalues (Lanczos) and the spectral density
  (stochastic Lanczos quadrature) of the pre-adaptation support loss (of the
  leaves the inner loop adapts, ``adapted_only``) and of the meta-loss, and
  the per-task largest support-loss eigenvalue against the SGD stability
  limit ``inner_lr < 2 / lambda_max``. Only Hessian-vector
  products are used, so these run on the 112k-parameter Omniglot conv net.

The gradient and curvature functions are pure and jit-able; ``time_and_memory``
is the one that measures (and so runs) what it is given.
"""

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from maml import core, imaml, second_order

PyTree = Any
Batch = Any
LossFn = Callable[[PyTree, Batch], jax.Array]
GradFn = Callable[[PyTree, Batch, Batch], PyTree]

# The meta-gradients compared by ``meta_gradient_fns``, in reporting order.
METHODS = ("exact", "exact_remat", "first_order", "imaml")


# --- Meta-gradients --------------------------------------------------------------


def meta_gradient_fns(
    loss_fn: LossFn,
    *,
    inner_lr: float | PyTree,
    num_inner_steps: int,
    imaml_lambda: float,
    imaml_cg_steps: int,
    imaml_cg_damping: float = 0.0,
    imaml_lam_damping: float = 0.0,
) -> dict[str, GradFn]:
    """The meta-gradients of ``METHODS`` as ``grad_fn(params, support, query) -> grads``.

    ``support`` and ``query`` carry a leading task axis ``(num_tasks, ...)`` on
    every leaf; each ``grad_fn`` returns a pytree shaped like ``params``, the
    gradient of the mean over tasks:

    * ``exact``: ``jax.grad`` of ``core.batched_meta_loss``, differentiated
      through every inner step (second order);
    * ``exact_remat``: the same with each inner step rematerialised
      (``remat=True``): equal values, activations recomputed instead of kept;
    * ``first_order``: first-order MAML (inner gradients held constant);
    * ``imaml``: implicit MAML's, ``num_inner_steps`` proximal steps at
      ``inner_lr`` and ``imaml_cg_steps`` conjugate gradient iterations (on the
      damped system with ``imaml_cg_damping`` or ``imaml_lam_damping``: see
      ``maml.imaml``).
    """

    def maml_grad(*, first_order: bool, remat: bool) -> GradFn:
        def grad_fn(params, support, query):
            return jax.grad(
                lambda p: core.batched_meta_loss(
                    loss_fn,
                    p,
                    support,
                    query,
                    inner_lr=inner_lr,
                    num_inner_steps=num_inner_steps,
                    first_order=first_order,
                    remat=remat,
                )
            )(params)

        return grad_fn

    def imaml_grad(params, support, query):
        return imaml.batched_imaml_loss_and_grad(
            loss_fn,
            params,
            support,
            query,
            inner_lr=inner_lr,
            num_inner_steps=num_inner_steps,
            lam=imaml_lambda,
            num_cg_steps=imaml_cg_steps,
            cg_damping=imaml_cg_damping,
            lam_damping=imaml_lam_damping,
        )[1]

    return {
        "exact": maml_grad(first_order=False, remat=False),
        "exact_remat": maml_grad(first_order=False, remat=True),
        "first_order": maml_grad(first_order=True, remat=False),
        "imaml": imaml_grad,
    }


def tree_norm(tree: PyTree) -> jax.Array:
    """The Euclidean norm of all leaves of ``tree`` together, a scalar."""
    return jnp.sqrt(second_order.tree_vdot(tree, tree))


def cosine_similarity(a: PyTree, b: PyTree) -> jax.Array:
    """``<a, b> / (|a| |b|)`` over whole pytrees of the same structure; 0 if either is 0,
    NaN if either is not finite (a diverged gradient is not orthogonal to anything)."""
    denominator = tree_norm(a) * tree_norm(b)
    return jnp.where(denominator == 0, 0.0, second_order.tree_vdot(a, b) / denominator)


def random_unit_direction(key: jax.Array, params: PyTree) -> PyTree:
    """A Gaussian direction shaped and typed like ``params``, of unit (total) norm."""
    flat, unravel = ravel_pytree(params)
    v = jax.random.normal(key, flat.shape, flat.dtype)
    return unravel(v / jnp.linalg.norm(v))


def finite_difference_check(
    f: Callable[[PyTree], jax.Array],
    params: PyTree,
    grads: PyTree,
    direction: PyTree,
    *,
    eps: float,
) -> dict[str, float]:
    """Compares ``<grads, direction>`` with the central difference of ``f`` along ``direction``.

    Args:
      f: scalar function of ``params``; ``grads`` claims to be its gradient.
      params, grads, direction: pytrees of the same structure.
      eps: step of ``(f(p + eps v) - f(p - eps v)) / (2 eps)``; about ``1e-6`` in
        float64. In float32 no step checks a gradient tightly (rounding grows as
        ``1/eps``, truncation as ``eps**2``): ``scripts/meta_gradient.py`` differences
        in float64 for that reason.

    Returns:
      ``{"analytic", "finite_difference", "relative_error"}``, the error
      relative to the larger magnitude of the two directional derivatives.
    """
    step = jax.tree.map(lambda v: eps * v, direction)
    plus = f(jax.tree.map(jnp.add, params, step))
    minus = f(jax.tree.map(jnp.subtract, params, step))
    numeric = float((plus - minus) / (2 * eps))
    analytic = float(second_order.tree_vdot(grads, direction))
    scale = max(abs(numeric), abs(analytic), np.finfo(np.float64).tiny)
    return {
        "analytic": analytic,
        "finite_difference": numeric,
        "relative_error": abs(numeric - analytic) / scale,
    }


def compiled_memory(compiled: Any) -> dict[str, int] | None:
    """Sizes in bytes from a compiled executable's ``memory_analysis()``; ``None`` if unreported.

    Keys: ``temp``, ``argument``, ``output``, ``alias``, ``generated_code``,
    each the matching ``*_size_in_bytes`` XLA reports (``temp`` is the
    scratch memory the computation needs beyond its inputs and outputs).
    """
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError, AttributeError):
        return None
    if stats is None:
        return None
    out = {}
    for name in ("temp", "argument", "output", "alias", "generated_code"):
        value = getattr(stats, f"{name}_size_in_bytes", None)
        if value is not None:
            out[name] = int(value)
    return out or None


def device_peak_bytes() -> int | None:
    """The first device's peak bytes in use so far (GPU/TPU), ``None`` where unreported (CPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except (NotImplementedError, RuntimeError, AttributeError):
        return None
    if not stats:
        return None
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else int(peak)


def time_and_memory(fn: Callable, *args: Any, repeats: int) -> tuple[Any, dict[str, Any]]:
    """Compiles ``jax.jit(fn)`` for ``args``, then times ``repeats`` calls.

    Returns:
      ``(output, stats)``: ``output`` of the last call; ``stats`` with
      ``compile_s``, ``median_s`` (compile excluded, each call waited for with
      ``block_until_ready``), ``times_s``, ``memory`` (``compiled_memory``)
      and ``device_peak_bytes`` (the process's high-water mark after the
      calls, or ``None``).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    times = []
    output = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        output = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return output, {
        "compile_s": compile_s,
        "median_s": statistics.median(times),
        "times_s": times,
        "memory": compiled_memory(compiled),
        "device_peak_bytes": device_peak_bytes(),
    }


# --- Curvature ------------------------------------------------------------------


def support_loss(loss_fn: LossFn, params: PyTree, support: Batch) -> jax.Array:
    """Mean over tasks of the pre-adaptation loss ``loss_fn(params, support_i)``.

    ``support`` carries a leading task axis on every leaf.
    """
    return jnp.mean(jax.vmap(lambda s: loss_fn(params, s))(support))


def adapted_only(loss_fn: LossFn, params: PyTree, *, inner_lr: float | PyTree) -> LossFn:
    """``loss_fn`` as the inner loop sees it: a function of the leaves it adapts only.

    The leaves of rate 0 (a scalar 0 for all, or per-leaf rates as from
    ``Experiment.inner_rates``) are held at ``params``, so the Hessian of the
    result at ``params`` is ``loss_fn``'s with the frozen leaves' rows and
    columns zeroed: the block whose curvature decides whether inner SGD is
    stable. Where every rate is non-zero it equals ``loss_fn``.
    """
    rates = core.per_leaf_rates(inner_lr, params)

    def restricted(p: PyTree, batch: Batch) -> jax.Array:
        def hold(rate, q, p0):
            return jnp.where(jnp.asarray(rate) != 0, q, p0)

        return loss_fn(jax.tree.map(hold, rates, p, params), batch)

    return restricted


def num_adapted(params: PyTree, *, inner_lr: float | PyTree) -> int:
    """How many parameters the inner loop adapts: those of a non-zero rate."""
    rates = jax.tree.leaves(core.per_leaf_rates(inner_lr, params))
    return sum(
        int(np.count_nonzero(np.broadcast_to(np.asarray(rate) != 0, np.shape(x))))
        for x, rate in zip(jax.tree.leaves(params), rates, strict=True)
    )


def curvature(
    f: Callable[[PyTree], jax.Array],
    params: PyTree,
    *,
    top_k: int,
    num_iters: int,
    num_probes: int,
    key: jax.Array,
    num_grid_points: int = 1000,
) -> dict[str, jax.Array]:
    """Top Hessian eigenvalues and the spectral density of ``f`` at ``params``, by Lanczos.

    Returns:
      ``{"eigenvalues": (top_k,) descending, "grid": (g,), "density": (g,)}``
      (``second_order.top_eigenpairs`` and ``second_order.spectral_density``).
    """
    eig_key, density_key = jax.random.split(key)
    eigenvalues, _ = second_order.top_eigenpairs(
        f, params, k=top_k, num_iters=num_iters, key=eig_key
    )
    grid, density = second_order.spectral_density(
        f,
        params,
        num_iters=num_iters,
        num_probes=num_probes,
        key=density_key,
        num_grid_points=num_grid_points,
    )
    return {"eigenvalues": eigenvalues, "grid": grid, "density": density}


def per_task_lambda_max(
    loss_fn: LossFn, params: PyTree, support: Batch, *, num_iters: int, key: jax.Array
) -> jax.Array:
    """The largest Hessian eigenvalue of each task's support loss, ``(num_tasks,)``.

    One Lanczos run per task (``jax.lax.map``, so one task's basis is in
    memory at a time).
    """
    num_tasks = jax.tree.leaves(support)[0].shape[0]

    def one_task(args):
        task_support, task_key = args
        eigenvalues, _ = second_order.top_eigenpairs(
            lambda p: loss_fn(p, task_support), params, k=1, num_iters=num_iters, key=task_key
        )
        return eigenvalues[0]

    return jax.lax.map(one_task, (support, jax.random.split(key, num_tasks)))


def sgd_stability(
    inner_lr: float, lambda_max: float, *, lam: float = 0.0
) -> dict[str, float | bool]:
    """Gradient descent at ``inner_lr`` on a quadratic of top curvature ``lambda_max``.

    It converges along the top eigendirection iff ``inner_lr < 2 / lambda_max``
    (for ``lambda_max > 0``). ``lam``: iMAML's proximal strength; its inner
    loop descends ``loss + lam / 2 ||phi - theta||^2``, of top curvature
    ``lambda_max + lam``, so its limit is ``2 / (lambda_max + lam)``.

    Returns:
      ``{"lambda_max", "lam", "limit_lr" (2 / (lambda_max + lam), inf if that
      curvature is <= 0, NaN if it is not finite), "inner_lr", "ratio" (inner_lr /
      limit_lr), "stable"}``; a ``lambda_max`` that is not finite (a diverged
      estimate) is never stable.
    """
    lambda_max, lam = float(lambda_max), float(lam)
    top = lambda_max + lam
    if not math.isfinite(top):
        limit = math.nan
    else:
        limit = 2.0 / top if top > 0 else math.inf
    return {
        "lambda_max": lambda_max,
        "lam": lam,
        "limit_lr": limit,
        "inner_lr": float(inner_lr),
        "ratio": float(inner_lr) / limit,
        "stable": bool(float(inner_lr) < limit),
    }
