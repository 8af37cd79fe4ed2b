"""The command-line scripts: invalid configs stop with one line and exit status 2;
SIGTERM saves a checkpoint."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from maml import train
from maml.configs import ConfigError, sinusoid, validate
from maml.configs import omniglot as omniglot_configs

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "maml" / "configs" / "sinusoid.py")


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("num_steps", 0, "positive integer"),
        ("meta_batch_size", -3, "positive integer"),
        ("num_support", 0, "positive integer"),
        ("checkpoint_every", 0, "positive integer"),
        ("log_every", 0, "positive integer"),
        ("num_eval_tasks", 0, "positive integer"),
        ("num_inner_steps", -1, "non-negative integer"),
        ("eval_inner_steps", -2, "non-negative integer"),
        ("inner_lr", 0.0, "positive number"),
        ("outer_lr", -1e-3, "positive number"),
        ("eval_inner_lr", 0.0, "positive number"),
        ("imaml_cg_steps", 0, "positive integer"),
        ("imaml_lambda", -1.0, "positive number"),
        ("imaml_cg_damping", -1.0, "a finite number >= 0"),
        ("imaml_lam_damping", float("inf"), "a finite number >= 0"),
        ("imaml_lam_damping", False, "a finite number >= 0"),
        ("eval_proximal_lambda", -0.5, "a finite number >= 0"),
        ("eval_every", -1000, "non-negative integer"),
        ("eval_report_step", -1, "non-negative integer"),
        ("algorithm", "reptile", "one of maml, fomaml, imaml, pretrain"),
        ("eval_shots", (), "non-empty tuple"),
        ("init", "zeros", "one of lecun, finn"),
        ("rotate", "sometimes", "one of none, per_class, new_classes"),
        ("num_val_tasks", 0, "positive integer"),
        ("task", "mnist", "one of sinusoid, omniglot"),
        ("model", "resnet", "one of mlp, convnet"),
        ("model", "convnet", "invalid with config.task='sinusoid': it must be 'mlp'"),
        ("seed", 2**32, "an integer from 0 to 2**32 - 1"),
        ("inner_lr", float("inf"), "finite positive number"),
        ("hidden_sizes", (40, 0), "tuple of positive integers"),
        ("eval_seed", 2**32 + 7, "an integer from 0 to 2**32 - 1"),  # would repeat seed 7
        ("eval_shots", 5, "non-empty tuple"),  # an int from a config file, not a traceback
        ("eval_shots", (5, 5), "distinct positive integers"),  # evaluated twice, shown once
        ("num_steps", np.int64(100), "(a Python int or float, not numpy's int64)"),
        ("inner_lr", np.float64(-1.0), "finite positive number."),  # the sign, not the type
        # Every count a run divides by or draws that many of, Omniglot's included.
        ("num_query", 0, "positive integer"),
        ("eval_num_query", 0, "positive integer"),
        ("eval_batch_size", 0, "positive integer"),
        ("num_shots", 0, "positive integer"),
        ("num_validation_classes", 0, "positive integer"),
        ("num_steps", True, "positive integer"),  # a bool is an int to Python
        ("inner_lr", True, "finite positive number"),
        ("hidden_sizes", 40, "tuple of positive integers"),  # not a TypeError
        ("eval_shots", (5, 0), "distinct positive integers"),
        ("split_protocol", "lake", "one of finn, background"),
        # JAX counts in 32-bit integers: 2**31 overflowed with a traceback (or hung).
        ("log_every", 2**31, "a positive integer below 2**31"),
        ("imaml_cg_steps", 2**31, "a positive integer below 2**31"),
        ("num_inner_steps", 2**31, "a non-negative integer below 2**31"),
        ("num_ways", 2**31, "an integer from 2 to 2**31 - 1"),
        # A config file's None or "False" was read as a switch off or on.
        ("remat", "False", "True or False"),
        ("adapt_norm", None, "True or False"),
        ("download", 1, "True or False"),
    ],
)
def test_validate_names_field_value_and_what_is_allowed(field, value, allowed):
    # As a config file may build it: a new ConfigDict, whose fields take any type.
    config = ml_collections.ConfigDict({**sinusoid.get_config().to_dict(), field: value})
    with pytest.raises(ConfigError) as e:
        validate(config)
    message = str(e.value)
    assert f"config.{field}={value!r}" in message and allowed in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            {"num_ways": 1},
            "config.num_ways=1 is invalid: it must be an integer from 2 to 2**31 - 1",
        ),
        ({"num_validation_classes": 50}, "applies to split_protocol='background' only"),
        (
            {"split_protocol": "background", "num_validation_classes": 1200},
            "config.num_validation_classes=1200 is invalid: it must be at most 963",
        ),
        (  # all 964 held out: none left to train on
            {"split_protocol": "background", "num_validation_classes": 964},
            "config.num_validation_classes=964 is invalid: it must be at most 963",
        ),
        (
            {"eval_report_step": 11},
            "config.eval_report_step=11 is invalid: it must be at most config.eval_inner_steps=10",
        ),
    ],
)
def test_validate_omniglot_classes(overrides, expected):
    config = omniglot_configs.get_config()
    config.update(overrides)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        validate(config)


def test_the_background_splits_validation_size_is_a_config_field():
    config = omniglot_configs.get_config("5way1shot,background")
    config.lock()  # as --config.FIELD=VALUE sees it: a field the file lacks is refused
    config.num_validation_classes = 50
    validate(config)


@pytest.mark.parametrize(
    "config, task, model",
    [
        (sinusoid.get_config(), "omniglot", "convnet"),
        (omniglot_configs.get_config(), "sinusoid", "mlp"),
    ],
)
def test_validate_refuses_another_familys_task(config, task, model):
    config.update(task=task, model=model)
    with pytest.raises(ConfigError, match=f"start from maml/configs/{task}.py"):
        validate(config)


@pytest.mark.parametrize(
    "module, field",
    [(sinusoid, "num_query"), (sinusoid, "model"), (omniglot_configs, "split_protocol")],
)
def test_validate_refuses_a_config_missing_a_field(module, field):
    # As a config file that deletes a field may build it: a traceback once the run reads it.
    config = module.get_config()
    del config[field]
    with pytest.raises(ConfigError, match=f"no config.{field}: start from maml/configs/"):
        validate(config)


@pytest.mark.parametrize(
    "variant, expected",
    [
        ("20way1shot,5way5shot", "20way1shot conflicts with 5way5shot"),
        ("fomaml,imaml", "fomaml conflicts with imaml"),
        ("background,background", "names a part twice"),
    ],
)
def test_omniglot_variants_that_conflict_are_refused(variant, expected):
    with pytest.raises(ValueError, match=expected):
        omniglot_configs.get_config(variant)


def test_sinusoid_variants_combine_and_conflicts_are_refused():
    config = sinusoid.get_config("k5,fomaml,tiny")
    assert (config.num_support, config.num_query, config.algorithm) == (5, 5, "fomaml")
    assert config.num_steps == 200
    for variant, expected in (
        ("k5,k20", "k5 conflicts with k20"),
        ("k5,k5", "names a part twice"),
        ("k5,,tiny", "unknown sinusoid config variant ''"),
        ("pretrain,fomaml", "pretrain conflicts with fomaml"),
    ):
        with pytest.raises(ValueError, match=expected):
            sinusoid.get_config(variant)


@pytest.mark.parametrize(
    "module, variants",
    [
        (sinusoid, ("k5", "k20", "pretrain", "fomaml", "tiny")),
        (
            omniglot_configs,
            (*omniglot_configs.SHAPES, "fomaml", "imaml", "background", "finn_lr", "tiny"),
        ),
    ],
)
def test_an_unknown_variant_is_refused_naming_the_variants_there_are(module, variants):
    with pytest.raises(ValueError, match="unknown .* config variant 'k6': ") as error:
        module.get_config("k6")
    for name in variants:
        assert re.search(rf"\b{name}\b", str(error.value).split("'k6'")[1]), name
        validate(module.get_config(name))


def test_omniglot_tiny_applies_last():
    for variant in ("tiny,20way1shot", "20way1shot,tiny"):
        config = omniglot_configs.get_config(variant)
        validate(config)  # eval_report_step was 20-way's 5 > tiny's 2 inner steps
        assert (config.num_ways, config.num_steps) == (20, 4)


def test_validate_refuses_a_rate_no_float_holds():
    # A config file may start a rate as an int (a float field would not take it).
    config = ml_collections.ConfigDict({"outer_lr": 10**400})
    with pytest.raises(ConfigError, match="finite positive number"):
        validate(config)


@pytest.mark.parametrize(
    "variant, overrides, expected",
    [
        ("5way1shot", {"num_ways": 101}, "at most 100, the classes of the validation split"),
        ("5way1shot", {"num_ways": 101, "eval_every": 0}, None),  # no validation split
        ("5way1shot", {"num_ways": 424, "eval_every": 0}, "at most 423, the classes of the test"),
        ("5way1shot", {"num_ways": 101, "rotate": "new_classes"}, None),  # 400 classes
        ("5way5shot", {"eval_shots": (16,)}, "max(config.eval_shots) + config.num_query = 21"),
        ("5way1shot", {"num_shots": 20}, "config.num_shots + config.num_query = 21"),
        ("5way1shot", {"split_seed": -1}, "config.split_seed=-1 is invalid"),
        ("5way1shot", {"conv_impl": "fft"}, "one of patches, phases"),
        # The bounds themselves are allowed.
        ("5way1shot", {"num_ways": 100}, None),  # the 100 validation characters
        ("5way1shot", {"num_shots": 10, "num_query": 10}, None),  # all 20 drawings
        ("5way5shot", {"eval_shots": (15,)}, None),
        ("5way1shot", {"eval_report_step": 10}, None),  # eval_inner_steps
        # background: 964 - 900 = 64 characters to train on, fewer than the other splits'.
        ("5way1shot,background", {"num_validation_classes": 900, "num_ways": 64}, None),
        (
            "5way1shot,background",
            {"num_validation_classes": 900, "num_ways": 65},
            "at most 64, the classes of the train split",
        ),
    ],
)
def test_validate_omniglot_episodes_the_splits_cannot_supply(variant, overrides, expected):
    config = omniglot_configs.get_config(variant)
    config.update(overrides)
    if expected is None:
        validate(config)
        return
    with pytest.raises(ConfigError) as e:
        validate(config)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_default_configs_are_valid():
    for variant in (None, "k5", "k20", "pretrain", "fomaml", "tiny"):
        validate(sinusoid.get_config(variant))


@pytest.mark.parametrize("field", ["checkpoint_every", "eval_every"])
def test_saving_and_validation_must_fall_on_log_every(field):
    # Both run between chunks of log_every steps: eval_every=1500 would never validate.
    config = sinusoid.get_config()
    config[field] = 1500
    with pytest.raises(ConfigError, match="multiple of config.log_every=1000"):
        validate(config)


@pytest.mark.parametrize(
    "module, variant, expected",
    [
        # Finn et al.'s sinusoid settings, and the evaluation the README reports.
        (
            sinusoid,
            None,
            {
                "hidden_sizes": (40, 40),
                "num_steps": 70_000,
                "meta_batch_size": 25,
                "num_support": 10,
                "num_query": 10,
                "inner_lr": 0.01,
                "num_inner_steps": 1,
                "outer_lr": 1e-3,
                "algorithm": "maml",
                "imaml_lambda": 1.0,
                "num_eval_tasks": 600,
                "eval_shots": (5, 10, 20),
                "eval_inner_steps": 10,
                "eval_inner_lr": 0.01,
                "eval_num_query": 100,
            },
        ),
        (sinusoid, "k5", {"num_support": 5, "num_query": 5, "algorithm": "maml"}),
        (sinusoid, "k20", {"num_support": 20, "num_query": 20}),
        (sinusoid, "fomaml", {"algorithm": "fomaml", "inner_lr": 0.01, "num_inner_steps": 1}),
        (sinusoid, "pretrain", {"algorithm": "pretrain"}),
        # Finn et al.'s Table 1 settings, and the test-time steps they report.
        (
            omniglot_configs,
            "5way1shot",
            {
                "num_ways": 5,
                "num_shots": 1,
                "num_query": 1,
                "meta_batch_size": 32,
                "inner_lr": 0.4,
                "num_inner_steps": 1,
                "eval_report_step": 3,
                "outer_lr": 1e-3,
                "num_steps": 60_000,
                "algorithm": "maml",
                "split_protocol": "finn",
                "split_seed": 1,
                "rotate": "per_class",
                "adapt_norm": True,
                "imaml_lambda": 2.0,
                "eval_shots": (1,),
                "eval_inner_steps": 10,
                "eval_inner_lr": 0.4,
                "num_eval_tasks": 600,
            },
        ),
        (
            omniglot_configs,
            "5way5shot,fomaml",
            {"num_shots": 5, "num_query": 5, "eval_shots": (5,), "algorithm": "fomaml"},
        ),
        (
            omniglot_configs,
            "20way1shot,background",
            {
                "num_ways": 20,
                "meta_batch_size": 16,
                "inner_lr": 0.1,
                "eval_inner_lr": 0.1,
                "num_inner_steps": 5,
                "eval_report_step": 5,
                "split_protocol": "background",
            },
        ),
        (omniglot_configs, "20way5shot,imaml", {"num_shots": 5, "algorithm": "imaml"}),
    ],
)
def test_variants_carry_their_settings(module, variant, expected):
    config = module.get_config(variant)
    validate(config)
    assert {field: config[field] for field in expected} == expected


@pytest.mark.parametrize("shape", omniglot_configs.SHAPES)
def test_finn_lr_takes_the_inner_steps_of_finns_code(shape):
    # cbfinn/maml's inner loss summed the support cross-entropies and divided by K: N times
    # the mean ours takes, so its 0.4 (5-way) and 0.1 (20-way) were steps of 2.0 on ours.
    plain = omniglot_configs.get_config(shape).to_dict()
    for variant in (f"{shape},finn_lr", f"finn_lr,{shape},fomaml"):
        config = omniglot_configs.get_config(variant)
        validate(config)
        assert (config.inner_lr, config.eval_inner_lr) == (2.0, 2.0)
        changed = {k for k, v in config.to_dict().items() if plain[k] != v}
        assert changed <= {"inner_lr", "eval_inner_lr", "algorithm"}, changed


def test_omniglots_default_variant_is_5way1shot():
    default = omniglot_configs.get_config().to_dict()
    assert default == omniglot_configs.get_config("5way1shot").to_dict()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A workdir of the tiny sinusoid config trained to step 50 (a checkpoint there),
    trained once per module: tests that change it take a ``copy``."""
    workdir = tmp_path_factory.mktemp("tiny_run") / "w"
    args = ["--config.num_steps=50", "--config.checkpoint_every=50"]
    assert run(f"--config={CONFIG}:tiny", f"--workdir={workdir}", *args).returncode == 0
    return workdir


