"""Data: trajectory loading, block splits, (x, X) pairs and reference MD."""

import json

import mdtraj as md
import numpy as np
import pytest

from openmm_backmap.analysis.basins import backbone_dihedrals, basin_indicators
from openmm_backmap.cli import main
from openmm_backmap.io.trajectories import (
    check_restraint_for_mapping,
    load_trajectory,
    reference_restraint,
    require_unrestrained,
)
from openmm_backmap.mapping import CGMapping
from openmm_backmap.systems.builtin import BASIN_WINDOWS, ala2_six_bead_mapping, basin_restraint
from openmm_backmap.systems.reference import generate_reference
from openmm_backmap.training.data import block_split, make_pairs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """0.2 ns of alanine dipeptide made through the CLI, as a user would."""
    out = tmp_path_factory.mktemp("ref")
    assert main(["reference", "ala2", "--ns", "0.2", "--seed", "3", "--out", str(out)]) == 0
    return out


def test_reference_files_read_with_mdtraj(reference):
    traj = md.load(str(reference / "ala2.dcd"), top=str(reference / "ala2.pdb"))
    assert traj.n_frames == 200 and traj.n_atoms == 22
    meta = json.loads((reference / "ala2.json").read_text())
    assert meta["n_frames"] == 200 and meta["seed"] == 3 and meta["temperature_K"] == 300.0
    # frames 1 ps apart
    np.testing.assert_allclose(np.diff(traj.time), 1.0, rtol=1e-4)


