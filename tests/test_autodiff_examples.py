"""scripts/autodiff_examples.py reproduces the values of JAX's advanced-autodiff tutorial."""

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "autodiff_examples.py"


@pytest.fixture(scope="module")
def results():
    """The script's ``--json`` output: stdout must be exactly one JSON object."""
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--json"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=300,
    )
    return json.loads(completed.stdout)


@pytest.fixture(scope="session")
def script():
    """The script as a module; importing it must not run anything. Once per process:
    absl refuses to define its --json flag twice, as a second setup (this module's
    tests run apart, with other files' tests in between) did."""
    spec = importlib.util.spec_from_file_location("autodiff_examples", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_json_has_every_example(results):
    assert set(results) == {
        "derivatives",
        "hessian",
        "jacobians",
        "hvp_matches_hessian",
        "meta_gradient",
        "td_naive",
        "td_stop_gradient",
        "td_update",
        "straight_through",
        "per_example_grads",
        "per_example_speedup",
    }


def test_jacobians_of_the_logistic_predict(results):
    j = results["jacobians"]
    assert j["shapes"] == {
        "jacfwd": [4, 3],
        "jacrev": [4, 3],
        "dict": {"W": [4, 3], "b": [4]},
        "hessian": [4, 3, 3],
    }
    assert j["matches"] and max(j["max_abs_error"].values()) < 1e-6
    # Independently of the script's closed forms: central differences in float64
    # of the tutorial's predict, with W and b drawn as the tutorial draws them.
    inputs = np.array(
        [[0.52, 1.12, 0.77], [0.88, -1.08, 0.15], [0.52, 0.06, -1.30], [0.74, -2.49, 1.39]]
    )
    _, W_key, b_key = jax.random.split(jax.random.key(0), 3)
    W = np.asarray(jax.random.normal(W_key, (3,)), np.float64)
    b = float(jax.random.normal(b_key, ()))

    def predict(W):
        return 1.0 / (1.0 + np.exp(-(inputs @ W + b)))

    eye = 1e-6 * np.eye(3)
    fd = np.stack([(predict(W + e) - predict(W - e)) / 2e-6 for e in eye], axis=1)
    np.testing.assert_allclose(j["jacobian"], fd, atol=1e-6)


def test_higher_order_derivatives(results):
    np.testing.assert_allclose(results["derivatives"], [4.0, 10.0, 6.0, 0.0])


def test_hessian_of_dot_product(results):
    np.testing.assert_allclose(results["hessian"], 2.0 * np.eye(3))


def test_hvp_matches_dense_hessian(results):
    h = results["hvp_matches_hessian"]
    assert h["shape"] == [30, 40] and h["allclose"] is True and h["matches"] is True
    assert h["max_abs_error"] < 1e-5 and h["max_abs_error_vs_closed_form"] < 1e-5


def test_hvp_check_catches_a_hessian_taken_at_the_wrong_point(script, monkeypatch):
    # The tutorial's f = sum(tanh(X)^2) has a Hessian that varies with X, so an hvp
    # evaluated anywhere but at X fails the check (x . x, with H = 2 I everywhere, would not).
    real_hvp = script.hvp
    monkeypatch.setattr(script, "hvp", lambda f, x, v: real_hvp(f, 0.0 * x, v))
    h = script.hvp_example()
    assert h["matches"] is False and h["allclose"] is False


def test_meta_gradient_matches_finite_differences(results):
    m = results["meta_gradient"]
    assert m["relative_error"] < 1e-6
    assert m["max_abs_diff_vs_tutorial_formula"] < 1e-12
    assert m["meta_grad_norm"] > 0.0
    np.testing.assert_allclose(m["meta_grad_first"], m["finite_difference_first"], atol=1e-6)
    # Two computations (a float64 central difference is off in the last digits), not one
    # under two names.
    assert m["meta_grad_first"] != m["finite_difference_first"]


def test_td_updates(results):
    # The tutorial's pseudo-loss -1/2 (r_t + v(s_t) - v(s_tm1))^2 at its transition: the
    # TD error is 1 + 0.1 - (-0.1) = 1.2, and with the target's gradient stopped the
    # gradient is the TD(0) update 1.2 * grad v(s_tm1) = 1.2 * s_tm1.
    td_error, s_tm1, s_t = 1.2, np.array([1.0, 2.0, -1.0]), np.array([2.0, 1.0, 0.0])
    np.testing.assert_allclose(results["td_naive"], -td_error * (s_t - s_tm1), rtol=1e-6)
    np.testing.assert_allclose(results["td_stop_gradient"], td_error * s_tm1, rtol=1e-6)
    np.testing.assert_allclose(results["td_update"], td_error * s_tm1, rtol=1e-6)
    np.testing.assert_allclose(results["td_stop_gradient"], [1.2, 2.4, -1.2], rtol=1e-6)


def test_straight_through_estimator(results):
    assert results["straight_through"] == {
        "f": 3.0,
        "straight_through_f": 3.0,
        "grad_f": 0.0,
        "grad_straight_through_f": 1.0,
    }


def test_per_example_gradients(results):
    np.testing.assert_allclose(results["per_example_grads"], [[1.2, 2.4, -1.2]] * 2, rtol=1e-6)


def test_per_example_speedup_times_jit_of_the_vmapped_gradient(script, monkeypatch):
    # What is timed, not how fast (speed is not asserted): the tutorial's
    # jit(vmap(grad)) against the same vmap(grad) without jit.
    jitted, real_jit = [], jax.jit

    def recording_jit(fn, *args, **kwargs):
        jitted.append(fn)
        return real_jit(fn, *args, **kwargs)

    monkeypatch.setattr(script.jax, "jit", recording_jit)
    calls = []
    monkeypatch.setattr(
        script, "_median_seconds", lambda fn, **kw: calls.append(fn()) or float(len(calls))
    )
    s = script.per_example_speedup(repeats=1)
    assert len(jitted) == 1 and s == {"unjitted_s": 1.0, "jitted_s": 2.0, "speedup": 0.5}
    unjitted_grads, jitted_grads = calls
    np.testing.assert_allclose(jitted_grads, unjitted_grads, rtol=1e-6)
    np.testing.assert_allclose(jitted_grads, [[1.2, 2.4, -1.2]] * 2, rtol=1e-6)


def test_functions_are_importable_and_agree(script):
    np.testing.assert_allclose(script.derivatives(2.0), [17.0, 16.0, 6.0, 0.0])
    np.testing.assert_allclose(script.td_examples()["td_stop_gradient"], [1.2, 2.4, -1.2])
    assert script.straight_through_example(2.7)["f"] == 3.0


@pytest.mark.parametrize(
    "arg, expected",
    [
        ("--bogus", "error: Unknown command line flag 'bogus'"),
        ("--json=maybe", "error: flag --json=maybe"),
        ("extra", "error: unexpected argument 'extra'"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(arg, expected):
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), arg], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 2 and completed.stdout == ""
    assert completed.stderr.strip().splitlines() == [completed.stderr.strip()]
    assert completed.stderr.startswith(expected)


def test_median_seconds_is_per_call_and_leaves_out_the_warm_up(script, monkeypatch):
    """A fake clock and asynchronous calls, paid when waited for: the warm-up (compile)
    costs 100 s, then each call of repeat r costs (1, 2, 9)[r] s."""
    clock, pending, calls = [0.0], [0.0], []

    def fn():
        calls.append(1)
        pending[0] += 100.0 if len(calls) == 1 else (1.0, 2.0, 9.0)[(len(calls) - 2) // 5]
        return len(calls)

    def wait(x):
        clock[0] += pending[0]
        pending[0] = 0.0
        return x

    monkeypatch.setattr(script, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(script.jax, "block_until_ready", wait)
    assert script._median_seconds(fn, number=5, repeats=3) == 2.0  # the median per call
    assert len(calls) == 1 + 5 * 3
