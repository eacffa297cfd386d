"""What happens when things go wrong, by class: every bad file or value is one line naming it and
a non-zero exit, with inputs and earlier runs intact; failed checkpoint saves stop the run at once;
damaged checkpoints fall back to the newest step that reads; --overwrite never deletes its input;
finished runs are left as they are; sweeps isolate, resume and report failures; the launcher stops
cleanly on every signal; a multi-host start from the environment trains like one process."""

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml

from bitnet_jax.cli import main
from bitnet_jax.config import load_config
from bitnet_jax.errors import ConfigError
from bitnet_jax.scaling import sweep as sweeps
from bitnet_jax.scaling.launch import Job
from bitnet_jax.scaling.results import read_table
from bitnet_jax.train import sharding
from bitnet_jax.train.checkpoint import CheckpointSaveError
from bitnet_jax.train.loop import train
from bitnet_jax.train.metrics import read_jsonl

from multihost import run_processes

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.preset=ladder-50k", "train.steps=8", "train.batch_size=8", "data.seq_len=64",
        "data.max_documents=40", "optimizer.warmup_steps=2", "train.eval_every=0",
        "train.eval_batches=2", "train.checkpoint_every=2", "train.keep_checkpoints=5",
        "train.log_every=1", "train.progress=false", "train.peak_flops=1e11",
        "logging.wandb=disabled", "name=run"]
ELF = b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4


def tiny(out_dir, *extra):
    return load_config(overrides=[f"out_dir={out_dir}", *TINY, *extra])


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "train"]


def snapshot(*paths: Path) -> dict[str, str]:
    """A hash of every file under `paths`, to show that nothing changed."""
    digests = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            digests[str(path)] = hashlib.sha1(path.read_bytes()).hexdigest()
    return digests


