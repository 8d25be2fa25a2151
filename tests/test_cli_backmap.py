"""CLI: train, export, info, backmap on tiny inputs, and their error messages."""

import csv
import json

import mdtraj as md
import numpy as np
import pytest
from _backmap_helpers import ala2_reference, ala2_six, needs_compiler

from openmm_backmap.cli import main
from openmm_backmap.mapping import CGMapping


def _groups() -> list[list[int]]:
    """The six-bead mapping as a hand-written groups file has it: bare atom-index lists."""
    return [[int(i)] for i in ala2_six(md.load_topology(str(ala2_reference()["pdb"]))).bead_atoms]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    ref = ala2_reference()
    d = tmp_path_factory.mktemp("cli")
    (d / "groups.json").write_text(json.dumps({"groups": _groups()}))
    ckpt = d / "model.ckpt"
    rc = main(
        [
            "train",
            "--topology",
            str(ref["pdb"]),
            "--trajectory",
            str(ref["dcd"]),
            "--mapping",
            str(d / "groups.json"),
            "--epochs",
            "1",
            "--aa-system",
            str(ref["system"]),
            "--energy-steps",
            "3",
            "--stride",
            "5",
            "--hidden",
            "16",
            "--layers",
            "2",
            "--out",
            str(ckpt),
            "--no-progress",
        ]
    )
    assert rc == 0
    assert main(["export", str(ckpt), "-o", str(d / "model.pt")]) == 0
    traj = md.load(str(ref["dcd"]), top=str(ref["pdb"]))[:12]
    mapping = CGMapping(traj.topology, _groups())
    cg = mapping.cg_trajectory(traj)
    cg[0].save_pdb(str(d / "cg.pdb"))
    cg.save_dcd(str(d / "cg.dcd"))
    return d


def test_train_writes_checkpoints(workdir):
    import torch

    from openmm_backmap.io.checkpoints import load_checkpoint, read_checkpoint
    from openmm_backmap.training.backmapper import mean_nll
    from openmm_backmap.training.pipeline import load_frames, split_frames

    final, ml = read_checkpoint(workdir / "model.ckpt"), read_checkpoint(workdir / "model.ml.ckpt")
    assert final["stage"] == "done" and ml["stage"] == "ml-done"
    record = final["spec"]["training"]
    assert record["ml"]["epochs"] == 1 and record["energy"]["steps"] == 3 and "energy" not in ml["spec"]["training"]
    assert record["data"]["n_frames"] == 200 and record["data"]["n_train"] + record["data"]["n_val"] == 200
    # the refinement moved the parameters away from the maximum-likelihood ones
    assert any(not torch.equal(final["state_dict"][k], ml["state_dict"][k]) for k in final["state_dict"])
    # the recorded validation NLL is that of the saved parameters on the validation blocks
    ref = ala2_reference()
    frames = load_frames(str(ref["pdb"]), str(ref["dcd"]), str(workdir / "groups.json"), stride=5)
    _, va = split_frames(frames.part_frames, 0.1, seed=0)
    assert len(va) == record["data"]["n_val"]
    model, _ = load_checkpoint(workdir / "model.ckpt")
    x = torch.as_tensor(frames.traj.xyz[va], dtype=model.M.dtype)
    nll = mean_nll(
        model, x, torch.as_tensor(frames.mapping.project(frames.traj.xyz[va].astype(np.float64)), dtype=model.M.dtype)
    )
    assert nll == pytest.approx(record["final_val_nll"], abs=1e-4)


