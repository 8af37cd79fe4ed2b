"""What the scripts share: config flags, and turning user errors into one line and exit 2."""

import contextlib
import logging as std_logging
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from maml.configs import ConfigError, validate

_ML_COLLECTIONS = os.path.dirname(ml_collections.__file__)

config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally path:variant.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, plots.")
flags.DEFINE_integer(
    "cpu_devices",
    None,
    "On the CPU backend, split the cores into this many XLA devices and shard the "
    "tasks over them (in training, config.meta_batch_size must divide by it). 2 on a 2-core "
    "machine ran the Omniglot meta-step 10-15% faster than 1 in paired runs (not in "
    "every run). Unset: JAX's default "
    "(1, or XLA_FLAGS=--xla_force_host_platform_device_count).",
    lower_bound=1,
)


def define_checkpoint_flag() -> flags.FlagHolder[str]:
    """``--checkpoint``, for the scripts that restore a trained model; returns its holder."""
    return flags.DEFINE_enum(
        "checkpoint",
        "latest",
        ["latest", "best"],
        "Which checkpoint of --workdir: the latest, or the one with the best validation "
        "metric during training (written when config.eval_every > 0).",
    )


def fail(message: str) -> None:
    """Prints ``error: message`` and exits with status 2 at once: no interpreter
    shutdown, where orbax's cancelled reads of a failed restore print tracebacks."""
    print(f"error: {message}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)


def check_count(name: str, value: int, *, least: int = 1) -> None:
    """Fails unless the flag ``--name``'s ``value`` is an integer from ``least`` to
    2**31 - 1: JAX counts tasks, steps and loops in 32-bit integers."""
    if not least <= value < 2**31:
        kind = "a positive integer" if least == 1 else "a non-negative integer"
        fail(f"--{name}={value} must be {kind} below 2**31")


def _parse_flags(argv):
    # The shell leaves the ~ of "--config=~/c.py" as it is: expanded before the parse
    # that loads the file (the paths below, after it).
    argv = [re.sub(r"^(--?config=)(~.*)", _home, a) for a in argv]
    try:
        argv = flags.FLAGS(argv)
    except flags.Error as e:
        fail(one_line(e))
    except (AttributeError, KeyError) as e:
        # An override naming no field fails inside ml_collections; the file's own
        # code (or a file with no get_config) fails elsewhere.
        where = traceback.extract_tb(e.__traceback__)[-1]
        if "get_config" in str(e):
            fail("cannot load the --config file: it defines no get_config()")
        if where.filename.startswith(_ML_COLLECTIONS):
            # str(e) is the field's repr, escapes and all, with ml_collections' suggestion
            # if any, or (a field under a number, num_steps.x) names the path looked up.
            name = re.search(r"Attempting to lookup: ([\w.]+)", str(e)) or re.match(
                r"[\\\"']+([\w.]+)", str(e)
            )
            guess = re.search(r'Did you mean "([\w.]+)"', str(e))
            hint = f" (did you mean {guess[1]!r}?)" if guess else ""
            fail(
                f"unknown config field {name[1] if name else one_line(e)!r}{hint}: the config "
                "file lists the fields there are."
            )
        fail(f"cannot load the --config file: {type(e).__name__}: {one_line(e)}")
    except Exception as e:  # the config file's own code failed (SyntaxError, ...)
        fail(f"cannot load the --config file: {type(e).__name__}: {one_line(e)}")
    # The shell expands ~ in "--workdir ~/runs" but not in "--workdir=~/runs" (nor in
    # a launcher's argument list), which would write to a folder named ~ here.
    for name in ("workdir", "output_dir"):
        if name in flags.FLAGS and flags.FLAGS[name].value:
            flags.FLAGS[name].value = os.path.expanduser(flags.FLAGS[name].value)
    if len(argv) > 1:  # absl would drop it: "--config=PATH VARIANT" would train the default
        fail(
            f"unexpected argument {argv[1]!r}: the scripts take only flags "
            "(a config variant goes after a colon: --config=PATH:VARIANT)"
        )
    return argv


def _home(match: re.Match) -> str:
    return match[1] + os.path.expanduser(match[2])


def one_line(error: Exception) -> str:
    """``error``'s message on one line: its first line, and its last if there are more."""
    # ml_collections' messages for a bad config file carry the file's own error last.
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be, so that it takes the same path."""


def _raise_terminated(signum, frame):
    raise Terminated


def _drop_failed_write_logs(record: std_logging.LogRecord) -> bool:
    if "/orbax/" in record.pathname and record.getMessage().startswith(
        "Metadata file does not exist"
    ):  # a step folder without _CHECKPOINT_METADATA: restored without it, or reported
        return False
    if "/orbax/" not in record.pathname or record.levelno < std_logging.ERROR:
        return True
    error = record.exc_info[1] if record.exc_info else None
    text = f"{record.getMessage()} {error}"
    return not any(s in text for s in ("No space left on device", "Read-only file system"))


def _drop_closed_event_loop(unraisable) -> None:
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
        sys.__unraisablehook__(unraisable)


def run(main: Callable[[list[str]], None]) -> None:
    """``absl.app.run`` with flag errors (bad --config, bad override) as exit status 2.

    Ctrl-C ends with status 130, SIGTERM with 143, neither with a traceback:
    training saves a checkpoint and says so before it gets here. SIGTERM is what
    a batch scheduler (SLURM, Kubernetes) sends before it kills a job, and what
    ``kill PID`` sends to a run started in the background, where the shell has
    SIGINT ignored.
    """
    signal.signal(signal.SIGTERM, _raise_terminated)
    # A failed orbax restore leaves its other reads running: as they finish they
    # report "Event loop is closed" (unraisable) and unretrieved task errors
    # (asyncio's logger), dozens of tracebacks around the one-line error.
    sys.unraisablehook = _drop_closed_event_loop
    std_logging.getLogger("asyncio").addFilter(
        lambda record: not record.getMessage().startswith("Task exception was never retrieved")
    )
    # A checkpoint write that fails (a full disk) is logged by each of orbax's
    # background threads with its traceback (five, 350 lines), before training
    # reports it in one line (``train.CheckpointError``).
    std_logging.getLogger("absl").addFilter(_drop_failed_write_logs)
    try:
        app.run(main, flags_parser=_parse_flags)
    except KeyboardInterrupt as e:
        # The work is saved: a second Ctrl-C now would only interrupt the
        # interpreter's shutdown (JAX's atexit clean-up) with a traceback.
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        sys.exit(128 + signal.SIGTERM if isinstance(e, Terminated) else 130)


def checked_config(*, writes_workdir: bool = True) -> ml_collections.ConfigDict:
    """The ``--config`` flag's config, validated before any compute; applies ``--cpu_devices``.

    ``--workdir`` must be a directory or makeable one, and writable (it and its
    ``plots/``) unless ``writes_workdir=False``, for a script that only reads it.
    """
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    config = flags.FLAGS.config
    if config is None:
        fail("--config is required, e.g. --config=maml/configs/sinusoid.py")
    checked_type(config)
    if not flags.FLAGS.workdir:
        fail("--workdir is required")
    workdir = Path(flags.FLAGS.workdir)
    check_directory(workdir, "--workdir", writable=writes_workdir)
    for name in ("checkpoints", "best_checkpoint", "plots"):
        writable = writes_workdir and name == "plots"  # a failed checkpoint write is one line
        check_directory(workdir / name, f"--workdir's {name}", writable=writable)
    try:
        validate(config)
    except ConfigError as e:
        fail(str(e))
    except OSError as e:  # the config file itself could not be loaded
        fail(one_line(e))
    if flags.FLAGS.cpu_devices is not None:
        import jax

        jax.config.update("jax_num_cpu_devices", flags.FLAGS.cpu_devices)
    return config


def checked_type(config: Any) -> None:
    """Fails unless the ``--config`` file's ``get_config()`` gave a ``ConfigDict``."""
    if isinstance(config, ml_collections.ConfigDict):
        return
    try:  # ml_collections' stand-in for a file it could not load raises its error
        config["task"]
    except OSError as e:
        reason = re.search(r"\[Errno \d+\].*", str(e))  # not its "config_config" wording
        fail(f"cannot load the --config file: {reason[0] if reason else one_line(e)}")
    except Exception:
        pass
    fail(f"--config: get_config() returned {type(config).__name__}, not a ConfigDict")


def check_directory(path: Path, what: str, *, writable: bool = True) -> None:
    """Fails unless ``path`` is a directory or can be made one: not a file, nor under
    one, nor a link to nothing (a purged scratch folder); if ``writable``, nor on a
    read-only file system or in a directory we cannot write."""
    for p in (path, *path.parents):
        if p.is_symlink() and not p.exists():  # mkdir would say only "File exists"
            fail(
                f"{what}={path} cannot be made: {p} links to {os.readlink(p)}, which does not exist"
            )
        if p.exists():
            if p == path and not p.is_dir():
                fail(f"{what}={path} is a file, not a directory")
            if not p.is_dir():
                fail(f"{what}={path} cannot be made: {p} is a file")
            if writable and not os.access(p, os.W_OK | os.X_OK):  # also on a read-only mount
                fail(f"{what}={path} is not writable: {p} cannot be written to")
            return


@contextlib.contextmanager
def user_errors(
    out_of_memory: str = "lower config.meta_batch_size (training) or config.eval_batch_size "
    "(evaluation), or set config.remat=True",
) -> Iterator[None]:
    """Errors a user can cause (missing data, bad checkpoint) end in one line and exit 2;
    running out of memory, with the advice ``out_of_memory`` (what sets the memory)."""
    from maml import train

    # OSError: a file that cannot be read or written (a full disk, say).
    errors = (train.CheckpointError, ConfigError, train.DivergedError, OSError)
    try:
        from maml.tasks.omniglot import DatasetNotFoundError

        errors += (DatasetNotFoundError,)
    except ImportError:
        pass
    try:
        yield
    except errors as e:
        fail(str(e))
    except Exception as e:
        reason = train.out_of_memory_reason(e)
        if reason is None:
            raise
        fail(f"out of memory: {reason}; {out_of_memory}")


def write_report(
    report: dict,
    output_dir: Path,
    name: str,
    *,
    plot: Callable[[dict, Path], Any],
    summary: Callable[[dict], None],
) -> None:
    """Writes ``report`` as ``output_dir/name.json`` and ``plot``'s ``output_dir/name.png``,
    then prints ``summary(report)`` and the two paths (the analysis scripts' last step)."""
    from maml import train

    json_path, png_path = output_dir / f"{name}.json", output_dir / f"{name}.png"
    output_dir.mkdir(parents=True, exist_ok=True)
    train.write_json(json_path, report)
    plot(report, png_path)
    summary(report)
    print(f"wrote {json_path} and {png_path}")
