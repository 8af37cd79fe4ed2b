"""Meta-trains a model.

    python scripts/train.py --config=maml/configs/sinusoid.py --workdir=runs/sinusoid
    python scripts/train.py --config=maml/configs/sinusoid.py:pretrain --workdir=runs/pretrain
    python scripts/train.py --config=maml/configs/omniglot.py:5way1shot --workdir=runs/o5w1s

Re-running the same command resumes from the latest checkpoint in --workdir
(with a larger --config.num_steps, it trains on). Any config field can be
overridden, e.g. --config.num_steps=1000; a resumed run that changes what is
trained (not just how long, how often it logs or where the data is) stops
unless --allow_config_change.
"""

from absl import flags

from maml import train

import _common

flags.adopt_module_key_flags(_common)  # --help lists --config, --workdir, ...

flags.DEFINE_bool(
    "multihost",
    False,
    "Call jax.distributed.initialize() first: one process per host, all devices of all "
    "hosts in one mesh. On SLURM, Open MPI and Cloud TPU the coordinator and ranks come "
    "from the environment; elsewhere give --coordinator_address, --num_processes and "
    "--process_id.",
)
flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Resume a --workdir whose config.json has other training settings (say, a lower "
    "outer_lr after a divergence); the old config.json is kept as config.stepN.json. "
    "Without it such a resume stops and names the fields.",
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (--multihost).")
flags.DEFINE_integer("num_processes", None, "Number of processes (--multihost).")
flags.DEFINE_integer("process_id", None, "This process's rank, 0..num_processes-1.")


def main(argv: list[str]) -> None:
    """Meta-trains the ``--config`` in ``--workdir`` (resuming from its checkpoint)."""
    del argv
    config = _common.checked_config()
    given = [
        f"--{n}"
        for n in ("coordinator_address", "num_processes", "process_id")
        if flags.FLAGS[n].present
    ]
    if given and not flags.FLAGS.multihost:  # else each host would train alone into one workdir
        _common.fail(f"{', '.join(given)} without --multihost: add --multihost")
    if flags.FLAGS.multihost:
        import jax

        try:
            jax.distributed.initialize(
                coordinator_address=flags.FLAGS.coordinator_address,
                num_processes=flags.FLAGS.num_processes,
                process_id=flags.FLAGS.process_id,
            )
        except (ValueError, RuntimeError) as e:
            _common.fail(f"--multihost: jax.distributed.initialize() failed: {_common.one_line(e)}")
    with _common.user_errors():
        train.train_and_evaluate(
            config, flags.FLAGS.workdir, allow_config_change=flags.FLAGS.allow_config_change
        )


if __name__ == "__main__":
    _common.run(main)
