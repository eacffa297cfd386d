"""A trained model as data, and run directories as its storage.

`ModelBundle` is what leaves a run or comes in from elsewhere: the architecture, the precision
recipe, the (float, unboxed) parameters and the tokenizer. `load_run` reads one from a run
directory's latest checkpoint; `save_run` writes one as a run directory (config.yaml, meta.json,
checkpoints/) that `bitnet train init_from=DIR`, `bitnet generate DIR` and `bitnet export-hf DIR`
read like any trained run. `interop.load.load_model` reads any of the stored formats.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import yaml

from bitnet_jax.train.checkpoint import Checkpointer, restore_params
from bitnet_jax.config import RunConfig, load_config, to_dict
from bitnet_jax.errors import require
from bitnet_jax.files import require_apart
from bitnet_jax.model.resolve import ResolvedRun, resolve_run
from bitnet_jax.model import layer_stack
from bitnet_jax.model.transformer import ModelConfig, init_params
from bitnet_jax.core.precision import PrecisionRecipe, get_recipe
from bitnet_jax.run_files import CHECKPOINT_DIR, CONFIG_FILE, META_FILE, TOKENIZER_FILE


@dataclass
class ModelBundle:
    """A model outside training: shape, precision, float parameters, tokenizer.

    `params` is the Flax parameter tree of `Transformer(config, recipe)` (plain nested dicts of
    arrays, no logical boxes), in the unrolled layout (`layers_0`, ...: what HF export, packing
    and the KV-cache decoder read); `load_run` unstacks a run trained with scan_layers. `tokenizer` is "bytes" or the path of a tokenizer.json.
    """

    config: ModelConfig
    precision: str
    params: Any
    tokenizer: str = "bytes"

    @property
    def recipe(self) -> PrecisionRecipe:
        return get_recipe(self.precision)


def abstract_params(config: ModelConfig, recipe: PrecisionRecipe) -> Any:
    """Shapes and dtypes of the parameter tree on one device, without allocating it."""
    shapes = nn.unbox(jax.eval_shape(lambda: init_params(config, recipe, jax.random.PRNGKey(0))))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), shapes)


def _resolve_tokenizer(spec: str, run_dir: Path) -> str:
    """A tokenizer path written relative to the run directory is found there."""
    if spec == "bytes" or Path(spec).expanduser().exists():
        return spec
    local = run_dir / Path(spec).name
    return str(local) if local.exists() else spec


def read_resolved_run(run_dir: str | Path) -> ResolvedRun:
    """The config of a run directory, checked in full, with its model config and recipes."""
    run_dir = Path(run_dir)
    require((run_dir / CONFIG_FILE).is_file(),
            f"{run_dir} is not a run directory (no {CONFIG_FILE}); pass a directory written by "
            f"`bitnet train` or `bitnet import-hf`")
    return resolve_run(load_config(run_dir / CONFIG_FILE))


def read_run_config(run_dir: str | Path) -> RunConfig:
    return read_resolved_run(run_dir).config


def load_run(run_dir: str | Path, step: Optional[int] = None) -> ModelBundle:
    """The model of a run directory at its latest (or the given) checkpoint step."""
    run_dir = Path(run_dir)
    run = read_resolved_run(run_dir)
    checkpoints = run_dir / CHECKPOINT_DIR
    require(checkpoints.is_dir() and any(checkpoints.iterdir()),
            f"{run_dir} has no checkpoints yet (train it, or check the path)")
    params = restore_params(checkpoints, abstract_params(run.model, run.recipe), step)
    unrolled = run.model.replace(scan_layers=False, remat="none")
    return ModelBundle(unrolled, run.config.precision, layer_stack.unstack_layers(params),
                       _resolve_tokenizer(run.config.data.tokenizer, run_dir))




def tokenizer_file(tokenizer: str) -> Path:
    """The tokenizer.json a (non-"bytes") tokenizer setting names: the file, or one in a
    directory."""
    path = Path(tokenizer).expanduser()
    return path / TOKENIZER_FILE if path.is_dir() else path


def fresh_directory(out_dir: str | Path, overwrite: bool,
                    tokenizer: str = "bytes", sources: Sequence[str | Path] = ()
                    ) -> tuple[Path, str]:
    """An empty directory to write a model into, and the model's tokenizer copied into it.

    A non-empty directory is replaced only with `overwrite` (exports, imports and packed
    checkpoints all refuse to mix files). A tokenizer.json is read before the directory is
    replaced (it may live there) and written back as OUT/tokenizer.json, whose absolute path
    is returned; "bytes" is returned as it is. An output that is, contains or is inside one of
    `sources` (the directories the model is read from) is refused, overwrite or not.
    """
    require_apart(out_dir, sources)
    tokenizer_bytes = None
    if tokenizer != "bytes":
        source = tokenizer_file(tokenizer)
        require(source.is_file(), f"tokenizer {tokenizer!r} is not a file")
        tokenizer_bytes = source.read_bytes()
    out_dir = Path(out_dir).resolve()
    require(not out_dir.is_file(), f"{out_dir} is a file; pass a directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        require(overwrite, f"{out_dir} exists and is not empty; choose a new directory "
                           f"(or overwrite it: --overwrite / overwrite=True)")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_bytes is not None:
        (out_dir / TOKENIZER_FILE).write_bytes(tokenizer_bytes)
        tokenizer = str(out_dir / TOKENIZER_FILE)
    return out_dir, tokenizer


def save_run(bundle: ModelBundle, out_dir: str | Path, source: str = "",
             overwrite: bool = False) -> Path:
    """Write `bundle` as a run directory whose checkpoint holds the parameters (step 0).

    Its config.yaml describes the model in full (`model.preset: null`) and sets `init_from` to
    the directory itself, so `bitnet train --config OUT/config.yaml data.…=… ` continues training
    from these parameters in a new run directory.
    """
    out_dir, tokenizer = fresh_directory(out_dir, overwrite, bundle.tokenizer)
    # How to compute (scan, remat) is the training config's choice, not the model's shape.
    fields = {k: v for k, v in dataclasses.asdict(bundle.config).items()
              if k not in ("scan_layers", "remat")}
    run_config = RunConfig(name=None, out_dir="runs", precision=bundle.precision,
                           init_from=str(out_dir))
    run_config.model.preset = None
    run_config.model.overrides = fields
    run_config.data.tokenizer = tokenizer
    run_config.data.seq_len = min(run_config.data.seq_len, bundle.config.max_seq_len)
    tree = to_dict(run_config)
    (out_dir / CONFIG_FILE).write_text(yaml.safe_dump(tree, sort_keys=False))
    (out_dir / META_FILE).write_text(json.dumps({"source": source}, indent=2))
    # The trainer's own writer: a run saved here has the layout of a trained run's checkpoints.
    checkpointer = Checkpointer(out_dir / CHECKPOINT_DIR, keep=1, async_save=False)
    checkpointer.save(0, {"params": jax.tree.map(jnp.asarray, bundle.params)}, None,
                      {"tokenizer": tokenizer, "source": source})
    checkpointer.close()
    return out_dir
