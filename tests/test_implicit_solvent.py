"""Generalized Born implicit solvent in torch against OpenMM's Reference platform.

Energies and forces of the GB force alone (its own force group) and of the whole System, for the
three forms the torch energy implements: GBn2 and OBC2 as amber14's ``implicit/*.xml`` build them
(CustomGBForce) and OpenMM's own GBSAOBCForce (``amber99_obc.xml``), on chignolin with hydrogens,
noisy and compressed copies of it, and random clusters that visit every branch of the model.
"""

from functools import cache

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

from openmm_backmap.openmm.energies import TorchSystemEnergy, unsupported_forces
from openmm_backmap.openmm.implicit_solvent import (
    GeneralizedBornEnergy,
    UnsupportedGBForce,
    read_gb_parameters,
    unsupported_reason,
)
from openmm_backmap.systems.builtin import DATA_DIR, builtin_system

torch.set_num_threads(1)
KJ = unit.kilojoule_per_mole
KJ_NM = KJ / unit.nanometer
GB_GROUP = 1

# name: (force field files, createSystem arguments, force type, form read from the force)
SYSTEMS = {
    "gbn2": (("amber14-all.xml", "implicit/gbn2.xml"), {}, "CustomGBForce", "GBn2"),
    "gbn2-salt": (
        ("amber14-all.xml", "implicit/gbn2.xml"),
        {"implicitSolventKappa": 1.2 / unit.nanometer, "soluteDielectric": 2.0, "solventDielectric": 80.0},
        "CustomGBForce",
        "GBn2",
    ),
    "obc2": (("amber14-all.xml", "implicit/obc2.xml"), {}, "CustomGBForce", "OBC2"),
    "obc2-salt": (
        ("amber14-all.xml", "implicit/obc2.xml"),
        {"implicitSolventKappa": 0.7 / unit.nanometer, "soluteDielectric": 1.5},
        "CustomGBForce",
        "OBC2",
    ),
    "gbsaobc": (
        ("amber99sb.xml", "amber99_obc.xml"),
        {"soluteDielectric": 1.5, "solventDielectric": 80.0},
        "GBSAOBCForce",
        "GBSAOBCForce",
    ),
}


def _gb_force(system):
    (force,) = [f for f in system.getForces() if type(f).__name__ in ("CustomGBForce", "GBSAOBCForce")]
    return force


@cache
def _forcefield(*files):
    return app.ForceField(*files)


def _build(topology, name):
    files, kwargs, force_type, _ = SYSTEMS[name]
    system = _forcefield(*files).createSystem(topology, nonbondedMethod=app.NoCutoff, **kwargs)
    for force in system.getForces():
        force.setForceGroup(0)
    gb = _gb_force(system)
    assert type(gb).__name__ == force_type
    gb.setForceGroup(GB_GROUP)
    return system


def _openmm(system, frames, groups=None):
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    energies, forces = [], []
    for x in frames:
        ctx.setPositions(x)
        state = ctx.getState(getEnergy=True, getForces=True, groups=groups if groups is not None else -1)
        energies.append(state.getPotentialEnergy().value_in_unit(KJ))
        forces.append(state.getForces(asNumpy=True).value_in_unit(KJ_NM))
    return np.array(energies), np.array(forces)


def _torch(energy, frames, dtype=torch.float64):
    x = torch.tensor(frames, dtype=dtype, requires_grad=True)
    u = energy(x)
    (grad,) = torch.autograd.grad(u.sum(), x)
    return u.detach().double().numpy(), -grad.double().numpy()


def _errors(e, f, ref_e, ref_f):
    """Largest relative energy error and largest |F - F_ref| / |F_ref| over the frames."""
    e_err = np.max(np.abs(e - ref_e) / np.abs(ref_e))
    f_err = np.max(
        np.linalg.norm((f - ref_f).reshape(len(f), -1), axis=1) / np.linalg.norm(ref_f.reshape(len(f), -1), axis=1)
    )
    return e_err, f_err


