"""Launchers: local subprocesses (isolation, parallelism, pinning, Ctrl-C), printed commands, and a
real SLURM job array on a single-node SLURM started for these tests (tests/slurm_cluster.py)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bitnet_jax.scaling import launch
from bitnet_jax.errors import ConfigError
from bitnet_jax.scaling.launch import Job, JobResult

# A stand-in for `bitnet train`: records what it saw into its run directory, then exits.
CHILD = textwrap.dedent("""
    import json, os, sys, time
    run_dir, sleep_s, code = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    start = time.time()
    time.sleep(sleep_s)
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                          "MKL_NUM_THREADS", "XLA_FLAGS", "BITNET_TEST_MARK",
                                          "SLURM_ARRAY_TASK_ID")}
    record = {"start": start, "end": time.time(), "cwd": os.getcwd(), "env": env,
              "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}
    with open(os.path.join(run_dir, "child.json"), "w") as f:
        json.dump(record, f)
    print("hello from", os.path.basename(run_dir), flush=True)
    print("to stderr", file=sys.stderr)
    sys.exit(code)
""")


def child_job(root: Path, name: str, sleep_s: float = 0.0, code: int = 0) -> Job:
    run_dir = root / name
    return Job(name, [sys.executable, "-c", CHILD, str(run_dir), str(sleep_s), str(code)], run_dir)


def record(job: Job) -> dict:
    return json.loads((job.run_dir / "child.json").read_text())


# ----------------------------------------------------------------------------------------------
# Local.

def test_local_failure_does_not_stop_the_others(tmp_path, capsys):
    jobs = [child_job(tmp_path, "run-a"), child_job(tmp_path, "run-b", code=1),
            child_job(tmp_path, "run-c")]
    results = launch.launch_local(jobs, workers=1, env={"BITNET_TEST_MARK": "set"})

    assert [r.name for r in results] == ["run-a", "run-b", "run-c"]
    assert [r.returncode for r in results] == [0, 1, 0]
    assert [r.ok for r in results] == [True, False, True]
    for job, result in zip(jobs, results):
        assert isinstance(result, JobResult) and result.seconds >= 0
        assert result.log_path == job.run_dir / "launch.log"
        log = result.log_path.read_text()
        assert f"hello from {job.name}" in log and "to stderr" in log  # both streams
        assert record(job)["env"]["BITNET_TEST_MARK"] == "set"
        assert record(job)["cwd"] == os.getcwd()
    err = capsys.readouterr().err
    assert "[1/3] done run-a" in err and "[3/3] done run-c" in err
    assert "[2/3] failed run-b (exit 1)" in err and str(jobs[1].run_dir / "launch.log") in err
    assert "2/3 jobs succeeded; failed: run-b" in err


def test_local_log_dir_and_missing_program(tmp_path):
    jobs = [child_job(tmp_path, "ok"),
            Job("missing", [str(tmp_path / "no-such-program")], tmp_path / "missing")]
    results = launch.launch_local(jobs, log_dir=tmp_path / "logs")
    assert results[0].returncode == 0 and results[1].returncode != 0
    assert [r.log_path for r in results] == [tmp_path / "logs" / "ok.log",
                                             tmp_path / "logs" / "missing.log"]
    assert "hello from ok" in results[0].log_path.read_text()
    assert results[1].log_path.exists()


def test_local_workers_run_at_once_pinned_with_thread_env(tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    jobs = [child_job(tmp_path, f"w{i}", sleep_s=1.0) for i in range(2)]
    results = launch.launch_local(jobs, workers=2)
    assert all(r.ok for r in results)
    first, second = record(jobs[0]), record(jobs[1])
    # Both ran at once: each started before the other ended (they sleep 1 s each).
    assert first["start"] < second["end"] and second["start"] < first["end"]

    expected = launch.worker_cpus(2)
    usable = sorted(os.sched_getaffinity(0))
    for worker, rec in enumerate((first, second)):
        assert rec["cpus"] == expected[worker]
        threads = str(len(expected[worker]))
        assert rec["env"]["OMP_NUM_THREADS"] == threads
        assert rec["env"]["OPENBLAS_NUM_THREADS"] == threads
        assert rec["env"]["MKL_NUM_THREADS"] == threads
        flags = rec["env"]["XLA_FLAGS"].split()
        assert "--xla_force_host_platform_device_count=8" in flags  # kept, not clobbered
        assert (launch.XLA_SINGLE_THREAD_FLAG in flags) == (threads == "1")
    if len(usable) >= 2:
        assert not set(first["cpus"]) & set(second["cpus"])  # disjoint cores


@pytest.mark.parametrize("pin_with", ["taskset", "sched_setaffinity"])
def test_local_threads_per_worker(tmp_path, monkeypatch, pin_with):
    if pin_with == "sched_setaffinity":  # no taskset: pinned after fork by preexec_fn
        which = launch.shutil.which
        monkeypatch.setattr(launch.shutil, "which", lambda name, *args, **kwargs:
                            None if name == "taskset" else which(name, *args, **kwargs))
    job = child_job(tmp_path, "one-thread")
    [result] = launch.launch_local([job], threads_per_worker=1)
    assert result.ok
    rec = record(job)
    assert len(rec["cpus"]) == 1 and rec["env"]["OMP_NUM_THREADS"] == "1"
    assert launch.XLA_SINGLE_THREAD_FLAG in rec["env"]["XLA_FLAGS"].split()


def test_worker_cpus_devices_and_env():
    assert launch.worker_cpus(2, cpus=[0, 1, 2, 3]) == [[0, 1], [2, 3]]
    assert launch.worker_cpus(3, cpus=[0, 1, 2, 3, 4, 5, 6]) == [[0, 1], [2, 3], [4, 5]]
    assert launch.worker_cpus(3, cpus=[4, 5]) == [[4], [5], [4]]  # more workers than cores
    assert launch.worker_cpus(2, threads_per_worker=3, cpus=range(8)) == [[0, 1, 2], [3, 4, 5]]
    assert launch.worker_devices(2, 2, devices=["0", "1", "2", "3"]) == [["0", "1"], ["2", "3"]]
    with pytest.raises(ConfigError, match="devices_per_worker=2 needs 4 GPUs but 3"):
        launch.worker_devices(2, 2, devices=["0", "1", "2"])
    env = launch.worker_env({"XLA_FLAGS": "--xla_dump_to=/tmp/x", "PATH": "/bin"}, 4, ["2", "3"])
    assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x" and env["OMP_NUM_THREADS"] == "4"
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env["PATH"] == "/bin"
    env = launch.worker_env({"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=true"}, 1)
    assert env["XLA_FLAGS"] == "--xla_cpu_multi_thread_eigen=true"  # the user's choice wins
    assert launch._cpu_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    with pytest.raises(ConfigError, match="appears twice"):
        launch.launch_local([Job("a", ["true"], Path("x")), Job("a", ["true"], Path("y"))])
    assert launch.launch_local([]) == []


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_local_ctrl_c_sends_sigterm_to_jobs(tmp_path, stop_signal):
    """Ctrl-C (SIGINT) or SIGTERM to the launcher: each job gets SIGTERM and exits cleanly (our
    trainer checkpoints), jobs not started yet never start, the launcher stops."""
    trainer = textwrap.dedent("""
        import os, signal, sys, time
        run_dir = sys.argv[1]
        def on_term(signum, frame):
            open(os.path.join(run_dir, "checkpointed"), "w").write("SIGTERM")
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
        open(os.path.join(run_dir, "ready"), "w").close()
        time.sleep(60)
    """)
    jobs = [Job(f"t{i}", [sys.executable, "-c", trainer, str(tmp_path / f"t{i}")],
                tmp_path / f"t{i}") for i in range(3)]
    spec = [(j.name, j.argv, str(j.run_dir)) for j in jobs]
    driver = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from bitnet_jax.scaling.launch import Job, launch_local
        jobs = [Job(n, a, Path(d)) for n, a, d in {spec!r}]
        try:
            launch_local(jobs, workers=2)
        except KeyboardInterrupt:
            sys.exit(130)
    """)
    launcher = subprocess.Popen([sys.executable, "-c", driver], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not all((j.run_dir / "ready").exists() for j in jobs[:2]):
        assert time.monotonic() < deadline and launcher.poll() is None
        time.sleep(0.05)
    launcher.send_signal(stop_signal)
    _, err = launcher.communicate(timeout=30)
    assert launcher.returncode == 130, err
    for job in jobs[:2]:
        assert (job.run_dir / "checkpointed").read_text() == "SIGTERM"
    assert not jobs[2].run_dir.exists()  # never started
    assert "stopping 2 running job(s)" in err and "stopped t0 (exit 0)" in err


# ----------------------------------------------------------------------------------------------
# Printed commands.

ECHO_ARGS = ("import json, os, sys; "
             "json.dump({'argv': sys.argv[1:], 'cwd': os.getcwd()}, open(sys.argv[1], 'w'))")
AWKWARD = ["two words", "it's", 'say "hi"', "$HOME", "`ls`", "new\nline", "tab\there", "é ü", ""]


def test_print_commands_are_quoted_and_runnable(tmp_path, monkeypatch):
    work = tmp_path / "work dir"
    work.mkdir()
    monkeypatch.chdir(work)
    out = tmp_path / "out dir" / "argv.json"
    out.parent.mkdir()
    jobs = [Job("echo", [sys.executable, "-c", ECHO_ARGS, str(out), *AWKWARD], tmp_path / "r"),
            Job("other run", ["true"], tmp_path / "r2")]
    text = launch.launch_print(jobs)
    lines = text.splitlines()
    assert len(lines) == 2 and text.endswith("\n")  # one line per job, even with a newline arg
    assert lines[0] == launch.shell_command(jobs[0])
    assert lines[0].startswith(f"cd '{work}' && ")
    assert lines[1] == f"cd '{work}' && true"

    monkeypatch.chdir(tmp_path)  # the command's own `cd` takes it back
    subprocess.run(["bash", "-c", lines[0]], check=True)
    got = json.loads(out.read_text())
    assert got == {"argv": [str(out), *AWKWARD], "cwd": str(work)}


# ----------------------------------------------------------------------------------------------
# SLURM.

def test_sbatch_missing_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "")
    with pytest.raises(ConfigError, match="needs the `sbatch` command, which is not on PATH"):
        launch.launch_slurm([child_job(tmp_path, "a")], tmp_path / "sweep")


