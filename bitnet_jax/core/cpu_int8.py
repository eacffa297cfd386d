"""Exact int8 x int8 -> int32 matmul on x86 CPUs with AVX512-VNNI, as an XLA FFI custom call,
and the dequantize-and-transpose that the integer path's weight gradient needs.

XLA:CPU lowers an int8 `dot_general` with int32 accumulation to a kernel that is slower than
its bf16 dot.  `kernels/int8_matmul.cc` is a small VNNI (`vpdpbusd`) kernel; this module
compiles it with g++ on first use (cached under ``~/.cache/bitnet_jax/``, keyed by a hash of
the source, the compiler and its flags), registers it with XLA and exposes::

    available() -> bool
    int8_dot(x, w) -> int32      # x (..., K) int8, w (N, K) int8 ("out x in"), -> (..., N)
    dequantize_transpose(codes, scale) -> bf16   # (K, rows): X_q^T for the weight gradient

`int8_dot` is bit-identical to
``lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=int32)``.
Use it only when `available()` is True (CPU backend, AVX512-VNNI CPU, g++ present, build
succeeded); otherwise fall back to `lax.dot_general` -- `int8_dot_or_xla` does this for you.

Set ``BITNET_JAX_CPU_INT8=0`` to disable the kernel; ``BITNET_JAX_CACHE_DIR`` moves the cache.

Caveat: an FFI custom call is opaque to GSPMD.  Under `jit` with sharded operands XLA gathers
the operands and runs the full product on every device (correct, but not partitioned); wrap the
call in `shard_map` to keep the computation sharded.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp

_log = logging.getLogger(__name__)

TARGET_NAME = "bitnet_int8_dot"
_SYMBOL = "BitnetInt8Dot"
DEQUANTIZE_TRANSPOSE_TARGET = "bitnet_dequantize_transpose"
_DEQUANTIZE_TRANSPOSE_SYMBOL = "BitnetDequantizeTranspose"
_SOURCE = Path(__file__).with_name("kernels") / "int8_matmul.cc"
_ISA_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni")
_CXX_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w") + _ISA_FLAGS
_REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")

_lock = threading.Lock()
_status: bool | None = None  # None: not tried yet; then whether the kernel is registered
_reason = ""
_lib = None  # keeps the shared library loaded


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cache_dir() -> Path:
    env = os.environ.get("BITNET_JAX_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "bitnet_jax"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _build(cxx: str) -> Path:
    """Compiles the kernel (once per source/compiler/flags) and returns the .so path."""
    include = jax.ffi.include_dir()
    source = _SOURCE.read_bytes()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                             check=False).stdout.splitlines()[:1]
    key = hashlib.sha256()
    for part in (source, repr(_CXX_FLAGS).encode(), cxx.encode(), repr(version).encode(),
                 include.encode(), jax.__version__.encode()):
        key.update(part)
        key.update(b"\0")
    cache = _cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        if not os.access(cache, os.W_OK):
            raise OSError(f"{cache} is not writable")
    except OSError:
        cache = Path(tempfile.gettempdir()) / f"bitnet_jax-{os.getuid()}"
        cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"int8_matmul-{key.hexdigest()[:20]}.so"
    if target.exists():
        return target
    # Build into a private temporary name, then rename atomically: concurrent processes
    # (pytest-xdist, several launches) each build and the last rename wins harmlessly.
    fd, tmp = tempfile.mkstemp(prefix=".int8_matmul-", suffix=".so", dir=cache)
    os.close(fd)
    try:
        cmd = [cxx, *_CXX_FLAGS, f"-I{include}", str(_SOURCE), "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _try_init() -> tuple[bool, str]:
    if os.environ.get("BITNET_JAX_CPU_INT8", "1").lower() in ("0", "false", "no", "off"):
        return False, "disabled by BITNET_JAX_CPU_INT8"
    if jax.default_backend() != "cpu":
        return False, f"default backend is {jax.default_backend()!r}, not cpu"
    missing = [f for f in _REQUIRED_CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        return False, f"CPU lacks {', '.join(missing)}"
    cxx = _compiler()
    if cxx is None:
        return False, "no C++ compiler (g++) found"
    global _lib
    try:
        path = _build(cxx)
        _lib = ctypes.cdll.LoadLibrary(str(path))
        for target, symbol in ((TARGET_NAME, _SYMBOL),
                               (DEQUANTIZE_TRANSPOSE_TARGET, _DEQUANTIZE_TRANSPOSE_SYMBOL)):
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(_lib, symbol)),
                                        platform="cpu")
    except Exception as exc:  # noqa: BLE001 -- any failure means "fall back to XLA"
        _log.warning("bitnet_jax.core.cpu_int8: VNNI kernel unavailable, using XLA's int8 dot "
                     "(%s: %s)", type(exc).__name__, exc)
        return False, f"build/load failed: {exc}"
    return True, ""


def available() -> bool:
    """Whether `int8_dot` can be used here (builds and registers the kernel on first call)."""
    global _status, _reason
    if _status is None:
        with _lock:
            if _status is None:
                _status, _reason = _try_init()
    return _status


def shared_library():
    """The loaded kernel library (ctypes), for modules that register more of its entry points;
    None unless `available()`."""
    return _lib if available() else None


def unavailable_reason() -> str:
    """Why `available()` is False ("" when it is True)."""
    available()
    return _reason


@jax.custom_batching.custom_vmap
def _ffi_dot_2d(x2, w):
    m, n = x2.shape[0], w.shape[0]
    return jax.ffi.ffi_call(TARGET_NAME, jax.ShapeDtypeStruct((m, n), jnp.int32))(x2, w)


@_ffi_dot_2d.def_vmap
def _ffi_dot_2d_vmap(axis_size, in_batched, x, w):
    x_batched, w_batched = in_batched
    if not w_batched:  # shared weights: fold the batch into the rows
        if not x_batched:
            return _ffi_dot_2d(x, w), False
        b, m, k = x.shape
        return _ffi_dot_2d(x.reshape(b * m, k), w).reshape(b, m, w.shape[0]), True
    if not x_batched:
        x = jnp.broadcast_to(x, (axis_size, *x.shape))
    out = jax.lax.dot_general(x, w, (((2,), (2,)), ((0,), (0,))),
                              preferred_element_type=jnp.int32)
    return out, True


def int8_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (..., K) int8 @ w (N, K).T int8 -> (..., N) int32, exact.  Needs `available()`."""
    if x.dtype != jnp.int8 or w.dtype != jnp.int8:
        raise TypeError(f"int8_dot wants int8 operands, got {x.dtype} and {w.dtype}")
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"int8_dot: x {x.shape} and w {w.shape} (want x (..., K), w (N, K))")
    if not available():
        raise RuntimeError(f"bitnet_jax.core.cpu_int8 kernel unavailable: {_reason}")
    lead = x.shape[:-1]
    out = _ffi_dot_2d(x.reshape(-1, x.shape[-1]), w)
    return out.reshape(*lead, w.shape[0])


