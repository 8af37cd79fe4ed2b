"""Figures: training curves, Finn et al.'s Figure 2 (sinusoid adaptation) and
Figure 3 (metric against inner steps)."""

import math
import numbers
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure

from maml import core

if TYPE_CHECKING:  # maml.train imports this module
    from maml.train import Experiment


def save(fig: Figure, path: Path) -> None:
    """Writes ``fig`` to ``path`` through ``train.write_atomic``: a run interrupted while
    drawing leaves no half-written image for the next run to take for a finished one."""
    from maml.train import write_atomic  # maml.train imports this module

    fmt = Path(path).suffix.lstrip(".") or None
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format=fmt))


ALGORITHM_TITLES = {
    "maml": "MAML",
    "fomaml": "first-order MAML",
    "imaml": "iMAML",
    "pretrain": "pretrained",
}


class _PlainLogFormatter(ticker.LogFormatterSciNotation):
    """Labels the ticks matplotlib's log axis labels, between 0.001 and 10000 as plain
    numbers: ``0.3`` and ``40``, not ``3×10^-1`` and ``4×10^1``, which crowd an axis
    spanning under a decade."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        label = super().__call__(x, pos)
        return f"{x:g}" if label and 1e-3 <= x < 1e4 else label


def integer_x(ax: Any) -> None:
    """Ticks ``ax``'s x axis at whole numbers only (steps, counts): AutoLocator's steps;
    from 10,000 in thousands (``20k``), where five digits a tick ran together."""
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
    ax.xaxis.set_major_formatter(
        ticker.FuncFormatter(lambda x, pos: f"{x / 1000:g}k" if abs(x) >= 1e4 else f"{x:g}")
    )


def _log_y(ax: Any) -> None:
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(_PlainLogFormatter())
    ax.yaxis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False))


def training_curves(records: list[dict], path: Path) -> Figure | None:
    """One panel per logged metric against the meta-step (a null value, not finite
    when logged, is a gap, marked with an x at the top edge; a 0 on a log axis, a
    triangle at the bottom edge); metrics logged with the same values (a
    regression's loss and mse) share one, titled ``"loss = mse"``."""
    # A value that is not a number (a log line edited by hand, or another tool's) is
    # not plotted: it stopped a finished run with a traceback.
    # (NumPy's numbers are plotted; bools, true and false in the log, are not.)
    records = [
        {
            k: v
            for k, v in r.items()
            if k == "step" or v is None or (isinstance(v, numbers.Real) and not isinstance(v, bool))
        }
        for r in records
    ]
    # Periodic metrics (validation) appear in some records only.
    keys = list(dict.fromkeys(k for r in records for k in r if k not in ("step", "wall_s")))
    if not keys:
        return None
    series = {k: [(r["step"], r[k]) for r in records if k in r] for k in keys}
    same: dict[str, list[str]] = {}  # the first key of a series -> all keys logging it
    for key in keys:
        # Not series of nulls only (a run that diverged in its first chunk): equal,
        # but nothing shows that the metrics are the same.
        has_values = any(v is not None for _, v in series[key])
        first = next((k for k in same if has_values and series[k] == series[key]), key)
        same.setdefault(first, []).append(key)
    fig = Figure(figsize=(4 * len(same), 3.2))
    axes = fig.subplots(1, len(same), squeeze=False)
    for ax, (key, names) in zip(axes[0], same.items(), strict=True):
        logged = [r for r in records if key in r]
        ax.plot(
            [r["step"] for r in logged],
            [math.nan if r[key] is None else r[key] for r in logged],
            marker="." if len(logged) < 30 else None,
        )
        finite = [r for r in logged if r[key] is not None and math.isfinite(r[key])]
        steps = [r["step"] for r in logged if r[key] is None or not math.isfinite(r[key])]
        if steps:  # as a gap only, the end of a diverged run would not show
            ax.plot(
                steps,
                np.full(len(steps), 0.97),
                "x",
                color="tab:red",
                transform=ax.get_xaxis_transform(),  # y in axes units: the top edge
                label="not finite",
            )
        # val_mse: on the mse's scale; cg_residual: iMAML's, from 1e-9 to above 1.
        log = key in ("loss", "mse", "val_mse", "grad_norm", "cg_residual")
        log = log and any(r[key] > 0 for r in finite)  # a log axis of no positive value warns
        off_axis = [r["step"] for r in finite if r[key] <= 0] if log else []
        if off_axis:  # a log axis drops them: marked at the bottom edge
            ax.plot(
                off_axis,
                np.full(len(off_axis), 0.03),
                "v",
                color="tab:gray",
                transform=ax.get_xaxis_transform(),
                label="0 (off the log axis)",
            )
        if key.startswith("val_") and finite:  # the state in best_checkpoint/ (ties: the later)
            sign = 1 if key == "val_accuracy" else -1
            best = max(finite, key=lambda r: (sign * r[key], r["step"]))
            ax.plot(best["step"], best[key], "*", color="tab:red", ms=10, label="best")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize="small")
        ax.set_xlabel("meta-step")
        integer_x(ax)
        ax.set_title(" = ".join(names))
        if log:
            _log_y(ax)
    fig.tight_layout()
    save(fig, path)
    return fig


