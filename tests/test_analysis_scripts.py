"""scripts/meta_gradient.py, scripts/analyze_curvature.py and their helpers in maml.analysis."""

import json
import math
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from maml import analysis, core, imaml, second_order, train
from maml.configs import ConfigError, sinusoid
from maml.configs import omniglot as omniglot_configs
from maml.models import MLP, functional
from maml.tasks.sinusoid import Sinusoid

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "maml" / "configs" / "sinusoid.py") + ":tiny"


def start(script, *args, env=None):
    return subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / script), f"--config={CONFIG}", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )


def finish(process):
    stdout, stderr = process.communicate(timeout=300)
    return process.returncode, stdout, stderr


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A 50-step tiny sinusoid run (1761 parameters)."""
    workdir = tmp_path_factory.mktemp("ckpt")
    config = sinusoid.get_config("tiny")
    config.num_steps = config.checkpoint_every = config.log_every = 50
    train.train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def outputs(workdir, tmp_path_factory):
    """Both scripts on the 50-step checkpoint, run side by side."""
    out = tmp_path_factory.mktemp("out")
    # meta_gradient.py on two devices, with a meta-batch that does not divide over them
    # (it computes on one), and a setting other than the run's (warned of and recorded).
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    processes = {
        "meta_gradient": start(
            "meta_gradient.py",
            f"--workdir={workdir}",
            f"--output_dir={out}",
            "--inner_steps=2",
            "--num_tasks=2",
            "--repeats=1",
            "--config.meta_batch_size=3",
            "--config.imaml_cg_damping=0.5",  # reaches iMAML's gradient: recomputed below
            "--config.imaml_lam_damping=3.0",
            env=env,
        ),
        "curvature": start(
            "analyze_curvature.py",
            f"--workdir={workdir}",
            f"--output_dir={out}",
            "--lanczos_iters=20",
            "--num_probes=1",
            "--top_k=3",
            "--num_tasks=2",
        ),
    }
    results = {}
    for name, process in processes.items():
        code, stdout, stderr = finish(process)
        assert code == 0, stderr
        results[name] = stdout
        results[f"{name}_stderr"] = stderr
    return out, results


def _reference_meta_gradients(workdir, num_tasks, num_inner_steps):
    """What meta_gradient.py reports for the tiny run's checkpoint, computed here in
    float64 on the first training batch: the meta-loss, and each method's meta-gradient's
    norm and cosines with the others'."""
    config = sinusoid.get_config("tiny")
    exp, params, _ = train.restore_params(config, workdir)
    train_key, _ = train.root_keys(config.seed)
    episode = exp.task.sample(jax.random.fold_in(train_key, 0), num_tasks)
    with jax.enable_x64(True):
        params, episode = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), (params, episode))
        apply_fn, _ = train.build_model(config, config.seed, jnp.float64)

        def loss_fn(p, batch):
            return exp.task.loss(apply_fn(p, batch[0]), batch[1])

        support, query = episode["support"], episode["query"]
        kwargs = dict(inner_lr=config.inner_lr, num_inner_steps=num_inner_steps)
        fns = analysis.meta_gradient_fns(
            loss_fn,
            **kwargs,
            imaml_lambda=config.imaml_lambda,
            imaml_cg_steps=config.imaml_cg_steps,
            imaml_cg_damping=0.5,
            imaml_lam_damping=3.0,
        )
        grads = {name: jax.jit(fn)(params, support, query) for name, fn in fns.items()}
        meta_loss = core.batched_meta_loss(loss_fn, params, support, query, **kwargs)
        norms = {name: float(analysis.tree_norm(g)) for name, g in grads.items()}
        cosine = {
            f"{a}/{b}": float(analysis.cosine_similarity(grads[a], grads[b]))
            for a in grads
            for b in grads
        }
        return float(meta_loss), norms, cosine