def int8_dot_or_xla(x: jax.Array, w: jax.Array) -> jax.Array:
    """`int8_dot` when available, else the same product through `lax.dot_general`."""
    if available():
        return int8_dot(x, w)
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=jnp.int32)


def _dequantize_transpose_xla(codes2, scale1):
    return (codes2.astype(jnp.float32) * scale1[:, None]).astype(jnp.bfloat16).T


@jax.custom_batching.custom_vmap
def _ffi_dequantize_transpose(codes2, scale1):
    m, k = codes2.shape
    return jax.ffi.ffi_call(DEQUANTIZE_TRANSPOSE_TARGET,
                            jax.ShapeDtypeStruct((k, m), jnp.bfloat16))(codes2, scale1)


@_ffi_dequantize_transpose.def_vmap
def _ffi_dequantize_transpose_vmap(axis_size, in_batched, codes, scale):
    codes_batched, scale_batched = in_batched
    if not codes_batched:
        codes = jnp.broadcast_to(codes, (axis_size, *codes.shape))
    if not scale_batched:
        scale = jnp.broadcast_to(scale, (axis_size, *scale.shape))
    return jax.vmap(_dequantize_transpose_xla)(codes, scale), True


def _rows_and_scales(codes: jax.Array, scale: jax.Array):
    lead = codes.shape[:-1]
    if scale.shape not in (lead, (*lead, 1)):
        raise ValueError(f"dequantize_transpose: codes {codes.shape} want one scale per row, "
                         f"shape {lead} or {(*lead, 1)}; got {scale.shape}")
    rows = math.prod(lead)
    return codes.reshape(rows, codes.shape[-1]), scale.reshape(rows)


def dequantize_transpose(codes: jax.Array, scale: jax.Array) -> jax.Array:
    """Per-row dequantization, transposed: codes (..., K) int8 and one float32 scale per row
    (shape (...) or (..., 1)) -> bfloat16 (K, rows), rows = prod(...).

    Bit-identical to ``(codes.astype(f32) * scale).astype(bf16).reshape(-1, K).T``: the
    operand the weight gradient X^T G wants. Needs `available()`.
    """
    if codes.dtype != jnp.int8 or scale.dtype != jnp.float32:
        raise TypeError(f"dequantize_transpose wants int8 codes and float32 scales, got "
                        f"{codes.dtype} and {scale.dtype}")
    if not available():
        raise RuntimeError(f"bitnet_jax.core.cpu_int8 kernel unavailable: {_reason}")
    return _ffi_dequantize_transpose(*_rows_and_scales(codes, scale))