@pytest.fixture(scope="module")
def chignolin():
    """Chignolin (138 atoms with H): the built structure, two noisy copies and a compressed one."""
    pdb = app.PDBFile(str(DATA_DIR / "chignolin.pdb"))
    x0 = np.array(pdb.positions.value_in_unit(unit.nanometer))
    rng = np.random.default_rng(7)
    centre = x0.mean(0)
    frames = [
        x0,
        x0 + rng.normal(scale=0.01, size=x0.shape),
        x0 + rng.normal(scale=0.03, size=x0.shape),
        centre + 0.6 * (x0 - centre) + rng.normal(scale=0.005, size=x0.shape),
    ]
    return pdb.topology, np.array(frames)


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_gb_force_and_system_match_openmm(chignolin, name):
    topology, frames = chignolin
    system = _build(topology, name)
    assert read_gb_parameters(_gb_force(system)).form == SYSTEMS[name][3]
    # the GB force alone
    ref_e, ref_f = _openmm(system, frames, groups={GB_GROUP})
    e, f = _torch(GeneralizedBornEnergy(_gb_force(system)), frames)
    e_err, f_err = _errors(e, f, ref_e, ref_f)
    assert e_err < 1e-7 and f_err < 1e-7, (e_err, f_err)
    # the whole System through TorchSystemEnergy
    assert unsupported_forces(system) == []
    ref_e, ref_f = _openmm(system, frames)
    e, f = _torch(TorchSystemEnergy(system), frames)
    e_err, f_err = _errors(e, f, ref_e, ref_f)
    assert e_err < 1e-7 and f_err < 1e-7, (e_err, f_err)


def test_salt_and_dielectrics_change_the_energy(chignolin):
    """The salt and dielectric settings are read from the force, not assumed."""
    topology, frames = chignolin
    systems = [_build(topology, name) for name in ("gbn2", "gbn2-salt")]  # a force lives as long as its System
    plain, salty = (GeneralizedBornEnergy(_gb_force(s)) for s in systems)
    assert plain.kappa == 0.0 and abs(salty.kappa - 1.2) < 1e-12
    x = torch.tensor(frames[:1])
    assert abs(plain(x).item() - salty(x).item()) > 100.0


@pytest.mark.parametrize("name", ["gbn2", "gbsaobc"])
def test_float32_close_to_float64(chignolin, name):
    topology, frames = chignolin
    system = _build(topology, name)
    energy = GeneralizedBornEnergy(_gb_force(system))
    e64, f64 = _torch(energy, frames)
    e32, f32 = _torch(energy, frames, torch.float32)
    e_err, f_err = _errors(e32, f32, e64, f64)
    assert e_err < 1e-5 and f_err < 1e-5, (e_err, f_err)


def _cluster(n, seed, min_distance=0.06):
    """n - 1 points in a 0.5 nm cube, no two closer than ``min_distance`` nm except the last of
    them, 0.07 nm from the first (deep inside its sphere), and one point 1.2 nm away from the cube."""
    rng = np.random.default_rng(seed)
    points = []
    while len(points) < n - 1:
        p = rng.uniform(0.0, 0.5, 3) if len(points) < n - 2 else points[0] + 0.07 * _unit(rng.normal(size=3))
        if all(np.linalg.norm(p - q) > min_distance for q in points[1:]):
            points.append(p)
    points.append(np.array([1.7, 0.25, 0.25]))
    return np.array(points), rng


def _unit(v):
    return v / np.linalg.norm(v)


def _branch_counts(params, x):
    """How many ordered pairs take each branch of the descreening integral (numpy, float64)."""
    r = np.linalg.norm(x[:, None] - x[None], axis=-1)
    off = ~np.eye(len(x), dtype=bool)
    rho, s = params.offset_radius[:, None], params.scaled_radius[None, :]
    counts = {
        "outside": np.sum(off & (r + s < rho)),
        "buried": np.sum(off & (rho < s - r)),
        "L=rho": np.sum(off & (np.abs(r - s) < rho) & (r + s >= rho)),
    }
    if params.neck_cut is not None:
        counts["neck near"] = np.sum(off & (r <= params.neck_cut))
        counts["neck far"] = np.sum(off & (r > params.neck_cut))
    return counts


