"""Cycle coarse graining on alanine dipeptide: the validation behind benchmarks/RESULTS.md ("Cycle").

The cycle itself is the command line (``openmm-backmap cycle``); this script measures its results:

* ``umbrella``: umbrella sampling along phi (MBAR), the reference phi profile and basin populations;
* ``profile``: phi free-energy profiles of CG potentials from independent samples of their flows,
  beside the umbrella profile and an MD histogram, and the psi histogram at phi < 0 (the gap between
  C5 and C7eq, where alpha_R lies, on a log scale) of the flows and the MD, as a PNG and JSON;
* ``ess``: ESS/N of fresh draws of a CG flow with K reconstructions each (the draw's weight the mean
  of its reconstructions', :func:`openmm_backmap.training.cycle.frame_weights`) and of the pairs;
* ``estimate``: the AA estimate of (CG flow, backmapper) pairs, :func:`openmm_backmap.training.cycle.flow_estimate`
  (what ``cycle --estimate-samples`` adds to the last record): per basin the flow's own population and
  the reweighted one with its error, and dF from the references, for N draws with K reconstructions,
  or annealed (``--anneal-levels T --k 1``, what ``cycle --estimate-anneal`` does);
* ``conditional``: where a backmapper is worse, per basin: at CG draws of a flow (a fraction of them
  with their rotatable dihedrals redrawn uniformly, so every basin has draws), K reconstructions
  each, the gap log mean_j w_j - mean_j log w_j (a lower bound on KL(q(x | X) || p(x | X)), the bias
  the cycle's one-reconstruction reverse-KL term carries at X) and the conditional ESS/K; and per
  basin of the flow's own draws, r = log q(X) - log p(X) (the CG marginal by importance sampling over
  the K reconstructions, normalised by its estimate of Z on the first draws): where r >> 0 the flow
  puts its mass where the AA energy does not, and a reverse-KL term (plain or excess) removes it;
* ``alpha-l``: why the cycle does not reach alpha_L. AA frames in alpha_L (1,000 K MD, then 4 ps at
  300 K from each alpha_L frame, keeping those still in alpha_L; a diagnosis, never training data)
  against held-out MD frames: the CG flow's log q(X), and the fibre integral log int exp(-u) over
  M x = X estimated by importance sampling with the backmapper and by annealed importance sampling
  (random-walk Metropolis in the backmapper's latent space, beads fixed);
* ``stability``: batched 1 fs Langevin dynamics of CG potentials from held-out MD frames
  (:func:`openmm_backmap.sampling.langevin.dynamics_check`): how many replicas run away;
* ``simulate``: an OpenMM CG simulation with a CG potential (``.pt`` or compiled ``.pt2``) as the force
  and a BackmapReporter (``--flow-moves cg.pt N``: a flow move every N steps), and the run's basin
  populations, raw and reweighted from its energy file.

Example (the commands of RESULTS.md)::

    python benchmarks/bench_cycle.py umbrella --ps 100 --out umbrella.json
    python benchmarks/bench_cycle.py profile --cg cg_md.pt cycle/cg.pt --labels MD cycle \\
        --umbrella umbrella.json --md seed2/ala2.dcd seed2/ala2.pdb --out profile
    python benchmarks/bench_cycle.py simulate --cg cycle/cg.pt2 --model cycle/backmapper.pt \\
        --start seed1/ala2.pdb --steps 20000 --out sim
    python benchmarks/bench_cycle.py estimate --pairs cycle/cg.pt cycle/backmapper.pt --samples 50000 --k 8 \\
        --out estimate.json
    python benchmarks/bench_cycle.py conditional --cg cg_md.pt --model bm.pt cycle/backmapper.pt \\
        --out conditional.json
    python benchmarks/bench_cycle.py stability --cg cg_md.pt cycle/cg.pt \\
        --md seed2/ala2.dcd seed2/ala2.pdb --out stability.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy.special import logsumexp

from openmm_backmap.systems.builtin import ALA2_REFERENCE_POPULATIONS

REFERENCE = ALA2_REFERENCE_POPULATIONS  # 240 ns MD for C7eq, C5, alpha_R; umbrella for alpha_L


def delta_kT(p: float, ref: float) -> float:
    """-ln(p / ref): the free-energy error of a population in kT (inf when p is 0)."""
    return float(-math.log(p / ref)) if p > 0 else float("inf")


def phi_bead_indices(mapping) -> list[int]:
    """Bead indices of the four atoms of the first phi dihedral (each must be a bead by itself)."""
    from openmm_backmap.analysis.basins import backbone_torsions

    phi_atoms = backbone_torsions(mapping.topology)[0]
    psi_atoms = backbone_torsions(mapping.topology)[1]
    single = {int(g[0]): b for b, g in enumerate(mapping.groups) if len(g) == 1}
    missing = [a for a in phi_atoms + psi_atoms if a not in single]
    if missing:
        raise ValueError(f"phi/psi atoms {missing} are not beads by themselves: the CG flow does not fix phi")
    return [single[a] for a in phi_atoms] + [single[a] for a in psi_atoms]


def cg_dihedrals(X: np.ndarray, idx: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(phi, psi) in degrees from CG positions X (N, n_cg, 3) and the 8 bead indices of phi and psi."""
    import mdtraj as md

    top = md.Topology()
    chain = top.add_chain()
    res = top.add_residue("CG", chain)
    for k in range(X.shape[1]):
        top.add_atom(f"B{k}", md.element.carbon, res)
    t = md.Trajectory(X.astype(np.float32), top)
    ang = np.degrees(md.compute_dihedrals(t, np.array([idx[:4], idx[4:]])))
    return ang[:, 0], ang[:, 1]


