"""Tests for the evaluation on Lake et al.'s 20 one-shot runs and its script.

The preprocessed Omniglot cache is built once per session into a pytest
temporary directory from the prepared TFDS data in ``../shared/data/tfds``,
as in ``test_omniglot.py``; tests needing the data or the runs skip without them.
"""

import json
import subprocess
import sys
import types
import zipfile
import zlib
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


def _label_in_pixel_runs(num_runs=3, num_ways=20, support_offset=0.0):
    """Runs whose images carry their label in pixel (0, 0) (support images plus
    ``support_offset``), queries in shuffled order."""
    rng = np.random.default_rng(0)
    runs = []
    for r in range(num_runs):
        labels = rng.permutation(num_ways).astype(np.int32)
        support = np.zeros((num_ways, 28, 28, 1), np.float32)
        support[:, 0, 0, 0] = np.arange(num_ways) / num_ways + support_offset
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


def test_runs_are_adapted_at_the_inner_lr_given():
    # scale 0: every logit tied, every item wrong; one inner step at lr 0.1 fixes that.
    exp, runs, params = _pixel_reader(), _label_in_pixel_runs(), {"scale": jnp.array(0.0)}
    adapted = one_shot_runs.evaluate_runs(exp, params, runs, inner_lr=0.1, num_inner_steps=1)
    frozen = one_shot_runs.evaluate_runs(exp, params, runs, inner_lr=0.0, num_inner_steps=1)
    assert adapted["error"] == [1.0, 0.0] and frozen["error"] == [1.0, 1.0]


def test_runs_are_adapted_by_proximal_steps_when_asked(monkeypatch):
    # eval_proximal_lambda reaches the inner loop (core.adaptation_trajectory's own
    # test checks its steps against imaml.adapt_proximal's).
    from maml import core

    seen, trajectory = [], core.adaptation_trajectory

    def spy(*args, **kwargs):
        seen.append(kwargs.get("proximal_lambda", 0.0))
        return trajectory(*args, **kwargs)

    monkeypatch.setattr(core, "adaptation_trajectory", spy)
    exp, runs, params = _pixel_reader(), _label_in_pixel_runs(), {"scale": jnp.array(0.0)}
    one_shot_runs.evaluate_runs(exp, params, runs, inner_lr=0.1, num_inner_steps=1)
    one_shot_runs.evaluate_runs(
        exp, params, runs, inner_lr=0.1, num_inner_steps=1, proximal_lambda=2.0
    )
    assert seen == [0.0, 2.0]


def test_each_runs_queries_are_one_batch():
    # A model that reads the label from pixel (0, 0) relative to its batch's mean,
    # like transductive BatchNorm: right only when a batch holds exactly one run's
    # 20 queries. Scoring each query alone puts every prediction at label 10, and
    # batching the queries with the support images (offset by 0.5) shifts them by 5.
    def apply_fn(params, x):
        centered = x[:, 0, 0, 0] - jnp.mean(x[:, 0, 0, 0])
        label = jnp.rint(centered * 20 + 9.5).astype(jnp.int32)
        return params["scale"] * jax.nn.one_hot(label, 20)

    def loss_fn(params, batch):
        x, y = batch
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, x), y))

    exp = types.SimpleNamespace(apply_fn=apply_fn, loss_fn=loss_fn)
    runs = _label_in_pixel_runs(num_runs=2, support_offset=0.5)
    params = {"scale": jnp.array(3.0)}
    result = one_shot_runs.evaluate_runs(exp, params, runs, inner_lr=0.1, num_inner_steps=1)
    assert result["error"] == [0.0, 0.0]
    # The same model does see the difference: the queries one at a time are mostly wrong.
    one_at_a_time = [apply_fn(params, runs[0]["query"][i : i + 1]) for i in range(20)]
    assert (
        np.mean(one_shot_runs.item_errors(jnp.concatenate(one_at_a_time), runs[0]["query_labels"]))
        > 0.9
    )


def test_ci95_is_over_runs():
    exp = _pixel_reader()
    runs = _label_in_pixel_runs(num_runs=4)
    for run, wrong in zip(runs, (0, 2, 4, 10), strict=True):
        run["query_labels"][:wrong] = (run["query_labels"][:wrong] + 1) % 20
    result = one_shot_runs.evaluate_runs(exp, {"scale": 3.0}, runs, inner_lr=0.1, num_inner_steps=0)
    per_run = np.array([0, 2, 4, 10]) / 20
    assert list(result["runs"]) == ["run01", "run02", "run03", "run04"]
    np.testing.assert_allclose(list(result["runs"].values()), per_run[:, None], rtol=1e-6)
    np.testing.assert_allclose(result["error"], [per_run.mean()], rtol=1e-6)
    # Student's t with 3 degrees of freedom (3.182) and ddof=1: 1.96 and ddof=0 would
    # claim 95% for what covers 81% with 4 runs (93% with Lake's 20).
    np.testing.assert_allclose(result["ci95"], [3.1824463 * per_run.std(ddof=1) / 2], rtol=1e-6)
    assert "20.0% +- " in one_shot_runs.format_table(result)


