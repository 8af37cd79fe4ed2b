"""Meta-trains a model.

    python scripts/train.py --config=maml/configs/sinusoid.py --workdir=runs/sinusoid
    python scripts/train.py --config=maml/configs/sinusoid.py:pretrain --workdir=runs/pretrain
    python scripts/train.py --config=maml/configs/omniglot.py:5way1shot --workdir=runs/o5w1s

Re-running the same command resumes from the latest checkpoint in --workdir.
Any config field can be overridden, e.g. --config.num_steps=1000.
"""

import _common
from absl import flags

from maml import train


def main(argv):
    del argv
    config = _common.checked_config()
    with _common.user_errors():
        train.train_and_evaluate(config, flags.FLAGS.workdir)


if __name__ == "__main__":
    _common.run(main)
