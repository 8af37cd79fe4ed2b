"""Hessian spectra of a trained model: the support loss before adaptation, and the meta-loss.

    python scripts/analyze_curvature.py --config=maml/configs/sinusoid.py --workdir=runs/sinusoid
    python scripts/analyze_curvature.py --config=maml/configs/omniglot.py:5way1shot \\
        --config.data_dir=../shared/data/tfds --workdir=runs/o5w1s

For the latest checkpoint in ``--workdir`` (``--checkpoint=best``: the one
with the best validation metric) and ``--num_tasks`` tasks from the
test split, it estimates, with Hessian-vector products only (never a dense
Hessian), the top ``--top_k`` eigenvalues (Lanczos) and the eigenvalue
density (stochastic Lanczos quadrature, ``--num_probes`` probes) of

  (a) the pre-adaptation support loss, the mean over tasks of
      ``loss(params, support)``, the function the inner loop descends (of the
      adapted leaves only: with ``adapt_norm=False`` BatchNorm's scale and
      offset are held fixed, and add zero eigenvalues to the density);
  (b) the meta-loss, the mean over tasks of ``meta_loss`` with the config's
      ``num_inner_steps`` and ``inner_lr`` (for an iMAML config, the query
      loss after its proximal inner steps, ``imaml.adapt_proximal``);

and compares ``config.inner_lr`` with the SGD stability limit
``2 / lambda_max`` of the support loss (iMAML's proximal steps:
``2 / (lambda_max + imaml_lambda)``), for the batch and for each task.
Writes ``curvature.json`` and ``curvature.png`` to ``--output_dir`` (default
``--workdir``) and prints a summary. With no checkpoint it stops with one
line and exit status 2.
"""

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from maml import analysis, core, imaml, train

import _common

if TYPE_CHECKING:  # imported where plotted: matplotlib is slow to import
    from matplotlib.figure import Figure

CHECKPOINT = _common.define_checkpoint_flag()
flags.adopt_module_key_flags(_common)  # --help lists --config, --workdir, ...
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where to write (default: --workdir).")
_NUM_TASKS = flags.DEFINE_integer("num_tasks", 4, "Tasks in the sampled batch.")
_TOP_K = flags.DEFINE_integer("top_k", 5, "Number of top eigenvalues.")
_LANCZOS_ITERS = flags.DEFINE_integer("lanczos_iters", 40, "Lanczos steps per run.")
_NUM_PROBES = flags.DEFINE_integer("num_probes", 3, "Probes of the spectral density.")
_SEED = flags.DEFINE_integer(
    "seed",
    0,
    "Seed of the task sample and the Lanczos vectors.",
    lower_bound=0,
    upper_bound=2**32 - 1,
)


def analyze(
    exp: train.Experiment,
    params: Any,
    *,
    num_tasks: int,
    top_k: int,
    num_iters: int,
    num_probes: int,
    seed: int,
) -> dict:
    """Spectra of the support loss and the meta-loss of ``exp`` at ``params``, and timings.

    Returns a JSON-ready dict: ``support_loss`` and ``meta_loss`` each with
    ``eigenvalues`` (``top_k``, descending), ``grid``, ``density`` and
    ``wall_s``; ``stability`` (``analysis.sgd_stability`` of the batch);
    ``per_task`` (the same for each task's own support loss).
    """
    config = exp.config
    task_key, lanczos_key = jax.random.split(jax.random.key(seed))
    episode = exp.task.sample(task_key, num_tasks)
    support, query = episode["support"], episode["query"]
    inner_lr = exp.inner_lr
    # The curvature inner SGD meets: that of the leaves it adapts.
    inner_loss_fn = analysis.adapted_only(exp.loss_fn, params, inner_lr=inner_lr)

    def support_loss(p, support):
        return analysis.support_loss(inner_loss_fn, p, support)

    # iMAML's inner loop is proximal: its meta-loss is the query loss at the point its
    # meta-gradient is taken, and its steps see the curvature plus lam.
    lam = config.imaml_lambda if config.algorithm == "imaml" else 0.0

    def meta_loss(p, support, query):
        if not lam:
            return core.batched_meta_loss(
                exp.loss_fn,
                p,
                support,
                query,
                inner_lr=inner_lr,
                num_inner_steps=config.num_inner_steps,
            )

        def task_loss(s, q):
            phi = imaml.adapt_proximal(
                exp.loss_fn,
                p,
                s,
                inner_lr=inner_lr,
                num_inner_steps=config.num_inner_steps,
                lam=lam,
            )
            return exp.loss_fn(phi, q)

        return jnp.mean(jax.vmap(task_loss)(support, query))

    # Fail fast: the spectra take most of the run.
    for name, value in (
        ("support loss", support_loss(params, support)),
        ("meta-loss", meta_loss(params, support, query)),
    ):
        if not np.isfinite(value):
            raise train.DivergedError(
                f"the {name} is {float(value)} with inner_lr={config.inner_lr} and "
                f"{config.num_inner_steps} inner steps: nothing to analyze (evaluate.py "
                "shows where inner SGD diverges)"
            )

    def spectrum(f, *batches, key):
        fn = jax.jit(
            lambda p, key, *b: analysis.curvature(
                lambda q: f(q, *b),
                p,
                top_k=top_k,
                num_iters=num_iters,
                num_probes=num_probes,
                key=key,
            )
        )
        t0 = time.perf_counter()
        out = jax.device_get(fn(params, key, *batches))
        wall = time.perf_counter() - t0
        return {
            "value": float(f(params, *batches)),
            "eigenvalues": np.asarray(out["eigenvalues"]).tolist(),
            "grid": np.asarray(out["grid"]).tolist(),
            "density": np.asarray(out["density"]).tolist(),
            "wall_s": wall,
        }

    keys = jax.random.split(lanczos_key, 3)
    support_result = spectrum(support_loss, support, key=keys[0])
    meta_result = spectrum(meta_loss, support, query, key=keys[1])
    t0 = time.perf_counter()
    per_task = jax.jit(
        lambda p, s, key: analysis.per_task_lambda_max(
            inner_loss_fn, p, s, num_iters=num_iters, key=key
        )
    )(params, support, keys[2])
    per_task = np.asarray(per_task).tolist()
    per_task_s = time.perf_counter() - t0
    return {
        "num_params": int(sum(np.size(x) for x in jax.tree.leaves(params))),
        # Those the inner loop adapts; the support-loss spectra are of these.
        "num_adapted_params": analysis.num_adapted(params, inner_lr=inner_lr),
        "num_tasks": num_tasks,
        "num_inner_steps": config.num_inner_steps,
        "inner_lr": config.inner_lr,
        "top_k": top_k,
        "lanczos_iters": num_iters,
        "num_probes": num_probes,
        "support_loss": support_result,
        "meta_loss": meta_result,
        "imaml_lambda": lam or None,
        "stability": analysis.sgd_stability(
            config.inner_lr, support_result["eigenvalues"][0], lam=lam
        ),
        "per_task": [analysis.sgd_stability(config.inner_lr, top, lam=lam) for top in per_task],
        "per_task_wall_s": per_task_s,
    }