def one_error_line(capsys, code: int, *names: str) -> str:
    """The CLI failed with one `error:` line on stderr (no traceback) naming each of `names`."""
    err = capsys.readouterr().err.strip()
    assert code != 0, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A completed 8-step run with checkpoints at steps 2, 4, 6 and 8 (copy it to change it)."""
    out = tmp_path_factory.mktemp("finished")
    summary = train(tiny(out), devices=jax.devices()[:1])
    assert summary["status"] == "completed"
    return out / "run"


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy" / "run"
    shutil.copytree(run_dir, target)
    return target


# ----------------------------------------------------------------------------------------------
# Class: files the CLI reads.

def test_unreadable_files_are_one_line_errors(tmp_path, capsys, finished_run):
    """Binary, non-UTF-8, torn, truncated and mistyped files: one line naming the file."""
    good_yaml = tmp_path / "good.yaml"
    good_yaml.write_text(yaml.safe_dump({"model": {"preset": "ladder-50k"},
                                         "train": {"steps": 4, "progress": False},
                                         "optimizer": {"warmup_steps": 1}}))
    cases = []

    def case(name, content, argv_for, *named):
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        cases.append((path, argv_for(path), named or (path.name,)))

    case("binary.yaml", ELF, lambda p: ["train", "--config", str(p)])
    case("broken.yaml", "train:\n  steps: [1, 2\n", lambda p: ["train", "--config", str(p)])
    case("latin1.yaml", "name: caf\xe9\n".encode("latin-1"), lambda p: ["train", "--config", str(p)])
    case("sweep.yaml", "name: s\naxes: [{precision: [bf16]\n", lambda p: ["sweep", "plan", str(p)])
    case("table.csv", ELF, lambda p: ["fit", str(p)])
    case("latin1.csv", "params,loss\n1,caf\xe9\n".encode("latin-1"), lambda p: ["fit", str(p)])
    for suffix, content in (("txt", ELF), ("jsonl", b'{"text": "ok"}\n{"text": "\xff\xfe"}\n'),
                            ("parquet", b"PAR1 not really parquet")):
        case(f"corpus.{suffix}", content, lambda p: [
            "train", "--config", str(good_yaml), f"out_dir={tmp_path / 'runs'}",
            "data.source=files", f"data.paths=[{p}]", "logging.wandb=disabled"])
    case("tokenizer.json", b'{"version": "1.0", "model": ', lambda p: [
        "train", "--config", str(good_yaml), f"out_dir={tmp_path / 'runs'}",
        f"data.tokenizer={p}", "logging.wandb=disabled"])
    out_file = tmp_path / "not_a_dir"
    case("not_a_dir", "a file", lambda p: [
        "train", "--config", str(good_yaml), f"out_dir={p}", "model.preset=ladder-50k",
        "data.max_documents=10", "logging.wandb=disabled"])
    case("tokens_lots.yaml", "name: s\ntokens: lots\naxes: [{precision: [bf16]}]\n",
         lambda p: ["sweep", "plan", str(p)], "tokens")

    before = snapshot(tmp_path)
    for path, argv, named in cases:
        one_error_line(capsys, main(argv), *named)
    assert snapshot(tmp_path) == before  # inputs intact, no run directory written
    assert not (tmp_path / "runs").exists() and out_file.is_file()

    # A run's files: a torn last line of metrics.jsonl is a kill mid-write (dropped on read);
    # a missing init_from and a missing checkpoint step name what is missing, before any write.
    run = copy_run(finished_run, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "kind": "tr')
    assert len(read_jsonl(run / "metrics.jsonl")) == len(read_jsonl(finished_run / "metrics.jsonl"))
    before = snapshot(run)
    for argv, named in (
            (["train", f"out_dir={tmp_path / 'other'}", *TINY, f"init_from={tmp_path / 'nope'}"],
             ("init_from",)),
            (["export-hf", str(run), str(tmp_path / "hf"), "--step", "999"], ("999",)),
            (["pack", str(run), "--out", str(tmp_path / "packed"), "--step", "999"], ("999",))):
        one_error_line(capsys, main(argv), *named)
    assert snapshot(run) == before
    assert not (tmp_path / "other" / "run").exists()


def test_values_that_make_no_sense_are_refused(tmp_path, capsys):
    """Negative intervals and budgets, fits of nothing, negative bootstraps: refused at load."""
    out = tmp_path / "runs"
    for override in ("train.eval_every=-1", "train.checkpoint_every=-2"):
        one_error_line(capsys, main(["train", f"out_dir={out}", *TINY, override]),
                       override.split("=")[0])
    sweep = tmp_path / "negative.yaml"
    sweep.write_text("name: s\ntokens: -1.0e6\naxes: [{precision: [bf16]}]\n")
    one_error_line(capsys, main(["sweep", "plan", str(sweep)]), "tokens=-1000000.0")

    two_rows = tmp_path / "two.csv"
    two_rows.write_text("params,loss\n1e6,3.0\n2e6,2.9\n")
    nan_rows = tmp_path / "nan.csv"
    nan_rows.write_text("params,loss\n" + "".join(f"{10 ** k},nan\n" for k in range(4, 10)))
    good = tmp_path / "good.csv"
    good.write_text("params,loss\n" + "".join(f"{n},{2 + 50 * n ** -0.3}\n"
                                               for n in (1e5, 3e5, 1e6, 3e6, 1e7, 3e7)))
    for argv, named in ((["fit", str(two_rows)], ("two.csv", "no law")),
                        (["fit", str(nan_rows)], ("nan.csv", "no law")),
                        (["fit", str(good), "--bootstrap", "-3"], ("-3",))):
        one_error_line(capsys, main(argv), *named)
    assert main(["fit", str(good), "--bootstrap", "0"]) == 0  # 0 keeps meaning "no bootstrap"
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# Class: checkpoints.

def _largest_array_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "d" in p.parts]
    return max(files, key=lambda p: p.stat().st_size)


def _truncate(step_dir):
    path = _largest_array_file(step_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty(step_dir):
    shutil.rmtree(step_dir)
    step_dir.mkdir()


# damage -> the step the run resumes from. Without _CHECKPOINT_METADATA (timestamps, orbax's
# bookkeeping) step 8 still reads completely, so it is used: the point is the same losses.
DAMAGE = {
    "truncated_array": (_truncate, 6),
    "no_checkpoint_metadata": (lambda d: (d / "_CHECKPOINT_METADATA").unlink(), 8),
    "no_state_metadata": (lambda d: (d / "state" / "_METADATA").unlink(), 6),
    "no_meta_metadata": (lambda d: (d / "meta" / "metadata").unlink(), 6),
    "garbage_iterator": (lambda d: (d / "data" / "process_0-of-1.json").write_bytes(b"\x00{garb"),
                         6),
    "empty_step": (_empty, 6),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_and_finishes_the_same(tmp_path, capsys,
                                                                    finished_run, damage):
    """The newest step damaged (and the run killed before its summary): the run resumes from
    the step before, says which step it skipped and why, and ends with the same losses."""
    run = copy_run(finished_run, tmp_path)
    (run / "summary.json").unlink()
    damage_step, resume_step = DAMAGE[damage]
    damage_step(run / "checkpoints" / "8")
    capsys.readouterr()
    summary = train(tiny(run.parent), devices=jax.devices()[:1])
    captured = capsys.readouterr()
    assert summary["status"] == "completed"
    assert f"resumed {run} at step {resume_step}" in captured.out, captured
    assert losses(run) == losses(finished_run)
    if resume_step != 8:
        skipped = [l for l in captured.err.splitlines() if l.startswith("skipped checkpoint")]
        assert len(skipped) == 1 and "step 8 (it does not read: " in skipped[0], captured.err
        assert (run.parent / "run" / "checkpoints.skipped" / "8").is_dir()  # kept to inspect


def test_failed_checkpoint_save_stops_at_once(tmp_path, capsys, monkeypatch):
    """A save that fails (disk full, read-only) ends the run at that step with one line naming
    the step and the last good checkpoint; nothing waits on orbax's background threads."""
    real_save = ocp.CheckpointManager.save

    def full_disk_at_step_4(self, step, *args, **kwargs):
        if step == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.directory))
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk_at_step_4)
    start = time.monotonic()
    code = main(["train", f"out_dir={tmp_path}", *TINY])
    line = one_error_line(capsys, code, "step 4", "No space left on device",
                          "last good checkpoint: step 2")
    assert code == 1 and time.monotonic() - start < 120, line
    run = tmp_path / "run"
    assert max(r["step"] for r in read_jsonl(run / "metrics.jsonl")) == 4  # stopped at once
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "step 4" in summary["reason"]
    monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
    assert main(["train", f"out_dir={tmp_path}", *TINY]) == 0  # resumes from step 2
    assert "resumed" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare")
