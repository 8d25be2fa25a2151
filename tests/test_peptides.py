"""Peptide builder geometry, amber14 + GBn2 systems, and the resumable corpus generator."""

import argparse
import json
import os

import numpy as np
import pytest

openmm = pytest.importorskip("openmm")
pytest.importorskip("pdbfixer")

from openmm import app, unit  # noqa: E402

from openmm_backmap.systems import peptides as P  # noqa: E402

# Two 11-residue peptides hold the 22 residue types; both termini kinds; cis Pro in both kinds.
CHARGED_11 = ["ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "GLY", "HID", "HIE", "HIP"]
CAPPED_11 = ["ILE", "LEU", "LYS", "MET", "PHE", "PRO", "SER", "THR", "TRP", "TYR", "VAL"]
CASES = [
    (CHARGED_11, "charged", []),
    (CAPPED_11, "capped", []),
    (["ALA", "PRO", "GLY"], "capped", [1]),
    (["PRO", "PRO", "THR"], "capped", [0]),  # cis ACE-Pro bond
    (["GLY", "PRO", "ILE"], "charged", [1]),
]


@pytest.fixture(scope="module")
def forcefield():
    return P.make_forcefield()


@pytest.fixture(scope="module")
def built(forcefield):
    return [P.build_peptide(seq, termini, cis, forcefield) for seq, termini, cis in CASES]


def _omegas_and_signs(topology, positions, cis_topology):
    geometry = P.check_geometry(topology, positions, cis_topology)
    return np.array(geometry["omega"]), geometry["chirality"]


def _assert_geometry(topology, positions, seq, termini, cis):
    offset = 1 if termini == "capped" else 0
    cis_topology = [i + offset for i in cis]
    omega, signs = _omegas_and_signs(topology, positions, cis_topology)
    for bond, value in enumerate(omega):  # bond k precedes residue k + 1
        if bond + 1 in cis_topology:
            assert abs(value) < P.OMEGA_CIS_MAX
        else:
            assert abs(value) > P.OMEGA_TRANS_MIN
    # mdtraj's independent omega (CA-C-N-CA) agrees with ours on the standard residues.
    import mdtraj as md

    traj = md.Trajectory(np.asarray(positions.value_in_unit(unit.nanometer))[None], md.Topology.from_openmm(topology))
    _, md_omega = md.compute_omega(traj)
    ours = [
        omega[k - 1]
        for k, r in enumerate(topology.residues())
        if k > 0 and r.name not in P.CAPS and list(topology.residues())[k - 1].name != "ACE"
    ]
    np.testing.assert_allclose(
        np.cos(md_omega[0][: len(ours)]),  # mdtraj: radians
        np.cos(np.radians(ours)),
        atol=1e-4,
    )
    n_stereo = sum(r != "GLY" for r in seq) + sum(r in ("ILE", "THR") for r in seq)
    assert len(signs) == n_stereo and all(s > 0 for s in signs.values())


def test_every_residue_type_builds_with_trans_l_geometry_and_amber14_gbn2_system(built, forcefield):
    for (seq, termini, cis), (topology, positions) in zip(CASES, built):
        names = [r.name for r in topology.residues()]
        assert names == (["ACE", *seq, "NME"] if termini == "capped" else seq)
        _assert_geometry(topology, positions, seq, termini, cis)
        system = P.make_gbn2_system(topology, forcefield=forcefield)  # template matching succeeds
        assert system.getNumParticles() == topology.getNumAtoms()
        atoms = {(r.name, a.name) for r in topology.residues() for a in r.atoms()}
        if termini == "charged":
            assert {(seq[0], "H"), (seq[0], "H2"), (seq[0], "H3"), (seq[-1], "OXT")} <= atoms
        else:
            assert {("ACE", "CH3"), ("ACE", "O"), ("NME", "N"), ("NME", "C")} <= atoms
    # Protonation states at pH 7 (by hydrogen names and total charge of the charged 11-mer).
    topology, _ = built[0]
    h = {r.name: {a.name for a in r.atoms() if a.element.symbol == "H"} for r in topology.residues()}
    assert "HD1" in h["HID"] and "HE2" not in h["HID"]
    assert "HE2" in h["HIE"] and "HD1" not in h["HIE"]
    assert {"HD1", "HE2"} <= h["HIP"] and "HG" in h["CYS"] and "HD2" not in h["ASP"]
    system = P.make_gbn2_system(topology, forcefield=forcefield)
    nb = next(f for f in system.getForces() if isinstance(f, openmm.NonbondedForce))
    charge = sum(
        nb.getParticleParameters(i)[0].value_in_unit(unit.elementary_charge) for i in range(system.getNumParticles())
    )
    # NH3+ / COO- cancel; ARG +1, ASP -1, GLU -1, HIP +1 -> net 0.
    assert charge == pytest.approx(0.0, abs=1e-6)


def test_geometry_survives_minimisation(built, forcefield):
    for (seq, termini, cis), (topology, positions) in zip(CASES, built):
        system = P.make_gbn2_system(topology, forcefield=forcefield)
        platform, properties = P.make_platform("CPU")
        context = openmm.Context(system, openmm.VerletIntegrator(0.001), platform, properties)
        context.setPositions(positions)
        e0 = context.getState(getEnergy=True).getPotentialEnergy()
        openmm.LocalEnergyMinimizer.minimize(context, 10.0, 100)
        state = context.getState(getEnergy=True, getPositions=True)
        # build_peptide returns minimised positions, so a second minimisation can only keep the
        # energy, within the CPU platform's rounding (it came out 1e-5 kJ/mol higher in one CI run)
        assert state.getPotentialEnergy() <= e0 + 1e-3 * unit.kilojoule_per_mole
        _assert_geometry(topology, state.getPositions(asNumpy=True), seq, termini, cis)


def test_chirality_convention_matches_ideal_templates_and_refuses_mirror_images():
    import pdbfixer

    templates = os.path.join(os.path.dirname(pdbfixer.__file__), "templates")
    for name in P.STANDARD_RESIDUES:
        if name in ("GLY", "HID", "HIE", "HIP"):
            continue
        pdb = app.PDBFile(os.path.join(templates, f"{name}.pdb"))
        atoms = P._atom_positions(pdb.topology, pdb.positions)[0]
        neighbours, sign = P._CHIRAL_CENTRES["CA"]
        assert P._chirality(atoms, "CA", neighbours) * sign > 1.0  # ~2.5 A^3 for ideal L residues
        if name in ("ILE", "THR"):
            neighbours, sign = P._CHIRAL_CENTRES[f"{name}:CB"]
            assert P._chirality(atoms, "CB", neighbours) * sign > 1.0
    # A mirror image of a built peptide keeps every omega but inverts every stereocentre.
    topology, positions = P.build_peptide(["ALA", "THR", "GLY"])
    mirror = np.asarray(positions.value_in_unit(unit.nanometer)) * np.array([1.0, 1.0, -1.0])
    with pytest.raises(ValueError, match="ALA0: wrong chirality at CA"):
        P.check_geometry(topology, mirror)


def test_template_overlay_is_a_proper_rotation_and_builds_unstrained_rings(forcefield):
    import pdbfixer.pdbfixer as pdbfixer_module

    rng = np.random.default_rng(0)
    template = rng.normal(size=(5, 3))
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    target = template @ (q * np.sign(np.linalg.det(q))).T + 1.0
    mirror = target * np.array([1.0, 1.0, -1.0])

    def fit(points):  # pdbfixer's call convention: Vec3 lists, rotate @ (p + t2) + t1
        t2, rot, t1 = pdbfixer_module._overlayPoints(
            [openmm.Vec3(*r) for r in points], [openmm.Vec3(*r) for r in template]
        )
        return np.linalg.det(rot), (template + np.asarray(t2)) @ rot.T + np.asarray(t1)

    det, fitted = fit(mirror)
    assert det == pytest.approx(-1.0)  # pdbfixer alone reflects the template onto a mirror image
    np.testing.assert_allclose(fitted, mirror, atol=1e-9)
    with P._proper_template_overlay():
        det, fitted = fit(target)
        assert det == pytest.approx(1.0)
        np.testing.assert_allclose(fitted, target, atol=1e-9)
        det, fitted = fit(mirror)
        assert det == pytest.approx(1.0) and np.abs(fitted - mirror).max() > 0.1
    assert fit(mirror)[0] == pytest.approx(-1.0)  # restored on exit
    # Unrelaxed build of a cis Gly-Pro: a mirrored Pro ring put CD onto C (forces ~4e5 kJ/mol/nm).
    topology, positions = P.build_peptide(["GLY", "PRO", "TRP"], "charged", [1], forcefield, relax=False)
    system = P.make_gbn2_system(topology, forcefield=forcefield)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)
    forces = context.getState(getForces=True).getForces(asNumpy=True)
    assert np.abs(forces.value_in_unit(unit.kilojoule_per_mole / unit.nanometer)).max() < 5e4


