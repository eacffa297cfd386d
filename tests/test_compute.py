"""Tests for bitnet_jax.model.accounting: counts against the Flax model and published sizes, FLOPs by hand,
the BitNet energy model, weight memory and MFU."""

from __future__ import annotations

import json
import math

import flax.linen as nn
import jax
import pytest

from bitnet_jax.model import accounting as compute
from bitnet_jax.model.accounting import (
    FLOP_CONVENTIONS,
    Energy,
    energy_per_token,
    flops_per_token,
    forward_flops_per_token,
    matmul_energy,
    matmul_energy_ratio,
    mfu,
    param_counts,
    summarize,
    train_flops,
    weight_memory,
)
from bitnet_jax.model.transformer import PRESETS, ModelConfig, get_model_config, init_params
from bitnet_jax.core.precision import get_recipe

# vocab 100, d 16, 2 layers, 4 heads of 4, 2 KV heads, d_ff 48, seq 32, untied, LLaMA norms.
SMALL = ModelConfig(vocab_size=100, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                    max_seq_len=32, norm_placement="pre")


def flax_param_count(config: ModelConfig) -> int:
    """Leaf-size sum of the Flax model's parameters, by shape only (no memory for big presets)."""
    shapes = jax.eval_shape(lambda key: init_params(config, get_recipe("b1.58"), key),
                            jax.random.PRNGKey(0))
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(nn.unbox(shapes)))


# ----------------------------------------------------------------------------------------------
# Parameter counts.

def test_small_counts_by_hand():
    # per layer: q 16*16=256, k 16*8=128, v 128, o 256, gate 16*48=768, up 768, down 768
    linear = 2 * (256 + 128 + 128 + 256 + 768 + 768 + 768)
    assert linear == 6144
    counts = param_counts(SMALL)
    assert counts.linear == linear
    assert counts.norm == 2 * (16 + 16) + 16  # two block norms per layer + final norm
    assert counts.embedding == 2 * 100 * 16  # embedding + untied head
    assert counts.non_embedding == 6144 + 80
    assert counts.total == 6224 + 3200
    assert counts.linear_by_role == {"qkv": 1024, "attn_out": 512, "gate_up": 3072,
                                     "down": 1536}
    assert counts.quantized_linear(get_recipe("b1.58")) == linear
    assert counts.quantized_linear(get_recipe("bf16")) == 0


@pytest.mark.parametrize("placement", ["pre", "subln", "bitlinear"])
@pytest.mark.parametrize("tied", [False, True])
def test_counts_equal_flax_model_for_every_placement(placement, tied):
    # head_dim 8 != d/n_heads, so q_dim (24) differs from d_model (20): sizes cannot be confused.
    config = ModelConfig(vocab_size=50, d_model=20, n_layers=2, n_heads=3, n_kv_heads=1,
                         head_dim=8, d_ff=36, max_seq_len=16, norm_placement=placement,
                         tie_embeddings=tied)
    assert param_counts(config).total == flax_param_count(config)


@pytest.mark.parametrize("name", ["ladder-1.6m", "bitnet-2b4t", "b1.58-700m", "spectra-99m",
                                  "spectra-3.9b"])
def test_counts_equal_flax_model_for_presets(name):
    config = PRESETS[name]
    assert param_counts(config).total == flax_param_count(config)


def test_norm_counts_per_placement():
    d, q, ff, layers = 20, 24, 36, 2
    base = ModelConfig(vocab_size=50, d_model=d, n_layers=layers, n_heads=3, n_kv_heads=1,
                       head_dim=8, d_ff=ff, norm_placement="pre")
    assert param_counts(base).norm == layers * 2 * d + d
    assert param_counts(base.replace(norm_placement="subln")).norm == layers * (2 * d + q + ff) + d
    # q, k, v, gate, up take d inputs; o takes q_dim; down takes d_ff.
    assert param_counts(base.replace(norm_placement="bitlinear")).norm == (
        layers * (5 * d + q + ff) + d)


