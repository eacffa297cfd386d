"""Checkpoints with orbax: train state, data-iterator position and run metadata, per step.

Saves are atomic (a step directory appears only when complete), so a run killed mid-save resumes
from the last complete step. They are synchronous: with orbax 0.12, an asynchronous save that
fails (a read-only or full disk) leaves non-daemon threads waiting on a barrier forever, so the
process never exits; a synchronous save raises at once, and the loop stops with the step and the
last good checkpoint named (`CheckpointSaveError`).

Restoring tries the newest step first and falls back to the newest one that reads completely
(state, data position and meta), saying which steps it skipped and why; the skipped ones are moved
to `checkpoints.skipped/` beside the run's checkpoints (kept for inspection, out of orbax's way).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp

from bitnet_jax.data.pipeline import iterator_checkpoint_args
from bitnet_jax.errors import ConfigError
from bitnet_jax.files import short_error

SKIPPED_SUFFIX = ".skipped"  # checkpoints/ -> checkpoints.skipped/<step> for unreadable steps


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the message names the step and the last good one."""


class Checkpointer:
    def __init__(self, directory: Path, keep: int, async_save: bool = False):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.directory = Path(directory).resolve()
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, iterator, meta: dict) -> None:
        """Write step `step`; a failure raises `CheckpointSaveError` naming the last good step."""
        items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        if iterator is not None:
            items["data"] = iterator_checkpoint_args(iterator, save=True)
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
            self.manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001 - OSError, tensorstore's ValueError, ...
            # orbax's abandoned write tasks log this same error again, with tracebacks, when
            # they are collected at exit; the one line raised below says it.
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)
            last = [s for s in self.manager.all_steps() if s != step]
            good = f"step {max(last)}" if last else "none"
            raise CheckpointSaveError(
                f"saving the checkpoint of step {step} in {self.directory} failed "
                f"({short_error(error)}); last good checkpoint: {good}; free space or make the "
                f"directory writable, then run the same command to resume") from None

    def restore_meta(self, step: int) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

    def restore(self, step: int, abstract_state: Any, iterator) -> Any:
        """The state at `step`, placed with the shardings of `abstract_state`; the iterator is
        moved to its saved position in place."""
        items = dict(state=ocp.args.StandardRestore(abstract_state))
        if iterator is not None:
            items["data"] = iterator_checkpoint_args(iterator, save=False)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def step_dirs(self) -> list[int]:
        """Every step folder, newest first, including ones orbax would not list (empty or
        without their metadata): a damaged newest step must be seen to be skipped."""
        listed = set(self.manager.all_steps())
        if self.directory.is_dir():
            listed |= {int(p.name) for p in self.directory.iterdir()
                       if p.is_dir() and p.name.isdigit()}
        return sorted(listed, reverse=True)

    def restore_latest(self, abstract_state: Any, iterator, check_meta: Callable[[dict], None],
                       log: Callable[[str], None] = print) -> tuple[Optional[int], Any]:
        """(step, state) of the newest step that reads completely, or (None, None) when there
        are no checkpoints. `check_meta` raises `ConfigError` for a checkpoint of another run
        (that is not damage: it stops the run). Newer unreadable steps are moved aside, so the
        run overwrites nothing it skipped; when no step reads, nothing is moved."""
        steps = self.step_dirs()
        skipped: list[tuple[int, str]] = []
        for step in steps:
            try:
                meta = self.restore_meta(step)
            except Exception as error:  # noqa: BLE001 - any damage: try the next step
                skipped.append((step, short_error(error)))
                continue
            check_meta(meta)  # ConfigError propagates: another tokenizer is not damage
            try:
                state = self.restore(step, abstract_state, iterator)
            except ConfigError:
                raise
            except Exception as error:  # noqa: BLE001
                skipped.append((step, short_error(error)))
                continue
            for bad, reason in skipped:
                if jax.process_index() == 0:  # one mover on a shared file system
                    log(f"skipped checkpoint step {bad} (it does not read: {reason}); moved it "
                        f"to {self._move_aside(bad)}")
            if skipped:
                self.manager.reload()
            return step, state
        if steps:
            reasons = "; ".join(f"step {s}: {r}" for s, r in skipped)
            raise ConfigError(
                f"no checkpoint in {self.directory} reads completely ({reasons}); if the run "
                f"was changed (model, precision, optimizer), use the original config or a new "
                f"name=...; to start afresh, move {self.directory} away")
        return None, None

    def _move_aside(self, step: int) -> Path:
        target_dir = self.directory.with_name(self.directory.name + SKIPPED_SUFFIX)
        target_dir.mkdir(parents=True, exist_ok=True)
        target, index = target_dir / str(step), 1
        while target.exists():
            target, index = target_dir / f"{step}.{index}", index + 1
        shutil.move(str(self.directory / str(step)), str(target))
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(directory: Path, abstract_params: Any, step: Optional[int] = None) -> Any:
    """Parameters only, from the `checkpoints/` of another run (to start a run from them)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"no checkpoints at {directory}; check the path (a run directory "
                          f"written by `bitnet train` or `bitnet import-hf`)")
    manager = ocp.CheckpointManager(directory.resolve())
    try:
        steps = manager.all_steps()
        if step is None:
            step = manager.latest_step()
        if step is None:
            raise ConfigError(f"no checkpoint under {directory}; train the run first")
        if step not in steps:
            raise ConfigError(f"{directory} has no checkpoint step {step}; its steps are "
                              f"{sorted(steps)} (or omit --step for the latest)")
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(partial_restore=True,
                                             item={"params": abstract_params})))
        except Exception as error:  # noqa: BLE001 - damaged files, another model's shapes
            raise ConfigError(f"checkpoint step {step} in {directory} cannot be read "
                              f"({short_error(error)}); pass another --step, or check that "
                              f"it belongs to this model") from None
    finally:
        manager.close()
    return restored["state"]["params"]