def test_ci95_over_runs_has_95_percent_coverage_with_20_runs():
    """Normal per-run errors, 20 runs: the half-width covers the true mean 95% of the
    time (1.96 std / sqrt(20), ddof=0, would cover 92.9%); one run has none."""
    rng = np.random.default_rng(0)
    per_run = rng.normal(0.2, 0.1, (20_000, 20))
    covered = np.abs(per_run.mean(-1) - 0.2) <= one_shot_runs.ci95_over_runs(per_run)
    assert abs(covered.mean() - 0.95) < 0.006  # the binomial std of the estimate is 0.0015
    assert np.isnan(one_shot_runs.ci95_over_runs(np.array([[0.3]]))).all()


def _runs_zip(tmp_path, damage):
    """Run 1 of Lake's runs as a zip of its own, with one kind of damage."""
    if not RUNS_ZIP.is_file():
        pytest.skip(f"{RUNS_ZIP} not found")
    with zipfile.ZipFile(RUNS_ZIP) as source:
        files = {n: source.read(n) for n in source.namelist() if n.startswith("run01/")}
    labels = files["run01/class_labels.txt"].decode().splitlines()
    if damage == "png_chunk":
        png = bytearray(files["run01/test/item01.png"])
        png[png.index(b"IDAT") - 1] ^= 0x55  # the chunk's length: PIL raises SyntaxError
        files["run01/test/item01.png"] = bytes(png)
    elif damage == "missing_line":
        files["run01/class_labels.txt"] = "\n".join(labels[:-1]).encode()
    elif damage == "unknown_class":
        labels[0] = labels[0].split()[0] + " run01/training/class99.png"
        files["run01/class_labels.txt"] = "\n".join(labels).encode()
    elif damage == "missing_file":
        del files["run01/test/item01.png"]
    path = tmp_path / "runs.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    if damage == "deflate":
        # Flip bytes of a member's compressed data until zlib itself fails
        # (most flips are caught by the CRC check instead: BadZipFile).
        info = zipfile.ZipFile(path).getinfo("run01/class_labels.txt")
        start = info.header_offset + 30 + len(info.filename) + len(info.extra)
        clean = path.read_bytes()
        for offset in range(start, start + info.compress_size):
            data = bytearray(clean)
            data[offset] ^= 0xFF
            path.write_bytes(data)
            try:
                zipfile.ZipFile(path).read(info.filename)
            except zlib.error:
                break
            except zipfile.BadZipFile:
                pass
        else:
            pytest.fail("no single-byte flip made zlib fail")
    return path


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("none", None),
        ("png_chunk", "run01: broken PNG file"),
        ("deflate", "run01: Error -3 while decompressing"),
        ("missing_line", "run01: 20 training classes and 19 test items, expected 20 of each"),
        ("unknown_class", "run01: class_labels.txt names 'run01/training/class99.png'"),
        ("missing_file", "run01: .*item01.png"),
    ],
)
def test_damaged_runs_fail_with_the_run_named(tmp_path, damage, message):
    path = _runs_zip(tmp_path, damage)
    if message is None:
        (run,) = omniglot.load_one_shot_runs(path)
        assert run["name"] == "run01" and run["query"].shape == (20, 28, 28, 1)
        return
    with pytest.raises(ValueError, match=message):
        omniglot.load_one_shot_runs(path)


def test_no_runs_is_a_clear_error():
    with pytest.raises(ValueError, match="no one-shot runs to evaluate"):
        one_shot_runs.stack_runs([])


@pytest.mark.parametrize("num_outputs", [5, 25])
def test_evaluate_runs_rejects_a_model_that_is_not_20_way(num_outputs):
    with pytest.raises(ValueError, match=f"20-way, but the model has {num_outputs} outputs"):
        one_shot_runs.evaluate_runs(
            _pixel_reader(num_outputs),
            {"scale": jnp.array(1.0)},
            _label_in_pixel_runs(1),
            inner_lr=0.1,
            num_inner_steps=1,
        )


