"""Meta-training end to end on tiny configs: learning, resuming, evaluating."""

import errno
import json
import os
import re
import shutil
import signal
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from maml import analysis, core, evaluate, imaml, plots, train
from maml.configs import ConfigError, sinusoid, validate
from maml.configs import omniglot as omniglot_configs
from maml.tasks.omniglot import Omniglot
from maml.tasks.sinusoid import Sinusoid


def tiny(**overrides):
    config = sinusoid.get_config("tiny")
    config.update(overrides)
    return config


@pytest.fixture
def ctrl_c():
    """Python's own SIGINT handler (KeyboardInterrupt), for a test that raises SIGINT: a
    pytest started in the background by a non-interactive shell (``pytest &`` in a
    script) inherits SIGINT ignored, and the signal did nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_training_lowers_post_adaptation_loss(tmp_path):
    config = tiny(num_steps=300, log_every=100, checkpoint_every=300)
    exp = train.build_experiment(config)
    key = jax.random.key(123)
    curve = train.make_adaptation_curve(
        exp, exp.task, inner_lr=config.inner_lr, num_inner_steps=1, batch_size=200
    )
    before = curve(exp.init_params, key, num_tasks=200)
    state = train.train_and_evaluate(config, tmp_path)
    after = curve(state.params, key, num_tasks=200)
    assert after[1].mean() < 0.7 * before[1].mean()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [100, 200, 300]
    assert (tmp_path / "plots" / "adaptation.png").stat().st_size > 0
    assert (tmp_path / "plots" / "training.png").stat().st_size > 0


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "pretrain", "imaml"])
def test_each_algorithm_takes_its_own_meta_gradient(algorithm):
    # Training's inner settings, all distinct from the evaluation's and from 1 step.
    config = tiny(
        algorithm=algorithm,
        inner_lr=0.03,
        eval_inner_lr=0.5,
        num_inner_steps=2,
        imaml_lambda=0.7,
        imaml_cg_steps=3,
        imaml_cg_damping=0.5,
        imaml_lam_damping=2.0,
    )
    exp = train.build_experiment(config)
    episode = exp.task.sample(jax.random.key(1), 4)
    support, query = episode["support"], episode["query"]
    _, metrics, grads = train.meta_loss_and_grad(exp, exp.init_params, episode)
    # iMAML's metric is how well CG solved for its gradient; the others', the query's.
    assert set(metrics) == ({"cg_residual"} if algorithm == "imaml" else {"mse"})
    if algorithm == "imaml":
        assert 0 < metrics["cg_residual"] < np.inf

    def maml_grad(first_order, num_inner_steps):
        return jax.grad(core.batched_meta_loss, argnums=1)(
            exp.loss_fn,
            exp.init_params,
            support,
            query,
            inner_lr=0.03,
            num_inner_steps=num_inner_steps,
            first_order=first_order,
        )

    kinds = {
        "maml": maml_grad(False, 2),
        "fomaml": maml_grad(True, 2),
        "pretrain": maml_grad(False, 0),
        "imaml": imaml.batched_imaml_loss_and_grad(
            exp.loss_fn,
            exp.init_params,
            support,
            query,
            inner_lr=0.03,
            num_inner_steps=2,
            lam=0.7,
            num_cg_steps=3,
            cg_damping=0.5,
            lam_damping=2.0,
        )[1],
    }
    for name, other in kinds.items():
        same = all(
            np.allclose(a, b, rtol=1e-5, atol=1e-7)
            for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(other), strict=True)
        )
        assert same == (name == algorithm), name  # its own gradient and no other's


def test_meta_loss_and_metrics_are_means_over_the_tasks():
    exp = train.build_experiment(tiny(num_inner_steps=2))
    episode = exp.task.sample(jax.random.key(3), 4)
    loss, metrics, _ = jax.jit(lambda e: train.meta_loss_and_grad(exp, exp.init_params, e))(episode)
    one_task = jax.jit(  # compiled once, called task by task
        lambda support, query: train.task_loss_and_metrics(
            exp, exp.init_params, support, query, num_inner_steps=2
        )
    )
    per_task = [
        one_task(*jax.tree.map(lambda a, t=t: a[t], (episode["support"], episode["query"])))
        for t in range(4)
    ]
    losses = [float(task_loss) for task_loss, _ in per_task]
    assert np.std(losses) > 0.1 * np.mean(losses)  # else any one task would pass
    assert float(loss) == pytest.approx(np.mean(losses), rel=1e-5)
    expected_mse = np.mean([float(task_metrics["mse"]) for _, task_metrics in per_task])
    assert float(metrics["mse"]) == pytest.approx(expected_mse, rel=1e-5)


@pytest.mark.parametrize("algorithm", ["fomaml", "pretrain"])
def test_other_algorithms_train(tmp_path, algorithm):
    state = train.train_and_evaluate(
        tiny(num_steps=50, checkpoint_every=50, algorithm=algorithm), tmp_path
    )
    assert int(state.step) == 50
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state.params))


def test_resume_equals_uninterrupted(tmp_path):
    full = train.train_and_evaluate(tiny(), tmp_path / "full")
    # A run stopped at step 100 (its last checkpoint), then the same command again.
    train.train_and_evaluate(tiny(num_steps=100), tmp_path / "resumed")
    resumed = train.train_and_evaluate(tiny(), tmp_path / "resumed")
    assert int(resumed.step) == int(full.step) == 200
    jax.tree.map(np.testing.assert_array_equal, resumed.params, full.params)
    jax.tree.map(np.testing.assert_array_equal, resumed.opt_state, full.opt_state)
    log = lambda d: (tmp_path / d / "metrics.jsonl").read_text().splitlines()  # noqa: E731
    strip = lambda lines: [{k: v for k, v in json.loads(s).items() if k != "wall_s"} for s in lines]  # noqa: E731
    assert strip(log("full")) == strip(log("resumed"))


# Step 150 falls between checkpoints (every 100); step 100 was saved just before the interrupt.
@pytest.mark.parametrize("stop", [150, 100])
def test_ctrl_c_saves_the_last_step_and_resumes_bit_for_bit(tmp_path, monkeypatch, capsys, stop):
    full = train.train_and_evaluate(tiny(), tmp_path / "full")

    class InterruptedBar(train.tqdm):
        updates = 0

        def update(self, n=1):
            super().update(n)
            InterruptedBar.updates += 1
            if InterruptedBar.updates == stop // 50:  # one update per 50-step chunk
                raise KeyboardInterrupt

    monkeypatch.setattr(train, "tqdm", InterruptedBar)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(tiny(), tmp_path / "resumed")
    assert f"interrupted: saved a checkpoint at step {stop}" in capsys.readouterr().err
    saved = sorted(int(p.name) for p in (tmp_path / "resumed" / "checkpoints").iterdir())
    assert saved[-1] == stop
    assert (tmp_path / "resumed" / "plots" / "training.png").stat().st_size > 0
    # As if the first session had taken 1000 s: wall_s counts on across the resume,
    # from the last value that is a number (not a hand-edited one).
    path = tmp_path / "resumed" / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[-2]["wall_s"], records[-1]["wall_s"] = 1000.0, "1.5s"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.undo()
    resumed = train.train_and_evaluate(tiny(), tmp_path / "resumed")
    assert f"resuming from the checkpoint at step {stop}" in capsys.readouterr().err
    jax.tree.map(np.testing.assert_array_equal, resumed.params, full.params)
    after = [json.loads(line) for line in path.read_text().splitlines()][len(records) :]
    assert after and all(1000.0 < r["wall_s"] < 1100.0 for r in after)


def test_ctrl_c_inside_the_chunk_call_after_donation_loses_nothing(
    tmp_path, monkeypatch, capsys, ctrl_c
):
    # The chunk donates the old state; a Ctrl-C delivered before its result is
    # assigned must wait for the assignment, else nothing is left to save.
    full = train.train_and_evaluate(tiny(), tmp_path / "full")
    make_chunk, donated = train.make_train_chunk, []

    def make_interrupted_chunk(*args, **kwargs):
        chunk, calls = make_chunk(*args, **kwargs), []

        def interrupted(state, num):
            new = chunk(state, num)
            calls.append(None)
            if len(calls) == 3:  # after steps 100..150, which took the step-100 state
                donated.extend(leaf.is_deleted() for leaf in jax.tree.leaves(state))
                signal.raise_signal(signal.SIGINT)
            return new

        return interrupted

    monkeypatch.setattr(train, "make_train_chunk", make_interrupted_chunk)
    # No checkpoint at 100: saving one holds the buffers, which are then copied, not donated.
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(tiny(checkpoint_every=200), tmp_path / "resumed")
    assert "interrupted: saved a checkpoint at step 150" in capsys.readouterr().err
    assert donated and all(donated)
    monkeypatch.undo()
    resumed = train.train_and_evaluate(tiny(checkpoint_every=200), tmp_path / "resumed")
    jax.tree.map(np.testing.assert_array_equal, resumed.params, full.params)


# Validations at 50, 100, 150, 200 (the last step); checkpoints every 100.
@pytest.mark.parametrize("stop", [150, 200])
def test_ctrl_c_during_validation_validates_on_resuming(tmp_path, monkeypatch, capsys, stop):
    def config():
        return tiny(eval_every=50, num_val_tasks=4)

    train.train_and_evaluate(config(), tmp_path / "full")
    make_curve, calls = train.make_adaptation_curve, []

    def make_interrupted_curve(*args, **kwargs):
        validate = make_curve(*args, **kwargs)

        def interrupted(*args, **kwargs):
            calls.append(None)
            if len(calls) == stop // 50:
                raise KeyboardInterrupt
            return validate(*args, **kwargs)

        return interrupted

    monkeypatch.setattr(train, "make_adaptation_curve", make_interrupted_curve)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config(), tmp_path / "resumed")
    monkeypatch.undo()

    def records(run):
        return [json.loads(s) for s in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    last = records("resumed")[-1]
    # The chunk's line, without its validation.
    assert last["step"] == stop and "val_mse" not in last
    capsys.readouterr()
    runs = "full", "resumed"
    train.train_and_evaluate(config(), tmp_path / "resumed")
    assert f"step {stop} (validating it first" in capsys.readouterr().err
    # The same log, validations included, and the same best checkpoint.
    assert [{k: v for k, v in r.items() if k != "wall_s"} for r in records("resumed")] == [
        {k: v for k, v in r.items() if k != "wall_s"} for r in records("full")
    ]
    best = [sorted(p.name for p in (tmp_path / r / "best_checkpoint").iterdir()) for r in runs]
    assert best[0] == best[1]
    # Validated once: a rerun finds nothing to train.
    train.train_and_evaluate(config(), tmp_path / "resumed")
    assert "nothing to train" in capsys.readouterr().err


def test_checkpoint_managers_close_however_training_ends(tmp_path, monkeypatch):
    closed, close = [], train.ocp.CheckpointManager.close

    def counting_close(self):
        closed.append(self.directory.name)
        close(self)

    monkeypatch.setattr(train.ocp.CheckpointManager, "close", counting_close)
    train.train_and_evaluate(tiny(num_steps=50, eval_every=50, num_val_tasks=4), tmp_path)
    assert sorted(closed) == ["best_checkpoint", "checkpoints"]
    with pytest.raises(ConfigError):  # a refused resume
        train.train_and_evaluate(tiny(num_steps=100, outer_lr=0.5), tmp_path)
    assert sorted(closed[2:]) == ["checkpoints"]
    train.restore_params(tiny(), tmp_path)
    assert closed[-1] == "checkpoints" and len(closed) == 4


def test_resume_drops_log_lines_past_the_checkpoint(tmp_path):
    config = tiny(num_steps=100)
    train.train_and_evaluate(config, tmp_path)
    with (tmp_path / "metrics.jsonl").open("a") as f:  # a line the checkpoint never saw
        f.write(json.dumps({"step": 150, "loss": 0.0}) + "\n")
    train.train_and_evaluate(tiny(), tmp_path)
    steps = [json.loads(s)["step"] for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [50, 100, 150, 200]


def test_a_run_saves_its_last_step_and_a_fresh_start_its_own_log_only(tmp_path):
    # 50 steps, checkpoint_every 100: the end is saved all the same.
    train.train_and_evaluate(tiny(num_steps=50), tmp_path)
    with train.checkpoint_manager(tmp_path) as manager:
        assert manager.latest_step() == 50
    # Without checkpoints the run starts afresh: the old log describes no checkpoint.
    shutil.rmtree(tmp_path / "checkpoints")
    train.train_and_evaluate(tiny(num_steps=50), tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [50]


def test_resume_refuses_other_training_settings_unless_allowed(tmp_path, capsys):
    train.train_and_evaluate(tiny(num_steps=100), tmp_path)
    saved = (tmp_path / "config.json").read_text()
    with pytest.raises(ConfigError, match=r"step 100 with other settings \(meta_batch_size 4 -> 8"):
        train.train_and_evaluate(tiny(meta_batch_size=8), tmp_path)
    with pytest.raises(ConfigError, match=r"other settings \(seed 0 -> 1"):  # another task stream
        train.train_and_evaluate(tiny(seed=1), tmp_path)
    # A change that reshapes the model is named too, not only its first array...
    with pytest.raises(ConfigError, match=r"settings \(hidden_sizes \[40, 40\] -> \[20, 20\]"):
        train.train_and_evaluate(tiny(hidden_sizes=(20, 20)), tmp_path)
    # ... and, allowed, its checkpoint cannot be restored: config.json stays the run's.
    with pytest.raises(train.CheckpointError, match="from another config: params/layers/0"):
        train.train_and_evaluate(tiny(hidden_sizes=(20, 20)), tmp_path, allow_config_change=True)
    assert (tmp_path / "config.json").read_text() == saved
    # How long, how often and where may change without leave.
    train.train_and_evaluate(tiny(num_steps=150, log_every=25, checkpoint_every=50), tmp_path)
    state = train.train_and_evaluate(tiny(outer_lr=1e-4), tmp_path, allow_config_change=True)
    assert int(state.step) == 200
    assert "resuming with outer_lr 0.001 -> 0.0001" in capsys.readouterr().err
    assert json.loads((tmp_path / "config.step150.json").read_text())["outer_lr"] == 1e-3
    assert json.loads((tmp_path / "config.json").read_text())["outer_lr"] == 1e-4
    # Nothing to train: a change is not taken up, config.json stays the run's.
    train.train_and_evaluate(tiny(outer_lr=1e-5), tmp_path, allow_config_change=True)
    assert json.loads((tmp_path / "config.json").read_text())["outer_lr"] == 1e-4
    assert not (tmp_path / "config.step200.json").exists()
    # A second change at the same step (the first trained nothing that was saved: it
    # diverged) keeps the settings that trained the steps up to 200.
    diverges = tiny(num_steps=300, log_every=100, checkpoint_every=100, outer_lr=10.0)
    with pytest.raises(train.DivergedError, match="the latest checkpoint is step 200"):
        train.train_and_evaluate(diverges, tmp_path, allow_config_change=True)
    assert json.loads((tmp_path / "config.step200.json").read_text())["outer_lr"] == 1e-4
    capsys.readouterr()
    train.train_and_evaluate(tiny(num_steps=250), tmp_path, allow_config_change=True)
    assert json.loads((tmp_path / "config.step200.json").read_text())["outer_lr"] == 1e-4
    # Named against the settings that trained step 200, not config.json's 10.0.
    assert "resuming with outer_lr 0.0001 -> 0.001 (was: " in capsys.readouterr().err
    assert json.loads((tmp_path / "config.json").read_text())["outer_lr"] == 1e-3


def test_config_changes_lets_through_how_long_how_often_where_and_evaluation(tmp_path):
    (tmp_path / "config.json").write_text(tiny().to_json_best_effort())
    resumable = dict(num_steps=9, log_every=10, checkpoint_every=10, eval_every=50)
    resumable.update(num_val_tasks=7, remat=True, num_eval_tasks=9, eval_inner_steps=3)
    resumable.update(eval_inner_lr=0.02, eval_proximal_lambda=2.0)
    for field, value in resumable.items():
        assert train.config_changes(tmp_path, tiny(**{field: value})) == [], field
    trains = dict(num_inner_steps=2, inner_lr=0.02, algorithm="fomaml", outer_lr=0.1)
    trains.update(meta_batch_size=8, seed=1)
    for field, value in trains.items():
        assert train.config_changes(tmp_path, tiny(**{field: value})) != [], field
    # A config.json from before a field existed: the field is not compared.
    saved = json.loads(tiny().to_json_best_effort())
    del saved["remat"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert train.config_changes(tmp_path, tiny()) == []
    # But one from before the damping fields trained undamped: damping it is a change.
    del saved["imaml_cg_damping"], saved["imaml_lam_damping"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert train.config_changes(tmp_path, tiny()) == []
    damped = tiny(imaml_cg_damping=1.0)
    assert train.config_changes(tmp_path, damped) == ["imaml_cg_damping 0.0 -> 1.0"]
    # An empty one would compare nothing: the run's settings are lost.
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(train.CheckpointError, match="not a JSON object of settings"):
        train.config_changes(tmp_path, tiny())


def test_a_fresh_start_drops_an_earlier_runs_kept_configs(tmp_path, capsys):
    # Left by an earlier run here whose checkpoints were deleted: kept, it would be
    # taken for the settings that trained this run's step 50 at its next change.
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "config.step50.json").write_text('{"outer_lr": 0.001}')
    # Its results are kept, and named: they describe checkpoints that are gone.
    for name in ("eval.json", "eval_best.json", "curvature.json"):
        (tmp_path / name).write_text("{}")
    train.train_and_evaluate(tiny(num_steps=50), tmp_path)
    assert not (tmp_path / "config.step50.json").exists()
    assert (tmp_path / "eval.json").exists()
    warning = "holds curvature.json, eval.json, eval_best.json of an earlier run whose"
    assert warning in capsys.readouterr().err
    train.train_and_evaluate(tiny(num_steps=100), tmp_path)  # a resume: no warning
    assert "earlier run" not in capsys.readouterr().err


def test_a_second_run_in_the_same_workdir_is_refused(tmp_path):
    import fcntl

    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a run in progress holds it
        with pytest.raises(ConfigError, match="another run is training in"):
            train.train_and_evaluate(tiny(num_steps=50), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()
    # Released when a run ends, however it ends: the next one trains.
    assert int(train.train_and_evaluate(tiny(num_steps=50), tmp_path).step) == 50


def test_warnings_that_do_not_stop_a_run(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_locks(*args):  # a file system without locks (some network ones)
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    state = train.train_and_evaluate(tiny(num_steps=50, eval_every=100), tmp_path)
    assert int(state.step) == 50
    err = capsys.readouterr().err
    assert "warning: cannot lock" in err
    assert "config.eval_every=100 > config.num_steps=50: no validation will run" in err
    # Validation at the last step is validation: no warning.
    train.train_and_evaluate(tiny(num_steps=50, eval_every=50), tmp_path / "last")
    assert "no validation will run" not in capsys.readouterr().err
    assert (tmp_path / "last" / "best_checkpoint" / "50").is_dir()


def test_a_failed_checkpoint_write_is_one_clear_error(tmp_path, monkeypatch):
    # Orbax reports a full disk as a ValueError, at the next save or wait.
    def full_disk(*args, **kwargs):
        raise ValueError("RESOURCE_EXHAUSTED: ... \nNo space left on device")

    monkeypatch.setattr(train.ocp.CheckpointManager, "save", full_disk)
    message = r"cannot write a checkpoint in .*\(No space left on device\); the checkpoints"
    with pytest.raises(train.CheckpointError, match=message):
        train.train_and_evaluate(tiny(num_steps=100), tmp_path)


def test_resume_survives_a_log_line_cut_short(tmp_path):
    train.train_and_evaluate(tiny(num_steps=100), tmp_path)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"note": "a line added by hand"}\n[1, 2]\n')
        f.write('{"step": 150, "lo')  # a hard kill mid-write
    train.train_and_evaluate(tiny(), tmp_path)
    steps = [r["step"] for r in train._read_metrics(tmp_path / "metrics.jsonl")]
    assert steps == [50, 100, 150, 200]


def test_log_bytes_that_are_not_utf8_are_skipped_like_a_damaged_line(tmp_path):
    # A crash can leave junk where a line was being written: it was a traceback.
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 50}\n\xff\xfe junk\n{"step": 100}\n{"step": 150, "lo\xf0')
    assert [r["step"] for r in train._read_metrics(path)] == [50, 100]
    train._truncate_metrics(path, 100)
    assert path.read_text() == '{"step": 50}\n{"step": 100}\n'


def test_nothing_to_train_says_so(tmp_path, capsys):
    train.train_and_evaluate(tiny(num_steps=100, checkpoint_every=50), tmp_path)
    capsys.readouterr()
    state = train.train_and_evaluate(tiny(num_steps=50, checkpoint_every=50), tmp_path)
    assert int(state.step) == 100
    message = "is at step 100, not below config.num_steps=50: nothing to train"
    err = capsys.readouterr().err
    assert message in err
    # Nothing else: no progress bar, and config.json keeps the settings that trained it.
    assert "sharded over" not in err and "step/s" not in err and "100/50" not in err
    assert json.loads((tmp_path / "config.json").read_text())["num_steps"] == 100
    train.train_and_evaluate(tiny(num_steps=100, checkpoint_every=50), tmp_path)  # the end
    err = capsys.readouterr().err
    assert "not below config.num_steps=100: nothing to train" in err
    # An unchanged resume keeps config.json where it is, and says nothing of changes.
    assert "resuming with" not in err and not list(tmp_path.glob("config.step*.json"))
    # The last 3 checkpoints are kept: after a divergence, or a damaged latest one,
    # earlier ones are left to resume from.
    train.train_and_evaluate(tiny(num_steps=200, checkpoint_every=50), tmp_path)
    assert train.checkpoint_manager(tmp_path).all_steps() == [100, 150, 200]


def test_a_finished_run_resumed_with_another_eval_every_has_nothing_to_train(tmp_path, capsys):
    # Its last step (150) was not due a validation at eval_every=100: at 50 it was
    # validated "first", with the log rewritten, as if an interrupt had cut it short.
    def config(eval_every):
        return tiny(num_steps=150, checkpoint_every=50, eval_every=eval_every, num_val_tasks=4)

    train.train_and_evaluate(config(100), tmp_path)
    logged = (tmp_path / "metrics.jsonl").read_text()
    capsys.readouterr()
    train.train_and_evaluate(config(50), tmp_path)
    err = capsys.readouterr().err
    assert "nothing to train" in err and "validating it first" not in err
    assert (tmp_path / "metrics.jsonl").read_text() == logged


def test_a_missed_validation_is_due_under_the_settings_that_trained_its_step(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 100, "loss": 1.0}\n{"step": 150, "loss": 1.0}\n')

    def missed(step, trained, now):
        (tmp_path / "config.json").write_text(json.dumps({"eval_every": trained}))
        return train._validation_missed(tiny(eval_every=now), tmp_path, step, "val_mse")

    assert missed(150, trained=50, now=100)  # interrupted at 150: validated, whatever now
    assert not missed(150, trained=100, now=50)  # not due when it was trained
    assert not missed(150, trained=50, now=0)  # no validation now: none can run
    assert missed(100, trained=100, now=100)
    (tmp_path / "config.step150.json").write_text(json.dumps({"eval_every": 50}))
    assert missed(150, trained=100, now=100)  # the settings that trained step 150
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.step150.json").unlink()
    assert not train._validation_missed(tiny(eval_every=100), tmp_path, 150, "val_mse")
    assert train._validation_missed(tiny(eval_every=50), tmp_path, 150, "val_mse")


def test_adaptation_curve_is_the_query_metric_after_k_steps():
    exp = train.build_experiment(tiny())
    key, lr = jax.random.key(5), 0.3
    curve = train.make_adaptation_curve(
        exp, exp.task, inner_lr=lr, num_inner_steps=2, batch_size=4
    )(exp.init_params, key, num_tasks=6)
    # Batch b of 4 tasks from fold_in(key, b); the last batch's extra tasks dropped.
    expected = []
    for b, kept in ((0, 4), (1, 2)):
        episode = exp.task.sample(jax.random.fold_in(key, b), 4)
        for t in range(kept):
            support, (xq, yq) = jax.tree.map(
                lambda a, t=t: a[t], (episode["support"], episode["query"])
            )
            expected.append(
                [
                    exp.task.metrics(exp.apply_fn(adapted, xq), yq)["mse"]
                    for adapted in (
                        core.adapt(
                            exp.loss_fn, exp.init_params, support, inner_lr=lr, num_inner_steps=k
                        )
                        for k in range(3)
                    )
                ]
            )
    np.testing.assert_allclose(curve, np.array(expected).T, rtol=1e-5)


def test_evaluate_writes_eval_json(tmp_path, capsys, monkeypatch):
    config = tiny(
        num_steps=50,
        checkpoint_every=50,
        eval_shots=(5, 10),
        eval_batch_size=8,
        eval_inner_lr=0.02,
        eval_num_query=7,
    )
    train.train_and_evaluate(config, tmp_path)
    capsys.readouterr()
    make, calls = evaluate.make_adaptation_curve, []

    def spy(exp, task, **kwargs):
        calls.append(
            (task.num_support, task.num_query, kwargs["inner_lr"], kwargs["num_inner_steps"])
        )
        return make(exp, task, **kwargs)

    monkeypatch.setattr(evaluate, "make_adaptation_curve", spy)
    result = evaluate.evaluate(config, tmp_path)
    # Each K's tasks have K support points and eval_num_query query points; adapted at
    # eval_inner_lr, not inner_lr (0.01).
    assert calls == [(5, 7, 0.02, 2), (10, 7, 0.02, 2)]
    bar = capsys.readouterr().err  # 20 tasks in batches of 8, a bar per K
    assert "sinusoid K=5" in bar and "sinusoid K=10" in bar and "3/3" in bar
    on_disk = json.loads((tmp_path / "eval.json").read_text())
    assert on_disk == result
    assert result["config_changes"] == []  # evaluation settings only
    assert result["metric"] == "mse" and result["num_tasks"] == config.num_eval_tasks
    assert (result["inner_lr"], result["proximal_lambda"]) == (0.02, 0.0)  # not inner_lr's
    assert set(result["results"]) == {"5", "10"}
    for r in result["results"].values():
        assert r["inner_steps"] == [0, 1, 2]
        assert len(r["mean"]) == len(r["ci95"]) == 3
        assert all(c > 0 for c in r["ci95"])
    assert "K=5" in evaluate.format_table(result)


def test_eval_proximal_lambda_adapts_by_imamls_steps(tmp_path, monkeypatch):
    # Validation and evaluation both adapt by iMAML's proximal steps when asked, and
    # eval.json and the table say so.
    settings = dict(num_steps=50, checkpoint_every=50, eval_every=50, eval_inner_steps=3)
    config = tiny(**settings)
    make, seen = train.make_adaptation_curve, []

    def spy(exp, task, **kwargs):
        seen.append(kwargs["proximal_lambda"])
        return make(exp, task, **kwargs)

    monkeypatch.setattr(train, "make_adaptation_curve", spy)
    monkeypatch.setattr(evaluate, "make_adaptation_curve", spy)
    train.train_and_evaluate(tiny(**settings, eval_proximal_lambda=4.0), tmp_path)
    assert seen == [4.0]  # the validation's
    plain = evaluate.evaluate(config, tmp_path, write=False)
    proximal = evaluate.evaluate(tiny(**settings, eval_proximal_lambda=4.0), tmp_path)
    assert seen == [4.0, 0.0, 4.0]
    assert (plain["proximal_lambda"], proximal["proximal_lambda"]) == (0.0, 4.0)
    assert proximal["inner_lr"] == config.eval_inner_lr
    assert proximal["config_changes"] == []  # an evaluation setting, not the run's
    # Before adaptation the same; after it, other steps.
    for a, b in zip(plain["results"].values(), proximal["results"].values(), strict=True):
        assert a["mean"][0] == b["mean"][0] and a["mean"][-1] != b["mean"][-1]
    assert "proximal steps (lambda 4)" in evaluate.format_table(proximal)
    assert "proximal" not in evaluate.format_table(plain)


def test_classification_is_evaluated_at_each_of_eval_shots():
    config = omniglot_configs.get_config("5way1shot,tiny")
    task = Omniglot(np.zeros((30, 20, 28, 28), np.uint8), num_ways=5, num_shots=1, num_query=1)
    assert evaluate._with_shots(task, 5, config).num_shots == 5


def test_eval_json_is_strict_json_when_tasks_diverge(tmp_path):
    config = tiny(num_steps=50, checkpoint_every=50)
    train.train_and_evaluate(config, tmp_path)
    result = evaluate.evaluate(tiny(eval_inner_lr=1e6), tmp_path)  # inner SGD blows up

    def reject(constant):
        raise AssertionError(f"{constant} is not JSON")

    on_disk = json.loads((tmp_path / "eval.json").read_text(), parse_constant=reject)
    kept, written = result["results"]["5"], on_disk["results"]["5"]
    assert kept["nonfinite"][-1] > 0 and not np.isfinite(kept["mean"][-1])
    assert written["mean"][-1] is None and written["nonfinite"] == kept["nonfinite"]
    assert written["mean"][0] == kept["mean"][0]  # before adaptation: finite, kept


def test_eval_seed_draws_the_same_test_tasks_for_runs_of_any_seed(tmp_path, capsys):
    config = tiny(num_steps=50, checkpoint_every=50)
    train.train_and_evaluate(config, tmp_path)

    def means(**overrides):
        result = evaluate.evaluate(tiny(**overrides), tmp_path)
        return result["test_seed"], result["results"]["5"]["mean"]

    seed, own = means()
    assert seed == 0
    # The batch is capped at the 20 tasks: eval_batch_size 600 or 20, the same tasks.
    assert json.loads((tmp_path / "eval.json").read_text())["test_batch_size"] == 20
    assert means(eval_batch_size=20) == (0, own)
    # The parameters come from the checkpoint, the test tasks from eval_seed alone.
    capsys.readouterr()
    assert means(seed=3, eval_seed=0) == (0, own)
    # A setting that trained the run (here unused) is said and recorded.
    assert "warning: evaluating with settings other than" in capsys.readouterr().err
    assert json.loads((tmp_path / "eval.json").read_text())["config_changes"] == ["seed 0 -> 3"]
    assert means(eval_seed=0) == (0, own)
    other_seed, other = means(eval_seed=3)
    assert other_seed == 3 and other != own
    # The batch size is part of the draw, and recorded: a different one, other tasks.
    result = evaluate.evaluate(tiny(eval_batch_size=3), tmp_path)
    assert result["test_batch_size"] == 3 and result["results"]["5"]["mean"] != own
    with pytest.raises(ConfigError, match="config.eval_seed=-1"):
        validate(tiny(eval_seed=-1))


def test_an_error_while_signals_are_held_is_what_propagates(ctrl_c):
    # Multi-process runs hold signals for the whole loop: a divergence with a signal
    # pending must end as the divergence (each process exits 2), not as the signal.
    with pytest.raises(ValueError, match="diverged"):
        with train._signals_deferred():
            signal.raise_signal(signal.SIGINT)
            raise ValueError("diverged")
    with pytest.raises(KeyboardInterrupt):
        with train._signals_deferred():
            signal.raise_signal(signal.SIGINT)


def test_an_interrupt_in_a_diverging_chunk_saves_no_nan_checkpoint(
    tmp_path, monkeypatch, capsys, ctrl_c
):
    # The signal is held through the chunk and raised before its finiteness check,
    # which the interrupt's save skipped: it saved the NaN state.
    make_train_chunk = train.make_train_chunk

    def interrupted_chunk(*args):
        chunk = make_train_chunk(*args)

        def run(state, num):
            state, metrics = chunk(state, num)
            if int(state.step) > 10:  # the second chunk diverges, and Ctrl-C comes
                metrics = jax.tree.map(lambda m: m * np.nan, metrics)
                signal.raise_signal(signal.SIGINT)
            return state, metrics

        return run

    monkeypatch.setattr(train, "make_train_chunk", interrupted_chunk)
    config = tiny(num_steps=40, log_every=10, checkpoint_every=10)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config, tmp_path)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [10]
    assert "the last chunk diverged" in capsys.readouterr().err
    _, params, step = train.restore_params(config, tmp_path)
    assert step == 10 and all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


def test_divergence_stops_the_run_and_keeps_the_checkpoints_before_it(tmp_path):
    # An outer lr of 10 sends the sinusoid net's loss to inf within a few steps.
    config = tiny(num_steps=20, log_every=1, checkpoint_every=1, outer_lr=10.0)
    with pytest.raises(train.DivergedError) as e:
        train.train_and_evaluate(config, tmp_path)
    assert (tmp_path / "plots" / "training.png").stat().st_size > 0  # up to the divergence
    bad = int(re.search(r"not finite at step (\d+);", str(e.value)).group(1))
    assert f"the latest checkpoint is step {bad - 1}. Lower config.outer_lr" in str(e.value)
    records = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, bad + 1))
    assert all(np.isfinite(list(r.values())).all() for r in records[:-1])
    assert None in records[-1].values()  # the value that was not finite, as JSON's null
    _, params, step = train.restore_params(config, tmp_path)
    assert step == bad - 1
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


def test_a_training_plot_that_cannot_be_written_hides_no_divergence(tmp_path, capsys):
    (tmp_path / "plots" / "training.png").mkdir(parents=True)  # not writable as a file
    config = tiny(num_steps=20, log_every=1, checkpoint_every=1, outer_lr=10.0)
    with pytest.raises(train.DivergedError, match="meta-training diverged"):
        train.train_and_evaluate(config, tmp_path)
    assert "warning: cannot write the training plot (IsADirectoryError" in capsys.readouterr().err


def test_divergence_names_the_step_within_its_chunk(tmp_path, monkeypatch):
    make = train.make_train_chunk

    def diverging_from_step_4(*args):
        chunk = make(*args)

        def run(state, num):
            state, metrics = chunk(state, num)
            metrics = {k: np.array(v) for k, v in jax.device_get(metrics).items()}
            metrics["loss"][3:] = np.nan
            return state, metrics

        return run

    monkeypatch.setattr(train, "make_train_chunk", diverging_from_step_4)
    with pytest.raises(train.DivergedError, match="not finite at step 4;"):
        train.train_and_evaluate(tiny(num_steps=10, log_every=10), tmp_path)


def test_first_nonfinite_finds_the_step_within_a_chunk():
    metrics = {"loss": np.array([1.0, 2.0, np.nan]), "acc": np.array([[1, 1], [1, np.inf], [1, 1]])}
    assert train.first_nonfinite(metrics) == 1
    assert train.first_nonfinite({"loss": np.ones(4)}) is None


def test_summary_counts_diverged_tasks_and_keeps_the_median_finite():
    values = np.array([[1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 2.0, 3.0, np.inf, np.nan]])
    s = train.summarize(values)
    assert s["mean"][0] == 3.0 and s["ci95"][0] == pytest.approx(1.96 * np.sqrt(2 / 5))
    assert s["nonfinite"] == [0, 2]
    assert s["median"] == [3.0, 3.0]  # NaN counts as infinitely bad, not as "unknown"
    assert np.isnan(s["mean"][1])
    # One task has no spread to estimate: no interval, rather than a width of 0.
    assert np.isnan(train.summarize(np.array([[0.7]]))["ci95"][0])
    # Large but finite float32 losses: their squares overflow float32, not the interval.
    big = train.summarize(np.array([[1e30, 3e34, 2e34, 5e33]], np.float32))
    assert np.isfinite(big["ci95"][0]) and big["ci95"][0] == pytest.approx(1.1685e34, rel=1e-3)
    table = evaluate.format_table(
        {"metric": "mse", "num_tasks": 5, "results": {"5": {"inner_steps": [0, 1], **s}}}
    )
    assert "K=5: 2 of 5 tasks not finite (diverged) after 1 step, first after 1" in table
    # The first step with a diverged task, not the last; each cell is mean +- CI.
    s = train.summarize(np.array([[1.0, 2.0, 3.0], [1.0, np.inf, 3.0], [np.inf, np.inf, 3.0]]))
    table = evaluate.format_table(
        {"metric": "mse", "num_tasks": 3, "results": {"5": {"inner_steps": [0, 1, 2], **s}}}
    )
    assert f"{s['mean'][0]:.4f} +- {s['ci95'][0]:.4f}" in table
    assert "2 of 3 tasks not finite (diverged) after 2 steps, first after 1" in table
    # Means too large or too small for four decimals keep four significant digits.
    s = {"inner_steps": [0, 1], "mean": [2.4886e29, 1.234e-5], "ci95": [4.8e29, 2e-6]}
    table = evaluate.format_table({"metric": "mse", "num_tasks": 3, "results": {"5": s}})
    assert "2.489e+29 +- 4.8e+29" in table and "1.234e-05 +- 2e-06" in table


def test_table_shows_zero_with_four_decimals_and_the_median_of_the_last_step():
    s = {"inner_steps": [0, 1], "mean": [0.0, 1e5], "ci95": [0.0, 99999.0]}
    table = evaluate.format_table({"metric": "mse", "num_tasks": 3, "results": {"5": s}})
    assert "0.0000 +- 0.0000" in table and "1e+05 +- 99999.0000" in table
    # The median shown is the last step's (the one the diverged count is of), not the first's.
    s = train.summarize(np.array([[1.0, 2.0, 3.0], [np.inf, 5.0, 6.0]]))
    table = evaluate.format_table(
        {"metric": "mse", "num_tasks": 3, "results": {"5": {"inner_steps": [0, 1], **s}}}
    )
    assert table.endswith("after 1 step, first after 1; median then 6")


def test_evaluate_without_checkpoint_fails_clearly(tmp_path):
    with pytest.raises(train.CheckpointError, match="no checkpoint"):
        evaluate.evaluate(tiny(), tmp_path)


def test_corrupt_checkpoint_fails_clearly(tmp_path):
    train.train_and_evaluate(tiny(num_steps=50, checkpoint_every=50), tmp_path)
    for f in (tmp_path / "checkpoints").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"garbage")
    with pytest.raises(train.CheckpointError, match="corrupt"):
        train.train_and_evaluate(tiny(), tmp_path)


def _saved(tmp_path, steps=(50,)):
    """A tiny run's initial state, saved as the checkpoint of each of ``steps``."""
    state = train.init_state(train.build_experiment(tiny()))
    with train.checkpoint_manager(tmp_path) as manager:
        for step in steps:
            manager.save(step, args=ocp.args.StandardSave(state))
    return state