def test_full_disk_for_real_stops_and_exits(tmp_path):
    """The same on a real 64 KiB tmpfs (in a private mount namespace; skipped where user
    namespaces are not allowed): the process exits with one error line, it does not hang."""
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=4k tmpfs "
                            f"{tmp_path}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no private tmpfs here: {probe.stderr.decode().strip()}")
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    command = " ".join([f"mount -t tmpfs -o size=64k tmpfs {checkpoints} &&",
                        sys.executable, "-m", "bitnet_jax.cli", "train", f"out_dir={tmp_path}",
                        *TINY])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": ""}
    done = subprocess.run(["unshare", "-rm", "sh", "-c", command], env=env, capture_output=True,
                          text=True, timeout=300)
    # orbax's abandoned save threads print tracebacks while the process exits, and under load a
    # fragment of theirs can land before our line on the same line of stderr: find ours anywhere.
    errors = [l[l.index("error: "):] for l in done.stderr.splitlines() if "error: " in l]
    assert done.returncode == 1, done.stderr[-2000:]
    assert len(errors) == 1, done.stderr[-3000:]
    assert "step 2" in errors[0] and "last good checkpoint: none" in errors[0], errors


# ----------------------------------------------------------------------------------------------
# Class: nothing destroyed.

def test_nothing_is_destroyed(tmp_path, capsys, finished_run):
    """--overwrite never deletes its own input; another config never rewrites a run's files;
    a finished run is left as it is."""
    runs = tmp_path / "copy"
    run = copy_run(finished_run, tmp_path)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    before, hf_before = snapshot(runs), snapshot(hf)
    for argv, named in ((["export-hf", str(run), str(runs), "--overwrite"], ("contains",)),
                        (["export-hf", str(run), str(run / "hf"), "--overwrite"], ("inside",)),
                        (["pack", str(run), "--out", str(run), "--overwrite"], ("is the input",)),
                        (["import-hf", str(hf), str(hf), "--overwrite"], ("is the input",))):
        one_error_line(capsys, main(argv), *named)
    assert snapshot(runs) == before and snapshot(hf) == hf_before

    # Another preset on an existing run: refused before config.yaml (or anything) is touched.
    code = main(["train", f"out_dir={runs}", *TINY, "model.preset=ladder-100k", "train.steps=12"])
    one_error_line(capsys, code, "model", str(run))
    assert snapshot(runs) == before

    # The finished run again: nothing rewritten (summary, metrics, checkpoints), no second eval.
    stat = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert main(["train", f"out_dir={runs}", *TINY]) == 0
    assert "already completed" in capsys.readouterr().out
    assert snapshot(runs) == before
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == stat