def test_table_shows_the_ci_and_each_run_at_the_report_step():
    result = {
        "num_runs": 2,
        "num_items": 40,
        "inner_steps": [0, 1, 2],
        "error": [0.5, 0.25, 0.1],
        "ci95": [0.03, 0.02, 0.01],
        "runs": {"run01": [0.5, 0.3, 0.1], "run02": [0.5, 0.2, 0.1]},
        "published": {},
        "published_source": "x",
    }
    table = one_shot_runs.format_table(result, report_step=1)
    assert "50.0% +-  3.0" in table and "25.0% +-  2.0  <- report step" in table
    assert "per run after 1 step" in table and "run01   30%" in table
    # As evaluate.py's table: one adapted by iMAML's proximal steps says so.
    assert "proximal" not in table
    assert "proximal" not in one_shot_runs.format_table({**result, "proximal_lambda": 0.0})
    proximal = one_shot_runs.format_table({**result, "proximal_lambda": 2.5})
    assert proximal.endswith("adapted by iMAML's proximal steps (lambda 2.5), not plain SGD")


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

    @jax.jit  # one compile instead of seconds of op-by-op dispatch of the conv net's gradient
    def predict(params, support, query):
        adapted = core.adapt(exp.loss_fn, params, support, inner_lr=0.1, num_inner_steps=1)
        return jnp.argmax(exp.apply_fn(adapted, query), -1)

    predictions = np.asarray(predict(exp.init_params, support, jnp.asarray(run["query"])))
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


def test_script_with_damaged_runs(tmp_path):
    # The runs are read before the checkpoint: an empty workdir is enough.
    path = _runs_zip(tmp_path, "png_chunk")
    result = _run_script(
        f"--config={CONFIG}:20way1shot,background", f"--workdir={tmp_path}", f"--runs={path}"
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(
        f"error: cannot read the one-shot runs in {path} (run01: broken PNG"
    )
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
    (tmp_path / "config.json").write_text('{"adapt_norm": false}')  # trained without
    result = _run_script(
        f"--config={CONFIG}:20way1shot",  # Finn's split: the runs' alphabets were trained on
        f"--config.data_dir={TFDS_DIR}",
        f"--config.cache_dir={cache_dir}",
        "--config.conv_impl=lax",
        "--config.eval_inner_steps=2",  # the first proximal step is plain SGD's
        "--config.eval_report_step=1",
        "--config.eval_proximal_lambda=20",
        f"--workdir={tmp_path}",
        f"--runs={RUNS_ZIP}",
    )
    assert result.returncode == 0, result.stderr
    assert "warning: config.split_protocol='finn'" in result.stderr
    assert "warning: evaluating with settings other than" in result.stderr
    assert "people 4.5%" in result.stdout and "Bayesian Program Learning 3.3%" in result.stdout
    assert result.stdout.rstrip().endswith("proximal steps (lambda 20), not plain SGD")
    saved = json.loads((tmp_path / "one_shot_runs.json").read_text())
    assert saved["checkpoint_step"] == 0 and saved["inner_steps"] == [0, 1, 2]
    assert saved["report_step"] == 1 and saved["inner_lr"] == 0.1
    assert saved["proximal_lambda"] == 20
    # The errors are the proximal steps' (recording the lambda alone passed with plain SGD).
    params = train.init_state(exp).params  # the checkpoint's
    proximal, plain = (
        one_shot_runs.evaluate_runs(
            exp, params, runs, inner_lr=0.1, num_inner_steps=2, proximal_lambda=lam
        )["error"]
        for lam in (20.0, 0.0)
    )
    assert saved["error"] == pytest.approx(proximal) and proximal[2] != plain[2]
    assert saved["config_changes"] == ["adapt_norm False -> True"]
    assert saved["num_items"] == 400 and len(saved["runs"]) == 20
    assert saved["published"] == one_shot_runs.PUBLISHED_ERROR
    assert all(0.0 <= e <= 1.0 for e in saved["error"])


def test_script_prints_its_table_before_a_write_that_fails(tmp_path, cache_dir, runs):
    exp = train.build_experiment(_config(cache_dir), "test")
    with train.checkpoint_manager(tmp_path) as manager:
        manager.save(0, args=ocp.args.StandardSave(train.init_state(exp)))
    (tmp_path / "config.json").write_text(_config(cache_dir).to_json_best_effort())
    (tmp_path / "one_shot_runs.json").mkdir()  # the write fails, as on a full disk
    result = _run_script(
        f"--config={CONFIG}:20way1shot,background",
        # Lake's runs and the checkpoint are all it reads: no Omniglot dataset or cache.
        f"--config.data_dir={tmp_path / 'no_data'}",
        f"--config.cache_dir={tmp_path / 'no_cache'}",
        "--config.conv_impl=lax",
        "--config.eval_inner_steps=0",
        "--config.eval_report_step=0",
        f"--workdir={tmp_path}",
        f"--runs={RUNS_ZIP}",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "people 4.5%" in result.stdout  # the result is on the screen, not lost
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "one_shot_runs.json" in line