def test_meta_gradient_json_and_checks(outputs, workdir):
    out, stdout = outputs
    report = json.loads((out / "meta_gradient.json").read_text())
    assert (out / "meta_gradient.png").stat().st_size > 0
    assert "finite differences" in stdout["meta_gradient"]
    for key in ("params_source", "dtype", "num_params", "num_tasks", "inner_steps", "results"):
        assert key in report
    assert report["params_source"] == "latest checkpoint step 50"
    changes = [
        "meta_batch_size 4 -> 3",
        "imaml_cg_damping 0.0 -> 0.5",
        "imaml_lam_damping 0.0 -> 3.0",
    ]
    assert report["config_changes"] == changes
    assert "; ".join(changes) in stdout["meta_gradient_stderr"]
    assert report["dtype"] == "float64"
    assert [r["num_inner_steps"] for r in report["results"]] == [2]
    assert report["inner_steps"] == [2] and report["num_tasks"] == 2  # not meta_batch_size's 3
    assert report["num_params"] == 1761 and report["repeats"] == 1
    # Each number is of its own method, steps and tasks: recomputed here.
    (r,) = report["results"]
    meta_loss, norms, cosine = _reference_meta_gradients(workdir, num_tasks=2, num_inner_steps=2)
    assert r["meta_loss"] == pytest.approx(meta_loss, rel=1e-9)
    for name in analysis.METHODS:
        assert r["methods"][name]["norm"] == pytest.approx(norms[name], rel=1e-9), name
    assert set(r["cosine"]) == {
        "exact/first_order",
        "exact/imaml",
        "first_order/imaml",
        "exact/exact_remat",
    }
    for pair, cos in r["cosine"].items():
        assert cos == pytest.approx(cosine[pair], abs=1e-9), pair
    fd = r["finite_difference"]
    assert fd["tolerance"] == 1e-6 and fd["passed"] is True
    for r in report["results"]:
        assert set(r["methods"]) == set(analysis.METHODS)
        for m in r["methods"].values():
            assert m["median_s"] > 0 and m["norm"] > 0
            assert m["memory"] is None or m["memory"]["temp"] >= 0
        assert r["finite_difference"]["relative_error"] < 1e-6
        cos = r["cosine"]["exact/first_order"]
        assert -1 < cos <= 1
        # Second order is not first order: the inner Hessian term matters.
        assert cos < 1 - 1e-6
        assert r["methods"]["exact"]["norm"] != pytest.approx(
            r["methods"]["first_order"]["norm"], rel=1e-6
        )
        # Rematerialisation recomputes; it must not change the gradient.
        assert r["cosine"]["exact/exact_remat"] == pytest.approx(1.0, abs=1e-12)
        assert r["exact_remat_max_abs_diff"] < 1e-10


def test_analyze_curvature_json(outputs):
    out, stdout = outputs
    report = json.loads((out / "curvature.json").read_text())
    assert (out / "curvature.png").stat().st_size > 0
    assert "2/lambda_max" in stdout["curvature"]
    unstable = sum(not t["stable"] for t in report["per_task"])
    assert f"per task: {unstable} of 2 UNSTABLE" in stdout["curvature"]
    assert report["checkpoint"] == "latest" and report["step"] == 50
    assert report["num_adapted_params"] == report["num_params"] == 1761
    # Two functions, two spectra (a copy of one for the other would pass the checks below).
    assert report["meta_loss"]["eigenvalues"] != report["support_loss"]["eigenvalues"]
    assert report["meta_loss"]["value"] != report["support_loss"]["value"]
    for name in ("support_loss", "meta_loss"):
        r = report[name]
        assert len(r["eigenvalues"]) == 3
        assert r["eigenvalues"] == sorted(r["eigenvalues"], reverse=True)
        grid, density = np.asarray(r["grid"]), np.asarray(r["density"])
        # The default grid spans the Ritz values: the top eigenvalue lies inside it.
        assert grid[0] < r["eigenvalues"][0] < grid[-1] and np.all(density >= 0)
    s = report["stability"]
    assert s["inner_lr"] == 0.01
    assert s["limit_lr"] == pytest.approx(2 / report["support_loss"]["eigenvalues"][0])
    assert len(report["per_task"]) == 2
    # The batch's support loss is the mean of the tasks': its top curvature is no larger.
    assert s["lambda_max"] <= max(t["lambda_max"] for t in report["per_task"]) * (1 + 1e-3)


@pytest.mark.parametrize(
    "script, which, expected",
    [
        ("analyze_curvature.py", "latest", "checkpoints:"),
        ("analyze_curvature.py", "best", "eval_every"),
        ("meta_gradient.py", "latest", "checkpoints:"),
        ("meta_gradient.py", "best", "eval_every"),
    ],
)
def test_analysis_without_checkpoint_exits_2(tmp_path, script, which, expected):
    code, stdout, stderr = finish(
        start(script, f"--workdir={tmp_path}", f"--checkpoint={which}", "--num_tasks=2")
    )
    assert code == 2
    lines = stderr.strip().splitlines()  # one line: no orbax logs before it
    assert len(lines) == 1 and lines[0].startswith("error: no checkpoint"), stderr
    assert expected in lines[0]
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.parametrize("script", ["analyze_curvature.py", "meta_gradient.py"])
def test_analysis_without_the_asked_checkpoint_is_one_line_without_config_json(
    workdir, tmp_path, script
):
    # A run with checkpoints/ but no best_checkpoint/ (eval_every=0) and no config.json:
    # the missing-settings warning is for a checkpoint that is read, not before the error.
    copied = tmp_path / "run"
    shutil.copytree(workdir, copied)
    (copied / "config.json").unlink()
    code, _, stderr = finish(
        start(script, f"--workdir={copied}", "--checkpoint=best", "--num_tasks=2")
    )
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no checkpoint"), stderr


