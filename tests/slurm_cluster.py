"""A real single-node SLURM for tests: slurmctld + slurmd started by hand, stopped afterwards.

Not a mock: the launcher's `sbatch`, `squeue` and `scontrol` talk to real daemons. Needs Debian's
SLURM 22.05 packages (CI: `apt-get install -y slurmctld slurmd slurm-client`) and root (slurmd
runs jobs as their user, which needs root). Nothing is installed here; where SLURM cannot run,
`skip_reason()` says why and the tests skip.

Set-up without systemd, munge or accounting: `auth/none` + `cred/none`, `proctrack/linuxproc`,
`task/none`, `select/cons_tres` with `CR_CPU`, state and spool directories in a temporary folder,
free TCP ports, the node at 127.0.0.1 (no DNS needed), and no batch scheduling delay, so a job
starts within a second of its submission. Commands find the cluster through `SLURM_CONF`
(`cluster.env`, or `cluster.activate()` for the calling process). Ready in about a second.

    with SlurmCluster() as cluster, cluster.activate():
        subprocess.run(["sbatch", "--wrap", "hostname"], check=True)
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

DAEMONS = ("slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "sinfo", "scancel")
PACKAGES = "slurmctld slurmd slurm-client"


def _which(name: str) -> Optional[str]:
    """Daemons live in /usr/sbin, which a non-login PATH may lack."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")


def skip_reason() -> Optional[str]:
    """Why a real SLURM cannot run here, or None when it can."""
    if not hasattr(os, "geteuid"):
        return "SLURM needs Linux"
    missing = [name for name in DAEMONS + CLIENTS if _which(name) is None]
    if missing:
        return (f"SLURM not installed ({', '.join(missing)} not found); "
                f"install it with: apt-get install -y {PACKAGES}")
    if os.geteuid() != 0:
        return "a test SLURM needs root (slurmd starts jobs as their user)"
    return None


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class SlurmCluster:
    """One slurmctld and one slurmd on this machine, configured under `root` (a temporary dir)."""

    def __init__(self, root: Optional[Path] = None, cpus: Optional[int] = None):
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="slurm-test-") if root is None else root)
        self.node = socket.gethostname().split(".")[0]  # what slurmd looks itself up as
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._processes: dict[str, subprocess.Popen] = {}

    # -- configuration -------------------------------------------------------------------------

    def write_config(self) -> Path:
        ctld_port, slurmd_port = _free_ports(2)
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        r = self.root
        self.conf.write_text(f"""\
# A throw-away single-node cluster for tests (tests/slurm_cluster.py).
ClusterName=bitnettest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=batch_sched_delay=0,sched_interval=1
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
KillWait=5
# Ended jobs stay known for 16 s, twice `sbatch --wait`'s polls, which then come every 8 s: its
# interval grows 4x while below MinJobAge / 2 and 32 s (sbatch.c, _job_wait), so with SLURM's
# default (300 s) it reached 32 s and a two-job test waited 94 s instead of 46.
MinJobAge=16
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        return self.conf

    # -- life cycle ----------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> "SlurmCluster":
        reason = skip_reason()
        if reason:
            raise RuntimeError(reason)
        self.write_config()
        try:
            for daemon in DAEMONS:
                log = open(self.root / "log" / f"{daemon}.out", "wb")
                # -D: stay in the foreground (a child we can wait for); own session: a Ctrl-C
                # in the terminal reaches pytest, whose clean-up then stops the daemons.
                self._processes[daemon] = subprocess.Popen(
                    [_which(daemon), "-D", "-f", str(self.conf)], env=self.env,
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True)
                log.close()
            atexit.register(self.stop)  # should pytest die before its fixture clean-up
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for daemon, process in self._processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{daemon} exited with {process.returncode}:\n"
                                       + self.logs())
            result = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env,
                                    capture_output=True, text=True)
            state = result.stdout.strip()
            if result.returncode == 0 and state == "idle":
                return
            time.sleep(0.1)
        raise RuntimeError(f"SLURM node not idle after {timeout:.0f}s (state {state!r}):\n"
                           + self.logs())

    def stop(self, timeout: float = 15.0) -> None:
        """Cancel what still runs, `scontrol shutdown`, then kill our own daemons if needed."""
        atexit.unregister(self.stop)
        if any(p.poll() is None for p in self._processes.values()):
            subprocess.run(["scancel", "--full", "--user", str(os.geteuid())], env=self.env,
                           capture_output=True, timeout=timeout)
            subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True,
                           timeout=timeout)
        deadline = time.monotonic() + timeout
        for process in self._processes.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # the session we started it in
                process.wait()
        self._processes.clear()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def logs(self) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace").splitlines()[-20:]
            parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts)

    @contextlib.contextmanager
    def activate(self) -> Iterator["SlurmCluster"]:
        """Point this process's `SLURM_CONF` at the cluster (restored afterwards)."""
        previous = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(self.conf)
        try:
            yield self
        finally:
            if previous is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = previous

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def slurm_cluster(root: Optional[Path] = None) -> Iterator[SlurmCluster]:
    """A started cluster with `SLURM_CONF` set in this process; skips the test where none can run.

    For a pytest fixture: `with slurm_cluster(tmp_path) as cluster: yield cluster`.
    """
    import pytest

    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    with SlurmCluster(root) as cluster, cluster.activate():
        yield cluster
