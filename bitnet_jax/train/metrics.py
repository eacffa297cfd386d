"""Run outputs: JSONL metrics, wandb, a progress bar, run metadata.

Only process 0 writes; every call is a no-op on other hosts.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp

from bitnet_jax.allocator import active_allocator
from bitnet_jax import files
from bitnet_jax.files import write_text_atomic

PACKAGES = ("bitnet-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain",
            "numpy", "tokenizers", "wandb")


def measure_matmul_peak(size: int = 1024, repeats: int = 5) -> float:
    """Best achieved FLOP/s of one device on a size^3 bf16 matmul with float32 accumulation:
    the MFU denominator when no peak is configured."""
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(key_a, (size, size), jnp.bfloat16)
    b = jax.random.normal(key_b, (size, size), jnp.bfloat16)
    matmul = jax.jit(lambda x, y: jax.lax.dot(x, y, preferred_element_type=jnp.float32))
    jax.block_until_ready(matmul(a, b))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def is_main_process() -> bool:
    return jax.process_index() == 0


def git_sha(path: Path | str = ".") -> Optional[str]:
    """The commit of the code that runs (None outside a git checkout)."""
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, Optional[str]]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_metadata() -> dict[str, Any]:
    """What a run needs to be reproduced and compared: code, packages, machine."""
    devices = jax.devices()
    return {
        "git_sha": git_sha(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "malloc": active_allocator(),  # step times depend on it (allocator.py)
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


class JsonlWriter:
    """Appends one JSON object per line. On resume, lines past the restored step are dropped,
    so the file reads as if the run had never stopped; a last line torn by a kill is dropped
    too (every line before it is whole)."""

    def __init__(self, path: Path, resume_step: Optional[int] = None):
        self.path = Path(path)
        self.kept: list[dict] = []
        if not is_main_process():
            return
        if resume_step is not None and self.path.exists():
            self.kept = [r for r in read_jsonl(self.path, torn_tail_ok=True)
                         if r.get("step", 0) <= resume_step]
            write_text_atomic(self.path, "".join(json.dumps(r, default=float) + "\n"
                                                 for r in self.kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()

    def eval_at(self, step: int) -> Optional[dict]:
        """The evaluation kept from before a resume at `step`, if there is one."""
        return next((r for r in self.kept if r.get("kind") == "eval" and r.get("step") == step),
                    None)

    def write(self, record: dict) -> None:
        if is_main_process():
            with self.path.open("a") as f:
                f.write(json.dumps(record, default=float) + "\n")


def read_jsonl(path: Path | str, torn_tail_ok: bool = True) -> list[dict]:
    """The records of a metrics file (an append-only log: a last line torn by a kill is
    dropped); any other damaged line is one error naming the file and the line."""
    return files.read_jsonl(path, "metrics file", torn_tail_ok=torn_tail_ok)


class WandbLogger:
    """wandb with config and git SHA; offline unless configured (no network needed)."""

    def __init__(self, mode: str, project: str, entity: Optional[str], run_dir: Path,
                 run_name: str, config: dict, meta: dict):
        self.run = None
        if mode == "disabled" or not is_main_process():
            return
        import wandb  # only when used: importing it costs a second

        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(mode=mode, project=project, entity=entity, dir=str(run_dir),
                              name=run_name, id=run_name.replace("/", "-"), resume="allow",
                              config={**config, "meta": meta})

    def log(self, record: dict, step: int) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def progress_bar(total: int, initial: int, enabled: bool):
    """tqdm on stderr; plain `None` when disabled or not the main process."""
    if not enabled or not is_main_process():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                file=sys.stderr)