@pytest.mark.parametrize(
    "flag, expected",
    [
        ("--num_tasks=0", "--num_tasks=0 must be a positive integer"),
        # JAX counts in 32-bit integers: 2**31 overflows them.
        ("--num_tasks=2147483648", "--num_tasks=2147483648 must be a positive integer below"),
        ("--inner_steps=1,2147483648", "--inner_steps=1,2147483648 must be non-negative"),
        ("--fd_eps=0", "--fd_eps=0.0 must be a positive number"),
        ("--fd_eps=inf", "--fd_eps=inf must be a positive number"),
        ("--cpu_devices=2", "--cpu_devices: meta_gradient.py computes on one device"),
        ("--inner_steps=", "--inner_steps= must be non-negative integers"),
        ("--inner_steps=2,-1", "--inner_steps=2,-1 must be non-negative integers"),
        ("--checkpoint=best", "--checkpoint=best needs the --workdir of a training run"),
    ],
)
def test_meta_gradient_rejects_bad_flags(tmp_path, flag, expected):
    code, _, stderr = finish(start("meta_gradient.py", f"--output_dir={tmp_path}", flag))
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert stderr.startswith(f"error: {expected}")


def test_meta_gradient_out_of_memory_is_one_line(tmp_path, memory_capped):
    # In 8 GB: the meta-gradients of a million tasks need more.
    flags = "--num_tasks=1000000", "--inner_steps=1", "--repeats=1", f"--output_dir={tmp_path}"
    process = subprocess.Popen(
        memory_capped(
            [sys.executable, ROOT / "scripts" / "meta_gradient.py", f"--config={CONFIG}", *flags]
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    code, _, stderr = finish(process)
    assert code == 2 and "Traceback" not in stderr, stderr[-2000:]
    assert stderr.startswith("error: out of memory: ") and len(stderr.strip().splitlines()) == 1
    # Its own flags: it measures remat and not, so config.remat=True would not help.
    assert "lower --num_tasks" in stderr and "remat" not in stderr


@pytest.mark.parametrize("flag", ["--num_tasks=0", "--lanczos_iters=2147483648"])
def test_analyze_curvature_refuses_a_count_out_of_range(tmp_path, flag):
    code, _, stderr = finish(start("analyze_curvature.py", f"--workdir={tmp_path}", flag))
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith(f"error: {flag} must be a positive integer below 2**31")


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_analyze_curvature_refuses_a_seed_no_key_takes(tmp_path, seed):
    args = f"--output_dir={tmp_path}", f"--seed={seed}"
    code, _, stderr = finish(start("analyze_curvature.py", *args))
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("error: flag --seed=") and "Traceback" not in stderr


def test_analyze_curvature_refuses_top_k_past_the_parameters(workdir, tmp_path):
    flags = "--top_k=1800", "--lanczos_iters=1800", f"--output_dir={tmp_path}"
    code, _, stderr = finish(start("analyze_curvature.py", f"--workdir={workdir}", *flags))
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("error: --top_k=1800 must not exceed the 1761 parameters")


def test_curvature_of_a_diverging_inner_loop_is_one_line(workdir, tmp_path):
    args = "--lanczos_iters=3", "--num_probes=1", "--top_k=1", "--num_tasks=2"
    curvature = start(
        "analyze_curvature.py",
        f"--workdir={workdir}",
        f"--output_dir={tmp_path}",
        "--config.inner_lr=1e30",
        *args,
    )
    code, _, stderr = finish(curvature)
    assert code == 2 and "Traceback" not in stderr, stderr  # was matplotlib's NaN axis limits
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: the meta-loss is nan with inner_lr=1e+30 and 1 inner steps")
    assert "warning: evaluating with settings other than" in stderr
    assert not (tmp_path / "curvature.json").exists()


def test_a_checkpoint_of_another_task_family_is_named_so(workdir):
    config = omniglot_configs.get_config("5way1shot,tiny")
    with pytest.raises(ConfigError, match=r"holds a run of another task family \(task 'sinusoid'"):
        train.restore_params(config, workdir)


def test_meta_gradient_checks_float32_against_a_float64_reference(tmp_path):
    # A float32 central difference (eps 1e-2) read 2.5e-5 here, and ~100% error on the
    # Omniglot conv net's correct gradient; the float64 one of the same params, 2e-7.
    args = "--nox64", "--inner_steps=2", "--num_tasks=2", "--repeats=1", f"--output_dir={tmp_path}"
    code, _, stderr = finish(start("meta_gradient.py", *args))
    assert code == 0, stderr
    report = json.loads((tmp_path / "meta_gradient.json").read_text())
    assert report["dtype"] == "float32"
    (result,) = report["results"]
    check = result["finite_difference"]
    assert check["passed"] and check["relative_error"] < 1e-5, check
    assert check["tolerance"] == 1e-3  # a float32 gradient's, against the float64 reference


def test_meta_gradient_takes_the_largest_seed(tmp_path):
    # Its probe key is seed + 1, which must stay a 64-bit signed seed. The same run
    # checks two more things: 0 inner steps is allowed (the pre-adaptation loss's
    # gradient), and a difference step too small for float64 to move the params by
    # (p + 1e-300 v == p: a difference of 0) fails the check, not reads as passed.
    args = "--inner_steps=0", "--num_tasks=1", "--repeats=1", f"--config.seed={2**32 - 1}"
    args += ("--fd_eps=1e-300",)
    code, stdout, stderr = finish(start("meta_gradient.py", f"--output_dir={tmp_path}", *args))
    assert code == 0, stderr
    report = json.loads((tmp_path / "meta_gradient.json").read_text())
    (result,) = report["results"]
    assert result["num_inner_steps"] == 0
    check = result["finite_difference"]
    assert check["finite_difference"] == 0 and check["relative_error"] == 1, check
    assert check["passed"] is False and "FAILED" in stdout


# --- maml.analysis -----------------------------------------------------------------


@pytest.fixture
def mlp64(x64):
    """The tiny config's MLP (1761 params) and 3 sinusoid tasks, in float64."""
    apply_fn, params = functional(MLP((1, 40, 40, 1), rngs=nnx.Rngs(0), param_dtype=jnp.float64))
    task = Sinusoid(num_support=10, num_query=10, dtype=jnp.float64)
    episode = task.sample(jax.random.key(1), 3)

    def loss_fn(p, batch):
        x, y = batch
        return task.loss(apply_fn(p, x), y)

    return loss_fn, params, episode


def test_lanczos_lambda_max_matches_dense_hessian(mlp64):
    loss_fn, params, episode = mlp64
    support = episode["support"]

    def dense_hessian(g):
        return np.asarray(jax.jit(lambda p: second_order.hessian(g, p)[0])(params))

    def f(p):
        return analysis.support_loss(loss_fn, p, support)

    exact = np.linalg.eigvalsh(dense_hessian(f))[::-1]
    result = jax.jit(
        lambda p, key: analysis.curvature(f, p, top_k=2, num_iters=40, num_probes=1, key=key)
    )(params, jax.random.key(2))
    np.testing.assert_allclose(result["eigenvalues"], exact[:2], rtol=1e-6)
    # Each of the 3 tasks against its own dense Hessian.
    per_task = jax.jit(
        lambda p, key: analysis.per_task_lambda_max(loss_fn, p, support, num_iters=60, key=key)
    )(params, jax.random.key(3))
    for i in range(3):
        task = jax.tree.map(lambda x, i=i: x[i], support)
        own = np.linalg.eigvalsh(dense_hessian(lambda p, task=task: loss_fn(p, task)))[-1]
        assert float(per_task[i]) == pytest.approx(own, rel=1e-6), i


def test_adapted_only_holds_the_frozen_leaves(mlp64):
    loss_fn, params, episode = mlp64
    task = jax.tree.map(lambda x: x[0], episode["support"])
    flat, unravel = ravel_pytree(params)

    def hessian_of(f):
        return np.asarray(jax.hessian(lambda z: f(unravel(z), task))(flat))

    H = hessian_of(loss_fn)
    # A scalar rate adapts every leaf, or (0) none.
    np.testing.assert_array_equal(
        hessian_of(analysis.adapted_only(loss_fn, params, inner_lr=0.1)), H
    )
    assert np.all(hessian_of(analysis.adapted_only(loss_fn, params, inner_lr=0.0)) == 0)
    rates = jax.tree.map(lambda _: 0.1, params)
    rates["layers"][1]["kernel"] = 0.0  # the 40x40 middle kernel frozen
    H_adapted = hessian_of(analysis.adapted_only(loss_fn, params, inner_lr=rates))
    frozen = ravel_pytree(jax.tree.map(lambda r, x: jnp.full_like(x, r == 0), rates, params))[0]
    frozen = np.asarray(frozen) > 0
    assert frozen.sum() == 40 * 40
    np.testing.assert_allclose(H_adapted[~frozen][:, ~frozen], H[~frozen][:, ~frozen], rtol=1e-10)
    assert np.all(H_adapted[frozen] == 0) and np.all(H_adapted[:, frozen] == 0)


def test_meta_gradients_against_finite_differences(mlp64):
    loss_fn, params, episode = mlp64
    support, query = episode["support"], episode["query"]
    fns = analysis.meta_gradient_fns(
        loss_fn, inner_lr=0.01, num_inner_steps=2, imaml_lambda=1.0, imaml_cg_steps=5
    )
    grads = {
        name: jax.jit(fns[name])(params, support, query)
        for name in ("exact", "exact_remat", "first_order")
    }

    @jax.jit
    def f(p):
        return core.batched_meta_loss(loss_fn, p, support, query, inner_lr=0.01, num_inner_steps=2)

    direction = analysis.random_unit_direction(jax.random.key(4), params)
    assert float(analysis.tree_norm(direction)) == pytest.approx(1.0)
    check = analysis.finite_difference_check(f, params, grads["exact"], direction, eps=1e-6)
    assert check["relative_error"] < 1e-6
    # The first-order gradient is not the meta-loss's gradient: the check can fail.
    wrong = analysis.finite_difference_check(f, params, grads["first_order"], direction, eps=1e-6)
    assert wrong["relative_error"] > 1e-4
    assert float(analysis.cosine_similarity(grads["exact"], grads["exact_remat"])) == (
        pytest.approx(1.0, abs=1e-12)
    )
    # iMAML's is taken at the lambda given (Omniglot's is 2, the sinusoid's 1).
    fns_10 = analysis.meta_gradient_fns(
        loss_fn, inner_lr=0.01, num_inner_steps=2, imaml_lambda=10.0, imaml_cg_steps=5
    )
    imaml_1, imaml_10 = (jax.jit(g["imaml"])(params, support, query) for g in (fns, fns_10))
    assert float(analysis.cosine_similarity(imaml_1, imaml_10)) < 1 - 1e-6


def test_support_loss_is_the_mean_over_tasks(mlp64):
    loss_fn, params, episode = mlp64
    support = episode["support"]
    num_tasks = jax.tree.leaves(support)[0].shape[0]
    per_task = [
        loss_fn(params, jax.tree.map(lambda x, i=i: x[i], support)) for i in range(num_tasks)
    ]
    expected = float(np.mean(per_task))
    assert float(analysis.support_loss(loss_fn, params, support)) == pytest.approx(
        expected, rel=1e-12
    )


def test_finite_difference_error_is_relative_to_the_larger_derivative(x64):
    # f = sum(p**2): central differences are exact, d/dv f = <2p, v> = 2 * 3 = 6.
    f = lambda p: jnp.sum(p**2)  # noqa: E731
    params, direction = jnp.array([1.0, 2.0]), jnp.array([1.0, 1.0])

    def check(grads):
        return analysis.finite_difference_check(f, params, grads, direction, eps=1e-3)

    exact = check(2 * params)
    assert exact["finite_difference"] == pytest.approx(6.0, rel=1e-9)
    assert exact["analytic"] == 6.0 and exact["relative_error"] < 1e-9
    # |6 - 3| / 6 and |6 - 12| / 12: the larger of the two scales, either way round.
    assert check(params)["relative_error"] == pytest.approx(0.5, rel=1e-9)
    assert check(4 * params)["relative_error"] == pytest.approx(0.5, rel=1e-9)
    # A zero gradient is wholly wrong (error 1), not infinitely so.
    assert check(jnp.zeros(2))["relative_error"] == pytest.approx(1.0, rel=1e-9)


def test_cosine_similarity_and_stability():
    a = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
    neg = jax.tree.map(jnp.negative, a)
    zero = jax.tree.map(jnp.zeros_like, a)
    assert float(analysis.cosine_similarity(a, a)) == pytest.approx(1.0)
    assert float(analysis.cosine_similarity(a, neg)) == pytest.approx(-1.0)
    assert float(analysis.cosine_similarity(a, zero)) == 0.0
    for bad in (jnp.nan, jnp.inf):  # a diverged gradient: no cosine, not 0
        diverged = {"w": jnp.array([bad, 2.0]), "b": jnp.array(3.0)}
        assert np.isnan(float(analysis.cosine_similarity(a, diverged)))
    for bad in (math.nan, math.inf):  # a diverged lambda_max: no verdict, never stable
        s = analysis.sgd_stability(0.4, bad)
        assert not s["stable"] and math.isnan(s["limit_lr"]) and math.isnan(s["ratio"])
    assert analysis.sgd_stability(0.01, 100.0)["stable"]
    unstable = analysis.sgd_stability(0.4, 10.0)
    assert not unstable["stable"] and unstable["ratio"] == pytest.approx(2.0)
    assert analysis.sgd_stability(0.1, -1.0)["limit_lr"] == float("inf")


def test_time_and_memory_reports_compiled_sizes():
    out, stats = analysis.time_and_memory(lambda x: jnp.sin(x) @ x, jnp.ones((8, 8)), repeats=2)
    assert out.shape == (8, 8) and len(stats["times_s"]) == 2
    assert stats["median_s"] > 0
    assert stats["memory"] is None or stats["memory"]["output"] == 8 * 8 * 4

    class NoAnalysis:
        def memory_analysis(self):
            return None

    assert analysis.compiled_memory(NoAnalysis()) is None


def test_time_and_memory_times_each_call_apart_from_the_compile(monkeypatch):
    # A fake clock: the compile takes 10 s, the three calls 3, 1 and 1.5 s.
    ticks = iter([0.0, 10.0, 10.0, 13.0, 13.0, 14.0, 14.0, 15.5])
    clock = types.SimpleNamespace(perf_counter=lambda: next(ticks))
    monkeypatch.setattr(analysis, "time", clock)  # analysis's clock only, not jax's
    _, stats = analysis.time_and_memory(jnp.sin, jnp.ones(3), repeats=3)
    assert stats["compile_s"] == 10.0 and stats["times_s"] == [3.0, 1.0, 1.5]
    assert stats["median_s"] == 1.5  # not the first call's, nor the mean


def load_script(name, monkeypatch):
    """scripts/NAME.py as a module, its flags unregistered again: both scripts define
    --checkpoint (in _common), which absl refuses to define twice in one process."""
    import importlib.util

    from absl import flags

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))  # for its _common
    # Imported once per process: its flags (--config, --workdir) stay, for the other
    # tests that parse them with it.
    import _common  # noqa: F401

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    defined = set(flags.FLAGS)
    spec.loader.exec_module(script)
    for flag in set(flags.FLAGS) - defined:
        delattr(flags.FLAGS, flag)
    return script


