"""Launchers: run a sweep's jobs as local processes, as a SLURM job array, or print their commands.

A job is a command line and the directory it writes to; a launcher only starts commands and
reports how they ended (queues, retries and priorities belong to SLURM, or to whatever runs the
printed commands; here only "at most `workers` processes at once").

- `launch_local`: one subprocess per job, `workers` at a time, each pinned to its own share of
  the CPU cores (and GPUs), so a crash in one run never stops the others.
- `launch_slurm`: `<sweep>/slurm/array.sh` (an `sbatch --array` script; an array task with several
  SLURM tasks starts its run through `srun`) and `commands.txt`, submitted with `sbatch`.
- `launch_print`: one shell command per job, for TPU pods and other schedulers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Mapping, Optional, Sequence

from bitnet_jax.errors import ConfigError, require
from bitnet_jax.run_files import LAUNCH_LOG

# Thread-count variables of the numeric libraries a run may load (OpenMP, OpenBLAS, MKL, numexpr).
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
              "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
# XLA:CPU sizes its thread pool from the process's CPU affinity, so pinning bounds it; this flag
# also stops Eigen from splitting one op over threads (for one thread per worker). Flags XLA does
# not know abort the process, so nothing else goes into XLA_FLAGS.
XLA_SINGLE_THREAD_FLAG = "--xla_cpu_multi_thread_eigen=false"
TERM_GRACE_S = 120.0  # after SIGTERM, how long a run may take to checkpoint before SIGKILL
POLL_S = 0.05
SLURM_DIR = "slurm"
_RESERVED_SBATCH = ("array", "output", "parsable", "wait")


@dataclasses.dataclass(frozen=True)
class Job:
    """One training run to launch: a stable id, the command that trains it, where it writes."""

    name: str
    argv: list[str]
    run_dir: Path


@dataclasses.dataclass(frozen=True)
class JobResult:
    """How a local job ended: its exit status (negative: killed by that signal) and its log."""

    name: str
    returncode: int
    seconds: float
    log_path: Path

    @property
    def ok(self) -> bool:
        return self.returncode == 0


@dataclasses.dataclass(frozen=True)
class SlurmSubmission:
    """A submitted SLURM job array: task `i` runs `names[i]`."""

    job_id: int
    script_path: Path
    n_tasks: int
    commands_path: Path
    names: tuple[str, ...] = ()
    returncode: Optional[int] = None  # with wait=True: sbatch's exit, the highest task exit code

    def output_path(self, task: int) -> Path:
        """The file that holds the stdout and stderr of task `task`."""
        return self.script_path.parent / f"{self.job_id}_{task}.out"


# ----------------------------------------------------------------------------------------------
# Commands.

def _quote(arg: str) -> str:
    """Shell-quote one argument on one line (bash `$'...'` for newlines and control characters)."""
    if arg.isprintable():
        return shlex.quote(arg)
    escapes = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
    out = []
    for ch in arg:
        if ch in escapes:
            out.append(escapes[ch])
        elif ch.isprintable():
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode("utf-8", "surrogateescape"))
    return "$'" + "".join(out) + "'"


def shell_command(job: Job, cwd: Optional[str | Path] = None) -> str:
    """`cd <cwd> && <argv>`, shell-quoted on one line; `cwd` defaults to the current directory."""
    require(bool(job.argv), f"job {job.name!r} has an empty argv; give the command that trains it")
    directory = Path(cwd) if cwd is not None else Path.cwd()
    return f"cd {_quote(str(directory))} && " + " ".join(_quote(str(a)) for a in job.argv)


def launch_print(jobs: Sequence[Job]) -> str:
    """One shell command per job and line (each with its `cd`), for other schedulers."""
    _check_jobs(jobs)
    return "".join(shell_command(job) + "\n" for job in jobs)


def _check_jobs(jobs: Sequence[Job]) -> None:
    seen = set()
    for job in jobs:
        require(bool(job.name) and "/" not in job.name and job.name not in (".", ".."),
                f"job name {job.name!r}: use a non-empty name without '/' (it names the log)")
        require(job.name not in seen, f"job name {job.name!r} appears twice; names must be unique")
        require(bool(job.argv), f"job {job.name!r} has an empty argv")
        seen.add(job.name)


# ----------------------------------------------------------------------------------------------
# Local processes.

def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def format_duration(seconds: float) -> str:
    """41s, 2.5min, 3.1h."""
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.1f}min"
    return f"{seconds / 3600:.1f}h"


def _cpu_ranges(cpus: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (the taskset / cpuset notation)."""
    parts, start = [], None
    ordered = sorted(cpus)
    for i, cpu in enumerate(ordered):
        if start is None:
            start = cpu
        if i + 1 == len(ordered) or ordered[i + 1] != cpu + 1:
            parts.append(str(start) if start == cpu else f"{start}-{cpu}")
            start = None
    return ",".join(parts)


