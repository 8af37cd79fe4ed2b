"""Convolutions written for MAML's per-task weights.

The meta-step vmaps over tasks, each with its own adapted conv kernels. A
vmapped ``lax.conv_general_dilated`` over a batch of kernels becomes a grouped
convolution, which XLA's CPU backend runs very slowly. The ``"patches"``
formulation here extracts the 3x3 patches with nine strided slices (after
explicit SAME padding) and contracts them with the kernel in one matmul;
vmapped over tasks that is a batched matmul, fast on CPU and on GPU.

All implementations take NHWC inputs and HWIO kernels (``nnx.Conv``'s layout),
use ``lax.conv_general_dilated``'s SAME padding exactly (asymmetric where the
total padding is odd: the extra row/column goes at the end), and agree with
it to float tolerance, forward and backward:

- ``"phases"``: ``"patches"``'s forward pass with a
  custom backward pass for 3x3 stride-2 kernels that computes the input
  gradient per output phase (four matmuls of shifted output gradients),
  never materialising the 9x larger patch gradient; it is plain JAX, so it
  differentiates again (second-order MAML). Other shapes use ``"patches"``.
- ``"patches"`` (the default): nine strided slices concatenated on the
  channel axis, one ``(B*Ho*Wo, 9*C_in) @ (9*C_in, C_out)`` matmul,
  differentiated by JAX. On two noisy CPU cores it and ``"phases"`` traded
  places run to run (within ~20% of each other) in the second-order meta-step.
- ``"taps"``: the sum of nine ``(B*Ho*Wo, C_in) @ (C_in, C_out)`` matmuls,
  one per kernel tap; never materialises the patch matrix.
- ``"lax_patches"``: ``lax.conv_general_dilated_patches`` then one matmul.
- ``"lax"``: ``lax.conv_general_dilated`` itself (the reference).
"""

from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

