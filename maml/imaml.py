"""Implicit MAML (Rajeswaran, Finn, Kakade and Levine, 2019): meta-gradients without unrolling.

The inner problem regularizes the task solution towards the meta-parameters
``theta``,

    phi*(theta) = argmin_phi  loss_fn(phi, support) + lam / 2 ||phi - theta||^2,

approximated here by ``num_inner_steps`` gradient steps from ``phi = theta``.
At a stationary point the implicit function theorem gives
``d phi* / d theta = (I + H / lam)^{-1}``, ``H`` the support-loss Hessian at
``phi*``, so the meta-gradient of the query loss is the solution ``g`` of

    (I + H / lam) g = grad_phi loss_fn(phi*, query),

found by conjugate gradients driven only by ``second_order.hvp``. Nothing
differentiates through the inner loop, so memory does not grow with
``num_inner_steps``. All functions are pure and vmap over tasks.

CG assumes ``I + H / lam`` positive definite, i.e. ``lam > -lambda_min(H)``.
A few inner steps from ``theta`` do not reach a minimum, so ``H`` can have
eigenvalues below ``-lam``: on a 50-step tiny sinusoid checkpoint at the
sinusoid config's ``lam = 1``, ``I + H`` had 19 to 22 negative eigenvalues (the
smallest -1.3 to -7.6) in each of four cases (two tasks, 0 or 1 inner steps),
and the config's 5 CG steps ended 0.6 to 41 times the dense solution's norm
away from it (20 steps: 0.04 to 0.7; 100 steps: 1e-9). CG still converges
there (the system is nonsingular), but slowly and not monotonically: raise
``lam`` or the CG steps when ``scripts/meta_gradient.py`` shows iMAML far from
the exact meta-gradient.

``inner_lr`` may be a pytree of per-leaf rates, as in ``core.adapt``: a leaf
at rate 0 is not adapted (``phi`` keeps ``theta``'s value there). The system
is then solved on the adapted block ``a`` only, and a frozen leaf ``f`` gets
``grad_f - H_fa g_a / lam``: its direct query gradient and its pull on
``phi*_a`` through the support loss.

``cg_damping`` and ``lam_damping`` solve the damped system of the paper's code
(aravindr93/imaml_dev, defaults 1 and 10) instead,

    ((1 + cg_damping) I + H / (lam + lam_damping)) g = grad_phi loss_fn(phi*, query),

which is the system above at ``lam' = (1 + cg_damping)(lam + lam_damping)``,
divided by ``1 + cg_damping``: the meta-gradient is the implicit one for a
proximal strength ``lam'`` (frozen leaves included), scaled by
``1 / (1 + cg_damping)``, while the inner loop keeps ``lam``. A larger
``lam'`` makes the system better conditioned (positive definite once
``lam' > -lambda_min(H)``), and the gradient less that of the inner loop that
ran, at ``lam``.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maml import core, second_order

PyTree = Any
Batch = Any
LossFn = Callable[[PyTree, Batch], jax.Array]


def adapt_proximal(
    loss_fn: LossFn,
    params: PyTree,
    support: Batch,
    *,
    inner_lr: float | jax.Array | PyTree,
    num_inner_steps: int,
    lam: float | jax.Array,
) -> PyTree:
    """Approximates the proximal task solution ``phi*`` by gradient descent from ``params``.

    Each step is ``phi <- phi - inner_lr * (grad loss_fn(phi, support) + lam (phi - params))``.
    The loop is a ``lax.fori_loop``, so many steps compile as one; it is
    differentiable, but ``imaml_loss_and_grad`` never differentiates it.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: the meta-parameters ``theta``, a pytree of float arrays.
      support: the task's support batch.
      inner_lr: inner learning rate, or a pytree of per-leaf rates (0 keeps a
        leaf at ``theta``); the steps converge for a convex support loss when
        ``inner_lr < 2 / (L + lam)``, ``L`` its curvature.
      num_inner_steps: static number of steps; 0 returns ``params``.
      lam: strength of the proximal regularizer, ``> 0``.

    Returns:
      ``phi``, a pytree shaped like ``params``.
    """
    if num_inner_steps < 0:
        raise ValueError(f"num_inner_steps must be >= 0, got {num_inner_steps}")
    _check_lam(lam)

    rates = core.per_leaf_rates(inner_lr, params)

    def step(_, phi):
        grads = jax.grad(loss_fn)(phi, support)
        # Each leaf keeps its dtype whatever the dtype of the rates and lam (as in core.sgd_step).
        return jax.tree.map(
            lambda p, g, t, r: (p - r * (g + lam * (p - t))).astype(p.dtype),
            phi,
            grads,
            params,
            rates,
        )

    return jax.lax.fori_loop(0, num_inner_steps, step, params)


def _check_lam(lam: float | jax.Array, name: str = "lam", *, least_zero: bool = False) -> None:
    """Refuses a known ``lam <= 0`` (or NaN): ``lam = 0`` makes the implicit
    gradient NaN, a negative one finite garbage. ``least_zero``: refuses a known
    value ``< 0`` (a damping). A traced value is not checked."""
    try:
        values = np.asarray(lam, np.float64)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return
    if not np.all(values >= 0 if least_zero else values > 0):
        raise ValueError(f"{name} must be {'>= 0' if least_zero else '> 0'}, got {lam}")


def imaml_loss_and_grad(
    loss_fn: LossFn,
    params: PyTree,
    support: Batch,
    query: Batch,
    *,
    inner_lr: float | jax.Array | PyTree,
    num_inner_steps: int,
    lam: float | jax.Array,
    num_cg_steps: int,
    cg_damping: float | jax.Array = 0.0,
    lam_damping: float | jax.Array = 0.0,
    return_cg_residual: bool = False,
) -> tuple[jax.Array, PyTree] | tuple[jax.Array, PyTree, jax.Array]:
    """The query loss at ``phi*`` and the implicit meta-gradient, for one task.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: the meta-parameters ``theta``, a pytree of float arrays.
      support: the task's support batch (defines ``phi*`` and ``H``).
      query: the task's query batch.
      inner_lr, num_inner_steps, lam: as in ``adapt_proximal``.
      num_cg_steps: static number of conjugate gradient iterations for
        ``(I + H / lam) g = grad_phi loss_fn(phi*, query)``, started at zero.
      cg_damping, lam_damping: solve ``((1 + cg_damping) I + H / (lam +
        lam_damping)) g = grad`` instead (both ``>= 0``; the module docstring
        says what that gradient is). 0 and 0, the defaults: undamped.
      return_cg_residual: also return how well CG solved that system.

    Returns:
      ``(query_loss, meta_grad)``: the scalar ``loss_fn(phi*, query)`` and
      ``g``, a pytree shaped like ``params``. Exact for the meta-objective
      ``loss_fn(phi*(theta), query)`` when the inner loop has converged and
      CG has solved the system. With ``return_cg_residual``, a third scalar:
      CG's relative residual ``||b - A g|| / ||b||``, ``A`` the system's matrix
      (0 where ``b = 0``), computed from the Hessian-vector product the
      meta-gradient takes anyway. Near 0 the solve is exact; near or above 1 (few
      CG steps, or ``A`` not positive definite, which CG assumes) ``g`` is far
      from the implicit gradient, and nothing else says so.
    """
    if num_cg_steps < 1:
        raise ValueError(f"num_cg_steps must be >= 1, got {num_cg_steps}")
    _check_lam(cg_damping, "cg_damping", least_zero=True)
    _check_lam(lam_damping, "lam_damping", least_zero=True)
    # The meta-gradient comes from the implicit function theorem, not from
    # backpropagating through the inner loop.
    params = jax.lax.stop_gradient(params)
    phi = adapt_proximal(
        loss_fn,
        params,
        support,
        inner_lr=inner_lr,
        num_inner_steps=num_inner_steps,
        lam=lam,
    )
    query_loss, query_grad = jax.value_and_grad(loss_fn)(phi, query)

    def support_loss(p):
        return loss_fn(p, support)

    # (s I + H_aa / m) g_a = grad_a (undamped: s = 1, m = lam); the frozen block is
    # s I with zero right-hand side, so CG leaves it at zero. A rate of 0, scalar or
    # per leaf, freezes; with every rate a non-zero constant the masks and ``hg`` fold away.
    rates = core.per_leaf_rates(inner_lr, params)

    def adapted(tree):
        return jax.tree.map(lambda x, r: jnp.where(r != 0, x, 0), tree, rates)

    s, m = 1 + cg_damping, lam + lam_damping

    def masked_matvec(v):
        hv = adapted(second_order.hvp(support_loss, phi, adapted(v)))
        return jax.tree.map(lambda vi, hvi: (s * vi + hvi / m).astype(vi.dtype), v, hv)

    g = second_order.conjugate_gradient(masked_matvec, adapted(query_grad), num_iters=num_cg_steps)
    hg = second_order.hvp(support_loss, phi, g)
    # A frozen leaf's at lam' = s m, scaled by 1 / s as the adapted ones are.
    meta_grad = jax.tree.map(
        lambda gi, qi, hgi, r: jnp.where(r != 0, gi, (qi - hgi / m) / s).astype(gi.dtype),
        g,
        query_grad,
        hg,
        rates,
    )
    if not return_cg_residual:
        return query_loss, meta_grad
    # A g = s g + H_aa g / m on the adapted leaves (g is zero on the frozen ones, b too).
    b = adapted(query_grad)
    residual = adapted(jax.tree.map(lambda bi, gi, hgi: bi - s * gi - hgi / m, b, g, hg))
    b_norm = jnp.sqrt(second_order.tree_vdot(b, b))
    r_norm = jnp.sqrt(second_order.tree_vdot(residual, residual))
    relative = jnp.where(b_norm > 0, r_norm / jnp.where(b_norm > 0, b_norm, 1), 0)
    return query_loss, meta_grad, relative


def batched_imaml_loss_and_grad(
    loss_fn: LossFn,
    params: PyTree,
    support: Batch,
    query: Batch,
    *,
    inner_lr: float | jax.Array | PyTree,
    num_inner_steps: int,
    lam: float | jax.Array,
    num_cg_steps: int,
    cg_damping: float | jax.Array = 0.0,
    lam_damping: float | jax.Array = 0.0,
    return_cg_residual: bool = False,
) -> tuple[jax.Array, PyTree] | tuple[jax.Array, PyTree, jax.Array]:
    """Mean of ``imaml_loss_and_grad`` over a meta-batch of tasks.

    ``support`` and ``query`` carry a leading task axis on every leaf
    (``(num_tasks, ...)``); ``params`` is shared.

    Returns:
      ``(mean_query_loss, mean_meta_grad)``: a scalar and a pytree shaped
      like ``params``, ready for an optax update; with ``return_cg_residual``,
      a third: the mean over tasks of CG's relative residual.
    """

    def one_task(s, q):
        return imaml_loss_and_grad(
            loss_fn,
            params,
            s,
            q,
            inner_lr=inner_lr,
            num_inner_steps=num_inner_steps,
            lam=lam,
            num_cg_steps=num_cg_steps,
            cg_damping=cg_damping,
            lam_damping=lam_damping,
            return_cg_residual=return_cg_residual,
        )

    losses, grads, *residuals = jax.vmap(one_task)(support, query)
    mean_grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
    return jnp.mean(losses), mean_grads, *(jnp.mean(r) for r in residuals)