def test_array_script_options():
    script = launch.array_script(4, Path("/s/slurm/commands.txt"), Path("/s/slurm"), "ladder",
                                 {"partition": "gpu", "cpus_per_task": 8, "gres": "gpu:1",
                                  "exclusive": True, "requeue": False, "comment": "a b",
                                  "job-name": "mine"}, max_parallel=2)
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert [line for line in lines if line.startswith("#SBATCH")] == [
        "#SBATCH --array=0-3%2", "#SBATCH --output=/s/slurm/%A_%a.out",
        "#SBATCH --job-name=mine", "#SBATCH --partition=gpu", "#SBATCH --cpus-per-task=8",
        "#SBATCH --gres=gpu:1", "#SBATCH --exclusive", '#SBATCH --comment="a b"']
    for bad in ({"array": "0-9"}, {"output": "x"}, {"wait": True}, {"bad name": 1}):
        with pytest.raises(ConfigError, match="sbatch option"):
            launch.array_script(1, Path("c"), Path("o"), "n", bad)


def test_parse_task_ids_and_states():
    assert launch._task_ids("0-4%2") == [0, 1, 2, 3, 4]
    assert launch._task_ids("[1,3-5]") == [1, 3, 4, 5]
    assert launch._task_ids("0-6:3") == [0, 3, 6]
    squeue = "7_[2-3%1]|2-3%1|PENDING\n7_1|1|RUNNING\n7_0|0|COMPLETED\n"
    assert launch._parse_squeue(squeue, "7") == {0: "COMPLETED", 1: "RUNNING", 2: "PENDING",
                                                 3: "PENDING"}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    from slurm_cluster import slurm_cluster

    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}


