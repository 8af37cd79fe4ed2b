"""The JAX "Advanced automatic differentiation" tutorial, reproduced with this project's code.

Each example prints our value beside the one the tutorial shows
(https://docs.jax.dev/en/latest/advanced-autodiff.html). Hessian-vector
products go through ``maml.second_order.hvp`` and the MAML meta-gradient
through ``maml.meta_loss``, checked against central finite differences in
float64. With ``--json`` the script prints a single JSON object instead.

    python scripts/autodiff_examples.py [--json]
"""

import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from jax.flatten_util import ravel_pytree

from maml import MLP, functional, meta_loss
from maml.second_order import hvp, hvp_reverse_over_forward, hvp_reverse_over_reverse

_JSON = flags.DEFINE_bool("json", False, "Print one JSON object with every result, nothing else.")

# What the tutorial (and its companion "Automatic differentiation" page) shows.
TUTORIAL = {
    "derivatives": [4.0, 10.0, 6.0, 0.0],
    "hessian": [[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]],
    "td_naive": [-1.2, 1.2, -1.2],
    "td_stop_gradient": [1.2, 2.4, -1.2],
    "td_update": [1.2, 2.4, -1.2],
    "straight_through": {
        "f": 3.0,
        "straight_through_f": 3.0,
        "grad_f": 0.0,
        "grad_straight_through_f": 1.0,
    },
    "per_example_grads": [[1.2, 2.4, -1.2], [1.2, 2.4, -1.2]],
    "per_example_speedup": {"unjitted_s": 10.6e-3, "jitted_s": 53.9e-6},
}


def derivatives(x: float = 1.0) -> list[float]:
    """First to fourth derivatives of ``x^3 + 2x^2 - 3x + 1`` by stacked ``jax.grad``."""

    def f(x):
        return x**3 + 2 * x**2 - 3 * x + 1

    results, g = [], f
    for _ in range(4):
        g = jax.grad(g)
        results.append(float(g(x)))
    return results


def dot_self(x: jax.Array) -> jax.Array:
    """``x . x``, a scalar: the tutorial's ``f`` for ``hessian_example``."""
    return jnp.dot(x, x)


def hessian_example() -> list[list[float]]:
    """``jacfwd(grad(f))`` of ``f(x) = x . x`` at ``[1, 2, 3]``."""
    return np.asarray(jax.jacfwd(jax.grad(dot_self))(jnp.array([1.0, 2.0, 3.0]))).tolist()


def jacobians_example() -> dict[str, Any]:
    """The tutorial's Jacobians and Hessian of a logistic ``predict``, checked in closed form.

    ``predict(W, b, inputs) = sigmoid(inputs @ W + b)`` on its four-point toy
    dataset, with ``W, b`` drawn as the tutorial draws them; ``jacfwd`` and
    ``jacrev`` of ``W -> predict`` (``(4, 3)``), ``jacrev`` of the dict
    ``{"W", "b"}`` version, and the ``(4, 3, 3)`` Hessian ``jacfwd(jacrev(f))``.
    With ``s`` the predictions: ``dp/dW = s (1 - s) x``, ``dp/db = s (1 - s)``,
    ``d2p/dW2 = s (1 - s) (1 - 2 s) x x^T``.
    """

    def sigmoid(x):
        return 0.5 * (jnp.tanh(x / 2) + 1)

    def predict(W, b, inputs):
        return sigmoid(jnp.dot(inputs, W) + b)

    inputs = jnp.array(
        [[0.52, 1.12, 0.77], [0.88, -1.08, 0.15], [0.52, 0.06, -1.30], [0.74, -2.49, 1.39]]
    )
    _, W_key, b_key = jax.random.split(jax.random.key(0), 3)
    W = jax.random.normal(W_key, (3,))
    b = jax.random.normal(b_key, ())

    def f(W):
        return predict(W, b, inputs)

    J_fwd, J_rev = jax.jacfwd(f)(W), jax.jacrev(f)(W)
    J_dict = jax.jacrev(lambda params: predict(params["W"], params["b"], inputs))({"W": W, "b": b})
    H = jax.jacfwd(jax.jacrev(f))(W)
    s = np.asarray(f(W), np.float64)
    x = np.asarray(inputs, np.float64)
    slope = s * (1 - s)
    errors = {
        "jacfwd": np.abs(np.asarray(J_fwd) - slope[:, None] * x).max(),
        "jacrev": np.abs(np.asarray(J_rev) - slope[:, None] * x).max(),
        "dict_W": np.abs(np.asarray(J_dict["W"]) - slope[:, None] * x).max(),
        "dict_b": np.abs(np.asarray(J_dict["b"]) - slope).max(),
        "hessian": np.abs(
            np.asarray(H) - (slope * (1 - 2 * s))[:, None, None] * x[:, :, None] * x[:, None, :]
        ).max(),
    }
    return {
        "shapes": {
            "jacfwd": list(J_fwd.shape),
            "jacrev": list(J_rev.shape),
            "dict": {k: list(v.shape) for k, v in J_dict.items()},
            "hessian": list(H.shape),
        },
        "jacobian": np.asarray(J_rev).tolist(),
        "max_abs_error": {k: float(v) for k, v in errors.items()},
        "matches": bool(max(errors.values()) <= 1e-6),
    }