def test_bitnet_2b4t_matches_published_size():
    counts = param_counts(get_model_config("bitnet-2b4t"))
    assert counts.total == 2_412_820_480
    assert counts.embedding == 128256 * 2560  # tied: one table


SPECTRA_PUBLISHED = {
    "spectra-99m": 99.74e6, "spectra-190m": 190.0e6, "spectra-390m": 392.4e6,
    "spectra-560m": 569.2e6, "spectra-830m": 834.0e6, "spectra-1.1b": 1.149e9,
    "spectra-1.5b": 1.515e9, "spectra-2.4b": 2.461e9, "spectra-3.9b": 3.989e9,
}


@pytest.mark.parametrize("name,published", sorted(SPECTRA_PUBLISHED.items()))
def test_spectra_totals_within_half_percent(name, published):
    total = param_counts(PRESETS[name]).total
    assert abs(total - published) / published < 0.005, (name, total)


@pytest.mark.parametrize("name,nominal", [("b1.58-700m", 700e6), ("b1.58-1.3b", 1.3e9),
                                          ("b1.58-3b", 3e9), ("b1.58-3.9b", 3.9e9)])
def test_b158_paper_non_embedding_within_ten_percent(name, nominal):
    non_embedding = param_counts(PRESETS[name]).non_embedding
    assert abs(non_embedding - nominal) / nominal < 0.10, (name, non_embedding)


# ----------------------------------------------------------------------------------------------
# FLOPs.

def test_flops_conventions_by_hand():
    n_linear, n_norm = 6144, 80  # see test_small_counts_by_hand
    kaplan = 6 * (n_linear + n_norm)  # 37,344
    matmuls = 2 * n_linear  # 12,288
    attention = 2 * 2 * 32 * (4 * 4) * 2  # 2 FLOP/MAC x (QK^T + PV) x seq x q_dim x layers = 4,096
    head = 2 * 16 * 100  # 3,200
    assert flops_per_token(SMALL, "kaplan") == kaplan == 37_344
    assert flops_per_token(SMALL, "full") == 3 * (matmuls + attention + head) == 58_752
    assert flops_per_token(SMALL, "causal") == 3 * (matmuls + attention / 2 + head) == 52_608
    assert forward_flops_per_token(SMALL, "full") == 19_584
    # seq_len changes only the attention term, and defaults to max_seq_len
    assert flops_per_token(SMALL, "full", seq_len=64) == 3 * (matmuls + 2 * attention + head)
    assert flops_per_token(SMALL, "kaplan", seq_len=64) == kaplan
    assert train_flops(SMALL, 1e6, "causal") == 1e6 * 52_608


def test_flops_do_not_depend_on_tied_embeddings_or_precision():
    tied = SMALL.replace(tie_embeddings=True)
    for convention in ("full", "causal"):  # the head's matmul runs either way
        assert flops_per_token(tied, convention) == flops_per_token(SMALL, convention)
    summary_bf16 = summarize(SMALL, get_recipe("bf16"))
    summary_ternary = summarize(SMALL, get_recipe("b1.58"))
    assert summary_bf16["flops_per_token"] == summary_ternary["flops_per_token"]


def test_kaplan_is_close_to_full_for_a_large_model():
    # With short context and small vocab relative to N, the conventions agree within ~20%.
    config = get_model_config("spectra-3.9b")
    ratio = flops_per_token(config, "causal") / flops_per_token(config, "kaplan")
    assert 1.0 < ratio < 1.25


def test_flops_errors():
    with pytest.raises(ValueError, match="unknown FLOP convention 'bogus'"):
        flops_per_token(SMALL, "bogus")
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        flops_per_token(SMALL, "full", seq_len=0)
    assert FLOP_CONVENTIONS == ("kaplan", "full", "causal")


# ----------------------------------------------------------------------------------------------
# Energy.

def test_energy_ratio_is_the_b158_claim():
    assert round(matmul_energy_ratio("7nm"), 1) == 71.4
    assert matmul_energy_ratio("7nm") == pytest.approx((0.16 + 0.34) / 0.007)
    assert matmul_energy_ratio("45nm") == pytest.approx((0.4 + 1.1) / 0.03)


