"""Run configuration: nested dataclasses, YAML files, `key=value` overrides, validation.

A run config is plain data. `load_config(path, overrides)` reads YAML, applies overrides such as
`train.steps=200` or `model.d_model=128` (values parsed as YAML), and checks every key and type
before any compute: an unknown key gets a suggestion, a wrong type names the field and the value.

A leaf module: it imports nothing of the model, so reading a config costs no JAX import. The
names it holds (model preset and fields, precision recipes) are resolved into objects, and
checked against each other, once per run by `bitnet_jax.model.resolve.resolve_run`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from bitnet_jax.errors import ConfigError, require
from bitnet_jax.files import read_text


@dataclass
class ModelSection:
    """A preset from `bitnet_jax.model.transformer.PRESETS` plus field overrides (any ModelConfig field).

    `preset: null` builds the model from `overrides` alone (imported models write this).
    """

    preset: Optional[str] = "ladder-800k"
    overrides: dict = field(default_factory=dict)
    scan_layers: bool = False  # the blocks as one nn.scan (faster compiles of deep models)
    remat: str = "none"  # none | minimal | dots | full (jax.checkpoint policy of each block)


MODEL_SECTION_FIELDS = ("preset", "overrides", "scan_layers", "remat")


@dataclass
class DataConfig:
    source: str = "builtin"  # builtin | files | hf | tokens
    paths: list = field(default_factory=list)  # files or globs (files: .txt/.jsonl/.parquet; tokens: .npy/.bin)
    text_field: str = "text"  # JSONL / Parquet / HF column holding the text
    hf_path: Optional[str] = None  # `datasets.load_dataset` path or a local dataset directory
    hf_name: Optional[str] = None
    hf_split: str = "train"
    tokenizer: str = "bytes"  # "bytes" or the path of an HF tokenizer.json
    seq_len: int = 256
    validation_fraction: float = 0.05  # of documents (files for the built-in corpus)
    max_documents: Optional[int] = None  # cap on documents read (quick runs)
    seed: int = 0  # shuffling; independent of the model seed
    num_workers: int = 0  # grain worker processes (0 = in the main process)


@dataclass
class OptimizerConfig:
    lr: float = 1.5e-3
    schedule: str = "bitnet"  # bitnet | cosine | wsd | constant
    warmup_steps: int = 100
    decay: str = "linear"  # bitnet: shape of each stage's decay, linear | cosine
    min_lr_ratio: float = 0.1  # final LR / peak LR
    stage2_fraction: float = 0.5  # bitnet: where the LR drops and weight decay stops
    stage2_lr: Optional[float] = None  # bitnet: stage-2 peak LR (default 2/3 of lr)
    wsd_decay_fraction: float = 0.2  # wsd: final fraction of training spent decaying
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    stage2_weight_decay: float = 0.0  # bitnet: weight decay after stage2_fraction
    clip_norm: Optional[float] = 1.0


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # global sequences per optimizer step
    grad_accum: int = 1  # micro-batches per step (batch_size must divide evenly)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200  # 0 = only at the end
    eval_batches: int = 8
    checkpoint_every: int = 500  # 0 = only at the end
    keep_checkpoints: int = 3
    # int8 x int8 -> int32 forward products (quantized recipes): fake quantization's numbers
    # wherever its float32 sums are exact (every ternary recipe), and on AMX CPUs and NVIDIA
    # GPUs it takes this product itself there (matmul._int8_product_is_exact).
    integer_forward: bool = False
    int8_backward: bool = False  # with integer_forward: dx = G W^T as an int8 product (NOT exact)
    # On a 2-core AMX CPU it took 1-2% (ladder-1.6m) to 10-11% (ladder-20m) off the exact integer
    # path's step (docs/cpu_training_step_history.md); `scripts/bench_train.py --modes
    # ...,b1.58-int8-bwd` times it.
    peak_flops: Optional[float] = None  # per device, for MFU; None = measure a bf16 matmul
    stage1_precision: Optional[str] = None  # e.g. b1.58 before switching to `precision` (a4.8)
    stage1_fraction: float = 0.95  # fraction of steps trained with stage1_precision
    # When to quantize: train in bf16 for this fraction of the steps, then switch to `precision`
    # keeping the optimizer state (ParetoQ's ~90% / 10% split); 0 = quantized from the start.
    qat_start_fraction: float = 0.0
    progress: bool = True

    def first_stage(self) -> tuple[Optional[str], float]:
        """(the precision of the first stage, its fraction of the steps): `stage1_precision`
        (a4.8's b1.58 stage), or bf16 before `qat_start_fraction`; (None, ...) without one.
        The one rule the trainer and the recipe resolution read."""
        if self.qat_start_fraction > 0:
            return "bf16", self.qat_start_fraction  # the unquantized recipe's name
        return self.stage1_precision, self.stage1_fraction


@dataclass
class MeshConfig:
    """Mesh axis sizes (-1 fills the rest) and logical-axis -> mesh-axis rules."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: list = field(default_factory=lambda: [
        # parameters: FSDP over the model width, tensor parallelism over heads / MLP / vocab
        ["embed", "fsdp"],
        ["heads", "tensor"],
        ["kv_heads", "tensor"],
        ["mlp", "tensor"],
        ["vocab", "tensor"],
        ["norm", None],
        # activations and input batches: data parallel over data and fsdp
        ["batch", ["data", "fsdp"]],
        ["length", None],
        ["activation_batch", ["data", "fsdp"]],
        ["activation_length", None],
        ["activation_embed", None],
        ["activation_vocab", "tensor"],
    ])


