"""``openmm-backmap demo --data-free``: end to end with tiny budgets, its report's figures, and the
options it refuses."""

import json
import math

import numpy as np
import pytest

from openmm_backmap.demo import DemoSettings, run_demo
from openmm_backmap.demo_data_free import DataFreeSettings, run_data_free_demo
from openmm_backmap.systems.builtin import ALA2_REFERENCE_POPULATIONS
from openmm_backmap.training.joint import JointTraining


def tiny_settings() -> DataFreeSettings:
    """A few training steps at the target (and of each stage after it), a 200-step CG run: plumbing,
    not quality."""
    return DataFreeSettings(
        joint=JointTraining(
            t_start=300.0,
            steps=4,
            final_steps=3,
            check_every=2,
            batch_size=16,
            eval_batch=64,
            layers=2,
            hidden=16,
            cg_layers=2,
            cg_hidden=16,
            n_final=256,
            refine_steps=3,
            refine_frames=32,
            cycles=1,
            cycle_samples=64,
            cycle_per_frame=2,
        ),
        cg_steps=200,
        cg_steps_torchscript=200,
        compile_cg=False,
        report_interval=50,
        samples_per_frame=2,
        model_samples=400,
        eval_frames=6,
        conditional_samples=8,
        annealed_samples=64,
        anneal_levels=3,
        anneal_leapfrog=2,
        flow_move_interval=25,
    )


@pytest.fixture(scope="module")
def data_free_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_df") / "out"
    assert run_data_free_demo(out, seed=3, settings=tiny_settings()) == 0
    return out


def test_data_free_demo_runs_end_to_end(data_free_demo):
    out = data_free_demo
    for name in ("models/joint.ckpt", "models/backmapper.pt", "models/cg.pt", "cg_run/aa.dcd", "cg_run/weights.csv"):
        assert (out / name).is_file(), name
    assert not (out / "reference").exists()  # no MD was run
    text = (out / "summary.txt").read_text()
    for line in (
        "sample ESS/N",
        "run ESS/N",
        "conditional ESS",
        "bond score",
        "240 ns of MD",
        "64 samples annealed",
        "with a flow move every 25 steps (7 moves",
    ):
        assert line in text, line
    assert "nan" not in text  # an empty basin is named, not given dF = nan
    assert "then 3 backmapper steps and 1 cycles at the target" in text
    assert "energy W1: not available (compares the energies of backmapped frames" in text
    assert "mapping entropy of the 6-bead mapping: not available" in text


def test_data_free_report_figures(data_free_demo):
    import mdtraj as md

    from openmm_backmap.analysis.basins import backbone_dihedrals, basin_indicators
    from openmm_backmap.io.energy_file import read_energy_file

    summary = json.loads((data_free_demo / "report" / "summary.json").read_text())
    model, run = summary["joint_model"], summary["reweighting"]
    assert summary["energy_w1_kjmol"] is None and summary["mapping_entropy"] is None
    assert set(summary["not_available"]) == {"energy_w1", "mapping_entropy"}
    assert model["samples"] == 400 and model["conditional_frames"] == 6
    assert 0.0 < model["ess_fraction"] <= 1.0 and 0.0 < model["conditional_ess"] <= 1.0
    assert 0.0 <= model["bond_score"] <= 1.0 and model["training"]["reached_target"] is True
    annealed = model["annealed"]
    assert annealed["samples"] == 64 and (annealed["levels"], annealed["leapfrog"]) == (3, 2)
    assert 0.0 < annealed["ess_fraction"] <= 1.0 and 0.0 < annealed["plain_ess_fraction"] <= 1.0
    assert all(0.0 <= a <= 1.0 for a in annealed["acceptance"])
    for basins in (model["basins"], run["basins"], annealed["basins"]):
        assert {k: v["reference"] for k, v in basins.items()} == ALA2_REFERENCE_POPULATIONS
        # the basins partition the plane: raw and reweighted populations each sum to one
        assert math.isclose(sum(v["raw"] for v in basins.values()), 1.0, abs_tol=1e-9)
        assert math.isclose(sum(v["reweighted"] for v in basins.values()), 1.0, abs_tol=1e-9)
        for v in basins.values():
            if v["reweighted"] > 0:
                assert math.isclose(v["delta_f_kT"], -math.log(v["reweighted"] / v["reference"]), rel_tol=1e-9)
    # the run's raw column counts the reporter's own frames, and its weights are the energy file's
    top = md.load(str(data_free_demo / "system" / "ala2.pdb")).topology
    traj = md.load(str(data_free_demo / "cg_run" / "aa.dcd"), top=top)
    phi, psi = backbone_dihedrals(traj)
    ind = basin_indicators(phi[:, 0], psi[:, 0])
    lw = read_energy_file(data_free_demo / "cg_run" / "weights.csv")["log_w"]
    w = np.exp(lw - lw.max())
    w /= w.sum()
    assert run["n_samples"] == traj.n_frames == 200 // 50 * 2
    # the CG run made its flow moves (the move of the last step waits for a next step that never comes)
    moves = summary["cg_run"]
    assert moves["flow_move_interval"] == 25 and moves["flow_moves"] == 200 // 25 - 1
    assert 0.0 <= moves["flow_acceptance"] <= 1.0
    for name, mask in ind.items():
        assert math.isclose(run["basins"][name]["raw"], mask.mean(), abs_tol=1e-12)
        assert math.isclose(run["basins"][name]["reweighted"], w[mask].sum(), abs_tol=1e-9)