def worker_cpus(workers: int, threads_per_worker: Optional[int] = None,
                cpus: Optional[Sequence[int]] = None) -> list[list[int]]:
    """The cores of each worker: consecutive slices of the usable cores (wrapping if too few).

    `threads_per_worker` defaults to an equal share (at least one core each)."""
    require(workers >= 1, f"workers={workers}; use 1 or more")
    usable = sorted(cpus if cpus is not None else _usable_cpus())
    share = threads_per_worker if threads_per_worker is not None else max(1, len(usable) // workers)
    require(share >= 1, f"threads_per_worker={threads_per_worker}; use 1 or more")
    return [sorted({usable[(w * share + i) % len(usable)] for i in range(share)})
            for w in range(workers)]


def _usable_cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def worker_devices(workers: int, devices_per_worker: int,
                   devices: Optional[Sequence[str]] = None) -> list[list[str]]:
    """The GPUs (CUDA_VISIBLE_DEVICES entries) of each worker: disjoint consecutive slices."""
    require(devices_per_worker >= 1, f"devices_per_worker={devices_per_worker}; use 1 or more")
    if devices is None:
        devices = _visible_gpus()
    devices = [str(d) for d in devices]
    require(workers * devices_per_worker <= len(devices),
            f"workers={workers} x devices_per_worker={devices_per_worker} needs "
            f"{workers * devices_per_worker} GPUs but {len(devices)} are visible "
            f"({','.join(devices) or 'none'}); use fewer workers or devices per worker")
    return [devices[w * devices_per_worker:(w + 1) * devices_per_worker] for w in range(workers)]


def _visible_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    if shutil.which("nvidia-smi"):
        result = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                                capture_output=True, text=True)
        if result.returncode == 0:
            return [line.strip() for line in result.stdout.splitlines() if line.strip()]
    return []


def worker_env(base: Mapping[str, str], threads: int,
               devices: Optional[Sequence[str]] = None) -> dict[str, str]:
    """`base` with thread counts set for `threads` threads (and CUDA_VISIBLE_DEVICES if given).

    XLA_FLAGS keeps what it holds (e.g. `--xla_force_host_platform_device_count`)."""
    env = dict(base)
    for name in THREAD_ENV:
        env[name] = str(threads)
    if threads == 1:
        flags = env.get("XLA_FLAGS", "").split()
        if not any(f.startswith("--xla_cpu_multi_thread_eigen") for f in flags):
            env["XLA_FLAGS"] = " ".join(flags + [XLA_SINGLE_THREAD_FLAG])
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    return env


def _pinned_argv(argv: list[str], cpus: list[int]) -> tuple[list[str], Optional[object]]:
    """Pin with `taskset` (fork-safe in a threaded parent), else `sched_setaffinity` after fork."""
    if not hasattr(os, "sched_setaffinity"):
        return argv, None  # macOS and others: no affinity, thread counts still apply
    taskset = shutil.which("taskset")
    if taskset:
        return [taskset, "--cpu-list", _cpu_ranges(cpus)] + argv, None
    return argv, lambda: os.sched_setaffinity(0, cpus)