@dataclass
class LoggingConfig:
    wandb: str = "offline"  # offline | online | disabled
    wandb_project: str = "bitnet-jax"
    wandb_entity: Optional[str] = None


@dataclass
class RunConfig:
    name: Optional[str] = None  # run directory name (default: derived from the config)
    out_dir: str = "runs"
    model: ModelSection = field(default_factory=ModelSection)
    precision: str = "b1.58"
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    init_from: Optional[str] = None  # parameters to start from (a run dir or an imported model)


# ----------------------------------------------------------------------------------------------
# From plain dicts, with type checks.

def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp, path: str):
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: expected {' or '.join(_type_name(o) for o in options)}, "
                          f"got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, path + ".")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if tp in (list, dict):
        if not isinstance(value, tp):
            raise ConfigError(f"{path}: expected a {tp.__name__}, got {value!r}")
        return value
    return value


def unknown_key_error(key: str, valid: list[str], path: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key {path + key!r}{hint}")


def from_dict(cls, data: dict, path: str = ""):
    """Build dataclass `cls` from a dict, recursively, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise unknown_key_error(str(key), names, path)
        kwargs[key] = _coerce(value, hints[key], f"{path}{key}")
    return cls(**kwargs)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


# ----------------------------------------------------------------------------------------------
# Overrides and files.

class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `3e-3` (no dot) as a string; researchers write LRs that way, so floats
    in exponent form without a dot are floats here too."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict. `model.<field>` that is not a ModelSection field goes to
    model.overrides."""
    keys = dotted.split(".")
    if keys[0] == "model" and len(keys) == 2 and keys[1] not in MODEL_SECTION_FIELDS:
        keys = ["model", "overrides", keys[1]]
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`train.steps=200` -> ("train.steps", 200); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. train.steps=200")
    key, raw = text.split("=", 1)
    try:
        value = _yaml_load(raw) if raw else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: cannot parse the value ({error})") from None
    return key.strip(), value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    for text in overrides:
        key, value = parse_override(text)
        _set_path(tree, key, value)
    return tree


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    require(path.is_file(), f"config file {str(path)!r} does not exist")
    text = read_text(path, "config file")  # unreadable, binary or non-UTF-8: one line
    try:
        tree = _yaml_load(text) or {}
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f":{where.line + 1}" if where is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}{line}: not valid YAML ({problem}); fix the file") from None
    require(isinstance(tree, dict), f"{path}: the top level must be a mapping of sections")
    return tree


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                base: Optional[dict] = None) -> RunConfig:
    """Read a YAML file (or start from `base` / defaults), apply `key=value` overrides, validate."""
    tree = read_yaml(path) if path is not None else dict(base or {})
    tree = apply_overrides(tree, list(overrides or []))
    config = from_dict(RunConfig, tree)
    validate(config)
    return config


