"""Flow building blocks: transforms (splines, couplings), networks, base densities."""

from openmm_backmap.flows.distributions import MixedBase
from openmm_backmap.flows.nn import MLP
from openmm_backmap.flows.transforms import CouplingFlow, CouplingLayer, rq_spline

__all__ = ["CouplingFlow", "CouplingLayer", "MLP", "MixedBase", "rq_spline"]
