"""One training run: corpus -> tokenizer -> packed batches -> sharded jit train step -> run dir.

`train(config)` (or `bitnet train --config FILE.yaml key=value ...`) writes one self-describing
directory `out_dir/name/` with `config.yaml`, `meta.json`, `metrics.jsonl`, `summary.json` and
`checkpoints/` (names in `bitnet_jax.run_files`), and resumes from its latest checkpoint when
started again.

The step functions are pure: `train_step(state, batch) -> (state, metrics)`, compiled once per
precision recipe with explicit in/out shardings and the state donated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

from bitnet_jax.model import accounting as compute
from bitnet_jax.data import pipeline
from bitnet_jax.data.tokenizers import load_tokenizer
from bitnet_jax.train import metrics
from bitnet_jax.train import optim
from bitnet_jax.train import sharding
from bitnet_jax.train.checkpoint import CheckpointSaveError, Checkpointer, restore_params
from bitnet_jax import run_files
from bitnet_jax.config import RunConfig, read_yaml, to_dict
from bitnet_jax.errors import ConfigError, require
from bitnet_jax.files import (read_json_object, require_writable_dir,
                              write_text_atomic)
from bitnet_jax.model import layer_stack
from bitnet_jax.model.resolve import ResolvedRun, resolve_run
from bitnet_jax.model.transformer import ModelConfig, Transformer
from bitnet_jax.train.steps import TrainState, eval_metrics, make_eval_step, make_train_step


class TrainingDiverged(RuntimeError):
    """The loss became NaN/Inf; the message names the step and the last good checkpoint."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM/SIGINT: a checkpoint was written, the run can be resumed."""


# ----------------------------------------------------------------------------------------------
# Set-up.

def run_name(config: RunConfig) -> str:
    """A readable, stable name: preset-precision-<hash of the config without name/out_dir>."""
    if config.name:
        return config.name
    body = {k: v for k, v in to_dict(config).items() if k not in ("name", "out_dir")}
    digest = hashlib.sha1(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{config.model.preset or 'custom'}-{config.precision}-{digest}"


@dataclasses.dataclass
class AbstractSetup:
    """A run's mesh, shardings, optimizer and abstract state: all that compiling needs, built
    from the config alone (no data, no device memory), so a step can be compiled ahead of time
    for devices that are not here (`train.aot`)."""

    run: ResolvedRun
    run_dir: Path
    mesh: jax.sharding.Mesh
    rules: tuple
    optimizer: optax.GradientTransformation
    state_sharding: Any
    abstract_state: Any
    batch_sharding: Any

    @property
    def config(self) -> RunConfig:
        return self.run.config

    @property
    def model_config(self) -> ModelConfig:
        return self.run.model


@dataclasses.dataclass
class Setup(AbstractSetup):
    """Everything a run needs, built before any training compute: the abstract set-up + data."""

    tokenizer: Any = None
    train_split: Any = None
    eval_batches: list = dataclasses.field(default_factory=list)
    data_stats: dict = dataclasses.field(default_factory=dict)


def abstract_setup(config: RunConfig | ResolvedRun, devices=None) -> AbstractSetup:
    """Check the config against the mesh and plan the shardings of the train state. Reads no
    data and allocates nothing; `devices` may be abstract (a libtpu topology's devices)."""
    run = resolve_run(config)
    config, model_config = run.config, run.model
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.logical_rules(config.mesh)
    sharding.check_batch(config.train.batch_size, config.train.grad_accum, mesh, rules)
    if config.train.integer_forward:
        for name, recipe in run.recipes.items():
            require(recipe.supports_integer_matmul,
                    f"train.integer_forward=true but precision {name!r} has a linear role that "
                    f"is not integer (weights and activations at most 8 bits)")

    optimizer = optim.make_optimizer(config.optimizer, config.train.steps, model_config)
    model = Transformer(model_config, run.recipe)
    tokens = jnp.zeros((1, config.data.seq_len), jnp.int32)
    abstract_params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens)["params"])
    params_sharding = sharding.param_shardings(abstract_params, mesh, rules)
    abstract_opt = jax.eval_shape(optimizer.init, nn.unbox(abstract_params))
    opt_sharding = sharding.optimizer_state_shardings(optimizer, abstract_opt, params_sharding,
                                                      mesh)
    state_sharding = TrainState(sharding.replicated(mesh), params_sharding, opt_sharding)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        TrainState(jax.ShapeDtypeStruct((), jnp.int32), nn.unbox(abstract_params), abstract_opt),
        state_sharding)
    run_dir = Path(config.out_dir) / run_name(config)
    return AbstractSetup(run, run_dir, mesh, rules, optimizer, state_sharding, abstract_state,
                         sharding.batch_sharding(mesh, rules))