# ----------------------------------------------------------------------------------------------
# Class: sweeps.

def _sweep_file(tmp_path: Path, axes: list, **extra) -> Path:
    base = load_config(overrides=TINY[:-1])  # the tiny run, without its fixed name
    tree = {"name": "s", "out_dir": str(tmp_path / "runs"),
            "base": {"model": {"preset": "ladder-50k"}, "data": {"max_documents": 40,
                                                                 "seq_len": 64},
                     "train": {"batch_size": 8, "eval_every": 0, "eval_batches": 2,
                               "checkpoint_every": 2, "log_every": 1, "progress": False,
                               "peak_flops": 1e11},
                     "optimizer": {"warmup_steps": 2}, "logging": {"wandb": "disabled"}},
            "axes": axes, "tokens": 8 * base.train.batch_size * base.data.seq_len, **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_sweep_isolates_resumes_and_reports_failures(tmp_path, capsys, monkeypatch):
    """A killed run with checkpoints is interrupted and resumes; a run whose files do not read
    does not stop collect; failures carry their last error line into the table."""
    path = _sweep_file(tmp_path, [{"optimizer.lr": [1e-3, 2e-3, 3e-3]}])
    sweep = sweeps.load_sweep(path)
    killed, damaged, crashed = sweep.runs
    jobs, _ = sweeps.jobs_to_run(sweep)
    logs = {}
    for run in sweep.runs:
        (run.run_dir / "checkpoints").mkdir(parents=True)
        logs[run.run_id] = run.run_dir / "launch.log"
    (killed.run_dir / "checkpoints" / "2").mkdir()  # a complete-looking step: resumable
    logs[killed.run_id].write_text("train 1/8\n")
    logs[crashed.run_id].write_text("Traceback (most recent call last):\n  File x\n"
                                    "RuntimeError: out of memory on device\n")

    class Result:
        def __init__(self, code, log):
            self.returncode, self.log_path = code, log

    failures = sweeps.record_crashes(
        [jobs[0], jobs[2]], [Result(-9, logs[killed.run_id]), Result(1, logs[crashed.run_id])])
    assert [f["status"] for f in failures] == ["interrupted", "failed"]
    assert failures[1]["error"] == "RuntimeError: out of memory on device"
    (damaged.run_dir / "summary.json").write_bytes(b"\x00\x01 torn")
    (damaged.run_dir / "metrics.jsonl").write_text('{"step": 1}\n\xff{"no json\n{"step": 2}\n')

    jobs, skipped = sweeps.jobs_to_run(sweep)
    assert {j.name for j in jobs} == {killed.run_id, damaged.run_id}  # both resume on a re-run
    assert skipped == {crashed.run_id: "failed"}
    rows = {r["run"]: r for r in sweeps.collect(sweep)}
    assert rows[killed.run_id]["status"] == "interrupted"
    assert rows[damaged.run_id]["status"] == "unreadable"
    assert "metrics.jsonl:2" in rows[damaged.run_id]["error"]
    assert rows[crashed.run_id]["error"] == "RuntimeError: out of memory on device"
    table = {r["run"]: r for r in read_table(sweep.directory / "results.csv")}
    assert table[crashed.run_id]["error"] == "RuntimeError: out of memory on device"


@pytest.mark.slow
def test_sweep_run_exits_non_zero_and_names_each_failure(tmp_path, capsys):
    """`sweep run`: the good run completes, the bad one fails with its own error line, the
    report is written, and the command exits 1 printing that line."""
    path = _sweep_file(tmp_path, [{"data.source": ["builtin", "files"],
                                   "data.paths": [[], [str(tmp_path / "missing.txt")]]}])
    sweep = sweeps.load_sweep(path)
    code = main(["sweep", "run", str(path)])
    err = capsys.readouterr().err
    assert code == 1
    bad = sweep.runs[1]
    failure = [l for l in err.splitlines() if l.startswith(f"error: run {bad.run_id}")]
    assert len(failure) == 1 and "missing.txt" in failure[0], err
    table = {r["run"]: r for r in read_table(sweep.directory / "results.csv")}
    assert table[sweep.runs[0].run_id]["status"] == "completed"
    assert "missing.txt" in table[bad.run_id]["error"]
    assert (sweep.directory / "report.md").exists()


# ----------------------------------------------------------------------------------------------
# Class: the launcher's stop.

STOPPABLE_CHILD = textwrap.dedent("""
    import os, signal, sys, time
    run_dir = sys.argv[1]
    os.makedirs(run_dir, exist_ok=True)
    open(os.path.join(run_dir, "pid"), "w").write(str(os.getpid()))
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    time.sleep(float(sys.argv[2]))
""")


@pytest.mark.slow
def test_launcher_stops_on_every_signal_under_load(tmp_path):
    """Ctrl-C or SIGTERM at any moment (before, while and after children start), many times,
    with the CPUs busy: the launcher always stops its children and exits quickly."""
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    rng = random.Random(0)
    try:
        for attempt in range(12):
            root = tmp_path / str(attempt)
            lives = [60, rng.uniform(0, 0.5), 60]  # j2 starts when j1 ends, near the signal
            jobs = [(f"j{i}", [sys.executable, "-c", STOPPABLE_CHILD, str(root / f"j{i}"),
                               str(life)], str(root / f"j{i}")) for i, life in enumerate(lives)]
            driver = textwrap.dedent(f"""
                import sys
                from pathlib import Path
                from bitnet_jax.scaling.launch import Job, launch_local
                jobs = [Job(n, a, Path(d)) for n, a, d in {jobs!r}]
                try:
                    launch_local(jobs, workers=2, term_grace_s=20)
                except KeyboardInterrupt:
                    sys.exit(130)
            """)
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            launcher = subprocess.Popen([sys.executable, "-c", driver], env=env,
                                        stderr=subprocess.PIPE, text=True)
            deadline = time.monotonic() + 30
            while not (root / "j0" / "pid").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.6))
            launcher.send_signal(rng.choice([signal.SIGINT, signal.SIGTERM]))
            _, err = launcher.communicate(timeout=15)
            assert launcher.returncode == 130, err
            for pid_file in root.glob("*/pid"):
                pid = int(pid_file.read_text())
                with pytest.raises(ProcessLookupError):  # stopped, and reaped by the launcher
                    os.kill(pid, 0)
    finally:
        burner.kill()
        burner.wait()