def sum_tanh_squared(X: jax.Array) -> jax.Array:
    """``sum(tanh(X)^2)``, a scalar: the tutorial's ``f`` for Hessian-vector products."""
    return jnp.sum(jnp.tanh(X) ** 2)


def hvp_inputs() -> tuple[jax.Array, jax.Array]:
    """The tutorial's ``X`` and ``V``, ``(30, 40)`` each: its ``key`` after the splits
    of the Jacobian, JVP and VJP cells, split once more into two."""
    key = jax.random.key(0)
    key, _, _ = jax.random.split(key, 3)  # W_key, b_key
    key, _ = jax.random.split(key)  # the JVP cell's v
    key, _ = jax.random.split(key)  # the VJP cell's u
    _, X_key, V_key = jax.random.split(key, 3)
    return jax.random.normal(X_key, (30, 40)), jax.random.normal(V_key, (30, 40))


def hvp_example() -> dict[str, Any]:
    """The tutorial's check of Hessian-vector products: ``f(X) = sum(tanh(X)^2)`` at its
    random ``(30, 40)`` ``X`` and ``V``, ``hvp`` (and the two other orders of
    ``maml.second_order``) against ``tensordot(jacfwd(jacrev(f))(X), V, 2)``, and
    against the closed form: the Hessian is diagonal, ``2 s (s - 2 t^2)`` with
    ``t = tanh X``, ``s = 1 - t^2``."""
    X, V = hvp_inputs()
    dense = jnp.tensordot(jax.jacfwd(jax.jacrev(sum_tanh_squared))(X), V, 2)
    products = [
        h(sum_tanh_squared, X, V) for h in (hvp, hvp_reverse_over_reverse, hvp_reverse_over_forward)
    ]
    t = np.tanh(np.asarray(X, np.float64))
    s = 1 - t**2
    closed_form = 2 * s * (s - 2 * t**2) * np.asarray(V, np.float64)
    error = max(float(jnp.max(jnp.abs(p - dense))) for p in products)
    closed_form_error = max(float(np.abs(np.asarray(p) - closed_form).max()) for p in products)
    return {
        "shape": list(X.shape),
        "allclose": all(bool(jnp.allclose(p, dense, 1e-4, 1e-4)) for p in products),
        "max_abs_error": error,
        "max_abs_error_vs_closed_form": closed_form_error,
        "matches": max(error, closed_form_error) <= 1e-5,
    }


def meta_gradient_example(*, inner_lr: float = 0.01, seed: int = 0) -> dict[str, Any]:
    """The tutorial's ``jax.grad(meta_loss_fn)`` on a small MLP, via ``maml.meta_loss``.

    The tutorial's ``meta_loss_fn(params, data)`` is one SGD step on ``data``
    followed by the loss on the same ``data``: ``meta_loss`` with one inner
    step and ``support = query = data``. Checked in float64 against the
    tutorial's formula written out and against central finite differences.
    """
    with jax.enable_x64(True):
        apply_fn, params = functional(MLP((1, 8, 1), rngs=nnx.Rngs(seed), param_dtype=jnp.float64))
        x = jax.random.uniform(jax.random.key(seed), (10, 1), jnp.float64, -5.0, 5.0)
        data = (x, 2.0 * jnp.sin(x - 0.5))

        def loss_fn(p, batch):
            inputs, targets = batch
            return jnp.mean((apply_fn(p, inputs) - targets) ** 2)

        def meta_loss_fn(p, data):
            return meta_loss(loss_fn, p, data, data, inner_lr=inner_lr, num_inner_steps=1)

        def tutorial_meta_loss_fn(p, data):
            grads = jax.grad(loss_fn)(p, data)
            return loss_fn(jax.tree.map(lambda w, g: w - inner_lr * g, p, grads), data)

        meta_grads = jax.jit(jax.grad(meta_loss_fn))(params, data)
        tutorial_grads = jax.jit(jax.grad(tutorial_meta_loss_fn))(params, data)
        flat, unravel = ravel_pytree(params)
        flat_grads = ravel_pytree(meta_grads)[0]

        step = 1e-6
        flat_loss = jax.vmap(lambda z: meta_loss_fn(unravel(z), data))
        basis = step * jnp.eye(flat.size, dtype=flat.dtype)
        fd = (flat_loss(flat + basis) - flat_loss(flat - basis)) / (2 * step)
        relative_error = float(jnp.linalg.norm(flat_grads - fd) / jnp.linalg.norm(fd))
        tutorial_error = float(jnp.max(jnp.abs(flat_grads - ravel_pytree(tutorial_grads)[0])))
        return {
            "num_params": int(flat.size),
            "meta_loss": float(meta_loss_fn(params, data)),
            "meta_grad_norm": float(jnp.linalg.norm(flat_grads)),
            "meta_grad_first": np.asarray(flat_grads[:5]).tolist(),
            "finite_difference_first": np.asarray(fd[:5]).tolist(),
            "relative_error": relative_error,
            "max_abs_diff_vs_tutorial_formula": tutorial_error,
        }


