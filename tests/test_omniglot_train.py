"""End-to-end meta-training and evaluation on Omniglot with the ``tiny`` config.

The preprocessed cache is built once per session into a pytest temporary
directory from the prepared TFDS data in ``../shared/data/tfds``, as in
``test_omniglot.py``; every test skips without the data. Each compile of the
conv net's meta-step takes seconds on a CPU, so the checks share few runs.
"""

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from maml import core, evaluate, train
from maml.configs import ConfigError, validate
from maml.configs import omniglot as omniglot_configs
from maml.tasks import omniglot

TFDS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tfds"


def _tiny(cache_dir, **overrides):
    config = omniglot_configs.get_config("tiny")
    config.data_dir = str(TFDS_DIR)
    config.cache_dir = str(cache_dir)
    config.conv_impl = "lax"  # same numbers as the default; compiles faster on a CPU
    config.update(overrides)
    validate(config)
    return config


def _read_metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_omniglot_trains_resumes_and_evaluates(tmp_path, cache_dir, monkeypatch):
    splits = []  # which split each task family the run builds is drawn from

    def from_config(config, split):
        task = build(config, split)
        splits.append((split, task.images.shape[0]))
        return task

    build = omniglot.from_config
    monkeypatch.setattr(omniglot, "from_config", from_config)
    # Validation only at step 4: one compile of the validation curve, not two.
    config = _tiny(cache_dir, num_steps=2, eval_every=4)
    state = train.train_and_evaluate(config, tmp_path)
    assert int(state.step) == 2
    (first,) = _read_metrics(tmp_path)
    assert first["step"] == 2 and "val_accuracy" not in first
    assert math.isfinite(first["loss"]) and 0.0 <= first["accuracy"] <= 1.0
    assert train.checkpoint_manager(tmp_path).latest_step() == 2

    # The same run with a later end resumes from step 2: the first log line is
    # kept as written (a fresh start would rewrite the log).
    config.num_steps = 4
    state = train.train_and_evaluate(config, tmp_path)
    assert int(state.step) == 4
    records = _read_metrics(tmp_path)
    assert [r["step"] for r in records] == [2, 4]
    assert records[0] == first
    assert 0.0 <= records[1]["accuracy"] <= 1.0 and 0.0 <= records[1]["val_accuracy"] <= 1.0
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state.params))

    # Finn's split: meta-train on 1100 characters, validate on 100, test on 423.
    assert splits == 2 * [("train", 1100), ("validation", 100)]
    evaluation = evaluate.evaluate(config, tmp_path)
    assert splits[4:] == [("test", 423)]
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved == evaluation
    assert saved["metric"] == "accuracy" and saved["checkpoint_step"] == 4
    assert list(saved["results"]) == [str(k) for k in config.eval_shots] == ["1"]
    result = saved["results"]["1"]
    assert result["inner_steps"] == list(range(config.eval_inner_steps + 1))
    assert all(0.0 <= m <= 1.0 for m in result["mean"])
    assert (tmp_path / "plots" / "eval.png").is_file()
    # Trained on Finn's split: the background split's test characters are not held out.
    for other in ({"split_protocol": "background"}, {"split_seed": 2}):
        with pytest.raises(ConfigError, match="was trained on another split"):
            evaluate.evaluate(_tiny(cache_dir, **other), tmp_path)
        # Nor may a resume change it, even allowed: evaluation would then read the new
        # split from config.json and test on characters the checkpoints trained on.
        with pytest.raises(ConfigError, match="at step 4 trained on another split"):
            train.train_and_evaluate(_tiny(cache_dir, **other), tmp_path, allow_config_change=True)


def _is_norm(path) -> bool:
    return "norm" in jax.tree_util.keystr(path)


@pytest.mark.parametrize("adapt_norm", [False, True])
def test_adapt_norm_controls_batchnorm_in_the_inner_loop(cache_dir, adapt_norm):
    exp = train.build_experiment(_tiny(cache_dir, adapt_norm=adapt_norm), "train")
    episode = exp.task.sample(jax.random.key(0), 1)
    support = jax.tree.map(lambda a: a[0], episode["support"])
    params = exp.init_params

    @jax.jit  # one compile instead of op-by-op dispatch of the conv net's gradient
    def adapt(params, support, inner_lr):
        return core.adapt(exp.loss_fn, params, support, inner_lr=inner_lr, num_inner_steps=1)

    adapted = adapt(params, support, exp.inner_lr)
    before = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    after = jax.tree_util.tree_flatten_with_path(adapted)[0]
    norm_leaves = [path for path, _ in after if _is_norm(path)]
    assert len(norm_leaves) == 8  # scale and offset of 4 blocks
    for path, leaf in after:
        changed = not np.array_equal(leaf, before[path])
        if _is_norm(path):
            assert changed == adapt_norm, jax.tree_util.keystr(path)
        elif "kernel" in jax.tree_util.keystr(path):
            assert changed, jax.tree_util.keystr(path)


@pytest.mark.parametrize(
    "algorithm, adapt_norm", [("fomaml", True), ("imaml", True), ("imaml", False)]
)
def test_other_algorithms_train_without_nans(cache_dir, algorithm, adapt_norm):
    config = _tiny(cache_dir, algorithm=algorithm, adapt_norm=adapt_norm)
    exp = train.build_experiment(config, "train")
    train_key, _ = train.root_keys(exp.config.seed)
    init = train.init_state(exp)
    initial_params = jax.tree.map(np.asarray, init.params)  # init's buffers are donated
    state, metrics = train.make_train_chunk(exp, train_key)(init, 2)
    assert int(state.step) == 2
    for name, values in metrics.items():
        assert np.all(np.isfinite(values)), name
    leaves = jax.tree.leaves(state.params)
    assert all(np.all(np.isfinite(leaf)) for leaf in leaves)
    assert any(
        not np.allclose(a, b) for a, b in zip(jax.tree.leaves(initial_params), leaves, strict=True)
    )
