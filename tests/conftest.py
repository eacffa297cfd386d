"""Test set-up: 8 simulated CPU devices, so sharding tests run on any machine.

XLA reads the flag when the CPU backend starts, so it must be set before JAX is first used.
"""

import importlib.util
import os
import pathlib
import tempfile

os.environ["XLA_FLAGS"] = " ".join(
    flag for flag in [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
    if flag
)

# The tests run on the CPU wherever they run. Where libtpu is installed (the `tpu` extra, for the
# AOT plans), this also keeps it from starting, and printing its warnings, in every JAX process;
# TPU topologies for AOT compiles are still available (tests/test_aot.py).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu takes a machine-wide lock file when it loads; two xdist workers compiling for a TPU
# topology at once would otherwise fail on it (no chips are used, so sharing is safe).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# The tests compile the same small programs many times, in pytest-xdist workers and in CLI
# subprocesses: JAX's persistent cache (keyed by program, flags and versions) compiles each once.
# Set through the environment so that subprocesses share it.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "bitnet-jax-tests-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# The integer path's products take XLA's int8 dot instead of our kernels on CPUs with AMX-INT8
# (`cpu_int8.xla_int8_is_faster`); the tests keep the kernels on every machine, so that they
# exercise the same code everywhere (tests/test_cpu_int8.py covers the AMX choice).
os.environ.setdefault("BITNET_JAX_CPU_AMX", "0")

import jax  # noqa: E402  (after XLA_FLAGS on purpose)

# Float32 matmuls at full precision on every platform (GPUs default to TF32), so the numpy
# comparisons mean the same on a GPU host as on the CPU.
jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402

_SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="session")
def load_script():
    """`load_script(name)`: scripts/<name>.py imported as a module (the benchmarks are scripts,
    not a package; those that use `bench_train` put scripts/ on sys.path themselves)."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, _SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load


@pytest.fixture
def amx_tiles(monkeypatch):
    """`amx_tiles(on)` switches our kernels between AMX tiles and AVX-512 (they read the switch
    at every call) and clears JAX's traces (the routing is decided while tracing); skips where
    the CPU or the process has no tiles. Leaves the process as it found it: the switch, the
    cached CPU check and the traces."""
    from bitnet_jax.core import cpu_int8

    def use(amx: bool):
        monkeypatch.setenv(cpu_int8.AMX_ENV, "1" if amx else "0")
        jax.clear_caches()
        assert cpu_int8.kernel_uses_amx() == amx

    def restore():
        monkeypatch.undo()
        cpu_int8._has_amx_int8.cache_clear()
        jax.clear_caches()

    cpu_int8._has_amx_int8.cache_clear()
    monkeypatch.setenv(cpu_int8.AMX_ENV, "1")
    if not cpu_int8.kernel_uses_amx():  # built, tiles granted, not switched off
        restore()
        pytest.skip("this CPU (or this process) has no AMX tiles for our kernels")
    yield use
    restore()


@pytest.fixture
def bf16_kernels(request, monkeypatch):
    """Our backward's bf16 kernels where this CPU runs them with XLA's bits: on AMX tiles
    (switched on, through `amx_tiles`) where it has them, else on AVX512-BF16 vectors (CPUs
    without AMX); skips where neither. Returns `off()`, which takes them away again
    (`cpu_int8.bf16_products` None), for the tests of what happens then."""
    from bitnet_jax.core import cpu_int8
    from bitnet_jax.core.ffi_library import cpu_flags

    if "amx_int8" in cpu_flags():
        use = request.getfixturevalue("amx_tiles")
        use(True)
        return lambda: use(False)
    if cpu_int8.bf16_products() != "vectors":
        pytest.skip("this CPU has neither AMX tiles nor AVX512-BF16 for our bf16 kernels")

    def off():
        monkeypatch.setattr(cpu_int8, "bf16_products", lambda: None)
        jax.clear_caches()
    return off