def test_an_unreadable_checkpoint_file_is_named_not_called_corrupt(tmp_path, monkeypatch):
    state = _saved(tmp_path)
    folder = tmp_path / "checkpoints" / "50" / "default" / "ocdbt.process_0" / "d"
    data = max(folder.iterdir(), key=lambda p: p.stat().st_size)
    data.chmod(0)  # the advice was "corrupt: delete it", of a whole checkpoint
    if os.geteuid() == 0:  # root reads it anyway: what any other user meets
        access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: access(p, mode) and Path(p) != data)
    try:
        with train.checkpoint_manager(tmp_path) as manager:
            with pytest.raises(train.CheckpointError, match=f"{data} cannot be read"):
                train.restore_latest(manager, state)
    finally:
        data.chmod(0o644)


def test_a_dangling_link_in_a_checkpoint_is_not_called_unreadable(tmp_path):
    # os.access follows links: one to nothing read as "permission denied; chmod -R".
    state = _saved(tmp_path)
    (tmp_path / "checkpoints" / "50" / "notes.txt").symlink_to(tmp_path / "gone")
    with train.checkpoint_manager(tmp_path) as manager:
        assert int(train.restore_latest(manager, state).step) == int(state.step)


def test_an_emptied_checkpoint_folder_is_called_incomplete(tmp_path):
    state = _saved(tmp_path, steps=(50, 100))
    for item in (tmp_path / "checkpoints" / "100").iterdir():
        shutil.rmtree(item) if item.is_dir() else item.unlink()
    with train.checkpoint_manager(tmp_path) as manager:  # orbax: "must provide Composite"
        with pytest.raises(train.CheckpointError, match="100 is incomplete: it holds no default/"):
            train.restore_latest(manager, state)


