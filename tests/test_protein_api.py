"""Protein models by name: load_model, the `backmap` command's contract, bad CG input.

The models here are tiny ProteinBackmappers fitted in seconds to noisy copies of chignolin and
installed under the shipped names in a temporary pretrained folder, so these tests check the
plumbing (names, topologies, files, energies, errors), never the shipped weights' quality.
"""

from __future__ import annotations

import re
from pathlib import Path

import mdtraj as md
import numpy as np
import openmm
import pytest
import torch
from _backmap_helpers import assert_amber_gbn2_energies, save_tiny_pretrained, tiny_protein_model
from openmm import app, unit

import openmm_backmap.io.protein_models as protein_models
from openmm_backmap import cli
from openmm_backmap.backmap import backmap_trajectory
from openmm_backmap.io.backmap_model import ProteinChainModel, ProteinModel, load_model
from openmm_backmap.io.energy_file import BACKMAP_COLUMNS, read_energy_file
from openmm_backmap.models.protein import ProteinBackmapper
from openmm_backmap.models.residues import MAPPINGS, build_chain, canonical_name
from openmm_backmap.openmm.reporter import BackmapReporter
from openmm_backmap.training.finetune import finetune_files
from openmm_backmap.training.protein import chain_positions

CHIGNOLIN = Path(__file__).resolve().parent.parent / "openmm_backmap" / "data" / "chignolin.pdb"


@pytest.fixture(scope="module")
def chignolin():
    traj = md.load(str(CHIGNOLIN))
    names, x = chain_positions(traj.topology, traj.xyz)
    return list(names), x.astype(np.float64)


@pytest.fixture(scope="module")
def pretrained_dir(chignolin, tmp_path_factory):
    names, x = chignolin
    return save_tiny_pretrained(tmp_path_factory.mktemp("pretrained"), names, x)


@pytest.fixture
def shipped(pretrained_dir, monkeypatch):
    """The tiny models stand in for the shipped ones."""
    monkeypatch.setattr(protein_models, "PRETRAINED_DIR", pretrained_dir)
    return pretrained_dir


def _cg_pdb(path: Path, residues, xyz_nm: np.ndarray, mapping: str, beads=None) -> Path:
    """A CG PDB: per residue (name, resSeq) the beads of ``mapping`` (or ``beads[r]``), coordinates
    taken in order from xyz_nm (written in Angstrom, as PDB files are)."""
    lines, n = [], 0
    for r, (name, seq) in enumerate(residues):
        known = name in ("HIS",) or name in MAPPINGS[mapping]
        for bead in beads[r] if beads else MAPPINGS[mapping][canonical_name(name)] if known else ("CA",):
            x, y, z = xyz_nm[n] * 10.0
            lines.append(f"ATOM  {n + 1:5d} {bead:^4s} {name:3s} A{seq:4d}    {x:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00")
            n += 1
    path.write_text("\n".join(lines) + "\nEND\n")
    return path


def _frames(chignolin, mapping: str, n_frames: int, seed: int = 1) -> np.ndarray:
    """CG frames (n_frames, n_cg, 3) nm: chignolin's beads, rotated and shifted per frame."""
    names, x = chignolin
    beads = build_chain(names)
    idx = [beads.atom(r, a) for r, n in enumerate(beads.names) for a in MAPPINGS[mapping][n]]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_frames):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        q *= np.sign(np.linalg.det(q))
        out.append(x[0, idx] @ q.T + rng.normal(0, 0.3, 3))
    return np.asarray(out)


SEQ = ["ACE", "HIS", "HID", "HIP", "LYS", "GLY", "SER", "TRP", "ARG", "NME"]  # chignolin's length


