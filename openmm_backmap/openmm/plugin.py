"""Loading of the native plugin built from ``cpp/`` (``BackmapTorchForce``).

``cpp/build_plugin.py`` (run by ``pip install``) writes the kernel libraries and the SWIG module
into ``openmm_backmap/_plugin/``, or ``_plugin/BUILD_FAILED`` with the reason.  Importing this
module loads them once, so that ``openmm.XmlSerializer.deserialize`` can read Systems holding a
``BackmapTorchForce`` (the plugin registers its serialization proxy when it loads).  Loading never
raises: :func:`native_plugin_status` says why the plugin is unavailable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import openmm
import torch  # noqa: F401 - loaded first, so that the plugin libraries resolve libtorch

__all__ = ["PLUGIN_DIR", "load_native_plugin", "native_plugin_status"]

PLUGIN_DIR = Path(__file__).resolve().parent.parent / "_plugin"
_KERNEL_LIBRARIES = ("libBackmapPluginReference.so", "libBackmapPluginCUDA.so")


# (module or None, reason it is unavailable); filled by the first load_native_plugin() call.
_native_state: tuple[Any, str] | None = None


def load_native_plugin() -> Any:
    """Load the native plugin once and return its Python module (``backmapplugin``), or None.

    Loads the kernel libraries with ``openmm.Platform.loadPluginLibrary`` (after torch, so libtorch
    is resolvable), then imports the SWIG module.  When it fails, :func:`native_plugin_status` says
    why (including the reason recorded at build time in ``_plugin/BUILD_FAILED``).  Setting
    ``OPENMM_BACKMAP_DISABLE_NATIVE=1`` makes it report the plugin as unavailable.

    Importing this module calls it, so that ``XmlSerializer.deserialize`` can read Systems holding a
    ``BackmapTorchForce`` (the plugin registers its serialization proxy when it loads).
    """
    global _native_state
    if _native_state is not None:
        return _native_state[0]
    if os.environ.get("OPENMM_BACKMAP_DISABLE_NATIVE") == "1":
        _native_state = (None, "disabled by OPENMM_BACKMAP_DISABLE_NATIVE=1")
        return None
    failed = PLUGIN_DIR / "BUILD_FAILED"
    reference = PLUGIN_DIR / _KERNEL_LIBRARIES[0]
    if not reference.exists():
        if failed.exists():
            reason = "the build failed: " + failed.read_text().strip()
        else:
            reason = (
                f"not built ({reference} is missing): reinstall with `pip install --no-build-isolation .` "
                "or run `python cpp/build_plugin.py` in a source checkout"
            )
        _native_state = (None, reason)
        return None
    try:
        openmm.Platform.loadPluginLibrary(str(reference))
        from openmm_backmap._plugin import backmapplugin
    except Exception as error:  # noqa: BLE001 - a broken library must not break the other backends
        _native_state = (None, f"built but could not be loaded from {PLUGIN_DIR}: {error}")
        return None
    cuda = PLUGIN_DIR / _KERNEL_LIBRARIES[1]
    note = "loaded"
    if cuda.exists():
        try:
            openmm.Platform.loadPluginLibrary(str(cuda))
            note = "loaded (with CUDA kernels)"
        except Exception as error:  # noqa: BLE001 - no driver/GPU: the CPU kernels still work
            note = f"loaded; its CUDA kernels could not be loaded: {error}"
    _native_state = (backmapplugin, note)
    return backmapplugin


def native_plugin_status() -> tuple[bool, str]:
    """Whether the native plugin is usable, and why not (or what was loaded)."""
    module = load_native_plugin()
    assert _native_state is not None
    return module is not None, _native_state[1]


# Load (or note why not) at import: registers the kernels and the XML proxy.  Never raises.
load_native_plugin()
