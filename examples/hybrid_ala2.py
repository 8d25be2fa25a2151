"""Hybrid CG-to-AA sampling of alanine dipeptide from Python: exact AA samples, CG-fast.

    python examples/hybrid_ala2.py --backmapper models/backmapper.pt --cg-model models/cg.pt \
        --start reference/ala2.pdb --iterations 2000

The resolution move is an openmmtools MCMCMove: compose it with any other move.
"""

import argparse

import openmm
from openmm import app, unit

from openmm_backmap._compat import import_openmmtools
from openmm_backmap.io.backmap_model import load_model
from openmm_backmap.io.model_files import load_cg_potential
from openmm_backmap.openmm.energies import load_system
from openmm_backmap.sampling.hybrid import CGFlowKernel, ResolutionMove

import_openmmtools()
from openmmtools import cache, mcmc, states  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--backmapper", required=True)
parser.add_argument("--cg-model", required=True)
parser.add_argument("--start", required=True)
parser.add_argument("--iterations", type=int, default=2000)
args = parser.parse_args()

backmapper = load_model(args.backmapper, device="cpu")
cg_flow, _ = load_cg_potential(args.cg_model)
system = load_system(backmapper.system_xml)  # the AA System embedded in the model file

resolution = ResolutionMove(backmapper, backmapper.mapping, CGFlowKernel(cg_flow), n_attempts=1, seed=1)
langevin = mcmc.LangevinDynamicsMove(timestep=2 * unit.femtoseconds, collision_rate=1 / unit.picosecond, n_steps=250)
move = mcmc.SequenceMove([langevin, resolution])

thermodynamic_state = states.ThermodynamicState(system, temperature=300 * unit.kelvin)
sampler_state = states.SamplerState(app.PDBFile(args.start).getPositions(asNumpy=True))
context_cache = cache.ContextCache(platform=openmm.Platform.getPlatformByName("Reference"))
for _ in range(args.iterations):
    move.apply(thermodynamic_state, sampler_state, context_cache)
print(f"resolution moves accepted: {resolution.stats.acceptance_rate:.1%} of {resolution.stats.n_proposed}")
