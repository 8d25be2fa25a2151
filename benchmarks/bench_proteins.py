"""Speed and quality of the transferable protein backmapper.

Speed: sampling (with log q) and log_prob of a 20-residue peptide at a batch of 256 CG frames, with
1 and 2 torch threads, in residues per second (frames x residues / time): per second of wall time
(best of repeats) and per second of process CPU time, with the load average. Both for the
TorchScript module that ``backmap``, ``load_model`` and the reporter run and for the eager module.

Quality (``--heldout DIR``, a directory of corpus entries: topology.pdb, traj.dcd, system.xml):
one sample per CG frame, no minimisation, for each held-out peptide:

* bond score: fraction of bonds (hydrogens included) within 10% of their length in the reference
  frame the CG frame came from;
* clashes: % of residues with a heavy atom closer than 0.12 nm to a heavy atom of a residue that is
  not its sequence neighbour;
* chirality errors: chiral centres whose handedness differs from the reference frame's;
* cis non-proline peptide bonds: omega within 90 degrees of 0 before a non-proline residue;
* median U_AA (amber14 + GBn2, the corpus entry's system.xml) of the reconstructions minus that of
  the reference frames, per residue (kJ/mol);
* conditional ESS: for ``--ess-frames`` frames, 64 samples each, Kish ESS of
  exp(-U_AA / kT - log q) divided by 64, averaged over frames.

With ``--worst-pairs K``, per peptide the K atom pairs (names, residue offset) that most often carry
a sample's largest Lennard-Jones pair energy (the steric clash), with their median distance and energy:
where the energy of the reconstructions goes. With ``--terms K``, per peptide the median energy of
each force of the System (bonds, angles, torsions, non-bonded, GB) in the reconstructions minus that
in the reference frames, per residue, and the K kinds of bond (atom names, residue offset) whose
median harmonic energy exceeds the reference's most.

Run: ``python benchmarks/bench_proteins.py --model protein-ca [--heldout DIR] [--frames 100]
[--worst-pairs 5] [--terms 5]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from openmm_backmap.models import residues as R
from openmm_backmap.models.protein import ProteinBackmapper, load_pretrained
from openmm_backmap.training.protein import chain_permutation, corpus_ids, load_peptide

KB = 8.314462618e-3  # kJ/(mol K)
SPEED_SEQUENCE = [
    "MET",
    "LYS",
    "THR",
    "TRP",
    "ILE",
    "ASP",
    "GLY",
    "HIE",
    "SER",
    "PHE",
    "ARG",
    "VAL",
    "ASN",
    "LEU",
    "GLU",
    "TYR",
    "PRO",
    "CYS",
    "ALA",
    "GLN",
]


def _model(name: str) -> ProteinBackmapper:
    return ProteinBackmapper.load(name) if Path(name).is_file() else load_pretrained(name)


def _trace(n: int, rng: np.random.Generator) -> np.ndarray:
    """A C-alpha trace with 0.38 nm steps and 120 degree virtual angles (nm)."""
    x = np.zeros((n, 3))
    d = np.array([1.0, 0.0, 0.0])
    for i in range(1, n):
        v = rng.normal(size=3)
        v -= v.dot(d) * d
        v /= np.linalg.norm(v)
        d = math.cos(math.radians(60)) * d + math.sin(math.radians(60)) * v
        x[i] = x[i - 1] + 0.38 * d
    return x


def _time_calls(ch, cg: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """Wall and process CPU seconds of ``repeats`` calls of sample(cg, 1) and log_prob(aa, cg)."""
    times: dict[str, list[float]] = {"sample": [], "log_prob": [], "sample_cpu": [], "log_prob_cpu": []}
    with torch.inference_mode():
        aa, _ = ch.sample(cg[:8], 1)
        ch.log_prob(aa, cg[:8])
        aa, _ = ch.sample(cg, 1)  # warm-up at full size (TorchScript profiles its first calls)
        ch.log_prob(aa, cg)
        for _ in range(repeats):
            for kind in ("sample", "log_prob"):
                t, c = time.perf_counter(), time.process_time()
                if kind == "sample":
                    aa, _ = ch.sample(cg, 1)
                else:
                    ch.log_prob(aa, cg)
                times[kind].append(time.perf_counter() - t)
                times[kind + "_cpu"].append(time.process_time() - c)
    return times


def bench_speed(model: ProteinBackmapper, batch: int = 256, repeats: int = 5) -> dict:
    """Residues per second for sample(cg, 1) (with log q) and log_prob at ``batch`` frames, 1 and 2
    threads, for the TorchScript module that ``backmap``, ``load_model`` and the reporter run (the
    bound chain through ``torch.jit.script``, as ``chain_model_bytes`` writes it; keys
    ``..._script_...``) and for the eager module (keys ``..._eager_...``): per second of wall time
    (best of ``repeats``) and per second of process CPU time (which a loaded machine inflates less),
    with the 1-minute load average at the start."""
    names = SPEED_SEQUENCE
    ch = model.for_sequence(names).float().eval()
    modules = {"script": torch.jit.script(copy.deepcopy(ch)), "eager": ch}
    rng = np.random.default_rng(0)
    anchors = _trace(len(names), rng)
    if model.mapping == "ca":
        cg1 = anchors
    else:
        # N and C half-way towards the neighbouring C-alphas: a crude but well-formed backbone
        cg1 = []
        for i in range(len(names)):
            prev = anchors[i - 1] if i > 0 else 2 * anchors[i] - anchors[i + 1]
            nxt = anchors[i + 1] if i + 1 < len(names) else 2 * anchors[i] - anchors[i - 1]
            cg1 += [anchors[i] + 0.38 * (prev - anchors[i]), anchors[i], anchors[i] + 0.4 * (nxt - anchors[i])]
        cg1 = np.asarray(cg1)
    cg = torch.as_tensor(cg1, dtype=torch.float32).unsqueeze(0).repeat(batch, 1, 1)
    out = {"sequence_length": len(names), "batch": batch, "n_atoms": ch.n_aa, "load_average": os.getloadavg()[0]}
    res = batch * len(names)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for label, module in modules.items():
            times = _time_calls(module, cg, repeats)
            # wall time (best of the repeats: on a shared machine the others measure the neighbours),
            # and process CPU time per thread used
            for kind in ("sample", "log_prob"):
                out[f"{kind}_{label}_residues_per_s_{threads}t"] = res / min(times[kind])
                out[f"{kind}_{label}_residues_per_cpu_s_{threads}t"] = res / min(times[kind + "_cpu"])
            out[f"sample_{label}_structures_per_s_{threads}t"] = batch / min(times["sample"])
    return out


# ----------------------------------------------------------------------------- quality
def _omega(x: np.ndarray, chain: R.Chain) -> tuple[np.ndarray, np.ndarray]:
    """Omega dihedrals (rad) of every peptide bond (..., n_bonds) and whether the next residue is Pro."""
    quads, pro = [], []
    for r in range(chain.n_residues - 1):
        nxt = chain.names[r + 1]
        a = chain.anchor(r)
        b = chain.anchor(r + 1)
        quads.append([a, chain.atom(r, "C"), chain.atom(r + 1, "N"), b])
        pro.append(nxt == "PRO")
    q = np.asarray(quads)
    t = torch.as_tensor(x)
    from openmm_backmap.geometry import dihedrals

    om = dihedrals(t[..., q[:, 3], :], t[..., q[:, 2], :], t[..., q[:, 1], :], t[..., q[:, 0], :]).numpy()
    return om, np.asarray(pro)


def quality(
    ch,
    x_ref: np.ndarray,
    names: list[str],
    energy,
    kT: float,
    ess_frames: int,
    pair_energies=None,
    n_worst: int = 0,
    terms=None,
    n_bonds: int = 0,
) -> dict:
    """Metrics of one sample per frame of x_ref (N, n_atoms, 3) nm, chain order; with
    ``pair_energies`` (:func:`nonbonded_pairs`) and ``n_worst``, also the worst pairs of those
    samples; with ``terms`` (:func:`energy_terms`), the excess of each force and the ``n_bonds``
    kinds of bond with the largest excess (:func:`term_excess`)."""
    chain = ch.chain
    cg = torch.as_tensor(x_ref[:, ch.beads.numpy()], dtype=torch.float32)
    with torch.no_grad():
        aa, lq = ch.sample(cg, 1)
    aa = aa.double().numpy()
    bonds = np.asarray(chain.bonds)
    d_s = np.linalg.norm(aa[:, bonds[:, 0]] - aa[:, bonds[:, 1]], axis=-1)
    d_r = np.linalg.norm(x_ref[:, bonds[:, 0]] - x_ref[:, bonds[:, 1]], axis=-1)
    bond_score = float(np.mean(np.abs(d_s / d_r - 1.0) <= 0.1))
    heavy = np.asarray([e != "H" for e in chain.elements])
    hv = np.flatnonzero(heavy)
    res = chain.atom_residue[hv]
    far = np.abs(res[:, None] - res[None, :]) >= 2
    clash_res = np.zeros((aa.shape[0], chain.n_residues), dtype=bool)
    for f in range(aa.shape[0]):
        xh = aa[f][hv]
        dd = np.linalg.norm(xh[:, None] - xh[None, :], axis=-1)
        bad = (dd < 0.12) & far
        for i in np.unique(np.nonzero(bad)[0]):
            clash_res[f, res[i]] = True
    centres = R.chiral_centres(chain)
    chir = np.sign(R.signed_volumes(aa, centres)) != np.sign(R.signed_volumes(x_ref, centres))
    om, pro = _omega(aa, chain)
    cis = np.abs(om) < math.pi / 2
    u_s = energy(aa)
    u_r = energy(x_ref)
    out = {
        "n_frames": int(aa.shape[0]),
        "n_residues": chain.n_residues,
        "bond_score": bond_score,
        "clash_percent_residues": float(100 * clash_res.mean()),
        "chirality_errors": int(chir.sum()),
        "cis_non_pro": int(cis[:, ~pro].sum()),
        "median_U_sample": float(np.median(u_s)),
        "median_U_reference": float(np.median(u_r)),
        "median_dU_per_residue": float((np.median(u_s) - np.median(u_r)) / chain.n_residues),
        "mean_log_q": float(lq.mean()),
    }
    if pair_energies is not None and n_worst:
        out["worst_pairs"] = worst_pairs(chain, aa, pair_energies, n_worst)
    if terms is not None:
        out.update(term_excess(chain, aa, x_ref, terms, n_bonds))
    # conditional ESS with 64 samples per frame
    ess = []
    pick = np.linspace(0, x_ref.shape[0] - 1, ess_frames).astype(int)
    for f in pick:
        with torch.no_grad():
            s, lqs = ch.sample(cg[f : f + 1], 64)
        logw = -energy(s.double().numpy()) / kT - lqs.double().numpy()
        w = np.exp(logw - logw.max())
        ess.append(w.sum() ** 2 / (w**2).sum() / 64)
    out["conditional_ess"] = float(np.mean(ess))
    return out


def _chain_context(system, perm: np.ndarray):
    """A one-thread CPU Context of ``system`` and ``inv``, the chain index of each topology atom
    (chain atom a sits at topology index perm[a]), so that ``x[inv]`` puts chain-ordered positions
    in topology order."""
    import openmm

    ctx = openmm.Context(
        system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("CPU"), {"Threads": "1"}
    )
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size)
    return ctx, inv


def _energy_function(system_xml: str, perm: np.ndarray):
    """U(x) kJ/mol for positions (N, n_atoms, 3) nm in chain order, via an OpenMM Context."""
    import openmm
    from openmm import unit

    ctx, inv = _chain_context(openmm.XmlSerializer.deserialize(system_xml), perm)

    def energy(x: np.ndarray) -> np.ndarray:
        out = np.empty(x.shape[0])
        for n in range(x.shape[0]):
            ctx.setPositions(x[n][inv])
            out[n] = ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        return out

    return energy


def energy_terms(system_xml: str, perm: np.ndarray):
    """The energy of each force of the System apart: returns a function x (N, n_atoms, 3) nm in
    chain order -> {force class name: (N,) kJ/mol} (forces of one class summed), and the
    HarmonicBondForce's bonds as chain-index pairs (P, 2), lengths (P,) nm and constants (P,)
    kJ/mol/nm^2, so that bond energies can be split bond by bond."""
    import openmm
    from openmm import unit

    system = openmm.XmlSerializer.deserialize(system_xml)
    names = []
    for i, f in enumerate(system.getForces()):
        f.setForceGroup(i)
        names.append(type(f).__name__)
    ctx, inv = _chain_context(system, perm)
    bonds, r0, k = [], [], []
    for f in system.getForces():
        if isinstance(f, openmm.HarmonicBondForce):
            for b in range(f.getNumBonds()):
                i, j, length, const = f.getBondParameters(b)
                bonds.append((inv[i], inv[j]))
                r0.append(length.value_in_unit(unit.nanometer))
                k.append(const.value_in_unit(unit.kilojoule_per_mole / unit.nanometer**2))

    def by_force(x: np.ndarray) -> dict[str, np.ndarray]:
        out = {n: np.zeros(x.shape[0]) for n in names}
        for f in range(x.shape[0]):
            ctx.setPositions(x[f][inv])
            for g, n in enumerate(names):
                state = ctx.getState(getEnergy=True, groups={g})
                out[n][f] += state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        return out

    return by_force, (np.asarray(bonds, dtype=int).reshape(-1, 2), np.asarray(r0), np.asarray(k))


def term_excess(chain, aa: np.ndarray, x_ref: np.ndarray, terms, n_bonds: int) -> dict:
    """Per force, the median energy of samples aa minus that of reference frames x_ref, per residue
    (kJ/mol), and the ``n_bonds`` kinds of bond (atom names, residue offset) whose summed median
    harmonic energy exceeds the reference's most: count, excess per residue, and each bond's median
    energy averaged over the bonds of the kind, for samples and reference."""
    by_force, (bonds, r0, k) = terms
    u_s, u_r = by_force(aa), by_force(x_ref)
    n_res = chain.n_residues
    out = {"terms_dU_per_residue": {n: float((np.median(u_s[n]) - np.median(u_r[n])) / n_res) for n in u_s}}

    def bond_energy(x: np.ndarray) -> np.ndarray:  # (N, P)
        return 0.5 * k * (np.linalg.norm(x[:, bonds[:, 0]] - x[:, bonds[:, 1]], axis=-1) - r0) ** 2

    e_s, e_r = np.median(bond_energy(aa), axis=0), np.median(bond_energy(x_ref), axis=0)

    def label(a: int) -> str:  # backbone atoms alike in every residue, others with their residue
        name = chain.atom_names[a]
        return name if name in ("N", "CA", "C") else f"{chain.names[chain.atom_residue[a]]}:{name}"

    kinds: dict[tuple, list[int]] = {}
    for p, (a, b) in enumerate(bonds):
        off = int(chain.atom_residue[b]) - int(chain.atom_residue[a])
        kinds.setdefault((label(a), label(b), off), []).append(p)
    ranked = sorted(kinds.items(), key=lambda kv: -float(np.sum(e_s[kv[1]] - e_r[kv[1]])))[:n_bonds]
    out["worst_bonds"] = [
        {
            "bond": f"{a} - {b} (residue {off:+d})",
            "count": len(ps),
            "excess_per_residue": float(np.sum(e_s[ps] - e_r[ps]) / n_res),
            "bond_median_kjmol": float(np.mean(e_s[ps])),
            "bond_median_reference_kjmol": float(np.mean(e_r[ps])),
        }
        for (a, b, off), ps in ranked
    ]
    return out


COULOMB = 138.935456  # kJ/mol nm / e^2


def nonbonded_pairs(system_xml: str, perm: np.ndarray):
    """Per-pair Lennard-Jones and Coulomb energies (kJ/mol, no cutoff, exceptions as the
    NonbondedForce lists them, excluded pairs zero) of positions x (n_atoms, 3) nm in chain order:
    returns a function x -> (pairs (P, 2), LJ (P,), Coulomb (P,)); their sum over pairs is the
    NonbondedForce energy."""
    import openmm
    from openmm import unit

    system = openmm.XmlSerializer.deserialize(system_xml)
    nb = next(f for f in system.getForces() if isinstance(f, openmm.NonbondedForce))
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size)  # topology index -> chain index
    n = system.getNumParticles()
    q, sig, eps = np.zeros(n), np.zeros(n), np.zeros(n)
    for t in range(n):
        c, sg, ep = nb.getParticleParameters(t)
        a = inv[t]
        q[a] = c.value_in_unit(unit.elementary_charge)
        sig[a] = sg.value_in_unit(unit.nanometer)
        eps[a] = ep.value_in_unit(unit.kilojoule_per_mole)
    qq = q[:, None] * q[None, :]
    s = 0.5 * (sig[:, None] + sig[None, :])
    e = np.sqrt(eps[:, None] * eps[None, :])
    for k in range(nb.getNumExceptions()):
        i, j, c, sg, ep = nb.getExceptionParameters(k)
        a, b = inv[i], inv[j]
        qq[a, b] = qq[b, a] = c.value_in_unit(unit.elementary_charge**2)
        s[a, b] = s[b, a] = sg.value_in_unit(unit.nanometer)
        e[a, b] = e[b, a] = ep.value_in_unit(unit.kilojoule_per_mole)
    iu = np.triu_indices(n, 1)
    qq, s, e = qq[iu], s[iu], e[iu]
    pairs = np.stack(iu, axis=1)

    def pair_energies(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        r = np.linalg.norm(x[iu[0]] - x[iu[1]], axis=-1).clip(1e-4)
        sr6 = (s / r) ** 6
        return pairs, 4.0 * e * (sr6 * sr6 - sr6), COULOMB * qq / r

    return pair_energies


def worst_pairs(chain, aa: np.ndarray, pair_energies, k: int) -> list[dict]:
    """The atom pairs (residue:atom names and residue offset) that most often carry a sample's
    largest Lennard-Jones pair energy (the steric clash; Coulomb pairs in vacuum are large and
    mostly screened by the GB term), over samples aa (N, n_atoms, 3): the k most frequent, with how
    often, their median distance (nm) and median LJ energy (kJ/mol)."""
    seen: dict[tuple, list[tuple[float, float]]] = {}
    for x in aa:
        pairs, u, _ = pair_energies(x)
        m = int(np.argmax(u))
        a, b = (int(v) for v in pairs[m])
        ra, rb = int(chain.atom_residue[a]), int(chain.atom_residue[b])
        key = (f"{chain.names[ra]}:{chain.atom_names[a]}", f"{chain.names[rb]}:{chain.atom_names[b]}", rb - ra)
        seen.setdefault(key, []).append((float(np.linalg.norm(x[a] - x[b])), float(u[m])))
    top = sorted(seen.items(), key=lambda kv: -len(kv[1]))[:k]
    return [
        {
            "pair": f"{a} - {b} (residue {off:+d})",
            "samples": len(v),
            "median_distance_nm": float(np.median([d for d, _ in v])),
            "median_energy_kjmol": float(np.median([u for _, u in v])),
        }
        for (a, b, off), v in top
    ]


def bench_quality(
    model: ProteinBackmapper, heldout: Path, frames: int, ess_frames: int, n_worst: int = 0, n_terms: int = -1
) -> dict:
    """Quality metrics per finished entry of ``heldout``; ``n_terms`` >= 0 adds the excess of each
    force and the ``n_terms`` worst kinds of bond (:func:`term_excess`)."""
    import mdtraj as md

    torch.set_num_threads(1)
    out = {}
    for d in (heldout / i for i in corpus_ids(heldout)):  # finished entries only
        names, x, meta = load_peptide(d)
        top = md.load_topology(str(d / "topology.pdb"))
        _, perm = chain_permutation(top)
        step = max(1, x.shape[0] // frames)
        xr = x[::step][:frames].astype(np.float64)
        ch = model.for_sequence(names).float().eval()
        temperature = float(meta.get("temperature_K", 300.0))
        energy = _energy_function((d / "system.xml").read_text(), perm)
        xml = (d / "system.xml").read_text()
        pairs = nonbonded_pairs(xml, perm) if n_worst else None
        terms = energy_terms(xml, perm) if n_terms >= 0 else None
        metrics = quality(ch, xr, names, energy, KB * temperature, ess_frames, pairs, n_worst, terms, max(0, n_terms))
        out[d.name] = {"sequence": "-".join(names), **metrics}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="protein-ca", help="pretrained name or file")
    parser.add_argument("--heldout", default=None, help="directory of held-out corpus entries")
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--ess-frames", type=int, default=10)
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--batch", type=int, default=256, help="CG frames per call in the speed test")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument(
        "--worst-pairs",
        type=int,
        default=0,
        metavar="K",
        help="per held-out peptide, the K atom pairs that most often carry a sample's largest LJ pair energy",
    )
    parser.add_argument(
        "--terms",
        type=int,
        default=-1,
        metavar="K",
        help="per held-out peptide, the excess energy of each force and the K kinds of bond with the largest excess",
    )
    args = parser.parse_args()
    model = _model(args.model)
    results = {"model": args.model, "mapping": model.mapping}
    if not args.no_speed:
        results["speed"] = bench_speed(model, args.batch)
        print(json.dumps(results["speed"], indent=1), flush=True)
    if args.heldout:
        results["quality"] = bench_quality(
            model, Path(args.heldout), args.frames, args.ess_frames, args.worst_pairs, args.terms
        )
        print(json.dumps(results["quality"], indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
