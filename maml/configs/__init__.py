"""Experiment configs (``get_config(variant)`` per task family) and their validation."""

import math

import ml_collections
import numpy as np

ALGORITHMS = ("maml", "fomaml", "imaml", "pretrain")
# The model each task family runs.
MODELS = {"sinusoid": "mlp", "omniglot": "convnet"}


class ConfigError(ValueError):
    """A config value a run cannot use; the message is one sentence for the user."""


def variant_parts(variant: str, exclusive: tuple[tuple[str, ...], ...]) -> list[str]:
    """The comma-joined parts of a config variant (``"k5,fomaml"``), in order.

    Raises:
      ValueError: a part named twice, or two parts of one ``exclusive`` group.
    """
    parts = variant.split(",") if variant else []
    if len(set(parts)) < len(parts):
        raise ValueError(f"config variant {variant!r} names a part twice")
    for group in exclusive:
        given = [part for part in parts if part in group]
        if len(given) > 1:
            raise ValueError(f"config variant {variant!r}: {given[0]} conflicts with {given[1]}")
    return parts


def _check(config, name, ok, allowed):
    if name not in config:
        return
    value = config[name]
    if not ok(value):
        if isinstance(value, np.generic) and ok(value.item()):  # a config file's numpy
            allowed += f" (a Python int or float, not numpy's {type(value).__name__})"
        raise ConfigError(f"config.{name}={value!r} is invalid: it must be {allowed}.")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_rate(v):
    try:  # an int too large for a float overflows in math.isfinite
        return _is_number(v) and v > 0 and math.isfinite(v)
    except OverflowError:
        return False


def _is_count(v, least):  # JAX counts steps and loops in 32-bit integers, which 2**31 overflows
    return _is_int(v) and least <= v < 2**31


def _is_seed(v):  # without x64, JAX's and NNX's keys keep a seed's low 32 bits only
    return _is_int(v) and 0 <= v < 2**32


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ``ConfigError`` naming the first field whose value is not allowed."""
    for name in (
        "num_steps",
        "meta_batch_size",
        "checkpoint_every",
        "log_every",
        "num_eval_tasks",
        "num_val_tasks",
        "num_validation_classes",
        "num_support",
        "num_query",
        "eval_num_query",
        "num_shots",
        "eval_batch_size",
        "imaml_cg_steps",
    ):
        _check(config, name, lambda v: _is_count(v, 1), "a positive integer below 2**31")
    # One class is no classification: its loss and gradient are 0, its accuracy 100%.
    _check(config, "num_ways", lambda v: _is_count(v, 2), "an integer from 2 to 2**31 - 1")
    for name in ("num_inner_steps", "eval_inner_steps", "eval_every", "eval_report_step"):
        _check(config, name, lambda v: _is_count(v, 0), "a non-negative integer below 2**31")
    # A config file may set a switch to None or "False", which Python reads as false or true.
    for name in ("adapt_norm", "remat", "download"):
        _check(config, name, lambda v: isinstance(v, bool), "True or False")
    for name in ("seed", "split_seed"):
        _check(config, name, _is_seed, "an integer from 0 to 2**32 - 1")
    _check(
        config,
        "eval_seed",
        lambda v: v is None or _is_seed(v),
        "an integer from 0 to 2**32 - 1 (unset: config.seed)",
    )
    for name in ("inner_lr", "outer_lr", "eval_inner_lr", "imaml_lambda"):
        _check(config, name, _is_rate, "a finite positive number")
    for name in ("imaml_cg_damping", "imaml_lam_damping", "eval_proximal_lambda"):
        _check(
            config,
            name,
            lambda v: (_is_number(v) and v == 0) or _is_rate(v),
            "a finite number >= 0",
        )
    _check(
        config,
        "hidden_sizes",
        lambda v: isinstance(v, tuple | list) and all(_is_int(n) and n > 0 for n in v),
        "a tuple of positive integers (the hidden layers' widths)",
    )
    from maml.ops import CONV_IMPLS

    for name, allowed in (
        ("task", ("sinusoid", "omniglot")),
        ("model", ("mlp", "convnet")),
        ("conv_impl", CONV_IMPLS),
        ("algorithm", ALGORITHMS),
    ):
        ok = lambda v, allowed=allowed: v in allowed  # noqa: E731
        _check(config, name, ok, f"one of {', '.join(allowed)}")
    model = MODELS.get(config.get("task"))
    if model and config.get("model", model) != model:
        raise ConfigError(
            f"config.model={config.model!r} is invalid with config.task={config.task!r}: "
            f"it must be {model!r}."
        )
    if config.get("task") in MODELS:
        missing = [name for name in _family_fields(config.task) if name not in config]
        if missing:
            raise ConfigError(
                f"config.task={config.task!r} is invalid with this config, which has no "
                f"config.{missing[0]}: start from maml/configs/{config.task}.py instead."
            )
    _check(config, "init", lambda v: v in ("lecun", "finn"), "one of lecun, finn")
    _check(
        config,
        "eval_shots",
        lambda v: (
            isinstance(v, tuple | list)
            and len(v) > 0
            and all(_is_int(k) and k > 0 for k in v)
            and len(set(v)) == len(v)
        ),
        "a non-empty tuple of distinct positive integers",
    )
    _check(
        config,
        "rotate",
        lambda v: v in ("none", "per_class", "new_classes"),
        "one of none, per_class, new_classes",
    )
    _check(
        config, "split_protocol", lambda v: v in ("finn", "background"), "one of finn, background"
    )
    if "eval_report_step" in config and config.eval_report_step > config.eval_inner_steps:
        raise ConfigError(
            f"config.eval_report_step={config.eval_report_step!r} is invalid: it must be at "
            f"most config.eval_inner_steps={config.eval_inner_steps!r}."
        )
    if config.get("task") == "omniglot":
        _check_omniglot(config)
    for name, every in (("checkpoint_every", "log_every"), ("eval_every", "log_every")):
        if name in config and every in config and config[name] % config[every]:
            raise ConfigError(
                f"config.{name}={config[name]!r} is invalid: it must be a multiple of "
                f"config.{every}={config[every]!r}."
            )


def _family_fields(task: str) -> list[str]:
    """The fields of ``maml/configs/<task>.py``'s default config: each run reads them."""
    from maml.configs import omniglot, sinusoid

    return list({"sinusoid": sinusoid, "omniglot": omniglot}[task].get_config())