def test_dihedral_closed_form():
    p = [np.array(v, float) for v in ([1, 0, 0], [0, 0, 0], [0, 1, 0])]
    for angle in (-150.0, -60.0, 0.0, 45.0, 179.0):
        a = np.radians(angle)
        p3 = np.array([np.cos(a), 1.0, -np.sin(a)])
        assert P.dihedral(*p, p3) == pytest.approx(angle, abs=1e-9)


def test_builder_refuses_bad_requests():
    with pytest.raises(ValueError, match=r"'XYZ' at position 1"):
        P.build_peptide(["ALA", "XYZ", "GLY"])
    with pytest.raises(ValueError, match=r"'HIS' at position 0 \(choose HID, HIE or HIP\)"):
        P.build_peptide(["HIS", "ALA"])
    with pytest.raises(ValueError, match="position 1, which is not PRO"):
        P.build_peptide(["ALA", "GLY"], cis_prolines=[1])
    with pytest.raises(ValueError, match="no preceding peptide bond"):
        P.build_peptide(["PRO", "GLY"], termini="charged", cis_prolines=[0])
    with pytest.raises(ValueError, match="termini"):
        P.build_peptide(["ALA"], termini="zwitter")


def test_hydrogen_mass_repartitioning_conserves_mass(built, forcefield):
    topology, _ = built[2]
    standard = P.make_gbn2_system(topology, forcefield=forcefield)
    hmr = P.make_gbn2_system(topology, 4.0, forcefield=forcefield)
    masses = [
        [s.getParticleMass(i).value_in_unit(unit.dalton) for i in range(s.getNumParticles())] for s in (standard, hmr)
    ]
    elements = [a.element for a in topology.atoms()]
    # amber14 lists standard masses to 0.01 Da (N 14.01, C 12.01), not IUPAC values.
    assert masses[0] == pytest.approx([e.mass.value_in_unit(unit.dalton) for e in elements], abs=0.01)
    assert sum(masses[1]) == pytest.approx(sum(masses[0]))
    assert all(m == pytest.approx(4.0) for m, e in zip(masses[1], elements) if e.symbol == "H")