# ----------------------------------------------------------------------------- names
def test_load_model_by_name_and_bind(shipped, chignolin, tmp_path, capsys):
    unbound = load_model("protein-ca")
    assert isinstance(unbound, ProteinModel) and unbound.mapping == "ca"
    with pytest.raises(AttributeError, match=r"not yet bound to a chain, so it has no 'topology': bind it with"):
        unbound.topology  # noqa: B018
    res = [(n, 20 + r) for r, n in enumerate(SEQ)]
    pdb = _cg_pdb(tmp_path / "cg.pdb", res, _frames(chignolin, "ca", 1)[0], "ca")
    bound = load_model("protein-ca", cg_topology=pdb)
    assert isinstance(bound, ProteinChainModel) and bound.n_cg == 10
    top = bound.topology
    assert [r.name for r in top.residues] == ["ACE", "HIE", "HID", "HIP", "LYS", "GLY", "SER", "TRP", "ARG", "NME"]
    assert [r.resSeq for r in top.residues] == list(range(20, 30))
    residues = [{a.name for a in r.atoms} for r in top.residues]
    assert not residues[1] & {"H2", "H3"} and "OXT" not in residues[-2]  # capped: no charged termini
    his = [{a.name for a in r.atoms} for r in list(top.residues)[1:4]]
    assert ("HE2" in his[0], "HD1" in his[0]) == (True, False)
    assert ("HE2" in his[1], "HD1" in his[1]) == (False, True)
    assert {"HE2", "HD1"} <= his[2]
    # uncapped: charged termini
    pdb2 = _cg_pdb(tmp_path / "cg2.pdb", [("ALA", 1), ("GLY", 2), ("SER", 3)], np.eye(3) * 0.38, "ca")
    top2 = load_model("protein-ca", cg_topology=pdb2).topology
    assert {"H2", "H3"} <= {a.name for a in list(top2.residues)[0].atoms}
    assert "OXT" in {a.name for a in list(top2.residues)[-1].atoms}
    # a protein model file by path works as its name does
    assert isinstance(load_model(shipped / "protein-backbone.pt"), ProteinModel)
    assert cli.main(["info", "protein-backbone"]) == 0
    assert "mapping backbone: beads per residue N, CA, C" in capsys.readouterr().out
    with pytest.raises(
        ValueError, match=r"no pretrained model of that name; pretrained models: protein-backbone, protein-ca"
    ):
        load_model("protein-nope")


# ----------------------------------------------------------------------------- the command line
@pytest.mark.parametrize("mapping,name", [("ca", "protein-ca"), ("backbone", "protein-backbone")])
def test_backmap_command_contract(shipped, chignolin, tmp_path, mapping, name, capsys):
    """`openmm-backmap backmap --model NAME --cg cg.dcd --cg-topology cg.pdb --samples K --seed S
    --out aa.dcd --energies e.csv`: K samples per frame in frame order (each sample's beads are its
    frame's), aa.pdb beside with amber14 names, one CSV row per sample whose log_q is the model's
    density of the written sample and whose u_aa_kjmol is OpenMM's amber14 + GBn2 energy."""
    names, _ = chignolin
    n_frames, k = 3, 2
    X = _frames(chignolin, mapping, n_frames)
    _cg_pdb(tmp_path / "cg.pdb", [(n, r + 1) for r, n in enumerate(names)], X[0], mapping)
    cg_top = md.load_pdb(str(tmp_path / "cg.pdb"), standard_names=False).topology
    md.Trajectory(X.astype(np.float32), cg_top).save_dcd(str(tmp_path / "cg.dcd"))
    argv = ["backmap", "--model", name, "--cg", str(tmp_path / "cg.dcd"), "--cg-topology", str(tmp_path / "cg.pdb")]
    argv += ["--samples", str(k), "--seed", "7", "--out", str(tmp_path / "aa.dcd"), "--energies"]
    argv += [str(tmp_path / "e.csv"), "--no-progress"]
    assert cli.main(argv) == 0, capsys.readouterr().err

    model = load_model(name, cg_topology=tmp_path / "cg.pdb", device="cpu")
    pdb = app.PDBFile(str(tmp_path / "aa.pdb"))  # OpenMM keeps the names as written
    assert [a.name for a in pdb.topology.atoms()] == model.metadata["atom_names"]
    assert [r.name for r in pdb.topology.residues()][:2] == ["GLY", "TYR"]
    aa = md.load_dcd(str(tmp_path / "aa.dcd"), top=str(tmp_path / "aa.pdb"))
    assert aa.n_frames == n_frames * k
    beads = model.module.beads.numpy()
    np.testing.assert_allclose(aa.xyz[:, beads], np.repeat(X, k, axis=0), atol=2e-5)  # frame-major
    rows = np.genfromtxt(tmp_path / "e.csv", delimiter=",", names=True)
    assert rows.dtype.names == BACKMAP_COLUMNS and len(rows) == n_frames * k
    np.testing.assert_array_equal(rows["frame"], np.repeat(np.arange(n_frames), k))
    np.testing.assert_array_equal(rows["sample"], np.tile(np.arange(k), n_frames))
    lq = model.log_prob(aa.xyz, np.repeat(X, k, axis=0).astype(np.float32))
    np.testing.assert_allclose(rows["log_q"], lq, rtol=1e-4, atol=5e-2)

    assert_amber_gbn2_energies(pdb.topology, aa.xyz, rows["u_aa_kjmol"], (0, n_frames * k - 1))
    # the same seed gives the same samples
    argv2 = [a.replace("aa.dcd", "aa2.dcd").replace("e.csv", "e2.csv") for a in argv]
    assert cli.main(argv2) == 0
    np.testing.assert_array_equal(md.load_dcd(str(tmp_path / "aa2.dcd"), top=str(tmp_path / "aa.pdb")).xyz, aa.xyz)


