"""The JAX tutorial's meta-gradient at full size: exact, rematerialised, first-order and iMAML.

    python scripts/meta_gradient.py                                     # sinusoid MLP, float64
    python scripts/meta_gradient.py --config=maml/configs/omniglot.py:5way1shot \\
        --config.data_dir=../shared/data/tfds --inner_steps=1,2,5

For one meta-batch of ``--num_tasks`` tasks from the config's task family
(train split) and each ``--inner_steps`` count, it computes the exact
second-order MAML meta-gradient (with and without ``remat``), first-order
MAML's and iMAML's (``config.imaml_lambda``, ``config.imaml_cg_steps``, and
``config.imaml_cg_damping`` and ``imaml_lam_damping``);
their norms and pairwise cosine similarities; the exact one against central
finite differences of the meta-loss along a random unit direction; and the
time (jitted, compile excluded, median of ``--repeats``) and the compiled
memory (XLA's memory analysis; the device's peak where it reports one) of each.

The sinusoid MLP runs in float64; the conv net in float32 by default
(``--x64`` forces either). The finite differences are always taken in float64
(of the same params and tasks cast up): a float32 difference is either rounded
away (small steps) or not local (a step of 1e-2 read ~100% error on a correct
gradient), so a float32 gradient is checked against the float64 reference, to
1e-3 (1e-6 in float64). Params come from the
latest checkpoint in ``--workdir`` (one without a checkpoint is an error),
``--checkpoint=best`` takes the best-validation one, and without ``--workdir``
they are the config's initialisation.
Writes ``meta_gradient.json`` and ``meta_gradient.png`` to ``--output_dir``
(default ``--workdir``, else ``runs/meta_gradient``) and prints a table.
"""

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from jax.typing import DTypeLike
from ml_collections import config_flags

from maml import analysis, core, train
from maml.configs import ConfigError, sinusoid, validate

import _common

if TYPE_CHECKING:  # imported where plotted: matplotlib is slow to import
    from matplotlib.figure import Figure

_CHECKPOINT = _common.define_checkpoint_flag()  # before the adoption, so --help lists it
flags.adopt_module_key_flags(_common)  # --help lists --config, --workdir, ...

_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Where to write outputs (default: --workdir, else runs/meta_gradient)."
)
_INNER_STEPS = flags.DEFINE_list("inner_steps", ["1", "2", "5", "10"], "Inner-step counts.")
_NUM_TASKS = flags.DEFINE_integer("num_tasks", None, "Meta-batch size (default: config's).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per measurement (median reported).")
_X64 = flags.DEFINE_bool("x64", None, "Float64 (default: for the MLP only).")
_FD_EPS = flags.DEFINE_float("fd_eps", 1e-6, "Finite-difference step (taken in float64).")

# Relative error of the gradient's directional derivative against the float64
# central difference: float32 rounding through the inner steps measured 1e-7 to 1e-4
# (more with more steps: the gradient shrinks, the rounding does not).
FD_TOLERANCE = {"float64": 1e-6, "float32": 1e-3}


def load_params(
    exp: train.Experiment, workdir: str | None, which: str = "latest"
) -> tuple[Any, str]:
    """``(params, source)``: the ``which`` checkpoint's in ``workdir``, or without a
    ``workdir`` the initial params."""
    if not workdir:
        if which == "best":
            _common.fail("--checkpoint=best needs the --workdir of a training run")
        return exp.init_params, "initial"
    _, params, step = train.restore_params(exp.config, workdir, which)
    return params, f"{which} checkpoint step {step}"