def build(config: RunConfig | ResolvedRun, devices=None) -> Setup:
    """Check everything that can be checked, load data, plan shardings. No training compute."""
    plan = abstract_setup(config, devices)
    config, model_config = plan.config, plan.model_config
    if config.init_from:
        require((Path(config.init_from) / run_files.CHECKPOINT_DIR).is_dir(),
                f"init_from={config.init_from!r} has no {run_files.CHECKPOINT_DIR}/; pass a run "
                f"directory written by `bitnet train` or `bitnet import-hf`")
    tokenizer = load_tokenizer(config.data.tokenizer)
    require(tokenizer.vocab_size <= model_config.vocab_size,
            f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} tokens but the model's "
            f"vocab_size is {model_config.vocab_size}; set model.vocab_size >= "
            f"{tokenizer.vocab_size}")
    train_split, validation_split, data_stats = pipeline.prepare_data(config.data, tokenizer)
    eval_batches = pipeline.make_eval_batches(validation_split, config.data.seq_len,
                                              config.train.batch_size, config.train.eval_batches)
    fields = {f.name: getattr(plan, f.name) for f in dataclasses.fields(AbstractSetup)}
    return Setup(**fields, tokenizer=tokenizer, train_split=train_split,
                 eval_batches=eval_batches, data_stats=data_stats)


def init_state(setup: Setup) -> TrainState:
    """Parameters initialised directly in their shardings (never whole on one device)."""
    config, model_config = setup.config, setup.model_config
    # Initialised unrolled, then stacked: both layouts start from the same numbers.
    model = Transformer(model_config.replace(scan_layers=False, remat="none"), setup.run.recipe)
    tokens = jnp.zeros((1, config.data.seq_len), jnp.int32)

    def init(rng):
        params = layer_stack.to_layout(nn.unbox(model.init(rng, tokens)["params"]),
                                       model_config.scan_layers)
        return TrainState(jnp.zeros((), jnp.int32), params, setup.optimizer.init(params))

    init = jax.jit(init, out_shardings=setup.state_sharding)
    state = init(jax.random.PRNGKey(config.train.seed))
    if config.init_from:
        state = state.replace(params=_restore_init_from(setup))
    return state


def _restore_init_from(setup: AbstractSetup) -> Any:
    """The parameters of `init_from`, in this run's layer layout whichever layout they were
    saved in (the other layout is restored on one device, converted, then sharded)."""
    directory = Path(setup.config.init_from) / run_files.CHECKPOINT_DIR
    target, scanned = setup.abstract_state.params, setup.model_config.scan_layers
    try:
        return restore_params(directory, target)
    except Exception as error:  # noqa: BLE001 - orbax: a tree or shape mismatch
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        other = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                             jax.eval_shape(lambda t: layer_stack.to_layout(t, not scanned),
                                            target))
        try:
            params = restore_params(directory, other)
        except Exception:  # noqa: BLE001 - not a layout question: the first error says why
            raise error from None
        return jax.device_put(layer_stack.to_layout(params, scanned), setup.state_sharding.params)


def checkpoint_meta(setup: Setup) -> dict:
    return {"tokenizer": setup.tokenizer.name, "vocab_size": setup.tokenizer.vocab_size,
            "model_vocab_size": setup.model_config.vocab_size,
            "seq_len": setup.config.data.seq_len, "precision": setup.config.precision,
            "scan_layers": setup.model_config.scan_layers}


# What a checkpoint's state is made of: resuming with other values cannot read it back. (The
# layer layout, model.scan_layers, is checked against the checkpoint itself, with the way out.)
STATE_DEFINING = ("model.preset", "model.overrides", "precision", "train.stage1_precision",
                  "train.qat_start_fraction")