def _cluster_system(kind, n=16, seed=3):
    x, rng = _cluster(n, seed)
    charge = rng.uniform(-0.6, 0.6, n)
    radius = rng.uniform(0.1, 0.2, n)
    radius[0] = 0.19  # atom n - 2, small and 0.07 nm away, lies wholly inside the first one's sphere
    shrink = np.ones(n)
    shrink[-2] = 0.1
    system = openmm.System()
    for _ in range(n):
        system.addParticle(12.0)
    if kind == "GBSAOBCForce":
        force = openmm.GBSAOBCForce()
        force.setSoluteDielectric(2.0)
        force.setSurfaceAreaEnergy(3.1)
        for q, rad, scale in zip(charge, radius, shrink * rng.uniform(0.0, 2.5, n)):
            force.addParticle(q, rad, scale)
    else:
        from openmm.app.internal.customgbforces import GBSAGBn2Force

        force = GBSAGBn2Force(solventDielectric=70.0, soluteDielectric=1.5, SA="ACE", kappa=0.9)
        for q, rad, screen in zip(charge, radius, shrink * rng.uniform(0.0, 2.5, n)):
            force.addParticle([q, rad, screen, *rng.uniform([0.4, 0.2, 0.1], [1.0, 0.9, 0.5])])
        force.finalize()
    system.addForce(force)
    return system, x


@pytest.mark.parametrize("kind", ["GBSAOBCForce", "GBn2"])
def test_every_branch_matches_openmm(kind):
    """Random overlapping clusters: atoms outside, inside and across each other's scaled spheres."""
    system, x = _cluster_system(kind)
    force = system.getForce(0)
    counts = _branch_counts(read_gb_parameters(force), x)
    assert min(counts.values()) > 0, counts
    ref_e, ref_f = _openmm(system, x[None])
    e, f = _torch(GeneralizedBornEnergy(force), x[None])
    e_err, f_err = _errors(e, f, ref_e, ref_f)
    assert e_err < 1e-9 and f_err < 1e-9, (e_err, f_err)


def test_negative_scaled_radius_matches_openmm():
    """GBn2 gives sulfur a negative screening factor (scaled radius s_j < 0), so an atom nearer to
    it than |s_j| has U = r + s_j < 0: a pair OpenMM's step(r + sr2 - or1) leaves out. The torch
    energy must leave it out too, finite (a log of U < 0 had made it NaN), forces included."""
    from openmm.app.internal.customgbforces import GBSAGBn2Force

    x = np.array([[0.0, 0.0, 0.0], [0.08, 0.0, 0.0], [0.0, 0.3, 0.05], [0.25, 0.2, -0.1]])
    system = openmm.System()
    force = GBSAGBn2Force(solventDielectric=78.5, soluteDielectric=1.0, SA="ACE")
    for q, radius, screen in [(-0.27, 0.18, -0.703839), (0.3, 0.12, 1.09), (0.2, 0.15, 1.0), (-0.23, 0.17, 0.9)]:
        system.addParticle(12.0)
        force.addParticle([q, radius, screen, 1.0, 0.8, 4.85])
    force.finalize()
    system.addForce(force)
    force = system.getForce(0)
    params = read_gb_parameters(force)
    assert params.scaled_radius[0] < 0 and 0.08 + params.scaled_radius[0] < 0  # the pair (1, 0) has U < 0
    ref_e, ref_f = _openmm(system, x[None])
    e, f = _torch(GeneralizedBornEnergy(force), x[None])
    assert np.all(np.isfinite(e)) and np.all(np.isfinite(f))
    e_err, f_err = _errors(e, f, ref_e, ref_f)
    assert e_err < 1e-9 and f_err < 1e-9, (e_err, f_err)


@pytest.fixture(scope="module")
def ala2_gb():
    """Alanine dipeptide (22 atoms) with amber14 + GBn2 and with amber99sb + GBSAOBCForce."""
    topology, _, positions = builtin_system("ala2")
    x = np.array(positions.value_in_unit(unit.nanometer))
    x = x + np.random.default_rng(1).normal(scale=0.01, size=x.shape)
    return {name: _build(topology, name) for name in ("gbn2-salt", "gbsaobc")}, x