# ----------------------------------------------------------------------------- bad input
def _backmap(tmp_path, residues, X, mapping="ca", beads=None):
    pdb = _cg_pdb(tmp_path / "cg.pdb", residues, X[0], mapping, beads)
    top = md.load_pdb(str(pdb), standard_names=False).topology
    md.Trajectory(X.astype(np.float32), top).save_dcd(str(tmp_path / "cg.dcd"))
    return backmap_trajectory(
        f"protein-{mapping}" if mapping == "ca" else "protein-backbone",
        tmp_path / "cg.dcd",
        pdb,
        tmp_path / "aa.dcd",
        energies=tmp_path / "e.csv",
        progress=False,
    )


def test_bad_cg_input_is_named(shipped, chignolin, tmp_path, capsys):
    names, _ = chignolin
    X = _frames(chignolin, "ca", 2)
    res = [(n, r + 1) for r, n in enumerate(names)]
    # an unknown residue name, named with its number
    bad = list(res)
    bad[3] = ("XYZ", 4)
    with pytest.raises(ValueError, match=r"residue XYZ4 \(number 4 in the chain\): unknown residue name 'XYZ'"):
        _backmap(tmp_path, bad, X)
    # bead names that are not the mapping's
    beads = [["CA"]] * 10
    beads[2] = ["CB"]
    with pytest.raises(ValueError, match=r"residue ASP3 has beads \['CB'\], but the 'ca' mapping expects \['CA'\]"):
        _backmap(tmp_path, res, X, beads=beads)
    # a CA-only PDB given to the backbone model
    with pytest.raises(
        ValueError, match=r"GLY1 has beads \['CA'\], but the 'backbone' mapping expects \['N', 'CA', 'C'\]"
    ):
        _backmap(tmp_path, res, X, mapping="backbone", beads=[["CA"]] * 10)
    # a gap in the residue numbering
    gap = [(n, r + 1 + (r >= 5)) for r, n in enumerate(names)]
    with pytest.raises(ValueError, match="residue numbers jump from GLU5 to THR7: a residue is missing"):
        _backmap(tmp_path, gap, X)
    # a missing residue that the numbering hides: C-alphas far beyond 0.38 nm apart
    far = X.copy()
    far[1, 6:] += np.array([0.4, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"C-alpha beads of THR6 and GLY7 are 0\.\d\d nm apart in frame 1 .*missing"):
        _backmap(tmp_path, res, far)
    # Angstrom: ten times too long
    with pytest.raises(ValueError, match=r"median 3\.\d\d nm apart .*Angstrom; give them in nm"):
        _backmap(tmp_path, res, X * 10.0)
    assert not (tmp_path / "aa.dcd").exists()
    # through the command line the message reaches the user
    argv = ["backmap", "--model", "protein-ca", "--cg", str(tmp_path / "cg.dcd"), "--cg-topology"]
    argv += [str(tmp_path / "cg.pdb"), "--out", str(tmp_path / "aa.dcd"), "--no-progress"]
    assert cli.main(argv) == 2
    assert "look like Angstrom" in capsys.readouterr().err


# ----------------------------------------------------------------------------- sampling order
def test_every_row_is_sampled_after_what_it_sees(chignolin):
    """Sampling places rows level by level: each row's references and context atoms must be placed
    at lower levels, else sampling sees zeros where log_prob sees atoms and the log q it reports is
    not the density of its sample. Chignolin has adjacent residues whose side chains are placed in
    different stages out of residue order (THR7 after TRP8)."""
    names, x = chignolin
    model = tiny_protein_model("ca", names, x).double()
    rng = np.random.default_rng(0)
    from openmm_backmap.models.residues import STANDARD

    seqs = [names] + [list(rng.choice(STANDARD, 7)) for _ in range(6)] + [["ACE", "TRP", "THR", "TYR", "NME"]]
    for seq in seqs:
        ch = model.for_sequence(seq)
        level = {int(b): -1 for b in ch.beads}
        for lv in range(len(ch.level_bounds) - 1):
            for n in range(ch.level_bounds[lv], ch.level_bounds[lv + 1]):
                level[int(ch.rows[n, 0])] = lv
        for lv in range(len(ch.level_bounds) - 1):
            for n in range(ch.level_bounds[lv], ch.level_bounds[lv + 1]):
                seen = [int(a) for a in ch.rows[n, 1:]] + [int(a) for a, m in zip(ch.ctx[n], ch.ctx_mask[n]) if m > 0]
                assert all(level[a] < lv for a in seen), (seq, ch.keys[int(ch.order[n])])
    ch = model.for_sequence(names)
    cg = torch.as_tensor(_frames(chignolin, "ca", 3), dtype=torch.float64)
    torch.manual_seed(3)
    with torch.no_grad():
        aa, lq = ch.sample(cg, 2)
        np.testing.assert_allclose(ch.log_prob(aa, cg.repeat_interleave(2, 0)).numpy(), lq.numpy(), atol=1e-8)


# ----------------------------------------------------------------------------- mapping entropy
def test_mapping_entropy_of_a_protein_model_on_a_reference_in_another_atom_order(shipped, chignolin):
    """`mapping_entropy("protein-ca", reference)` binds the model to the reference's chain and reads
    a reference (and its System) that lists each residue's atoms in another order: every figure is
    the same as with the reference in the model's own order."""
    from openmm_backmap.analysis.entropy import mapping_entropy
    from openmm_backmap.systems.peptides import make_gbn2_system

    names, x = chignolin
    bound = load_model("protein-ca", cg_topology=_cg_pdb_topology(names, x))
    top = md.Topology.from_openmm(bound.topology) if not isinstance(bound.topology, md.Topology) else bound.topology
    rng = np.random.default_rng(3)
    xyz = (x[0] + rng.normal(0.0, 0.004, (12,) + x.shape[1:])).astype(np.float32)
    # the same molecule, each residue's atoms reversed
    order = np.concatenate([[a.index for a in r.atoms][::-1] for r in top.residues])
    shuffled = _reordered(top, order)
    # the tiny model's constrained X-H lengths are its data's means: the System's are set to them
    lengths = {tuple(sorted((int(i), int(j)))): float(d) for i, j, d in bound.metadata["constraints"]}
    results = []
    for t, positions, where in ((top, xyz, np.arange(top.n_atoms)), (shuffled, xyz[:, order], order)):
        system = make_gbn2_system(t.to_openmm())
        for c in range(system.getNumConstraints()):
            i, j, _ = system.getConstraintParameters(c)
            mi, mj = sorted((int(where[i]), int(where[j])))
            system.setConstraintParameters(c, i, j, lengths[(mi, mj)])
        traj = md.Trajectory(positions, t)
        results.append(mapping_entropy("protein-ca", traj, aa_system=system, samples=4, frames=12, seed=5))
    plain, reordered = results
    assert reordered["cross_entropy"]["value"] == pytest.approx(plain["cross_entropy"]["value"], rel=1e-9)
    # amber14's createSystem gives a few angles other parameters when a residue lists its atoms in
    # another order (HarmonicAngleForce 356.7891 vs 356.7843 kJ/mol for chignolin's PDB structure),
    # so the figures that use U agree to that level, not to rounding
    for key in ("energy_route", "conditional_ess"):
        assert reordered[key]["value"] == pytest.approx(plain[key]["value"], rel=2e-3), key
    assert np.isfinite(plain["cross_entropy"]["value"]) and plain["mapping"]["beads"] == 10
    # a reference of another molecule is refused, naming the atoms it lacks
    other = _reordered(top, [a.index for a in top.atoms if not (a.residue.index == 1 and a.name == "HH")])
    with pytest.raises(ValueError, match="atoms"):
        mapping_entropy(
            "protein-ca", md.Trajectory(xyz[:, : other.n_atoms], other), aa_system=system, samples=2, frames=4
        )


def _reordered(top: md.Topology, order: np.ndarray) -> md.Topology:
    """``top`` with its atoms listed in ``order`` (residues kept; ``Topology.subset`` sorts them)."""
    out = md.Topology()
    chain = out.add_chain()
    atoms = list(top.atoms)
    new, residues = {}, {}
    for k in order:
        a = atoms[int(k)]
        if a.residue.index not in residues:
            residues[a.residue.index] = out.add_residue(a.residue.name, chain, resSeq=a.residue.resSeq)
        new[int(k)] = out.add_atom(a.name, a.element, residues[a.residue.index])
    for a, b in top.bonds:
        if a.index in new and b.index in new:
            out.add_bond(new[a.index], new[b.index])
    return out


def _cg_pdb_topology(names, x):
    """The CA-bead mdtraj topology of a chain (three-letter names as the model reads them)."""
    top = md.Topology()
    chain = top.add_chain()
    for r, name in enumerate(names):
        residue = top.add_residue(name, chain, resSeq=r + 1)
        top.add_atom("CA", md.element.carbon, residue)
    return top


# ----------------------------------------------------------------------------- the reporter
def test_reporter_binds_a_protein_model_by_name(shipped, chignolin, tmp_path):
    """BackmapReporter(model="protein-ca", atomSubset=...) on a CG System that holds the chain (one
    CA bead per residue, harmonic CA-CA bonds in group 0) and a tethered particle (group 1): the
    chain is read from the Simulation's topology at atomSubset, the frames carry amber14 atoms,
    and U_AA is amber14 + GBn2 (checked against an OpenMM Context). A second copy with other
    residues is refused, naming the copy."""
    names, _ = chignolin
    X = _frames(chignolin, "ca", 1)[0]
    top = app.Topology()  # particle 0: the tethered one; 1..10: the chain
    top.addAtom("P", None, top.addResidue("SOL", top.addChain()))
    chain = top.addChain()
    for r, name in enumerate(names):
        top.addAtom("CA", app.Element.getBySymbol("C"), top.addResidue(name, chain, id=str(r + 1)))
    alanines = top.addChain()  # particles 11..20: a second chain, all alanine (no forces)
    for r in range(len(names)):
        top.addAtom("CA", app.Element.getBySymbol("C"), top.addResidue("ALA", alanines, id=str(r + 1)))
    system = openmm.System()
    for _ in range(2 * len(names) + 1):
        system.addParticle(110.0)
    bonds = openmm.HarmonicBondForce()
    for r in range(len(names) - 1):
        bonds.addBond(r + 1, r + 2, float(np.linalg.norm(X[r + 1] - X[r])), 2000.0)
    system.addForce(bonds)
    tether = openmm.CustomExternalForce("10*(x^2+y^2+z^2)")
    tether.addParticle(0, [])
    tether.setForceGroup(1)
    system.addForce(tether)
    positions = np.concatenate([[[0.1, 0.0, 0.0]], X, X + 2.0])
    integ = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 5.0 / unit.picosecond, 0.001 * unit.picoseconds)
    integ.setRandomNumberSeed(2)
    sim = app.Simulation(top, system, integ, openmm.Platform.getPlatformByName("Reference"))
    sim.context.setPositions(positions)
    subset = list(range(1, len(names) + 1))
    reporter = BackmapReporter(
        tmp_path / "aa.dcd", 5, model="protein-ca", energyFile=tmp_path / "w.csv", atomSubset=subset, cgForceGroups=[0]
    )
    sim.reporters.append(reporter)
    sim.step(10)
    reporter.close()
    model = reporter.model
    assert isinstance(model, ProteinChainModel) and model.topology.n_residues == len(names)
    aa = md.load_dcd(str(tmp_path / "aa.dcd"), top=model.topology)
    rows = read_energy_file(tmp_path / "w.csv")
    assert aa.n_frames == 2 == len(rows["step"])
    assert_amber_gbn2_energies(model.topology.to_openmm(), aa.xyz, rows["u_aa_kjmol"], range(2))
    # a second "copy" that is another chain
    bad = BackmapReporter(tmp_path / "b.dcd", 5, model="protein-ca", atomSubset=[subset, list(range(11, 21))])
    with pytest.raises(
        ValueError, match="atomSubset copy 1: the CG topology's residues ALA ALA .* not the model's chain GLY TYR"
    ):
        bad.describeNextReport(sim)
    bad.close()