def copy(workdir, tmp_path):
    return shutil.copytree(workdir, tmp_path / "w")


def run(*args, cwd=ROOT, env=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


@pytest.mark.parametrize("script", ["train.py", "evaluate.py", "meta_gradient.py"])
def test_help_lists_the_shared_flags(script):
    # absl's --help lists only the main module's flags; --config and --workdir are _common's.
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    shared = ["--config", "--workdir", "--cpu_devices"]
    shared += ["--checkpoint"] if script != "train.py" else []
    for flag in shared:
        assert re.search(rf"^  {flag}:", result.stdout, re.M), flag


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--config.meta_batch_size=0", "config.meta_batch_size=0 is invalid"),
        ("--config.inner_lr=-0.5", "config.inner_lr=-0.5 is invalid"),
        ("--config.algorithm=reptile", "config.algorithm='reptile' is invalid"),
        ("--config.num_steps=abc", "--config.num_steps=abc"),
        ("--config.no_such_field=1", "unknown config field 'no_such_field':"),
        ("--config.num_step=1", "unknown config field 'num_step' (did you mean 'num_steps'?):"),
        ("--config.num_steps.x=1", "unknown config field 'num_steps.x':"),
        ("tiny", "unexpected argument 'tiny'"),  # absl would drop it and train the default
        ("--cpu_devices=2", "multiple of the 2 devices"),
        ("--cpu_devices=0", "--cpu_devices"),
        ("--config.seed=18446744073709551616", "config.seed=18446744073709551616 is invalid"),
        ("--config.hidden_sizes=(0,)", "config.hidden_sizes=(0,) is invalid"),
    ],
)
def test_train_script_rejects_bad_values_before_compute(tmp_path, override, expected):
    result = run(f"--config={CONFIG}", override, f"--workdir={tmp_path / 'w'}")
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()  # stopped before doing anything