def test_curvature_of_frozen_leaves_is_of_the_adapted_leaves(monkeypatch):
    # A leaf the inner loop keeps fixed (inner rate 0: BatchNorm with adapt_norm=False)
    # is no direction inner SGD moves in: the support spectra leave it out.
    script = load_script("analyze_curvature", monkeypatch)
    adapted_only, traced = analysis.adapted_only, []

    def spy(loss_fn, params, *, inner_lr):
        restricted = adapted_only(loss_fn, params, inner_lr=inner_lr)

        def counted(p, batch):
            traced.append(jax.tree.structure(inner_lr) == jax.tree.structure(params))
            return restricted(p, batch)

        return counted

    monkeypatch.setattr(analysis, "adapted_only", spy)
    exp = train.build_experiment(sinusoid.get_config("tiny"))
    params = exp.init_params
    frozen = jax.tree_util.tree_map_with_path(  # the first layer kept out of the inner loop
        lambda path, x: 0.0 if jax.tree_util.keystr(path).startswith("['layers'][0]") else 0.01,
        params,
    )
    frozen_size = sum(np.size(x) for x in jax.tree.leaves(params["layers"][0]))
    assert frozen_size > 0
    config = exp.config.copy_and_resolve_references()
    config.num_inner_steps = 2  # the tiny config's 1 would hide a meta-loss of 1 step
    fake = types.SimpleNamespace(config=config, task=exp.task, loss_fn=exp.loss_fn, inner_lr=frozen)
    report = script.analyze(fake, params, num_tasks=2, top_k=1, num_iters=2, num_probes=1, seed=0)
    assert report["num_adapted_params"] == report["num_params"] - frozen_size
    # The batch's support spectrum (eigenvalues, density, value) and the per-task
    # lambda_max all see the restricted loss, never the full one.
    assert len(traced) >= 4 and all(traced)
    # The meta-loss is the full loss after the config's inner steps, on the seed's tasks.
    episode = exp.task.sample(jax.random.split(jax.random.key(0))[0], 2)
    expected = core.batched_meta_loss(
        exp.loss_fn,
        params,
        episode["support"],
        episode["query"],
        inner_lr=frozen,
        num_inner_steps=2,
    )
    assert report["num_inner_steps"] == 2
    assert report["meta_loss"]["value"] == pytest.approx(float(expected), rel=1e-5)


