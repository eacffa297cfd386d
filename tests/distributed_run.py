"""Start one training run as N JAX processes on localhost (CPU collectives), for tests.

Each process is `python -c DRIVER` with its share of simulated CPU devices; the driver calls
`jax.distributed.initialize` with the coordinator, process count and id passed explicitly, then
`bitnet_jax.train.loop.train`, so the global mesh spans every process's devices.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

# The last process dies without a word right after its part of checkpoint `kill_after_save`: a
# kill at a known step, however fast the machine trains.
_KILL_AFTER_SAVE = """
def die_after_save(kill_after_save):
    save = checkpoint.Checkpointer.save
    def save_then_die(self, step, *args):
        save(self, step, *args)
        if step == kill_after_save:
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.Checkpointer.save = save_then_die
"""

DRIVER = """
import os, signal, sys, jax
from bitnet_jax.config import load_config
from bitnet_jax.train import checkpoint
from bitnet_jax.train.loop import train
""" + _KILL_AFTER_SAVE + """
address, count, index, config_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if len(sys.argv) > 5 and index == count - 1:
    die_after_save(int(sys.argv[5]))
jax.distributed.initialize(address, num_processes=count, process_id=index)
train(load_config(config_path))
"""

# One task of a SLURM job step (`srun`): the trainer itself finds the processes from SLURM's
# variables (bitnet_jax.train.sharding); only the optional kill is added here.
SLURM_DRIVER = """
import os, signal, sys
from bitnet_jax.config import load_config
from bitnet_jax.train import checkpoint
from bitnet_jax.train.loop import train
""" + _KILL_AFTER_SAVE + """
config_path = sys.argv[1]
if len(sys.argv) > 2 and int(os.environ["SLURM_PROCID"]) == int(os.environ["SLURM_NTASKS"]) - 1:
    die_after_save(int(sys.argv[2]))
train(load_config(config_path))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def process_env(devices_per_process: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    for key in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "BITNET_DISTRIBUTED"):
        env.pop(key, None)  # the driver passes everything explicitly
    return env


def start(config_path: Path, processes: int, devices_per_process: int, log_dir: Path,
          kill_after_save: Optional[int] = None) -> list[subprocess.Popen]:
    """Start the processes of one job; their output goes to log_dir/process<i>.log. With
    `kill_after_save`, the last process SIGKILLs itself once the checkpoint of that step is
    saved."""
    address = f"localhost:{free_port()}"
    env = process_env(devices_per_process)
    log_dir.mkdir(parents=True, exist_ok=True)
    popens = []
    for index in range(processes):
        log = open(log_dir / f"process{index}.log", "a")
        popens.append(subprocess.Popen(
            [sys.executable, "-c", DRIVER, address, str(processes), str(index), str(config_path),
             *([] if kill_after_save is None else [str(kill_after_save)])],
            env=env, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    return popens


def single(config_path: Path, devices: int, log_dir: Path) -> subprocess.CompletedProcess:
    """The same run as one process holding every device (the reference)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "single.log", "w") as log:
        return subprocess.run([sys.executable, "-m", "bitnet_jax.cli", "train", "--config",
                               str(config_path)], env=process_env(devices), stdout=log,
                              stderr=subprocess.STDOUT, timeout=300)


def logs(log_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(log_dir.glob("*.log")))
