"""A plain OpenMM CG simulation of alanine dipeptide with a BackmapReporter added.

    python examples/cg_simulation_with_reporter.py --backmapper models/backmapper.pt \
        --cg-model models/cg.pt --mapping mapping.json --start reference/ala2.pdb --steps 100000

The CG potential is a trained TorchScript model bound into the System as a force (give the compiled
``models/cg.pt2`` of ``openmm-backmap compile`` for a much cheaper step: benchmarks/RESULTS.md); the reporter
line is the only thing a CG script needs to get all-atom frames and their reweighting energies.
"""

import argparse

import mdtraj as md
import openmm
from openmm import app, unit

from openmm_backmap import BackmapReporter, CGMapping, create_cg_system

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--backmapper", required=True)
parser.add_argument("--cg-model", required=True)
parser.add_argument("--mapping", required=True, help="groups JSON (or a preset name)")
parser.add_argument("--start", required=True, help="all-atom PDB whose projection starts the CG run")
parser.add_argument("--steps", type=int, default=100_000)
parser.add_argument("--out", default="aa.dcd")
args = parser.parse_args()

aa = md.load(args.start)
mapping = CGMapping.from_spec(args.mapping, aa.topology)
system = create_cg_system(mapping.masses(), args.cg_model)  # native plugin, openmm-torch or PythonForce
# 1 fs and 10/ps: learned CG bonds are as stiff as covalent bonds (benchmarks/RESULTS.md, CG potential)
integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 10 / unit.picosecond, 1 * unit.femtoseconds)
# Reference: for a handful of particles the CPU platform's threading costs more (benchmarks/RESULTS.md, Forces)
simulation = app.Simulation(
    mapping.cg_topology.to_openmm(), system, integrator, openmm.Platform.getPlatformByName("Reference")
)
simulation.context.setPositions(mapping.project(aa.xyz[0].astype(float)))
simulation.context.setVelocitiesToTemperature(300 * unit.kelvin)

simulation.reporters.append(app.StateDataReporter("cg_log.csv", 1000, step=True, potentialEnergy=True, speed=True))
simulation.reporters.append(
    BackmapReporter(args.out, 1000, model=args.backmapper, samplesPerFrame=4, energyFile="weights.csv")
)

simulation.step(args.steps)
for reporter in simulation.reporters:
    if hasattr(reporter, "close"):
        reporter.close()
print(f"wrote {args.out} and weights.csv; reweight with examples/reweight_observable.py")
