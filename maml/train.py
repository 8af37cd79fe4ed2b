"""Meta-training: the train state, the jitted outer step, and the training loop.

``train_and_evaluate(config, workdir)`` is what ``scripts/train.py`` calls.
The hot loop stays on the device: each host call runs ``config.log_every``
meta-steps in one ``lax.scan`` (episodes sampled inside it with
``jax.random.fold_in(key, step)``), donates the old state, and hands back the
per-step metrics, which the host averages, logs and writes to
``workdir/metrics.jsonl``. Checkpoints (orbax) land in
``workdir/checkpoints``; running the same command again resumes from the
latest one and ends bit for bit where an uninterrupted run ends. With
validation on (``config.eval_every``), ``workdir/best_checkpoint``
holds the state with the best validation metric so far.
"""

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from jax.typing import DTypeLike
from tqdm import tqdm

from maml import analysis, core
from maml.configs import ConfigError
from maml.models import FINN_KERNEL_INIT, LECUN_NORMAL, MLP, ConvNet, functional
from maml.tasks.sinusoid import Sinusoid

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Everything a meta-training run carries from one step to the next."""

    params: PyTree
    opt_state: optax.OptState
    step: jax.Array


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A config made concrete: the model as ``(apply_fn, params)``, tasks, optimizer."""

    config: ml_collections.ConfigDict
    apply_fn: Callable
    init_params: PyTree
    task: Any
    optimizer: optax.GradientTransformation
    mesh: jax.sharding.Mesh

    def loss_fn(self, params: PyTree, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        """``loss_fn(params, (x, y)) -> scalar``, the loss MAML adapts with."""
        x, y = batch
        return self.task.loss(self.apply_fn(params, x), y)

    @property
    def inner_lr(self) -> float | PyTree:
        """The training inner learning rate, per leaf where some leaves are not adapted."""
        return self.inner_rates(self.config.inner_lr)

    def inner_rates(self, rate: float) -> float | PyTree:
        """``rate`` for every adapted leaf: a scalar, or a per-leaf pytree with 0
        for the leaves the config keeps out of the inner loop."""
        if self.config.get("adapt_norm", True):
            return rate
        # Finn's Omniglot code left BatchNorm (an offset, no scale) out of the inner loop.
        return jax.tree_util.tree_map_with_path(
            lambda path, _: 0.0 if _is_norm_param(path) else rate, self.init_params
        )


def _is_norm_param(path) -> bool:
    return any("norm" in str(getattr(k, "key", "")).lower() for k in path)


def build_model(
    config: ml_collections.ConfigDict, seed: int, param_dtype: DTypeLike = jnp.float32
) -> tuple[Callable, PyTree]:
    """Builds ``config.model`` and returns it as ``(apply_fn, params)``, computing in
    ``param_dtype``."""
    rngs = nnx.Rngs(seed)
    if config.model == "mlp":
        init = FINN_KERNEL_INIT if config.get("init") == "finn" else LECUN_NORMAL
        model = MLP(
            (1, *config.hidden_sizes, 1), rngs=rngs, kernel_init=init, param_dtype=param_dtype
        )
    elif config.model == "convnet":
        model = ConvNet(
            config.num_ways,
            rngs=rngs,
            conv_impl=config.get("conv_impl", "patches"),
            param_dtype=param_dtype,
        )
    else:
        raise ValueError(f"unknown model {config.model!r}")
    return functional(model)


def build_task(config: ml_collections.ConfigDict, split: str) -> Any:
    """The task family of ``config.task`` for ``split`` ("train", "validation", "test")."""
    if config.task == "sinusoid":
        return Sinusoid(num_support=config.num_support, num_query=config.num_query)
    if config.task == "omniglot":
        from maml.tasks import omniglot

        return omniglot.from_config(config, split)
    raise ValueError(f"unknown task {config.task!r}")


def task_mesh(meta_batch_size: int | None = None) -> jax.sharding.Mesh:
    """A one-axis mesh ("tasks") over every device of every process.

    The meta-batch is data-parallel: each device adapts its share of the
    tasks and XLA reduces the meta-gradient across devices, so
    ``meta_batch_size``, when given, must divide evenly.
    """
    devices = jax.devices()
    if meta_batch_size is not None and meta_batch_size % len(devices):
        raise ConfigError(
            f"config.meta_batch_size={meta_batch_size} is invalid: it must be a multiple of "
            f"the {len(devices)} devices it is sharded over, or use fewer devices "
            "(--cpu_devices on the CPU, CUDA_VISIBLE_DEVICES on GPUs)."
        )
    return jax.sharding.Mesh(np.array(devices), ("tasks",))


def build_experiment(
    config: ml_collections.ConfigDict, split: str = "train", task: Any = None
) -> Experiment:
    """The experiment ``config`` describes, on ``split``'s tasks (or on ``task``, if given)."""
    apply_fn, params = build_model(config, config.seed)
    return Experiment(
        config=config,
        apply_fn=apply_fn,
        init_params=params,
        task=build_task(config, split) if task is None else task,
        optimizer=optax.adam(config.outer_lr),
        # Only training splits the meta-batch; evaluation splits what divides evenly.
        mesh=task_mesh(config.meta_batch_size if split == "train" else None),
    )


def init_state(exp: Experiment) -> TrainState:
    """The initial train state, replicated over ``exp.mesh``."""
    params = exp.init_params
    state = TrainState(params=params, opt_state=exp.optimizer.init(params), step=jnp.array(0))
    return jax.device_put(state, jax.sharding.NamedSharding(exp.mesh, jax.sharding.PartitionSpec()))


def root_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """``(train_key, eval_key)``: disjoint streams, so evaluation tasks are fresh."""
    train_key, eval_key = jax.random.split(jax.random.key(seed))
    return train_key, eval_key


# --- The meta-objective --------------------------------------------------------


def task_loss_and_metrics(
    exp: Experiment,
    params: PyTree,
    support: tuple[jax.Array, jax.Array],
    query: tuple[jax.Array, jax.Array],
    *,
    num_inner_steps: int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One task: adapt on ``support``, then the query loss and metrics.

    ``support`` and ``query`` are one task's ``(x, y)``, e.g. ``(N*K, 28, 28, 1)``
    images and ``(N*K,)`` labels (``N*Q`` for the query); returns a scalar loss
    and ``task.metrics`` (scalars).
    """
    c = exp.config
    adapted = core.adapt(
        exp.loss_fn,
        params,
        support,
        inner_lr=exp.inner_lr,
        num_inner_steps=num_inner_steps,
        first_order=c.algorithm == "fomaml",
        remat=c.get("remat", False),
    )
    x, y = query
    predictions = exp.apply_fn(adapted, x)
    return exp.task.loss(predictions, y), exp.task.metrics(predictions, y)


def meta_loss_and_grad(
    exp: Experiment, params: PyTree, episode: dict
) -> tuple[jax.Array, dict[str, jax.Array], PyTree]:
    """Mean meta-loss over the meta-batch, its metrics, and its gradient.

    ``episode`` is ``task.sample``'s: ``support`` and ``query`` lead with the
    task axis on every leaf. Returns ``(scalar loss, metrics, grads)``: the
    metrics are task means (for iMAML, CG's relative residual ``cg_residual``),
    ``grads`` is shaped like ``params`` and follows ``config.algorithm``.
    """
    c = exp.config
    if c.algorithm == "imaml":
        from maml import imaml

        loss, grads, cg_residual = imaml.batched_imaml_loss_and_grad(
            exp.loss_fn,
            params,
            episode["support"],
            episode["query"],
            inner_lr=exp.inner_lr,
            num_inner_steps=c.num_inner_steps,
            lam=c.imaml_lambda,
            num_cg_steps=c.imaml_cg_steps,
            cg_damping=c.imaml_cg_damping,
            lam_damping=c.imaml_lam_damping,
            return_cg_residual=True,
        )
        return loss, {"cg_residual": cg_residual}, grads
    # Finn's pretrain baseline: plain multi-task training, no inner loop.
    num_inner_steps = 0 if c.algorithm == "pretrain" else c.num_inner_steps

    def objective(params):
        losses, metrics = jax.vmap(
            functools.partial(task_loss_and_metrics, exp, params, num_inner_steps=num_inner_steps)
        )(episode["support"], episode["query"])
        return jnp.mean(losses), jax.tree.map(jnp.mean, metrics)

    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return loss, metrics, grads


def train_step(
    exp: Experiment, train_key: jax.Array, state: TrainState
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One meta-step; ``(new_state, metrics)``, with the episode sampled on the device.

    The episode is drawn from ``fold_in(train_key, state.step)``, so a resumed
    run sees the same tasks; ``metrics`` are scalars: ``loss``, the task's
    metrics and ``grad_norm``.
    """
    key = jax.random.fold_in(train_key, state.step)
    episode = exp.task.sample(key, exp.config.meta_batch_size)
    # Every leaf of an episode leads with the task axis: split it over devices.
    tasks = jax.sharding.NamedSharding(exp.mesh, jax.sharding.PartitionSpec("tasks"))
    episode = jax.lax.with_sharding_constraint(episode, tasks)
    loss, metrics, grads = meta_loss_and_grad(exp, state.params, episode)
    updates, opt_state = exp.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, **metrics, "grad_norm": analysis.tree_norm(grads)}
    return state.replace(params=params, opt_state=opt_state, step=state.step + 1), metrics


def make_train_chunk(
    exp: Experiment, train_key: jax.Array
) -> Callable[[TrainState, int], tuple[TrainState, dict[str, jax.Array]]]:
    """``train_chunk(state, num_steps) -> (state, metrics)``: jitted, donating ``state``.

    ``metrics`` leaves have a leading axis of length ``num_steps``.
    """

    @functools.partial(jax.jit, static_argnums=1, donate_argnums=0)
    def train_chunk(state: TrainState, num_steps: int):
        def body(state, _):
            return train_step(exp, train_key, state)

        return jax.lax.scan(body, state, length=num_steps)

    return train_chunk


# --- Evaluation ------------------------------------------------------------------


def make_adaptation_curve(
    exp: Experiment,
    task: Any,
    *,
    inner_lr: float,
    num_inner_steps: int,
    batch_size: int,
    proximal_lambda: float = 0.0,
) -> Callable[..., np.ndarray]:
    """``curve(params, key, *, num_tasks, progress=None)``: the query metric of
    ``num_tasks`` fresh tasks after 0..``num_inner_steps`` SGD steps, compiled once
    (training validates with it every ``eval_every`` steps).

    Tasks are drawn ``batch_size`` at a time from ``task`` (batch ``b`` from
    ``fold_in(key, b)``) and adapted on their support sets at ``inner_lr``
    (``exp.inner_rates``: 0 for the leaves the config keeps out of the inner
    loop), by plain SGD or, with ``proximal_lambda`` > 0, iMAML's proximal steps
    (``core.adaptation_trajectory``). ``progress``, if given, labels a progress bar
    over the batches.
    ``curve`` returns a ``(num_inner_steps + 1, num_tasks)`` numpy array of
    ``task.metric``.
    """
    rates = exp.inner_rates(inner_lr)
    # The tasks of a batch are split over the mesh as in training, when they
    # divide evenly; the same tasks are drawn whatever the device count. The
    # metrics come back replicated, so every process can read them.
    replicated = jax.sharding.NamedSharding(exp.mesh, jax.sharding.PartitionSpec())
    tasks = replicated
    if batch_size % exp.mesh.size == 0:
        tasks = jax.sharding.NamedSharding(exp.mesh, jax.sharding.PartitionSpec("tasks"))

    @functools.partial(jax.jit, out_shardings=replicated)
    def batch_curve(params, key):
        episode = jax.lax.with_sharding_constraint(task.sample(key, batch_size), tasks)

        def one_task(support, query):
            def metric(p):
                return task.metrics(exp.apply_fn(p, query[0]), query[1])[task.metric]

            return core.adaptation_trajectory(
                exp.loss_fn,
                metric,
                params,
                support,
                inner_lr=rates,
                num_inner_steps=num_inner_steps,
                proximal_lambda=proximal_lambda,
            )

        return jax.vmap(one_task, out_axes=1)(episode["support"], episode["query"])

    def curve(params, key, *, num_tasks: int, progress: str | None = None) -> np.ndarray:
        batches = tqdm(
            range(-(-num_tasks // batch_size)),
            desc=progress,
            unit="batch",
            dynamic_ncols=True,
            disable=progress is None or jax.process_index() != 0,
        )
        out = [np.asarray(batch_curve(params, jax.random.fold_in(key, b))) for b in batches]
        return np.concatenate(out, axis=1)[:, :num_tasks]

    return curve


def summarize(values: np.ndarray) -> dict:
    """Mean and 95% confidence half-width (1.96 std / sqrt(n), the std over the n
    tasks with ddof=0 as in Finn's code; NaN for one task) over tasks (last axis),
    the median, and how many tasks are not finite (diverged inner SGD)."""
    values = np.asarray(values, np.float64)  # float32 squares overflow past ~1e19
    n = values.shape[-1]
    with np.errstate(invalid="ignore"):  # inf - inf in the std of diverged tasks: NaN
        ci95 = 1.96 * values.std(-1) / np.sqrt(n) if n > 1 else np.full(values.shape[:-1], np.nan)
    return {
        "mean": values.mean(-1).tolist(),
        "ci95": ci95.tolist(),
        # A few diverging tasks can swamp the mean; the median shows the typical
        # task. A task whose loss overflowed to NaN counts as infinitely bad.
        "median": np.median(np.where(np.isnan(values), np.inf, values), -1).tolist(),
        "nonfinite": (~np.isfinite(values)).sum(-1).tolist(),
    }


# --- Checkpoints -------------------------------------------------------------------


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored; the message is one line for the user."""


class DivergedError(RuntimeError):
    """Meta-training produced a loss or gradient that is not finite; one line for the user."""


def first_nonfinite(metrics: dict) -> int | None:
    """Index of the first step of a chunk whose ``metrics`` (host arrays with a leading
    step axis) hold a value that is not finite, or ``None``."""
    finite = np.ones(len(next(iter(metrics.values()))), bool)
    for v in metrics.values():
        finite &= np.isfinite(np.asarray(v)).reshape(len(finite), -1).all(-1)
    return None if finite.all() else int(np.argmin(finite))


CHECKPOINTS = {"latest": "checkpoints", "best": "best_checkpoint"}
"""Which checkpoint to restore, and the ``workdir`` folder it lives in."""


def checkpoint_manager(
    workdir: Path, which: str = "latest", metric: str = "accuracy", *, cleanup: bool = False
) -> ocp.CheckpointManager:
    """``latest``: the last 3 saves, for resuming; ``best``: the state with the best
    validation ``metric`` so far (highest accuracy, lowest error; of equal ones, the
    later), one save. A NaN validation (diverged inner SGD) ranks below every other.

    ``cleanup`` deletes the temporary folders of saves that never finished (a run
    killed while saving), each as large as a checkpoint; only for the run that holds
    the workdir's lock: in a reader (evaluation) it would delete a save in progress."""
    if which == "latest":
        options = ocp.CheckpointManagerOptions(
            max_to_keep=3, create=True, cleanup_tmp_directories=cleanup
        )
    else:
        mode = "max" if metric == "accuracy" else "min"
        worst = -math.inf if mode == "max" else math.inf

        def best_fn(metrics):  # NaN compares false with everything: orbax would keep it
            value = metrics.get(f"val_{metric}") if isinstance(metrics, dict) else None
            # Also a damaged metrics file: ranked last, it cannot stop the run.
            if not isinstance(value, (int, float)) or math.isnan(value):
                return worst
            return value

        options = ocp.CheckpointManagerOptions(
            max_to_keep=1,
            create=True,
            cleanup_tmp_directories=cleanup,
            best_fn=best_fn,
            best_mode=mode,
            # With several processes, both managers save the same steps: without
            # a prefix their barrier keys collide and the saves time out.
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix="best"
            ),
        )
    folder = (workdir / CHECKPOINTS[which]).absolute()
    try:
        return ocp.CheckpointManager(folder, options=options)
    except OSError:  # a folder that cannot be created or read: the caller names it
        raise
    except Exception as e:  # orbax reads each step's metadata and metrics here
        raise CheckpointError(
            f"cannot read the checkpoints in {folder} ({type(e).__name__}: "
            f"{(str(e).splitlines() or [''])[0][:200]}); one is damaged: delete that step's "
            "folder, or use another --workdir."
        ) from e


def restore_latest(manager: ocp.CheckpointManager, target: TrainState) -> TrainState | None:
    """The manager's latest checkpoint restored into ``target``'s structure, or ``None``."""
    step = manager.latest_step()
    if step is None:
        return None
    step_dir = Path(manager.directory) / str(step)
    # Not "corrupt: delete it": the files may be whole, only not ours to read.
    unreadable = _unreadable(step_dir)
    if unreadable is not None:
        raise CheckpointError(
            f"cannot restore checkpoint {step_dir}: {unreadable} cannot be read (permission "
            "denied); give this user read access to it (chmod -R u+rX), or run as its owner."
        )
    if not (step_dir / "default").is_dir():  # orbax would say "must provide Composite args"
        raise CheckpointError(
            f"checkpoint {step_dir} is incomplete: it holds no default/ folder (emptied, or a "
            "copy cut short): delete it or use another --workdir."
        )
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    # Checked first: orbax's failed reads of a mismatched array print tracebacks.
    mismatch = _shape_mismatch(step_dir, abstract)
    if mismatch:
        raise CheckpointError(
            f"checkpoint {manager.directory}/{step} is from another config: {mismatch}; "
            "use the config it was trained with, or another --workdir."
        )
    try:
        return manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # orbax raises many types for a bad or foreign checkpoint
        # The first line, without tensorstore's spec (several KB of JSON).
        reason = (str(e).splitlines() or [""])[0]
        for spec in (" [tensorstore_spec", ". See full TensorStore details"):
            reason = reason.split(spec)[0]
        reason = reason[:300]
        raise CheckpointError(
            f"cannot restore checkpoint {manager.directory}/{step} ({type(e).__name__}: "
            f"{reason}); it is corrupt or from another config: delete it or use another "
            "--workdir."
        ) from e


def _unreadable(folder: Path) -> Path | None:
    """The first file or folder in ``folder`` (itself included) that this process may
    not read (a folder: list and enter), or ``None``."""

    def denied(path: str) -> bool:
        # A link to nothing is not a permission matter (and orbax may not read it).
        return os.path.exists(path) and not os.access(
            path, os.R_OK | (os.X_OK if os.path.isdir(path) else 0)
        )

    if denied(folder):
        return folder
    for root, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            if denied(os.path.join(root, name)):
                return Path(root, name)
    return None


def _shape_mismatch(step_dir: Path, abstract: PyTree) -> str | None:
    """The first array whose saved shape or dtype differs from ``abstract``'s, or ``None``
    (also when the checkpoint's metadata is unreadable: the restore reports that)."""
    try:
        saved = ocp.tree.to_flat_dict(
            ocp.StandardCheckpointHandler().metadata(step_dir / "default").tree
        )
    except Exception:  # an old or damaged layout: left to the restore
        return None
    wanted = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(abstract))
    for key in sorted(set(saved) | set(wanted), key=lambda k: (k[0] != "params", k)):
        name = "/".join(map(str, key))
        if key not in saved or key not in wanted:
            return f"{name} is in the {'config' if key in wanted else 'checkpoint'} only"
        a, b = saved[key], wanted[key]
        if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
            return (
                f"{name} is {a.dtype}{list(a.shape)} there, {b.dtype}{list(b.shape)} in this config"
            )
    return None


# --- The training loop -------------------------------------------------------------


def finite_or_null(tree: Any) -> Any:
    """JSON has no inf or NaN: a value that is not finite is written as null, so that
    strict parsers (jq, JavaScript) read the file."""
    if isinstance(tree, dict):
        return {k: finite_or_null(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [finite_or_null(v) for v in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    return tree


def out_of_memory_reason(error: Exception) -> str | None:
    """One line saying what memory ``error`` could not get, or None for any other error.
    Memory the compiler cannot get is RESOURCE_EXHAUSTED; memory a running call cannot
    get is an INTERNAL error ("Error dispatching computation: ..." thrice)."""
    message = str(error)
    memory = re.search(r"Out of memory allocating \d+ bytes", message)
    if memory:
        return memory[0]
    if "RESOURCE_EXHAUSTED" not in message:
        return None
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    reason = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"
    return reason.removeprefix("RESOURCE_EXHAUSTED: ").rstrip(".")


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Calls ``write`` on a temporary file beside ``path``, then renames it to ``path``: a
    write that fails (a full disk) or is interrupted leaves the file as it was, never empty
    or cut short for the next run to take for a finished one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through ``write_atomic``."""
    write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, tree: Any) -> None:
    """Writes ``tree`` as strict JSON (a value that is not finite as null, so that
    parsers such as jq read it), indented, through ``write_text_atomic``."""
    write_text_atomic(path, json.dumps(finite_or_null(tree), indent=2, allow_nan=False) + "\n")


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    # Bytes that are not UTF-8 (a crash can leave junk where a line was being
    # written) are replaced, so that their line is skipped like any unreadable one.
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a hard kill or a full disk
            continue
        # Not a line someone wrote in by hand (json's true is an int to isinstance).
        if isinstance(record, dict) and type(record.get("step")) is int:
            records.append(record)
    return records


RESUMABLE_CHANGES = frozenset(
    {
        "num_steps",
        "log_every",
        "checkpoint_every",
        "eval_every",
        "num_val_tasks",
        "eval_report_step",
        "data_dir",
        "cache_dir",
        "download",
        "remat",
        "conv_impl",
        "eval_seed",
        "num_eval_tasks",
        "eval_shots",
        "eval_inner_steps",
        "eval_inner_lr",
        "eval_proximal_lambda",
        "eval_batch_size",
        "eval_num_query",
    }
)
"""Config fields a resumed run may change freely: how long it runs, how often it logs,
saves and validates, where the data is, how a step is computed (the same maths, so
the same numbers up to float rounding, not bit for bit: Adam can magnify the
difference in a near-zero gradient), and evaluation. Any other change makes the run
something its checkpoint was not."""


SPLIT_FIELDS = ("split_protocol", "split_seed", "num_validation_classes")
"""Config fields that decide, within a task family, which examples are meta-train,
validation and test."""

IMPLIED_SETTINGS = {"imaml_cg_damping": 0.0, "imaml_lam_damping": 0.0}
"""Config fields added after runs were saved without them, with the value such a run
trained with: compared as that, so that resuming one with another is a change."""


def config_changes(
    workdir: Path,
    config: ml_collections.ConfigDict,
    fields: Collection[str] | None = None,
    *,
    saved_as: str = "config.json",
) -> list[str]:
    """``"field old -> new"`` for each of ``fields`` (default: every field outside
    ``RESUMABLE_CHANGES``) in which ``config`` differs from the run's ``config.json``
    (or ``saved_as``; fields it lacks are skipped, but for ``IMPLIED_SETTINGS``)."""
    path = workdir / saved_as
    if not path.exists():
        return []
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict) or not saved:
            raise ValueError(f"it holds {json.dumps(saved)[:40]}")
    except ValueError as e:
        raise CheckpointError(
            f"{path}, the run's settings, is not a JSON object of settings ({e}): repair it "
            "(it must hold the settings the run was started with)."
        ) from e
    saved = {**IMPLIED_SETTINGS, **saved}
    current = json.loads(config.to_json_best_effort())
    return [
        f"{k} {saved[k]!r} -> {v!r}"
        for k, v in current.items()
        if k in saved
        and (k in fields if fields is not None else k not in RESUMABLE_CHANGES)
        and saved[k] != v
    ]


def _warn_if_settings_missing(workdir: Path) -> None:
    """Without the run's ``config.json`` a resume or an evaluation checks no setting (the
    split included)."""
    # Either checkpoint: an evaluation of best_checkpoint/ alone is one of the run too.
    held = any((workdir / folder).is_dir() for folder in CHECKPOINTS.values())
    if not (workdir / "config.json").exists() and held:
        print(
            f"warning: {workdir / 'config.json'} is missing: this config cannot be checked "
            "against the run's settings (its split included); use the config it was trained with",
            file=sys.stderr,
        )


def warn_of_config_changes(workdir: Path, config: ml_collections.ConfigDict) -> list[str]:
    """``config_changes(workdir, config)``, printed as a warning when there are any: for
    an evaluation, which may change a setting that trained the run (an ablation, say
    ``adapt_norm``), but should say so and record it, since it changes the numbers.
    Without the run's ``config.json`` it warns that nothing (the split included) is checked."""
    _warn_if_settings_missing(Path(workdir))
    changes = config_changes(Path(workdir), config)
    if changes:
        print(
            f"warning: evaluating with settings other than {Path(workdir) / 'config.json'}'s: "
            f"{'; '.join(changes)}",
            file=sys.stderr,
        )
    return changes


def _truncate_metrics(path: Path, step: int) -> None:
    """Drops log lines past ``step`` (they belong to a run that did not checkpoint
    them) and any line cut short, so that the next line starts on a line of its own."""
    if not path.exists():
        return
    kept = [r for r in _read_metrics(path) if r["step"] <= step]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    if path.read_bytes() != text.encode():  # replaced whole, so that a crash here loses no line
        write_text_atomic(path, text)


def _validation_missed(
    config: ml_collections.ConfigDict, workdir: Path, step: int, name: str
) -> bool:
    """Whether ``step`` was due a validation that its log line lacks (an interrupt
    during it: the step is logged and saved without it) and ``config`` validates.

    Due under the settings that trained ``step`` (``config.step{step}.json``, else
    ``config.json``; ``config``'s where neither says): a resume may change
    ``eval_every``, which made a finished run validate its last step again."""
    if not config.get("eval_every", 0) or step == 0:
        return False
    every = config.eval_every
    for saved in (workdir / f"config.step{step}.json", workdir / "config.json"):
        try:
            settings = json.loads(saved.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(settings, dict) and isinstance(settings.get("eval_every"), int):
            every = settings["eval_every"]
            break
    if not every or step % every:
        return False
    logged = [r for r in _read_metrics(workdir / "metrics.jsonl") if r["step"] == step]
    return bool(logged) and name not in logged[-1]


def _any_process(flag: bool) -> bool:
    """Whether ``flag`` is set in any process (a collective: every process must call it)."""
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


@contextlib.contextmanager
def _signals_deferred():
    """Holds SIGINT and SIGTERM back until the block ends, then delivers them.

    Yields the list of signals held so far. If the block raises anything but an
    interrupt (a divergence, say), the held signals are dropped and that error
    propagates instead.

    ``train_chunk`` donates the old state: an interrupt raised after the call
    has taken its buffers but before its result is assigned would leave the
    loop with neither the old state nor the new one to save.
    """
    if threading.current_thread() is not threading.main_thread():
        yield []  # only the main thread receives signals in Python
        return
    received = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in held}
    try:
        yield received
    except BaseException as e:
        if not isinstance(e, KeyboardInterrupt):
            received.clear()  # an error (divergence) ends the run: report it, not the signal
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in received:  # to the handler restored above: raise, ignore or terminate
            signal.raise_signal(s)


@contextlib.contextmanager
def _writing(what: str):
    """A write that fails (a full disk, a file system gone read-only) is a
    ``CheckpointError`` naming ``what``; orbax reports a failed write as ValueError."""
    try:
        yield
    except (OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        if len(reason) > 300:  # tensorstore names every file; the cause comes last
            reason = f"{reason[:140]} ... {reason[-140:]}"
        raise CheckpointError(
            f"cannot write {what} ({reason}); the checkpoints already written are kept: "
            "free space and run the same command again to resume."
        ) from e


@contextlib.contextmanager
def _workdir_lock(workdir: Path):
    """Holds ``workdir/.lock`` for the run: a second run in the same workdir (the
    same job submitted twice, or another seed) would mix its metrics and
    checkpoints into this one's."""
    import fcntl

    with open(workdir / ".lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"another run is training in {workdir} (it holds {workdir / '.lock'}): "
                "wait for it to end, or use another --workdir."
            ) from None
        except OSError as e:  # a file system without locks (some network ones): train on
            print(f"warning: cannot lock {workdir / '.lock'} ({e.strerror})", file=sys.stderr)
        yield


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | Path, *, allow_config_change: bool = False
) -> TrainState:
    """Meta-trains ``config`` in ``workdir``, resuming from its latest checkpoint.

    A resumed run must keep the settings in the run's ``config.json`` except
    ``RESUMABLE_CHANGES`` (else ``ConfigError``), unless ``allow_config_change``:
    then the old ``config.json`` is kept as ``config.step{N}.json``. A change of
    ``SPLIT_FIELDS`` is a ``ConfigError`` even then.
    """
    # The checkpoint managers' background threads end with the run, however it ends,
    # and so does the workdir's lock.
    with contextlib.ExitStack() as managers:
        return _train_and_evaluate(
            config, Path(workdir), allow_config_change, opened=managers.enter_context
        )


def _train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: Path,
    allow_config_change: bool,
    *,
    opened: Callable[[Any], Any],
) -> TrainState:
    # With several processes (jax.distributed), all of them train and save
    # checkpoints together; only the first writes logs and plots.
    is_main = jax.process_index() == 0
    exp = build_experiment(config, "train")
    (workdir / "plots").mkdir(parents=True, exist_ok=True)
    refused = None
    if is_main:  # the other processes are this run's own
        try:
            opened(_workdir_lock(workdir))
        except ConfigError as e:
            refused = e
    # All processes stop together (one alone would leave the others hanging).
    if jax.process_count() > 1 and _any_process(refused is not None) and refused is None:
        refused = ConfigError(f"another run is training in {workdir} (process 0 found it)")
    if refused is not None:
        raise refused
    train_key, eval_key = root_keys(config.seed)
    manager = opened(checkpoint_manager(workdir, cleanup=True))
    state = init_state(exp)
    # Checked before the restore, which would name only the first array a change reshapes.
    saved_step = manager.latest_step()
    changed = split = []
    if saved_step is not None:
        if is_main:  # once, not once per process
            _warn_if_settings_missing(workdir)
        changed = config_changes(workdir, config)
        split = config_changes(workdir, config, SPLIT_FIELDS)
    if split:  # evaluation checks config.json's split: it must be every checkpoint's
        raise ConfigError(
            f"{workdir} holds a run at step {saved_step} trained on another split "
            f"({'; '.join(split)}): under this one, characters it trained on would be "
            "validated and tested on. Use a new --workdir."
        )
    if changed and not allow_config_change:
        raise ConfigError(
            f"{workdir} holds a run at step {saved_step} with other settings "
            f"({'; '.join(changed)}): use a new --workdir, or --allow_config_change "
            "to resume with these."
        )
    restored = restore_latest(manager, state)
    metrics_path = workdir / "metrics.jsonl"
    # An interrupt during a validation logs and saves its step without it: validated on
    # resuming, so that the best checkpoint misses none.
    val_name = f"val_{exp.task.metric}"
    missed = restored is not None and _any_process(
        is_main and _validation_missed(config, workdir, int(restored.step), val_name)
    )
    if restored is not None and int(restored.step) >= config.num_steps and not missed:
        # config.json keeps the settings that trained the run to its step.
        if is_main:
            print(
                f"{workdir} is at step {int(restored.step)}, not below config.num_steps="
                f"{config.num_steps}: nothing to train (raise --config.num_steps to train on)",
                file=sys.stderr,
            )
            # A run interrupted while drawing its last plots trained to the end.
            _end_plots(exp, restored.params, eval_key, workdir, stale_only=True)
        return restored
    if restored is not None:
        state = restored
        if is_main:  # else a resumed run looks like a fresh one until its bar is drawn
            first = " (validating it first: an interrupt cut its validation short)" * missed
            print(f"resuming from the checkpoint at step {int(state.step)}{first}", file=sys.stderr)
        if changed and is_main:
            kept = workdir / f"config.step{int(state.step)}.json"
            # An existing one trained the steps up to this checkpoint; config.json
            # then trained nothing that was saved (it diverged, say): keep the former.
            if kept.exists():
                changed = config_changes(workdir, config, saved_as=kept.name)
            else:
                (workdir / "config.json").replace(kept)
            changes = "; ".join(changed) or "the settings that trained it"
            print(f"resuming with {changes} (was: {kept})", file=sys.stderr)
        if is_main:
            _truncate_metrics(metrics_path, int(state.step))
            # Each checkpoint's step is logged before it is saved: fewer lines were
            # deleted or cut short since, and cannot be written again.
            logged = [r["step"] for r in _read_metrics(metrics_path)]
            if not logged or logged[-1] < int(state.step):
                print(
                    f"warning: {metrics_path} ends at step {logged[-1] if logged else 0}, "
                    f"before the checkpoint's {int(state.step)}: the lines of the steps "
                    "between are lost (deleted or cut short); the run logs on from here",
                    file=sys.stderr,
                )
    elif is_main:  # a fresh start: what an earlier run here left describes no checkpoint
        metrics_path.unlink(missing_ok=True)
        for stale in workdir.glob("config.step*.json"):
            stale.unlink()
        # The scripts' results are kept (they may be all that is left of it), but named.
        results = ("eval*.json", "one_shot_runs*.json", "curvature.json", "meta_gradient.json")
        left = sorted(p.name for pattern in results for p in workdir.glob(pattern))
        if left:
            print(
                f"warning: {workdir} holds {', '.join(left)} of an earlier run whose checkpoints "
                "are gone: they do not describe this one",
                file=sys.stderr,
            )
    if is_main:
        write_text_atomic(workdir / "config.json", config.to_json_best_effort(indent=2) + "\n")
    start = int(state.step)
    if is_main and config.get("eval_every", 0) > config.num_steps:
        print(
            f"warning: config.eval_every={config.eval_every} > config.num_steps="
            f"{config.num_steps}: no validation will run, so no best_checkpoint/",
            file=sys.stderr,
        )
    val_task = build_task(config, "validation") if config.get("eval_every", 0) else None
    keep_best = val_task is not None
    best = None
    if keep_best or (workdir / CHECKPOINTS["best"]).is_dir():
        best = opened(
            checkpoint_manager(
                workdir, "best", val_task.metric if keep_best else "accuracy", cleanup=True
            )
        )
    for later in [s for s in best.all_steps() if s > start] if best else []:
        # From steps this run replays (it saves them again when it validates), or
        # from an earlier run in this workdir: either way not this run's best.
        best.delete(later)
    train_chunk = make_train_chunk(exp, train_key)
    if val_task is not None:
        validation_curve = make_adaptation_curve(
            exp,
            val_task,
            inner_lr=config.get("eval_inner_lr", config.inner_lr),
            num_inner_steps=config.get("eval_report_step", config.num_inner_steps),
            batch_size=min(config.num_val_tasks, config.get("eval_batch_size", 100)),
            proximal_lambda=config.get("eval_proximal_lambda", 0.0),
        )
    if is_main:
        print(
            f"{config.task}/{config.algorithm}: meta-batch {config.meta_batch_size} sharded over "
            f"{jax.device_count()} {jax.default_backend()} device(s) in "
            f"{jax.process_count()} process(es); {workdir}",
            file=sys.stderr,
        )
    # Closed however the run ends, so that an error starts on a line of its own.
    bar = opened(
        tqdm(
            total=config.num_steps,
            initial=start,
            unit="step",
            dynamic_ncols=True,
            desc=f"{config.task}/{config.algorithm}",
            disable=not is_main,
        )
    )
    # wall_s counts on from the last logged step's: the run's time in all its sessions.
    walls = [r.get("wall_s") for r in _read_metrics(metrics_path)] if is_main else []
    walls = [w for w in walls if isinstance(w, int | float) and math.isfinite(w)]
    t0 = time.perf_counter() - (walls[-1] if walls else 0.0)

    def chunk_record(step, metrics) -> dict:
        return {
            "step": step,
            **{k: float(np.mean(v)) for k, v in jax.device_get(metrics).items()},
            "wall_s": round(time.perf_counter() - t0, 3),
        }

    def log(record: dict) -> None:
        if is_main:
            with _writing(metrics_path), metrics_path.open("a") as f:
                f.write(json.dumps(finite_or_null(record), allow_nan=False) + "\n")

    def plot_training(*, failing: bool = False) -> None:
        """However the run ends: finished, or ``failing`` (interrupted or diverged),
        where a plot that cannot be written must not hide why the run stopped."""
        if not is_main:
            return
        from maml import plots

        try:
            plots.training_curves(_read_metrics(metrics_path), workdir / "plots" / "training.png")
        except Exception as e:
            if not failing:
                raise
            reason = f"{type(e).__name__}: {e}".splitlines()[0]
            print(f"warning: cannot write the training plot ({reason})", file=sys.stderr)

    # Orbax writes in the background: a failed write surfaces at the next save or wait.
    def saving():
        return _writing(f"a checkpoint in {workdir}")

    def finish_saves() -> None:
        with saving():
            manager.wait_until_finished()
            if keep_best:
                best.wait_until_finished()

    def validate(params, step) -> float:
        curve = validation_curve(
            params, jax.random.fold_in(eval_key, step), num_tasks=config.num_val_tasks
        )
        return float(curve[-1].mean())

    def keep_if_best(step, state, value) -> None:
        # Kept only while it is the best validation so far.
        best.save(step, args=ocp.args.StandardSave(state), metrics={val_name: value})

    logged, metrics = start, None
    # With several processes a signal reaches one (Ctrl-C on one host) or each at
    # its own moment (a scheduler), but the steps, the validation and the saves are
    # collective: each process holds signals back for the whole loop, and after each
    # chunk they agree whether to stop, so that all save the same step together.
    multiprocess = jax.process_count() > 1
    deferred = contextlib.nullcontext if multiprocess else _signals_deferred
    # Also held through the save after an interrupt: a second signal (a scheduler's
    # to each process, a moment apart) would abort one process's part of it.
    with _signals_deferred() if multiprocess else contextlib.nullcontext([]) as received:
        try:
            if missed:
                value = validate(state.params, start)
                with deferred(), saving():
                    keep_if_best(start, state, value)
                    if is_main:
                        records = _read_metrics(metrics_path)
                        records[-1][val_name] = value
                        lines = [json.dumps(finite_or_null(r), allow_nan=False) for r in records]
                        write_text_atomic(metrics_path, "".join(line + "\n" for line in lines))
            while int(state.step) < config.num_steps:
                step = int(state.step)
                # Chunks end on multiples of log_every, so a resumed run replays the
                # same chunk boundaries (and so the same computation) as an
                # uninterrupted one.
                num = min(config.log_every - step % config.log_every, config.num_steps - step)
                with deferred():
                    state, metrics = train_chunk(state, num)
                metrics = jax.device_get(metrics)
                step += num
                record = chunk_record(step, metrics)
                bad = first_nonfinite(metrics)
                if bad is not None:
                    # The state is lost to NaN; keep every checkpoint from before it.
                    log(record)
                    finish_saves()
                    bar.close()
                    plot_training(failing=True)  # the curves up to the divergence
                    saved = manager.latest_step()
                    then = (
                        f"the latest checkpoint is step {saved}. Lower config.outer_lr or "
                        "config.inner_lr and run again with --allow_config_change to resume "
                        "from it."
                        if saved is not None
                        else "and no checkpoint was saved before it. Lower config.outer_lr or "
                        "config.inner_lr and run again."
                    )
                    raise DivergedError(
                        f"meta-training diverged: loss or gradient not finite at step "
                        f"{step - num + bad + 1}; nothing after it was saved, {then}"
                    )
                if val_task is not None and step % config.eval_every == 0:
                    record[val_name] = validate(state.params, step)
                # An interrupt inside orbax's save would surface as its traceback.
                with deferred(), saving():
                    if keep_best and val_name in record:
                        keep_if_best(step, state, record[val_name])
                    log(record)
                    logged = step
                    if step % config.checkpoint_every == 0 or step == config.num_steps:
                        manager.save(step, args=ocp.args.StandardSave(state))
                bar.update(num)
                bar.set_postfix(
                    {
                        k: f"{v:.4g}"
                        for k, v in record.items()
                        if k not in ("step", "wall_s", "grad_norm")
                    }
                )
                if multiprocess and _any_process(bool(received)):
                    raise KeyboardInterrupt  # on leaving the block, the signal received, if any
            # The last save is still being written: an interrupt in orbax's wait for it
            # would surface as its traceback.
            with deferred():
                finish_saves()
        except KeyboardInterrupt:
            # With one process, signals are held from here on too: a second Ctrl-C
            # (or a scheduler's second SIGTERM) would abort the save half-written.
            with contextlib.nullcontext() if multiprocess else _signals_deferred():
                # The state returned by the last dispatched chunk is whole once it is
                # computed; keep it so that no finished work is lost.
                step = int(state.step)
                # A chunk that diverged, interrupted before its check: its state is NaN.
                diverged = step > logged and first_nonfinite(jax.device_get(metrics)) is not None
                if step > logged:  # interrupted between the chunk and its log line
                    log(chunk_record(step, metrics))  # without the validation, if one was due
                # A save orbax has begun is listed already; closing the manager waits for it.
                finish_saves()
                if diverged:
                    step = manager.latest_step()
                elif step not in manager.all_steps():  # not saved just before the interrupt
                    with saving():
                        manager.save(step, args=ocp.args.StandardSave(state), force=True)
                    finish_saves()
                bar.close()
                if is_main and diverged:
                    kept = (
                        "no checkpoint" if step is None else f"the latest checkpoint is step {step}"
                    )
                    print(
                        "interrupted: the last chunk diverged (loss or gradient not finite) and "
                        f"was not saved; {kept} in {workdir}",
                        file=sys.stderr,
                    )
                elif is_main:
                    print(
                        f"interrupted: saved a checkpoint at step {step} in {workdir};"
                        " run the same command again to resume",
                        file=sys.stderr,
                    )
                plot_training(failing=True)
            raise
    bar.close()
    if not is_main:
        return state
    best_step = best.latest_step() if keep_best else None
    if best_step is not None:
        name = f"val_{val_task.metric}"
        print(
            f"best {name} {best.metrics(best_step)[name]:.4g} at step {best_step}: "
            f"{workdir / CHECKPOINTS['best']} (evaluate it with --checkpoint=best)",
            file=sys.stderr,
        )

    plot_training()
    _end_plots(exp, state.params, eval_key, workdir)
    return state


def _end_plots(
    exp: Experiment, params: PyTree, eval_key: jax.Array, workdir: Path, *, stale_only: bool = False
) -> None:
    """The plots a finished run draws last: for the sinusoid, Finn's Figure 2 of
    ``params``; with ``stale_only``, also the training curves, each only where it is
    missing or older than ``metrics.jsonl`` (a run interrupted while drawing them)."""
    from maml import plots

    def stale(path: Path) -> bool:
        if not stale_only:
            return True
        logged = workdir / "metrics.jsonl"
        return not path.exists() or (
            logged.exists() and path.stat().st_mtime < logged.stat().st_mtime
        )

    folder = workdir / "plots"
    if stale_only and stale(folder / "training.png"):
        plots.training_curves(_read_metrics(workdir / "metrics.jsonl"), folder / "training.png")
    if isinstance(exp.task, Sinusoid) and stale(folder / "adaptation.png"):
        key = jax.random.fold_in(eval_key, 2**31 - 1)
        plots.sinusoid_adaptation(exp, params, key, folder / "adaptation.png")


def restore_params(
    config: ml_collections.ConfigDict, workdir: str | Path, which: str = "latest", task: Any = None
) -> tuple[Experiment, PyTree, int]:
    """``(experiment, params, step)`` of the ``latest`` or ``best`` checkpoint in ``workdir``,
    the experiment on ``config``'s test split (or on ``task``, if given)."""
    workdir = Path(workdir)
    family = config_changes(workdir, config, ("task",))
    if family:
        raise ConfigError(
            f"{workdir} holds a run of another task family ({family[0]}, from its "
            "config.json): use the config it was trained with."
        )
    # Another split would put characters the model trained on among the test ones.
    split = config_changes(workdir, config, SPLIT_FIELDS)
    if split:
        raise ConfigError(
            f"{workdir} was trained on another split ({'; '.join(split)}, from its "
            "config.json), so these test tasks would not be held out: evaluate with its split."
        )
    exp = build_experiment(config, "test", task=task)
    folder = workdir / CHECKPOINTS[which]
    state = None
    if folder.is_dir():
        with checkpoint_manager(workdir, which, exp.task.metric) as manager:
            state = restore_latest(manager, init_state(exp))
    if state is None:
        how = (
            f"train first with scripts/train.py --workdir={workdir}"
            if which == "latest"
            else "it is written when validation runs, every config.eval_every steps: train "
            "with config.eval_every > 0 and no larger than config.num_steps"
        )
        raise CheckpointError(f"no checkpoint in {folder}: {how}.")
    return exp, state.params, int(state.step)