@pytest.mark.parametrize("name", ["gbn2-salt", "gbsaobc"])
def test_gradient_matches_finite_differences(ala2_gb, name):
    systems, x0 = ala2_gb
    energy = GeneralizedBornEnergy(_gb_force(systems[name]))
    x = torch.tensor(x0[None], requires_grad=True)
    (grad,) = torch.autograd.grad(energy(x).sum(), x)
    rng = np.random.default_rng(2)
    h = 1e-5
    for _ in range(4):
        v = torch.tensor(rng.normal(size=x0.shape)[None])
        with torch.no_grad():
            fd = (energy(x + h * v) - energy(x - h * v)).item() / (2 * h)
        assert abs(fd - (grad * v).sum().item()) < 1e-6 * max(1.0, abs(fd))


def test_second_derivatives_match_finite_differences(ala2_gb):
    """The gradient is differentiable again (create_graph): Hessian-vector products."""
    systems, x0 = ala2_gb
    energy = GeneralizedBornEnergy(_gb_force(systems["gbn2-salt"]))
    v = torch.tensor(np.random.default_rng(3).normal(size=x0.shape)[None])

    def grad_at(x):
        x = x.detach().requires_grad_(True)
        return torch.autograd.grad(energy(x).sum(), x)[0]

    x = torch.tensor(x0[None], requires_grad=True)
    (g,) = torch.autograd.grad(energy(x).sum(), x, create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), x)
    h = 1e-5
    fd = (grad_at(x + h * v) - grad_at(x - h * v)) / (2 * h)
    assert torch.linalg.norm(hv - fd) < 1e-6 * torch.linalg.norm(fd)


def test_chunks_and_shapes(chignolin):
    topology, frames = chignolin
    system = _build(topology, "gbn2")
    force = _gb_force(system)
    whole = GeneralizedBornEnergy(force, max_pairs=10**9)
    per_frame = GeneralizedBornEnergy(force, max_pairs=1)
    e1, f1 = _torch(whole, frames)
    e2, f2 = _torch(per_frame, frames)
    np.testing.assert_allclose(e2, e1, rtol=1e-12)
    np.testing.assert_allclose(f2, f1, rtol=1e-10, atol=1e-9)
    single = whole(torch.tensor(frames[1]))
    assert single.shape == () and abs(single.item() - e1[1]) < 1e-9 * abs(e1[1])
    with pytest.raises(ValueError, match="138 atoms"):
        whole(torch.tensor(frames[:, :100]))


def test_other_gb_forms_are_refused_with_the_reason(chignolin):
    topology, _ = chignolin
    gbn = _forcefield("amber14-all.xml", "implicit/gbn.xml").createSystem(topology, nonbondedMethod=app.NoCutoff)
    reason = unsupported_reason(_gb_force(gbn))
    assert "per-particle parameters" in reason and "radindex" in reason
    assert any(name.startswith("CustomGBForce (") for name in unsupported_forces(gbn))
    with pytest.raises(ValueError, match="CustomGBForce"):
        TorchSystemEnergy(gbn)

    gbn2 = _build(topology, "gbn2")
    force = _gb_force(gbn2)
    name, expression, kind = force.getComputedValueParameters(1)
    force.setComputedValueParameters(1, name, expression.replace("beta*psi^2", "beta*psi^2.5"), kind)
    with pytest.raises(UnsupportedGBForce, match="computed value B"):
        read_gb_parameters(force)

    obc2 = _build(topology, "obc2")
    force = _gb_force(obc2)
    force.addGlobalParameter("lambda", 1.0)
    assert "global parameters ['lambda']" in unsupported_reason(force)

    cut = _forcefield("amber14-all.xml", "implicit/gbn2.xml").createSystem(
        topology, nonbondedMethod=app.CutoffNonPeriodic, nonbondedCutoff=2.0 * unit.nanometer
    )
    assert "only NoCutoff" in unsupported_reason(_gb_force(cut))
    native = openmm.GBSAOBCForce()
    native.setNonbondedMethod(openmm.GBSAOBCForce.CutoffNonPeriodic)
    assert "only NoCutoff" in unsupported_reason(native)