def sinusoid_adaptation(
    exp: "Experiment", params: Any, key: jax.Array, path: Path, *, steps: tuple[int, ...] = (1, 10)
) -> Figure:
    """Finn et al.'s Figure 2: ground truth, the K support points, and the
    prediction before adaptation and after 1 and 10 inner steps, on one task.

    The steps are plain SGD at ``exp.inner_lr``, the training rate, as in Finn's
    figure: the evaluation settings (``eval_inner_lr``, ``eval_proximal_lambda``)
    play no part."""
    task = exp.task
    episode = task.sample(key, 1)
    support = jax.tree.map(lambda a: a[0], episode["support"])
    x = jnp.linspace(*task.input_range, 200)[:, None]
    truth = task.ground_truth(episode["amplitude"], episode["phase"], x[None])[0]
    fig = Figure(figsize=(7, 3.8))
    ax = fig.subplots()
    ax.plot(x, truth, color="tab:red", lw=2, label="ground truth")
    ax.plot(x, exp.apply_fn(params, x), ":", color="tab:green", label="pre-update")
    p, done = params, 0
    for n, style in zip(steps, ("--", "-"), strict=False):
        p = core.adapt(exp.loss_fn, p, support, inner_lr=exp.inner_lr, num_inner_steps=n - done)
        done = n
        ax.plot(
            x,
            exp.apply_fn(p, x),
            style,
            color="tab:blue" if n == 1 else "tab:cyan",
            label=f"{n} grad step{'s' if n > 1 else ''}",
        )
    ax.scatter(
        support[0][:, 0],
        support[1][:, 0],
        marker="^",
        color="purple",
        zorder=3,
        label=f"{support[0].shape[0]} points used for grad",
    )
    algorithm = exp.config.get("algorithm", "maml")
    ax.set_title(f"{ALGORITHM_TITLES.get(algorithm, algorithm)}, K={support[0].shape[0]}")
    ax.set(xlabel="x", ylabel="y")
    # Beside the axes: inside, no corner stays clear of every task's curves and points.
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    save(fig, path)
    return fig


def adaptation_curves(evaluation: dict, path: Path) -> Figure:
    """Finn et al.'s Figure 3: the metric (mean, 95% CI) against inner steps, one line per K."""
    fig = Figure(figsize=(5, 3.6))
    ax = fig.subplots()
    metric = evaluation["metric"]
    finite_means = []
    for shots, r in evaluation["results"].items():
        # From eval.json a value that is not finite is null; in memory, inf or NaN.
        mean, ci = (
            np.array([math.nan if v is None else v for v in r[k]], float) for k in ("mean", "ci95")
        )
        steps = np.asarray(r["inner_steps"])
        finite_means.extend(mean[np.isfinite(mean)])
        ci = np.where(np.isfinite(ci), ci, np.nan)  # never a bar of 0 for an unknown CI
        # Bars stop at the metric's range: an MSE is not negative, an accuracy not above 1.
        lower = np.minimum(ci, mean) if metric in ("mse", "accuracy") else ci
        upper = np.minimum(ci, 1.0 - mean) if metric == "accuracy" else ci
        line = ax.errorbar(
            steps,
            mean,
            yerr=np.stack([lower, upper]),
            capsize=2,
            marker="o",
            ms=3,
            label=f"K={shots}",
        )
        diverged = ~np.isfinite(mean)
        if diverged.any():  # otherwise these steps would silently vanish from the plot
            ax.plot(
                steps[diverged],
                np.full(diverged.sum(), 0.97),
                "x",
                color=line[0].get_color(),
                transform=ax.get_xaxis_transform(),  # y in axes units: the top edge
                label=f"K={shots}: mean not finite (diverged tasks)",
            )
    positive = [m for m in finite_means if m > 0]
    if metric == "mse" and positive and max(positive) > 100 * min(positive):
        # Tasks whose inner SGD blows up (means of 1e18 beside 0.1) flatten a linear axis.
        _log_y(ax)
        metric += " (log scale)"
    ax.set_xlabel("inner gradient steps")
    integer_x(ax)
    ax.set_ylabel(metric)
    ax.set_title(f"{evaluation['num_tasks']} test tasks, 95% CI")
    ax.legend()
    fig.tight_layout()
    save(fig, path)
    return fig
