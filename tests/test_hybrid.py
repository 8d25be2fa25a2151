"""Hybrid sampler: exactness on a Gaussian toy whose moments are known in closed form.

AA: two particles in 3D with U = k1/2 |x1|^2 + k2/2 |x2 - x1|^2. CG: their centre X = (x1 + x2)/2.
The backmapper places d = x2 - x1 ~ N(0, s^2) around X (deliberately the wrong width), and the CG
kernels use deliberately wrong CG densities: the chain must still sample the AA Boltzmann
distribution exactly, because the acceptance test corrects both.
"""

import math
from pathlib import Path

import numpy as np
import openmm
import pytest
import torch
from openmm import unit

from openmm_backmap._compat import import_openmmtools
from openmm_backmap.sampling.hybrid import (
    BatchedHybridSampler,
    CGFlowKernel,
    CGHamiltonianKernel,
    ResolutionMove,
    log_acceptance,
    metropolis,
)
from openmm_backmap.units import kT

import_openmmtools()
from openmmtools import cache, mcmc, states  # noqa: E402

K1, K2, T, MASS = 50.0, 200.0, 300.0, 12.0
BETA = 1.0 / kT(T)
# per-dimension covariance of (x1, x2): inverse of beta [[k1 + k2, -k2], [-k2, k2]]
COV = np.linalg.inv(BETA * np.array([[K1 + K2, -K2], [-K2, K2]]))
VAR_X1 = COV[0, 0]
VAR_D = COV[0, 0] + COV[1, 1] - 2 * COV[0, 1]
VAR_CENTRE = (COV[0, 0] + COV[1, 1] + 2 * COV[0, 1]) / 4


class ToyBackmapper:
    """q(x | X): x1 = X - d/2, x2 = X + d/2 with d ~ N(0, s^2 I); the map (X, d) -> x has unit
    Jacobian, so log q(x | X) = log N(d; 0, s^2 I)."""

    def __init__(self, s: float) -> None:
        self.s = s

    def _log_normal(self, d):
        return (-0.5 * (d / self.s) ** 2 - math.log(self.s) - 0.5 * math.log(2 * math.pi)).sum((-1, -2))

    def sample(self, cg, n: int):
        X = cg.repeat_interleave(n, 0)  # (B*n, 1, 3)
        d = torch.randn_like(X) * self.s
        aa = torch.cat([X - d / 2, X + d / 2], dim=1)
        return aa, self._log_normal(d)

    def log_prob(self, aa, cg):
        return self._log_normal(aa[:, 1:2] - aa[:, 0:1])


class ToyCGFlow:
    """An isotropic Gaussian over the single bead, standing in for a CG flow."""

    def __init__(self, sigma: float) -> None:
        self.sigma = sigma

    def log_prob(self, X):
        return (-0.5 * (X / self.sigma) ** 2 - math.log(self.sigma) - 0.5 * math.log(2 * math.pi)).sum((-1, -2))

    def sample(self, n: int):
        X = torch.randn(n, 1, 3, dtype=torch.float64) * self.sigma
        return X, self.log_prob(X)


def _aa_system():
    system = openmm.System()
    for _ in range(2):
        system.addParticle(MASS)
    well = openmm.CustomExternalForce("0.5*k1*(x^2+y^2+z^2)")
    well.addGlobalParameter("k1", K1)
    well.addParticle(0, [])
    system.addForce(well)
    bond = openmm.HarmonicBondForce()
    bond.addBond(0, 1, 0.0, K2)
    system.addForce(bond)
    return system


def _cg_system(k_cg: float):
    system = openmm.System()
    system.addParticle(2 * MASS)
    well = openmm.CustomExternalForce("0.5*kcg*(x^2+y^2+z^2)")
    well.addGlobalParameter("kcg", k_cg)
    well.addParticle(0, [])
    system.addForce(well)
    return system


def _run(move, n_iter, seed=0):
    thermo = states.ThermodynamicState(_aa_system(), temperature=T * unit.kelvin)
    rng = np.random.default_rng(seed)
    sampler = states.SamplerState(rng.normal(scale=0.1, size=(2, 3)) * unit.nanometer)
    context_cache = cache.ContextCache(platform=openmm.Platform.getPlatformByName("Reference"))
    xs = np.empty((n_iter, 2, 3))
    for i in range(n_iter):
        move.apply(thermo, sampler, context_cache)
        xs[i] = sampler.positions.value_in_unit(unit.nanometer)
    return xs