def plot(report: dict, path: Path) -> "Figure":
    """Both spectra on symmetric-log eigenvalue axes, marked with the top eigenvalues,
    the SGD limit ``2 / inner_lr`` (iMAML's: ``2 / inner_lr - lambda``) and (support
    loss) each task's ``lambda_max``."""
    from matplotlib.figure import Figure

    from maml import plots

    fig = Figure(figsize=(13, 4.5))
    axes = fig.subplots(1, 2)
    lam = report.get("imaml_lambda") or 0.0
    limit, steps = 2.0 / report["inner_lr"] - lam, report["num_inner_steps"]
    limit_label = "2 / inner_lr" + (f" - lambda ({lam:.3g})" if lam else "")
    kind = "proximal inner step" if lam else "inner step"
    for ax, name, title in (
        (axes[0], "support_loss", "pre-adaptation support loss"),
        (axes[1], "meta_loss", f"meta-loss ({steps} {kind}{'s' if steps != 1 else ''})"),
    ):
        r = report[name]
        grid, density = np.asarray(r["grid"]), np.asarray(r["density"])
        # The density has Gaussian tails that underflow; keep the log axis finite.
        ax.plot(grid, np.maximum(density, 1e-12), lw=1.2, label="spectral density (SLQ)")
        for i, eig in enumerate(r["eigenvalues"]):
            ax.axvline(
                eig, color="C1", lw=0.8, ls="--", label="top eigenvalues" if i == 0 else None
            )
        ax.axvline(limit, color="C3", lw=1.5, label=f"{limit_label} = {limit:.3g}")
        if name == "support_loss":
            for i, t in enumerate(report["per_task"]):
                ax.axvline(
                    t["lambda_max"],
                    color="C2",
                    lw=0.8,
                    ls=":",
                    label="per-task lambda_max" if i == 0 else None,
                )
        marked = [limit, *r["eigenvalues"]]
        if name == "support_loss":
            marked += [t["lambda_max"] for t in report["per_task"]]
        right = 1.2 * max(grid[-1], *marked)
        span = max(np.max(np.abs(grid)), right)
        # Linear within about the smoothing width (spectral_density's default sigma is
        # 1% of the Ritz values' range): the density has no finer detail to show.
        linthresh = max(0.01 * (grid[-1] - grid[0]), 1e-6 * span, 1e-12)
        ax.set_xscale("symlog", linthresh=linthresh)
        left = min(grid[0], 0.0)
        ax.set_xlim(left, right)
        # Ticks at 0 and the powers of ten outside the linear part only: the
        # default ones inside it overlap.
        powers = 10.0 ** np.arange(np.ceil(np.log10(linthresh)), np.log10(span) + 1)
        ticks = [-t for t in powers[::-1] if -t >= left] + [0.0] + [t for t in powers if t <= right]
        ax.set_xticks(ticks)
        ax.set_yscale("log")
        ax.set_ylim(1e-8, None)
        ax.set(xlabel="Hessian eigenvalue", ylabel="density", title=title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"{report['config_name']}: {report['num_params']} params, step {report['step']}, "
        f"inner_lr * {'(lambda_max + lambda)' if lam else 'lambda_max'} / 2 = "
        f"{report['stability']['ratio']:.3g}"
    )
    fig.tight_layout()
    plots.save(fig, path)
    return fig