# ----------------------------------------------------------------------------------------------
# Semantic checks that need neither the model nor devices (model fields, recipe names and the
# recipe against the model: `model.resolve.resolve_run`; mesh divisibility: where devices are).

CHOICES = {
    "data.source": ("builtin", "files", "hf", "tokens"),
    "optimizer.schedule": ("bitnet", "cosine", "wsd", "constant"),
    "optimizer.decay": ("linear", "cosine"),
    "logging.wandb": ("offline", "online", "disabled"),
}


def validate(config: RunConfig) -> None:
    for dotted, choices in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(config, section), key)
        require(value in choices, f"{dotted}={value!r}; choose one of {', '.join(choices)}")
    for dotted in ("train.steps", "train.batch_size", "train.grad_accum", "data.seq_len",
                   "train.eval_batches", "train.keep_checkpoints", "train.log_every"):
        section, key = dotted.split(".")
        value = getattr(getattr(config, section), key)
        require(value > 0, f"{dotted} must be positive, got {value}")
    for dotted in ("train.eval_every", "train.checkpoint_every"):
        section, key = dotted.split(".")
        value = getattr(getattr(config, section), key)
        require(value >= 0, f"{dotted} must be 0 (only at the end) or positive, got {value}")
    require(config.train.integer_forward or not config.train.int8_backward,
            "train.int8_backward=true needs train.integer_forward=true (it changes the integer "
            "path's backward)")
    require(config.train.batch_size % config.train.grad_accum == 0,
            f"train.batch_size={config.train.batch_size} is not divisible by "
            f"train.grad_accum={config.train.grad_accum}")
    require(0.0 <= config.data.validation_fraction < 1.0,
            f"data.validation_fraction must be in [0, 1), got {config.data.validation_fraction}")
    require(0.0 < config.optimizer.stage2_fraction < 1.0,
            f"optimizer.stage2_fraction must be in (0, 1), got {config.optimizer.stage2_fraction}")
    require(0.0 < config.train.stage1_fraction < 1.0,
            f"train.stage1_fraction must be in (0, 1), got {config.train.stage1_fraction}")
    require(0.0 <= config.train.qat_start_fraction < 1.0,
            f"train.qat_start_fraction must be in [0, 1), got {config.train.qat_start_fraction}")
    require(not (config.train.qat_start_fraction > 0 and config.train.stage1_precision),
            "train.qat_start_fraction and train.stage1_precision both set a first stage; "
            "set one of them")
    require(config.optimizer.lr > 0, f"optimizer.lr must be positive, got {config.optimizer.lr}")
    require(config.optimizer.warmup_steps < config.train.steps,
            f"optimizer.warmup_steps={config.optimizer.warmup_steps} must be below "
            f"train.steps={config.train.steps}")
    if config.data.source in ("files", "tokens"):
        require(bool(config.data.paths),
                f"data.source={config.data.source!r} needs data.paths (files or globs)")
    if config.data.source == "hf":
        require(config.data.hf_path is not None, "data.source='hf' needs data.hf_path")
    for axis in ("data", "fsdp", "tensor"):
        size = getattr(config.mesh, axis)
        require(size == -1 or size > 0, f"mesh.{axis} must be positive or -1, got {size}")
    require([config.mesh.data, config.mesh.fsdp, config.mesh.tensor].count(-1) <= 1,
            "at most one mesh axis may be -1 (it takes the devices the others leave)")
