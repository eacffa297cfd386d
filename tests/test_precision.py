"""Precision recipes: presets, the generic wXaY family, granularity suffixes, clear errors."""

import jax
import pytest

from bitnet_jax.core.precision import LINEAR_ROLES, PRESETS, get_recipe


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_resolve_and_are_hashable(name):
    recipe = get_recipe(name)
    assert recipe.name == name
    hash(recipe)  # recipes are static arguments under jit
    assert set(recipe.roles) == set(LINEAR_ROLES)


def test_bf16_quantizes_nothing():
    recipe = get_recipe("bf16")
    assert not recipe.quantizes_weights and recipe.kv_cache is None
    assert all(p.weight is None and p.activation is None for p in recipe.roles.values())
    assert not recipe.supports_integer_matmul


def test_b158_is_ternary_weights_and_8bit_absmax_everywhere():
    for p in get_recipe("b1.58").roles.values():
        assert (p.weight.kind, p.weight.granularity) == ("ternary", "tensor")
        assert (p.activation.kind, p.activation.bits, p.activation.keep_ratio) == ("absmax", 8, 1.0)
        assert not p.hadamard
    assert get_recipe("b1.58").supports_integer_matmul


def test_a48_follows_the_paper():
    r = get_recipe("a4.8")
    assert (r.qkv.activation.kind, r.qkv.activation.bits) == ("absmean", 4)
    assert (r.gate_up.activation.kind, r.gate_up.activation.bits) == ("absmean", 4)
    assert (r.attn_out.activation.kind, r.attn_out.activation.bits,
            r.attn_out.activation.keep_ratio) == ("absmax", 8, 0.5)
    assert (r.down.activation.kind, r.down.activation.bits) == ("absmax", 8)
    assert (r.kv_cache.bits, r.kv_cache.bos_bits) == (3, 4)
    assert all(p.weight.kind == "ternary" for p in r.roles.values())


@pytest.mark.parametrize("name,bits,kind", [("v2-a8", 8, "absmax"), ("v2-a4", 4, "absmean")])
def test_v2_rotates_attention_output_and_down_only(name, bits, kind):
    r = get_recipe(name)
    assert {role for role, p in r.roles.items() if p.hadamard} == {"attn_out", "down"}
    assert all((p.activation.kind, p.activation.bits) == (kind, bits) for p in r.roles.values())


def test_generic_family():
    assert get_recipe("w1.58a8").roles == get_recipe("b1.58").roles
    assert get_recipe("w16a16").roles == get_recipe("bf16").roles
    assert get_recipe("w1a8").qkv.weight.kind == "binary"
    w4a8 = get_recipe("w4a8")
    assert (w4a8.down.weight.kind, w4a8.down.weight.bits, w4a8.down.activation.bits) == ("absmax", 4, 8)
    w2a16 = get_recipe("w2a16")
    assert w2a16.qkv.activation is None and not w2a16.supports_integer_matmul


@pytest.mark.parametrize("bad", ["w3a1", "w9a8", "w16a32"])
def test_generic_family_rejects_bad_bits(bad):
    with pytest.raises(ValueError, match="bits"):
        get_recipe(bad)


def test_granularity_suffixes():
    channel = get_recipe("b1.58@channel")
    assert channel.name == "b1.58@channel"
    assert all(p.weight.granularity == "channel" for p in channel.roles.values())
    grouped = get_recipe("w4a8@g128")
    assert all((p.weight.granularity, p.weight.group_size) == ("group", 128)
               for p in grouped.roles.values())
    assert get_recipe("bf16@channel").roles == get_recipe("bf16").roles


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        get_recipe("b1.59")
    message = str(info.value)
    assert "b1.59" in message
    for name in PRESETS:
        assert name in message
    assert "w{W}a{A}" in message


def test_recipes_work_as_static_jit_arguments():
    recipe = get_recipe("a4.8")
    fn = jax.jit(lambda x, r: x * r.attn_out.activation.keep_ratio, static_argnums=1)
    assert float(fn(2.0, recipe)) == 1.0
