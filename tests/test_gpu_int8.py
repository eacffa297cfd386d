"""gpu_int8: the integer path's GPU product with its scales inside, a Pallas (Triton) kernel.

No GPU here: the kernel runs in Pallas's interpreter, which executes the same program, and the
steps are lowered for CUDA from this host to check that they call the Triton kernel. The Triton
compile and the speed are a GPU's to check (`scripts/bench_train.py --modes
bf16,b1.58,b1.58-gpu-epilogue`)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.core import gpu_int8, matmul
from bitnet_jax.core.precision import ActivationQuantizer, WeightQuantizer
from bitnet_jax.errors import ConfigError

A8 = ActivationQuantizer("absmax", 8)
TERNARY = WeightQuantizer("ternary", 1.58)
TRITON_CALL = gpu_int8.TRITON_CALL_TARGET


def _bits(a):
    return np.asarray(a).view(np.uint16)


def _operands(lead, k, n, seed):
    rng = np.random.default_rng(seed)
    codes = jnp.asarray(rng.integers(-128, 128, size=(*lead, k)), jnp.int8)
    row_scale = jnp.asarray(rng.uniform(1e-3, 1e-1, size=lead), jnp.float32)
    w_codes = jnp.asarray(rng.integers(-1, 2, size=(n, k)), jnp.int8)
    w_scale = jnp.asarray(rng.uniform(0.1, 2.0, size=(n,)), jnp.float32)
    return codes, row_scale, w_codes, w_scale


def _xla_product(codes, row_scale, w_codes, w_scale):
    """The integer path's product as XLA takes it (`matmul._forward`): int32 sums, then the
    row scale, then the weight scale, one rounding."""
    acc = jax.lax.dot_general(codes, w_codes, (((codes.ndim - 1,), (1,)), ((), ())),
                              preferred_element_type=jnp.int32)
    return ((acc.astype(jnp.float32) * row_scale[..., None]) * w_scale).astype(jnp.bfloat16)


interpreted = functools.partial(gpu_int8.int8_scaled_dot, interpret=True)


def _pallas_calls(jaxpr):
    """Every Pallas call in a program, nested ones (custom partitioning, vmap rules) included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _pallas_calls(inner)


def _pallas_blocks(fn, *operands):
    """(array shape, block shape) of every operand and result of every Pallas call in fn's
    program."""
    return [(m.array_aval.shape, tuple(b.block_size for b in m.block_shape))
            for e in _pallas_calls(jax.make_jaxpr(fn)(*operands).jaxpr)
            for m in e.params["grid_mapping"].block_mappings]


@pytest.mark.parametrize("lead,k,n,kernel", [
    ((256,), 256, 256, True),     # the default blocks
    ((3, 112), 704, 208, True),   # blocks halved to divide: 16 rows, 16 columns, K in 64s
    ((96,), 96, 160, True),       # K in steps of 32
    ((3, 100), 704, 200, False),  # 300 rows: no block of 16 or more divides them, XLA's product
    ((2, 5), 1024, 8, False),     # fewer rows and columns than the smallest block
])
def test_the_kernel_gives_xlas_integer_product_bit_for_bit(lead, k, n, kernel):
    operands = _operands(lead, k, n, seed=k + n)
    got = jax.jit(interpreted)(*operands)
    assert got.dtype == jnp.bfloat16 and got.shape == (*lead, n)
    np.testing.assert_array_equal(_bits(got), _bits(_xla_product(*operands)))
    blocks = _pallas_blocks(interpreted, *operands)
    assert bool(blocks) == kernel
    # Whole blocks only: on a GPU the unmasked kernel would read and write past a cut block.
    for array, block in blocks:
        assert all(size % b == 0 for size, b in zip(array, block)), (array, block)


def test_whole_blocks():
    tile = gpu_int8.Tiling()
    assert gpu_int8.whole_blocks(16384, 4096, 1536, tile) == (128, 128, 128)
    assert gpu_int8.whole_blocks(4096, 704, 704, tile) == (128, 64, 64)
    assert gpu_int8.whole_blocks(48, 96, 96, tile) == (16, 32, 32)
    for m, n, k in ((300, 128, 128), (128, 72, 128), (128, 128, 48)):
        assert gpu_int8.whole_blocks(m, n, k, tile) is None


def test_under_vmap_and_on_a_sharded_mesh():
    codes, row_scale, w_codes, w_scale = _operands((4, 64), 128, 48, seed=1)
    want = _bits(_xla_product(codes, row_scale, w_codes, w_scale))
    mapped = jax.vmap(lambda c, r: interpreted(c, r, w_codes, w_scale))(codes, row_scale)
    np.testing.assert_array_equal(_bits(mapped), want)
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs 8 (simulated) devices")
    mesh = jax.sharding.Mesh(np.array(devices[:8]).reshape(4, 2), ("fsdp", "tensor"))
    P = jax.sharding.PartitionSpec
    put = lambda a, spec: jax.device_put(a, jax.sharding.NamedSharding(mesh, spec))  # noqa: E731
    args = (put(codes, P("fsdp")), put(row_scale, P("fsdp")), put(w_codes, P("tensor")),
            put(w_scale, P("tensor")))
    fn = jax.jit(interpreted)
    assert "all-gather" not in fn.lower(*args).compile().as_text()
    np.testing.assert_array_equal(_bits(fn(*args)), want)


