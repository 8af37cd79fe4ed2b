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
from jax.typing import DTypeLike

from maml import ops

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
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

    def apply_fn(params: PyTree, x: jax.Array) -> jax.Array:
        # Merging pure arrays creates fresh Variables in the current trace, so
        # a module that writes to its state (BatchNorm statistics) stays pure.
        return nnx.merge(graphdef, params, rest)(x)

    return apply_fn, params


LECUN_NORMAL = nnx.initializers.lecun_normal()
FINN_KERNEL_INIT = nnx.initializers.truncated_normal(stddev=0.01)


class MLP(nnx.Module):
    """Fully connected ReLU network; Finn et al.'s sinusoid net is ``MLP((1, 40, 40, 1))``.

    Maps ``(..., sizes[0])`` to ``(..., sizes[-1])``. Finn's code initialised
    the kernels from a normal truncated at two standard deviations of 0.01
    (``FINN_KERNEL_INIT``) and the biases at zero.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        *,
        rngs: nnx.Rngs,
        param_dtype: DTypeLike = jnp.float32,
        kernel_init: nnx.Initializer = LECUN_NORMAL,
    ):
        self.layers = nnx.List(
            [
                nnx.Linear(
                    n_in,
                    n_out,
                    rngs=rngs,
                    param_dtype=param_dtype,
                    dtype=param_dtype,
                    kernel_init=kernel_init,
                )
                for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True)
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


class Conv(nnx.Module):
    """``kernel_size`` x ``kernel_size`` SAME convolution with bias, via ``maml.ops.conv2d``.

    Params ``kernel`` (HWIO, LeCun-normal) and ``bias`` (zeros). Maps
    ``(B, H, W, in_channels)`` to ``(B, ceil(H/stride), ceil(W/stride), out_channels)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        rngs: nnx.Rngs,
        kernel_size: int = 3,
        stride: int = 1,
        param_dtype: DTypeLike = jnp.float32,
        conv_impl: ops.ConvImpl = "patches",
    ):
        if conv_impl not in ops.CONV_IMPLS:
            raise ValueError(f"conv_impl must be one of {ops.CONV_IMPLS}, got {conv_impl!r}")
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), shape, param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_channels,), param_dtype))
        self.stride = stride
        self.conv_impl = conv_impl

    def __call__(self, x: jax.Array) -> jax.Array:
        return ops.conv2d(
            x, self.kernel[...], self.bias[...], stride=self.stride, impl=self.conv_impl
        )


class BatchStatNorm(nnx.Module):
    """Transductive BatchNorm: always normalises with the current batch's statistics.

    MAML's BatchNorm (Finn et al.; PyTorch's ``track_running_stats=False``):
    per-channel mean and biased variance over every axis but the last, then
    a learnable ``scale`` (ones) and ``bias`` (zeros). There are no running
    averages, so the module holds nothing but its two ``nnx.Param``s.

    The statistics take one pass: with ``d = x - x[0, ..., 0, :]`` (one
    sample per channel, so that nothing cancels when ``|mean| >> std``),
    ``E[d]`` and ``E[d^2]`` come from a single reduction over ``[d, d^2]``
    and the variance is ``E[d^2] - E[d]^2``. Against the two-pass
    ``mean((x - mean)^2)`` this made the second-order Omniglot meta-step
    about 1.5-3% faster on two CPU cores (paired runs), where the step is
    bound by memory traffic over the large first-layer activations.
    """

    def __init__(
        self, num_features: int, *, epsilon: float = 1e-5, param_dtype: DTypeLike = jnp.float32
    ):
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
        self.epsilon = epsilon

    def __call__(self, x: jax.Array) -> jax.Array:
        # Shifted by one sample per channel, E[d^2] - E[d]^2 does not cancel
        # catastrophically when |mean| >> std. The variance does not depend on
        # the shift, so stopping its gradient is exact at every order.
        shift = jax.lax.stop_gradient(x[(0,) * (x.ndim - 1)])
        d = x - shift
        mean_d, mean_sq = jnp.mean(jnp.stack([d, jnp.square(d)]), axis=tuple(range(1, x.ndim)))
        var = jnp.maximum(mean_sq - jnp.square(mean_d), 0.0)
        inv = jax.lax.rsqrt(var + self.epsilon) * self.scale[...]
        return d * inv + (self.bias[...] - mean_d * inv)


class ConvBlock(nnx.Module):
    """Conv (3x3, SAME) -> transductive BatchNorm -> ReLU; params ``conv`` and ``norm``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        rngs: nnx.Rngs,
        stride: int = 2,
        param_dtype: DTypeLike = jnp.float32,
        conv_impl: ops.ConvImpl = "patches",
    ):
        self.conv = Conv(
            in_channels,
            out_channels,
            rngs=rngs,
            stride=stride,
            param_dtype=param_dtype,
            conv_impl=conv_impl,
        )
        self.norm = BatchStatNorm(out_channels, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.norm(self.conv(x)))


class ConvNet(nnx.Module):
    """Finn et al.'s Omniglot conv net with transductive BatchNorm.

    ``num_blocks`` blocks of [3x3 conv, ``channels`` filters, stride 2, SAME
    padding -> batch-statistics BatchNorm -> ReLU], global average pooling, and
    a linear head. Maps ``(B, 28, 28, in_channels)`` to ``(B, num_classes)``.
    The output for one example depends on the whole batch (BatchNorm's
    statistics), so call it on one task's support or query set at a time.

    ``functional(ConvNet(...))`` gives params
    ``{"blocks": {i: {"conv": {"kernel", "bias"}, "norm": {"scale", "bias"}}},
    "head": {"kernel", "bias"}}``: BatchNorm leaves are those under ``"norm"``.
    ``conv_impl`` picks the convolution (``maml.ops.CONV_IMPLS``); all give the
    same numbers; ``"patches"`` and ``"phases"`` are the fast ones under ``vmap``
    over tasks (``"lax"`` becomes a slow grouped convolution on CPU).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        rngs: nnx.Rngs,
        channels: int = 64,
        num_blocks: int = 4,
        in_channels: int = 1,
        param_dtype: DTypeLike = jnp.float32,
        conv_impl: ops.ConvImpl = "patches",
    ):
        widths = [in_channels] + [channels] * num_blocks
        self.blocks = nnx.List(
            [
                ConvBlock(
                    c_in, c_out, rngs=rngs, stride=2, param_dtype=param_dtype, conv_impl=conv_impl
                )
                for c_in, c_out in zip(widths[:-1], widths[1:], strict=True)
            ]
        )
        self.head = nnx.Linear(
            widths[-1], num_classes, rngs=rngs, param_dtype=param_dtype, dtype=param_dtype
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return self.head(jnp.mean(x, axis=(1, 2)))
