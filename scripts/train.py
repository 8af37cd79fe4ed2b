"""Meta-trains a model.

    python scripts/train.py --config=maml/configs/sinusoid.py --workdir=runs/sinusoid
    python scripts/train.py --config=maml/configs/sinusoid.py:pretrain --workdir=runs/pretrain
    python scripts/train.py --config=maml/configs/omniglot.py:5way1shot --workdir=runs/o5w1s

Re-running the same command resumes from the latest checkpoint in --workdir.
Any config field can be overridden, e.g. --config.num_steps=1000.
"""

from absl import flags

from maml import train

import _common

flags.DEFINE_bool(
    "multihost",
    False,
    "Call jax.distributed.initialize() first: one process per host, all devices of all "
    "hosts in one mesh. On SLURM, Open MPI and Cloud TPU the coordinator and ranks come "
    "from the environment; elsewhere give the three flags below.",
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (--multihost).")
flags.DEFINE_integer("num_processes", None, "Number of processes (--multihost).")
flags.DEFINE_integer("process_id", None, "This process's rank, 0..num_processes-1.")
flags.DEFINE_integer(
    "cpu_devices",
    None,
    "On the CPU backend, split the cores into this many XLA devices and shard the "
    "meta-batch over them (config.meta_batch_size must divide by it). 2 on a 2-core "
    "machine ran the Omniglot meta-step 10-15% faster than 1. Unset: JAX's default "
    "(1, or XLA_FLAGS=--xla_force_host_platform_device_count).",
    lower_bound=1,
)


def main(argv):
    del argv
    config = _common.checked_config()
    import jax

    if flags.FLAGS.cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", flags.FLAGS.cpu_devices)
    if flags.FLAGS.multihost:
        jax.distributed.initialize(
            coordinator_address=flags.FLAGS.coordinator_address,
            num_processes=flags.FLAGS.num_processes,
            process_id=flags.FLAGS.process_id,
        )
    with _common.user_errors():
        train.train_and_evaluate(config, flags.FLAGS.workdir)


if __name__ == "__main__":
    _common.run(main)