@pytest.mark.slow
def test_slurm_array_runs_every_task(slurm, tmp_path, monkeypatch):
    work = tmp_path / "work dir"  # spaces in the working and sweep directories
    work.mkdir()
    monkeypatch.chdir(work)
    sweep_dir = tmp_path / "my sweep"
    jobs = [child_job(tmp_path / "runs", f"run-{i}", code=3 if i == 1 else 0) for i in range(3)]
    for job in jobs:
        job.run_dir.mkdir(parents=True)

    sub = launch.launch_slurm(jobs, sweep_dir, {"time": "10:00", "cpus_per_task": 1,
                                                "comment": "bitnet test"}, wait=True)

    assert sub.n_tasks == 3 and sub.job_id > 0 and sub.names == ("run-0", "run-1", "run-2")
    assert sub.returncode == 3  # sbatch --wait: the highest task exit code
    assert sub.script_path == sweep_dir.resolve() / "slurm" / "array.sh"
    script = sub.script_path.read_text()
    assert "#SBATCH --array=0-2\n" in script and "#SBATCH --job-name=my sweep" not in script
    assert '#SBATCH --job-name="my sweep"' in script and "#SBATCH --time=10:00" in script
    assert f'#SBATCH --output="{sweep_dir.resolve()}/slurm/%A_%a.out"' in script
    assert sub.commands_path.read_text() == launch.launch_print(jobs)
    mapping = json.loads((sweep_dir / "slurm" / "jobs.json").read_text())
    assert [m["name"] for m in mapping] == ["run-0", "run-1", "run-2"]

    for task, job in enumerate(jobs):
        rec = record(job)  # every task ran its own command, in the submitting directory
        assert rec["env"]["SLURM_ARRAY_TASK_ID"] == str(task) and rec["cwd"] == str(work)
        assert rec["env"]["OMP_NUM_THREADS"] == "1"  # from --cpus-per-task
        out = sub.output_path(task).read_text()
        assert f"hello from run-{task}" in out and f"task {task} of job {sub.job_id}" in out
    assert launch.slurm_job_states(sub.job_id) == {0: "COMPLETED", 1: "FAILED", 2: "COMPLETED"}
    shown = subprocess.run(["scontrol", "--oneliner", "show", "job", str(sub.job_id)],
                           capture_output=True, text=True, check=True).stdout
    assert launch._parse_scontrol(shown) == {0: "COMPLETED", 1: "FAILED", 2: "COMPLETED"}
    assert "ExitCode=3:0" in shown