@dataclasses.dataclass
class _Running:
    index: int
    job: Job
    worker: int
    process: subprocess.Popen
    log: IO[bytes]
    log_path: Path
    started: float


class _StopSignals:
    """SIGINT and SIGTERM to the launcher, recorded for the loop to act on.

    The handlers only note the signal: an exception raised from a handler lands on whatever
    bytecode runs, e.g. inside `Popen.poll` while it holds its wait lock (every later poll then
    says "running" and the stop waits out its whole grace period) or between starting a child
    and recording it (which then never gets its SIGTERM). The loop checks between steps."""

    def __init__(self):
        self.received: list[int] = []
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():  # handlers live there only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received.append(signum)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def launch_local(jobs: Sequence[Job], workers: int = 1,
                 threads_per_worker: Optional[int] = None, log_dir: Optional[str | Path] = None,
                 env: Optional[Mapping[str, str]] = None,
                 devices_per_worker: Optional[int] = None,
                 term_grace_s: float = TERM_GRACE_S) -> list[JobResult]:
    """Run each job as a subprocess, `workers` at a time; results in the order of `jobs`.

    Worker `w` is pinned to its own cores (`worker_cpus`) with thread-count variables to match,
    and with `devices_per_worker` to its own GPUs through CUDA_VISIBLE_DEVICES. `env` adds to
    (and overrides) this process's environment. Each job's stdout and stderr are appended to
    `log_dir/<name>.log` (default `<run_dir>/launch.log`). A failed job does not stop the others.
    Ctrl-C or SIGTERM sends SIGTERM to every running job (our trainer checkpoints and exits),
    SIGKILLs what still runs after `term_grace_s` (or at a second Ctrl-C), then re-raises."""
    _check_jobs(jobs)
    if not jobs:
        return []
    workers = max(1, min(workers, len(jobs)))
    cpu_sets = worker_cpus(workers, threads_per_worker)
    device_sets = (worker_devices(workers, devices_per_worker) if devices_per_worker
                   else [None] * workers)
    base_env = {**os.environ, **(env or {})}
    envs = [worker_env(base_env, len(cpu_sets[w]) if threads_per_worker is None
                       else threads_per_worker, device_sets[w]) for w in range(workers)]
    log_paths = [Path(log_dir) / f"{job.name}.log" if log_dir is not None
                 else Path(job.run_dir) / LAUNCH_LOG for job in jobs]

    total = len(jobs)
    results: dict[int, JobResult] = {}
    running: list[_Running] = []
    pending = list(range(total))
    free = list(range(workers))

    def start(index: int, worker: int) -> None:
        job, log_path = jobs[index], log_paths[index]
        Path(job.run_dir).mkdir(parents=True, exist_ok=True)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab")
        log.write(f"==> {time.strftime('%Y-%m-%d %H:%M:%S')} worker {worker} "
                  f"cpus {_cpu_ranges(cpu_sets[worker])}: {shell_command(job)}\n".encode())
        log.flush()
        argv, preexec = _pinned_argv([str(a) for a in job.argv], cpu_sets[worker])
        try:
            # Own session: a Ctrl-C at the terminal reaches only us; we then SIGTERM each job.
            process = subprocess.Popen(argv, env=envs[worker], stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True, preexec_fn=preexec)
        except OSError as e:  # e.g. the program does not exist: a failed job, not a crash
            log.write(f"could not start: {e}\n".encode())
            log.close()
            results[index] = JobResult(job.name, 127, 0.0, log_path)
            free.append(worker)
            _log(f"[{index + 1}/{total}] failed {job.name} (could not start: {e}), see {log_path}")
            return
        running.append(_Running(index, job, worker, process, log, log_path, time.monotonic()))
        devices = f" gpus {','.join(device_sets[worker])}" if device_sets[worker] else ""
        _log(f"[{index + 1}/{total}] start {job.name} (worker {worker}, cpus "
             f"{_cpu_ranges(cpu_sets[worker])}{devices})")

    def reap() -> bool:
        finished = [r for r in running if r.process.poll() is not None]
        for r in finished:
            running.remove(r)
            r.log.close()
            seconds = time.monotonic() - r.started
            code = r.process.returncode
            results[r.index] = JobResult(r.job.name, code, seconds, r.log_path)
            free.append(r.worker)
            if code == 0:
                _log(f"[{r.index + 1}/{total}] done {r.job.name} in {format_duration(seconds)}")
            else:
                how = f"exit {code}" if code > 0 else f"killed by {_signal_name(-code)}"
                _log(f"[{r.index + 1}/{total}] failed {r.job.name} ({how}) after "
                     f"{format_duration(seconds)}, see {r.log_path}")
        return bool(finished)

    with _StopSignals() as stop:
        try:
            while (pending or running) and not stop.received:
                while pending and free and not stop.received:
                    free.sort()
                    start(pending.pop(0), free.pop(0))
                if not reap():
                    time.sleep(POLL_S)
            if stop.received:
                _stop_all(running, term_grace_s, stop.received)
        except KeyboardInterrupt:  # only where no handler could be installed
            _stop_all(running, term_grace_s, stop.received)
            raise
        finally:
            for r in running:
                r.log.close()
        if stop.received:
            raise KeyboardInterrupt(f"launcher got {_signal_name(stop.received[0])}")
    failed = [r for r in results.values() if not r.ok]
    _log(f"{total - len(failed)}/{total} jobs succeeded" +
         (f"; failed: {', '.join(r.name for r in failed)}" if failed else ""))
    return [results[i] for i in range(total)]


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _stop_all(running: list[_Running], grace_s: float, received: list[int]) -> None:
    """SIGTERM each job; SIGKILL its process group after `grace_s` or at another signal
    (`received` grows as signals arrive). Idempotent: stopped jobs leave `running`."""
    if not running:
        return
    _log(f"stopping {len(running)} running job(s) (SIGTERM; they checkpoint and exit)")
    for r in running:
        if r.process.poll() is None:
            _send(r.process.pid, signal.SIGTERM, group=False)
    deadline, seen = time.monotonic() + grace_s, len(received)
    try:
        while any(r.process.poll() is None for r in running) and time.monotonic() < deadline:
            if len(received) > seen:
                _log("interrupted again: killing the jobs")
                break
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        _log("interrupted again: killing the jobs")
    for r in list(running):
        if r.process.poll() is None:
            _log(f"killing {r.job.name} (no exit after SIGTERM)")
        _send(r.process.pid, signal.SIGKILL, group=True)  # also what it left behind
        r.process.wait()
        running.remove(r)
        r.log.close()
        code = r.process.returncode
        _log(f"stopped {r.job.name} ({'exit ' + str(code) if code >= 0 else _signal_name(-code)})"
             f", see {r.log_path}")