def test_bad_operands_are_refused():
    codes, row_scale, w_codes, w_scale = _operands((8,), 64, 16, seed=2)
    with pytest.raises(TypeError, match="int8"):
        gpu_int8.int8_scaled_dot(codes.astype(jnp.int32), row_scale, w_codes, w_scale)
    with pytest.raises(ValueError, match="w_codes"):
        gpu_int8.int8_scaled_dot(codes, row_scale, w_codes[:, :32], w_scale)
    with pytest.raises(ValueError, match="w_scale"):
        gpu_int8.int8_scaled_dot(codes, row_scale, w_codes, w_scale[:4])


def test_the_switch_and_the_tiling(monkeypatch):
    monkeypatch.delenv(gpu_int8.ENABLE_ENV, raising=False)
    monkeypatch.delenv(gpu_int8.BLOCKS_ENV, raising=False)
    assert not gpu_int8.enabled() and not gpu_int8.applies(256, 256, 256)
    assert gpu_int8.tiling() == gpu_int8.Tiling()
    monkeypatch.setenv(gpu_int8.ENABLE_ENV, "1")
    assert gpu_int8.applies(256, 256, 256) and gpu_int8.applies(4096, 704, 1376)
    assert not gpu_int8.applies(256, 256, 100) and not gpu_int8.applies(8, 256, 256)
    monkeypatch.setenv(gpu_int8.BLOCKS_ENV, "64,256,64,4,4")
    assert gpu_int8.tiling() == gpu_int8.Tiling(64, 256, 64, 4, 4)
    for bad in ("64,256,64,4", "64,250,64,4,4", "a,b,c,d,e", "64,256,64,0,4",
                "8,256,64,4,4", "64,256,16,4,4"):
        monkeypatch.setenv(gpu_int8.BLOCKS_ENV, bad)
        with pytest.raises(ConfigError, match=gpu_int8.BLOCKS_ENV):
            gpu_int8.tiling()


@pytest.mark.parametrize("integer", [False, True], ids=["fake", "integer"])
def test_the_matmul_takes_it_with_the_same_value_and_gradients(integer, monkeypatch):
    """The step's product with the kernel (interpreted) equals, forward and backward, bit for
    bit, XLA's integer path (what a GPU takes for both paths without the kernel) and the path
    asked for (fake quantization: exact for ternary weights)."""
    monkeypatch.setenv(gpu_int8.ENABLE_ENV, "1")
    monkeypatch.setattr(gpu_int8, "int8_scaled_dot", interpreted)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 48, 128)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(128, 96)) * 0.05, jnp.float32)

    def value_and_grads(gpu, integer=True):
        def loss(xv, wv):
            y = matmul._quantized_dot(xv, wv, A8, TERNARY, jnp.bfloat16, integer, False, False,
                                      jnp.bfloat16, gpu)
            return jnp.sum(y.astype(jnp.float32) ** 2)
        fn = jax.value_and_grad(loss, argnums=(0, 1))
        return jax.make_jaxpr(fn)(x, w), jax.jit(fn)(x, w)

    program, got = value_and_grads(gpu=True)
    assert list(_pallas_calls(program.jaxpr))  # the kernel ran, not XLA's product
    wants = [value_and_grads(gpu=False)[1]]
    if not integer:
        wants.append(value_and_grads(gpu=False, integer=False)[1])
    for want in wants:
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("integer", [False, True], ids=["fake", "integer"])
def test_lowered_for_cuda_the_step_calls_the_kernel_only_when_turned_on(integer, monkeypatch):
    x = jnp.ones((2, 16, 64), jnp.bfloat16)
    w = jnp.ones((64, 32), jnp.float32)

    def lowered(platform, k=64):
        def loss(xv, wv):
            y = matmul.quantized_dot(xv, wv, A8, TERNARY, jnp.bfloat16, integer=integer)
            return jnp.sum(y.astype(jnp.float32))
        grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        return grad.trace(x[..., :k], w[:k]).lower(lowering_platforms=(platform,)).as_text()

    monkeypatch.delenv(gpu_int8.ENABLE_ENV, raising=False)
    assert TRITON_CALL not in lowered("cuda")
    monkeypatch.setenv(gpu_int8.ENABLE_ENV, "1")
    assert TRITON_CALL in lowered("cuda")
    assert TRITON_CALL not in lowered("cuda", k=48)  # K not in steps of 32: XLA's product
    assert TRITON_CALL not in lowered("tpu")