#: psi bin edges (degrees) of the gap histogram of ``profile``
PSI_EDGES = np.arange(-180.0, 181.0, 15.0)


def psi_gap_histogram(phi: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """Fraction of all frames (not only of phi < 0) in each :data:`PSI_EDGES` bin of psi at phi < 0."""
    h, _ = np.histogram(psi[phi < 0], PSI_EDGES)
    return h / max(len(psi), 1)


def profile_of(phi: np.ndarray, weights: np.ndarray | None = None, bins: int = 72):
    """(bin centres in degrees, free energy in kT with its minimum at 0; inf where empty)."""
    h, e = np.histogram(phi, bins=bins, range=(-180.0, 180.0), weights=weights)
    with np.errstate(divide="ignore"):
        f = -np.log(h / h.max())
    return 0.5 * (e[1:] + e[:-1]), f


def cmd_umbrella(args) -> None:
    from openmm_backmap.systems.umbrella import umbrella_basin_populations

    t0 = time.time()
    res = umbrella_basin_populations(
        "ala2", n_windows=args.windows, ps_per_window=args.ps, equilibrate_ps=args.equilibrate, progress=False
    )
    res["seconds"] = time.time() - t0
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print({k: round(v["population"], 5) for k, v in res["basins"].items()}, f"{res['seconds']:.0f} s")


def cmd_profile(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from openmm_backmap.analysis.basins import basin_indicators
    from openmm_backmap.io.checkpoints import cg_potential_from_file
    from openmm_backmap.mapping import CGMapping
    from openmm_backmap.training.cycle import TemperedFlow

    torch.manual_seed(args.seed)
    out = Path(args.out)
    labels = args.labels or [Path(p).stem for p in args.cg]
    import mdtraj as md

    top = md.load_topology(args.md[1])
    result: dict = {"samples": args.samples, "reference": REFERENCE, "models": {}}
    fig, (ax, gap) = plt.subplots(1, 2, figsize=(12, 4.2))
    psi_centres = 0.5 * (PSI_EDGES[1:] + PSI_EDGES[:-1])
    for k, (path, label) in enumerate(zip(args.cg, labels)):
        model, spec = cg_potential_from_file(path)
        mapping = CGMapping.from_dict(spec["mapping"], top)
        idx = phi_bead_indices(mapping)
        fam = TemperedFlow(model)
        phis, psis = [], []
        for s in range(0, args.samples, 10000):
            X, _ = fam.sample(min(10000, args.samples - s), 1.0)
            a, b = cg_dihedrals(X.double().numpy(), idx)
            phis.append(a)
            psis.append(b)
        phi, psi = np.concatenate(phis), np.concatenate(psis)
        ind = basin_indicators(phi, psi)
        n = len(phi)
        pops = {}
        for name, m in ind.items():
            p = float(m.mean())
            pops[name] = {
                "population": p,
                "error": math.sqrt(max(p * (1 - p), 0.0) / n),
                "count": int(m.sum()),
                "dF_kT": delta_kT(p, REFERENCE[name]),
            }
        c, f = profile_of(phi)
        h = psi_gap_histogram(phi, psi)
        result["models"][label] = {
            "path": str(path),
            "basins": pops,
            "phi_deg": c.tolist(),
            "F_kT": f.tolist(),
            "psi_at_phi_below_0": h.tolist(),
        }
        ax.plot(c, f, "-", color=f"C{k}", label=f"CG flow: {label}")
        gap.semilogy(psi_centres, np.where(h > 0, h, np.nan), "-o", ms=3, color=f"C{k}", label=label)
        print(label, {k2: (round(v["population"], 5), round(v["dF_kT"], 2)) for k2, v in pops.items()})
    if args.umbrella:
        um = json.loads(Path(args.umbrella).read_text())
        prof = um["phi_profile"]
        f = np.asarray(prof["free_energy_kT"], dtype=float)
        ax.plot(prof["phi_deg"], f - np.nanmin(f[np.isfinite(f)]), "k-", lw=2, label="AA umbrella (MBAR)")
        result["umbrella"] = {"path": args.umbrella, "basins": um["basins"], "settings": um["settings"]}
    if args.md:
        from openmm_backmap.analysis.basins import backbone_dihedrals

        t = md.load(args.md[0], top=args.md[1])
        phi_md, psi_md = backbone_dihedrals(t)
        c, f = profile_of(phi_md[:, 0])
        ax.plot(c, f, "k:", label=f"AA MD {Path(args.md[0]).name} ({t.n_frames} frames)")
        h = psi_gap_histogram(phi_md[:, 0], psi_md[:, 0])
        gap.semilogy(psi_centres, np.where(h > 0, h, np.nan), "k:o", ms=3, label=f"AA MD ({t.n_frames} frames)")
        result["md"] = {"path": args.md[0], "frames": int(t.n_frames), "psi_at_phi_below_0": h.tolist()}
    ax.set_xlabel("phi (degrees)")
    ax.set_ylabel("free energy (kT)")
    ax.set_ylim(-0.5, 14)
    ax.set_xlim(-180, 180)
    ax.legend(fontsize=8)
    ax.set_title("alanine dipeptide, six-bead CG: phi profile")
    gap.axvspan(-120, 0, color="0.9", zorder=0)
    gap.set_xlabel("psi (degrees), phi < 0; shaded: alpha_R")
    gap.set_ylabel("fraction of all frames per 15-degree bin")
    gap.set_xlim(-180, 180)
    gap.legend(fontsize=8)
    gap.set_title("psi at phi < 0: the gap between the basins")
    result["psi_edges_deg"] = PSI_EDGES.tolist()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")


def cmd_simulate(args) -> None:
    import mdtraj as md
    import openmm
    from openmm import app, unit

    from openmm_backmap.analysis.basins import backbone_dihedrals, basin_indicators
    from openmm_backmap.io.backmap_model import load_model
    from openmm_backmap.io.energy_file import read_energy_file
    from openmm_backmap.openmm.forces import create_cg_system
    from openmm_backmap.openmm.reporter import BackmapReporter
    from openmm_backmap.training.cycle import evaluate_weights

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bm = load_model(args.model, device="cpu")
    start = md.load(args.start)
    X0 = bm.mapping.project(start.xyz.astype(np.float64))[0]
    system = create_cg_system(bm.mapping.masses(), str(args.cg))
    integrator = openmm.LangevinMiddleIntegrator(
        300 * unit.kelvin, args.friction / unit.picosecond, args.timestep_fs * unit.femtoseconds
    )
    integrator.setRandomNumberSeed(args.seed)
    sim = app.Simulation(
        bm.mapping.cg_topology.to_openmm(), system, integrator, openmm.Platform.getPlatformByName("Reference")
    )
    sim.context.setPositions(X0)
    sim.context.setVelocitiesToTemperature(300 * unit.kelvin, args.seed)
    sim.reporters.append(app.DCDReporter(str(out / "cg.dcd"), args.interval))
    reporter = BackmapReporter(
        out / "aa.dcd",
        args.interval,
        model=str(args.model),
        samplesPerFrame=args.samples,
        energyFile=out / "weights.csv",
        seed=args.seed,
    )
    sim.reporters.append(reporter)
    moves = None
    if args.flow_moves:
        from openmm_backmap.openmm.flow_moves import CGFlowMoves

        moves = CGFlowMoves(args.flow_moves[0], int(args.flow_moves[1]), seed=args.seed + 1)
        sim.reporters.append(moves)
    t0 = time.time()
    with reporter:
        sim.step(args.steps)
    seconds = time.time() - t0
    rows = read_energy_file(out / "weights.csv")
    aa = md.load(str(out / "aa.dcd"), top=bm.topology)
    phi, psi = backbone_dihedrals(aa)
    ind = {k: v.mean(1) for k, v in basin_indicators(phi, psi).items()}
    stats = evaluate_weights(rows["log_w"], ind)
    cg = md.load(str(out / "cg.dcd"), top=bm.mapping.cg_topology)
    bonds = np.array(bm.mapping.cg_bonds())
    r = np.linalg.norm(cg.xyz[:, bonds[:, 0]] - cg.xyz[:, bonds[:, 1]], axis=-1)
    result = {
        "cg_model": str(args.cg),
        "model": str(args.model),
        "steps": args.steps,
        "timestep_fs": args.timestep_fs,
        "friction_per_ps": args.friction,
        "seconds": seconds,
        "ms_per_step": 1e3 * seconds / args.steps,
        "aa_frames": int(aa.n_frames),
        "cg_bond_range_nm": [float(r.min()), float(r.max())],
        "finite_energies": bool(np.isfinite(rows["u_cg_kjmol"]).all()),
        "flow_moves": None if moves is None else moves.nProposed,
        "flow_acceptance": None if moves is None else moves.acceptanceRate,
        "ess_fraction": stats["ess_fraction"],
        "basins": stats["basins"],
    }
    for name, b in result["basins"].items():
        b["dF_kT_reweighted"] = delta_kT(b["reweighted"], REFERENCE[name])
        b["dF_kT_raw"] = delta_kT(b["raw"], REFERENCE[name])
    (out / "simulate.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "basins"}))
    for name, b in result["basins"].items():
        print(name, f"raw {b['raw']:.4f} reweighted {b['reweighted']:.4f} +- {b['reweighted_error']:.4f}")


def cmd_ess(args) -> None:
    from openmm_backmap.analysis.reweighting import kish_ess
    from openmm_backmap.io.backmap_model import load_model
    from openmm_backmap.io.checkpoints import cg_potential_from_file
    from openmm_backmap.openmm.energies import ReducedEnergy, aa_energy, load_system
    from openmm_backmap.training.cycle import MixtureProposal, TemperedFlow, frame_weights

    cg, _ = cg_potential_from_file(args.cg)
    bm = load_model(args.model, device="cpu")
    energy = ReducedEnergy(aa_energy(load_system(bm.system_xml)), bm.temperature)
    torch.manual_seed(args.seed)
    family = TemperedFlow(cg, args.widen_lengths)
    if args.defensive > 0:
        X, log_q_cg, _ = MixtureProposal(family, args.defensive, args.tau).sample(args.samples)
    else:
        X, log_q_cg = family.sample(args.samples, 1.0)
    k_max = max(args.k)
    pairs = fibre_log_weights(bm, energy, X, k_max).numpy() - log_q_cg.double().numpy()[:, None]
    rows = []
    for k in args.k:
        log_w, _ = frame_weights(pairs[:, :k].ravel(), k)
        rows.append(
            {
                "k": k,
                "draws_ess_fraction": kish_ess(log_w) / len(log_w),
                "pairs_ess_fraction": kish_ess(pairs[:, :k].ravel()) / (k * len(X)),
            }
        )
        row = rows[-1]
        print(
            f"K = {k}: ESS/N of the draws {row['draws_ess_fraction']:.3f}, of the pairs {row['pairs_ess_fraction']:.3f}"
        )
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "cg": str(args.cg),
                    "model": str(args.model),
                    "samples": args.samples,
                    "seed": args.seed,
                    "rows": rows,
                },
                indent=1,
            )
            + "\n"
        )