ConvImpl = Literal["patches", "phases", "taps", "lax_patches", "lax"]
CONV_IMPLS: tuple[str, ...] = ("patches", "phases", "taps", "lax_patches", "lax")

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def same_padding(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """``(low, high)`` padding of one spatial axis, as ``lax``'s ``"SAME"`` pads it.

    The output has ``ceil(size / stride)`` positions; when the total padding
    is odd the extra element goes at the high end (so 28 -> 14 pads (0, 1)
    at stride 2, unlike PyTorch's symmetric ``padding=1``).
    """
    ((low, high),) = lax.padtype_to_pads((size,), (kernel_size,), (stride,), "SAME")
    return int(low), int(high)


def _pad_same(x: jax.Array, kh: int, kw: int, stride: int) -> jax.Array:
    pads_h = same_padding(x.shape[1], kh, stride)
    pads_w = same_padding(x.shape[2], kw, stride)
    return jnp.pad(x, ((0, 0), pads_h, pads_w, (0, 0)))


def _taps(x: jax.Array, kh: int, kw: int, stride: int) -> list[jax.Array]:
    """The ``kh*kw`` strided windows of the SAME-padded ``x``, row-major over taps.

    Each is ``(B, H_out, W_out, C_in)``: tap ``(i, j)`` holds
    ``x_padded[:, i + stride*p, j + stride*q, :]`` at output ``(p, q)``.
    """
    b, h, w, c = x.shape
    h_out, w_out = -(-h // stride), -(-w // stride)
    xp = _pad_same(x, kh, kw, stride)
    return [
        lax.slice(
            xp,
            (0, i, j, 0),
            (b, i + stride * (h_out - 1) + 1, j + stride * (w_out - 1) + 1, c),
            (1, stride, stride, 1),
        )
        for i in range(kh)
        for j in range(kw)
    ]


def _patches_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    kh, kw, c_in, c_out = kernel.shape
    patches = jnp.concatenate(_taps(x, kh, kw, stride), axis=-1)
    # Concatenated taps are ordered (i, j, c_in): HWIO reshaped row-major.
    return patches @ kernel.reshape(kh * kw * c_in, c_out)


@jax.custom_vjp
def _phase_conv_s2(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return _patches_conv(x, kernel, 2)


def _phase_conv_s2_fwd(x, kernel):
    return _patches_conv(x, kernel, 2), (x, kernel)


def _phase_conv_s2_bwd(residuals, dy):
    """The input gradient by output phase, never materialising the patch gradient.

    The SAME-padded input has ``2*H_out + 1`` rows. Its even rows receive taps
    0 and 2 (from output rows ``m`` and ``m - 1``), its odd rows tap 1, and
    likewise for columns: each of the four phases is one matmul of shifted
    copies of ``dy`` with the matching kernel taps.
    """
    x, kernel = residuals
    b, h, w, c_in = x.shape
    h_out, w_out = dy.shape[1], dy.shape[2]
    patches = jnp.concatenate(_taps(x, 3, 3, 2), axis=-1)
    d_kernel = jnp.einsum("bhwk,bhwd->kd", patches, dy).reshape(kernel.shape)
    dy_padded = jnp.pad(dy, ((0, 0), (1, 1), (1, 1), (0, 0)))
    # Tap index -> (shift of dy) for each parity of the padded coordinate.
    taps_by_parity = {0: ((0, 0), (2, 1)), 1: ((1, 0),)}
    phases = {}
    for a in (0, 1):
        rows = h_out + 1 - a
        for c in (0, 1):
            cols = w_out + 1 - c
            shifted, kernels = [], []
            for i, si in taps_by_parity[a]:
                for j, sj in taps_by_parity[c]:
                    shifted.append(dy_padded[:, 1 - si : 1 - si + rows, 1 - sj : 1 - sj + cols])
                    kernels.append(kernel[i, j].T)
            phases[a, c] = jnp.concatenate(shifted, axis=-1) @ jnp.concatenate(kernels, axis=0)

    # Interleave the phases back into the padded grid (odd phases one row short).
    def pad_to(t, rows, cols):
        return jnp.pad(t, ((0, 0), (0, rows - t.shape[1]), (0, cols - t.shape[2]), (0, 0)))

    rows, cols = h_out + 1, w_out + 1
    grid = jnp.stack(
        [jnp.stack([pad_to(phases[a, c], rows, cols) for c in (0, 1)], axis=3) for a in (0, 1)],
        axis=2,
    ).reshape(b, 2 * rows, 2 * cols, c_in)
    (lo_h, _), (lo_w, _) = same_padding(h, 3, 2), same_padding(w, 3, 2)
    return grid[:, lo_h : lo_h + h, lo_w : lo_w + w], d_kernel


_phase_conv_s2.defvjp(_phase_conv_s2_fwd, _phase_conv_s2_bwd)


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    stride: int = 1,
    impl: ConvImpl = "patches",
) -> jax.Array:
    """2-D convolution with ``"SAME"`` padding, identical to ``lax.conv_general_dilated``.

    Args:
      x: ``(B, H, W, C_in)`` input.
      kernel: ``(kh, kw, C_in, C_out)`` kernel (HWIO).
      bias: optional ``(C_out,)`` bias.
      stride: the same stride on both spatial axes.
      impl: one of ``CONV_IMPLS`` (see the module docstring).

    Returns:
      ``(B, ceil(H / stride), ceil(W / stride), C_out)``.
    """
    kh, kw, c_in, c_out = kernel.shape
    if x.ndim != 4 or x.shape[-1] != c_in:
        raise ValueError(f"x must be (B, H, W, {c_in}) for this kernel, got shape {x.shape}")
    if impl == "lax":
        y = lax.conv_general_dilated(
            x, kernel, (stride, stride), "SAME", dimension_numbers=_DIMENSION_NUMBERS
        )
    elif impl == "patches":
        y = _patches_conv(x, kernel, stride)
    elif impl == "phases":
        if (kh, kw, stride) == (3, 3, 2):
            y = _phase_conv_s2(x, kernel)
        else:
            y = _patches_conv(x, kernel, stride)
    elif impl == "taps":
        taps = _taps(x, kh, kw, stride)
        flat_kernel = kernel.reshape(kh * kw, c_in, c_out)
        y = sum(tap @ flat_kernel[t] for t, tap in enumerate(taps))
    elif impl == "lax_patches":
        patches = lax.conv_general_dilated_patches(
            x,
            (kh, kw),
            (stride, stride),
            "SAME",
            dimension_numbers=_DIMENSION_NUMBERS,
        )
        # The patch features come out ordered (c_in, i, j).
        y = patches @ kernel.transpose(2, 0, 1, 3).reshape(c_in * kh * kw, c_out)
    else:
        raise ValueError(f"impl must be one of {CONV_IMPLS}, got {impl!r}")
    if bias is not None:
        y = y + bias
    return y
