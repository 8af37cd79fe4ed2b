"""Tests for maml.ops (convolutions) and maml.models (MLP, ConvNet, functional)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from maml import ops
from maml.core import batched_meta_loss
from maml.models import FINN_KERNEL_INIT, MLP, BatchStatNorm, ConvNet, functional


def _reference_conv(x, kernel, stride):
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@pytest.mark.parametrize("impl", [i for i in ops.CONV_IMPLS if i != "lax"])  # lax: the reference
@pytest.mark.parametrize("size,stride", [(28, 2), (7, 2), (3, 2), (1, 2), (5, 1)])
def test_conv_matches_lax_forward_and_gradient(x64, impl, size, stride):
    kx, kw, kb, kc = jax.random.split(jax.random.key(size * 10 + stride), 4)
    x = jax.random.normal(kx, (2, size, size, 3), jnp.float64)
    kernel = jax.random.normal(kw, (3, 3, 3, 5), jnp.float64)
    bias = jax.random.normal(kb, (5,), jnp.float64)
    out_size = -(-size // stride)
    cotangent = jax.random.normal(kc, (2, out_size, out_size, 5), jnp.float64)

    def ours(x, kernel, bias):
        return ops.conv2d(x, kernel, bias, stride=stride, impl=impl)

    def reference(x, kernel, bias):
        return _reference_conv(x, kernel, stride) + bias

    y = ours(x, kernel, bias)
    assert y.shape == (2, out_size, out_size, 5)
    np.testing.assert_allclose(y, reference(x, kernel, bias), rtol=1e-12, atol=1e-12)
    grads = jax.grad(lambda *a: jnp.vdot(ours(*a), cotangent), argnums=(0, 1, 2))(x, kernel, bias)
    expected = jax.grad(lambda *a: jnp.vdot(reference(*a), cotangent), argnums=(0, 1, 2))(
        x, kernel, bias
    )
    for g, e in zip(grads, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-12)


def test_same_padding_is_asymmetric_like_lax():
    # 28 -> 14 needs one pad row in total, and lax puts it at the end.
    assert ops.same_padding(28, 3, 2) == (0, 1)
    assert ops.same_padding(7, 3, 2) == (1, 1)
    assert ops.same_padding(7, 3, 1) == (1, 1)


def test_conv_rejects_unknown_impl():
    with pytest.raises(ValueError, match="impl"):
        ops.conv2d(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 2)), impl="winograd")


def test_convnet_shapes_and_param_names():
    model = ConvNet(7, rngs=nnx.Rngs(0), channels=8)
    apply_fn, params = functional(model)
    # Jitted: one compile, not seconds of op-by-op dispatch of the conv net.
    assert jax.jit(apply_fn)(params, jnp.zeros((3, 28, 28, 1))).shape == (3, 7)
    assert sorted(params) == ["blocks", "head"]
    assert len(params["blocks"]) == 4
    block = params["blocks"][0]
    assert block["conv"]["kernel"].shape == (3, 3, 1, 8)
    assert set(block["norm"]) == {"scale", "bias"}
    assert params["blocks"][3]["conv"]["kernel"].shape == (3, 3, 8, 8)
    assert params["head"]["kernel"].shape == (8, 7)
    # Only Params: nothing besides them to carry through the algorithm.
    assert len(nnx.state(model, nnx.Not(nnx.Param))) == 0


def _two_pass_batchnorm(x, eps=1e-5, xp=np):
    mean = x.mean(axis=(0, 1, 2))
    return (x - mean) / xp.sqrt(((x - mean) ** 2).mean(axis=(0, 1, 2)) + eps)


@pytest.mark.parametrize("offset", [0.0, 10.0, 1000.0])
def test_batchnorm_one_pass_statistics_match_two_pass(offset):
    # Unshifted, E[x^2] - E[x]^2 would lose everything at 1000 std in float32.
    x = np.random.default_rng(0).normal(offset, 1.0, (6, 5, 5, 4))
    norm = BatchStatNorm(4)
    scale, bias = np.array([0.5, 2.0, -1.0, 1.0]), np.array([-1.0, 3.0, 0.0, 0.5])
    norm.scale[...], norm.bias[...] = jnp.asarray(scale), jnp.asarray(bias)
    y = norm(jnp.asarray(x, jnp.float32))
    expected = scale * _two_pass_batchnorm(x) + bias
    np.testing.assert_allclose(y, expected, atol=4e-4 if offset > 100 else 4e-5)


@pytest.mark.parametrize("impl", ops.CONV_IMPLS)
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_on_non_square_inputs(impl, stride):
    x = jax.random.normal(jax.random.key(0), (2, 9, 14, 3))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    out = ops.conv2d(x, kernel, stride=stride, impl=impl)
    np.testing.assert_allclose(out, _reference_conv(x, kernel, stride), atol=1e-4)


def test_convnet_forward_is_conv_batchnorm_relu_blocks_then_mean_pool(x64):
    model = ConvNet(
        3, rngs=nnx.Rngs(0), channels=4, num_blocks=2, param_dtype=jnp.float64, conv_impl="lax"
    )
    apply_fn, params = functional(model)
    # Away from the initial values (BatchNorm scale 1, bias 0), so each leaf counts.
    keys = iter(jax.random.split(jax.random.key(1), 16))
    params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(next(keys), a.shape), params)
    x = jax.random.normal(jax.random.key(2), (5, 12, 12, 1), jnp.float64)
    h = np.asarray(x)
    for i in range(2):
        block = params["blocks"][i]
        conv, norm = block["conv"], block["norm"]
        h = np.asarray(_reference_conv(jnp.asarray(h), conv["kernel"], 2)) + conv["bias"]
        h = np.maximum(np.asarray(norm["scale"]) * _two_pass_batchnorm(h) + norm["bias"], 0.0)
    expected = h.mean(axis=(1, 2)) @ np.asarray(params["head"]["kernel"]) + params["head"]["bias"]
    np.testing.assert_allclose(apply_fn(params, x), expected, rtol=1e-9, atol=1e-9)


def test_batchnorm_gradient_matches_two_pass(x64):
    x = jnp.asarray(np.random.default_rng(1).normal(2.0, 3.0, (3, 4, 4, 2)))
    norm = BatchStatNorm(2, param_dtype=jnp.float64)
    w = jnp.asarray(np.random.default_rng(2).normal(size=x.shape))
    ours = jax.grad(lambda x: jnp.sum(norm(x) * w))(x)
    theirs = jax.grad(lambda x: jnp.sum(_two_pass_batchnorm(x, xp=jnp) * w))(x)
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12)


def test_batchnorm_uses_the_batch_statistics():
    x = jax.random.normal(jax.random.key(0), (6, 5, 5, 4)) * 3.0 + 2.0
    y = BatchStatNorm(4)(x)
    np.testing.assert_allclose(jnp.mean(y, axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(jnp.var(y, axis=(0, 1, 2)), 1.0, rtol=1e-3)

    apply_fn, params = functional(ConvNet(5, rngs=nnx.Rngs(1), channels=8))
    apply_fn = jax.jit(apply_fn)  # one compile for both batches, not op-by-op dispatch
    batch = jax.random.normal(jax.random.key(2), (4, 28, 28, 1))
    changed = batch.at[1:].multiply(5.0)
    # Same first example, different batch mates: transductive BN changes its logits.
    out, out_changed = apply_fn(params, batch), apply_fn(params, changed)
    assert not np.allclose(out[0], out_changed[0], atol=1e-4)


def _conv_meta_grad(conv_impl, *, num_inner_steps):
    model = ConvNet(
        3, rngs=nnx.Rngs(0), channels=4, num_blocks=2, param_dtype=jnp.float64, conv_impl=conv_impl
    )
    apply_fn, params = functional(model)

    def loss_fn(p, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y).mean()

    kx, kq = jax.random.split(jax.random.key(3))
    support = (
        jax.random.normal(kx, (2, 3, 12, 12, 1), jnp.float64),
        jnp.tile(jnp.arange(3), (2, 1)),
    )
    query = (jax.random.normal(kq, (2, 6, 12, 12, 1), jnp.float64), jnp.tile(jnp.arange(3), (2, 2)))

    @jax.jit
    def meta_value_and_grad(p):
        return jax.value_and_grad(batched_meta_loss, argnums=1)(
            loss_fn, p, support, query, inner_lr=0.4, num_inner_steps=num_inner_steps
        )

    return params, meta_value_and_grad


def test_convnet_meta_gradient_same_as_with_lax_conv(x64):
    params, lax_fn = _conv_meta_grad("lax", num_inner_steps=2)
    expected_value, expected_grads = lax_fn(params)
    for conv_impl in ("phases", "patches"):
        _, meta_fn = _conv_meta_grad(conv_impl, num_inner_steps=2)
        value, grads = meta_fn(params)
        assert grads["blocks"][1]["conv"]["kernel"].dtype == jnp.float64
        np.testing.assert_allclose(value, expected_value, rtol=1e-10)
        jax.tree.map(
            lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-8, atol=1e-10),
            grads,
            expected_grads,
        )


def test_convnet_rejects_unknown_conv_impl():
    with pytest.raises(ValueError, match="conv_impl"):
        ConvNet(5, rngs=nnx.Rngs(0), conv_impl="winograd")


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.float64])
def test_mlp_functional_shapes_and_dtype(x64, param_dtype):
    apply_fn, params = functional(MLP((1, 40, 40, 1), rngs=nnx.Rngs(0), param_dtype=param_dtype))
    leaves = jax.tree.leaves(params)
    assert len(leaves) == 6
    assert all(leaf.dtype == param_dtype for leaf in leaves)
    assert params["layers"][0]["kernel"].shape == (1, 40)
    out = apply_fn(params, jnp.ones((10, 1), param_dtype))
    assert out.shape == (10, 1)
    assert out.dtype == param_dtype
    batched = jax.jit(jax.vmap(apply_fn, in_axes=(None, 0)))(
        params, jnp.ones((3, 10, 1), param_dtype)
    )
    assert batched.shape == (3, 10, 1)


@pytest.mark.parametrize("impl", [i for i in ops.CONV_IMPLS if i != "lax"])
@pytest.mark.parametrize("kernel_hw,stride", [((2, 5), 1), ((2, 5), 2), ((3, 3), 2)])
def test_conv_non_square_input_and_kernel_forward_and_gradient(x64, impl, kernel_hw, stride):
    # Height and width differ in size and in SAME padding (9 -> (1, 1), 14 -> (0, 1) at
    # stride 2), and so do the kernel's: an axis or a kernel side taken for the other
    # shows. (3, 3) at stride 2 is the "phases" backward pass's own case.
    kx, kw, kc = jax.random.split(jax.random.key(7), 3)
    x = jax.random.normal(kx, (2, 9, 14, 3), jnp.float64)
    kernel = jax.random.normal(kw, (*kernel_hw, 3, 4), jnp.float64)
    out_shape = (2, -(-9 // stride), -(-14 // stride), 4)
    cotangent = jax.random.normal(kc, out_shape, jnp.float64)

    def ours(x, kernel):
        return jnp.vdot(ops.conv2d(x, kernel, stride=stride, impl=impl), cotangent)

    def reference(x, kernel):
        return jnp.vdot(_reference_conv(x, kernel, stride), cotangent)

    assert ops.conv2d(x, kernel, stride=stride, impl=impl).shape == out_shape
    np.testing.assert_allclose(ours(x, kernel), reference(x, kernel), rtol=1e-12)
    grads = jax.grad(ours, argnums=(0, 1))(x, kernel)
    expected = jax.grad(reference, argnums=(0, 1))(x, kernel)
    for g, e in zip(grads, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-12)


def test_phases_uses_its_own_backward_pass_for_3x3_stride_2_only():
    x, kernel = jnp.zeros((1, 8, 8, 2)), jnp.zeros((3, 3, 2, 2))

    def primitives(stride):
        jaxpr = jax.make_jaxpr(lambda x: ops.conv2d(x, kernel, stride=stride, impl="phases"))(x)
        return {eqn.primitive.name for eqn in jaxpr.jaxpr.eqns}

    assert any("custom_vjp" in name for name in primitives(2))
    assert not any("custom_vjp" in name for name in primitives(1))


def test_convnet_and_conv_use_the_conv_impl_asked_for():
    # Every impl gives the same numbers, so only the computation shows which one ran.
    def primitives(conv_impl):
        model = ConvNet(3, rngs=nnx.Rngs(0), channels=4, num_blocks=2, conv_impl=conv_impl)
        apply_fn, params = functional(model)
        jaxpr = jax.make_jaxpr(apply_fn)(params, jnp.zeros((2, 12, 12, 1)))
        return [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]

    assert primitives("lax").count("conv_general_dilated") == 2
    assert "conv_general_dilated" not in primitives("patches")


def test_convnet_in_channels_and_param_dtype_reach_every_leaf(x64):
    model = ConvNet(
        3, rngs=nnx.Rngs(0), channels=4, num_blocks=2, in_channels=2, param_dtype=jnp.float64
    )
    apply_fn, params = functional(model)
    assert params["blocks"][0]["conv"]["kernel"].shape == (3, 3, 2, 4)
    assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(params))
    out = jax.eval_shape(apply_fn, params, jax.ShapeDtypeStruct((2, 12, 12, 2), jnp.float64))
    assert out.shape == (2, 3) and out.dtype == jnp.float64


def test_mlp_kernel_init_is_used():
    # Finn's initialisation: a normal of std 0.01 truncated at two standard deviations.
    _, params = functional(MLP((1, 40, 40, 1), rngs=nnx.Rngs(0), kernel_init=FINN_KERNEL_INIT))
    kernel = np.asarray(params["layers"][1]["kernel"])
    assert np.abs(kernel).max() <= 0.02 + 1e-7
    assert 0.005 < kernel.std() < 0.01
    assert all(np.all(layer["bias"] == 0) for layer in params["layers"].values())
