"""The README's example runs as written, and its two commands are the ones CI relies on."""

import re
import types
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_api_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    ns = types.SimpleNamespace(**namespace)
    assert ns.loss.shape == ()
    assert set(ns.meta_grad) == set(ns.params)
    # The adapted params are the ones the meta-loss scores, and hv is H @ grads.
    meta_loss = ns.maml.meta_loss(
        ns.loss_fn, ns.params, ns.support, ns.query, inner_lr=0.01, num_inner_steps=5
    )
    np.testing.assert_allclose(ns.loss_fn(ns.adapted, ns.query), meta_loss, rtol=1e-6)
    hv = jax.jvp(jax.grad(lambda p: ns.loss_fn(p, ns.support)), (ns.params,), (ns.grads,))[1]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), ns.hv, hv)


def test_readme_opens_with_the_two_commands():
    commands = re.findall(r"^    (python3 .*)$", README, re.M)[:2]
    assert "scripts/train.py --config=maml/configs/sinusoid.py" in commands[0]
    install, test = commands[1].split(" && ")
    assert "pip install" in install and test.startswith("python3 -m pytest")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert any("pip install" in line for line in ci)
    assert test in ci  # CI runs exactly the README's test command