def test_reference_energies_finite_and_thermal(reference):
    import openmm
    from openmm import unit

    traj = md.load(str(reference / "ala2.dcd"), top=str(reference / "ala2.pdb"))
    system = openmm.XmlSerializer.deserialize((reference / "ala2_system.xml").read_text())
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    energies = []
    for xyz in traj.xyz[::10]:
        ctx.setPositions(xyz.astype(np.float64))
        energies.append(ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    energies = np.array(energies)
    assert np.all(np.isfinite(energies))
    # amber ALA2 in vacuum at 300 K fluctuates around -50 kJ/mol with sd ~ 10 kJ/mol:
    # the equipartition share of 22 atoms' 54 unconstrained DOF alone is ~ 67 kJ/mol above minimum.
    minimum = -130.0
    assert minimum < energies.mean() < 10.0
    assert energies.std() > 2.0


def test_reference_holds_constraints(reference):
    traj = md.load(str(reference / "ala2.dcd"), top=str(reference / "ala2.pdb"))
    meta = json.loads((reference / "ala2.json").read_text())
    constraints = meta["constraints"]
    assert len(constraints) == 12  # all X-H bonds of alanine dipeptide
    pairs = np.array([[i, j] for i, j, _ in constraints])
    lengths = md.compute_distances(traj, pairs)
    target = np.broadcast_to(np.array([d for *_, d in constraints]), lengths.shape)
    np.testing.assert_allclose(lengths, target, atol=2e-5)


def test_reference_populates_c7eq(reference):
    traj = md.load(str(reference / "ala2.dcd"), top=str(reference / "ala2.pdb"))
    phi, psi = backbone_dihedrals(traj)
    assert phi.shape == (200, 1)
    basins = basin_indicators(phi[:, 0], psi[:, 0])
    # in vacuum at 300 K, C7eq and C5 share the population (0.45 / 0.55 over 20 ns) and the
    # helical regions are rare (< 0.1 %); 200 ps already visits C7eq many times
    assert basins["C7eq"].mean() > 0.15
    assert basins["C7eq"].mean() + basins["C5"].mean() > 0.95
    total = sum(b.astype(int) for b in basins.values())
    np.testing.assert_array_equal(total, 1)  # the basins partition the plane


def test_basins_wrap_the_extended_region_across_phi_180():
    phi = np.array([-80.0, -150.0, 175.0, 179.0, -80.0, 70.0, 60.0, 120.0])
    psi = np.array([70.0, 160.0, 170.0, -175.0, -40.0, -70.0, 40.0, -60.0])
    b = basin_indicators(phi, psi)
    names = [next(k for k, v in b.items() if v[i]) for i in range(len(phi))]
    assert names == ["C7eq", "C5", "C5", "C5", "alpha_R", "alpha_L", "alpha_L", "alpha_L"]


def test_block_split_is_contiguous_and_disjoint():
    split = block_split(1000, (0.8, 0.1, 0.1), n_blocks=10, seed=4)
    assert [len(split[k]) for k in ("train", "val", "test")] == [800, 100, 100]
    every = np.concatenate(list(split.values()))
    np.testing.assert_array_equal(np.sort(every), np.arange(1000))
    for name in ("val", "test"):
        assert np.all(np.diff(split[name]) == 1)  # a single block of 100 consecutive frames
    assert block_split(1000, seed=4)["val"][0] == split["val"][0]  # seeded
    with pytest.raises(ValueError, match="summing to 1"):
        block_split(100, (0.5, 0.1, 0.1))


def test_make_pairs_projects_and_tracks_frames(reference):
    traj = load_trajectory(reference / "ala2.dcd", reference / "ala2.pdb")
    mapping = CGMapping.from_preset(traj.topology, "heavy-backbone")
    pairs = make_pairs(traj, mapping, n_blocks=10, seed=0)
    assert sum(len(p) for p in pairs.values()) == traj.n_frames
    train = pairs["train"]
    np.testing.assert_allclose(train.X, train.x[:, mapping.bead_atoms], atol=1e-12)
    np.testing.assert_allclose(train.x[0], traj.xyz[train.frames[0]], atol=1e-7)
    prev = train.previous
    k = int(np.flatnonzero(prev >= 0)[0])
    assert train.frames[prev[k]] == train.frames[k] - 1
    assert (prev == -1).sum() >= 1  # block starts have no predecessor in the set
    x, X = train.tensors()
    assert tuple(x.shape) == (len(train), 22, 3) and tuple(X.shape) == (len(train), 5, 3)


def test_load_trajectory_errors(tmp_path, reference):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_trajectory(tmp_path / "missing.dcd", reference / "ala2.pdb")
    traj = md.load(str(reference / "ala2.dcd"), top=str(reference / "ala2.pdb"))
    traj.xyz[7, 3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite coordinates in 1 frame.*first in frame 7"):
        load_trajectory(traj)
    other = md.load(str(reference / "ala2.pdb")).atom_slice(range(20)).topology
    with pytest.raises(ValueError, match="22 atoms but the topology has 20"):
        load_trajectory(reference / "ala2.dcd", other)


def test_reference_cli_rejects_bad_length(tmp_path, capsys):
    assert main(["reference", "ala2", "--ns", "0", "--out", str(tmp_path)]) == 2
    assert "--ns must be positive" in capsys.readouterr().err


# ---------------------------------------------------------------------------- restrained runs
@pytest.fixture(scope="module")
def restrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("restrained")
    return generate_reference(
        "ala2", 0.02, out, seed=4, save_every_ps=0.1, equilibrate_ps=2.0, progress=False, restrain="alpha_R"
    )


def test_basin_restraint_is_flat_inside_and_harmonic_outside(restrained):
    import openmm
    from openmm import app

    ref_top = app.PDBFile(str(restrained["pdb"])).topology
    force, info = basin_restraint(ref_top, "alpha_R", k_kjmol_rad2=100.0)
    assert info["torsions"] == [[4, 6, 8, 14], [6, 8, 14, 16]] and info["atoms"] == [4, 6, 8, 14, 16]
    # evaluate the expression on a 4-particle system with a chosen dihedral
    system = openmm.System()
    for _ in range(4):
        system.addParticle(1.0)
    one = openmm.CustomTorsionForce(force.getEnergyFunction())
    for name in ("k", "theta0", "w"):
        one.addPerTorsionParameter(name)
    centre, half = BASIN_WINDOWS["alpha_R"][0]
    one.addTorsion(0, 1, 2, 3, [100.0, np.radians(centre), np.radians(half)])
    system.addForce(one)
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))

    def energy(deg):
        t = np.radians(deg)
        ctx.setPositions([[1, 0, 0], [0, 0, 0], [0, 0, 1], [np.cos(t), np.sin(t), 1.0]])
        return ctx.getState(getEnergy=True).getPotentialEnergy()._value

    for inside in (centre, centre + half - 1, centre - half + 1):
        assert energy(inside) == pytest.approx(0.0, abs=1e-9)
    for outside in (centre + half + 20, centre - half - 20, centre + 180):  # periodic distance
        d = min(abs(outside - centre), 360 - abs(outside - centre))
        expected = 100.0 * np.radians(d - half) ** 2
        assert abs(energy(outside)) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="unknown basin"):
        basin_restraint(ref_top, "beta")


def test_restrained_reference_stays_in_basin_and_records_it(restrained):
    traj = md.load(str(restrained["dcd"]), top=str(restrained["pdb"]))
    phi, psi = backbone_dihedrals(traj)
    assert basin_indicators(phi[:, 0], psi[:, 0])["alpha_R"].all()
    meta = json.loads(restrained["json"].read_text())
    assert meta["restraint"]["basin"] == "alpha_R" and reference_restraint(restrained["dcd"]) == meta["restraint"]
    # the System written is the unrestrained one (it defines U_AA for training and reweighting)
    assert "CustomTorsionForce" not in restrained["system"].read_text()
    with pytest.raises(ValueError, match="alpha_R restraint"):
        require_unrestrained(restrained["dcd"], "as a reference ensemble")