@pytest.mark.slow
def test_slurm_submit_then_poll_states(slurm, tmp_path):
    jobs = [child_job(tmp_path, f"p{i}", sleep_s=0.5) for i in range(2)]
    for job in jobs:
        job.run_dir.mkdir()
    sub = launch.launch_slurm(jobs, tmp_path / "sweep", max_parallel=1)
    assert sub.returncode is None and "#SBATCH --array=0-1%1" in sub.script_path.read_text()
    seen = []
    deadline = time.monotonic() + 45
    while True:
        states = launch.slurm_job_states(sub.job_id)
        seen.append(states)
        if set(states) == {0, 1} and set(states.values()) <= TERMINAL:
            break
        assert time.monotonic() < deadline, seen
        time.sleep(0.2)
    assert states == {0: "COMPLETED", 1: "COMPLETED"}
    assert set(seen[0]) == {0, 1}  # both tasks known from the start (pending or running)
    assert all(list(s.values()).count("RUNNING") <= 1 for s in seen)
    first, second = record(jobs[0]), record(jobs[1])
    assert second["start"] >= first["end"] - 0.05  # max_parallel=1: one after the other
    assert launch.slurm_job_states(999999) == {}  # unknown job

    with pytest.raises(ConfigError, match="sbatch refused .*invalid partition specified: nope"):
        launch.launch_slurm(jobs, tmp_path / "sweep2", {"partition": "nope"})
