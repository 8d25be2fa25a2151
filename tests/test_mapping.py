"""CGMapping: presets, projection, CG topology, JSON files and bad input."""

import json

import mdtraj as md
import numpy as np
import pytest
import torch

from openmm_backmap.mapping import CGMapping
from openmm_backmap.systems.builtin import ALA2_SIX_BEADS, DATA_DIR

# the package's six-bead mapping with CB moved last: ALA2's beads are then not consecutive
CB_LAST = [*(b for b in ALA2_SIX_BEADS if b != "ALA2-CB"), "ALA2-CB"]
CB_LAST_NAMES = ["C1", "N", "CA", "C", "N2", "CB"]


@pytest.fixture(scope="module")
def ala2():
    from openmm_backmap.systems.builtin import builtin_system

    topology, _, positions = builtin_system("ala2")
    top = md.Topology.from_openmm(topology)
    xyz = np.array(positions.value_in_unit(positions.unit))[None]
    return md.Trajectory(xyz, top)


@pytest.fixture(scope="module")
def peptide():
    return md.load(str(DATA_DIR / "chignolin.pdb"))


def _labels(top):
    return {f"{a.residue.name}{a.residue.resSeq}-{a.name}": a.index for a in top.atoms}


def test_projection_equals_mass_weighted_average_by_hand(ala2):
    top = ala2.topology
    mapping = CGMapping.from_preset(top, "residue-com")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, top.n_atoms, 3))
    X = mapping.project(x)
    assert X.shape == (5, 3, 3)
    for b, res in enumerate(top.residues):
        idx = [a.index for a in res.atoms]
        m = np.array([top.atom(i).element.mass for i in idx])
        by_hand = (m[None, :, None] * x[:, idx]).sum(1) / m.sum()
        np.testing.assert_allclose(X[:, b], by_hand, rtol=1e-12, atol=1e-12)
    # the matrix rows sum to one, so a translation moves every bead by the same vector
    np.testing.assert_allclose(mapping.matrix.sum(1), 1.0)
    shift = np.array([0.3, -1.2, 2.5])
    np.testing.assert_allclose(mapping.project(x + shift), X + shift, atol=1e-12)


def test_geometry_weighting_and_explicit_weights(ala2):
    top = ala2.topology
    lab = _labels(top)
    group = [lab["ALA2-N"], lab["ALA2-CA"], lab["ALA2-C"]]
    x = np.random.default_rng(1).normal(size=(top.n_atoms, 3))
    cog = CGMapping(top, [group], weighting="geometry")
    np.testing.assert_allclose(cog.project(x)[0], x[group].mean(0), atol=1e-12)
    explicit = CGMapping(top, [group], weights=[[0.5, 0.25, 0.25]])
    np.testing.assert_allclose(
        explicit.project(x)[0], 0.5 * x[group[0]] + 0.25 * (x[group[1]] + x[group[2]]), atol=1e-12
    )


def test_torch_projection_batched_with_gradient(ala2):
    mapping = CGMapping.from_preset(ala2.topology, "residue-com")
    x = torch.randn(4, 2, ala2.n_atoms, 3, dtype=torch.float64, requires_grad=True)
    X = mapping.project(x)
    assert X.shape == (4, 2, 3, 3)
    np.testing.assert_allclose(X.detach().numpy(), mapping.project(x.detach().numpy()), atol=1e-12)
    X[..., 0, 0].sum().backward()
    # dX_0x / dx_i = M_0i for x components only
    expected = torch.zeros(ala2.n_atoms, 3, dtype=torch.float64)
    expected[:, 0] = torch.as_tensor(mapping.matrix[0])
    torch.testing.assert_close(x.grad[0, 0], expected)


def test_presets_on_alanine_dipeptide(ala2):
    top = ala2.topology
    assert CGMapping.from_preset(top, "ca").n_cg == 1
    bb = CGMapping.from_preset(top, "backbone")
    assert bb.names == ["N", "CA", "C"] and bb.is_slice
    hb = CGMapping.from_preset(top, "heavy-backbone")
    assert hb.names == ["N", "CA", "C", "O", "CB"]
    x = ala2.xyz[0].astype(np.float64)
    np.testing.assert_allclose(hb.project(x), x[hb.bead_atoms], atol=1e-12)
    com = CGMapping.from_preset(top, "residue-com")
    assert com.n_cg == 3 and not com.is_slice and com.bead_atoms is None
    # bead masses are the residue masses: ACE 43.04, ALA 71.08, NME 30.05 (with hydrogens)
    np.testing.assert_allclose(com.masses(), [43.045, 71.079, 30.050], atol=0.01)


def test_presets_on_ten_residue_peptide(peptide):
    top = peptide.topology
    ca = CGMapping.from_preset(top, "ca")
    assert ca.n_cg == 10
    assert [r.name for r in ca.cg_topology.residues] == [r.name for r in top.residues]
    bb = CGMapping.from_preset(top, "backbone")
    assert bb.n_cg == 30
    # C-alpha beads bond along the chain: 9 bonds between consecutive residues
    assert ca.cg_bonds() == [(i, i + 1) for i in range(9)]
    np.testing.assert_allclose(ca.masses(), [a.element.mass for a in top.atoms if a.name == "CA"])
    assert CGMapping.from_preset(top, "residue-com").n_cg == 10


def test_heavy_backbone_on_glycine_names_residue_and_atom(peptide):
    with pytest.raises(ValueError, match=r"GLY1 .*no atom CB.*heavy-backbone"):
        CGMapping.from_preset(peptide.topology, "heavy-backbone")


def test_unknown_preset(ala2):
    with pytest.raises(ValueError, match="unknown mapping preset 'martini'"):
        CGMapping.from_preset(ala2.topology, "martini")