def test_a_missing_config_json_is_warned_of(tmp_path, capsys):
    # Any setting, the split included, passed unchecked and unsaid.
    train.train_and_evaluate(tiny(num_steps=50, checkpoint_every=50), tmp_path)
    (tmp_path / "config.json").unlink()
    capsys.readouterr()
    train.train_and_evaluate(tiny(num_steps=100, checkpoint_every=50), tmp_path)
    assert "config.json is missing: this config cannot be checked" in capsys.readouterr().err
    # And an evaluation of it (the resume wrote config.json anew).
    (tmp_path / "config.json").unlink()
    assert train.warn_of_config_changes(tmp_path, tiny()) == []
    assert "config.json is missing: this config cannot be checked" in capsys.readouterr().err
    # Also where only best_checkpoint/ is left (evaluate --checkpoint=best reads it).
    shutil.rmtree(tmp_path / "checkpoints")
    (tmp_path / "best_checkpoint").mkdir(exist_ok=True)
    assert train.warn_of_config_changes(tmp_path, tiny()) == []
    assert "config.json is missing: this config cannot be checked" in capsys.readouterr().err


def test_training_chunk_compiles_once(tmp_path):
    config = tiny(num_steps=150, log_every=50, checkpoint_every=50)
    exp = train.build_experiment(config)
    chunk = train.make_train_chunk(exp, train.root_keys(0)[0])
    state = train.init_state(exp)
    for _ in range(3):
        state, _ = chunk(state, config.log_every)
    assert int(state.step) == 150
    assert chunk._cache_size() == 1