def test_out_of_memory_is_one_line(tmp_path, memory_capped):
    result = subprocess.run(  # in 8 GB: the meta-batch below needs 5.9 TB
        memory_capped(
            [sys.executable, ROOT / "scripts" / "train.py", f"--config={CONFIG}:tiny"]
            + ["--config.meta_batch_size=200000000", f"--workdir={tmp_path}"]
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: out of memory: ")
    assert "config.meta_batch_size" in result.stderr


@pytest.mark.parametrize(
    "script, override, expected",
    [
        ("train.py", "--config.hidden_sizes=(20,20)", "(hidden_sizes [40, 40] -> [20, 20])"),
        ("evaluate.py", "--config.hidden_sizes=(20,20)", "is from another config: params/"),
        ("train.py", "--config.meta_batch_size=8", "meta_batch_size 4 -> 8"),
        ("train.py", "--config.num_steps=100", None),  # resumes and trains on
    ],
)
def test_scripts_on_another_runs_checkpoint_fail_in_one_line(
    tiny_run, tmp_path, script, override, expected
):
    args = [f"--config={CONFIG}:tiny", f"--workdir={copy(tiny_run, tmp_path)}"]
    args.append("--config.checkpoint_every=50")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args, override],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if expected is None:
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line, no noise
    assert expected in result.stderr


@pytest.mark.parametrize("damage", ["manifest", "data", "emptied"])
def test_corrupt_checkpoint_fails_in_one_short_line(tiny_run, tmp_path, damage):
    workdir = copy(tiny_run, tmp_path)
    args = [f"--config={CONFIG}:tiny", f"--workdir={workdir}", "--config.checkpoint_every=50"]
    saved = workdir / "checkpoints" / "50" / "default"
    if damage == "manifest":
        (saved / "manifest.ocdbt").write_text("x")
    elif damage == "emptied":  # orbax also logged "Metadata file does not exist"
        shutil.rmtree(saved.parent)
        saved.parent.mkdir()
    else:  # the second half of every data file inverted
        for path in (saved / "ocdbt.process_0" / "d").iterdir():
            data = path.read_bytes()
            half = len(data) // 2
            path.write_bytes(data[:half] + bytes(255 - b for b in data[half:]))
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "evaluate.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Not dozens of "Event loop is closed" tracebacks from orbax's other reads, nor
    # tensorstore's spec (several KB of JSON) in the message.
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    expected = "is incomplete" if damage == "emptied" else "cannot restore checkpoint"
    assert expected in result.stderr and len(result.stderr) < 800
    assert "TensorStore" not in result.stderr


def test_train_script_rejects_a_file_as_workdir(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("")
    result = run(f"--config={CONFIG}:tiny", f"--workdir={path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: --workdir={path} is a file, not a directory"


@pytest.mark.parametrize("where", ["under", "checkpoints"])
def test_train_script_checks_its_directories_before_compute(tmp_path, where):
    path = tmp_path / "notes.txt"
    path.write_text("")
    if where == "under":
        workdir, expected = path / "run", f"--workdir={path / 'run'} cannot be made: {path} is"
    else:  # a file where the checkpoints go would fail the first save
        workdir = tmp_path / "run"
        workdir.mkdir()
        path.rename(workdir / "checkpoints")
        expected = "--workdir's checkpoints="
    result = run(f"--config={CONFIG}:tiny", f"--workdir={workdir}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert expected in result.stderr


def test_corrupt_config_json_fails_in_one_line(tiny_run, tmp_path):
    workdir = copy(tiny_run, tmp_path)
    args = [f"--config={CONFIG}:tiny", f"--workdir={workdir}", "--config.checkpoint_every=50"]
    # Cut short; valid JSON but no settings (a traceback, or a resume that checked nothing).
    message = "config.json, the run's settings, is not a JSON object of settings"
    (workdir / "config.json").write_text('{"task": "sinus')
    result = run(*args, "--config.num_steps=100")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert message in result.stderr
    # The script turns that CheckpointError into its one line: the other two texts need
    # only raise it, which a run in this process shows without paying for another script.
    config = sinusoid.get_config("tiny")
    config.num_steps, config.checkpoint_every = 100, 50
    for text in ("null", "[1, 2]"):
        (workdir / "config.json").write_text(text)
        with pytest.raises(train.CheckpointError, match=re.escape(message)):
            train.train_and_evaluate(config, workdir)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("def get_config(:\n", "cannot load the --config file: SyntaxError"),
        ("def get_config():\n    return 5\n", "get_config() returned int, not a ConfigDict"),
        # Not "unknown config field": the file's own error, or no get_config at all.
        (
            "import os\ndef get_config():\n    return os.no_such_name\n",
            "cannot load the --config file: AttributeError: module 'os' has no attribute",
        ),
        ("x = {}['k']\n", "cannot load the --config file: KeyError"),
        ("x = 1\n", "cannot load the --config file: it defines no get_config()"),
    ],
)
def test_broken_config_file_fails_in_one_line(tmp_path, source, expected):
    (tmp_path / "broken.py").write_text(source)
    result = run(f"--config={tmp_path / 'broken.py'}", f"--workdir={tmp_path / 'w'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert expected in result.stderr


def test_train_script_stops_a_diverged_run_with_one_line(tmp_path):
    result = run(
        f"--config={CONFIG}:tiny",
        "--config.outer_lr=10",
        "--config.log_every=1",
        "--config.checkpoint_every=1",
        f"--workdir={tmp_path}",
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: meta-training diverged: loss or gradient not finite at step")


def test_train_script_keeps_xla_flags_device_count_without_cpu_devices(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=3")
    result = run(f"--config={CONFIG}", f"--workdir={tmp_path / 'w'}", env=env)
    assert result.returncode == 2 and "multiple of the 3 devices" in result.stderr


def test_unknown_variant_and_missing_config_file(tmp_path):
    for config, expected in (
        (f"{CONFIG}:no_such_variant", "unknown sinusoid config variant 'no_such_variant'"),
        (
            str(tmp_path / "missing.py"),
            f"error: cannot load the --config file: [Errno 2] No such file or directory: "
            f"'{tmp_path / 'missing.py'}'",
        ),
    ):
        result = run(f"--config={config}", f"--workdir={tmp_path}")
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert expected in result.stderr


@pytest.mark.parametrize(
    "which, expected",
    [
        ("latest", "no checkpoint"),
        ("best", "train with config.eval_every > 0"),
        ("last", "--checkpoint"),
    ],
)
def test_evaluate_script_without_checkpoint(tmp_path, which, expected):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "evaluate.py"),
            f"--config={CONFIG}:tiny",
            f"--workdir={tmp_path}",
            f"--checkpoint={which}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_sigterm_saves_a_checkpoint(tmp_path):
    # What a batch scheduler sends before it kills a job (and `kill PID` to a run
    # started in the background, where SIGINT is ignored): no finished work is lost.
    # (tests/test_train.py checks that a run resumed from such a checkpoint ends bit for bit.)
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "scripts" / "train.py"),
            f"--config={CONFIG}:tiny",
            f"--workdir={tmp_path}",
            "--config.num_steps=1000000",
            "--config.checkpoint_every=500000",
        ],
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    seen = ""
    while "loss=" not in seen:  # the progress bar shows the first chunk's loss
        char = proc.stderr.read(1)
        assert char, f"train.py ended before its first chunk: {seen}"
        seen += char
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, seen + rest
    assert "Traceback" not in rest
    saved = re.search(r"interrupted: saved a checkpoint at step (\d+)", rest)
    assert saved, rest
    step = int(saved.group(1))
    assert step >= 50 and step % 50 == 0
    assert (tmp_path / "checkpoints" / str(step)).is_dir()
    logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").open()]
    assert logged == list(range(50, step + 1, 50))


def test_gpu_session_stops_at_once_on_what_it_lacks(tmp_path):
    # A checkout with nothing carried and no ../shared beside it, as on the device
    # machine, but no GPU: each lack is named in session.log before any work.
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "gpu_session.sh", checkout / "scripts")
    stub = tmp_path / "bin" / "nvidia-smi"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\necho 'GPU 0: stub'\n")
    stub.chmod(0o755)
    plan = "background,20way1shot 100 0;20way1shot, background 500 0"
    env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}", "OUT": str(tmp_path)}
    env.update(PLAN=plan, BENCH="0", JAX_PLATFORMS="cpu", MAML_CACHE_DIR=str(tmp_path))
    result = subprocess.run(
        ["bash", "scripts/gpu_session.sh", "60"],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    missing = [
        line.split("missing: ", 1)[1]
        for line in (tmp_path / "session.log").read_text().splitlines()
        if "missing: " in line
    ]
    assert missing[0].startswith("a JAX GPU backend")
    assert missing[1].startswith("the Omniglot cache")
    # The parts of a variant in any order; a space in one ends the plan in a bash error.
    assert missing[2:] == [
        ".runs/all_runs.zip",
        "a plan item 'variant cap [reserve]', variant without spaces "
        "(got '20way1shot, background 500 0')",
    ]


class Failed(Exception):
    """What ``_common.fail`` raises in these tests, with its message, instead of exiting."""


@pytest.fixture
def common(monkeypatch):
    """``scripts/_common.py``, its ``fail`` raising ``Failed``."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import _common

    def fail(message):
        raise Failed(message)

    monkeypatch.setattr(_common, "fail", fail)
    return _common


def test_common_errors_are_one_line_and_orbax_write_noise_is_dropped(tmp_path, monkeypatch, common):
    import logging

    from maml.tasks.omniglot import DatasetNotFoundError

    with pytest.raises(Failed, match="no Omniglot here"), common.user_errors():
        raise DatasetNotFoundError("no Omniglot here")
    # A read-only mount (root passes any chmod, so os.access stands in for it):
    # refused where the script writes, not where it only reads.
    monkeypatch.setattr(common.os, "access", lambda *args: False)
    common.check_directory(tmp_path, "--workdir", writable=False)
    with pytest.raises(Failed, match="is not writable"):
        common.check_directory(tmp_path, "--workdir")
    # Writable but not searchable (no X): its files cannot be created either.
    monkeypatch.setattr(common.os, "access", lambda path, mode: not mode & os.X_OK)
    with pytest.raises(Failed, match="is not writable"):
        common.check_directory(tmp_path, "--workdir")

    # orbax logs each failed write of a full disk with its traceback: dropped, as
    # the one-line error says it all; its other errors, and others' logs, are kept.
    def record(path, message, level=logging.ERROR):
        return logging.LogRecord("absl", level, path, 1, message, None, None)

    assert not common._drop_failed_write_logs(record("/x/orbax/y.py", "No space left on device"))
    assert common._drop_failed_write_logs(record("/x/orbax/y.py", "something else"))
    assert common._drop_failed_write_logs(record("/x/maml/y.py", "No space left on device"))


def test_out_of_memory_while_running_is_one_line(common):
    # What a jitted call that cannot get its memory raises (the compiler's is RESOURCE_EXHAUSTED).
    from jax.errors import JaxRuntimeError

    error = "INTERNAL: Error dispatching computation: " * 3 + "Out of memory allocating 17 bytes."
    with pytest.raises(Failed) as e, common.user_errors():
        raise JaxRuntimeError(error)
    assert str(e.value).startswith("out of memory: Out of memory allocating 17 bytes; lower ")


def test_a_tilde_after_the_equals_sign_is_the_home_directory(tmp_path, monkeypatch, common):
    # The shell leaves the ~ of "--workdir=~/runs/a" as it is: the run went to ./~/runs/a.
    from absl import flags

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copy(CONFIG, tmp_path / "mine.py")  # and --config=~/mine.py was not found
    try:
        common._parse_flags(["train.py", "--config=~/mine.py:tiny", "--workdir=~/runs/a"])
        assert flags.FLAGS.workdir == str(tmp_path / "runs" / "a")
        assert flags.FLAGS.config.num_steps == sinusoid.get_config("tiny").num_steps
    finally:
        flags.FLAGS.unparse_flags()
    # absl's single dash, and a ~ no shell saw (a launcher's argument list, quotes).
    for workdir in (["-workdir=~/runs/b"], ["--workdir", "~/runs/b"]):
        try:
            common._parse_flags(["train.py", "-config=~/mine.py:tiny", *workdir])
            assert flags.FLAGS.workdir == str(tmp_path / "runs" / "b")
        finally:
            flags.FLAGS.unparse_flags()
    # The analysis scripts' --output_dir too.
    output_flags = flags.FlagValues()
    flags.DEFINE_string("output_dir", None, "", flag_values=output_flags)
    monkeypatch.setattr(common.flags, "FLAGS", output_flags)
    common._parse_flags(["meta_gradient.py", "--output_dir=~/out"])
    assert output_flags.output_dir == str(tmp_path / "out")


def test_a_workdir_under_a_link_to_nothing_is_refused(tmp_path, common):
    # runs/ linked to a scratch folder since purged: mkdir said only "File exists: 'runs'".
    (tmp_path / "runs").symlink_to(tmp_path / "scratch")
    expected = f"{tmp_path / 'runs'} links to {tmp_path / 'scratch'}, which does not exist"
    with pytest.raises(Failed, match=re.escape(expected)):
        common.check_directory(tmp_path / "runs" / "a", "--workdir")
