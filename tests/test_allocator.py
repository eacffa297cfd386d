"""The host allocator a `bitnet` process starts again with (bitnet_jax/allocator.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bitnet_jax import allocator, cli
from bitnet_jax.errors import ConfigError


def _mapped_library(name: str) -> str:
    """The path of a shared library this process has loaded (libc: preloading it is a no-op)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if Path(path).name.startswith(name):
            return path
    raise AssertionError(f"{name} not mapped")


def _run(arguments, env_changes):
    """`python arguments...` in this environment less any LD_PRELOAD, plus `env_changes`."""
    env = {name: value for name, value in os.environ.items() if name != "LD_PRELOAD"}
    return subprocess.run([sys.executable, *arguments], env={**env, **env_changes},
                          capture_output=True, text=True, timeout=120)


RESTART_AND_REPORT = (
    "from bitnet_jax.allocator import restart_with_preferred_allocator as restart\n"
    "restart(['-c', 'import os, json; from bitnet_jax.allocator import active_allocator; "
    "print(json.dumps([os.environ.get(\"LD_PRELOAD\"), active_allocator(), "
    "os.environ.get(\"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD\")]))'])\n"
    "print('not restarted')\n")


def test_find_tcmalloc_prefers_the_minimal_build_and_reports_none_when_absent():
    found = {"tcmalloc_minimal": "libtcmalloc_minimal.so.4", "tcmalloc": "libtcmalloc.so.4"}
    assert allocator.find_tcmalloc(found.get) == "libtcmalloc_minimal.so.4"
    assert allocator.find_tcmalloc({"tcmalloc": "libtcmalloc.so.4"}.get) == "libtcmalloc.so.4"
    assert allocator.find_tcmalloc({}.get) is None


@pytest.mark.parametrize("environ, installed, expected", [
    ({}, "libtcmalloc_minimal.so.4", "libtcmalloc_minimal.so.4"),  # the default
    ({"BITNET_JAX_MALLOC": "tcmalloc"}, "libtcmalloc_minimal.so.4", "libtcmalloc_minimal.so.4"),
    ({}, None, None),  # not installed: glibc's malloc, no error
    ({"BITNET_JAX_MALLOC": "system"}, "libtcmalloc_minimal.so.4", None),
    ({"BITNET_JAX_MALLOC": ""}, "libtcmalloc_minimal.so.4", None),
])
def test_library_to_preload_follows_the_setting(environ, installed, expected):
    assert allocator.library_to_preload(environ, lambda: installed) == expected


def test_a_library_path_is_preloaded_and_a_missing_one_is_a_config_error(tmp_path):
    library = tmp_path / "libjemalloc.so.2"
    library.write_bytes(b"\x7fELF" + bytes(60))
    assert allocator.library_to_preload({"BITNET_JAX_MALLOC": str(library)}) == str(library)
    with pytest.raises(ConfigError, match="BITNET_JAX_MALLOC=.*no such library"):
        allocator.library_to_preload({"BITNET_JAX_MALLOC": str(tmp_path / "missing.so")})
    text = tmp_path / "notes.txt"
    text.write_text("not a library")
    with pytest.raises(ConfigError, match="BITNET_JAX_MALLOC=.*notes.txt: not a shared library"):
        allocator.library_to_preload({"BITNET_JAX_MALLOC": str(text)})


def test_an_unreadable_library_is_a_config_error(tmp_path, monkeypatch):
    library = tmp_path / "libtcmalloc.so"
    library.write_bytes(b"\x7fELF")

    def refuse(*args, **kwargs):  # root reads any file, so the refusal is simulated
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("builtins.open", refuse)
    with pytest.raises(ConfigError, match="cannot read it \\(Permission denied\\)"):
        allocator.library_to_preload({"BITNET_JAX_MALLOC": str(library)})


