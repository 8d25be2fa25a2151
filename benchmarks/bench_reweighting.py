"""The reporter's reweighting check: a long CG run with the BackmapReporter, reweighted to the AA ensemble.

    python benchmarks/bench_reweighting.py --demo demo/ --reference data/ala2.dcd --topology data/ala2.pdb \
        --steps 200000 --interval 1000 --samples 4 --out reweighting/

Uses the models and mapping of an ``openmm-backmap demo`` output directory; the reference should be
AA runs independent of the demo's training data (e.g. ``openmm-backmap reference ala2 --ns 200 --seed 3``;
several files are pooled).
Prints the basin populations (reference, raw, reweighted with block errors, dF in kT) and the ESS.
"""

import argparse
import json
from pathlib import Path

import numpy as np

from openmm_backmap.analysis.evaluate import evaluate_run
from openmm_backmap.demo import run_cg_simulation
from openmm_backmap.io.trajectories import load_trajectory
from openmm_backmap.mapping import CGMapping

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--demo", required=True, help="output directory of openmm-backmap demo")
parser.add_argument("--reference", required=True, nargs="+", help="AA reference trajectories (pooled)")
parser.add_argument("--topology", required=True)
parser.add_argument("--steps", type=int, default=200_000)
parser.add_argument("--interval", type=int, default=1000)
parser.add_argument("--samples", type=int, default=4)
parser.add_argument("--seed", type=int, default=7)
parser.add_argument("--out", required=True)
args = parser.parse_args()

demo, out = Path(args.demo), Path(args.out)
parts = [load_trajectory(path, args.topology) for path in args.reference]
ref = parts[0].join(parts[1:]) if len(parts) > 1 else parts[0]
mapping = CGMapping.from_json(demo / "mapping.json", ref.topology)
start = mapping.project(ref.xyz[0].astype(np.float64))
run = run_cg_simulation(
    demo / "models" / "cg.pt",
    demo / "models" / "backmapper.pt",
    mapping,
    start,
    out / "run",
    args.steps,
    args.interval,
    args.samples,
    seed=args.seed,
)
report = evaluate_run(out / "run" / "aa.dcd", out / "run" / "weights.csv", ref.topology, ref, out / "report")
report["wall_s"] = run.wall
print(json.dumps(report, indent=1))