def test_restrained_run_accepted_only_when_restrained_atoms_are_beads(restrained):
    top = md.load_topology(str(restrained["pdb"]))
    six = ala2_six_bead_mapping(top)
    check_restraint_for_mapping(restrained["dcd"], six)
    missing_psi_n = CGMapping(top, six.groups[:5])  # without N(NME), atom 16
    with pytest.raises(ValueError, match=r"atoms \[16\] that are not CG beads"):
        check_restraint_for_mapping(restrained["dcd"], missing_psi_n)
    coms = CGMapping.from_preset(top, "residue-com")
    with pytest.raises(ValueError, match="not CG beads by themselves"):
        check_restraint_for_mapping(restrained["dcd"], coms)


def test_reference_cli_restrain_and_train_cg_refuses_it(tmp_path, restrained, capsys):
    rc = main(
        [
            "reference",
            "ala2",
            "--ns",
            "0.002",
            "--restrain",
            "alpha_L",
            "--out",
            str(tmp_path / "l"),
            "--save-every-ps",
            "0.5",
        ]
    )
    assert rc == 0
    assert json.loads((tmp_path / "l" / "ala2.json").read_text())["restraint"]["basin"] == "alpha_L"
    rc = main(
        [
            "train-cg",
            "--topology",
            str(restrained["pdb"]),
            "--trajectory",
            str(restrained["dcd"]),
            "--mapping",
            "backbone",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "cg.ckpt"),
            "--no-progress",
        ]
    )
    assert rc == 2 and "biases the ensemble" in capsys.readouterr().err
    # explicitly allowed, it trains a broadened proposal and says so in the model file
    rc = main(
        [
            "train-cg",
            "--topology",
            str(restrained["pdb"]),
            "--trajectory",
            str(restrained["dcd"]),
            str(tmp_path / "l" / "ala2.dcd"),
            "--mapping",
            "backbone",
            "--epochs",
            "1",
            "--layers",
            "2",
            "--hidden",
            "8",
            "--allow-restrained",
            "--out",
            str(tmp_path / "cg.ckpt"),
            "--no-progress",
        ]
    )
    assert rc == 0
    assert main(["export", str(tmp_path / "cg.ckpt"), "-o", str(tmp_path / "cg.pt")]) == 0
    from openmm_backmap.io.model_files import load_cg_potential

    data = load_cg_potential(tmp_path / "cg.pt")[1]["data"]
    assert data["restrained_basins"] == ["alpha_R", "alpha_L"] and data["potential_of_mean_force"] is False


def test_mbar_recovers_free_energies_of_biased_gaussians():
    from openmm_backmap.systems.umbrella import mbar_free_energies

    rng = np.random.default_rng(3)
    kappa, centres, n = 4.0, np.array([-2.0, -1.0, 0.0, 1.0, 2.0]), 4000
    # state k: u_k(x) = x^2/2 + kappa/2 (x - c_k)^2, a Gaussian of precision 1 + kappa
    x = np.concatenate([rng.normal(kappa * c / (1 + kappa), 1 / np.sqrt(1 + kappa), n) for c in centres])
    u_kn = 0.5 * x[None, :] ** 2 + 0.5 * kappa * (x[None, :] - centres[:, None]) ** 2
    f = mbar_free_energies(u_kn, np.full(len(centres), n))
    exact = kappa * centres**2 / (2 * (1 + kappa))
    np.testing.assert_allclose(f, exact - exact[0], atol=0.05)


def test_umbrella_populations_run_and_partition():
    from openmm_backmap.systems.umbrella import umbrella_basin_populations

    result = umbrella_basin_populations(
        "ala2", n_windows=8, ps_per_window=4.0, equilibrate_ps=1.0, k_kjmol_rad2=15.0, save_every_ps=0.5, progress=False
    )
    pops = [v["population"] for v in result["basins"].values()]
    assert abs(sum(pops) - 1.0) < 1e-9 and all(p >= 0 for p in pops)
    assert len(result["phi_profile"]["phi_deg"]) == 72
    # the unbiased profile has its minimum in the phi < 0 basins and a barrier of several kT at phi = 0
    phi = np.array(result["phi_profile"]["phi_deg"])
    f = np.array(result["phi_profile"]["free_energy_kT"])
    assert phi[np.argmin(f)] < 0 and f.min() == 0.0
    assert f[np.abs(phi) < 10].min() > 3.0
    assert result["basins"]["C7eq"]["population"] + result["basins"]["C5"]["population"] > 0.9
    with pytest.raises(ValueError, match=">= 2 windows"):
        umbrella_basin_populations("ala2", n_windows=1, progress=False)