def test_matmul_energy_formulas_at_45nm():
    m, n, p = 2, 3, 5
    fp = matmul_energy(m, n, p, 16, 16, "45nm")
    assert fp.add_pj == pytest.approx(m * (n - 1) * p * 0.4)  # 20 adds x FP16 add
    assert fp.mul_pj == pytest.approx(m * n * p * 1.1)  # 30 muls x FP16 mul
    # 16-bit activations keep full precision even with quantized weights (w4a16)
    assert matmul_energy(m, n, p, 4, 16, "45nm") == fp
    integer = matmul_energy(m, n, p, 4, 8, "45nm")
    assert integer.add_pj == pytest.approx(20 * 0.03)
    assert integer.mul_pj == pytest.approx(30 * 0.2)
    ternary = matmul_energy(m, n, p, 1.58, 8, "45nm")
    assert ternary.add_pj == pytest.approx(20 * 0.03)
    assert ternary.mul_pj == pytest.approx((m * p + m * n) * 0.2)  # only the rescaling
    assert matmul_energy(m, n, p, 1, 8, "45nm") == ternary  # binary: also adds only
    assert matmul_energy(m, n, p, 1.58, 4, "45nm") == ternary  # 4-bit costed at INT8


def test_large_ternary_matmul_approaches_the_ratio():
    fp = matmul_energy(1, 4096, 4096, 16, 16, "7nm")
    ternary = matmul_energy(1, 4096, 4096, 1.58, 8, "7nm")
    ratio = fp.total_pj / ternary.total_pj
    assert 70 < ratio < 71.43


def test_energy_per_token_parts():
    recipe = get_recipe("b1.58")
    e = energy_per_token(SMALL, recipe, "45nm", context_len=10)
    assert set(e.linear) == {"qkv", "attn_out", "gate_up", "down"}
    # q (16->16), k, v (16->8) per layer, ternary with 8-bit inputs, 2 layers
    qkv = sum((matmul_energy(1, 16, out, 1.58, 8, "45nm") for out in (16, 8, 8)), Energy())
    assert e.linear["qkv"].total_pj == pytest.approx(2 * qkv.total_pj)
    assert e.head == matmul_energy(1, 16, 100, 16, 16, "45nm")
    # attention: per head and layer, (1x4)@(4x10) and (1x10)@(10x4) at FP16
    adds = (3 * 10 + 9 * 4) * 4 * 2
    muls = (4 * 10 + 10 * 4) * 4 * 2  # = 2 * context * q_dim * layers MACs
    assert e.attention.add_pj == pytest.approx(adds * 0.4)
    assert e.attention.mul_pj == pytest.approx(muls * 1.1)
    assert e.total_pj == pytest.approx(e.linear_total.total_pj + e.head.total_pj
                                       + e.attention.total_pj)
    assert e.total_j == pytest.approx(e.total_pj * 1e-12)
    assert energy_per_token(SMALL, recipe, "45nm").context_len == SMALL.max_seq_len


def test_bf16_energy_far_above_ternary():
    config = get_model_config("bitnet-2b4t")
    bf16 = energy_per_token(config, get_recipe("bf16"), "7nm", context_len=256)
    ternary = energy_per_token(config, get_recipe("b1.58"), "7nm", context_len=256)
    assert bf16.total_pj / ternary.total_pj > 5  # head and attention stay FP16 in both
    assert 65 < bf16.linear_total.total_pj / ternary.linear_total.total_pj < 71.43
    assert bf16.head == ternary.head and bf16.attention == ternary.attention


def test_energy_errors():
    with pytest.raises(ValueError, match="unknown process node '5nm'"):
        energy_per_token(SMALL, get_recipe("bf16"), "5nm")
    with pytest.raises(ValueError, match="matmul dimension n"):
        matmul_energy(1, 0, 4)


# ----------------------------------------------------------------------------------------------
# Memory.

