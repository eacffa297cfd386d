"""Packed storage for ternary models: 2-bit or base-3 codes plus float32 scales, in safetensors.

A packed checkpoint is a directory holding

* `model.safetensors` -- one file with every tensor:
    - each quantized linear kernel (Flax path `P`, e.g. `layers_0/self_attn/q_proj/kernel`,
      Flax shape `(in, out)`) as two tensors:
        `P.packed`: uint8 ternary codes. The codes are first transposed to the torch layout
            `(out, in)`, then packed with `packing.pack_2bit` (axis 0, 4 per byte: shape
            `(ceil(out/4), in)`, byte for byte the layout of transformers' BitNet `weight`) or
            `packing.pack_base3` (`(out, in)` flattened in C order, 5 per byte: 1-D
            `ceil(out*in/5)`);
        `P.scale`: float32 absmean scale `gamma`, shaped as `quant.ternary_absmean` returns it
            (broadcasts against the `(in, out)` kernel): `()` per tensor, `(1, out)` per
            channel, `(in/group, 1, out)` per group;
    - every other parameter (embeddings, norm scales, the full-precision lm_head) under its
      Flax path, in bfloat16 (default) or float32;
* `bitnet_packed.json` -- format name and version, model config, precision recipe, layout, the
  original `(in, out)` shape and scale granularity of every packed kernel, the tokenizer
  ("bytes", or "tokenizer.json" copied next to it) and the size report.

This module is the file format: which tensors a model makes (`tensor_specs`), their sizes,
writing them (`save_packed`) and reading them back checked (`read_manifest`, `open_packed`).
What the stored codes become (float kernels, int8 inference weights) is
`interop.packed_params`; the conversions themselves are `core.codec`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
from flax import traverse_util
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from bitnet_jax.core import codec, packing
from bitnet_jax.core.precision import PrecisionRecipe, WeightQuantizer, get_recipe
from bitnet_jax import files
from bitnet_jax.errors import ConfigError, require
from bitnet_jax.interop.run_dir import ModelBundle, abstract_params, fresh_directory
from bitnet_jax.model.linears import decoder_linear
from bitnet_jax.model.transformer import ModelConfig, get_model_config
from bitnet_jax.units import format_bytes

__all__ = [
    "DTYPES",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "WEIGHTS_FILE",
    "PackedFile",
    "flat_params",
    "format_size_report",
    "nested_params",
    "open_packed",
    "packed_tensors",
    "quantized_kernels",
    "read_manifest",
    "require_ternary",
    "safetensors_file_nbytes",
    "save_packed",
    "size_report",
    "tensor_specs",
    "unpack_checked",
]

FORMAT = "bitnet_jax.packed"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "bitnet_packed.json"
PACKED_SUFFIX = ".packed"
SCALE_SUFFIX = ".scale"
DTYPES: dict[str, np.dtype] = {"bfloat16": np.dtype(ml_dtypes.bfloat16),
                               "float32": np.dtype(np.float32)}
ORIENTATION = ("codes transposed to torch (out, in) before packing; 2bit packs axis 0 "
               "(transformers BitNet layout), base3 flattens (out, in) in C order")


# ----------------------------------------------------------------------------------------------
# Which parameters are packed.

def require_ternary(recipe: PrecisionRecipe) -> None:
    """ConfigError unless every linear role has ternary weights (only those have codes to pack)."""
    other = [f"{role}: {p.weight.kind if p.weight else 'unquantized'}"
             for role, p in recipe.roles.items() if p.weight is None or p.weight.kind != "ternary"]
    require(not other,
            f"precision {recipe.name!r} is not ternary in every linear role "
            f"({', '.join(other)}); packed checkpoints store ternary codes only: use a "
            f"b1.58-family recipe (b1.58, a4.8, v2-a8, ...) or keep this model as a run "
            f"directory")


def flat_params(tree: Any) -> dict[str, Any]:
    """Nested dicts -> {'a/b/c': leaf}, the '/'-joined Flax path used as the tensor name."""
    return traverse_util.flatten_dict(tree, sep="/")


def nested_params(flat: Mapping[str, Any]) -> dict:
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def quantized_kernels(params: Any, recipe: PrecisionRecipe) -> dict[str, WeightQuantizer]:
    """Flax path -> weight quantizer of every linear kernel the recipe quantizes.

    Kernels are found by the model's table of decoder linears (`model.linears`), which also
    gives their roles; the lm_head is a kernel too but not a decoder linear (never quantized).
    """
    out = {}
    for path in flat_params(params):
        linear = decoder_linear(path.split("/"))
        weight = recipe.role(linear.role).weight if linear is not None else None
        if weight is not None:
            out[path] = weight
    return out


def _scale_shape(kernel_shape: tuple[int, ...], weight: WeightQuantizer) -> tuple[int, ...]:
    """Shape of `ternary_absmean`'s scale for an `(in, out)` kernel."""
    n_in, n_out = kernel_shape
    if weight.granularity == "channel":
        return (1, n_out)
    if weight.granularity == "group":
        return (n_in // weight.group_size, 1, n_out)
    return ()


def _check_layout_dtype(layout: str, dtype: str) -> None:
    require(layout in packing.LAYOUTS,
            f"layout={layout!r}; choose one of {packing.LAYOUTS} (2bit: transformers' layout, "
            f"4 weights a byte; base3: 5 weights a byte)")
    require(dtype in DTYPES, f"dtype={dtype!r} for the unpacked parameters; choose one of "
                             f"{tuple(DTYPES)}")


# ----------------------------------------------------------------------------------------------
# Sizes.

def tensor_specs(params: Any, recipe: PrecisionRecipe, layout: str = "2bit",
                 dtype: str = "bfloat16") -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Name -> (dtype, shape) of every tensor of the packed file, from shapes alone."""
    _check_layout_dtype(layout, dtype)
    kernels = quantized_kernels(params, recipe)
    specs = {}
    for path, leaf in flat_params(params).items():
        shape = tuple(leaf.shape)
        if path in kernels:
            specs[path + PACKED_SUFFIX] = (np.dtype(np.uint8), codec.packed_shape(shape[::-1], layout))
            specs[path + SCALE_SUFFIX] = (np.dtype(np.float32), _scale_shape(shape, kernels[path]))
        else:
            specs[path] = (DTYPES[dtype], shape)
    return specs


def _nbytes(spec: tuple[np.dtype, tuple[int, ...]]) -> int:
    return spec[0].itemsize * math.prod(spec[1])


_SAFETENSORS_DTYPE = {"uint8": "U8", "bfloat16": "BF16", "float32": "F32"}


def safetensors_file_nbytes(specs: Mapping[str, tuple[np.dtype, tuple[int, ...]]],
                            metadata: Mapping[str, str] | None = None) -> int:
    """Size of the safetensors file these tensors make, without writing it.

    The format is an 8-byte header length, a compact JSON header padded with spaces to a
    multiple of 8, then the data; the library orders tensors by dtype size (largest first),
    then name, which fixes the offsets written in the header. Tested against the library.
    """
    order = sorted(specs, key=lambda name: (-specs[name][0].itemsize, name))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        dtype, shape = specs[name]
        end = offset + _nbytes(specs[name])
        header[name] = {"dtype": _SAFETENSORS_DTYPE[dtype.name], "shape": list(shape),
                        "data_offsets": [offset, end]}
        offset = end
    n = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + n + (-n % 8) + offset


def _file_metadata(layout: str) -> dict[str, str]:
    # Makes model.safetensors recognisable on its own (metadata values must be strings).
    return {"format": FORMAT, "format_version": str(FORMAT_VERSION), "layout": layout}


def size_report(model: Any, layout: str = "2bit", precision: str | None = None,
                dtype: str = "bfloat16") -> dict:
    """Bytes of the packed checkpoint of `model` against the same model in bfloat16.

    `model`: a ModelBundle, or a parameter tree (arrays or `jax.ShapeDtypeStruct`s: only shapes
    are read, so a large model can be sized from `run_dir.abstract_params`) with `precision`.
    Linear weights: packed codes + float32 scales vs those kernels in bf16 (`linear_ratio`,
    ~8 for 2bit and ~10 for base3 when scales are few). Files: the packed model.safetensors vs
    a safetensors file of every parameter in bf16 (`file_ratio`).
    """
    if isinstance(model, ModelBundle):
        precision = precision or model.precision
        model = model.params
    require(precision is not None, "size_report of a parameter tree needs precision=NAME")
    recipe = get_recipe(precision)
    require_ternary(recipe)
    specs = tensor_specs(model, recipe, layout, dtype)
    bf16 = DTYPES["bfloat16"]
    bf16_specs = {path: (bf16, tuple(leaf.shape)) for path, leaf in flat_params(model).items()}
    kernels = quantized_kernels(model, recipe)
    codes = sum(_nbytes(specs[p + PACKED_SUFFIX]) for p in kernels)
    scales = sum(_nbytes(specs[p + SCALE_SUFFIX]) for p in kernels)
    linear_bf16 = sum(_nbytes(bf16_specs[p]) for p in kernels)
    other = sum(_nbytes(s) for name, s in specs.items() if name in bf16_specs)
    other_bf16 = sum(_nbytes(s) for name, s in bf16_specs.items() if name not in kernels)
    file_bytes = safetensors_file_nbytes(specs, _file_metadata(layout))
    bf16_file_bytes = safetensors_file_nbytes(bf16_specs)
    n_weights = sum(math.prod(bf16_specs[p][1]) for p in kernels)
    return {
        "layout": layout, "dtype": dtype, "precision": recipe.name,
        "linear_tensors": len(kernels), "linear_weights": n_weights,
        "linear_code_bytes": codes, "linear_scale_bytes": scales,
        "linear_packed_bytes": codes + scales, "linear_bf16_bytes": linear_bf16,
        "linear_bits_per_weight": 8 * (codes + scales) / n_weights if n_weights else 0.0,
        "linear_ratio": linear_bf16 / (codes + scales) if kernels else 0.0,
        "other_bytes": other, "other_bf16_bytes": other_bf16,
        "file_bytes": file_bytes, "bf16_file_bytes": bf16_file_bytes,
        "file_ratio": bf16_file_bytes / file_bytes,
    }


def format_size_report(report: Mapping[str, Any]) -> str:
    """The size table for the CLI: packed vs bf16 bytes and the ratio, per part and per file."""
    rows = [
        ("", f"packed ({report['layout']})", "bf16", "bf16 / packed"),
        ("linear weights", format_bytes(report["linear_packed_bytes"]),
         format_bytes(report["linear_bf16_bytes"]), f"{report['linear_ratio']:.2f}x"),
        ("  codes", format_bytes(report["linear_code_bytes"]), "", ""),
        ("  scales (f32)", format_bytes(report["linear_scale_bytes"]), "", ""),
        (f"other params ({report['dtype']})", format_bytes(report["other_bytes"]),
         format_bytes(report["other_bf16_bytes"]), ""),
        ("model.safetensors", format_bytes(report["file_bytes"]),
         format_bytes(report["bf16_file_bytes"]), f"{report['file_ratio']:.2f}x"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    title = (f"precision {report['precision']}: {report['linear_tensors']} ternary kernels, "
             f"{report['linear_weights']:,} weights at "
             f"{report['linear_bits_per_weight']:.3f} bits each (codes + scales)")
    lines = [title]
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append(("  " + "  ".join(cells)).rstrip())
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Save.

def packed_tensors(params: Any, recipe: PrecisionRecipe, layout: str = "2bit",
                   dtype: str = "bfloat16") -> dict[str, np.ndarray]:
    """The tensors of `model.safetensors` for float `params` quantized by `recipe`."""
    require_ternary(recipe)
    _check_layout_dtype(layout, dtype)
    kernels = quantized_kernels(params, recipe)
    tensors = {}
    for path, leaf in flat_params(params).items():
        if path in kernels:
            w = kernels[path]
            codes_OxI, scale = codec.ternary_codes(leaf, w.granularity, w.group_size)
            tensors[path + PACKED_SUFFIX] = codec.pack_codes(codes_OxI, layout)
            tensors[path + SCALE_SUFFIX] = scale
        else:
            # Through numpy float32 first: ml_dtypes rounds to nearest even, as jnp.astype does.
            tensors[path] = np.asarray(leaf, np.float32).astype(DTYPES[dtype])
    return tensors


def save_packed(bundle: ModelBundle, out_dir: str | os.PathLike, layout: str = "2bit",
                dtype: str = "bfloat16", overwrite: bool = False) -> dict:
    """Write `bundle` as a packed checkpoint in `out_dir`; return its size report.

    The report's `file_bytes` is the size of the written model.safetensors.
    """
    recipe = get_recipe(bundle.precision)
    require_ternary(recipe)
    _check_layout_dtype(layout, dtype)
    kernels = quantized_kernels(bundle.params, recipe)
    require(len(kernels) == 7 * bundle.config.n_layers,
            f"found {len(kernels)} quantized linear kernels in the parameters, expected "
            f"{7 * bundle.config.n_layers} (7 per layer): is this a Transformer parameter tree?")
    report = size_report(bundle, layout, dtype=dtype)
    tensors = packed_tensors(bundle.params, recipe, layout, dtype)
    out_dir, tokenizer = fresh_directory(out_dir, overwrite, bundle.tokenizer)
    if tokenizer != "bytes":  # named relative to the directory: it travels with the weights
        tokenizer = Path(tokenizer).name
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata=_file_metadata(layout))
    report["file_bytes"] = os.path.getsize(out_dir / WEIGHTS_FILE)
    report["file_ratio"] = report["bf16_file_bytes"] / report["file_bytes"]

    flat = flat_params(bundle.params)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "precision": bundle.precision, "layout": layout, "dtype": dtype,
        "orientation": ORIENTATION, "tokenizer": tokenizer,
        "config": dataclasses.asdict(bundle.config),
        "linear": {path: {"shape": list(flat[path].shape), "granularity": w.granularity,
                          "group_size": w.group_size} for path, w in kernels.items()},
        "size": report,
    }
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return report


# ----------------------------------------------------------------------------------------------
# Load.

def read_manifest(directory: str | os.PathLike) -> dict:
    """The parsed bitnet_packed.json of a packed checkpoint, with the format checked."""
    directory = Path(directory)
    require(directory.is_dir(), f"{directory} is not a directory; pass a packed checkpoint "
                                f"directory written by save_packed")
    path = directory / MANIFEST_FILE
    require(path.is_file(), f"{directory} is not a packed checkpoint (no {MANIFEST_FILE}); "
                            f"write one with save_packed from a ternary run")
    manifest = files.read_json_object(path, "packed manifest")
    found = manifest.get("format")
    require(found == FORMAT, f"{path} is not a {FORMAT} manifest (format={found!r})")
    version = manifest.get("format_version")
    require(version == FORMAT_VERSION,
            f"{path} has format_version {version!r}; this bitnet_jax reads version "
            f"{FORMAT_VERSION} (upgrade bitnet_jax to read newer checkpoints)")
    missing = [k for k in ("precision", "layout", "dtype", "config", "tokenizer")
               if k not in manifest]
    require(not missing, f"{path} lacks {missing}")
    require((directory / WEIGHTS_FILE).is_file(), f"{directory} has no {WEIGHTS_FILE}")
    return manifest


def _read_tensors(directory: Path, expected: set[str]) -> dict[str, np.ndarray]:
    """All tensors of model.safetensors, checked to be exactly the `expected` names."""
    opened = files.read_with(directory / WEIGHTS_FILE, lambda p: safe_open(p, framework="numpy"),
                             "safetensors file", "pack the run again (the file is damaged)")
    with opened as f:
        names = set(f.keys())
        missing, extra = sorted(expected - names), sorted(names - expected)
        require(not missing, f"{directory / WEIGHTS_FILE} lacks {len(missing)} tensor(s) the "
                             f"model needs, e.g. {missing[:3]}")
        require(not extra, f"{directory / WEIGHTS_FILE} has {len(extra)} tensor(s) the model "
                           f"does not have, e.g. {extra[:3]}: written for another model?")
        return {name: f.get_tensor(name) for name in names}


def _checked(tensors: Mapping[str, np.ndarray], name: str,
             spec: tuple[np.dtype, tuple[int, ...]]) -> np.ndarray:
    value = tensors[name]
    require(value.dtype == spec[0] and tuple(value.shape) == spec[1],
            f"tensor {name!r} is {value.dtype}{list(value.shape)}, expected "
            f"{spec[0]}{list(spec[1])}")
    return value


class PackedFile(NamedTuple):
    """A packed checkpoint read and checked: every tensor has the dtype and shape its model
    needs."""

    directory: Path
    manifest: dict
    config: ModelConfig
    recipe: PrecisionRecipe
    shapes: Any  # the parameter tree as jax.ShapeDtypeStructs
    tensors: dict[str, np.ndarray]

    @property
    def layout(self) -> str:
        return self.manifest["layout"]

    @property
    def tokenizer(self) -> str:
        """"bytes", or the absolute path of the tokenizer.json stored next to the weights."""
        tokenizer = self.manifest["tokenizer"]
        if tokenizer == "bytes":
            return tokenizer
        path = (self.directory / tokenizer).resolve()
        require(path.is_file(), f"{self.directory} lacks its tokenizer {tokenizer}")
        return str(path)

    def codes(self, path: str, kernel_shape: tuple[int, ...]) -> np.ndarray:
        """int8 codes `(out, in)` of the `(in, out)` kernel at `path`."""
        return unpack_checked(self.tensors, path, kernel_shape, self.layout)

    def scale(self, path: str) -> np.ndarray:
        return self.tensors[path + SCALE_SUFFIX]

    def packed(self, path: str) -> np.ndarray:
        return self.tensors[path + PACKED_SUFFIX]


def open_packed(directory: str | os.PathLike) -> PackedFile:
    directory = Path(directory)
    manifest = read_manifest(directory)
    config = get_model_config(None, **manifest["config"])
    recipe = get_recipe(manifest["precision"])
    require_ternary(recipe)
    layout, dtype = manifest["layout"], manifest["dtype"]
    _check_layout_dtype(layout, dtype)
    shapes = abstract_params(config, recipe)
    specs = tensor_specs(shapes, recipe, layout, dtype)
    raw = _read_tensors(directory, set(specs))
    tensors = {name: _checked(raw, name, specs[name]) for name in raw}
    return PackedFile(directory, manifest, config, recipe, shapes, tensors)


def unpack_checked(tensors: Mapping[str, np.ndarray], path: str, kernel_shape: tuple[int, ...],
                   layout: str) -> np.ndarray:
    """int8 codes `(out, in)` of one kernel; bytes that no ternary code makes are a ConfigError."""
    try:
        return codec.unpack_codes(tensors[path + PACKED_SUFFIX], kernel_shape[::-1], layout)
    except ValueError as err:
        raise ConfigError(f"tensor {path + PACKED_SUFFIX!r} is not valid {layout} data: "
                          f"{err}") from None