def test_info_prints_metadata(workdir, capsys):
    assert main(["info", str(workdir / "model.pt")]) == 0
    out = capsys.readouterr().out
    assert "beads 6" in out and "atoms 22" in out and "ACE1 ALA2 NME3" in out and "training ml" in out
    assert main(["info", "--json", str(workdir / "model.pt")]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["format"] == "openmm-backmap-model" and meta["has_system"] is True


def _backmap(workdir, out, *extra):
    """`openmm-backmap backmap` on the test's CG trajectory: 3 samples per frame, seed 1."""
    return main(
        [
            "backmap",
            "--model",
            str(workdir / "model.pt"),
            "--cg",
            str(workdir / "cg.dcd"),
            "--cg-topology",
            str(workdir / "cg.pdb"),
            "--samples",
            "3",
            "--seed",
            "1",
            "--out",
            str(out),
            "--batch-size",
            "8",
            "--no-progress",
            *extra,
        ]
    )


def test_backmap_writes_frames_and_energies(workdir):
    out, energies = workdir / "aa.dcd", workdir / "e.csv"
    assert _backmap(workdir, out, "--energies", str(energies)) == 0
    ref = ala2_reference()
    aa = md.load(str(out), top=str(ref["pdb"]))
    assert aa.n_frames == 36
    cg = md.load(str(workdir / "cg.dcd"), top=str(workdir / "cg.pdb"))
    # the beads of every reconstruction sit on the CG frame it came from
    idx = [g[0] for g in _groups()]
    assert np.allclose(aa.xyz[:, idx], np.repeat(cg.xyz, 3, 0), atol=1e-5)
    rows = list(csv.DictReader(open(energies)))
    assert len(rows) == 36 and rows[4]["frame"] == "1" and rows[4]["sample"] == "1"
    assert all(np.isfinite(float(r["u_aa_kjmol"])) and np.isfinite(float(r["log_q"])) for r in rows)
    # same seed, same frames
    assert _backmap(workdir, workdir / "aa2.dcd") == 0
    assert np.array_equal(md.load(str(workdir / "aa2.dcd"), top=str(ref["pdb"])).xyz, aa.xyz)


@needs_compiler
def test_backmap_compile_gives_the_same_frames(workdir):
    """--compile: 12 CG frames x 3 samples in batches of 6 (2 frames): the compiled batch for every
    batch, the same seed's frames as TorchScript to float rounding."""
    ref = ala2_reference()
    assert _backmap(workdir, workdir / "plain.dcd") == 0
    assert _backmap(workdir, workdir / "compiled.dcd", "--compile") == 0
    plain = md.load(str(workdir / "plain.dcd"), top=str(ref["pdb"]))
    compiled = md.load(str(workdir / "compiled.dcd"), top=str(ref["pdb"]))
    assert compiled.n_frames == plain.n_frames == 36
    np.testing.assert_allclose(compiled.xyz, plain.xyz, atol=1e-4)


def test_backmap_rejects_wrong_bead_count(workdir, capsys):
    ref = ala2_reference()
    traj = md.load(str(ref["dcd"]), top=str(ref["pdb"]))[:3]
    five = CGMapping(traj.topology, _groups()[:5]).cg_trajectory(traj)
    five[0].save_pdb(str(workdir / "cg5.pdb"))
    five.save_dcd(str(workdir / "cg5.dcd"))
    rc = main(
        [
            "backmap",
            "--model",
            str(workdir / "model.pt"),
            "--cg",
            str(workdir / "cg5.dcd"),
            "--cg-topology",
            str(workdir / "cg5.pdb"),
            "--out",
            str(workdir / "x.dcd"),
            "--no-progress",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "5 beads" in err and "expects 6" in err


def test_backmap_rejects_nan_coordinates(workdir, capsys):
    cg = md.load(str(workdir / "cg.dcd"), top=str(workdir / "cg.pdb"))
    cg.xyz[2, 1, 0] = np.nan
    cg.save_dcd(str(workdir / "cg_nan.dcd"))
    rc = main(
        [
            "backmap",
            "--model",
            str(workdir / "model.pt"),
            "--cg",
            str(workdir / "cg_nan.dcd"),
            "--cg-topology",
            str(workdir / "cg.pdb"),
            "--out",
            str(workdir / "x.dcd"),
            "--no-progress",
        ]
    )
    assert rc == 2
    assert "NaN" in capsys.readouterr().err


def test_truncated_model_file_is_a_clear_error(workdir, capsys):
    data = (workdir / "model.pt").read_bytes()
    (workdir / "cut.pt").write_bytes(data[:1000])
    assert main(["info", str(workdir / "cut.pt")]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    rc = main(
        [
            "backmap",
            "--model",
            str(workdir / "cut.pt"),
            "--cg",
            str(workdir / "cg.dcd"),
            "--cg-topology",
            str(workdir / "cg.pdb"),
            "--out",
            str(workdir / "x.dcd"),
            "--no-progress",
        ]
    )
    assert rc == 2


def test_train_rejects_a_system_for_another_molecule(workdir, capsys, tmp_path):
    ref = ala2_reference()
    import openmm

    other = openmm.System()
    for _ in range(5):
        other.addParticle(1.0)
    (tmp_path / "other.xml").write_text(openmm.XmlSerializer.serialize(other))
    rc = main(
        [
            "train",
            "--topology",
            str(ref["pdb"]),
            "--trajectory",
            str(ref["dcd"]),
            "--mapping",
            "backbone",
            "--aa-system",
            str(tmp_path / "other.xml"),
            "--out",
            str(tmp_path / "m.ckpt"),
            "--no-progress",
        ]
    )
    assert rc == 2
    assert "5 particles" in capsys.readouterr().err


def test_train_on_several_trajectories_with_a_restrained_run(tmp_path, capsys):
    from openmm_backmap.io.checkpoints import read_checkpoint
    from openmm_backmap.systems.reference import generate_reference
    from openmm_backmap.training.pipeline import _previous_index

    ref = ala2_reference()
    rest = generate_reference(
        "ala2", 0.02, tmp_path / "aR", seed=5, save_every_ps=0.2, equilibrate_ps=2.0, progress=False, restrain="alpha_R"
    )
    (tmp_path / "groups.json").write_text(json.dumps({"groups": _groups()}))
    common = [
        "train",
        "--topology",
        str(ref["pdb"]),
        "--trajectory",
        str(ref["dcd"]),
        str(rest["dcd"]),
        "--epochs",
        "1",
        "--stride",
        "5",
        "--hidden",
        "16",
        "--layers",
        "2",
        "--no-progress",
        "--temporal",
    ]
    rc = main(common + ["--mapping", str(tmp_path / "groups.json"), "--out", str(tmp_path / "m.ckpt")])
    assert rc == 0
    data = read_checkpoint(tmp_path / "m.ckpt")["spec"]["training"]["data"]
    assert data["trajectory"] == [str(ref["dcd"]), str(rest["dcd"])] and data["n_frames"] == 200 + 20
    # the residue centres of mass do not fix phi and psi: the restrained run would bias x|X
    rc = main(common + ["--mapping", "residue-com", "--out", str(tmp_path / "bad.ckpt")])
    assert rc == 2 and "not CG beads by themselves" in capsys.readouterr().err
    assert not (tmp_path / "bad.ckpt").exists()
    # the temporal model's predecessors never cross from one file into the next
    first = np.array([True, False, False, True, False])
    assert _previous_index(np.array([0, 1, 2, 3, 4]), first).tolist() == [-1, 0, 1, -1, 3]