def test_corpus_writes_layout_with_finite_energies_and_resumes(tmp_path, forcefield):
    import mdtraj as md

    specs = [P.PeptideSpec("a", ["ALA", "GLY", "SER"], "charged"), P.PeptideSpec("b", ["PRO"], "capped", [0], 350.0)]
    config = P.MDConfig(equilibration_ps=0.2, production_ps=1.0, save_interval_ps=0.25, platform="CPU", seed=3)
    (tmp_path / "a.tmp").mkdir()  # debris of a killed run is rebuilt, never listed
    assert P.generate_corpus(specs, tmp_path, config) == ["a", "b"]
    assert json.loads((tmp_path / "manifest.json").read_text()) == {"finished": ["a", "b"]}
    assert not (tmp_path / "a.tmp").exists()
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert meta["sequence"] == ["ACE", "PRO", "NME"] and meta["cis_pro"] == [1]
    assert meta["temperature_K"] == 350.0 and meta["n_frames"] == 4 and meta["hmr_mass_amu"] == 4.0
    for pid in ("a", "b"):
        d = tmp_path / pid
        traj = md.load(str(d / "traj.dcd"), top=str(d / "topology.pdb"))
        assert traj.n_frames == 4
        system = openmm.XmlSerializer.deserialize((d / "system.xml").read_text())
        pdb = app.PDBFile(str(d / "topology.pdb"))
        for i, atom in enumerate(pdb.topology.atoms()):
            assert system.getParticleMass(i).value_in_unit(unit.dalton) == pytest.approx(
                atom.element.mass.value_in_unit(unit.dalton), abs=0.01
            )
        context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
        for frame in traj.xyz:
            context.setPositions(frame.astype(np.float64))
            energy = context.getState(getEnergy=True).getPotentialEnergy()
            assert np.isfinite(energy.value_in_unit(unit.kilojoule_per_mole))
        if pid == "b":
            index = {(a.residue.name, a.name): a.index for a in traj.topology.atoms}
            quad = [index[k] for k in (("ACE", "CH3"), ("ACE", "C"), ("PRO", "N"), ("PRO", "CA"))]
            omega = np.degrees(md.compute_dihedrals(traj, [quad]))
            assert np.all(np.abs(omega) < P.OMEGA_CIS_MAX_MD)  # thermal frames: still cis
    stamp = (tmp_path / "a" / "traj.dcd").stat().st_mtime_ns
    assert P.generate_corpus(specs, tmp_path, config) == ["a", "b"]
    assert (tmp_path / "a" / "traj.dcd").stat().st_mtime_ns == stamp
    assert "skip a (finished)" in (tmp_path / "gen.log").read_text()