def _send(pid: int, sig: int, group: bool) -> None:
    try:
        if group:
            os.killpg(pid, sig)  # its own session: process group id == pid
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ----------------------------------------------------------------------------------------------
# SLURM.

def _sbatch_option_names(options: Mapping[str, object]) -> dict[str, object]:
    """{'cpus_per_task': 8, '--time': '1:00:00'} -> {'cpus-per-task': 8, 'time': '1:00:00'}."""
    named = {}
    for key, value in options.items():
        name = str(key).lstrip("-").replace("_", "-")
        require(re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", name) is not None,
                f"sbatch option {key!r}: use a long option name such as 'partition' or "
                "'cpus-per-task'")
        require(name not in _RESERVED_SBATCH,
                f"sbatch option {key!r} is set by the launcher; remove it (the array comes "
                "from the jobs, max_parallel caps it, outputs go to <sweep>/slurm/)")
        named[name] = value
    return named


def _sbatch_line(name: str, value: object) -> Optional[str]:
    if value is None or value is False:
        return None
    if value is True:
        return f"#SBATCH --{name}"
    text = str(value)
    require("\n" not in text and '"' not in text,
            f"sbatch option {name!r}: value {text!r} may not hold a newline or '\"'")
    return f'#SBATCH --{name}="{text}"' if re.search(r"\s", text) else f"#SBATCH --{name}={text}"