def test_joint_checkpoint_replaces_training(data_free_demo, tmp_path, monkeypatch, capsys):
    import openmm_backmap.training.joint as joint
    from openmm_backmap.cli import main

    def no_training(*args, **kwargs):
        raise AssertionError("train-joint ran although a joint checkpoint was given")

    monkeypatch.setattr(joint, "train_joint_from_files", no_training)
    monkeypatch.setattr(DataFreeSettings, "quick", classmethod(lambda cls: tiny_settings()))
    ckpt = data_free_demo / "models" / "joint.ckpt"
    out = tmp_path / "again"
    assert main(["demo", "--data-free", "--quick", "--joint-checkpoint", str(ckpt), "--out", str(out)]) == 0
    assert "(not trained here)" in capsys.readouterr().out
    assert (out / "models" / "joint.ckpt").read_bytes() == ckpt.read_bytes()
    assert json.loads((out / "report" / "summary.json").read_text())["joint_model"]["samples"] == 400


def test_conflicting_options_are_refused(data_free_demo, tmp_path, capsys):
    import torch

    from openmm_backmap.cli import main

    ckpt = data_free_demo / "models" / "joint.ckpt"
    cases = [
        (["--joint-checkpoint", str(ckpt)], "--joint-checkpoint is for --data-free"),
        (["--data-free", "--joint-checkpoint", str(tmp_path / "none.ckpt")], "does not exist"),
        (["--data-free", "--joint-checkpoint", str(data_free_demo / "models" / "backmapper.pt")], "not a"),
    ]
    not_joint = tmp_path / "bm.ckpt"
    payload = torch.load(ckpt, map_location="cpu", weights_only=False)
    torch.save({"spec": payload["spec"]["backmapper"], "state_dict": {}}, not_joint)
    cases.append((["--data-free", "--joint-checkpoint", str(not_joint)], "is not a joint checkpoint"))
    for k, (argv, message) in enumerate(cases):
        out = tmp_path / f"out{k}"
        assert main(["demo", *argv, "--out", str(out)]) == 2, argv
        assert message in capsys.readouterr().err, argv
        assert not (out / "models" / "joint.ckpt").exists()
    with pytest.raises(ValueError, match="takes DataFreeSettings"):
        run_data_free_demo(tmp_path / "y", settings=DemoSettings.quick())
    with pytest.raises(ValueError, match="takes DemoSettings"):
        run_demo(tmp_path / "z", settings=tiny_settings())


def test_joint_checkpoint_of_another_molecule_is_refused(data_free_demo, tmp_path):
    import torch

    from openmm_backmap.demo_data_free import _check_joint_checkpoint
    from openmm_backmap.systems.builtin import builtin_system

    payload = torch.load(data_free_demo / "models" / "joint.ckpt", map_location="cpu", weights_only=False)
    pdb = payload["spec"]["backmapper"]["topology_pdb"]
    # drop the last atom (a hydrogen of the NME cap): another molecule
    lines = pdb.splitlines()
    last = max(i for i, line in enumerate(lines) if line.startswith(("ATOM", "HETATM")))
    payload["spec"]["backmapper"]["topology_pdb"] = "\n".join(
        line for i, line in enumerate(lines) if i != last and not line.startswith("CONECT")
    )
    other = tmp_path / "other.ckpt"
    torch.save(payload, other)
    with pytest.raises(ValueError, match="another molecule"):
        _check_joint_checkpoint(other, builtin_system("ala2")[0])


def test_basin_lines_name_a_missing_delta_f():
    from openmm_backmap.demo import basin_lines

    basins = {
        "C7eq": {"reference": 0.45, "raw": 0.5, "reweighted": 0.4, "reweighted_error": 0.01, "delta_f_kT": 0.118},
        "alpha_L": {"reference": 0.0, "raw": 0.02, "reweighted": 0.002, "reweighted_error": 0.001},
        "alpha_R": {"reference": 0.001, "raw": 0.0, "reweighted": 0.0, "reweighted_error": float("nan")},
    }
    lines = basin_lines(basins)
    assert lines[0] == "  C7eq     0.4500 | 0.5000 | 0.4000 +- 0.0100 | +0.12"
    assert lines[1].endswith("| none: the reference has no frame in this basin")
    assert lines[2].endswith("+- n/a | none: no sample with weight in this basin")
    assert not any("nan" in line for line in lines)