def _records(workdir):
    return [json.loads(s) for s in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_a_damaged_best_checkpoint_metrics_file_is_one_clear_error(tmp_path):
    state = {"w": np.zeros(3, np.float32)}
    with train.checkpoint_manager(tmp_path, "best") as best:
        best.save(1, args=ocp.args.StandardSave(state), metrics={"val_accuracy": 0.5})
    metrics = tmp_path / "best_checkpoint" / "1" / "metrics" / "metrics"
    metrics.write_text("xx")  # orbax reads every step's metrics when the manager opens
    with pytest.raises(train.CheckpointError, match="cannot read the checkpoints in .*best_chec"):
        train.checkpoint_manager(tmp_path, "best")
    # Metrics without the validation value rank below any, rather than stop the run
    # at its next validation.
    metrics.write_text("{}")
    with train.checkpoint_manager(tmp_path, "best") as best:
        best.save(2, args=ocp.args.StandardSave(state), metrics={"val_accuracy": 0.1})
        best.wait_until_finished()
        assert best.all_steps() == [2]


def test_best_checkpoint_is_the_best_validation_and_survives_resume(tmp_path, capsys):
    def config(**overrides):
        # Seed 1 with 16 validation tasks validates best at step 50, mid-run.
        return tiny(
            **{
                "eval_every": 50,
                "num_val_tasks": 16,
                "checkpoint_every": 50,
                "seed": 1,
                **overrides,
            }
        )

    train.train_and_evaluate(config(), tmp_path / "full")
    val = {r["step"]: r["val_mse"] for r in _records(tmp_path / "full")}
    assert list(val) == [50, 100, 150, 200] and len(set(val.values())) == 4
    best_step = min(val, key=lambda s: (val[s], -s))  # mse: lower is better; ties: the later
    assert f"best val_mse {val[best_step]:.4g} at step {best_step}" in capsys.readouterr().err
    best = train.checkpoint_manager(tmp_path / "full", "best", "mse")
    assert best.all_steps() == [best_step]
    assert (tmp_path / "full" / "plots" / "training.png").stat().st_size > 0  # best marked

    _, params, step = train.restore_params(config(), tmp_path / "full", "best")
    _, latest, _ = train.restore_params(config(), tmp_path / "full")
    assert step == best_step != 200
    pairs = zip(jax.tree.leaves(params), jax.tree.leaves(latest), strict=True)
    assert not all(np.array_equal(a, b) for a, b in pairs)
    result = evaluate.evaluate(config(), tmp_path / "full", "best")
    assert result["checkpoint"] == "best" and result["checkpoint_step"] == best_step
    assert json.loads((tmp_path / "full" / "eval_best.json").read_text()) == result
    assert (tmp_path / "full" / "plots" / "eval_best.png").stat().st_size > 0

    # A run killed after the validation that was its best but before that
    # step's checkpoint: the resumed run replays the step and keeps the same best.
    train.train_and_evaluate(config(), tmp_path / "killed")
    latest_manager = train.checkpoint_manager(tmp_path / "killed")
    for s in latest_manager.all_steps():
        if s >= best_step:
            latest_manager.delete(s)
    train.train_and_evaluate(config(), tmp_path / "killed")
    assert train.checkpoint_manager(tmp_path / "killed", "best", "mse").all_steps() == [best_step]
    _, resumed, _ = train.restore_params(config(), tmp_path / "killed", "best")
    jax.tree.map(np.testing.assert_array_equal, resumed, params)

    # Started again from scratch (checkpoints deleted, another seed): the old
    # run's best must not outlive it.
    shutil.rmtree(tmp_path / "killed" / "checkpoints")
    train.train_and_evaluate(config(seed=0), tmp_path / "killed")
    new_best = min(_records(tmp_path / "killed"), key=lambda r: (r["val_mse"], -r["step"]))
    best = train.checkpoint_manager(tmp_path / "killed", "best", "mse")
    assert best.all_steps() == [new_best["step"]]
    assert best.metrics(new_best["step"])["val_mse"] == new_best["val_mse"]

    # Again from scratch, now without validation: no best is left from before.
    shutil.rmtree(tmp_path / "killed" / "checkpoints")
    train.train_and_evaluate(config(eval_every=0), tmp_path / "killed")
    assert train.checkpoint_manager(tmp_path / "killed", "best", "mse").all_steps() == []


def test_best_checkpoint_without_validation_fails_clearly(tmp_path):
    train.train_and_evaluate(tiny(num_steps=50, checkpoint_every=50), tmp_path)
    with pytest.raises(train.CheckpointError, match="eval_every"):
        evaluate.evaluate(tiny(), tmp_path, "best")


@pytest.mark.parametrize(
    "metric, values", [("accuracy", [0.5, 0.9, 0.8, 0.9, 0.7]), ("mse", [5, 3, 4, 3, 6])]
)
def test_best_checkpoint_keeps_the_later_of_equal_validations(tmp_path, metric, values):
    # The training plot marks the same step (maml.plots.training_curves).
    best = train.checkpoint_manager(tmp_path, "best", metric)
    for step, value in enumerate(values, 1):
        best.save(
            step,
            args=train.ocp.args.StandardSave({"x": np.ones(2)}),
            metrics={f"val_{metric}": value},
        )
    best.wait_until_finished()
    assert best.all_steps() == [4]


def test_validation_compiles_once(tmp_path, monkeypatch):
    sample, traced = Sinusoid.sample, []

    def counting_sample(self, key, num_tasks):
        if isinstance(key, jax.core.Tracer):
            traced.append(num_tasks)
        return sample(self, key, num_tasks)

    monkeypatch.setattr(Sinusoid, "sample", counting_sample)
    config = tiny(eval_every=50, num_val_tasks=3, eval_batch_size=3)
    train.train_and_evaluate(config, tmp_path)
    # Four validations of 3 tasks (the meta-batch is 4): the validation curve is traced once.
    assert traced.count(config.num_val_tasks) == 1


@pytest.mark.parametrize(
    "metric, values, expected",
    [
        ("mse", [0.5, np.nan, 0.7], 1),
        ("mse", [np.nan, 0.7], 2),
        ("accuracy", [0.5, np.nan, 0.4], 1),
    ],
)
def test_a_nan_validation_is_never_the_best(tmp_path, metric, values, expected):
    # Diverged inner SGD gives a NaN validation; NaN compares false with everything.
    best = train.checkpoint_manager(tmp_path, "best", metric)
    for step, value in enumerate(values, 1):
        state = {"x": np.full(2, step, np.float32)}
        best.save(step, args=ocp.args.StandardSave(state), metrics={f"val_{metric}": value})
    best.wait_until_finished()
    assert best.all_steps() == [expected]


def test_nonfinite_metrics_are_logged_as_null_and_plotted_as_gaps(tmp_path):
    records = [
        {"step": 1, "loss": 1.0, "val_mse": 2.0},
        {"step": 2, "loss": 0.5, "val_mse": float("nan")},
        {"step": 3, "loss": float("inf"), "val_mse": 1.0},
    ]
    written = [json.dumps(train.finite_or_null(r), allow_nan=False) for r in records]
    assert json.loads(written[1])["val_mse"] is None and json.loads(written[2])["loss"] is None
    fig = plots.training_curves([json.loads(line) for line in written], tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 0
    lines = {ax.get_title(): ax.get_lines()[0] for ax in fig.axes}
    assert np.isnan(lines["loss"].get_ydata()[2]) and np.isnan(lines["val_mse"].get_ydata()[1])
    assert fig.axes[0].get_yscale() == "log"  # the loss
    # A run whose every validation diverged: no best to star, still a plot.
    plots.training_curves([{"step": 1, "val_mse": None}], tmp_path / "t.png")


def test_the_cg_residual_is_plotted_on_a_log_axis(tmp_path):
    # iMAML's residual spans 1e-9 (solved) to above 1: linear, the small ones are 0.
    records = [{"step": s, "cg_residual": r} for s, r in [(1, 1.2), (2, 1e-3), (3, 1e-9)]]
    fig = plots.training_curves(records, tmp_path / "t.png")
    assert fig.axes[0].get_yscale() == "log"
    # An exact 0 (every task's right-hand side 0) is no point on it: marked at the bottom.
    # A negative one (a log line from another tool) is no point on it either.
    records += [{"step": 4, "cg_residual": 0.0}, {"step": 5, "cg_residual": -1e-3}]
    fig = plots.training_curves(records, tmp_path / "t.png")
    marks = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert marks["0 (off the log axis)"].get_xdata().tolist() == [4, 5]
    assert all(y < 0.5 for y in marks["0 (off the log axis)"].get_ydata())  # axes units
    # No positive value (exactly solved, or diverged): linear, no warning, and a 0 is
    # a point on it, not a mark.
    records = [{"step": 1, "loss": 0.0, "cg_residual": None}, {"step": 2, "loss": 0.0}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plots.training_curves(records, tmp_path / "t.png")
    assert [ax.get_yscale() for ax in fig.axes] == ["linear", "linear"]
    labels = [line.get_label() for ax in fig.axes for line in ax.get_lines()]
    assert "0 (off the log axis)" not in labels


def test_log_values_that_are_not_numbers_are_not_plotted(tmp_path):
    # Lines edited by hand or from another tool: a finished run ended in a traceback.
    records = [
        {"step": 1, "loss": 1.0, "note": "restarted"},
        {"step": 2, "loss": "abc"},
        {"step": 3, "loss": [1, 2], "grad_norm": True},
        {"step": 4, "loss": 0.5},
    ]
    fig = plots.training_curves(records, tmp_path / "t.png")
    assert [ax.get_title() for ax in fig.axes] == ["loss"]
    assert fig.axes[0].get_lines()[0].get_xdata().tolist() == [1, 4]


def test_a_log_line_whose_step_is_not_a_number_is_skipped(tmp_path):
    # json's true is an int to isinstance: kept as a step, then dropped from its record
    # as not a number, it ended the plot in a KeyError.
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 1, "loss": 1.0}\n{"step": true, "loss": 0.5}\n{"step": 3, "loss": 0.2}\n'
    )
    records = train._read_metrics(path)
    assert [r["step"] for r in records] == [1, 3]
    records.insert(1, {"step": 2, "loss": np.float32(0.5), "grad_norm": np.bool_(True)})
    fig = plots.training_curves(records, tmp_path / "t.png")
    assert [ax.get_title() for ax in fig.axes] == ["loss"]  # NumPy's numbers are plotted
    assert fig.axes[0].get_lines()[0].get_xdata().tolist() == [1, 2, 3]


def test_metrics_logged_with_the_same_values_share_a_panel(tmp_path):
    # A regression's loss is its mse: one panel, not two identical ones.
    records = [
        {"step": 1, "loss": 1.0, "mse": 1.0, "grad_norm": 1.0, "val_mse": 2.0},
        {"step": 2, "loss": 0.5, "mse": 0.5, "grad_norm": 0.7},
        {"step": 3, "loss": None, "mse": None, "grad_norm": 0.5, "val_mse": 1.0},
    ]
    fig = plots.training_curves(records, tmp_path / "t.png")
    assert [ax.get_title() for ax in fig.axes] == ["loss = mse", "grad_norm", "val_mse"]
    # Equal in one record only, or logged at other steps: their own panels.
    records[1]["mse"] = 0.6
    fig = plots.training_curves(records, tmp_path / "t.png")
    assert [ax.get_title() for ax in fig.axes] == ["loss", "mse", "grad_norm", "val_mse"]
    records = [{"step": 1, "loss": 1.0, "val_loss": 1.0}, {"step": 2, "loss": 0.5}]
    fig = plots.training_curves(records, tmp_path / "t.png")
    assert [ax.get_title() for ax in fig.axes] == ["loss", "val_loss"]
    # Nulls only (diverged in the first chunk): not shown as the same metric.
    records = [{"step": 1, "grad_norm": None, "loss": None, "mse": None}]
    fig = plots.training_curves(records, tmp_path / "t.png")
    assert [ax.get_title() for ax in fig.axes] == ["grad_norm", "loss", "mse"]


def test_figure_3_marks_diverged_steps_from_memory_or_eval_json(tmp_path):
    inf = float("inf")
    results = {
        "5": {"inner_steps": [0, 1, 2], "mean": [3.0, 0.5, inf], "ci95": [0.2, inf, 0.1]},
        "10": {"inner_steps": [0, 1, 2], "mean": [3.0, 0.4, None], "ci95": [0.2, None, None]},
    }
    evaluation = {"metric": "mse", "num_tasks": 5, "results": results}
    fig = plots.adaptation_curves(evaluation, tmp_path / "e.png")
    assert (tmp_path / "e.png").stat().st_size > 0
    (ax,) = fig.axes
    marks = {line.get_label(): list(line.get_xdata()) for line in ax.lines}
    marks = {label: x for label, x in marks.items() if "diverged" in label}
    assert marks == {
        "K=5: mean not finite (diverged tasks)": [2],
        "K=10: mean not finite (diverged tasks)": [2],
    }


@pytest.mark.parametrize(
    "metric, means, log_scale",
    [
        ("mse", [3.0, 0.3, 1e18], True),
        ("mse", [3.0, 0.3, 0.2], False),
        ("accuracy", [0.2, 0.9, 0.99], False),
    ],
)
def test_figure_3_axis_and_bars_stay_in_the_metrics_range(tmp_path, metric, means, log_scale):
    # A few diverging tasks (means of 1e18 beside 0.3) flattened a linear axis, and
    # bars wider than the mean reached negative MSEs (or accuracies above 1).
    results = {"5": {"inner_steps": [0, 1, 2], "mean": means, "ci95": [0.5, 0.5, 4e18]}}
    fig = plots.adaptation_curves(
        {"metric": metric, "num_tasks": 5, "results": results}, tmp_path / "e.png"
    )
    (ax,) = fig.axes
    assert (ax.get_yscale() == "log") == log_scale
    assert ax.get_ylabel() == metric + (" (log scale)" if log_scale else "")
    (bars,) = ax.collections  # the vertical error bars
    ends = np.concatenate([segment[:, 1] for segment in bars.get_segments()])
    assert ends.min() >= 0.0
    if metric == "accuracy":
        assert ends.max() <= 1.0


@pytest.mark.parametrize("algorithm, title", [("maml", "MAML"), ("pretrain", "pretrained")])
def test_figure_2_names_the_algorithm(tmp_path, algorithm, title):
    exp = train.build_experiment(tiny(algorithm=algorithm))
    fig = plots.sinusoid_adaptation(exp, exp.init_params, jax.random.key(0), tmp_path / "a.png")
    assert fig.axes[0].get_title() == f"{title}, K={exp.task.num_support}"


def test_train_step_is_adam_on_the_episode_of_its_step():
    exp = train.build_experiment(tiny())
    train_key, _ = train.root_keys(0)
    state = train.init_state(exp).replace(step=jnp.array(7))
    new, metrics = jax.jit(lambda s: train.train_step(exp, train_key, s))(state)
    # Step 7 trains on the episode of fold_in(key, 7), not on the same one every step.
    episode = exp.task.sample(jax.random.fold_in(train_key, 7), exp.config.meta_batch_size)
    loss, _, grads = jax.jit(lambda e: train.meta_loss_and_grad(exp, exp.init_params, e))(episode)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], analysis.tree_norm(grads), rtol=1e-5)
    # One step of Adam at outer_lr (not inner_lr) from the initial parameters.
    adam = optax.adam(exp.config.outer_lr)
    updates, _ = adam.update(grads, adam.init(exp.init_params), exp.init_params)
    expected = optax.apply_updates(exp.init_params, updates)
    for got, want in zip(jax.tree.leaves(new.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert int(new.step) == 8


def test_training_and_evaluation_streams_differ():
    # Same key, same tasks: validating on step s's training episode would not be fresh.
    for seed in (0, 1):
        train_key, eval_key = (jax.random.key_data(k) for k in train.root_keys(seed))
        assert not np.array_equal(train_key, eval_key)


def test_logs_are_chunk_means_and_validation_the_last_row_at_eval_inner_lr(tmp_path, monkeypatch):
    calls, keys = [], []

    def curve(exp, task, **kwargs):  # rows: before adaptation 9, after it 1
        calls.append(kwargs)

        def validation_curve(params, key, num_tasks):
            keys.append(key)
            return np.stack([np.full(num_tasks, 9.0), np.ones(num_tasks)])

        return validation_curve

    monkeypatch.setattr(train, "make_adaptation_curve", curve)
    config = tiny(num_steps=50, eval_every=50, eval_inner_lr=0.5, eval_report_step=2)
    train.train_and_evaluate(config, tmp_path)
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record["val_mse"] == 1.0  # after adaptation
    # Validated as reported (Finn's 3 test-time steps at 5-way), not as trained (1).
    assert calls[0]["inner_lr"] == 0.5 and calls[0]["num_inner_steps"] == 2
    # Step 50's validation tasks are drawn from the evaluation stream, folded with the
    # step: neither a training episode's key nor the same tasks at every validation.
    (key,) = keys
    expected = jax.random.fold_in(train.root_keys(0)[1], 50)
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(expected))
    # The logged loss and gradient norm are the means over the chunk's 50 steps.
    exp = train.build_experiment(config)
    _, metrics = train.make_train_chunk(exp, train.root_keys(0)[0])(train.init_state(exp), 50)
    assert record["loss"] == pytest.approx(float(np.mean(metrics["loss"])), rel=1e-6)
    assert record["grad_norm"] == pytest.approx(float(np.mean(metrics["grad_norm"])), rel=1e-6)


def test_resumes_keep_the_chunk_boundaries_and_a_best_checkpoint_saved_at_their_start(
    tmp_path,
):
    def config(num_steps):  # seed 1: the best validation is at step 50, the first
        return tiny(num_steps=num_steps, eval_every=50, num_val_tasks=16, seed=1)

    for num_steps in (50, 120, 200):  # resumed at 50 (a best saved there), then at 120
        train.train_and_evaluate(config(num_steps), tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [50, 100, 120, 150, 200]
    validated = [r for r in records if "val_mse" in r]
    best = min(validated, key=lambda r: (r["val_mse"], -r["step"]))["step"]
    assert best == 50  # else this test would not test the resume step
    assert train.checkpoint_manager(tmp_path, "best", "mse").all_steps() == [best]


def test_a_failed_write_leaves_the_old_eval_json_whole(tmp_path, monkeypatch):
    old = '{"results": "earlier"}\n'
    (tmp_path / "eval.json").write_text(old)
    write_text = Path.write_text

    def disk_full(path, text, *args, **kwargs):
        write_text(path, text[:10], *args, **kwargs)  # what fit before the disk filled
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space"):
        evaluate.write_evaluation({"checkpoint": "latest", "results": {}}, tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "eval.json").read_text() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]  # no temporary left


@pytest.mark.parametrize(
    "key, values", [("val_mse", (0.5, 2.0, 0.5)), ("val_accuracy", (0.9, 0.5, 0.9))]
)
def test_training_plot_stars_the_step_best_checkpoint_holds(tmp_path, key, values):
    # The best validation value, of equal ones the later: what best_checkpoint/ keeps.
    records = [
        {"step": s, "loss": 1.0, key: v} for s, v in zip((50, 100, 150), values, strict=True)
    ]
    figure = plots.training_curves(records, tmp_path / "training.png")
    (ax,) = [ax for ax in figure.axes if ax.get_title() == key]
    (star,) = [line for line in ax.get_lines() if line.get_marker() == "*"]
    assert (list(star.get_xdata()), list(star.get_ydata())) == ([150], [values[2]])


def test_figure_2_adapts_1_then_10_steps_in_all(tmp_path, monkeypatch):
    exp = train.build_experiment(tiny())
    adapt, steps = core.adapt, []

    def spy(*args, num_inner_steps, **kwargs):
        steps.append(num_inner_steps)
        return adapt(*args, num_inner_steps=num_inner_steps, **kwargs)

    monkeypatch.setattr(plots.core, "adapt", spy)
    key = jax.random.key(0)
    fig = plots.sinusoid_adaptation(exp, exp.init_params, key, tmp_path / "f.png")
    assert steps == [1, 9]  # the second curve continues from the first
    # What is drawn: the task's truth, the model before adaptation, and the
    # support points, which are the ones adapted on.
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    episode = exp.task.sample(key, 1)
    x = lines["ground truth"].get_xdata()
    truth = exp.task.ground_truth(episode["amplitude"], episode["phase"], x[None, :, None])
    np.testing.assert_allclose(lines["ground truth"].get_ydata(), truth[0, :, 0], rtol=1e-5)
    before = exp.apply_fn(exp.init_params, jnp.asarray(x)[:, None])[:, 0]
    np.testing.assert_allclose(lines["pre-update"].get_ydata(), before, rtol=1e-5)
    (points,) = ax.collections
    xs, ys = (np.asarray(a[0, :, 0]) for a in episode["support"])
    np.testing.assert_allclose(points.get_offsets(), np.stack([xs, ys], axis=1), rtol=1e-6)


def test_figure_2_legend_covers_no_curve_or_support_point(tmp_path):
    # Inside the axes (lower right) it hid support points and the truth of many tasks.
    exp = train.build_experiment(tiny())
    fig = plots.sinusoid_adaptation(exp, exp.init_params, jax.random.key(0), tmp_path / "a.png")
    (ax,) = fig.axes
    assert not ax.get_legend().get_window_extent().overlaps(ax.get_window_extent())
    assert fig.get_tightbbox().x1 <= fig.get_size_inches()[0]  # and is not cut off


def test_training_plot_marks_where_metrics_stopped_being_finite(tmp_path):
    # A run that diverges ends in nulls: as gaps only, the curve just stopped (or, for a
    # first chunk that diverged, an empty panel with a meta-step axis around 0).
    records = [
        {"step": 20, "loss": 2.0, "val_mse": 1.0},
        {"step": 40, "loss": None, "val_mse": None},
    ]
    for logged, steps in ((records, [40]), (records[1:], [40])):
        fig = plots.training_curves(logged, tmp_path / "t.png")
        for ax in fig.axes:
            (marks,) = [line for line in ax.get_lines() if line.get_label() == "not finite"]
            assert list(marks.get_xdata()) == steps
            assert ax.get_xlim()[0] < 40 < ax.get_xlim()[1]


def test_plots_label_their_axes_readably(tmp_path):
    # Steps are whole numbers (no ticks at 0.25 inner steps), and a log axis spanning
    # under a decade reads 3, 4, 6, not 3×10^0, 4×10^0, 6×10^0.
    results = {"5": {"inner_steps": [0, 1, 2], "mean": [4.0, 4.3, 4.5], "ci95": [1.4] * 3}}
    fig = plots.adaptation_curves(
        {"metric": "mse", "num_tasks": 20, "results": results}, tmp_path / "e.png"
    )
    (ax,) = fig.axes
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks == [0, 1, 2]
    records = [{"step": s, "loss": 6.6 - s / 100, "val_mse": 3.7 - s / 200} for s in (20, 40, 400)]
    fig = plots.training_curves(records, tmp_path / "t.png")
    for ax in fig.axes:  # the val_mse on the same (log) scale as the training mse
        assert ax.get_yscale() == "log"
        labels = [t.get_text() for m in (False, True) for t in ax.get_yticklabels(minor=m)]
        assert any(labels) and not any("times" in label for label in labels), labels
    assert all(float(t) == int(t) for t in fig.axes[0].get_xticks())
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    # A 70,000-step run's labels, at 10,000 a tick, ran together (10000200003000040000...).
    records = [{"step": s, "loss": 1.0, "grad_norm": 2.0} for s in range(1000, 70001, 1000)]
    fig = plots.training_curves(records, tmp_path / "t.png")
    FigureCanvasAgg(fig).draw()  # the labels' extents, as saved
    for ax in fig.axes:
        boxes = [t.get_window_extent() for t in ax.get_xticklabels() if t.get_text()]
        assert len(boxes) >= 3
        assert all(a.x1 + 5 < b.x0 for a, b in zip(boxes, boxes[1:], strict=False)), ax


def test_a_validation_task_that_diverges_makes_the_validation_null(tmp_path, monkeypatch):
    # Not the mean of the others: a NaN validation ranks last for the best checkpoint.
    def curve(exp, task, **kwargs):
        return lambda params, key, num_tasks: np.array([[9.0, 9.0], [1.0, np.nan]])

    monkeypatch.setattr(train, "make_adaptation_curve", curve)
    train.train_and_evaluate(tiny(num_steps=50, eval_every=50), tmp_path)
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record["val_mse"] is None


def test_an_interrupt_after_a_logged_chunk_logs_it_once(tmp_path, monkeypatch):
    class Bar(train.tqdm):  # the interrupt lands after step 100 is logged and saved
        def update(self, n=1):
            super().update(n)
            if self.n == 100:
                raise KeyboardInterrupt

    monkeypatch.setattr(train, "tqdm", Bar)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(tiny(), tmp_path)
    assert [r["step"] for r in train._read_metrics(tmp_path / "metrics.jsonl")] == [50, 100]


def test_test_tasks_are_not_drawn_from_a_validation_key(tmp_path, monkeypatch):
    # Both come from eval_key: the test tasks of K = 5 must not be step 5's validation.
    train.train_and_evaluate(tiny(num_steps=50, checkpoint_every=50), tmp_path)
    keys, make = [], evaluate.make_adaptation_curve

    def spy(*args, **kwargs):
        curve = make(*args, **kwargs)

        def spied(params, key, **kwargs):
            keys.append(key)
            return curve(params, key, **kwargs)

        return spied

    monkeypatch.setattr(evaluate, "make_adaptation_curve", spy)
    evaluate.evaluate(tiny(eval_shots=(5, 10)), tmp_path, write=False)
    eval_key = train.root_keys(0)[1]
    for step in (0, 5):
        validation_key = jax.random.fold_in(eval_key, step)
        assert not np.array_equal(jax.random.key_data(keys[0]), jax.random.key_data(validation_key))
    # Each K its own tasks, from a tag that is neither a step's nor Figure 2's (2**31 - 1).
    test_key = jax.random.fold_in(eval_key, 2**31 - 2)
    expected = [jax.random.fold_in(test_key, shots) for shots in (5, 10)]
    np.testing.assert_array_equal(
        [jax.random.key_data(k) for k in keys], [jax.random.key_data(k) for k in expected]
    )


def test_an_interrupt_while_the_last_save_finishes_is_one_and_the_rerun_plots(
    tmp_path, monkeypatch, capsys, ctrl_c
):
    # After the last chunk the run waits for orbax to finish its save: a Ctrl-C there
    # was orbax's traceback, with no word of the checkpoint, and no end plots ever.
    wait, sent = train.ocp.CheckpointManager.wait_until_finished, []

    def interrupted_wait(self):
        if sys._getframe(1).f_code.co_name == "finish_saves" and not sent:
            sent.append(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        wait(self)

    monkeypatch.setattr(train.ocp.CheckpointManager, "wait_until_finished", interrupted_wait)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(tiny(num_steps=50), tmp_path)
    assert sent and "interrupted: saved a checkpoint at step 50" in capsys.readouterr().err
    assert not (tmp_path / "plots" / "adaptation.png").exists()
    monkeypatch.undo()
    train.train_and_evaluate(tiny(num_steps=50), tmp_path)
    assert "nothing to train" in capsys.readouterr().err
    assert (tmp_path / "plots" / "adaptation.png").stat().st_size > 0


def test_a_plot_interrupted_half_written_is_drawn_whole_when_run_again(tmp_path, monkeypatch):
    savefig = plots.Figure.savefig

    def cut_short(self, path, *args, **kwargs):
        if "adaptation" in str(path):
            Path(path).write_bytes(b"\x89PNG")
            raise KeyboardInterrupt
        savefig(self, path, *args, **kwargs)

    monkeypatch.setattr(plots.Figure, "savefig", cut_short)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(tiny(num_steps=50), tmp_path)
    monkeypatch.undo()
    train.train_and_evaluate(tiny(num_steps=50), tmp_path)  # nothing to train
    assert (tmp_path / "plots" / "adaptation.png").stat().st_size > 1000
    assert not list((tmp_path / "plots").glob(".*"))


def test_a_save_killed_half_way_leaves_no_temporary_folder_after_the_resume(tmp_path):
    def config(**overrides):
        return tiny(eval_every=50, num_val_tasks=4, **overrides)

    train.train_and_evaluate(config(num_steps=100), tmp_path)
    # What orbax leaves of a save of step 150 that a SIGKILL cut short.
    for folder in ("checkpoints", "best_checkpoint"):
        saved = next((tmp_path / folder).iterdir())
        shutil.copytree(saved, tmp_path / folder / "150.orbax-checkpoint-tmp-1234")
    # A reader (evaluation) deletes none: one may be a save in progress.
    train.restore_params(config(), tmp_path, "best")
    assert len(list(tmp_path.glob("*/*.orbax-checkpoint-tmp-*"))) == 2
    train.train_and_evaluate(config(), tmp_path)
    assert not list(tmp_path.glob("*/*.orbax-checkpoint-tmp-*"))
    with train.checkpoint_manager(tmp_path) as manager:
        assert manager.all_steps() == [100, 200]


def test_a_resume_names_the_log_lines_lost_before_its_checkpoint(tmp_path, capsys):
    train.train_and_evaluate(tiny(num_steps=100), tmp_path)
    path = tmp_path / "metrics.jsonl"
    path.write_text(path.read_text()[:-20])  # the last line cut short, between runs
    capsys.readouterr()
    train.train_and_evaluate(tiny(num_steps=150), tmp_path)
    assert "metrics.jsonl ends at step 50, before the checkpoint's 100" in capsys.readouterr().err
    path.unlink()
    train.train_and_evaluate(tiny(), tmp_path)
    assert "metrics.jsonl ends at step 0, before the checkpoint's 150" in capsys.readouterr().err
    assert [r["step"] for r in train._read_metrics(path)] == [200]
