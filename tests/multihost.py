"""Start N cooperating processes on this machine, as a multi-host job would on N hosts.

Each process gets the environment README documents for multi-host runs (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID) and its own CPU devices; `run_processes` waits for all of them
and kills the rest as soon as one fails, so a broken collective never hangs a test. Reusable by
any test that needs several JAX processes (checkpoints, kills, ...). Not named `multiprocess`:
that is a package `datasets` imports.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(index: int, count: int, port: int, devices_per_process: int = 1,
                extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The environment of process `index` of `count`: coordinator, counts, CPU devices."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_", "SLURM_", "TPU_", "BITNET_DISTRIBUTED"))}
    env.update({
        "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
        "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
        "JAX_NUM_PROCESSES": str(count),
        "JAX_PROCESS_ID": str(index),
        **(extra or {}),
    })
    return env


@dataclasses.dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


def start_processes(argv: Sequence[str], count: int, log_dir: Path, devices_per_process: int = 1,
                    extra_env: Optional[Mapping[str, str]] = None) -> list[subprocess.Popen]:
    """Start `count` copies of `argv`, process i logging to log_dir/process_i.{out,err}."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    processes = []
    for index in range(count):
        env = process_env(index, count, port, devices_per_process, extra_env)
        processes.append(subprocess.Popen(
            list(argv), env=env, cwd=ROOT, stdin=subprocess.DEVNULL,
            stdout=open(log_dir / f"process_{index}.out", "w"),
            stderr=open(log_dir / f"process_{index}.err", "w")))
    return processes


def wait_all(processes: list[subprocess.Popen], log_dir: Path, timeout_s: float
             ) -> list[Finished]:
    """Wait for every process; when one fails or time runs out, kill the others."""
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p in processes):
            failed = any(p.poll() not in (None, 0) for p in processes)
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
            p.wait()
    return [Finished(p.returncode, (log_dir / f"process_{i}.out").read_text(),
                     (log_dir / f"process_{i}.err").read_text())
            for i, p in enumerate(processes)]


def run_processes(argv: Sequence[str], count: int, log_dir: Path, timeout_s: float = 300,
                  devices_per_process: int = 1,
                  extra_env: Optional[Mapping[str, str]] = None) -> list[Finished]:
    return wait_all(start_processes(argv, count, log_dir, devices_per_process, extra_env),
                    log_dir, timeout_s)