# TD(0) with a linear value function, as in the tutorial, whose pseudo-loss is
# -1/2 (target - v(s_tm1))^2: with the target's gradient stopped, its gradient
# is the TD(0) update itself. (The older "JAX 101" edition dropped the -1/2, which
# scales every gradient below by -2.)
def value_fn(theta: jax.Array, state: jax.Array) -> jax.Array:
    """The linear value ``theta . state`` of a ``(3,)`` state, a scalar."""
    return jnp.dot(theta, state)


THETA = (0.1, -0.1, 0.0)
S_TM1, R_T, S_T = (1.0, 2.0, -1.0), 1.0, (2.0, 1.0, 0.0)


def td_loss_naive(theta: jax.Array, s_tm1: jax.Array, r_t: jax.Array, s_t: jax.Array) -> jax.Array:
    """The TD(0) pseudo-loss with the target differentiated too: the naive version."""
    v_tm1 = value_fn(theta, s_tm1)
    target = r_t + value_fn(theta, s_t)
    return -0.5 * ((target - v_tm1) ** 2)


def td_loss(theta: jax.Array, s_tm1: jax.Array, r_t: jax.Array, s_t: jax.Array) -> jax.Array:
    """The TD(0) pseudo-loss with the target's gradient stopped: its gradient is the update."""
    v_tm1 = value_fn(theta, s_tm1)
    target = r_t + value_fn(theta, s_t)
    return -0.5 * ((jax.lax.stop_gradient(target) - v_tm1) ** 2)


def td_transition() -> tuple[jax.Array, ...]:
    """The tutorial's ``(theta, s_tm1, r_t, s_t)``: ``(3,)``, ``(3,)``, scalar, ``(3,)``."""
    return tuple(jnp.array(a) for a in (THETA, S_TM1, R_T, S_T))


def td_examples() -> dict[str, list[float]]:
    """``grad(td_loss)`` without and with ``stop_gradient`` on the target, and the
    TD(0) update ``(r_t + v(s_t) - v(s_tm1)) grad v(s_tm1)`` written out, as the
    tutorial cross-checks the second."""
    theta, s_tm1, r_t, s_t = args = td_transition()
    td_error = r_t + value_fn(theta, s_t) - value_fn(theta, s_tm1)
    return {
        "td_naive": np.asarray(jax.grad(td_loss_naive)(*args)).tolist(),
        "td_stop_gradient": np.asarray(jax.grad(td_loss)(*args)).tolist(),
        "td_update": np.asarray(td_error * jax.grad(value_fn)(theta, s_tm1)).tolist(),
    }


def straight_through_example(x: float = 3.2) -> dict[str, float]:
    """``jnp.round`` and its straight-through version: values and gradients at ``x``."""

    def f(x):
        return jnp.round(x)

    def straight_through_f(x):
        # x - stop_gradient(x) is exactly zero (Sterbenz) with gradient exactly one.
        zero = x - jax.lax.stop_gradient(x)
        return zero + jax.lax.stop_gradient(f(x))

    return {
        "f": float(f(x)),
        "straight_through_f": float(straight_through_f(x)),
        "grad_f": float(jax.grad(f)(x)),
        "grad_straight_through_f": float(jax.grad(straight_through_f)(x)),
    }


def _batched_transitions() -> tuple[jax.Array, ...]:
    theta, s_tm1, r_t, s_t = td_transition()
    return (theta, *(jnp.stack([a, a]) for a in (s_tm1, r_t, s_t)))


def per_example_grads() -> list[list[float]]:
    """``jit(vmap(grad(td_loss), in_axes=(None, 0, 0, 0)))`` on two identical transitions."""
    perex_grads = jax.jit(jax.vmap(jax.grad(td_loss), in_axes=(None, 0, 0, 0)))
    return np.asarray(perex_grads(*_batched_transitions())).tolist()