def _check_moments(xs, n_blocks=20, n_sigma=4.0):
    """Second moments per dimension against the closed form, error bars by block averaging."""
    d = xs[:, 1] - xs[:, 0]
    centre = xs.mean(1)
    for values, exact in ((xs[:, 0] ** 2, VAR_X1), (d**2, VAR_D), (centre**2, VAR_CENTRE)):
        per_iter = values.mean(-1)
        blocks = per_iter[: len(per_iter) // n_blocks * n_blocks].reshape(n_blocks, -1).mean(1)
        mean, err = blocks.mean(), blocks.std(ddof=1) / np.sqrt(n_blocks)
        assert abs(mean - exact) < n_sigma * err + 1e-12, (mean, exact, err)
        assert err < 0.1 * exact  # the error bar is tight enough for the check to mean something


def test_independent_cg_flow_kernel_is_exact():
    torch.manual_seed(0)
    kernel = CGFlowKernel(ToyCGFlow(sigma=0.35), rigid=False)
    move = ResolutionMove(
        ToyBackmapper(s=0.15), np.array([[0.5, 0.5]]), kernel, n_attempts=1, seed=1, dtype=torch.float64
    )
    xs = _run(move, 4000)
    assert 0.05 < move.stats.acceptance_rate < 0.95
    _check_moments(xs)


def test_hamiltonian_cg_kernel_is_exact():
    torch.manual_seed(1)
    # the true CG stiffness is 1 / (beta var(X)) ~ 47 kJ/mol/nm^2: use a wrong one on purpose
    kernel = CGHamiltonianKernel(_cg_system(k_cg=25.0), timestep=0.05, n_steps=15)
    move = ResolutionMove(
        ToyBackmapper(s=0.15), np.array([[0.5, 0.5]]), kernel, n_attempts=1, seed=3, dtype=torch.float64
    )
    xs = _run(move, 4000)
    assert kernel.n_accepted / kernel.n_proposed > 0.5
    _check_moments(xs)


def test_composes_with_langevin_and_records_acceptance():
    torch.manual_seed(2)
    resolution = ResolutionMove(
        ToyBackmapper(s=0.112),
        np.array([[0.5, 0.5]]),
        CGFlowKernel(ToyCGFlow(sigma=0.23), rigid=False),
        n_attempts=2,
        seed=4,
        dtype=torch.float64,
    )
    langevin = mcmc.LangevinDynamicsMove(timestep=2.0 * unit.femtoseconds, n_steps=20)
    sequence = mcmc.SequenceMove([langevin, resolution])
    xs = _run(sequence, 50)
    assert resolution.stats.n_proposed == 100
    assert len(resolution.stats.log_acceptance) == 100
    assert np.all(np.isfinite(xs))
    # near-exact backmapper and CG density: most proposals are accepted
    assert resolution.stats.acceptance_rate > 0.5


def test_wrong_atom_count_is_refused():
    move = ResolutionMove(
        ToyBackmapper(s=0.1), np.array([[1 / 3, 1 / 3, 1 / 3]]), CGFlowKernel(ToyCGFlow(0.2), rigid=False)
    )
    with pytest.raises(ValueError, match="sampler state has 2 atoms; the mapping expects 3"):
        _run(move, 1)
    with pytest.raises(ValueError, match="rows sum to 1"):
        ResolutionMove(ToyBackmapper(s=0.1), np.array([[0.5, 0.6]]), CGFlowKernel(ToyCGFlow(0.2)))


def test_acceptance_is_one_rule_for_both_samplers():
    # log a = [-u' - log q' + c'] - [-u - log q + c], impossible pairs refused, one draw per chain
    log_a = log_acceptance(
        [1.0, np.inf, 2.0], [0.5, 0.0, 0.0], [0.25, 0.0, 0.0], [2.0, np.inf, np.inf], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]
    )
    np.testing.assert_allclose(log_a, [(-1.0 - 0.5 + 0.25) - (-2.0 - 1.0), -np.inf, np.inf])
    rng, again = np.random.default_rng(3), np.random.default_rng(3)
    accept = metropolis(log_a, rng)
    u = again.uniform(size=3)
    np.testing.assert_array_equal(accept, [np.log(u[0]) < min(log_a[0], 0.0), False, True])