def test_cg_topology_round_trips_through_mdtraj(tmp_path, peptide):
    mapping = CGMapping.from_preset(peptide.topology, "backbone")
    cg = mapping.cg_trajectory(peptide)
    np.testing.assert_allclose(cg.xyz[0], peptide.xyz[0][mapping.bead_atoms], atol=1e-6)
    cg.save_pdb(str(tmp_path / "cg.pdb"))
    cg.save_dcd(str(tmp_path / "cg.dcd"))
    back = md.load(str(tmp_path / "cg.dcd"), top=str(tmp_path / "cg.pdb"))
    assert back.n_atoms == 30
    assert [a.name for a in back.topology.atoms] == mapping.names
    assert [r.name for r in back.topology.residues] == [r.name for r in peptide.topology.residues]
    np.testing.assert_allclose(back.xyz, cg.xyz, atol=1e-5)


def test_com_cg_topology_writes_and_reads(tmp_path, ala2):
    mapping = CGMapping.from_preset(ala2.topology, "residue-com")
    cg = mapping.cg_trajectory(ala2)
    cg.save_pdb(str(tmp_path / "cg.pdb"))
    back = md.load(str(tmp_path / "cg.pdb"))
    assert back.n_atoms == 3
    assert mapping.cg_bonds() == [(0, 1), (1, 2)]
    np.testing.assert_allclose(back.xyz, cg.xyz, atol=1e-3)  # PDB keeps 3 decimals in Angstrom


def test_cg_topology_writes_when_a_residue_is_split(tmp_path, ala2):
    # CB listed after the next residue's bead: the CG topology splits ALA2 into two pieces so that
    # bead i stays atom i and PDB writers (which need contiguous residues) still work
    lab = _labels(ala2.topology)
    mapping = CGMapping(ala2.topology, [[lab[name]] for name in CB_LAST], names=CB_LAST_NAMES)
    top = mapping.cg_topology
    assert [a.name for a in top.atoms] == mapping.names
    assert [r.name for r in top.residues] == ["ACE", "ALA", "NME", "ALA"]
    cg = mapping.cg_trajectory(ala2)
    cg.save_pdb(str(tmp_path / "cg.pdb"))
    back = md.load(str(tmp_path / "cg.pdb"))
    np.testing.assert_allclose(back.xyz, cg.xyz, atol=1e-3)
    assert [a.name for a in back.topology.atoms] == mapping.names


def test_groups_json_round_trip(tmp_path, ala2):
    top = ala2.topology
    lab = _labels(top)
    groups = [[lab[name]] for name in CB_LAST]
    groups.append([lab["ALA2-CA"], lab["ALA2-HA"]])
    mapping = CGMapping(top, groups, names=["C1", "N", "CA", "C", "N2", "CB", "CAH"])
    path = tmp_path / "groups.json"
    mapping.to_json(path)
    back = CGMapping.from_json(path, top)
    assert back.names == mapping.names
    np.testing.assert_array_equal(back.matrix, mapping.matrix)
    # a hand-written file with bare index lists and default (mass) weights also reads
    path.write_text(json.dumps({"groups": [[lab["ALA2-CA"], lab["ALA2-HA"]], [lab["ALA2-CB"]]]}))
    bare = CGMapping.from_json(path, top)
    m_c, m_h = 12.011, 1.008
    np.testing.assert_allclose(bare.weights[0], [m_c / (m_c + m_h), m_h / (m_c + m_h)], rtol=1e-3)
    assert bare.names == ["CM", "CB"]


def test_json_for_another_topology_is_refused(tmp_path, ala2, peptide):
    mapping = CGMapping.from_preset(ala2.topology, "heavy-backbone")
    path = tmp_path / "m.json"
    mapping.to_json(path)
    with pytest.raises(ValueError, match="written for 22 atoms but the topology has 138"):
        CGMapping.from_json(path, peptide.topology)
    data = json.loads(path.read_text())
    del data["n_atoms"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="another topology"):
        CGMapping.from_json(path, peptide.topology)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CGMapping.from_json(path, ala2.topology)


@pytest.mark.parametrize(
    "groups, weights, message",
    [
        ([[0, 1], []], None, r"group 1 is empty"),
        ([[0, 99]], None, r"group 0: atom index 99 is out of range for a topology of 22 atoms"),
        ([[0, -1]], None, r"group 0: atom index -1 is out of range"),
        ([[4, 4]], None, r"group 0: atom ACE1-C \(4\) appears twice"),
        ([[0, 1], [2]], [[0.5, 0.6], None], r"group 0: weights sum to 1.1, not 1"),
        ([[0, 1]], [[1.0]], r"group 0: 1 weights for 2 atoms"),
        ([[0, 1]], [[1.5, -0.5]], r"group 0: weight -0.5 of atom ACE1-CH3 is not a finite"),
    ],
)
def test_bad_groups_raise_naming_group_and_atom(ala2, groups, weights, message):
    with pytest.raises(ValueError, match=message):
        CGMapping(ala2.topology, groups, weights=weights)


def test_projection_rejects_wrong_shape_and_nan(ala2):
    mapping = CGMapping.from_preset(ala2.topology, "backbone")
    with pytest.raises(ValueError, match=r"expects \(\.\.\., 22, 3\)"):
        mapping.project(np.zeros((3, 21, 3)))
    x = np.zeros((2, 22, 3))
    x[1, 5, 2] = np.nan
    with pytest.raises(ValueError, match=r"NaN or infinite values \(first at index \(1, 5, 2\)\)"):
        mapping.check_positions(x)


def test_openmm_topology_is_accepted(ala2):
    omm = ala2.topology.to_openmm()
    assert CGMapping.from_preset(omm, "backbone").n_cg == 3
