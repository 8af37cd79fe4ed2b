"""Evaluates a 20-way 1-shot checkpoint on Lake et al.'s 20 within-alphabet one-shot runs.

    python scripts/evaluate_one_shot_runs.py \\
        --config=maml/configs/omniglot.py:20way1shot,background --workdir=runs/o20w1s_bg

Adapts the latest checkpoint in --workdir (--checkpoint=best: the one with the
best validation accuracy) on each run's 20 training images with the config's
eval_inner_lr, for 0..eval_inner_steps steps (plain SGD, or iMAML's proximal
steps where eval_proximal_lambda > 0), and writes
WORKDIR/one_shot_runs.json (one_shot_runs_best.json): error per run and
overall, per step, beside the published error rates of people and Bayesian
Program Learning; then prints a table. The runs use the evaluation alphabets,
so a fair comparison needs a model meta-trained on the background alphabets
only (split_protocol "background").
"""

import sys
import zipfile
from pathlib import Path

from absl import flags

from maml import one_shot_runs, train
from maml.tasks import omniglot

import _common

CHECKPOINT = _common.define_checkpoint_flag()
flags.adopt_module_key_flags(_common)  # --help lists --config, --workdir, ...

DEFAULT_RUNS = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "data"
    / "omniglot_one_shot_runs"
    / "all_runs.zip"
)

flags.DEFINE_string(
    "runs", str(DEFAULT_RUNS), "Lake et al.'s all_runs.zip, or the folder it unpacks to."
)


def main(argv: list[str]) -> None:
    """Evaluates the checkpoint on the runs, prints the table, then writes the JSON."""
    del argv
    config = _common.checked_config()
    if config.get("num_ways") != one_shot_runs.NUM_WAYS:
        _common.fail(
            f"config.num_ways={config.get('num_ways')!r} is invalid: the one-shot runs are "
            f"{one_shot_runs.NUM_WAYS}-way, so it must be {one_shot_runs.NUM_WAYS} "
            "(e.g. --config=maml/configs/omniglot.py:20way1shot,background)."
        )
    runs_path = Path(flags.FLAGS.runs).expanduser()
    if not runs_path.exists():
        _common.fail(f"one-shot runs not found at {runs_path}: pass --runs=PATH/all_runs.zip.")
    try:  # before the checkpoint is restored: damaged runs fail in a second
        runs = omniglot.load_one_shot_runs(runs_path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        _common.fail(f"cannot read the one-shot runs in {runs_path} ({_common.one_line(e)}).")
    workdir = Path(flags.FLAGS.workdir)
    with _common.user_errors():
        # Refuses a config whose split is not the one the model was trained on.
        # On Lake's images, not the dataset's: the task family's loss and metric are all
        # the experiment needs (Omniglot's are static), so no dataset or cache is read.
        exp, params, step = train.restore_params(
            config, workdir, CHECKPOINT.value, task=omniglot.Omniglot
        )
        changes = train.warn_of_config_changes(workdir, config)
        if config.get("split_protocol") != "background":
            print(
                f"warning: config.split_protocol={config.get('split_protocol')!r}: the model "
                "may have been meta-trained on the runs' evaluation alphabets; only "
                "split_protocol='background' gives a fair comparison with the published numbers.",
                file=sys.stderr,
            )
        result = one_shot_runs.evaluate_runs(
            exp,
            params,
            runs,
            # With adapt_norm=False, the leaves training froze stay frozen.
            inner_lr=exp.inner_rates(config.eval_inner_lr),
            num_inner_steps=config.eval_inner_steps,
            proximal_lambda=config.eval_proximal_lambda,
        )
    result = {
        "checkpoint": CHECKPOINT.value,
        "checkpoint_step": step,
        "split_protocol": config.get("split_protocol"),
        "inner_lr": config.eval_inner_lr,
        "proximal_lambda": config.eval_proximal_lambda,
        "report_step": config.eval_report_step,
        "config_changes": changes,
        **result,
    }
    name = "one_shot_runs" if CHECKPOINT.value == "latest" else f"one_shot_runs_{CHECKPOINT.value}"
    # Printed first: a write that fails (a full disk) then loses no result.
    print(one_shot_runs.format_table(result, report_step=config.eval_report_step), flush=True)
    with _common.user_errors():
        train.write_json(workdir / f"{name}.json", result)  # one run's CI, NaN, is null


if __name__ == "__main__":
    _common.run(main)