def _fibre_log_z_ais(net, energy, X: torch.Tensor, chains: int, steps: int, seed: int) -> np.ndarray:
    """log int exp(-u(x)) dx over the fibre of each CG frame (n,), by AIS from q(x | X) to exp(-u):
    targets N(u) w(x(u))^beta in the backmapper's latent u (w = exp(-u) / q), beta = (t / T)^2, two
    random-walk Metropolis steps per temperature (circular latents wrapped), step sizes adapted per
    chain toward half acceptance; the estimate is the log mean of the chains' AIS weights."""
    gen = torch.Generator().manual_seed(seed)
    Xr = X.float().repeat_interleave(chains, 0)
    circ = net.base.circular

    def log_w(u):
        with torch.no_grad():
            x, lq = net.sample_with_noise(Xr, u)
            lw = -energy(x.double()) - lq.double()
        return torch.where(torch.isfinite(lw), lw, torch.full_like(lw, -1e30))

    def log_base(u):
        return torch.where(circ, torch.zeros_like(u), -0.5 * u * u).sum(1).double()

    u = net.base.sample(len(Xr), torch.float32, torch.device("cpu"))
    lw = log_w(u)
    log_ais = torch.zeros(len(Xr), dtype=torch.float64)
    beta = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64) ** 2
    step = torch.full((len(Xr), 1), 0.3)
    for t in range(1, steps + 1):
        log_ais += (beta[t] - beta[t - 1]) * lw
        for _ in range(2):
            new = u + step * torch.randn(u.shape, generator=gen)
            new = torch.where(circ, torch.remainder(new + math.pi, 2 * math.pi) - math.pi, new)
            lw_new = log_w(new)
            ratio = log_base(new) + beta[t] * lw_new - log_base(u) - beta[t] * lw
            take = torch.log(torch.rand(len(Xr), generator=gen, dtype=torch.float64)) < ratio
            u, lw = torch.where(take[:, None], new, u), torch.where(take, lw_new, lw)
            step = step * torch.where(take, 1.02, 0.98)[:, None].float()
    return (torch.logsumexp(log_ais.reshape(len(X), chains), 1) - math.log(chains)).numpy()


