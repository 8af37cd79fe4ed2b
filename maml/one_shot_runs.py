"""Lake et al.'s (2015) 20 within-alphabet 20-way one-shot runs, as a MAML evaluation.

Each run is one fixed 20-way 1-shot task drawn from the evaluation alphabets:
20 training images (one per class, labels 0..19) and 20 test images of the
same 20 characters. ``evaluate_runs`` adapts a 20-way model on each run's
training images (the support set) and classifies its test images (the query
set, one batch, so transductive BatchNorm sees the 20 test images together,
as in meta-training), after 0..``num_inner_steps`` inner SGD steps; the error
rate is over the 400 test items of all runs. ``PUBLISHED_ERROR`` holds the
numbers Lake et al. report for the same 20 runs.

The runs themselves are read by ``maml.tasks.omniglot.load_one_shot_runs``;
this module is pure evaluation logic.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from maml import core
from maml.models import ApplyFn
from maml.tasks import omniglot
from maml.train import Experiment

PyTree = Any

NUM_WAYS = omniglot.ONE_SHOT_RUN_WAYS
# Error rates on the 20 runs (Lake, Salakhutdinov & Tenenbaum 2015, Science 350:1332).
PUBLISHED_ERROR = {"people": 0.045, "Bayesian Program Learning": 0.033}
PUBLISHED_SOURCE = "Lake, Salakhutdinov & Tenenbaum (2015), Science 350(6266):1332-1338"


def item_errors(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-item 0/1 errors: ``(..., N)`` logits and ``(...)`` integer labels to ``(...)`` float32.

    An item counts as wrong unless its label has the strictly largest logit
    (``omniglot.correct``: ties and NaN are wrong).
    """
    return 1.0 - omniglot.correct(logits, labels).astype(jnp.float32)


