"""One C++ XLA FFI kernel library: compiled with the system C++ compiler on first use, cached,
loaded with ctypes and registered with XLA:CPU -- or, where any of that cannot happen, a reason
why not, so that callers fall back to XLA.

    lib = KernelLibrary("int8_matmul", sources=(...,), headers=(...,), cxx_flags=(...),
                        required_cpu_flags=("avx512f", ...), symbols={"target": "CSymbol"},
                        logger=_log, failure_message="...: kernel unavailable")
    lib.available() -> bool          # builds and registers on the first call, thread-safe
    lib.unavailable_reason() -> str  # "" when available

The .so is cached under ``~/.cache/bitnet_jax/`` (``$XDG_CACHE_HOME/bitnet_jax``,
``BITNET_JAX_CACHE_DIR`` moves it; a temporary directory when it is not writable), named by
the library and a hash of its sources, headers, flags, compiler and JAX, so an edited kernel
is rebuilt and never read stale. ``BITNET_JAX_CPU_INT8=0`` turns every library off; ``CXX``
picks the compiler (else g++, else c++).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax

DISABLE_ENV = "BITNET_JAX_CPU_INT8"  # historical name: it switches off every CPU kernel


@functools.cache  # read once: the routing asks per linear layer while tracing a step
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo names them (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cache_dir() -> Path:
    env = os.environ.get("BITNET_JAX_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "bitnet_jax"


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _writable_cache_dir() -> Path:
    cache = cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        if not os.access(cache, os.W_OK):
            raise OSError(f"{cache} is not writable")
    except OSError:
        cache = Path(tempfile.gettempdir()) / f"bitnet_jax-{os.getuid()}"
        cache.mkdir(parents=True, exist_ok=True)
    return cache


class KernelLibrary:
    """A kernel library built, loaded and registered lazily, once per process."""

    def __init__(self, name: str, *, sources: tuple[Path, ...], headers: tuple[Path, ...] = (),
                 cxx_flags: tuple[str, ...], required_cpu_flags: tuple[str, ...],
                 symbols: dict[str, str], logger: logging.Logger, failure_message: str):
        self.name = name
        self.sources = tuple(sources)
        self.headers = tuple(headers)
        self.cxx_flags = tuple(cxx_flags)
        self.required_cpu_flags = tuple(required_cpu_flags)
        self.symbols = dict(symbols)  # FFI target name -> C symbol
        self._logger = logger
        self._failure_message = failure_message
        self._lock = threading.Lock()
        self._status: bool | None = None  # None: not tried yet; then whether it is registered
        self._reason = ""
        self._lib = None  # keeps the shared library loaded

    def available(self) -> bool:
        """Whether the targets are registered here (builds and registers on the first call)."""
        if self._status is None:
            with self._lock:
                if self._status is None:
                    self._status, self._reason = self._try_init()
        return self._status

    def c_function(self, symbol: str):
        """The library's C function `symbol` (ctypes), for queries beside the FFI targets."""
        if not self.available():
            raise RuntimeError(f"{self.name} unavailable: {self.unavailable_reason()}")
        return getattr(self._lib, symbol)

    def unavailable_reason(self) -> str:
        """Why `available()` is False ("" when it is True)."""
        self.available()
        return self._reason

    def build(self, cxx: str) -> Path:
        """Compiles the library (once per sources/headers/compiler/flags) and returns the .so."""
        include = jax.ffi.include_dir()
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                                 check=False).stdout.splitlines()[:1]
        key = hashlib.sha256()
        for part in (*(f.read_bytes() for f in self.sources + self.headers),
                     repr(self.cxx_flags).encode(), cxx.encode(), repr(version).encode(),
                     include.encode(), jax.__version__.encode()):
            key.update(part)
            key.update(b"\0")
        cache = _writable_cache_dir()
        target = cache / f"{self.name}-{key.hexdigest()[:20]}.so"
        if target.exists():
            return target
        # Build into a private temporary name, then rename atomically: concurrent processes
        # (pytest-xdist, several launches) each build and the last rename wins harmlessly.
        fd, tmp = tempfile.mkstemp(prefix=f".{self.name}-", suffix=".so", dir=cache)
        os.close(fd)
        header_dirs = dict.fromkeys(str(h.parent) for h in self.headers)
        try:
            cmd = [cxx, *self.cxx_flags, f"-I{include}", *(f"-I{d}" for d in header_dirs),
                   *map(str, self.sources), "-o", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return target

    def _try_init(self) -> tuple[bool, str]:
        if os.environ.get(DISABLE_ENV, "1").lower() in ("0", "false", "no", "off"):
            return False, f"disabled by {DISABLE_ENV}"
        if jax.default_backend() != "cpu":
            return False, f"default backend is {jax.default_backend()!r}, not cpu"
        missing = [f for f in self.required_cpu_flags if f not in cpu_flags()]
        if missing:
            return False, f"CPU lacks {', '.join(missing)}"
        cxx = compiler()
        if cxx is None:
            return False, "no C++ compiler (g++) found"
        try:
            self._lib = ctypes.cdll.LoadLibrary(str(self.build(cxx)))
            for target, symbol in self.symbols.items():
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(self._lib, symbol)),
                                            platform="cpu")
        except Exception as exc:  # noqa: BLE001 -- any failure means "fall back to XLA"
            self._logger.warning("%s (%s: %s)", self._failure_message, type(exc).__name__, exc)
            return False, f"build/load failed: {exc}"
        return True, ""
