"""Evaluates the latest checkpoint of a run on fresh test tasks.

    python scripts/evaluate.py --config=maml/configs/sinusoid.py --workdir=runs/sinusoid

Writes WORKDIR/eval.json (metric mean and 95% CI for 0..eval_inner_steps inner
steps, per K in config.eval_shots), prints it as a table, and saves
WORKDIR/plots/eval.png. ``--checkpoint=best`` evaluates the checkpoint with the
best validation metric instead (eval_best.json, plots/eval_best.png).
"""

from absl import flags

from maml import evaluate

import _common

CHECKPOINT = _common.define_checkpoint_flag()
flags.adopt_module_key_flags(_common)  # --help lists --config, --workdir, ...


def main(argv: list[str]) -> None:
    """Evaluates the checkpoint, prints the table, then writes ``eval*.json`` and the plot."""
    del argv
    config = _common.checked_config()
    with _common.user_errors():
        result = evaluate.evaluate(config, flags.FLAGS.workdir, CHECKPOINT.value, write=False)
    print(evaluate.format_table(result))  # first: a failed write below loses no result
    with _common.user_errors():
        evaluate.write_evaluation(result, flags.FLAGS.workdir)


if __name__ == "__main__":
    _common.run(main)