def _field(tree: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def check_same_run(run_dir: Path, config: RunConfig) -> None:
    """A run directory with checkpoints continues only under the config that made them: another
    model or precision is refused before anything in the directory is touched."""
    saved_path = run_dir / run_files.CONFIG_FILE
    if not saved_path.is_file():
        return
    saved, current = read_yaml(saved_path), to_dict(config)
    for dotted in STATE_DEFINING:
        if _field(saved, dotted) != _field(current, dotted):
            raise ConfigError(
                f"{run_dir} holds a run with {dotted}={_field(saved, dotted)!r} but this config "
                f"has {dotted}={_field(current, dotted)!r}; use the original config to resume, "
                f"or a new run name (name=...) to start another run")


def finished_summary(run_dir: Path, steps: int) -> Optional[dict]:
    """The summary of a run that already completed `steps` steps (None otherwise)."""
    path = run_dir / run_files.SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        summary = read_json_object(path, "run summary")
    except ConfigError:  # a damaged summary: the run resumes and writes a new one
        return None
    done = summary.get("status") == "completed" and isinstance(summary.get("step"), int)
    return summary if done and summary["step"] >= steps else None


def check_finished_run(run_dir: Path, current_meta: dict) -> None:
    """A finished run asked for again under another tokenizer is refused, as a resume is."""
    directory = run_dir / run_files.CHECKPOINT_DIR
    if not directory.is_dir():
        return
    checkpointer = Checkpointer(directory, keep=1)
    try:
        latest = checkpointer.latest_step()
        saved = checkpointer.restore_meta(latest) if latest is not None else None
    except Exception:  # noqa: BLE001 - a damaged final checkpoint does not undo a finished run
        saved = None
    finally:
        checkpointer.manager.close()
    if saved is not None:
        check_resumable(saved, current_meta, run_dir)


def check_resumable(saved: dict, current: dict, run_dir: Path) -> None:
    """A checkpoint made with another tokenizer, vocabulary or layer layout cannot continue
    this run."""
    saved_scan = bool(saved.get("scan_layers", False))  # older checkpoints: unrolled
    if saved_scan != current["scan_layers"]:
        raise ConfigError(
            f"{run_dir}: the checkpoint holds the {layer_stack.layout_name(saved_scan)} layout "
            f"but this config asks for the {layer_stack.layout_name(current['scan_layers'])} one; "
            f"resume with model.scan_layers={str(saved_scan).lower()}, or convert the parameters "
            f"with bitnet_jax.model.layer_stack.to_layout(params, "
            f"{current['scan_layers']}) and start a new run from them (init_from)")
    for key in ("tokenizer", "vocab_size", "model_vocab_size"):
        if saved.get(key) != current[key]:
            raise ConfigError(
                f"{run_dir}: the checkpoint was made with {key}={saved.get(key)!r} but this "
                f"config has {key}={current[key]!r}; use the original data.tokenizer / "
                f"model.vocab_size, or a new run name (name=...) to start afresh")


# ----------------------------------------------------------------------------------------------
# The loop.

class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop checkpoints at the next step boundary and exits."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught there
                pass
        return self

    def _handle(self, signum, _frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def compile_steps(setup: AbstractSetup, precision: str) -> tuple[Callable, Callable]:
    config = setup.config
    model = Transformer(setup.model_config, setup.run.recipes[precision],
                        integer=config.train.integer_forward,
                        int8_backward=config.train.int8_backward)

    def constrained(step: Callable) -> Callable:
        return sharding.with_activation_shardings(step, setup.mesh, setup.rules)

    train_step = jax.jit(constrained(make_train_step(model, setup.optimizer,
                                                     config.train.grad_accum)),
                         in_shardings=(setup.state_sharding, setup.batch_sharding),
                         out_shardings=(setup.state_sharding, sharding.replicated(setup.mesh)),
                         donate_argnums=0)
    eval_step = jax.jit(constrained(make_eval_step(model)),
                        in_shardings=(setup.state_sharding.params, setup.batch_sharding),
                        out_shardings=sharding.replicated(setup.mesh))
    return train_step, eval_step


def evaluate(eval_step, params, batches, batch_sharding) -> dict:
    totals = {"nll": 0.0, "tokens": 0.0, "bytes": 0.0}
    for batch in batches:
        sums = eval_step(params, sharding.global_batch_from_host(host_rows(batch), batch_sharding))
        for key in totals:
            totals[key] += float(sums[key])
    return eval_metrics(totals)


def host_rows(batch: dict) -> dict:
    """This host's rows of a global batch that every host holds whole (evaluation batches)."""
    n = jax.process_count()
    if n == 1:
        return batch
    index = jax.process_index()
    return {k: np.array_split(v, n)[index] for k, v in batch.items()}


def write_run_files(setup: Setup, meta: dict) -> None:
    if not metrics.is_main_process():
        return
    setup.run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(setup.run_dir / run_files.CONFIG_FILE,
                      yaml.safe_dump(to_dict(setup.config), sort_keys=False))
    write_text_atomic(setup.run_dir / run_files.META_FILE, json.dumps(meta, indent=2))


def write_summary(run_dir: Path, summary: dict) -> None:
    """summary.json, whole or not at all; a full disk here is reported, not raised over the
    error that ended the run."""
    if not metrics.is_main_process():
        return
    try:
        write_text_atomic(run_dir / run_files.SUMMARY_FILE,
                          json.dumps(summary, indent=2, default=str))
    except OSError as error:
        print(f"warning: could not write {run_dir / run_files.SUMMARY_FILE}: "
              f"{error.strerror or error}", file=sys.stderr, flush=True)


SCANNED_ON_CPU_WARNING = (
    "warning: model.scan_layers=true runs the train step 1.5-1.9x slower on CPUs than unrolled "
    "blocks (XLA:CPU rewrites the stacked layers' whole buffers in every layer; "
    "docs/cpu_training_step_history.md); it is meant for compile time and memory on TPUs and GPUs")


def scanned_on_cpu(setup: AbstractSetup) -> bool:
    """Whether the run scans its blocks on CPU devices (`SCANNED_ON_CPU_WARNING`)."""
    return setup.model_config.scan_layers and setup.mesh.devices.flat[0].platform == "cpu"


def train(config: RunConfig | ResolvedRun, devices=None) -> dict:
    """Run (or resume) one training run; returns the summary written to summary.json."""
    run = resolve_run(config)  # a bad config fails here, before any device or data work
    sharding.maybe_initialize_distributed()
    setup = build(run, devices)
    config = run.config
    tc = config.train
    # Before anything is written: the output is writable, a finished run is left as it is, and
    # a run directory of another model is refused.
    require_writable_dir(config.out_dir, "out_dir")
    check_same_run(setup.run_dir, config)
    current_meta = checkpoint_meta(setup)
    finished = finished_summary(setup.run_dir, tc.steps)
    if finished is not None:
        check_finished_run(setup.run_dir, current_meta)
        print(f"{setup.run_dir} already completed {finished['step']} steps; nothing to do "
              f"(raise train.steps to continue it, or use a new name=...)", flush=True)
        return finished
    if (setup.run_dir / run_files.CHECKPOINT_DIR).exists():
        require_writable_dir(setup.run_dir / run_files.CHECKPOINT_DIR, "checkpoint directory")
    meta = metrics.run_metadata()
    checkpointer = Checkpointer(setup.run_dir / run_files.CHECKPOINT_DIR, tc.keep_checkpoints)
    iterator = pipeline.make_train_iterator(
        setup.train_split, config.data.seq_len, tc.batch_size // jax.process_count(),
        config.data.seed, jax.process_index(), jax.process_count(), config.data.num_workers)

    start_step, state = checkpointer.restore_latest(
        setup.abstract_state, iterator,
        lambda saved: check_resumable(saved, current_meta, setup.run_dir),
        log=lambda line: print(line, file=sys.stderr, flush=True))
    if start_step is not None:
        print(f"resumed {setup.run_dir} at step {start_step}", flush=True)
    else:
        state = init_state(setup)
    start = int(state.step)
    write_run_files(setup, meta)  # only now: every check above has passed
    if scanned_on_cpu(setup):
        print(SCANNED_ON_CPU_WARNING, file=sys.stderr, flush=True)

    jsonl = metrics.JsonlWriter(setup.run_dir / run_files.METRICS_FILE,
                                resume_step=start if start_step is not None else None)
    wandb = metrics.WandbLogger(config.logging.wandb, config.logging.wandb_project,
                                config.logging.wandb_entity, setup.run_dir,
                                setup.run_dir.name, to_dict(config), meta)
    flops_per_token = compute.flops_per_token(setup.model_config, "causal", config.data.seq_len)
    peak = tc.peak_flops or metrics.measure_matmul_peak()
    tokens_per_step = tc.batch_size * config.data.seq_len
    compiled: dict[str, tuple] = {}
    status, last_eval, reason = "running", {}, None
    bar = metrics.progress_bar(tc.steps, start, tc.progress)
    wall_start, train_seconds, timed_steps = time.time(), 0.0, 0

    def precision_at(step: int) -> str:
        return optim.precision_for_step(config.precision, *tc.first_stage(), step, tc.steps)

    def steps_for(precision: str):
        if precision not in compiled:
            compiled[precision] = compile_steps(setup, precision)
        return compiled[precision]

    saved = {"step": start_step}

    def save(step: int):
        if saved["step"] != step:  # a signal or the end can fall on a checkpoint step
            checkpointer.save(step, state, iterator, checkpoint_meta(setup))
            saved["step"] = step

    def run_eval(step: int) -> dict:
        _, eval_step = steps_for(precision_at(max(step - 1, 0)))
        result = {"step": step, "kind": "eval",
                  **evaluate(eval_step, state.params, setup.eval_batches, setup.batch_sharding)}
        jsonl.write(result)
        wandb.log(result, step)
        return result

    try:
        with _StopFlag() as stop:
            step = start
            while step < tc.steps:
                compiling = precision_at(step) not in compiled  # its time includes compiling
                train_step, _ = steps_for(precision_at(step))
                batch = sharding.global_batch_from_host(next(iterator), setup.batch_sharding)
                tick = time.perf_counter()
                state, step_metrics = train_step(state, batch)
                loss = float(step_metrics["loss"])  # syncs: cheap next to a step, and needed
                if not compiling:  # throughput counts training steps only
                    train_seconds += time.perf_counter() - tick
                    timed_steps += 1
                step += 1
                if not math.isfinite(loss):
                    last = checkpointer.latest_step()
                    status, reason = "diverged", (
                        f"loss became {loss} at step {step}; last good checkpoint: "
                        f"{'step ' + str(last) if last is not None else 'none'} in "
                        f"{checkpointer.directory}")
                    raise TrainingDiverged(reason)
                if step % tc.log_every == 0 or step == tc.steps:
                    hyper = optim.current_hyperparams(config.optimizer, tc.steps, step - 1)
                    tokens_per_s = (tokens_per_step * timed_steps / train_seconds
                                    if train_seconds else 0.0)
                    record = {"step": step, "kind": "train", "loss": loss,
                              "grad_norm": float(step_metrics["grad_norm"]), **hyper,
                              "tokens": step * tokens_per_step, "tokens_per_s": tokens_per_s,
                              "mfu": compute.mfu(tokens_per_s, flops_per_token,
                                                 peak * jax.device_count())}
                    jsonl.write(record)
                    wandb.log(record, step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                if tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
                    last_eval = run_eval(step)
                if tc.checkpoint_every and step % tc.checkpoint_every == 0:
                    save(step)
                if stop.signal is not None:
                    save(step)
                    checkpointer.wait()
                    status = "interrupted"
                    raise TrainingInterrupted(
                        f"stopped by signal {stop.signal} at step {step}; checkpoint saved, "
                        f"run the same command to resume")
            # A run stopped after its final evaluation was written keeps that one.
            last_eval = jsonl.eval_at(step) or run_eval(step)
            save(step)
            status = "completed"
    except (TrainingDiverged, TrainingInterrupted):
        raise
    except CheckpointSaveError as error:  # stop at once; the message names the last good step
        status, reason = "failed", str(error)
        raise
    except BaseException as error:  # a crash: recorded for sweeps, then re-raised
        status, reason = "failed", f"{type(error).__name__}: {error}"
        raise
    finally:
        if bar is not None:
            bar.close()
        try:
            checkpointer.close()
        except Exception as error:  # noqa: BLE001 - never hide the error that ended the run
            print(f"warning: closing the checkpoints failed: {error}", file=sys.stderr)
        wandb.finish()
        summary = {
            "run": setup.run_dir.name, "status": status, "reason": reason,
            "step": int(state.step), "steps": tc.steps,
            "precision": config.precision, "preset": config.model.preset,
            "tokens": int(state.step) * tokens_per_step,
            "wall_seconds": time.time() - wall_start,
            "tokens_per_s": tokens_per_step * timed_steps / train_seconds if train_seconds else None,
            "peak_flops_per_device": peak, "data": setup.data_stats,
            "compute": compute.summarize(run.model, run.recipe, config.data.seq_len),
            **{k: v for k, v in last_eval.items() if k not in ("step", "kind")},
        }
        write_summary(setup.run_dir, summary)
    return summary