def print_summary(report: dict) -> None:
    """Prints the losses, top eigenvalues and the stability of inner SGD, per batch and task."""
    s = report["stability"]
    # iMAML's proximal steps see the support loss's curvature plus lambda.
    limit = f"2/(lambda_max + {s['lam']:.4g})" if s.get("lam") else "2/lambda_max"
    print(
        f"{report['config_name']}: {report['num_params']} params "
        f"({report['num_adapted_params']} adapted in the inner loop), checkpoint step "
        f"{report['step']}, {report['num_tasks']} tasks, {report['lanczos_iters']} Lanczos steps"
    )
    for name in ("support_loss", "meta_loss"):
        r = report[name]
        eig = ", ".join(f"{x:.4g}" for x in r["eigenvalues"])
        print(f"  {name:<12} loss {r['value']:.4g}  top eigenvalues [{eig}]  ({r['wall_s']:.1f} s)")
    print(
        f"  inner_lr {s['inner_lr']:.4g} vs {limit} {s['limit_lr']:.4g} of the support loss: "
        f"ratio {s['ratio']:.3g} ({'stable' if s['stable'] else 'UNSTABLE'})"
    )
    for i, t in enumerate(report["per_task"]):
        print(
            f"    task {i}: lambda_max {t['lambda_max']:.4g}, {limit} {t['limit_lr']:.4g}, "
            f"ratio {t['ratio']:.3g} ({'stable' if t['stable'] else 'UNSTABLE'})"
        )
    ratios = [t["ratio"] for t in report["per_task"]]
    unstable = sum(not t["stable"] for t in report["per_task"])
    # np.max, as np.median: a diverged estimate's NaN ratio shows in both (Python's max
    # kept or dropped it by where it stood in the list).
    print(
        f"  per task: {unstable} of {len(ratios)} UNSTABLE at these parameters (ratio "
        f"median {np.median(ratios):.3g}, max {np.max(ratios):.3g})"
    )
    print(f"  total wall time {report['wall_s']:.1f} s")


def main(argv: list[str]) -> None:
    """Restores the checkpoint, analyzes it and writes ``curvature.json`` and ``.png``."""
    del argv
    t0 = time.perf_counter()
    config = _common.checked_config(writes_workdir=False)  # --output_dir is checked below
    for name, flag in (
        ("num_tasks", _NUM_TASKS),
        ("top_k", _TOP_K),
        ("lanczos_iters", _LANCZOS_ITERS),
        ("num_probes", _NUM_PROBES),
    ):
        _common.check_count(name, flag.value)
    if _TOP_K.value > _LANCZOS_ITERS.value:
        _common.fail(f"--top_k={_TOP_K.value} must not exceed --lanczos_iters")
    workdir = flags.FLAGS.workdir
    output_dir = Path(_OUTPUT_DIR.value or workdir)
    _common.check_directory(output_dir, "--output_dir")
    with _common.user_errors("lower --num_tasks"):
        # After the restore: a missing checkpoint is one line, with no warning before it.
        exp, params, step = train.restore_params(config, workdir, CHECKPOINT.value)
        changes = train.warn_of_config_changes(Path(workdir), config)
        num_params = sum(x.size for x in jax.tree.leaves(params))
        if _TOP_K.value > num_params:
            _common.fail(f"--top_k={_TOP_K.value} must not exceed the {num_params} parameters")
        report = analyze(
            exp,
            params,
            num_tasks=_NUM_TASKS.value,
            top_k=_TOP_K.value,
            num_iters=_LANCZOS_ITERS.value,
            num_probes=_NUM_PROBES.value,
            seed=_SEED.value,
        )
    # The losses are finite (``analyze`` checks them); their Hessians can still overflow.
    spectra = [
        report[name][key]
        for name in ("support_loss", "meta_loss")
        for key in ("eigenvalues", "density")
    ]
    if not all(np.all(np.isfinite(spectrum)) for spectrum in spectra):
        _common.fail(
            f"the curvature at step {step} is not finite (an overflow): nothing to analyze"
        )
    report = {
        "config_name": config_flags.get_config_filename(flags.FLAGS["config"]),
        "checkpoint": CHECKPOINT.value,
        "step": step,
        "config_changes": changes,
        "backend": jax.default_backend(),
        **report,
        "wall_s": time.perf_counter() - t0,
    }
    _common.write_report(report, output_dir, "curvature", plot=plot, summary=print_summary)


if __name__ == "__main__":
    _common.run(main)
