"""Few-shot evaluation of a trained checkpoint: the metric on fresh test tasks
after 0..``eval_inner_steps`` inner steps (plain SGD, or iMAML's proximal steps
where ``eval_proximal_lambda`` > 0), mean and 95% CI, per shot K.

``evaluate(config, workdir)`` is what ``scripts/evaluate.py`` calls; it writes
``workdir/eval.json`` and ``workdir/plots/eval.png`` (Finn et al.'s Figure 3),
or ``eval_best.json`` and ``plots/eval_best.png`` for the best-validation checkpoint.
"""

import dataclasses
from pathlib import Path

import jax
import ml_collections

from maml import plots
from maml.train import (
    make_adaptation_curve,
    restore_params,
    root_keys,
    summarize,
    warn_of_config_changes,
    write_json,
)


def evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    checkpoint: str = "latest",
    *,
    write: bool = True,
) -> dict:
    """Evaluates the ``latest`` or ``best`` (validation) checkpoint in ``workdir`` on
    test tasks drawn with ``config.eval_seed`` (unset: ``config.seed``); returns what
    ``eval.json`` (``eval_best.json``) holds, and writes it unless ``write=False``
    (then ``write_evaluation(evaluation, workdir)`` does)."""
    workdir = Path(workdir)
    exp, params, step = restore_params(config, workdir, checkpoint)
    changes = warn_of_config_changes(workdir, config)
    seed = config.get("eval_seed")
    seed = config.seed if seed is None else seed
    _, eval_key = root_keys(seed)
    # Validation during training draws its tasks from fold_in(eval_key, step): the
    # test tasks take a tag no step reaches (2**31 - 1 is the Figure 2 plot's).
    eval_key = jax.random.fold_in(eval_key, 2**31 - 2)
    steps = list(range(config.eval_inner_steps + 1))
    # Batch b of the tasks is drawn from fold_in(key, b): the batch size is part of
    # which tasks these are (the device count is not).
    batch_size = min(config.num_eval_tasks, config.get("eval_batch_size", 100))
    inner_lr = config.get("eval_inner_lr", config.inner_lr)
    proximal_lambda = config.get("eval_proximal_lambda", 0.0)
    results = {}
    for shots in config.eval_shots:
        task = _with_shots(exp.task, shots, config)
        curve = make_adaptation_curve(
            exp,
            task,
            inner_lr=inner_lr,
            num_inner_steps=config.eval_inner_steps,
            batch_size=batch_size,
            proximal_lambda=proximal_lambda,
        )
        values = curve(
            params,
            jax.random.fold_in(eval_key, shots),
            num_tasks=config.num_eval_tasks,
            progress=f"{config.task} K={shots}",
        )
        results[str(shots)] = {"inner_steps": steps, **summarize(values)}
    evaluation = {
        "metric": exp.task.metric,
        "num_tasks": config.num_eval_tasks,
        "test_seed": seed,
        "test_batch_size": batch_size,
        "inner_lr": inner_lr,
        "proximal_lambda": proximal_lambda,
        "checkpoint": checkpoint,
        "checkpoint_step": step,
        "config_changes": changes,
        "results": results,
    }
    if write:
        write_evaluation(evaluation, workdir)
    return evaluation


def write_evaluation(evaluation: dict, workdir: str | Path) -> None:
    """Writes ``evaluation`` to ``workdir/eval.json`` and ``workdir/plots/eval.png``
    (``eval_best.*`` for the best-validation checkpoint)."""
    workdir = Path(workdir)
    checkpoint = evaluation["checkpoint"]
    name = "eval" if checkpoint == "latest" else f"eval_{checkpoint}"
    write_json(workdir / f"{name}.json", evaluation)
    (workdir / "plots").mkdir(exist_ok=True)
    plots.adaptation_curves(evaluation, workdir / "plots" / f"{name}.png")


def _with_shots(task, shots: int, config):
    if hasattr(task, "num_support"):  # regression: K support points, many query points
        return dataclasses.replace(
            task, num_support=shots, num_query=config.get("eval_num_query", task.num_query)
        )
    return dataclasses.replace(task, num_shots=shots)


def _number(x: float) -> str:
    """Four decimals, or four significant digits for what they would show badly
    (the MSE of a diverging model, 2.489e+29, or a tiny one, 1.234e-05)."""
    return f"{x:.4f}" if x == 0 or 1e-3 <= abs(x) < 1e5 else f"{x:.4g}"


def format_table(evaluation: dict) -> str:
    """The evaluation as a text table: one row per inner step, one column per K."""
    results = evaluation["results"]
    shots = list(results)
    header = "steps | " + " | ".join(f"K={k} {evaluation['metric']} (95% CI)" for k in shots)
    lines = [header, "-" * len(header)]
    for i, n in enumerate(next(iter(results.values()))["inner_steps"]):
        cells = [" +- ".join(_number(results[k][f][i]) for f in ("mean", "ci95")) for k in shots]
        lines.append(f"{n:5d} | " + " | ".join(f"{c:>24}" for c in cells))
    for k in shots:
        r = results[k]
        bad = [i for i, count in enumerate(r.get("nonfinite", [])) if count]
        if bad:
            last = len(r["nonfinite"]) - 1
            steps = r["inner_steps"][last]
            lines.append(
                f"K={k}: {r['nonfinite'][last]} of {evaluation['num_tasks']} tasks not finite "
                f"(diverged) after {steps} step{'s' * (steps != 1)}, first after "
                f"{r['inner_steps'][bad[0]]}; median then {r['median'][last]:.4g}"
            )
    if evaluation.get("proximal_lambda"):
        lines.append(
            f"adapted by iMAML's proximal steps (lambda {evaluation['proximal_lambda']:g}), "
            "not plain SGD"
        )
    return "\n".join(lines)