def test_resolution_move_keeps_its_own_generators_and_serialises():
    """The openmmtools contract: statistics, __getstate__/__setstate__; torch's global generator is
    neither seeded nor advanced by the move, and a restored move continues the same chain."""
    import pickle

    from openmmtools import utils

    torch.manual_seed(123)
    before = torch.get_rng_state()
    move = ResolutionMove(
        ToyBackmapper(s=0.15),
        np.array([[0.5, 0.5]]),
        CGFlowKernel(ToyCGFlow(0.35), rigid=False),
        n_attempts=3,
        seed=7,
        dtype=torch.float64,
    )
    _run(move, 5)
    assert torch.equal(torch.get_rng_state(), before)
    assert move.statistics == {"n_accepted": move.stats.n_accepted, "n_proposed": 15}
    assert 0 < move.stats.n_accepted < 15  # the log below means something
    restored = pickle.loads(pickle.dumps(move))
    np.testing.assert_array_equal(_run(restored, 5, seed=9), _run(move, 5, seed=9))
    assert restored.statistics == move.statistics and restored.stats.accepted == move.stats.accepted
    # openmmtools' own serialisation round trip, and its statistics setter
    copy = utils.deserialize(utils.serialize(move))
    assert copy.statistics == move.statistics and copy.n_attempts == 3 and copy.dtype == torch.float64
    copy.statistics = {"n_accepted": 1, "n_proposed": 4}
    assert copy.stats.acceptance_rate == 0.25
    # the same seed gives the same chain whatever torch's global state
    torch.manual_seed(999)
    fresh = ResolutionMove(
        ToyBackmapper(s=0.15),
        np.array([[0.5, 0.5]]),
        CGFlowKernel(ToyCGFlow(0.35), rigid=False),
        n_attempts=3,
        seed=7,
        dtype=torch.float64,
    )
    torch.manual_seed(123)
    other = ResolutionMove(
        ToyBackmapper(s=0.15),
        np.array([[0.5, 0.5]]),
        CGFlowKernel(ToyCGFlow(0.35), rigid=False),
        n_attempts=3,
        seed=7,
        dtype=torch.float64,
    )
    np.testing.assert_array_equal(_run(fresh, 4), _run(other, 4))


# ---------------------------------------------------------------------------- many chains at once
def _toy_energy(x):
    """U(x) of :func:`_aa_system` for a batch (B, 2, 3), kJ/mol."""
    return 0.5 * K1 * (x[:, 0] ** 2).sum(-1) + 0.5 * K2 * ((x[:, 1] - x[:, 0]) ** 2).sum(-1)