def _median_seconds(fn: Callable[[], Any], *, number: int, repeats: int) -> float:
    jax.block_until_ready(fn())  # Warm-up: compile, and fill JAX's caches.
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            jax.block_until_ready(fn())
        times.append((time.perf_counter() - start) / number)
    return statistics.median(times)


def per_example_speedup(*, repeats: int = 5) -> dict[str, float]:
    """Time per call of the un-jitted and the jitted per-example gradients, and their ratio."""
    args = _batched_transitions()
    inefficient_perex_grads = jax.vmap(jax.grad(td_loss), in_axes=(None, 0, 0, 0))
    perex_grads = jax.jit(inefficient_perex_grads)
    unjitted = _median_seconds(lambda: inefficient_perex_grads(*args), number=10, repeats=repeats)
    jitted = _median_seconds(lambda: perex_grads(*args), number=200, repeats=repeats)
    return {"unjitted_s": unjitted, "jitted_s": jitted, "speedup": unjitted / jitted}


def run_all() -> dict[str, Any]:
    """Every example, keyed as in the ``--json`` output."""
    return {
        "derivatives": derivatives(),
        "hessian": hessian_example(),
        "jacobians": jacobians_example(),
        "hvp_matches_hessian": hvp_example(),
        "meta_gradient": meta_gradient_example(),
        **td_examples(),
        "straight_through": straight_through_example(),
        "per_example_grads": per_example_grads(),
        "per_example_speedup": per_example_speedup(),
    }


def _print_report(results: dict[str, Any]) -> None:
    def show(name, ours, tutorial):
        print(f"{name}\n  ours:     {ours}\n  tutorial: {tutorial}")

    keys = ("derivatives", "hessian", "td_naive", "td_stop_gradient", "td_update")
    for key in (*keys, "per_example_grads"):
        ours = np.round(np.asarray(results[key]), 6).tolist()
        show(key, ours, TUTORIAL[key])
    show("straight_through", results["straight_through"], TUTORIAL["straight_through"])
    j = results["jacobians"]
    show(
        "jacobians (jacfwd, jacrev, a dict of parameters, Hessian = jacfwd(jacrev))",
        f"shapes {j['shapes']}; max error vs closed form {max(j['max_abs_error'].values()):.1e}",
        "shapes (4, 3), {'W': (4, 3), 'b': (4,)}, (4, 3, 3); values for its random W, b",
    )
    h = results["hvp_matches_hessian"]
    show(
        "hvp_matches_hessian (H V of sum(tanh(X)^2), X and V (30, 40); hvp never forms H)",
        f"allclose(hvp, H @ V, 1e-4, 1e-4): {h['allclose']} (max |hvp - H @ V| = "
        f"{h['max_abs_error']:.1e}, max error vs closed form "
        f"{h['max_abs_error_vs_closed_form']:.1e})",
        "allclose(hvp, H @ V, 1e-4, 1e-4): True",
    )
    m = results["meta_gradient"]
    show(
        "meta_gradient (jax.grad of maml.meta_loss, one inner step, float64)",
        f"|grad| = {m['meta_grad_norm']:.6f}, relative error vs finite differences "
        f"{m['relative_error']:.1e}, max abs difference vs the tutorial's formula "
        f"{m['max_abs_diff_vs_tutorial_formula']:.1e}",
        "no value shown: the cell only sketches meta_loss_fn",
    )
    s = results["per_example_speedup"]
    t = TUTORIAL["per_example_speedup"]
    show(
        "per_example_speedup (un-jitted vmap / jitted vmap)",
        f"{s['unjitted_s'] * 1e3:.3f} ms / {s['jitted_s'] * 1e6:.1f} us = {s['speedup']:.0f}x",
        f"{t['unjitted_s'] * 1e3:.1f} ms / {t['jitted_s'] * 1e6:.1f} us = "
        f"{t['unjitted_s'] / t['jitted_s']:.0f}x",
    )


def main(argv: list[str]) -> None:
    """Prints every example beside the tutorial's value, or one JSON object (``--json``)."""
    del argv
    results = run_all()
    if _JSON.value:
        print(json.dumps(results))
    else:
        _print_report(results)


def _parse_flags(argv):
    """absl's parser, with a bad flag or a stray argument as one line and exit status 2,
    as in the other scripts (whose ``_common`` this one, needing no config, does without)."""
    try:
        argv = flags.FLAGS(argv)
        if len(argv) > 1:
            raise flags.Error(f"unexpected argument {argv[1]!r}: the script takes only flags")
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return argv


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