def test_curvature_of_an_imaml_config_is_of_its_proximal_inner_loop(monkeypatch):
    # iMAML's inner steps descend loss + lam/2 ||phi - theta||^2: their stability limit
    # is 2 / (lambda_max + lam), and its meta-loss is the query loss where they end.
    script = load_script("analyze_curvature", monkeypatch)
    config = sinusoid.get_config("tiny")
    config.algorithm, config.num_inner_steps, config.imaml_lambda = "imaml", 3, 30.0
    exp = train.build_experiment(config)
    params = exp.init_params
    report = script.analyze(exp, params, num_tasks=2, top_k=1, num_iters=8, num_probes=1, seed=0)
    episode = exp.task.sample(jax.random.split(jax.random.key(0))[0], 2)

    def proximal_query_loss(support, query):
        phi = imaml.adapt_proximal(
            exp.loss_fn, params, support, inner_lr=0.01, num_inner_steps=3, lam=30.0
        )
        return exp.loss_fn(phi, query)

    expected = jnp.mean(jax.vmap(proximal_query_loss)(episode["support"], episode["query"]))
    maml = core.batched_meta_loss(
        exp.loss_fn, params, episode["support"], episode["query"], inner_lr=0.01, num_inner_steps=3
    )
    assert report["meta_loss"]["value"] == pytest.approx(float(expected), rel=1e-5)
    assert report["meta_loss"]["value"] != pytest.approx(float(maml), rel=1e-3)
    assert report["imaml_lambda"] == 30.0
    for s in (report["stability"], *report["per_task"]):
        assert s["lam"] == 30.0
        assert s["limit_lr"] == pytest.approx(2 / (s["lambda_max"] + 30.0))