def fibre_log_weights(bm, energy, X: torch.Tensor, k: int, chunk: int = 64) -> torch.Tensor:
    """(n, k) log-weights -u(x_j) - log q(x_j | X) of k reconstructions of each CG frame of X, made
    ``chunk`` frames at a time; -inf where a term is not finite. Their log-mean over j estimates the
    fibre integral log int_{M x = X} exp(-u) of each frame."""
    out = []
    with torch.no_grad():
        for start in range(0, len(X), chunk):
            x, log_q = bm.module.sample(X[start : start + chunk].float(), k)
            lw = (-energy(x.double()) - log_q.double()).reshape(-1, k)
            out.append(torch.where(torch.isfinite(lw), lw, torch.full_like(lw, -math.inf)))
    return torch.cat(out)


def cmd_estimate(args) -> None:
    from openmm_backmap.io.backmap_model import load_model
    from openmm_backmap.io.checkpoints import cg_potential_from_file
    from openmm_backmap.models.joint import JointCoordinates
    from openmm_backmap.openmm.energies import ReducedEnergy, aa_energy, load_system
    from openmm_backmap.training.cycle import CycleSettings, TemperedFlow, flow_estimate, pair_annealer
    from openmm_backmap.training.cycle_files import basin_observable

    if len(args.pairs) % 2:
        raise SystemExit("--pairs takes CG potential and backmapper files in pairs")
    if args.anneal_levels and args.k != 1:
        raise SystemExit("--anneal-levels anneals one reconstruction per draw: give --k 1")
    torch.set_num_threads(1)
    result: dict = {"samples": args.samples, "k": args.k, "seed": args.seed, "reference": REFERENCE, "pairs": []}
    for cg_path, bm_path in zip(args.pairs[::2], args.pairs[1::2]):
        torch.manual_seed(args.seed)
        cg, _ = cg_potential_from_file(cg_path)
        bm = load_model(bm_path, device="cpu")
        energy = ReducedEnergy(aa_energy(load_system(bm.system_xml)), bm.temperature)

        def backmap(X, k, module=bm.module):
            return module.sample(X.float(), k)

        anneal = None
        if args.anneal_levels:
            family = TemperedFlow(cg)

            def fibre_log_prob(x, X, module=bm.module):
                return module.log_prob(x.float(), X.float())

            settings = CycleSettings(anneal_levels=args.anneal_levels, seed=args.seed)
            anneal = pair_annealer(
                family.module, fibre_log_prob, energy, bm.mapping.project, settings, JointCoordinates(cg, bm.module)
            )
        t0 = time.time()
        est = flow_estimate(
            TemperedFlow(cg), backmap, energy, args.samples, args.k, basin_observable(bm.topology), anneal=anneal
        )
        est["seconds"] = time.time() - t0
        for name, b in est["basins"].items():
            b["dF_raw_kT"] = delta_kT(b["raw"], REFERENCE[name])
            b["dF_reweighted_kT"] = delta_kT(b["reweighted"], REFERENCE[name])
        result["pairs"].append({"cg": str(cg_path), "model": str(bm_path), **est})
        print(f"{cg_path} + {bm_path}: ESS/N {est['ess_fraction']:.3f} ({est['seconds']:.0f} s)")
        for name, b in est["basins"].items():
            print(
                f"  {name:8s} own {b['raw']:.5f} ({b['dF_raw_kT']:+.2f} kT)  reweighted {b['reweighted']:.5f} +- "
                f"{b['reweighted_error']:.5f} ({b['dF_reweighted_kT']:+.2f} kT)",
                flush=True,
            )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


