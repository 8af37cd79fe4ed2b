"""Few-shot sinusoid regression with Finn et al.'s (2017) settings.

Variants (``--config=maml/configs/sinusoid.py:VARIANT``): ``k5`` trains at
K = 5, ``k20`` at K = 20, ``pretrain`` is Finn's multi-task baseline (no inner
loop at training time), ``fomaml`` first-order MAML, ``tiny`` a seconds-long
run for tests; join them with commas (``k5,fomaml``).
"""

import ml_collections

from maml.configs import variant_parts


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """The sinusoid config: Finn et al.'s defaults, overridden by ``variant``.

    Args:
      variant: comma-joined parts from the module docstring (``"k5,fomaml"``), or
        ``None`` / ``""`` for the defaults.

    Returns:
      An unlocked ``ml_collections.ConfigDict``.

    Raises:
      ValueError: an unknown part, a part named twice, or two conflicting parts.
    """
    c = ml_collections.ConfigDict()
    c.task = "sinusoid"
    c.model = "mlp"
    c.hidden_sizes = (40, 40)
    c.init = "lecun"  # or "finn": truncated normal, std 0.01, as in cbfinn/maml
    c.algorithm = "maml"
    c.num_steps = 70_000
    c.meta_batch_size = 25
    c.num_support = 10
    c.num_query = 10
    c.inner_lr = 0.01
    c.num_inner_steps = 1
    c.remat = False
    c.outer_lr = 1e-3
    c.imaml_lambda = 1.0
    c.imaml_cg_steps = 5
    # The damped system of the iMAML paper's code (1 and 10 there; maml.imaml says what
    # it solves); 0 and 0: (I + H / lambda) g = grad, undamped.
    c.imaml_cg_damping = 0.0
    c.imaml_lam_damping = 0.0
    c.seed = 0
    # Seed of the test tasks scripts/evaluate.py draws; unset: config.seed. Set it
    # to compare runs of different seeds on the same tasks.
    c.eval_seed = ml_collections.config_dict.placeholder(int)
    # Meta-steps per device call; metrics are averaged over each call.
    c.log_every = 1_000
    c.checkpoint_every = 10_000
    c.eval_every = 0
    c.num_val_tasks = 100
    # Evaluation (scripts/evaluate.py): fresh tasks, K support points each.
    c.num_eval_tasks = 600
    c.eval_shots = (5, 10, 20)
    c.eval_inner_steps = 10
    c.eval_inner_lr = 0.01
    # > 0: test-time adaptation is iMAML's proximal inner loop at this lambda; 0: plain SGD.
    c.eval_proximal_lambda = 0.0
    c.eval_num_query = 100
    c.eval_batch_size = 600

    for part in variant_parts(variant, (("k5", "k20"), ("pretrain", "fomaml"))):
        if part in ("k5", "k20"):
            c.num_support = c.num_query = int(part[1:])
        elif part in ("pretrain", "fomaml"):
            c.algorithm = part
        elif part == "tiny":
            c.num_steps = 200
            c.meta_batch_size = 4
            c.log_every = 50
            c.checkpoint_every = 100
            c.num_eval_tasks = 20
            c.eval_shots = (5,)
            c.eval_inner_steps = 2
            c.eval_num_query = 10
        else:
            raise ValueError(
                f"unknown sinusoid config variant {part!r}: join with commas any of k5 or k20, "
                "pretrain or fomaml, tiny"
            )
    return c
