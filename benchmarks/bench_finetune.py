"""Fine-tuning a protein model on one held-out protein from its CG frames alone.

For each held-out corpus entry (topology.pdb, traj.dcd, system.xml; sequences no training data
contain), the trajectory is split in time: the CG projections of the first ``--tune-frames``
frames drive ``finetune`` (its last fifth held out for model selection), and the remaining frames
(never seen by the fine-tuning) score the model before and after with the metrics of
``bench_proteins.py`` (bond score, clashes, chirality, cis non-Pro, median U_AA per residue against
the reference frames' median, conditional ESS with 64 samples per frame).

Run: ``python benchmarks/bench_finetune.py --model protein-ca --heldout DIR [--only ho01] [--steps 600]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import mdtraj as md
import numpy as np
import torch

from openmm_backmap.training.config import ProteinFinetuning
from openmm_backmap.training.finetune import finetune
from openmm_backmap.training.protein import chain_permutation, corpus_ids, load_peptide

_spec = importlib.util.spec_from_file_location("bench_proteins", Path(__file__).with_name("bench_proteins.py"))
bench_proteins = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_proteins)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="protein-ca", help="pretrained name or file")
    parser.add_argument("--heldout", required=True, help="directory of held-out corpus entries")
    parser.add_argument("--only", nargs="*", default=None, help="entry ids to run (default all)")
    parser.add_argument("--tune-frames", type=int, default=60, help="first frames used by finetune")
    parser.add_argument("--eval-frames", type=int, default=50, help="later frames scored before and after")
    parser.add_argument("--ess-frames", type=int, default=10)
    parser.add_argument("--steps", type=int, default=ProteinFinetuning.steps)
    parser.add_argument("--lr", type=float, default=ProteinFinetuning.lr)
    parser.add_argument("--t-start", type=float, default=ProteinFinetuning.t_start)
    parser.add_argument("--pair-core-kt", type=float, default=ProteinFinetuning.pair_core_kt)
    parser.add_argument("--out", default=None, help="write the results as JSON here (and models beside it)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    heldout = Path(args.heldout)
    results = {"model": args.model, "steps": args.steps, "lr": args.lr, "t_start": args.t_start, "entries": {}}
    for pep in args.only or corpus_ids(heldout):
        d = heldout / pep
        names, x, meta = load_peptide(d)
        _, perm = chain_permutation(md.load_topology(str(d / "topology.pdb")))
        energy = bench_proteins._energy_function((d / "system.xml").read_text(), perm)
        kT = bench_proteins.KB * float(meta.get("temperature_K", 300.0))
        x_eval = x[args.tune_frames :][: args.eval_frames].astype(np.float64)
        model = bench_proteins._model(args.model)
        ch = model.for_sequence(names).float().eval()
        before = bench_proteins.quality(ch, x_eval, names, energy, kT, args.ess_frames)
        X_tune = ch.project(torch.as_tensor(x[: args.tune_frames])).numpy()
        out_model = (
            Path(args.out).with_name(f"{pep}_{Path(args.model).stem}.pt") if args.out else Path(f"/tmp/{pep}.pt")
        )
        t0 = time.time()
        summary = finetune(
            model,
            names,
            X_tune,
            out_model,
            ProteinFinetuning(steps=args.steps, lr=args.lr, t_start=args.t_start, pair_core_kt=args.pair_core_kt),
        )
        seconds = time.time() - t0
        ch = model.for_sequence(names).float().eval()
        after = bench_proteins.quality(ch, x_eval, names, energy, kT, args.ess_frames)
        results["entries"][pep] = {
            "sequence": "-".join(names),
            "tune_frames": args.tune_frames,
            "eval_frames": int(x_eval.shape[0]),
            "finetune_seconds": seconds,
            "best_step": summary["best_step"],
            "before": before,
            "after": after,
        }
        keys = (
            "bond_score",
            "clash_percent_residues",
            "chirality_errors",
            "cis_non_pro",
            "median_dU_per_residue",
            "conditional_ess",
        )
        print(pep, "-".join(names), f"{seconds:.0f} s, best step {summary['best_step']}", flush=True)
        for k in keys:
            print(f"  {k:24s} {before[k]:>12.4g} -> {after[k]:.4g}", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
