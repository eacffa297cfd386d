"""Any stored model by its directory: a run, a packed checkpoint or a Hugging Face export.

Above the three formats (each imports `run_dir` for `ModelBundle`), so none imports another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from bitnet_jax import run_files
from bitnet_jax.errors import ConfigError, require
from bitnet_jax.interop import hf, packed, packed_params, run_dir
from bitnet_jax.interop.run_dir import ModelBundle

__all__ = ["load_model"]


def load_model(path: str | Path, step: Optional[int] = None) -> ModelBundle:
    """The model in a run directory, a packed checkpoint (`bitnet pack`) or a Hugging Face
    BitNet directory (config.json + safetensors), told apart by the files they hold."""
    path = Path(path).expanduser()
    require(path.is_dir(), f"{path} is not a directory")
    if (path / run_files.CONFIG_FILE).is_file():
        return run_dir.load_run(path, step)
    if (path / packed.MANIFEST_FILE).is_file():
        return packed_params.load_packed(path)
    if (path / hf.CONFIG_FILE).is_file():
        return hf.load_hf(path)
    raise ConfigError(f"{path} holds no model: expected a run directory (config.yaml), a packed "
                      f"checkpoint (bitnet_packed.json) or a Hugging Face directory (config.json)")