def test_preload_environment_puts_the_library_first_and_never_twice(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    tcmalloc = lambda: "libtcmalloc_minimal.so.4"  # noqa: E731
    env = allocator.preload_environment({"PATH": "/bin", "LD_PRELOAD": "libother.so"}, tcmalloc)
    assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4:libother.so"
    assert env["PATH"] == "/bin"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40
    # The started-again process finds it preloaded (colon- or space-separated): no loop.
    assert allocator.preload_environment(env, tcmalloc) is None
    assert allocator.preload_environment(
        {"LD_PRELOAD": "libother.so libtcmalloc_minimal.so.4"}, tcmalloc) is None
    assert allocator.preload_environment(  # preloaded by path, found by soname
        {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"}, tcmalloc) is None
    # A user's own report threshold is kept.
    kept = allocator.preload_environment({"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "5"}, tcmalloc)
    assert kept["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == "5"
    assert allocator.preload_environment({}, lambda: None) is None
    monkeypatch.setattr(sys, "platform", "darwin")
    assert allocator.preload_environment({}, tcmalloc) is None


def test_active_allocator_reads_the_mapped_libraries(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert allocator.active_allocator(str(maps)) == "system"
    maps.write_text(maps.read_text()
                    + "7f02-7f03 r-xp 0 08:01 2 /usr/lib/libtcmalloc_minimal.so.4.5.10\n")
    assert allocator.active_allocator(str(maps)) == "tcmalloc"
    assert allocator.active_allocator(str(tmp_path / "absent")) == "unknown"


def test_the_process_starts_again_with_the_library_preloaded():
    libc = _mapped_library("libc.so")
    done = _run(["-c", RESTART_AND_REPORT], {"BITNET_JAX_MALLOC": libc})
    assert done.returncode == 0, done.stderr
    preload, _, _ = json.loads(done.stdout)
    assert preload == libc  # and "not restarted" was never printed
    kept = _run(["-c", RESTART_AND_REPORT], {"BITNET_JAX_MALLOC": "system"})
    assert kept.stdout.strip() == "not restarted"


@pytest.mark.skipif(allocator.find_tcmalloc() is None, reason="tcmalloc is not installed here "
                    "(Debian/Ubuntu: apt-get install libtcmalloc-minimal4; .ci/run installs it)")
def test_an_installed_tcmalloc_is_what_the_restarted_process_runs_on():
    done = _run(["-c", RESTART_AND_REPORT], {})
    assert done.returncode == 0, done.stderr
    preload, active, threshold = json.loads(done.stdout)
    assert preload == allocator.find_tcmalloc() and active == "tcmalloc"
    assert threshold == str(1 << 40)


def test_the_command_restarts_itself_with_its_own_arguments(monkeypatch):
    calls = []

    def fake_execve(path, argv, env):
        calls.append((path, argv, env))
        raise SystemExit(0)  # execve never returns

    monkeypatch.setattr(allocator.os, "execve", fake_execve)
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "libtcmalloc_minimal.so.4")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("BITNET_JAX_MALLOC", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(sys, "argv", ["/venv/bin/bitnet", "info", "--list"])
    with pytest.raises(SystemExit):
        cli.main()
    (path, argv, env), = calls
    assert argv == [sys.executable, *allocator.interpreter_options(), "-m", "bitnet_jax.cli",
                    "info", "--list"]
    assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4"
    calls.clear()
    assert cli.main(["info", "--list"]) == 0  # called from Python: never restarts
    assert calls == []


def test_the_interpreter_options_carry_over():
    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    code = "from bitnet_jax.allocator import interpreter_options; print(interpreter_options())"
    options = subprocess.run([sys.executable, "-u", "-X", "dev", "-W", "ignore", "-c", code],
                             env=env, capture_output=True, text=True, timeout=60).stdout
    assert all(option in options for option in ("'-u'", "'dev'", "'-Wignore'")), options
    plain = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, timeout=60).stdout
    assert "'-u'" not in plain


def test_a_bad_setting_is_one_error_line_and_exit_2(tmp_path):
    done = _run(["-m", "bitnet_jax.cli", "info", "--list"],
                {"BITNET_JAX_MALLOC": str(tmp_path / "nope.so")})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: BITNET_JAX_MALLOC={tmp_path / 'nope.so'}: no such library; give the path of a "
        f"malloc library (.so), 'tcmalloc' or 'system'"]