def test_toy_energy_matches_the_openmm_system():
    x = np.random.default_rng(0).normal(scale=0.2, size=(2, 3))
    ctx = openmm.Context(_aa_system(), openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(x)
    expected = ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    assert float(_toy_energy(torch.as_tensor(x[None]))[0]) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("langevin_steps", [0, 5])
def test_batched_chains_are_exact(langevin_steps):
    n_chains, n_iter, burn = 64, 300, 20
    sampler = BatchedHybridSampler(
        ToyBackmapper(s=0.15),
        ToyCGFlow(sigma=0.35),
        np.array([[0.5, 0.5]]),
        _toy_energy,
        np.zeros((2, 3)) + 0.05,
        n_chains,
        T,
        rigid=False,
        langevin_steps=langevin_steps,
        system=_aa_system(),
        timestep_fs=5.0,
        seed=5,
        dtype=torch.float64,
    )
    xs = np.empty((n_iter, n_chains, 2, 3))
    for i in range(n_iter):
        sampler.step()
        xs[i] = sampler.x
    assert sampler.n_proposed == n_iter * n_chains and 0.05 < sampler.acceptance_rate < 0.95
    _check_moments(xs[burn:].reshape(-1, 2, 3))


def test_batched_chains_keep_their_own_state():
    # a proposal that is always refused (infinite energy) leaves every chain where it was
    x0 = np.random.default_rng(1).normal(scale=0.1, size=(8, 2, 3))
    sampler = BatchedHybridSampler(
        ToyBackmapper(s=0.15),
        ToyCGFlow(sigma=0.35),
        np.array([[0.5, 0.5]]),
        lambda x: torch.full((x.shape[0],), math.inf, dtype=x.dtype),
        x0,
        8,
        T,
        rigid=False,
        dtype=torch.float64,
    )
    assert not sampler.step().any() and np.array_equal(sampler.x, x0)
    with pytest.raises(ValueError, match="starting positions have shape"):
        BatchedHybridSampler(
            ToyBackmapper(s=0.15), ToyCGFlow(0.3), np.array([[0.5, 0.5]]), _toy_energy, np.zeros((3, 3)), 4, T
        )
    with pytest.raises(ValueError, match="langevin_steps > 0 needs the AA System"):
        BatchedHybridSampler(
            ToyBackmapper(s=0.15),
            ToyCGFlow(0.3),
            np.array([[0.5, 0.5]]),
            _toy_energy,
            np.zeros((2, 3)),
            4,
            T,
            langevin_steps=3,
        )


# ---------------------------------------------------------------------------- whole runs
@pytest.mark.parametrize("kernel", ["flow", "hmc"])
def test_run_hybrid_writes_trajectory_log_and_summary(tiny_ala2, tiny_cg, tmp_path, kernel):
    import json

    import mdtraj as md

    from openmm_backmap.cli import main

    out = tmp_path / kernel
    code = main(
        [
            "hybrid",
            "--model",
            str(tiny_ala2["model"]),
            "--cg-model",
            str(tiny_cg),
            "--start",
            str(tiny_ala2["paths"]["pdb"]),
            "--iterations",
            "6",
            "--out",
            str(out),
            "--kernel",
            kernel,
            "--langevin-steps",
            "20",
            "--attempts",
            "2",
            "--seed",
            "3",
        ]
    )
    assert code == 0
    traj = md.load(str(out / "trajectory.dcd"), top=str(tiny_ala2["paths"]["pdb"]))
    assert traj.n_frames == 6 and np.all(np.isfinite(traj.xyz))
    rows = (out / "acceptance.csv").read_text().splitlines()
    assert rows[0] == "iteration,attempt,log_acceptance,accepted" and len(rows) == 1 + 12
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 6 and 0.0 <= summary["acceptance_rate"] <= 1.0
    pops = [v["population"] for v in summary["basins"].values()]
    assert abs(sum(pops) - 1.0) < 1e-9


def test_run_hybrid_refuses_mismatched_inputs(tiny_ala2, tiny_cg, tmp_path):
    from openmm_backmap.sampling.hybrid import HybridRun, run_hybrid

    other = tmp_path / "other.pdb"
    tiny_ala2["traj"][0].atom_slice(range(20)).save_pdb(str(other))
    with pytest.raises(ValueError, match="another molecule"):
        run_hybrid(tiny_ala2["model"], tiny_cg, other, tmp_path / "r", HybridRun(1))
    with pytest.raises(ValueError, match="unknown CG kernel 'gibbs'"):
        run_hybrid(tiny_ala2["model"], tiny_cg, tiny_ala2["paths"]["pdb"], tmp_path / "r", HybridRun(1, kernel="gibbs"))
    with pytest.raises(ValueError, match="is a backmapper, not a CG-potential"):
        run_hybrid(tiny_ala2["model"], tiny_ala2["model"], tiny_ala2["paths"]["pdb"], tmp_path / "r", HybridRun(1))


def test_run_hybrid_with_batched_chains(tiny_ala2, tiny_cg, tmp_path):
    import json

    import mdtraj as md

    from openmm_backmap.analysis.basins import BASINS, backbone_dihedrals, basin_indicators
    from openmm_backmap.cli import main

    out = tmp_path / "batched"
    code = main(
        [
            "hybrid",
            "--model",
            str(tiny_ala2["model"]),
            "--cg-model",
            str(tiny_cg),
            "--start",
            str(tiny_ala2["paths"]["pdb"]),
            "--iterations",
            "6",
            "--out",
            str(out),
            "--chains",
            "5",
            "--langevin-steps",
            "4",
            "--attempts",
            "2",
            "--save-every",
            "2",
            "--burn-in",
            "0.5",
        ]
    )
    assert code == 0
    traj = md.load(str(out / "trajectory.dcd"), top=str(tiny_ala2["paths"]["pdb"]))
    assert traj.n_frames == 3 * 5 and np.all(np.isfinite(traj.xyz))
    acc = np.loadtxt(out / "acceptance.csv", delimiter=",", skiprows=1)
    assert acc.shape == (6, 4) and np.all(acc[:, 1] == 5) and np.all((0 <= acc[:, 3]) & (acc[:, 3] <= 10))
    fractions = np.loadtxt(out / "basins.csv", delimiter=",", skiprows=1)
    assert np.allclose(fractions[:, 1:].sum(1), 1.0)
    # the basin log agrees with the frames written at iterations 0, 2, 4
    phi, psi = backbone_dihedrals(traj)
    ind = basin_indicators(phi[:, 0], psi[:, 0])
    for k, name in enumerate(BASINS):
        assert np.allclose(ind[name].reshape(3, 5).mean(1), fractions[0::2, 1 + k], atol=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["chains"] == 5 and summary["burn_in_iterations"] == 3 and summary["samples"] == 15
    assert summary["acceptance_rate"] == pytest.approx(acc[:, 3].sum() / 60)
    assert abs(sum(v["population"] for v in summary["basins"].values()) - 1.0) < 1e-9
    with pytest.raises(ValueError, match="CG-flow kernel only"):
        from openmm_backmap.sampling.hybrid import HybridRun, run_hybrid

        run_hybrid(
            tiny_ala2["model"], tiny_cg, tiny_ala2["paths"]["pdb"], tmp_path / "h", HybridRun(1, kernel="hmc", chains=2)
        )
    with pytest.raises(ValueError, match="chains must be positive"):
        run_hybrid(tiny_ala2["model"], tiny_cg, tiny_ala2["paths"]["pdb"], tmp_path / "h", HybridRun(1, chains=0))
    with pytest.raises(ValueError, match="burn_in must be a fraction"):
        run_hybrid(
            tiny_ala2["model"], tiny_cg, tiny_ala2["paths"]["pdb"], tmp_path / "h", HybridRun(2, chains=2, burn_in=1.5)
        )


# ---------------------------------------------------------------------------- ALA2 (slow)
@pytest.mark.slow
def test_ala2_hybrid_basin_populations_match_long_reference(tmp_path):
    """256 batched hybrid chains (CG-flow kernel; 10 AA Langevin steps + 1 resolution move per
    iteration) on alanine dipeptide in vacuum: C7eq and alpha_R agree with long AA MD, alpha_L with
    umbrella sampling, within 0.3 kT. Resolution moves alone mix alpha_R more slowly (two runs of
    4,000-8,000 iterations: 0.2-0.33 kT low); the Langevin steps fix that.

    Plain MD at 300 K never crosses into phi > 0 (240 ns: not once), so alpha_L / C7ax needs the
    umbrella reference (``systems.umbrella.umbrella_basin_populations``: 36 windows along phi, MBAR).

    Models: OPENMM_BACKMAP_DEMO (an `openmm-backmap demo` output directory) or the full demo run
    here (about 11 minutes). MD reference: OPENMM_BACKMAP_ALA2_REFERENCE, one or more directories
    written by `openmm-backmap reference ala2` (os.pathsep-separated, pooled), or 100 ns generated
    here (about 17 minutes); alpha_R holds ~7e-4, so a 20 ns run is too short. Umbrella reference:
    OPENMM_BACKMAP_ALA2_UMBRELLA (the JSON that function returns) or 36 windows x 2 ns run here
    (about 13 minutes)."""
    import json
    import os

    import mdtraj as md

    from openmm_backmap.analysis.basins import BASINS, basin_populations
    from openmm_backmap.demo import run_demo
    from openmm_backmap.sampling.hybrid import HybridRun, run_hybrid
    from openmm_backmap.systems.reference import generate_reference
    from openmm_backmap.systems.umbrella import umbrella_basin_populations

    demo = os.environ.get("OPENMM_BACKMAP_DEMO")
    if demo is None:
        demo = tmp_path / "demo"
        assert run_demo(demo) == 0
    demo = Path(demo)
    refs = os.environ.get("OPENMM_BACKMAP_ALA2_REFERENCE")
    if refs is None:
        generate_reference("ala2", 100.0, tmp_path / "reference", seed=7, progress=False)
        refs = str(tmp_path / "reference")
    frames = [md.load(str(Path(d) / "ala2.dcd"), top=str(Path(d) / "ala2.pdb")) for d in refs.split(os.pathsep)]
    reference = basin_populations(md.join(frames))
    umbrella_file = os.environ.get("OPENMM_BACKMAP_ALA2_UMBRELLA")
    if umbrella_file is None:
        umbrella = umbrella_basin_populations("ala2", n_windows=36, ps_per_window=2000.0, seed=6, progress=False)
    else:
        umbrella = json.loads(Path(umbrella_file).read_text())
    summary = run_hybrid(
        demo / "models" / "backmapper.pt",
        demo / "models" / "cg.pt",
        demo / "reference" / "ala2.pdb",
        tmp_path / "hybrid",
        HybridRun(3000, langevin_steps=10, chains=256, save_every=3000, seed=21, progress=False),
    )
    assert 0.2 < summary["acceptance_rate"] < 1.0
    for basin in BASINS:
        ref, umb = reference[basin]["population"], umbrella["basins"][basin]["population"]
        hyb, err = summary["basins"][basin]["population"], summary["basins"][basin]["error"]
        print(f"{basin}: MD {ref:.5f}, umbrella {umb:.5f}, hybrid {hyb:.5f} +- {err:.5f}")
    checks = {
        "C7eq": reference["C7eq"]["population"],
        "alpha_R": reference["alpha_R"]["population"],
        "alpha_L": umbrella["basins"]["alpha_L"]["population"],
    }
    for basin, ref in checks.items():
        hyb = summary["basins"][basin]["population"]
        assert hyb > 0 and abs(np.log(hyb / ref)) <= 0.3, (basin, hyb, ref)