def test_manifest_writers_in_parallel_leave_one_whole_manifest(tmp_path):
    """Several threads (as several corpus jobs) writing one corpus's manifest at once: every write
    succeeds, the manifest is whole JSON listing every finished entry, no temporary file is left."""
    import threading

    for k in range(6):
        (tmp_path / f"p{k}").mkdir()
        (tmp_path / f"p{k}" / "meta.json").write_text("{}")
    (tmp_path / "p9.tmp").mkdir()
    errors = []

    def write():
        try:
            for _ in range(50):
                P._write_manifest(tmp_path)
        except Exception as exc:  # noqa: BLE001 - any failure of a writer fails the test
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert json.loads((tmp_path / "manifest.json").read_text()) == {"finished": [f"p{k}" for k in range(6)]}
    assert not list(tmp_path.glob(".manifest.*"))


def _assert_no_heldout_window(specs):
    """No sequence of ``specs`` holds a 3-residue window of a held-out sequence."""
    words = P._heldout_words(3)
    for s in specs:
        letters = "".join(P.ONE_LETTER[r] for r in s.sequence)
        assert not any(letters[i : i + 3] in words for i in range(len(letters) - 2)), s.id


def test_trans_proline_set_puts_every_type_before_a_trans_proline():
    """The corpus's X-Pro set: every residue type but proline once directly before a proline, all
    X-Pro bonds trans, caps and charged termini, no held-out 3-residue window; deterministic."""
    specs = P.trans_proline_sequences(2024)
    assert [s.sequence for s in specs] == [s.sequence for s in P.trans_proline_sequences(2024)]
    before = [s.sequence[s.sequence.index("PRO") - 1] for s in specs]
    assert sorted(before) == sorted(r for r in P.STANDARD_RESIDUES if r != "PRO")
    assert all(not s.cis_prolines and s.temperature == 300.0 for s in specs)
    assert {s.termini for s in specs} == {"charged", "capped"}
    _assert_no_heldout_window(specs)
    assert not {s.id for s in specs} & {s.id for s in P.default_corpus_sequences(2024)}


@pytest.mark.parametrize("start", ["extended", "helix"])
def test_long_peptides_cover_every_type_and_avoid_heldout_windows(start):
    """The corpus's longer peptides (strands and helices): 10-14 residues, every residue type
    (histidines apart), trans, 300 K, both termini, no held-out 3-residue window, ids apart from the
    other sets; deterministic, and a longer list starts with the shorter one."""
    specs = P.long_peptide_sequences(2024, 12, start)
    assert [s.sequence for s in specs] == [s.sequence for s in P.long_peptide_sequences(2024, 5, start)] + [
        s.sequence for s in specs[5:]
    ]
    assert {s.start for s in specs} == {start}
    assert all(s.id.startswith("hx" if start == "helix" else "lp") for s in specs)
    assert sorted({len(s.sequence) for s in specs}) == list(P.LONG_LENGTHS)
    assert {r for s in specs for r in s.sequence} == set(P.STANDARD_RESIDUES)
    assert all(not s.cis_prolines and s.temperature == 300.0 for s in specs)
    assert {s.termini for s in specs} == {"charged", "capped"}
    _assert_no_heldout_window(specs)
    assert all(a != b for s in specs for a, b in zip(s.sequence, s.sequence[1:]))
    other_start = "extended" if start == "helix" else "helix"
    others = P.default_corpus_sequences(2024) + P.trans_proline_sequences(2024)
    others += P.long_peptide_sequences(2024, 12, other_start)
    assert not {s.id for s in specs} & {s.id for s in others}
    assert not {tuple(s.sequence) for s in specs} & {tuple(s.sequence) for s in others}