def to_dtype(tree: Any, dtype: DTypeLike) -> Any:
    """Casts the floating leaves of ``tree`` to ``dtype``; integer labels stay."""
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def measure(
    exp: train.Experiment,
    params: Any,
    episode: dict,
    *,
    inner_steps: list[int],
    repeats: int,
    fd_eps: float,
    key: jax.Array,
) -> list[dict]:
    """Every number the script reports, for ``params`` and one ``episode``.

    ``episode`` is ``{"support": (x, y), "query": (x, y)}`` with a leading task
    axis; ``params`` and the episode's floats share one dtype, which the model
    is rebuilt in. Returns one dict per entry of ``inner_steps``.
    """
    config = exp.config
    dtype = jax.tree.leaves(params)[0].dtype
    apply_fn, _ = train.build_model(config, config.seed, dtype)
    exp = dataclasses.replace(exp, apply_fn=apply_fn, init_params=params)
    loss_fn = exp.loss_fn
    # Per leaf where BatchNorm is kept out of the inner loop (config.adapt_norm).
    exp_inner_lr = exp.inner_lr
    support, query = episode["support"], episode["query"]
    direction = analysis.random_unit_direction(key, params)
    precision = "float64" if dtype == jnp.float64 else "float32"
    with jax.enable_x64(True):  # the finite differences' reference, whatever the dtype
        f64 = functools.partial(to_dtype, dtype=jnp.float64)
        apply64, _ = train.build_model(config, config.seed, jnp.float64)
        loss64 = dataclasses.replace(exp, apply_fn=apply64).loss_fn
        episode64 = f64((support, query))
    results = []
    for num_inner_steps in inner_steps:
        fns = analysis.meta_gradient_fns(
            loss_fn,
            inner_lr=exp_inner_lr,
            num_inner_steps=num_inner_steps,
            imaml_lambda=config.imaml_lambda,
            imaml_cg_steps=config.imaml_cg_steps,
            imaml_cg_damping=config.imaml_cg_damping,
            imaml_lam_damping=config.imaml_lam_damping,
        )
        grads, methods = {}, {}
        for name, fn in fns.items():
            grads[name], stats = analysis.time_and_memory(
                fn, params, support, query, repeats=repeats
            )
            methods[name] = {"norm": float(analysis.tree_norm(grads[name])), **stats}
        pairs = [
            ("exact", "first_order"),
            ("exact", "imaml"),
            ("first_order", "imaml"),
            ("exact", "exact_remat"),
        ]
        cosine = {
            f"{a}/{b}": float(analysis.cosine_similarity(grads[a], grads[b])) for a, b in pairs
        }
        meta_loss = jax.jit(
            lambda p, k=num_inner_steps: core.batched_meta_loss(
                loss_fn, p, support, query, inner_lr=exp_inner_lr, num_inner_steps=k
            )
        )
        with jax.enable_x64(True):
            meta_loss64 = jax.jit(
                lambda p, k=num_inner_steps: core.batched_meta_loss(
                    loss64, p, *episode64, inner_lr=exp_inner_lr, num_inner_steps=k
                )
            )
            check = analysis.finite_difference_check(
                meta_loss64, f64(params), f64(grads["exact"]), f64(direction), eps=fd_eps
            )
        check["tolerance"] = FD_TOLERANCE[precision]
        check["passed"] = check["relative_error"] < check["tolerance"]
        remat_diff = jax.tree.map(
            lambda a, b: jnp.max(jnp.abs(a - b)), grads["exact"], grads["exact_remat"]
        )
        results.append(
            {
                "num_inner_steps": num_inner_steps,
                "meta_loss": float(meta_loss(params)),
                "methods": methods,
                "cosine": cosine,
                "exact_remat_max_abs_diff": float(max(jax.tree.leaves(remat_diff))),
                "finite_difference": check,
            }
        )
    return results


def print_table(report: dict) -> None:
    """Prints time, scratch memory, norm and cosine to the exact gradient per method and
    step count, and each step count's finite-difference check."""
    print(
        f"{report['config_name']}: {report['num_params']} params ({report['dtype']}, "
        f"{report['params_source']}), {report['num_tasks']} tasks, {report['backend']}"
    )
    header = f"{'steps':>5} {'method':<12} {'time ms':>9} {'temp MiB':>9} {'norm':>10}"
    header += f" {'cos exact':>10}"
    print(header)
    for r in report["results"]:
        for name, m in r["methods"].items():
            temp = (m["memory"] or {}).get("temp")
            temp_s = f"{temp / 2**20:9.3f}" if temp is not None else f"{'n/a':>9}"
            cos = 1.0 if name == "exact" else r["cosine"].get(f"exact/{name}", float("nan"))
            print(
                f"{r['num_inner_steps']:>5} {name:<12} {1e3 * m['median_s']:9.3f} {temp_s} "
                f"{m['norm']:10.4g} {cos:10.6f}"
            )
        fd = r["finite_difference"]
        print(
            f"    finite differences: rel. error {fd['relative_error']:.2e} "
            f"(tolerance {fd['tolerance']:.0e}, {'ok' if fd['passed'] else 'FAILED'}); "
            f"cos(first_order, imaml) {r['cosine']['first_order/imaml']:.6f}"
        )