def array_script(n_tasks: int, commands_path: Path, output_dir: Path, job_name: str,
                 sbatch_options: Optional[Mapping[str, object]] = None,
                 max_parallel: Optional[int] = None) -> str:
    """The `sbatch` script of a job array whose task i runs line i+1 of `commands_path`."""
    array = f"0-{n_tasks - 1}" + (f"%{max_parallel}" if max_parallel else "")
    options = {"array": array, "output": f"{output_dir}/%A_%a.out", "job-name": job_name,
               **_sbatch_option_names(sbatch_options or {})}
    header = [line for line in (_sbatch_line(k, v) for k, v in options.items()) if line]
    commands = shlex.quote(str(commands_path))
    return "\n".join([
        "#!/bin/bash",
        "# Written by bitnet_jax.scaling.launch.launch_slurm: task i runs line i+1 of the commands file.",
        *header,
        "",
        "# Thread counts follow the CPUs SLURM gave the task (XLA follows its CPU affinity).",
        'if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then',
        "  export " + " ".join(f"{name}=$SLURM_CPUS_PER_TASK" for name in THREAD_ENV),
        "fi",
        f"COMMANDS={commands}",
        'LINE=$((SLURM_ARRAY_TASK_ID + 1))',
        'CMD=$(sed -n "${LINE}p" "$COMMANDS")',
        'if [ -z "$CMD" ]; then',
        '  echo "no command on line $LINE of $COMMANDS" >&2',
        "  exit 2",
        "fi",
        'echo "[$(date "+%F %T")] task $SLURM_ARRAY_TASK_ID of job $SLURM_ARRAY_JOB_ID on '
        '$(hostname): $CMD" >&2',
        "# Several SLURM tasks: one run as that many JAX processes (JAX reads SLURM's layout);",
        "# a task that dies stops the others instead of leaving them in a collective.",
        'if [ "${SLURM_NTASKS:-1}" -gt 1 ]; then srun --kill-on-bad-exit=1 bash -c "$CMD"; '
        'else eval "$CMD"; fi',
        "",
    ])


def launch_slurm(jobs: Sequence[Job], sweep_dir: str | Path,
                 sbatch_options: Optional[Mapping[str, object]] = None, wait: bool = False,
                 max_parallel: Optional[int] = None) -> SlurmSubmission:
    """Submit the jobs as one SLURM job array; returns its id, script and task count.

    Writes `<sweep_dir>/slurm/commands.txt` (task i runs line i+1: `cd <cwd> && <argv>`),
    `jobs.json` (task -> name, run_dir) and `array.sh` with `--array=0-{n-1}`, `--job-name`
    (default: the sweep directory's name), `--output=<sweep_dir>/slurm/%A_%a.out` and one
    `#SBATCH --key=value` per entry of `sbatch_options` (`{"partition": "gpu", "time": "4:00:00",
    "cpus-per-task": 8, "gres": "gpu:1", "mem": "32G", "exclusive": True}`). `max_parallel`
    caps how many tasks run at once (`--array=...%N`). With `wait`, returns when every task has
    ended (`sbatch --wait`); `returncode` is then the highest task exit code."""
    _check_jobs(jobs)
    require(bool(jobs), "no jobs to submit to SLURM")
    require(max_parallel is None or max_parallel >= 1,
            f"max_parallel={max_parallel}; use 1 or more (or None for no limit)")
    sbatch = shutil.which("sbatch")
    require(sbatch is not None,
            "launcher 'slurm' needs the `sbatch` command, which is not on PATH; run on a SLURM "
            "login node, or use the 'local' or 'print' launcher")
    sweep_dir = Path(sweep_dir).resolve()
    slurm_dir = sweep_dir / SLURM_DIR
    slurm_dir.mkdir(parents=True, exist_ok=True)
    commands_path = slurm_dir / "commands.txt"
    commands_path.write_text("".join(shell_command(job) + "\n" for job in jobs))
    (slurm_dir / "jobs.json").write_text(json.dumps(
        [{"task": i, "name": job.name, "run_dir": str(job.run_dir),
          "argv": [str(a) for a in job.argv]} for i, job in enumerate(jobs)], indent=2) + "\n")
    script_path = slurm_dir / "array.sh"
    script_path.write_text(array_script(len(jobs), commands_path, slurm_dir, sweep_dir.name,
                                        sbatch_options, max_parallel))
    script_path.chmod(0o755)

    argv = [sbatch, "--parsable"] + (["--wait"] if wait else []) + [str(script_path)]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, cwd=os.getcwd())
    except KeyboardInterrupt:
        _log(f"stopped waiting; the SLURM job array may still run (see squeue, scancel); "
             f"script {script_path}")
        raise
    match = re.match(r"\s*(\d+)", result.stdout)
    if match is None:  # refused: bad partition, account, time limit, no controller, ...
        said = "; ".join(line.strip() for line in (result.stderr + result.stdout).splitlines()
                         if line.strip())
        raise ConfigError(f"sbatch refused {script_path} (exit {result.returncode}): {said}; "
                          "fix the sbatch options (partition, account, time, gres) or the "
                          "SLURM set-up")
    job_id = int(match.group(1))
    _log(f"submitted SLURM job array {job_id} ({len(jobs)} tasks): {script_path}; "
         f"outputs {slurm_dir}/{job_id}_<task>.out")
    return SlurmSubmission(job_id, script_path, len(jobs), commands_path,
                           tuple(job.name for job in jobs),
                           result.returncode if wait else None)


