"""openmm-backmap: atoms back from coarse-grained OpenMM simulations with conditional normalizing flows."""

__version__ = "0.1.0"

from openmm_backmap.mapping import CGMapping  # noqa: E402

_LAZY = {
    "BackmapReporter": "openmm_backmap.openmm.reporter",
    "load_model": "openmm_backmap.io.backmap_model",
    "create_force": "openmm_backmap.openmm.forces",
    "create_cg_system": "openmm_backmap.openmm.forces",
    "ResolutionMove": "openmm_backmap.sampling.hybrid",
    "reweight": "openmm_backmap.analysis.reweighting",
}

__all__ = ["CGMapping", "__version__", *_LAZY]


def __getattr__(name):
    # the OpenMM-facing pieces import torch and OpenMM: load them on first use
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'openmm_backmap' has no attribute {name!r}")
