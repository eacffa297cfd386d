"""Checkpoints with orbax: train state, data-iterator position and run metadata, per step.

Saves are asynchronous (training continues while orbax writes) and atomic (a step directory
appears only when complete), so a run killed mid-save resumes from the last complete step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import orbax.checkpoint as ocp

from bitnet_jax.data.pipeline import iterator_checkpoint_args


class Checkpointer:
    def __init__(self, directory: Path, keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.directory = Path(directory).resolve()
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, iterator, meta: dict) -> None:
        items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        if iterator is not None:
            items["data"] = iterator_checkpoint_args(iterator, save=True)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

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

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(directory: Path, abstract_params: Any, step: Optional[int] = None) -> Any:
    """Parameters only, from the `checkpoints/` of another run (to start a run from them)."""
    manager = ocp.CheckpointManager(Path(directory).resolve())
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {directory}")
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(partial_restore=True, item={"params": abstract_params})))
    manager.close()
    return restored["state"]["params"]