def test_sgd_stability_with_imamls_proximal_term():
    # 0.01 < 2 / 190, but not < 2 / (190 + 20): the proximal term's curvature counts.
    assert analysis.sgd_stability(0.01, 190.0)["stable"]
    shifted = analysis.sgd_stability(0.01, 190.0, lam=20.0)
    assert shifted["limit_lr"] == pytest.approx(2 / 210) and not shifted["stable"]
    # A concave top direction (lambda_max < 0) is bounded by the proximal term alone.
    assert analysis.sgd_stability(0.5, -3.0, lam=5.0)["limit_lr"] == pytest.approx(1.0)


def test_curvature_plot_and_summary_add_lambda_for_imaml_only(tmp_path, monkeypatch, capsys):
    # The plot's loop over the top eigenvalues once rebound lam, the proximal strength:
    # a MAML report's title then read "inner_lr * (lambda_max + lambda) / 2".
    script = load_script("analyze_curvature", monkeypatch)
    grid = np.linspace(-1.0, 300.0, 50)
    spectrum = {
        "grid": grid,
        "density": np.exp(-(grid**2)),
        "eigenvalues": [120.0, 10.0],
        "value": 1.0,
        "wall_s": 0.1,
    }
    for lam, title, limit, label in (
        (None, "inner_lr * lambda_max / 2 = 0.6", 200.0, "2/lambda_max"),
        (10.0, "inner_lr * (lambda_max + lambda) / 2 = 0.65", 190.0, "2/(lambda_max + 10)"),
    ):
        stability = analysis.sgd_stability(0.01, 120.0, lam=lam or 0.0)
        report = {
            "config_name": "c",
            "num_params": 10,
            "num_adapted_params": 10,
            "step": 5,
            "num_tasks": 1,
            "lanczos_iters": 4,
            "inner_lr": 0.01,
            "num_inner_steps": 1,
            "support_loss": spectrum,
            "meta_loss": spectrum,
            "imaml_lambda": lam,
            "stability": stability,
            "per_task": [stability],
            "wall_s": 1.0,
        }
        fig = script.plot(report, tmp_path / "c.png")
        assert fig.get_suptitle().endswith(title), fig.get_suptitle()
        lines = [ln for ln in fig.axes[0].lines if ln.get_label().startswith("2 / inner_lr")]
        assert len(lines) == 1 and lines[0].get_xdata()[0] == pytest.approx(limit)
        script.print_summary(report)
        assert f"vs {label} " in capsys.readouterr().out