def _check_omniglot(config) -> None:
    """Episodes the splits can supply: drawings per class, classes per split."""
    from maml.tasks import omniglot

    for name, shots in (
        ("config.num_shots", config.num_shots),
        ("max(config.eval_shots)", max(config.eval_shots)),
    ):
        if shots + config.num_query > omniglot.NUM_DRAWINGS:
            raise ConfigError(
                f"{name} + config.num_query = {shots + config.num_query} is invalid: Omniglot "
                f"has {omniglot.NUM_DRAWINGS} drawings per character, so it must be at most "
                f"{omniglot.NUM_DRAWINGS}."
            )
    num_validation = config.num_validation_classes
    if config.split_protocol == "finn" and num_validation != omniglot.FINN_NUM_VALIDATION:
        raise ConfigError(
            f"config.num_validation_classes={num_validation!r} is invalid with "
            f"split_protocol='finn', which holds out {omniglot.FINN_NUM_VALIDATION}: it "
            "applies to split_protocol='background' only."
        )
    if not num_validation < omniglot.NUM_BACKGROUND_CHARACTERS:
        raise ConfigError(
            f"config.num_validation_classes={num_validation!r} is invalid: it must be at most "
            f"{omniglot.NUM_BACKGROUND_CHARACTERS - 1}, leaving the background split's "
            f"{omniglot.NUM_BACKGROUND_CHARACTERS} characters one to train on."
        )
    sizes = omniglot.split_character_ids(
        protocol=config.split_protocol,
        split_seed=config.split_seed,
        num_validation_classes=num_validation,
    )
    factor = 4 if config.rotate == "new_classes" else 1
    used = ("train", "validation", "test") if config.get("eval_every", 0) else ("train", "test")
    split = min(used, key=lambda name: len(sizes[name]))
    classes = factor * len(sizes[split])
    if config.num_ways > classes:
        raise ConfigError(
            f"config.num_ways={config.num_ways!r} is invalid: it must be at most {classes}, "
            f"the classes of the {split} split (split_protocol={config.split_protocol!r}, "
            f"rotate={config.rotate!r})."
        )
