"""KernelLibrary: an edited source or header is rebuilt (never a stale cached .so), the reasons
it gives for falling back, and one build however many threads ask at once."""

import ctypes
import logging
import threading

import jax
import pytest

from bitnet_jax.core import ffi_library
from bitnet_jax.core.ffi_library import KernelLibrary

needs_compiler = pytest.mark.skipif(ffi_library.compiler() is None, reason="no C++ compiler")
needs_cpu_backend = pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU targets")
_log = logging.getLogger("test_ffi_library")


def _library(tmp_path, monkeypatch, source: str, header: str = "", **kwargs) -> KernelLibrary:
    monkeypatch.setenv("BITNET_JAX_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "answer.h").write_text(header or "#define ANSWER_OFFSET 0\n")
    (tmp_path / "answer.cc").write_text(source)
    options = dict(cxx_flags=("-O0", "-shared", "-fPIC"), required_cpu_flags=(), symbols={},
                   logger=_log, failure_message="test library unavailable")
    options.update(kwargs)
    return KernelLibrary("answer", sources=(tmp_path / "answer.cc",),
                         headers=(tmp_path / "answer.h",), **options)


def _answer(path) -> int:
    return ctypes.CDLL(str(path)).bitnet_test_answer()


_SOURCE = ('#include "answer.h"\n'
           'extern "C" int bitnet_test_answer() {{ return {} + ANSWER_OFFSET; }}\n')


@needs_compiler
def test_edited_sources_and_headers_are_rebuilt_and_unchanged_ones_are_cached(tmp_path,
                                                                              monkeypatch):
    lib = _library(tmp_path, monkeypatch, _SOURCE.format(42))
    cxx = ffi_library.compiler()
    first = lib.build(cxx)
    assert first.parent == tmp_path / "cache" and _answer(first) == 42
    built_at = first.stat().st_mtime_ns
    assert lib.build(cxx) == first and first.stat().st_mtime_ns == built_at  # cached
    (tmp_path / "answer.cc").write_text(_SOURCE.format(43))
    second = lib.build(cxx)
    assert second != first and _answer(second) == 43
    (tmp_path / "answer.h").write_text("#define ANSWER_OFFSET 100\n")
    third = lib.build(cxx)
    assert third not in (first, second) and _answer(third) == 143


def test_the_environment_switch_and_missing_cpu_flags_are_reasons(tmp_path, monkeypatch):
    lib = _library(tmp_path, monkeypatch, _SOURCE.format(1))
    monkeypatch.setenv(ffi_library.DISABLE_ENV, "off")
    assert not lib.available()
    assert lib.unavailable_reason() == "disabled by BITNET_JAX_CPU_INT8"
    monkeypatch.delenv(ffi_library.DISABLE_ENV)
    lib = _library(tmp_path, monkeypatch, _SOURCE.format(1),
                   required_cpu_flags=("bitnet_no_such_flag",))
    assert not lib.available() and lib.unavailable_reason() == "CPU lacks bitnet_no_such_flag"


@needs_compiler
@needs_cpu_backend
def test_a_failed_build_is_logged_once_and_falls_back(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(ffi_library.DISABLE_ENV, raising=False)
    lib = _library(tmp_path, monkeypatch, "this is not C++\n")
    with caplog.at_level(logging.WARNING, logger=_log.name):
        assert not lib.available() and not lib.available()
    assert lib.unavailable_reason().startswith("build/load failed: ")
    [record] = caplog.records
    assert record.getMessage().startswith("test library unavailable (RuntimeError: ")
    assert list((tmp_path / "cache").iterdir()) == []  # no half-built .so left behind


@needs_compiler
@needs_cpu_backend
def test_a_built_library_is_available_and_built_once_across_threads(tmp_path, monkeypatch):
    monkeypatch.delenv(ffi_library.DISABLE_ENV, raising=False)
    lib = _library(tmp_path, monkeypatch, _SOURCE.format(7))
    builds = []
    real_build = lib.build
    monkeypatch.setattr(lib, "build", lambda cxx: builds.append(cxx) or real_build(cxx))
    results = []
    threads = [threading.Thread(target=lambda: results.append(lib.available())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 8 and len(builds) == 1 and lib.unavailable_reason() == ""