def test_curvature_summary_counts_the_unstable_tasks(monkeypatch, capsys):
    # The line under the per-task lines: how many are past the limit, the median and
    # largest ratio; a diverged estimate's NaN shows in both, wherever it stands.
    script = load_script("analyze_curvature", monkeypatch)
    spectrum = {"eigenvalues": [1.0], "value": 1.0, "wall_s": 0.1}
    report = {
        "config_name": "c",
        "num_params": 10,
        "num_adapted_params": 10,
        "step": 5,
        "num_tasks": 4,
        "lanczos_iters": 4,
        "support_loss": spectrum,
        "meta_loss": spectrum,
        "stability": analysis.sgd_stability(0.01, 1.0),
        "wall_s": 1.0,
    }
    for tops, line in (
        (
            (100.0, 500.0, 400.0),
            "per task: 2 of 3 UNSTABLE at these parameters (ratio median 2, max 2.5)",
        ),
        (
            (100.0, 500.0, 400.0, math.inf),
            "per task: 3 of 4 UNSTABLE at these parameters (ratio median nan, max nan)",
        ),
    ):
        report["per_task"] = [analysis.sgd_stability(0.01, top) for top in tops]
        script.print_summary(report)
        assert f"  {line}\n" in capsys.readouterr().out


def test_sgd_stability_at_the_limit_and_at_zero_curvature():
    # inner_lr = 2 / lambda_max exactly: the top direction oscillates forever, not stable.
    at_limit = analysis.sgd_stability(0.2, 10.0)
    assert at_limit["limit_lr"] == 0.2 and at_limit["ratio"] == 1.0
    assert not at_limit["stable"]
    # No curvature (a loss linear in the adapted leaves): no limit, and no division by 0.
    flat = analysis.sgd_stability(0.1, 0.0)
    assert flat["limit_lr"] == math.inf and flat["ratio"] == 0.0 and flat["stable"]


