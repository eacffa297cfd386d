"""The CLI skips an installed libtpu on machines without TPU chips, and keeps everything else."""

import fnmatch

import pytest

from bitnet_jax import platforms


def probe(modules=(), files=()):
    """(has_module, has_files) of a machine with these modules and device files."""
    return (lambda name: name in modules,
            lambda pattern: any(fnmatch.fnmatch(f, pattern) for f in files))


@pytest.mark.parametrize("modules, files, expected", [
    ((), (), None),                                                       # no libtpu: untouched
    (("libtpu",), (), "cpu"),                                             # CPU machine
    (("libtpu",), ("/dev/accel0",), None),                                # TPU v4 VM
    (("libtpu",), ("/dev/vfio/0",), None),                                # TPU v5e/v6e VM
    (("libtpu", "jax_cuda12_plugin"), ("/dev/nvidia0",), "cuda,cpu"),     # GPU machine
    (("libtpu",), ("/dev/nvidia0",), "cpu"),                              # GPU without the plugin
], ids=["no-libtpu", "cpu", "tpu-v4", "tpu-vfio", "gpu", "gpu-no-plugin"])
def test_platforms_without_tpu(modules, files, expected):
    assert platforms.platforms_without_tpu(*probe(modules, files)) == expected


def test_an_explicit_choice_is_kept(monkeypatch):
    monkeypatch.setattr(platforms, "platforms_without_tpu", lambda *_: "cpu")
    environ = {"JAX_PLATFORMS": "tpu"}
    platforms.skip_absent_tpu(environ)
    assert environ == {"JAX_PLATFORMS": "tpu"}
    environ = {}
    platforms.skip_absent_tpu(environ)
    assert environ == {"JAX_PLATFORMS": "cpu"}