# ----------------------------------------------------------------------------------------------
# Class: multi-host from the environment.

def test_distributed_arguments_from_the_environment():
    args = sharding.distributed_arguments
    assert args({}) is None and args({"BITNET_DISTRIBUTED": "0",
                                      "JAX_COORDINATOR_ADDRESS": "h:1"}) is None
    assert args({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
                 "JAX_PROCESS_ID": "1"}) == {"coordinator_address": "h:1", "num_processes": 2,
                                             "process_id": 1}
    assert args({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == {}  # JAX reads SLURM itself
    assert args({"TPU_WORKER_HOSTNAMES": "a,b", "TPU_WORKER_ID": "0"}) == {}
    assert args({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    for env, named in (({"JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_NUM_PROCESSES"),
                       ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two",
                         "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES='two'"),
                       ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
                         "JAX_PROCESS_ID": "2"}, "below")):
        with pytest.raises(ConfigError, match=named):
            args(env)


@pytest.mark.slow
def test_two_processes_train_like_one_process_on_two_devices(tmp_path):
    """README's multi-host start, on localhost: two processes of one CPU device each, started
    with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, give the losses of one
    process on a mesh of two devices."""
    steps = ["train.steps=4", "train.checkpoint_every=0"]
    reference = train(tiny(tmp_path / "one", *steps), devices=jax.devices()[:2])
    assert reference["status"] == "completed"
    argv = [sys.executable, "-m", "bitnet_jax.cli", "train", f"out_dir={tmp_path / 'two'}",
            *TINY, *steps]
    finished = run_processes(argv, 2, tmp_path / "logs", timeout_s=400)
    for index, result in enumerate(finished):
        assert result.returncode == 0, (index, result.stderr[-3000:])
    two = losses(tmp_path / "two" / "run")
    # The same program, partitioned for one device per process instead of two in one: XLA sums
    # some reductions in another order across processes (measured: at most 1.8e-5 relative over
    # the 4 steps, since the activations carry their sharding constraints).
    np.testing.assert_allclose(two, losses(tmp_path / "one" / "run"), rtol=1e-4)
    assert json.loads((tmp_path / "two" / "run" / "meta.json").read_text())["process_count"] == 2
