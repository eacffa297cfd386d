"""Files read and written for people: every failure becomes one line naming the file and the fix.

The readers turn OS errors (missing, unreadable, a directory), decode errors (binary or non-UTF-8
bytes) and parse errors (JSON, JSONL with the line number, safetensors) into a `ConfigError` that
names the file; the checks on outputs refuse, before any compute, a directory that cannot be
written and an `--overwrite` that would delete its own input. A leaf module (only the standard
library and `errors`), so config, data, train, scaling, interop and the CLI can all use it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, TypeVar

from bitnet_jax.errors import ConfigError

T = TypeVar("T")

# Bytes that never occur in text: NUL and the C0 controls other than tab, newline, form feed,
# carriage return and escape. A file holding them is binary (an executable, an archive, ...).
_BINARY_BYTES = frozenset(range(0, 32)) - {9, 10, 12, 13, 27}
_SNIFF_BYTES = 8192


def os_error_line(path: Path | str, error: OSError) -> str:
    """`{path}: No such file or directory` and the like, without the errno noise."""
    return f"{path}: {error.strerror or error}"


def read_bytes(path: Path | str, what: str = "file") -> bytes:
    path = Path(path)
    try:
        return path.read_bytes()
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a directory; pass a file") from None
    except OSError as error:
        raise ConfigError(f"{what} {os_error_line(path, error)}; check the path and its "
                          f"permissions") from None


def looks_binary(data: bytes) -> bool:
    """True when the first bytes hold a NUL or a control byte no text file has."""
    head = data[:_SNIFF_BYTES]
    return any(b in _BINARY_BYTES for b in head)


def read_text(path: Path | str, what: str = "file") -> str:
    """A UTF-8 text file; a binary or non-UTF-8 file is refused with the offending line."""
    path = Path(path)
    data = read_bytes(path, what)
    if looks_binary(data):
        raise ConfigError(f"{what} {path} is binary, not text (e.g. an executable or archive "
                          f"renamed); pass a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise ConfigError(f"{what} {path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x} "
                          f"at offset {error.start}); convert the file to UTF-8") from None


def read_json(path: Path | str, what: str = "JSON file") -> Any:
    path = Path(path)
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{what} {path}:{error.lineno}: not valid JSON ({error.msg}); "
                          f"repair or remove the file") from None


def read_json_object(path: Path | str, what: str = "JSON file") -> dict:
    value = read_json(path, what)
    if not isinstance(value, dict):
        raise ConfigError(f"{what} {path}: expected a JSON object, got {type(value).__name__}; "
                          f"repair or remove the file")
    return value


def read_jsonl(path: Path | str, what: str = "JSONL file", torn_tail_ok: bool = False
               ) -> list[dict]:
    """One JSON object per non-empty line. With `torn_tail_ok`, a last line cut short (a process
    killed mid-write) is dropped instead of refused: everything before it is whole."""
    path = Path(path)
    lines = read_text(path, what).splitlines()
    records = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if torn_tail_ok and index == last:
                break
            raise ConfigError(f"{what} {path}:{index + 1}: not valid JSON ({error.msg}); "
                              f"repair or remove that line") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{what} {path}:{index + 1}: expected a JSON object, got "
                              f"{type(record).__name__}")
        records.append(record)
    return records


def read_with(path: Path | str, reader: Callable[[str], T], what: str, fix: str,
              errors: tuple[type[BaseException], ...] = (Exception,)) -> T:
    """`reader(str(path))` for a library's own format (safetensors, parquet, ...): a missing file,
    or anything the library raises while parsing it, becomes one line naming the file and `fix`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist or is not a file; check the path")
    try:
        return reader(str(path))
    except errors as error:  # noqa: BLE001 - libraries raise their own types for bad files
        raise ConfigError(f"{what} {path} cannot be read ({short_error(error)}); {fix}") from None


def short_error(error: BaseException, limit: int = 240) -> str:
    """The first line of an exception's message, without a library's spec dump, cut short."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = text.split(" [tensorstore_spec=")[0]
    if isinstance(error, OSError) and error.strerror:
        text = error.strerror + (f": {error.filename}" if error.filename else "")
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ----------------------------------------------------------------------------------------------
# Outputs.

def require_writable_dir(path: Path | str, what: str = "output directory") -> Path:
    """Create `path` (and parents) if needed and prove it writable by writing a file there.

    A probe write, not `os.access`: it is what the run will do, and it fails on a read-only or
    full file system even for root (for whom permission bits do not count)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file; pass a directory (or move the file away)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as error:
        raise ConfigError(f"{what} {os_error_line(path, error)}; choose a writable directory "
                          f"(or fix its permissions / free space)") from None
    return path


def _contains(outer: Path, inner: Path) -> bool:
    return inner == outer or outer in inner.parents


def require_apart(out_dir: Path | str, sources: Iterable[Optional[Path | str]],
                  flag: str = "--overwrite") -> None:
    """Refuse an output directory that is, contains or is inside one of `sources`: replacing it
    (`flag`) would delete the input it is made from."""
    out = Path(out_dir).expanduser().resolve()
    for source in sources:
        if source is None:
            continue
        src = Path(source).expanduser().resolve()
        if _contains(out, src) or _contains(src, out):
            relation = ("is" if out == src else "contains" if _contains(out, src)
                        else "is inside")
            raise ConfigError(f"output {out} {relation} the input {src}; {flag} would delete "
                              f"the input: choose an output directory outside it")


def write_text_atomic(path: Path | str, text: str) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
