"""Reweight an observable computed on the BackmapReporter's AA trajectory to the AA Boltzmann ensemble.

    python examples/reweight_observable.py --trajectory aa.dcd --weights weights.csv --topology reference/ala2.pdb

Each AA sample carries log w = -beta U_AA + beta U_CG - log q; self-normalised weights turn averages
over the reconstructions into all-atom ensemble averages, and Kish's ESS says how many samples the
estimate is worth.
"""

import argparse

import mdtraj as md
import numpy as np

from openmm_backmap.analysis.basins import backbone_dihedrals, basin_indicators
from openmm_backmap.analysis.reweighting import reweight

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--trajectory", required=True)
parser.add_argument("--weights", required=True)
parser.add_argument("--topology", required=True)
args = parser.parse_args()

traj = md.load(args.trajectory, top=args.topology)
rw = reweight(args.weights)
print(f"{rw.n} samples, ESS {rw.ess:.1f} ({rw.ess_fraction:.1%})")

# an observable per sample: the end-to-end distance C(ACE) - N(NME), in nm
ends = [
    [a.index for a in traj.topology.atoms if a.residue.index == 0 and a.name == "C"][0],
    [a.index for a in traj.topology.atoms if a.residue.index == traj.topology.n_residues - 1 and a.name == "N"][0],
]
distance = md.compute_distances(traj, [ends])[:, 0]
print(f"end-to-end distance: raw {distance.mean():.4f} nm, reweighted {rw.average(distance):.4f} nm")

phi, psi = backbone_dihedrals(traj)
for name, indicator in basin_indicators(phi[:, 0], psi[:, 0]).items():
    print(f"{name:8s} raw {indicator.mean():.3f}  reweighted {rw.average(indicator.astype(float)):.3f}")

density, edges = rw.histogram(distance, bins=40)
print("reweighted density of the distance (first bins):", np.round(density[:5], 3))