def test_meta_gradient_fns_pass_their_settings_on(x64):
    apply_fn, params = functional(MLP((1, 4, 1), rngs=nnx.Rngs(0), param_dtype=jnp.float64))
    task = Sinusoid(num_support=5, num_query=5, dtype=jnp.float64)
    episode = task.sample(jax.random.key(1), 2)
    support, query = episode["support"], episode["query"]

    def loss_fn(p, batch):
        return task.loss(apply_fn(p, batch[0]), batch[1])

    kwargs = dict(inner_lr=0.03, num_inner_steps=3)
    fns = analysis.meta_gradient_fns(
        loss_fn,
        **kwargs,
        imaml_lambda=2.0,
        imaml_cg_steps=3,
        imaml_cg_damping=0.5,
        imaml_lam_damping=3.0,
    )
    expected = jax.jit(
        lambda p: imaml.batched_imaml_loss_and_grad(
            loss_fn,
            p,
            support,
            query,
            **kwargs,
            lam=2.0,
            num_cg_steps=3,
            cg_damping=0.5,
            lam_damping=3.0,
        )[1]
    )(params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15),
        jax.jit(fns["imaml"])(params, support, query),
        expected,
    )
    # exact_remat gives exact's numbers, so only its computation shows the remat.
    names = {
        name: {e.primitive.name for e in jax.make_jaxpr(fns[name])(params, support, query).eqns}
        for name in ("exact", "exact_remat")
    }
    assert "remat2" in names["exact_remat"] and "remat2" not in names["exact"]


def test_curvature_takes_num_grid_points(x64):
    f = lambda p: 0.5 * jnp.sum(jnp.arange(1.0, 5.0) * p**2)  # noqa: E731
    result = jax.jit(
        lambda p, key: analysis.curvature(
            f, p, top_k=1, num_iters=4, num_probes=1, key=key, num_grid_points=37
        )
    )(jnp.zeros(4), jax.random.key(0))
    assert result["grid"].shape == result["density"].shape == (37,)
    np.testing.assert_allclose(result["eigenvalues"], [4.0], rtol=1e-10)


def test_analysis_plots_name_counts_right_and_hide_nothing(tmp_path, monkeypatch):
    # "meta-loss (1 inner steps)"; ticks at 1.5 inner steps; and a backend without
    # memory analysis left an empty memory panel that read as nothing measured at 0.
    grid = np.linspace(-1.0, 30.0, 50)
    spectrum = {"grid": grid, "density": np.exp(-(grid**2)), "eigenvalues": [20.0, 10.0]}
    report = {
        "config_name": "c",
        "num_params": 10,
        "step": 5,
        "inner_lr": 0.01,
        "num_inner_steps": 1,
        "support_loss": spectrum,
        "meta_loss": spectrum,
        "per_task": [{"lambda_max": 25.0}],
        "stability": {"ratio": 0.1},
    }
    fig = load_script("analyze_curvature", monkeypatch).plot(report, tmp_path / "c.png")
    assert fig.axes[1].get_title() == "meta-loss (1 inner step)"
    methods = {
        name: {"median_s": 1e-3 * (i + 1), "memory": None}
        for i, name in enumerate(analysis.METHODS)
    }
    pairs = ("exact/first_order", "exact/imaml", "first_order/imaml")
    report = {
        "config_name": "c",
        "num_params": 10,
        "params_source": "initial",
        "results": [
            {"num_inner_steps": n, "methods": methods, "cosine": dict.fromkeys(pairs, 0.5)}
            for n in (1, 2, 5)
        ],
    }
    fig = load_script("meta_gradient", monkeypatch).plot(report, tmp_path / "m.png")
    for ax in (fig.axes[0], fig.axes[2]):
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert [t.get_text() for t in fig.axes[1].texts] == ["not reported by this backend"]