def _task_ids(text: str) -> list[int]:
    """'3', '0-4', '0-7%2', '1,3-5', '[0-2]', '0-9:2' -> the task ids."""
    ids = []
    for part in text.strip("[]").split("%")[0].split(","):
        if not part:
            continue
        step = 1
        if ":" in part:
            part, step_text = part.split(":", 1)
            step = int(step_text)
        if "-" in part:
            low, high = part.split("-", 1)
            ids.extend(range(int(low), int(high) + 1, step))
        else:
            ids.append(int(part))
    return ids


def slurm_job_states(job_id: int | str) -> dict[int, str]:
    """Task id -> state (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ...).

    From `squeue` (falling back to `scontrol show job`): SLURM keeps an ended job for
    `MinJobAge` (300 s by default) without accounting; an unknown or forgotten job gives {}."""
    job = str(job_id)
    squeue = shutil.which("squeue")
    if squeue:
        result = subprocess.run([squeue, "--noheader", "--array", "--states=all", "--jobs", job,
                                 "--format=%i|%K|%T"], capture_output=True, text=True)
        if result.returncode == 0:
            return _parse_squeue(result.stdout, job)
        if "Invalid job id" in result.stderr:
            return {}
    scontrol = shutil.which("scontrol")
    require(squeue is not None or scontrol is not None,
            "slurm_job_states needs `squeue` or `scontrol`, neither is on PATH")
    if scontrol is None:
        raise RuntimeError(f"squeue failed: {result.stderr.strip()}")
    result = subprocess.run([scontrol, "--oneliner", "show", "job", job],
                            capture_output=True, text=True)
    if result.returncode != 0:
        if "Invalid job id" in result.stderr:
            return {}
        raise RuntimeError(f"scontrol show job {job} failed: {result.stderr.strip()}")
    return _parse_scontrol(result.stdout)


def _parse_squeue(text: str, job: str) -> dict[int, str]:
    states = {}
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 3:
            continue
        jobid, tasks, state = fields
        if tasks in ("", "N/A"):  # not an array: the job itself is task 0
            states[0] = state
            continue
        for task in _task_ids(tasks):
            states[task] = state
    return dict(sorted(states.items()))


def _parse_scontrol(text: str) -> dict[int, str]:
    states = {}
    for line in text.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if "JobState" not in fields:
            continue
        tasks = fields.get("ArrayTaskId")
        for task in _task_ids(tasks) if tasks else [0]:
            states[task] = fields["JobState"]
    return dict(sorted(states.items()))
