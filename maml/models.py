"""Flax NNX models, and the bridge from a module to ``(apply_fn, params)``.

The MAML core never touches a module: ``functional(model)`` splits it once
into a pure ``apply_fn(params, x)`` and a ``params`` pytree of plain arrays
(a nested dict). Any other state the module holds (for example BatchNorm
running statistics, which MAML's transductive BatchNorm never reads) is
frozen into ``apply_fn`` as constants, and updates the module makes to it
during a call are discarded.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]


def functional(model: nnx.Module) -> tuple[ApplyFn, PyTree]:
    """Splits an NNX module into a pure ``apply_fn(params, x)`` and its parameters.

    Returns:
      ``(apply_fn, params)``: ``params`` is a nested dict of the module's
      ``nnx.Param`` arrays; ``apply_fn(params, x)`` rebuilds the module from
      them (inside whatever transformation calls it) and returns ``model(x)``.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = params.to_pure_dict()
    rest = rest.to_pure_dict()

    def apply_fn(params: PyTree, x: jax.Array) -> jax.Array:
        # Merging pure arrays creates fresh Variables in the current trace, so
        # a module that writes to its state (BatchNorm statistics) stays pure.
        return nnx.merge(graphdef, params, rest)(x)

    return apply_fn, params


class MLP(nnx.Module):
    """Fully connected ReLU network; Finn et al.'s sinusoid net is ``MLP((1, 40, 40, 1))``.

    Maps ``(..., sizes[0])`` to ``(..., sizes[-1])``.
    """

    def __init__(self, sizes: Sequence[int], *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.layers = nnx.List(
            [
                nnx.Linear(n_in, n_out, rngs=rngs, param_dtype=param_dtype, dtype=param_dtype)
                for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True)
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)
