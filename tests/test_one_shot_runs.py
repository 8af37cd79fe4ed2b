"""Tests for the evaluation on Lake et al.'s 20 one-shot runs and its script.

The preprocessed Omniglot cache is built once per session into a pytest
temporary directory from the prepared TFDS data in ``../shared/data/tfds``,
as in ``test_omniglot.py``; tests needing the data or the runs skip without them.
"""

import json
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from maml import core, one_shot_runs, train
from maml.configs import omniglot as omniglot_configs
from maml.tasks import omniglot

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
TFDS_DIR = SHARED_DATA / "tfds"
RUNS_ZIP = SHARED_DATA / "omniglot_one_shot_runs" / "all_runs.zip"
CONFIG = str(ROOT / "maml" / "configs" / "omniglot.py")
SCRIPT = str(ROOT / "scripts" / "evaluate_one_shot_runs.py")


@pytest.fixture(scope="session")
def runs():
    if not RUNS_ZIP.is_file():
        pytest.skip(f"{RUNS_ZIP} not found")
    return omniglot.load_one_shot_runs(RUNS_ZIP)


def _config(cache_dir, variant="20way1shot,background"):
    config = omniglot_configs.get_config(variant)
    config.data_dir = str(TFDS_DIR)
    config.cache_dir = str(cache_dir)
    config.conv_impl = "lax"  # same numbers as the default; compiles faster on a CPU
    return config


# --------------------------------------------------------------------------------------
# Scoring, without a conv net.


def test_item_errors_known_logits():
    labels = jnp.array([3, 0, 19, 7])
    perfect = jax.nn.one_hot(labels, 20) * 5.0
    np.testing.assert_array_equal(one_shot_runs.item_errors(perfect, labels), [0, 0, 0, 0])
    np.testing.assert_array_equal(one_shot_runs.item_errors(perfect, (labels + 1) % 20), 1.0)
    half = perfect.at[1].set(jax.nn.one_hot(5, 20)).at[2].set(jax.nn.one_hot(0, 20))
    np.testing.assert_array_equal(one_shot_runs.item_errors(half, labels), [0, 1, 1, 0])
    # A tie for the largest logit or a NaN is wrong, even for the first class.
    for logits in (jnp.zeros((4, 20)), jnp.full((4, 20), jnp.nan)):
        np.testing.assert_array_equal(one_shot_runs.item_errors(logits, labels), 1.0)
    tied = perfect.at[0, 5].set(5.0)  # label 3 ties with class 5
    np.testing.assert_array_equal(one_shot_runs.item_errors(tied, labels), [1, 0, 0, 0])


def _label_in_pixel_runs(num_runs=3, num_ways=20):
    """Runs whose images carry their label in pixel (0, 0), queries in shuffled order."""
    rng = np.random.default_rng(0)
    runs = []
    for r in range(num_runs):
        labels = rng.permutation(num_ways).astype(np.int32)
        support = np.zeros((num_ways, 28, 28, 1), np.float32)
        support[:, 0, 0, 0] = np.arange(num_ways) / num_ways
        query = np.zeros((num_ways, 28, 28, 1), np.float32)
        query[:, 0, 0, 0] = labels / num_ways
        runs.append(
            {
                "name": f"run{r + 1:02d}",
                "support": support,
                "support_labels": np.arange(num_ways, dtype=np.int32),
                "query": query,
                "query_labels": labels,
            }
        )
    return runs


def _pixel_reader(num_outputs=20):
    """A "cheating" model that reads the label from pixel (0, 0): a perfect predictor."""

    def apply_fn(params, x):
        label = jnp.rint(x[:, 0, 0, 0] * num_outputs).astype(jnp.int32)
        return params["scale"] * jax.nn.one_hot(label, num_outputs)

    def loss_fn(params, batch):
        x, y = batch
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, x), y))

    return types.SimpleNamespace(apply_fn=apply_fn, loss_fn=loss_fn)


def test_perfect_predictor_scores_zero_and_shuffled_labels_score_one():
    exp = _pixel_reader()
    params = {"scale": jnp.array(3.0)}
    runs = _label_in_pixel_runs()
    result = one_shot_runs.evaluate_runs(exp, params, runs, inner_lr=0.1, num_inner_steps=2)
    assert result["inner_steps"] == [0, 1, 2]
    assert result["error"] == [0.0, 0.0, 0.0]
    assert result["num_runs"] == 3 and result["num_items"] == 60
    assert list(result["runs"]) == ["run01", "run02", "run03"]
    assert result["published"] == {"people": 0.045, "Bayesian Program Learning": 0.033}
    # Query labels that no longer match the images: every item wrong.
    for run in runs:
        run["query_labels"] = (run["query_labels"] + 1) % 20
    result = one_shot_runs.evaluate_runs(exp, params, runs, inner_lr=0.1, num_inner_steps=0)
    assert result["error"] == [1.0]