def test_helical_build_is_an_alpha_helix_with_trans_l_geometry(forcefield):
    """``start="helix"``: after the builder's minimisation the inner residues keep alpha-helical
    phi/psi and CA(i)-CA(i+4) near the helix's 0.62 nm, with the same trans/L checks as strands;
    an unknown start is refused by name."""
    import mdtraj as md

    seq = ["ALA", "GLU", "LEU", "LYS", "ALA", "TRP", "GLN", "SER", "ALA"]
    topology, positions = P.build_peptide(seq, "capped", forcefield=forcefield, start="helix")
    _assert_geometry(topology, positions, seq, "capped", [])
    traj = md.Trajectory(np.asarray(positions.value_in_unit(unit.nanometer))[None], md.Topology.from_openmm(topology))
    phi = np.degrees(md.compute_phi(traj)[1][0])[1:-1]
    psi = np.degrees(md.compute_psi(traj)[1][0])[1:-1]
    assert np.all((phi > -90) & (phi < -30)) and np.all((psi > -75) & (psi < -15)), (phi, psi)
    ca = traj.topology.select("name CA")
    d = md.compute_distances(traj, [(ca[i], ca[i + 4]) for i in range(len(ca) - 4)])[0]
    assert np.all(np.abs(d - 0.62) < 0.08), d
    with pytest.raises(ValueError, match="start must be one of"):
        P.build_peptide(seq, "capped", forcefield=forcefield, start="sheet")


def test_peptides_command_adds_the_long_sets_with_their_own_length(tmp_path, monkeypatch):
    """`peptides --n-long 3 --n-helical 2 --long-ps 40` generates the default sets, then lp00-lp02
    and the helices hx00, hx01 for 40 ps each, into the same training directory, each list with MD
    seeds of its own (generation itself is tested above)."""
    calls = []
    monkeypatch.setattr(P, "generate_corpus", lambda specs, out, config: calls.append((specs, out, config)))
    parser = argparse.ArgumentParser()
    P.add_arguments(parser)
    argv = ["--out", str(tmp_path), "--platform", "Reference", "--n-long", "3", "--n-helical", "2", "--long-ps", "40"]
    P.run(parser.parse_args(argv))
    (short, out, config), (long, out_long, config_long), (helical, out_helical, config_helical) = calls
    assert out == out_long == out_helical == tmp_path / "train"
    assert [s.id for s in long] == ["lp00", "lp01", "lp02"] and config_long.production_ps == 40.0
    assert [s.id for s in helical] == ["hx00", "hx01"] and config_helical.production_ps == 40.0
    assert {s.start for s in long} == {"extended"} and {s.start for s in helical} == {"helix"}
    assert len({config.seed, config_long.seed, config_helical.seed}) == 3
    assert config.production_ps == 1000.0 * P.DEFAULT_NS and len(short) == P.DEFAULT_N_PEPTIDES + 21


def test_default_corpus_covers_every_type_and_avoids_heldout_subsequences():
    specs = P.default_corpus_sequences(2024)
    assert [(s.sequence, s.cis_prolines) for s in specs] == [
        (s.sequence, s.cis_prolines) for s in P.default_corpus_sequences(2024)
    ]
    counts = {r: sum(s.sequence.count(r) for s in specs) for r in P.STANDARD_RESIDUES}
    assert min(counts.values()) >= 5
    assert {s.termini for s in specs} == {"charged", "capped"}
    assert sum(bool(s.cis_prolines) for s in specs) >= 3
    assert {s.temperature for s in specs} == {300.0, 350.0, 400.0}
    assert all(3 <= len(s.sequence) <= 8 for s in specs)
    # Neighbour variety: many distinct ordered residue pairs.
    pairs = {(a, b) for s in specs for a, b in zip(s.sequence, s.sequence[1:])}
    assert len(pairs) > 100
    heldout = P.heldout_sequences()
    letters = {P.ONE_LETTER[r] for h in heldout for r in h.sequence}
    assert len(letters) == 20 and all(10 <= len(h.sequence) <= 20 for h in heldout)
    for h in heldout:
        word = "".join(P.ONE_LETTER[r] for r in h.sequence)
        for s in specs:
            assert "".join(P.ONE_LETTER[r] for r in s.sequence) not in word
