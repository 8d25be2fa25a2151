"""openmm-backmap: atoms back from coarse-grained OpenMM simulations with conditional normalizing flows.

The public names below load on first use, so that importing the torch-side code (``flows``,
``models``, ``geometry``) does not import mdtraj or OpenMM.  Where everything lives: ARCHITECTURE.md.
"""

__version__ = "0.1.0"

_LAZY = {
    "CGMapping": "openmm_backmap.mapping",
    "BackmapReporter": "openmm_backmap.openmm.reporter",
    "CGFlowMoves": "openmm_backmap.openmm.flow_moves",
    "load_model": "openmm_backmap.io.backmap_model",
    "create_force": "openmm_backmap.openmm.forces",
    "create_cg_system": "openmm_backmap.openmm.forces",
    "ResolutionMove": "openmm_backmap.sampling.hybrid",
    "reweight": "openmm_backmap.analysis.reweighting",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'openmm_backmap' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