def test_evaluate_runs_rejects_a_model_that_is_not_20_way():
    with pytest.raises(ValueError, match="20-way, but the model has 5 outputs"):
        one_shot_runs.evaluate_runs(
            _pixel_reader(5),
            {"scale": jnp.array(1.0)},
            _label_in_pixel_runs(1),
            inner_lr=0.1,
            num_inner_steps=1,
        )


def test_inner_rates_keep_frozen_leaves_frozen():
    config = omniglot_configs.get_config("20way1shot")
    apply_fn, params = train.build_model(config, 0)
    exp = train.Experiment(config, apply_fn, params, None, None, None)
    assert exp.inner_rates(0.3) == 0.3
    config.adapt_norm = False
    rates = exp.inner_rates(0.3)
    flat = jax.tree_util.tree_flatten_with_path(rates)[0]
    assert {rate for path, rate in flat if "norm" in jax.tree_util.keystr(path)} == {0.0}
    assert {rate for path, rate in flat if "norm" not in jax.tree_util.keystr(path)} == {0.3}


# --------------------------------------------------------------------------------------
# An untrained 20-way ConvNet on the real runs.


def test_untrained_convnet_on_the_runs(cache_dir, runs):
    exp = train.build_experiment(_config(cache_dir), "test")
    result = one_shot_runs.evaluate_runs(
        exp, exp.init_params, runs, inner_lr=0.1, num_inner_steps=1
    )
    assert result["num_runs"] == 20 and result["num_items"] == 400
    assert len(result["runs"]) == 20 and result["inner_steps"] == [0, 1]
    for errors in [result["error"], *result["runs"].values()]:
        assert len(errors) == 2 and all(0.0 <= e <= 1.0 for e in errors)
    per_run = np.array(list(result["runs"].values()))  # (20 runs, 2 steps)
    np.testing.assert_allclose(per_run * 20, np.rint(per_run * 20), atol=1e-4)  # k of 20 items
    np.testing.assert_allclose(result["error"], np.mean(list(result["runs"].values()), 0))
    # Run 1 after one step, computed directly: adapt on its 20 training images,
    # then classify its 20 test images as one batch.
    run = runs[0]
    support = (jnp.asarray(run["support"]), jnp.asarray(run["support_labels"]))
    adapted = core.adapt(exp.loss_fn, exp.init_params, support, inner_lr=0.1, num_inner_steps=1)
    predictions = np.argmax(exp.apply_fn(adapted, jnp.asarray(run["query"])), -1)
    expected = float(np.mean(predictions != np.asarray(run["query_labels"])))
    assert result["runs"][run["name"]][1] == pytest.approx(expected, abs=1e-6)


# --------------------------------------------------------------------------------------
# The script.


def _run_script(*args):
    return subprocess.run(
        [sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def test_script_requires_20_ways(tmp_path):
    result = _run_script(f"--config={CONFIG}:5way1shot,background", f"--workdir={tmp_path}")
    assert result.returncode == 2
    assert "config.num_ways=5 is invalid" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_script_without_checkpoint(tmp_path, cache_dir, runs):
    result = _run_script(
        f"--config={CONFIG}:20way1shot,background",
        f"--config.data_dir={TFDS_DIR}",
        f"--config.cache_dir={cache_dir}",
        f"--workdir={tmp_path}",
        f"--runs={RUNS_ZIP}",
    )
    assert result.returncode == 2
    assert "no checkpoint" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_script_writes_json_and_warns_about_the_split(tmp_path, cache_dir, runs):
    # An untrained checkpoint is enough to exercise restore, evaluation and output.
    exp = train.build_experiment(_config(cache_dir), "test")
    manager = train.checkpoint_manager(tmp_path)
    manager.save(0, args=ocp.args.StandardSave(train.init_state(exp)))
    manager.wait_until_finished()
    result = _run_script(
        f"--config={CONFIG}:20way1shot",  # Finn's split: the runs' alphabets were trained on
        f"--config.data_dir={TFDS_DIR}",
        f"--config.cache_dir={cache_dir}",
        "--config.conv_impl=lax",
        "--config.eval_inner_steps=1",
        "--config.eval_report_step=1",
        f"--workdir={tmp_path}",
        f"--runs={RUNS_ZIP}",
    )
    assert result.returncode == 0, result.stderr
    assert "warning: config.split_protocol='finn'" in result.stderr
    assert "people 4.5%" in result.stdout and "Bayesian Program Learning 3.3%" in result.stdout
    saved = json.loads((tmp_path / "one_shot_runs.json").read_text())
    assert saved["checkpoint_step"] == 0 and saved["inner_steps"] == [0, 1]
    assert saved["report_step"] == 1 and saved["inner_lr"] == 0.1
    assert saved["num_items"] == 400 and len(saved["runs"]) == 20
    assert saved["published"] == one_shot_runs.PUBLISHED_ERROR
    assert all(0.0 <= e <= 1.0 for e in saved["error"])