def plot(report: dict, path: Path) -> "Figure":
    """Time, compiled scratch memory and pairwise cosine similarity against inner steps."""
    from matplotlib.figure import Figure

    from maml import plots

    steps = [r["num_inner_steps"] for r in report["results"]]
    fig = Figure(figsize=(15, 4.2))
    axes = fig.subplots(1, 3)
    for name in analysis.METHODS:
        times = [1e3 * r["methods"][name]["median_s"] for r in report["results"]]
        axes[0].plot(steps, times, "o-", label=name)
        temps = [(r["methods"][name]["memory"] or {}).get("temp") for r in report["results"]]
        if all(t is not None for t in temps):
            axes[1].plot(steps, [t / 2**20 for t in temps], "o-", label=name)
    axes[0].set(xlabel="inner steps", ylabel="time per meta-gradient (ms)", yscale="log")
    axes[0].set_title("time (jitted, median)")
    axes[1].set(xlabel="inner steps", ylabel="XLA temp memory (MiB)")
    axes[1].set_title("compiled scratch memory")
    for pair in ("exact/first_order", "exact/imaml", "first_order/imaml"):
        axes[2].plot(steps, [r["cosine"][pair] for r in report["results"]], "o-", label=pair)
    axes[2].set(xlabel="inner steps", ylabel="cosine similarity")
    axes[2].set_title("agreement of meta-gradients")
    if not axes[1].lines:  # not an empty panel that reads as zero memory
        axes[1].text(
            0.5,
            0.5,
            "not reported by this backend",
            ha="center",
            va="center",
            transform=axes[1].transAxes,
        )
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        plots.integer_x(ax)
    fig.suptitle(
        f"{report['config_name']} ({report['num_params']} params, {report['params_source']})"
    )
    fig.tight_layout()
    plots.save(fig, path)
    return fig


def main(argv: list[str]) -> None:
    """Measures the meta-gradients and writes ``meta_gradient.json`` and ``.png``."""
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs each restore at INFO
    config = flags.FLAGS.config
    if config is not None:
        config_name = config_flags.get_config_filename(flags.FLAGS["config"])
    else:
        config, config_name = sinusoid.get_config(), "maml/configs/sinusoid.py"
    _common.checked_type(config)
    try:
        validate(config)
    except ConfigError as e:
        _common.fail(str(e))
    try:
        inner_steps = [int(s) for s in _INNER_STEPS.value]
    except ValueError:
        inner_steps = [-1]
    if not inner_steps or not 0 <= min(inner_steps) <= max(inner_steps) < 2**31:
        _common.fail(
            f"--inner_steps={','.join(_INNER_STEPS.value)} must be non-negative integers "
            "below 2**31"
        )
    num_tasks = config.meta_batch_size if _NUM_TASKS.value is None else _NUM_TASKS.value
    _common.check_count("num_tasks", num_tasks)
    _common.check_count("repeats", _REPEATS.value)
    if not 0 < _FD_EPS.value < math.inf:
        _common.fail(f"--fd_eps={_FD_EPS.value} must be a positive number")
    if flags.FLAGS.cpu_devices is not None:
        _common.fail("--cpu_devices: meta_gradient.py computes on one device; drop the flag")
    workdir = flags.FLAGS.workdir
    if workdir and not Path(workdir).is_dir():
        _common.fail(f"--workdir={workdir} is not a directory: give a training run's --workdir")
    output_dir = Path(_OUTPUT_DIR.value or workdir or "runs/meta_gradient")
    _common.check_directory(output_dir, "--output_dir")
    x64 = _X64.value if _X64.value is not None else config.model == "mlp"
    precision = "float64" if x64 else "float32"
    # It measures every method, remat and not: config.remat would not help.
    memory = "lower --num_tasks (unset: config.meta_batch_size) or the largest --inner_steps"
    with _common.user_errors(memory):
        # The train split's tasks, on a mesh that does not split the meta-batch: this
        # script computes on one device, so any device count is fine.
        exp = train.build_experiment(config, "test", task=train.build_task(config, "train"))
        params, source = load_params(exp, workdir, _CHECKPOINT.value)
        # After the restore: a missing checkpoint is one line, with no warning before it.
        changes = train.warn_of_config_changes(Path(workdir), config) if workdir else []
        train_key, _ = train.root_keys(config.seed)
        episode = exp.task.sample(jax.random.fold_in(train_key, 0), num_tasks)
        episode = {"support": episode["support"], "query": episode["query"]}
    with _common.user_errors(memory), jax.enable_x64(x64):  # out of memory, at many inner steps
        dtype = jnp.float64 if x64 else jnp.float32
        params, episode = to_dtype(params, dtype), to_dtype(episode, dtype)
        results = measure(
            exp,
            params,
            episode,
            inner_steps=inner_steps,
            repeats=_REPEATS.value,
            fd_eps=_FD_EPS.value,
            key=jax.random.key((config.seed + 1) % 2**32),  # seeds end at 2**32 - 1
        )
    report = {
        "config_name": config_name,
        "config": json.loads(config.to_json_best_effort()),
        "params_source": source,
        "dtype": precision,
        "num_params": int(sum(np.size(x) for x in jax.tree.leaves(params))),
        "num_tasks": num_tasks,
        "repeats": _REPEATS.value,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "inner_steps": inner_steps,
        "config_changes": changes,
        "results": results,
    }
    _common.write_report(report, output_dir, "meta_gradient", plot=plot, summary=print_table)


if __name__ == "__main__":
    _common.run(main)
