"""openmm-backmap: atoms back from coarse-grained OpenMM simulations with conditional normalizing flows."""

__version__ = "0.1.0"

from openmm_backmap.mapping import CGMapping  # noqa: E402

__all__ = ["CGMapping", "__version__"]