def cmd_conditional(args) -> None:
    from openmm_backmap.analysis.basins import basin_indicators
    from openmm_backmap.io.backmap_model import load_model
    from openmm_backmap.io.checkpoints import cg_potential_from_file
    from openmm_backmap.mapping import CGMapping
    from openmm_backmap.openmm.energies import ReducedEnergy, aa_energy, load_system
    from openmm_backmap.training.cycle import spread_torsions

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    cg, spec = cg_potential_from_file(args.cg)
    n_spread = round(args.spread * args.samples)
    with torch.no_grad():
        X, _ = cg.sample(args.samples)
        if n_spread:
            gen = torch.Generator().manual_seed(args.seed)
            X[:n_spread] = spread_torsions(cg, X[:n_spread], gen).to(X.dtype)
    result: dict = {"cg": str(args.cg), "samples": args.samples, "spread": args.spread, "k": args.k, "models": {}}
    for path in args.model:
        bm = load_model(path, device="cpu")
        idx = phi_bead_indices(CGMapping.from_dict(spec["mapping"], bm.topology))
        basins = basin_indicators(*cg_dihedrals(X.double().numpy(), idx))
        energy = ReducedEnergy(aa_energy(load_system(bm.system_xml)), bm.temperature)
        lw = fibre_log_weights(bm, energy, X, args.k)
        gap = (torch.logsumexp(lw, 1) - math.log(args.k) - lw.mean(1)).numpy()
        w = torch.softmax(lw, 1)
        cond_ess = (1.0 / (w * w).sum(1) / args.k).numpy()
        rows = {}
        for name, m in basins.items():
            g = gap[m]
            if not m.any():
                continue
            finite = g[np.isfinite(g)]
            rows[name] = {
                "frames": int(m.sum()),
                "gap_quartiles": np.quantile(finite, [0.25, 0.5, 0.75]).tolist() if finite.size else None,
                "gap_q90": float(np.quantile(finite, 0.9)) if finite.size else None,
                "gap_mean_capped": float(np.minimum(finite, args.cap).mean()) if finite.size else None,
                "frames_no_finite_weight": int((~np.isfinite(g)).sum()),
                "conditional_ess_median": float(np.median(cond_ess[m])),
            }
            r = rows[name]
            print(
                f"{path} {name:8s} {r['frames']:5d} frames: gap median {r['gap_quartiles'][1]:.2f} "
                f"(q90 {r['gap_q90']:.2f}, mean capped at {args.cap:g}: {r['gap_mean_capped']:.2f}) nats, "
                f"conditional ESS/K {r['conditional_ess_median']:.3f}",
                flush=True,
            )
        result["models"][str(path)] = rows
        result["models"][str(path)]["log_q_over_p"] = _flow_excess(cg, bm, energy, idx, args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


def _flow_excess(cg, bm, energy, idx, args) -> dict:
    """Per basin, the median and the fraction above 1 of r = log q(X) - log p_K(X) + log Z_K at the
    flow's own draws: ``args.ratio_draws`` draws, the first ``args.ratio_z`` of them (an unbiased sample)
    estimate Z, and of the rest only those in the rare basins (alpha_R, alpha_L) are backmapped."""
    from openmm_backmap.analysis.basins import basin_indicators

    with torch.no_grad():
        X, log_q = cg.sample(args.ratio_draws)
    ind = basin_indicators(*cg_dihedrals(X.double().numpy(), idx))
    keep = ind["alpha_R"] | ind["alpha_L"]
    keep[: args.ratio_z] = True
    X, log_q = X[torch.as_tensor(keep)], log_q[torch.as_tensor(keep)].double().numpy()
    ind = {name: v[keep] for name, v in ind.items()}
    log_p = (torch.logsumexp(fibre_log_weights(bm, energy, X, args.k), 1) - math.log(args.k)).numpy()
    total = log_q - log_p
    first = total[: args.ratio_z][np.isfinite(total[: args.ratio_z])]
    log_z = float(logsumexp(-first) - math.log(first.size))
    r = total + log_z
    rows = {}
    for name, m in ind.items():
        v = r[m & np.isfinite(r)]
        if v.size:
            rows[name] = {
                "draws": int(v.size),
                "median": float(np.median(v)),
                "fraction_above_1": float(np.mean(v > 1)),
            }
    print(
        "  flow's own draws, r = log q / p: "
        + ", ".join(
            f"{k} {v['median']:+.2f} (r > 1: {v['fraction_above_1']:.2f}, {v['draws']})" for k, v in rows.items()
        ),
        flush=True,
    )
    return rows


def cmd_alpha_l(args) -> None:
    import mdtraj as md
    from openmm import unit

    from openmm_backmap.analysis.basins import backbone_dihedrals, basin_indicators
    from openmm_backmap.io.backmap_model import load_model
    from openmm_backmap.io.checkpoints import cg_potential_from_file
    from openmm_backmap.openmm.energies import ReducedEnergy, aa_energy, load_system
    from openmm_backmap.systems.reference import langevin_context

    torch.set_num_threads(1)
    bm = load_model(args.model, device="cpu")
    cg, _ = cg_potential_from_file(args.cg)
    system = load_system(bm.system_xml)
    md_traj = md.load(args.md[0], top=args.md[1])
    top = md_traj.topology

    def run(T, steps, x0, seed, every):
        ctx, integrator = langevin_context(system, x0, T, 5.0, 2.0, seed, "Reference")
        frames = []
        for _ in range(steps // every):
            integrator.step(every)
            frames.append(ctx.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer))
        return np.asarray(frames)

    def in_alpha_l(xyz):
        phi, psi = backbone_dihedrals(md.Trajectory(xyz.astype(np.float32), top))
        return basin_indicators(phi, psi)["alpha_L"][:, 0].astype(bool)

    hot = run(1000.0, 200000, md_traj.xyz[0].astype(np.float64), args.seed, 100)
    starts = np.flatnonzero(in_alpha_l(hot))
    frames = []
    for i in starts[:: max(1, len(starts) // 12)][:12]:
        relaxed = run(300.0, 2000, hot[i], int(i) + 1, 200)
        frames += list(relaxed[in_alpha_l(relaxed)][-3:])
    alpha_l = np.asarray(frames)[: args.frames]
    held_out = md_traj.xyz[:: max(1, md_traj.n_frames // args.frames)][: args.frames].astype(np.float64)
    energy = ReducedEnergy(aa_energy(system), bm.temperature)
    out = {"alpha_l_frames": len(alpha_l), "hot_alpha_l_frames": int(len(starts))}
    for name, xyz in (("alpha_L", alpha_l), ("MD", held_out)):
        X = torch.as_tensor(bm.mapping.project(xyz))
        with torch.no_grad():
            log_q_cg = cg.log_prob(X).double().numpy()
        lw = fibre_log_weights(bm, energy, X, args.k, chunk=len(X))
        w = torch.softmax(lw, 1)
        t0 = time.time()
        ais = _fibre_log_z_ais(bm.module, energy, X, args.chains, args.ais_steps, args.seed)
        row = {
            "log_q_cg_median": float(np.median(log_q_cg)),
            "log_z_is_median": float(np.median((torch.logsumexp(lw, 1) - math.log(args.k)).numpy())),
            "conditional_ess_median": float(torch.median(1.0 / (w * w).sum(1)) / args.k),
            "log_z_ais_median": float(np.median(ais)),
            "ais_seconds": time.time() - t0,
        }
        out[name] = row
        print(name, {k: round(v, 3) for k, v in row.items()}, flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


def cmd_stability(args) -> None:
    import mdtraj as md

    from openmm_backmap.io.checkpoints import cg_potential_from_file
    from openmm_backmap.mapping import CGMapping
    from openmm_backmap.sampling.langevin import dynamics_check

    torch.set_num_threads(1)
    traj = md.load(args.md[0], top=args.md[1])
    results = []
    for path in args.cg:
        model, spec = cg_potential_from_file(path)
        model = model.double().eval()
        mapping = CGMapping.from_dict(spec["mapping"], traj.topology)
        rng = np.random.default_rng(args.seed)
        frames = traj.xyz[rng.choice(traj.n_frames, size=args.replicas, replace=False)].astype(np.float64)
        X = torch.as_tensor(mapping.project(frames))
        t0 = time.time()
        out = dynamics_check(model.energy, X, mapping.masses(), args.temperature, args.steps, seed=args.seed)
        out.update(cg=str(path), seconds=time.time() - t0)
        results.append(out)
        print(
            f"{path}: {out['failed']} of {out['replicas']} replicas ran away in {out['steps']} steps of "
            f"{out['timestep_fs']:g} fs (first at step {out['first_failure_step']}); {out['seconds']:.0f} s",
            flush=True,
        )
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("umbrella")
    u.add_argument("--windows", type=int, default=36)
    u.add_argument("--ps", type=float, default=100.0, help="ps per window")
    u.add_argument("--equilibrate", type=float, default=10.0, help="ps per window before sampling")
    u.add_argument("--out", required=True)
    u.set_defaults(func=cmd_umbrella)
    f = sub.add_parser("profile")
    f.add_argument("--cg", nargs="+", required=True, help="CG potentials (.pt or .ckpt)")
    f.add_argument("--labels", nargs="+")
    f.add_argument("--umbrella", help="JSON written by the umbrella stage")
    f.add_argument("--md", nargs=2, metavar=("DCD", "PDB"), required=True, help="AA MD and its topology, drawn beside")
    f.add_argument("--samples", type=int, default=50000)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", required=True, help="output stem (.png and .json)")
    f.set_defaults(func=cmd_profile)
    e = sub.add_parser("ess")
    e.add_argument("--cg", required=True, help="CG potential (.pt or .ckpt)")
    e.add_argument("--model", required=True, help="backmapper model file (.pt)")
    e.add_argument("--samples", type=int, default=8000)
    e.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8], help="reconstructions per draw")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--defensive", type=float, default=0.0, help="draw from the cycle's defensive mixture instead")
    e.add_argument("--tau", type=float, default=1.5)
    e.add_argument("--widen-lengths", action="store_true", help="widen the bond-length latents too")
    e.add_argument("--out", help="JSON")
    e.set_defaults(func=cmd_ess)

    m = sub.add_parser("estimate")
    m.add_argument("--pairs", nargs="+", required=True, metavar="FILE", help="CG potential, backmapper (.pt), ...")
    m.add_argument("--samples", type=int, default=50000)
    m.add_argument("--k", type=int, default=8, help="reconstructions per draw")
    m.add_argument(
        "--anneal-levels", type=int, default=0, help="anneal every draw (--k 1) with the cycle's AIS of T levels"
    )
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", help="JSON")
    m.set_defaults(func=cmd_estimate)

    c = sub.add_parser("conditional")
    c.add_argument("--cg", required=True, help="CG potential (.pt or .ckpt) whose draws condition the backmappers")
    c.add_argument("--model", nargs="+", required=True, help="backmapper model files (.pt) with their AA System")
    c.add_argument("--samples", type=int, default=600)
    c.add_argument("--spread", type=float, default=0.5, help="fraction of the draws with rotatable dihedrals redrawn")
    c.add_argument("--k", type=int, default=32, help="reconstructions per draw")
    c.add_argument("--cap", type=float, default=50.0, help="gap (nats) at which the capped mean clips a draw")
    c.add_argument("--ratio-draws", type=int, default=20000, help="flow draws for the log q / p table")
    c.add_argument("--ratio-z", type=int, default=3000, help="of them, the first ones that estimate Z")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", help="JSON")
    c.set_defaults(func=cmd_conditional)

    a = sub.add_parser("alpha-l")
    a.add_argument("--cg", required=True, help="CG potential (.pt or .ckpt)")
    a.add_argument("--model", required=True, help="backmapper model file (.pt) with its AA System")
    a.add_argument("--md", nargs=2, metavar=("DCD", "PDB"), required=True, help="held-out AA MD (and its topology)")
    a.add_argument("--frames", type=int, default=16)
    a.add_argument("--k", type=int, default=256, help="importance samples per frame")
    a.add_argument("--chains", type=int, default=8, help="AIS chains per frame")
    a.add_argument("--ais-steps", type=int, default=800, help="AIS temperatures (two Metropolis steps each)")
    a.add_argument("--seed", type=int, default=1)
    a.add_argument("--out", required=True, help="JSON")
    a.set_defaults(func=cmd_alpha_l)

    k = sub.add_parser("stability")
    k.add_argument("--cg", nargs="+", required=True, help="CG potentials (.pt or .ckpt)")
    k.add_argument("--md", nargs=2, metavar=("DCD", "PDB"), required=True, help="AA MD whose frames start the runs")
    k.add_argument("--replicas", type=int, default=64)
    k.add_argument("--steps", type=int, default=10000, help="1 fs steps")
    k.add_argument("--temperature", type=float, default=300.0)
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--out", required=True, help="JSON")
    k.set_defaults(func=cmd_stability)

    s = sub.add_parser("simulate")
    s.add_argument("--cg", required=True, help="CG potential (.pt or compiled .pt2)")
    s.add_argument("--model", required=True, help="backmapper model file (.pt)")
    s.add_argument("--start", required=True, help="AA PDB whose projection starts the run")
    s.add_argument("--steps", type=int, default=20000)
    s.add_argument("--interval", type=int, default=100)
    s.add_argument("--samples", type=int, default=4, help="reconstructions per reported frame")
    s.add_argument("--timestep-fs", type=float, default=1.0)
    s.add_argument("--friction", type=float, default=10.0)
    s.add_argument(
        "--flow-moves",
        nargs=2,
        metavar=("CG_PT", "INTERVAL"),
        help="a CGFlowMoves move from the CG flow CG_PT (.pt) every INTERVAL steps",
    )
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_simulate)
    args = p.parse_args()
    torch.set_num_threads(1)
    args.func(args)


if __name__ == "__main__":
    main()
