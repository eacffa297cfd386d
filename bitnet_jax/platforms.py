"""How a `bitnet` process starts: which JAX platforms (libtpu stays quiet where there is no TPU),
and on which malloc (`allocator.py`), in `prepare_process`.

With libtpu installed (the `tpu` extra, for AOT plans of TPU slices), every JAX start on a machine
without TPU chips tries the TPU backend first, printing libtpu's warnings and waiting on its
look-ups. Where no TPU device exists, the CLI asks JAX for the other platforms only; compiling
for a TPU topology ahead of time does not need the TPU backend (`train/aot.py`). An explicit
JAX_PLATFORMS is always kept.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
from typing import Callable, MutableMapping, Optional, Sequence

from bitnet_jax.allocator import restart_with_preferred_allocator
from bitnet_jax.errors import EXIT_USAGE, ConfigError

# Device files of TPU chips (v4 and later: /dev/accel*; v5e/v5p/v6e VMs: /dev/vfio/N).
TPU_DEVICE_GLOBS = ("/dev/accel*", "/dev/vfio/[0-9]*")
NVIDIA_DEVICE_GLOB = "/dev/nvidia[0-9]*"
CUDA_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin")


def platforms_without_tpu(has_module: Callable[[str], bool],
                          has_files: Callable[[str], bool]) -> Optional[str]:
    """The JAX_PLATFORMS value that skips an installed libtpu on a TPU-less machine, or None
    where nothing needs changing (no libtpu, or TPU chips present)."""
    if not has_module("libtpu") or any(has_files(p) for p in TPU_DEVICE_GLOBS):
        return None
    gpu = has_files(NVIDIA_DEVICE_GLOB) and any(has_module(p) for p in CUDA_PLUGINS)
    return "cuda,cpu" if gpu else "cpu"


def skip_absent_tpu(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set JAX_PLATFORMS (inherited by launched runs) unless the user set it."""
    if "JAX_PLATFORMS" in environ:
        return
    value = platforms_without_tpu(lambda name: importlib.util.find_spec(name) is not None,
                                  lambda pattern: bool(glob.glob(pattern)))
    if value is None:
        return
    environ["JAX_PLATFORMS"] = value
    if "jax" in sys.modules:  # already imported: its config read the environment then
        sys.modules["jax"].config.update("jax_platforms", value)


def prepare_process(arguments: Sequence[str]) -> None:
    """What a `bitnet` command or a benchmark does before JAX starts: keep an installed libtpu
    quiet where there is no TPU, then start again as `python arguments...` with tcmalloc
    preloaded where that is installed (`allocator.py`). A bad BITNET_JAX_MALLOC exits with
    one error line."""
    skip_absent_tpu()
    try:
        restart_with_preferred_allocator(arguments)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