# ----------------------------------------------------------------------------- finetune
def test_finetune_refines_from_cg_frames_alone(shipped, chignolin, tmp_path, capsys):
    """`openmm-backmap finetune --model protein-ca --cg cg.dcd --cg-topology cg.pdb --out mine.pt`:
    reverse KL on amber14 + GBn2 from CG frames alone lowers the held-out reverse-KL estimate and
    the median U_AA of the tiny model (fitted to noisy copies, so its bonds are too loose), and
    writes a protein model file that loads by path and backmaps with exact log q."""
    names, _ = chignolin
    X = _frames(chignolin, "ca", 12)
    _cg_pdb(tmp_path / "cg.pdb", [(n, r + 1) for r, n in enumerate(names)], X[0], "ca")
    cg_top = md.load_pdb(str(tmp_path / "cg.pdb"), standard_names=False).topology
    md.Trajectory(X.astype(np.float32), cg_top).save_dcd(str(tmp_path / "cg.dcd"))
    argv = ["finetune", "--model", "protein-ca", "--cg", str(tmp_path / "cg.dcd"), "--cg-topology"]
    argv += [str(tmp_path / "cg.pdb"), "--out", str(tmp_path / "mine.pt"), "--steps", "40", "--batch", "4"]
    argv += ["--t-start", "600", "--eval-every", "10", "--lr", "3e-3"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    tuned = ProteinBackmapper.load(tmp_path / "mine.pt")
    record = tuned.info["finetune"]
    assert record["sequence"] == list(names) and record["steps_run"] == 40
    start, best = record["start"], record["best"]
    assert record["best_step"] >= 20  # a state after the anneal to 300 K
    assert best["val_kl"] < start["val_kl"] - 5.0, (start, best)
    assert best["val_median_u"] < start["val_median_u"], (start, best)
    # the file is a protein model: by path, bound to the chain, with exact log q of its samples
    model = load_model(tmp_path / "mine.pt", cg_topology=tmp_path / "cg.pdb", device="cpu")
    aa, lq = model.sample(X[:2].astype(np.float32), 3, seed=1)
    np.testing.assert_allclose(model.log_prob(aa, np.repeat(X[:2], 3, axis=0).astype(np.float32)), lq, atol=5e-2)
    capsys.readouterr()
    assert cli.main(["info", str(tmp_path / "mine.pt")]) == 0
    assert f"fine-tuned on {'-'.join(names)}: 40 steps" in capsys.readouterr().out
    # the output is refused before any work when it exists or is the model it reads
    assert cli.main(argv) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    bad = ["finetune", "--model", str(tmp_path / "mine.pt"), "--cg", str(tmp_path / "cg.dcd"), "--cg-topology"]
    bad += [str(tmp_path / "cg.pdb"), "--out", str(tmp_path / "mine.pt"), "--overwrite"]
    assert cli.main(bad) == 2
    assert "would destroy the input" in capsys.readouterr().err


def test_finetune_bad_input_is_named(shipped, chignolin, tmp_path, capsys):
    names, _ = chignolin
    X = _frames(chignolin, "ca", 4)
    _cg_pdb(tmp_path / "cg.pdb", [(n, r + 1) for r, n in enumerate(names)], X[0], "ca")
    cg_top = md.load_pdb(str(tmp_path / "cg.pdb"), standard_names=False).topology
    md.Trajectory(10 * X.astype(np.float32), cg_top).save_dcd(str(tmp_path / "angstrom.dcd"))
    base = ["finetune", "--cg-topology", str(tmp_path / "cg.pdb"), "--out", str(tmp_path / "mine.pt")]
    cases = [
        (["--model", "protein-ca", "--cg", str(tmp_path / "angstrom.dcd")], r"look like Angstrom"),
        (["--model", "protein-ca", "--cg", str(tmp_path / "none.dcd")], r"none\.dcd does not exist"),
        (["--model", "protein-backbone", "--cg", str(tmp_path / "angstrom.dcd")], r"cg\.pdb"),
        (["--model", "protein-ca", "--cg", str(tmp_path / "angstrom.dcd"), "--t-start", "200"], r"t_start"),
        (
            ["--model", "protein-ca", "--cg", str(tmp_path / "angstrom.dcd"), "--pair-core-kt", "-1"],
            r"pair_core_kt must be",
        ),
    ]
    for extra, message in cases:
        assert cli.main(base + extra) == 2
        err = capsys.readouterr().err
        assert re.search(message, err), err
        assert not (tmp_path / "mine.pt").exists()
    with pytest.raises(ValueError, match=r"is not a protein model: finetune refines"):
        finetune_files(str(tmp_path / "cg.pdb"), tmp_path / "angstrom.dcd", tmp_path / "cg.pdb", tmp_path / "m.pt")
