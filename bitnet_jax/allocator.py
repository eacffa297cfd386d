"""The host memory allocator a `bitnet` process runs with: tcmalloc where it is installed.

XLA:CPU takes each step's buffers from malloc. glibc's malloc serves allocations that large
with fresh mappings and gives them back to the kernel when freed, so every training step pays
again for zero-filled pages: on a 2-core Xeon, ladder-1.6m faulted in ~430 MiB and spent
~170 ms of system time per step, and the bf16 steps of ladder-1.6m to 20m ran 1.28-1.34x
faster with tcmalloc, which keeps freed memory for reuse (README, Training). A process
cannot change its allocator once started, so the CLI and the benchmarks start themselves again,
once, with the library in LD_PRELOAD (`platforms.prepare_process`), as axlearn and Intel's
`ipexrun` launcher do; the runs a sweep launches inherit it. The price is host memory: in 5 of 8
ladder-20m runs the resident memory grew once, from 2.3 to 3.7 GiB, by one more step's
temporaries (XLA:CPU's temp allocation, `memory_analysis().temp_size_in_bytes`), and stayed
(README).

BITNET_JAX_MALLOC chooses: unset or "tcmalloc" preloads libtcmalloc(_minimal) when the dynamic
linker finds it (Debian/Ubuntu: `apt-get install libtcmalloc-minimal4`) and keeps glibc's malloc
otherwise; "system" keeps glibc's malloc; a path preloads that library (jemalloc, or a tcmalloc
the linker does not find by itself).
"""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from bitnet_jax.errors import ConfigError

ENV = "BITNET_JAX_MALLOC"
TCMALLOC_NAMES = ("tcmalloc_minimal", "tcmalloc")  # gperftools' light and full builds
KNOWN_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")
# gperftools prints a stack for every allocation above 1 GiB by default (a model's weights or a
# big batch): quiet, unless the user set it.
TCMALLOC_REPORT = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


def find_tcmalloc(find_library: Callable[[str], Optional[str]] = ctypes.util.find_library
                  ) -> Optional[str]:
    """The soname of an installed tcmalloc (e.g. libtcmalloc_minimal.so.4), or None."""
    for name in TCMALLOC_NAMES:
        found = find_library(name)
        if found:
            return found
    return None


def library_to_preload(environ: Mapping[str, str],
                       find: Optional[Callable[[], Optional[str]]] = None) -> Optional[str]:
    """The allocator library BITNET_JAX_MALLOC asks for, or None for glibc's malloc (`find`
    looks for tcmalloc; default `find_tcmalloc`)."""
    choice = environ.get(ENV, "tcmalloc").strip()
    if choice in ("system", ""):
        return None
    if choice == "tcmalloc":
        return (find or find_tcmalloc)()
    if not Path(choice).is_file():
        raise ConfigError(f"{ENV}={choice}: no such library; give the path of a malloc "
                          f"library (.so), 'tcmalloc' or 'system'")
    try:
        with open(choice, "rb") as library:  # the dynamic linker would skip it on every start
            header = library.read(4)
    except OSError as error:
        raise ConfigError(f"{ENV}={choice}: cannot read it ({error.strerror})") from None
    if header != b"\x7fELF":
        raise ConfigError(f"{ENV}={choice}: not a shared library (no ELF header)")
    return choice


def preload_environment(environ: Mapping[str, str],
                        find: Optional[Callable[[], Optional[str]]] = None
                        ) -> Optional[dict[str, str]]:
    """The environment to start again with (`library` first in LD_PRELOAD, the rest kept), or
    None where nothing needs changing: glibc's malloc asked for, no tcmalloc installed, not
    Linux, or the library preloaded already (so a started-again process never loops)."""
    if not sys.platform.startswith("linux"):
        return None
    library = library_to_preload(environ, find)
    preloaded = environ.get("LD_PRELOAD", "").replace(":", " ").split()
    if library is None or Path(library).name in {Path(entry).name for entry in preloaded}:
        return None  # by file name: a path and a soname of one library count as the same
    quiet = TCMALLOC_REPORT if "tcmalloc" in Path(library).name else {}
    return {**quiet, **environ, "LD_PRELOAD": ":".join([library, *preloaded])}


def restart_with_preferred_allocator(arguments: Sequence[str]) -> None:
    """Replace this process by `python arguments...` with the allocator preloaded, where
    `preload_environment` says so; return (doing nothing) otherwise. Call it before any
    output and before JAX starts."""
    environment = preload_environment(os.environ)
    if environment is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *interpreter_options(), *arguments], environment)


def interpreter_options() -> list[str]:
    """This interpreter's own options (-X, -W, -O, ... as multiprocessing passes them on, and
    -u, which `sys.flags` does not record), so that the process started again behaves alike."""
    unbuffered = ["-u"] if getattr(sys.stdout, "write_through", False) else []
    # A private helper, but the standard library's one list of these (multiprocessing and
    # test.support use it); there is no public equivalent.
    return [*subprocess._args_from_interpreter_flags(), *unbuffered]


def active_allocator(maps_path: str = "/proc/self/maps") -> str:
    """Which malloc this process uses, from the libraries mapped into it: 'tcmalloc',
    'jemalloc', 'mimalloc' or 'system' (for benchmark records)."""
    try:
        mapped = Path(maps_path).read_text()
    except OSError:
        return "unknown"
    return next((name for name in KNOWN_ALLOCATORS if f"lib{name}" in mapped), "system")
