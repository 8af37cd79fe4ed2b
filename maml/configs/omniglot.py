"""N-way K-shot Omniglot with Finn et al.'s (2017) settings (their Table 1).

Variants (``--config=maml/configs/omniglot.py:VARIANT``): ``5way1shot``
(default), ``5way5shot``, ``20way1shot``, ``20way5shot``; append ``,fomaml``
for first-order MAML, ``,imaml`` for implicit MAML, ``,background`` to train
on Lake et al.'s background alphabets only (TFDS ``train``) and test on the
evaluation alphabets, ``,finn_lr`` for the inner steps of Finn's code (below);
``tiny`` is a seconds-long run for tests.

As in cbfinn/maml: 5-way trains with 1 inner step at inner lr 0.4,
meta-batch 32, and is tested with 3 steps; 20-way trains and tests with 5
steps at inner lr 0.1, meta-batch 16; Adam 1e-3; 60,000 meta-iterations; as
many query drawings per class as support drawings; every class of a task
rotated by a random multiple of 90 degrees; BatchNorm always on the batch's
own statistics.

Differences from Finn's code (cbfinn/maml), by default:

* The inner loss is the mean cross-entropy over the N*K support images. Finn's
  ``utils.xent`` summed it over them and divided by K: N times the mean, so
  his inner lr 0.4 (5-way) and 0.1 (20-way) are steps of 2.0 on this loss for
  every shape. ``,finn_lr`` takes his steps (``inner_lr`` and ``eval_inner_lr``
  times ``num_ways``); the meta-loss's scale does not matter to Adam.
* BatchNorm has a scale and an offset, and both adapt in the inner loop
  (``adapt_norm``). Finn's BatchNorm (``tf.contrib.layers.batch_norm``'s
  defaults) had an offset only, outside the inner loop, and epsilon 1e-3.
* Images are resized with antialiasing (grey levels). Finn's PIL LANCZOS
  resize of the 1-bit PNGs fell back to nearest neighbour (PIL does so for
  mode "1"), so his 28x28 images are binary.
* Kernels start LeCun-normal; Finn's convolutions started Glorot-uniform and
  his output layer standard-normal (std 1).
"""

import ml_collections

from maml.configs import variant_parts

SHAPES = ("5way1shot", "5way5shot", "20way1shot", "20way5shot")


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """The Omniglot config: Finn et al.'s 5-way 1-shot settings, overridden by ``variant``.

    Args:
      variant: comma-joined parts from the module docstring
        (``"20way1shot,background"``); ``None`` or ``""`` is ``"5way1shot"``.

    Returns:
      An unlocked ``ml_collections.ConfigDict``.

    Raises:
      ValueError: an unknown part, a part named twice, or two conflicting parts.
    """
    c = ml_collections.ConfigDict()
    c.task = "omniglot"
    c.model = "convnet"
    c.conv_impl = "patches"
    # Data: TFDS's omniglot. data_dir "" means $TFDS_DATA_DIR, else TFDS's default.
    c.data_dir = ""
    c.download = False
    c.cache_dir = ""
    c.split_protocol = "finn"  # 1100/100/423 characters; or "background"
    c.split_seed = 1
    # "background" only: TFDS train's characters held out for validation.
    c.num_validation_classes = 100
    c.rotate = "per_class"
    c.num_ways = 5
    c.num_shots = 1
    c.num_query = 1
    c.algorithm = "maml"
    c.num_steps = 60_000
    c.meta_batch_size = 32
    c.inner_lr = 0.4
    c.num_inner_steps = 1
    # BatchNorm scale and offset adapt in the inner loop; False keeps them out of it, as
    # Finn's code kept its BatchNorm offset (it had no scale).
    c.adapt_norm = True
    c.remat = False
    c.outer_lr = 1e-3
    c.imaml_lambda = 2.0
    c.imaml_cg_steps = 5
    # The damped system of the iMAML paper's code (1 and 10 there; maml.imaml says what
    # it solves); 0 and 0: (I + H / lambda) g = grad, undamped.
    c.imaml_cg_damping = 0.0
    c.imaml_lam_damping = 0.0
    c.seed = 0
    # Seed of the test tasks scripts/evaluate.py draws; unset: config.seed. Set it
    # to compare runs of different seeds on the same tasks.
    c.eval_seed = ml_collections.config_dict.placeholder(int)
    c.log_every = 500
    c.checkpoint_every = 5_000
    c.eval_every = 5_000
    c.num_val_tasks = 200
    c.num_eval_tasks = 600
    c.eval_shots = (1,)
    c.eval_inner_steps = 10
    c.eval_report_step = 3  # Finn's test-time inner steps
    c.eval_inner_lr = 0.4
    # > 0: test-time adaptation is iMAML's proximal inner loop at this lambda; 0: plain SGD.
    c.eval_proximal_lambda = 0.0
    c.eval_batch_size = 100

    parts = variant_parts(variant or "5way1shot", (SHAPES, ("fomaml", "imaml")))
    # tiny last: its eval_report_step must stay within its eval_inner_steps.
    for part in sorted(parts, key=lambda part: part == "tiny"):
        if part in SHAPES:
            ways, shots = part.split("way")
            c.num_ways, c.num_shots = int(ways), int(shots.removesuffix("shot"))
            c.num_query = c.num_shots
            c.eval_shots = (c.num_shots,)
            if c.num_ways == 20:
                c.inner_lr = c.eval_inner_lr = 0.1
                c.num_inner_steps = c.eval_report_step = 5
                c.meta_batch_size = 16
        elif part in ("fomaml", "imaml"):
            c.algorithm = part
        elif part == "background":
            c.split_protocol = "background"
        elif part == "finn_lr":
            pass  # after the loop, once the shape has set the rates
        elif part == "tiny":
            c.num_steps = 4
            c.meta_batch_size = 2
            c.log_every = 2
            c.checkpoint_every = 2
            c.eval_every = 2
            c.num_val_tasks = 4
            c.num_eval_tasks = 6
            c.eval_inner_steps = 2
            c.eval_report_step = 1
            c.eval_batch_size = 3
        else:
            raise ValueError(
                f"unknown omniglot config variant {part!r}: join with commas one of "
                f"{', '.join(SHAPES)} and any of fomaml or imaml, background, finn_lr, tiny"
            )
    if "finn_lr" in parts:
        # Finn's inner loss was N times the mean this config's tasks take.
        c.inner_lr *= c.num_ways
        c.eval_inner_lr *= c.num_ways
    return c
