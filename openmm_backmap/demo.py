"""The main job, ``openmm-backmap demo``: from nothing to a report, in one output directory.

Stages: all-atom reference MD of alanine dipeptide, the CG mapping and (x, X) pairs, and a summary
table. Each stage writes into ``out/`` and prints its wall time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

# The six-bead alanine dipeptide mapping of the quality benchmarks: C(ACE), N, CA, C, N(NME), CB.
ALA2_SIX_BEADS = ("ACE1-C", "ALA2-N", "ALA2-CA", "ALA2-C", "NME3-N", "ALA2-CB")


def ala2_six_bead_mapping(topology):
    """The six-atom slice mapping of alanine dipeptide used by the demo and the benchmarks."""
    from openmm_backmap.mapping import CGMapping, atom_label

    by_label = {atom_label(a): a.index for a in topology.atoms}
    missing = [lab for lab in ALA2_SIX_BEADS if lab not in by_label]
    if missing:
        raise ValueError(f"the topology lacks the atoms {missing} of the six-bead ALA2 mapping")
    groups = [[by_label[lab]] for lab in ALA2_SIX_BEADS]
    return CGMapping(topology, groups, names=["C1", "N", "CA", "C", "N2", "CB"])


class _Stages:
    """Runs named stages, timing each, and collects a summary table."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, str]] = []

    def run(self, name: str, fn):
        print(f"\n== {name}", flush=True)
        start = time.perf_counter()
        result, note = fn()
        self.rows.append((name, time.perf_counter() - start, note))
        return result

    def table(self) -> str:
        width = max(len(r[0]) for r in self.rows)
        lines = [f"{'stage':<{width}}  {'seconds':>8}  result", "-" * (width + 40)]
        lines += [f"{n:<{width}}  {s:8.1f}  {note}" for n, s, note in self.rows]
        return "\n".join(lines)


def run_demo(out: Path, quick: bool = False, seed: int = 1) -> int:
    """Run every stage of the demo into ``out``; returns the process exit code."""
    from openmm_backmap.data import (
        backbone_dihedrals,
        basin_indicators,
        generate_reference,
        load_trajectory,
        make_pairs,
    )

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ns = 1.0 if quick else 10.0
    stages = _Stages()

    def reference():
        paths = generate_reference("ala2", ns, out / "reference", seed=seed)
        return paths, f"{ns:g} ns of alanine dipeptide at 300 K -> {paths['dcd']}"

    paths = stages.run("all-atom reference MD", reference)

    def pairs():
        traj = load_trajectory(paths["dcd"], paths["pdb"])
        mapping = ala2_six_bead_mapping(traj.topology)
        mapping.to_json(out / "mapping.json")
        mapping.cg_trajectory(traj).save_dcd(str(out / "reference" / "ala2_cg.dcd"))
        mapping.cg_trajectory(traj[0]).save_pdb(str(out / "reference" / "ala2_cg.pdb"))
        data = make_pairs(traj, mapping, seed=seed)
        phi, psi = backbone_dihedrals(traj)
        pops = {k: float(v.mean()) for k, v in basin_indicators(phi[:, 0], psi[:, 0]).items()}
        (out / "reference" / "basins.json").write_text(json.dumps(pops, indent=1) + "\n")
        sizes = ", ".join(f"{k} {len(v)}" for k, v in data.items())
        pop = ", ".join(f"{k} {v:.2f}" for k, v in pops.items())
        return data, f"{mapping.n_cg} beads; pairs: {sizes}; basins: {pop}"

    stages.run("mapping and (x, X) pairs", pairs)
    table = stages.table()
    (out / "summary.txt").write_text(table + "\n")
    print("\n" + table)
    print(f"\noutputs in {out.resolve()}")
    return 0
