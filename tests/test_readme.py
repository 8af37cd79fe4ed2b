"""The README's example runs as written, and its two commands are the ones CI relies on."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_api_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["loss"].shape == ()
    assert set(namespace["meta_grad"]) == set(namespace["params"])


def test_readme_opens_with_the_two_commands():
    commands = re.findall(r"^    (python3 .*)$", README, re.M)[:2]
    assert "scripts/train.py --config=maml/configs/sinusoid.py" in commands[0]
    install, test = commands[1].split(" && ")
    assert "pip install" in install and test.startswith("python3 -m pytest")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert any("pip install" in line for line in ci)
    assert test in ci  # CI runs exactly the README's test command