def stack_runs(runs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The runs of ``load_one_shot_runs`` stacked along a leading run axis.

    Returns:
      ``{"support": (R, 20, H, W, 1), "support_labels": (R, 20), "query": (R, 20, H, W, 1),
      "query_labels": (R, 20)}``.
    """
    if not runs:
        raise ValueError("no one-shot runs to evaluate")
    keys = ("support", "support_labels", "query", "query_labels")
    return {k: np.stack([np.asarray(run[k]) for run in runs]) for k in keys}


def run_errors(
    loss_fn: core.LossFn,
    apply_fn: ApplyFn,
    params: PyTree,
    support: tuple[jax.Array, jax.Array],
    query: tuple[jax.Array, jax.Array],
    *,
    inner_lr: float | PyTree,
    num_inner_steps: int,
    proximal_lambda: float = 0.0,
) -> jax.Array:
    """Per-item errors of a batch of runs after 0..``num_inner_steps`` inner steps.

    Args:
      loss_fn: ``loss_fn(params, (x, y)) -> scalar``, the loss adapted with.
      apply_fn: ``apply_fn(params, x) -> (B, N)`` logits.
      params: the meta-learned parameters.
      support: ``(x, y)``, ``(R, S, H, W, C)`` images and ``(R, S)`` labels.
      query: ``(x, y)``, ``(R, Q, H, W, C)`` images and ``(R, Q)`` labels; each
        run's ``Q`` images are one batch through ``apply_fn``.
      inner_lr: a scalar or a per-leaf pytree, as for ``core.adapt``.
      num_inner_steps: the largest number of inner steps evaluated.
      proximal_lambda: as for ``core.adaptation_trajectory`` (0: plain SGD).

    Returns:
      ``(num_inner_steps + 1, R, Q)`` float32, 1 where an item is misclassified.
    """

    def one_run(support, query):
        def errors(p):
            return item_errors(apply_fn(p, query[0]), query[1])

        return core.adaptation_trajectory(
            loss_fn,
            errors,
            params,
            support,
            inner_lr=inner_lr,
            num_inner_steps=num_inner_steps,
            proximal_lambda=proximal_lambda,
        )

    return jax.vmap(one_run, out_axes=1)(support, query)


def evaluate_runs(
    exp: Experiment,
    params: PyTree,
    runs: list[dict[str, np.ndarray]],
    *,
    inner_lr: float | PyTree,
    num_inner_steps: int,
    proximal_lambda: float = 0.0,
) -> dict:
    """Evaluates ``params`` of a 20-way experiment on Lake et al.'s one-shot runs.

    Args:
      exp: a ``maml.train.Experiment`` (its ``loss_fn`` and ``apply_fn`` are used);
        the model must have 20 outputs.
      params: the parameters to adapt, e.g. from ``maml.train.restore_params``.
      runs: ``maml.tasks.omniglot.load_one_shot_runs(path)``.
      inner_lr: inner learning rate, a scalar or a per-leaf pytree.
      num_inner_steps: errors are reported after each of 0..``num_inner_steps`` steps.
      proximal_lambda: as for ``core.adaptation_trajectory`` (0: plain SGD).

    Returns:
      ``{"inner_steps": [0..n], "error": [overall error rate per step],
      "ci95": [95% half-width over the runs per step, ``ci95_over_runs``],
      "num_runs": R, "num_items": R * 20,
      "runs": {name: [error rate per step]},
      "published": PUBLISHED_ERROR, "published_source": ...}``.
    """
    stacked = stack_runs(runs)
    num_outputs = jax.eval_shape(exp.apply_fn, params, stacked["query"][0]).shape[-1]
    if num_outputs != NUM_WAYS:
        raise ValueError(
            f"the one-shot runs are {NUM_WAYS}-way, but the model has {num_outputs} outputs"
        )

    @jax.jit
    def errors(params, support, query):
        return run_errors(
            exp.loss_fn,
            exp.apply_fn,
            params,
            support,
            query,
            inner_lr=inner_lr,
            num_inner_steps=num_inner_steps,
            proximal_lambda=proximal_lambda,
        )

    per_item = np.asarray(
        errors(
            params,
            (stacked["support"], stacked["support_labels"]),
            (stacked["query"], stacked["query_labels"]),
        )
    )  # (steps, runs, items)
    per_run = per_item.mean(-1)
    return {
        "inner_steps": list(range(num_inner_steps + 1)),
        "error": per_item.mean(axis=(1, 2)).tolist(),
        "ci95": ci95_over_runs(per_run).tolist(),
        "num_runs": per_item.shape[1],
        "num_items": per_item.shape[1] * per_item.shape[2],
        "runs": {str(run["name"]): per_run[:, i].tolist() for i, run in enumerate(runs)},
        "published": dict(PUBLISHED_ERROR),
        "published_source": PUBLISHED_SOURCE,
    }


def ci95_over_runs(per_run: np.ndarray) -> np.ndarray:
    """95% half-width of the mean of ``(..., R)`` per-run error rates over the last axis:
    Student's t with R - 1 degrees of freedom times std (ddof=1) / sqrt(R); NaN for one run.

    Each run is one task, so the runs, not the items, are the independent units
    (the 20 items of a run share its characters and its adaptation). With only
    R = 20 runs, the 1.96 std / sqrt(n), ddof=0, that ``eval.json`` uses over
    600 tasks (as Finn's code did) would be about 9% too narrow: it covers
    about 93% where 95% is claimed.
    """
    per_run = np.asarray(per_run, np.float64)
    n = per_run.shape[-1]
    if n < 2:
        return np.full(per_run.shape[:-1], np.nan)
    return scipy.stats.t.ppf(0.975, n - 1) * per_run.std(-1, ddof=1) / np.sqrt(n)


def format_table(result: dict, *, report_step: int | None = None) -> str:
    """The result of ``evaluate_runs`` as text: error per inner step, per run, and published
    (and, where ``result`` records a ``proximal_lambda`` > 0, that the steps were iMAML's)."""
    lines = [
        f"Lake et al.'s one-shot runs: {result['num_runs']} runs x 20-way 1-shot, "
        f"{result['num_items']} test items",
        "steps | error (95% CI over runs)",
    ]
    for n, error, ci in zip(result["inner_steps"], result["error"], result["ci95"], strict=True):
        mark = "  <- report step" if n == report_step else ""
        lines.append(f"{n:5d} | {100 * error:5.1f}% +- {100 * ci:4.1f}{mark}")
    step = result["inner_steps"][-1] if report_step is None else report_step
    cells = [f"{name} {100 * errors[step]:4.0f}%" for name, errors in result["runs"].items()]
    lines.append(f"per run after {step} step{'s' * (step != 1)}:")
    lines.extend("  " + "  ".join(cells[i : i + 5]) for i in range(0, len(cells), 5))
    published = ", ".join(f"{k} {100 * v:.1f}%" for k, v in result["published"].items())
    lines.append(f"published ({result['published_source']}): {published}")
    if result.get("proximal_lambda"):  # the script's result records it; evaluate_runs' lacks it
        lines.append(
            f"adapted by iMAML's proximal steps (lambda {result['proximal_lambda']:g}), "
            "not plain SGD"
        )
    return "\n".join(lines)