def test_ternary_memory_of_2b4t():
    config = get_model_config("bitnet-2b4t")
    memory = weight_memory(config, get_recipe("b1.58"))
    counts = param_counts(config)
    bf16_linear = 2 * counts.linear
    assert memory.linear_bf16_bytes == bf16_linear
    assert memory.default_format == "2bit"
    assert memory.linear_bytes["2bit"] * 8 == bf16_linear  # every out dim is a multiple of 4
    # base3: ceil(size/5) per tensor, so at most one byte of padding per tensor
    n_tensors = 7 * config.n_layers
    assert 0 <= memory.linear_bytes["base3"] - bf16_linear / 10 < n_tensors
    assert memory.linear_bytes["limit"] == pytest.approx(counts.linear * math.log2(3) / 8, abs=n_tensors)
    assert memory.scale_bytes == 4 * n_tensors  # one float32 per tensor
    assert memory.embedding_bytes == 2 * 128256 * 2560
    assert memory.total_bytes == (memory.linear_bytes["2bit"] + memory.embedding_bytes
                                  + memory.norm_bytes + memory.scale_bytes)
    assert memory.vs_bf16 == pytest.approx(memory.total_bytes / (2 * counts.total))


def test_2bit_memory_pads_the_output_axis():
    config = SMALL.replace(n_kv_heads=1, n_heads=2, head_dim=3 * 2)  # k, v have 6 outputs
    memory = weight_memory(config, get_recipe("b1.58"))
    # per layer (out, in): q (12,16) o (16,12) k, v (6,16) gate, up (48,16) down (16,48)
    per_layer = 3 * 16 + 4 * 12 + 2 * (2 * 16) + 2 * (12 * 16) + 4 * 48
    assert memory.linear_bytes["2bit"] == 2 * per_layer


def test_memory_formats_and_scales_per_recipe():
    counts = param_counts(SMALL)
    bf16 = weight_memory(SMALL, get_recipe("bf16"))
    assert bf16.linear_bytes == {"16bit": 2 * counts.linear}
    assert bf16.scale_bytes == 0 and bf16.vs_bf16 == 1.0
    assert weight_memory(SMALL, get_recipe("b1")).linear_bytes == {"1bit": counts.linear // 8}
    assert weight_memory(SMALL, get_recipe("w4a8")).linear_bytes == {"4bit": counts.linear // 2}
    # per output channel: one scale per output feature; per group of 8: (in / 8) * out
    outs = 2 * (16 + 8 + 8 + 16 + 48 + 48 + 16)
    assert weight_memory(SMALL, get_recipe("b1.58@channel")).scale_bytes == 4 * outs
    assert weight_memory(SMALL, get_recipe("b1.58@g8")).scale_bytes == 4 * counts.linear // 8


# ----------------------------------------------------------------------------------------------
# MFU and summary.

def test_mfu():
    assert mfu(1000.0, 6e9, 1e15) == pytest.approx(6e-3)
    with pytest.raises(ValueError, match="peak_flops must be positive"):
        mfu(1000.0, 6e9, 0)
    with pytest.raises(ValueError, match="peak_flops must be positive"):
        mfu(1000.0, 6e9, -1e12)


def test_summary_is_json_and_complete():
    summary = summarize(get_model_config("ladder-1.6m"), get_recipe("a4.8"), seq_len=128)
    decoded = json.loads(json.dumps(summary))
    assert {"config", "precision", "seq_len", "params", "flops_per_token", "energy_per_token",
            "memory"} <= set(decoded)
    assert set(decoded["flops_per_token"]) == set(FLOP_CONVENTIONS)
    assert set(decoded["energy_per_token"]) == {"45nm", "7nm"}
    assert decoded["energy_per_token"]["7nm"]["context_len"] == 128
    assert decoded["params"]["total"] == 1_694_400
    assert decoded["precision"]["kv_cache_bits"] == 3


def test_compute_module_needs_no_jax_arrays():
    # Pure arithmetic: results are Python numbers, never arrays (instant for a 4B preset).
    summary = summarize(get_model_config("b1.58-3.9b"), get_recipe("b1.58"))
    assert isinstance(summary["flops_per_token"]["full"], float)
    assert isinstance(summary["params"]["total"], int)
    assert compute.OP_ENERGY_PJ["45nm"]["fp32"].mul == 3.7
