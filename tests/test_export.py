"""Export: the TorchScript file equals the eager model, loads without this package, carries its
metadata; load_model checks its inputs."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import mdtraj as md
import numpy as np
import pytest
import torch
from _backmap_helpers import ala2_constraints, ala2_reference, ala2_six, ala2_traj, needs_compiler

from openmm_backmap.io.backmap_model import load_model
from openmm_backmap.io.checkpoints import make_spec
from openmm_backmap.io.model_files import export_model, read_model_file
from openmm_backmap.models.backmapper import Backmapper
from openmm_backmap.openmm.energies import aa_energy


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    traj = ala2_traj()
    mapping = ala2_six(traj.topology)
    torch.manual_seed(0)
    model = Backmapper.from_data(mapping, traj.xyz, constraints=ala2_constraints(), hidden=32, n_layers=2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.flow.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    spec = make_spec(model, 300.0, traj.xyz[0], Path(ala2_reference()["system"]).read_text())
    spec["training"]["note"] = {"epochs": 0}
    path = tmp_path_factory.mktemp("export") / "model.pt"
    export_model(model, spec, path)
    return model.eval(), path, torch.as_tensor(traj.xyz[:16])


def test_exported_equals_eager_on_same_noise(exported):
    model, path, x = exported
    module = torch.jit.load(str(path))
    for b in (1, 5):
        X = model.project(x[:b])
        u = model.base.sample(b, torch.float32, torch.device("cpu"))
        aa, lq = model.sample_with_noise(X, u)
        aa_s, lq_s = module.sample_with_noise(X, u)
        assert torch.allclose(aa, aa_s, atol=1e-6) and torch.allclose(lq, lq_s, atol=1e-4)
        torch.manual_seed(3)
        aa, lq = model.sample(X, 4)
        torch.manual_seed(3)
        aa_s, lq_s = module.sample(X, 4)
        assert aa_s.shape == (4 * b, 22, 3) and torch.allclose(aa, aa_s, atol=1e-6)
        assert torch.allclose(module.log_prob(x[:b], X), model.log_prob(x[:b], X), atol=1e-4)


def test_model_file_loads_without_the_package(exported, tmp_path):
    _, path, x = exported
    np.save(tmp_path / "x.npy", x.numpy())
    script = f"""
import sys, json, numpy as np, torch
files = {{"metadata.json": "", "topology.pdb": "", "system.xml": ""}}
m = torch.jit.load({str(path)!r}, _extra_files=files)
meta = json.loads(files["metadata.json"])
M = torch.tensor([[1.0 if g["atoms"] == [i] else 0.0 for i in range(meta["n_aa"])] for g in meta["mapping"]["groups"]])
x = torch.tensor(np.load("x.npy"))
cg = M @ x
aa, lq = m.sample(cg[:3], 2)
lp = m.log_prob(aa, cg[:3].repeat_interleave(2, 0))
assert aa.shape == (6, meta["n_aa"], 3) and torch.allclose(lp, lq, atol=1e-3), (lp, lq)
assert torch.allclose(M @ aa, cg[:3].repeat_interleave(2, 0), atol=1e-5)
assert b"ATOM" in files["topology.pdb"] and b"<System" in files["system.xml"]
assert not any(k.startswith("openmm_backmap") for k in sys.modules)
print("ok", meta["format"], meta["n_cg"])
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    assert "ok openmm-backmap-model 6" in res.stdout


def test_metadata_contents(exported):
    _, path, _ = exported
    _, meta, files = read_model_file(path)
    assert json.loads(files["metadata.json"]) == meta
    for key in (
        "format_version",
        "package_version",
        "temperature",
        "mapping",
        "atom_names",
        "bead_names",
        "elements",
        "residues",
        "constraints",
        "training",
    ):
        assert key in meta, key
    assert meta["n_aa"] == 22 and meta["n_cg"] == 6 and len(meta["constraints"]) == 12
    assert meta["elements"][:2] == ["H", "C"] and [r["name"] for r in meta["residues"]] == ["ACE", "ALA", "NME"]
    assert meta["training"]["note"] == {"epochs": 0}


def test_load_model_wrapper(exported):
    model, path, x = exported
    bm = load_model(path, device="cpu", topology=ala2_traj().topology)
    assert bm.n_aa == 22 and bm.mapping.n_cg == 6 and bm.topology.n_atoms == 22
    assert bm.system_xml is not None and bm.temperature == 300.0
    X = bm.mapping.project(x.numpy().astype(np.float64))
    aa, lq = bm.sample(X[:2], 3, seed=0)
    assert isinstance(aa, np.ndarray) and aa.shape == (6, 22, 3) and lq.shape == (6,)
    aa2, _ = bm.sample(X[:2], 3, seed=0)
    assert np.array_equal(aa, aa2)
    aa_t, lq_t = bm.sample(torch.as_tensor(X[0]), 2)
    assert isinstance(aa_t, torch.Tensor) and aa_t.shape == (2, 22, 3)
    assert np.allclose(bm.log_prob(aa, np.repeat(X[:2], 3, 0)), lq, atol=1e-3)
    assert np.allclose(bm.log_prob(aa), lq, atol=1e-3)  # cg from the mapping
    energy = aa_energy(bm.system_xml)
    assert torch.isfinite(energy(torch.as_tensor(aa, dtype=torch.float64))).all()
    # pickles as its file (as a ResolutionMove's state holds it): the same samples for the same seed
    again = pickle.loads(pickle.dumps(bm))
    assert again.path == bm.path and np.array_equal(again.sample(X[:2], 3, seed=0)[0], aa)


def test_load_model_input_errors(exported, tmp_path):
    _, path, x = exported
    bm = load_model(path, device="cpu")
    with pytest.raises(ValueError, match="6 beads"):
        bm.sample(np.zeros((2, 5, 3)), 1)
    bad = np.zeros((2, 6, 3))
    bad[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        bm.sample(bad, 1)
    with pytest.raises(ValueError, match="22 atoms"):
        bm.log_prob(np.zeros((1, 21, 3)))
    chignolin = md.load(str(Path(__file__).resolve().parents[1] / "openmm_backmap" / "data" / "chignolin.pdb"))
    with pytest.raises(ValueError, match="another molecule"):
        load_model(path, device="cpu", topology=chignolin.topology)
    # same atom count, other atoms: renamed
    top = ala2_traj().topology.copy()
    next(iter(top.atoms)).name = "XX"
    with pytest.raises(ValueError, match="another molecule"):
        bm.check_topology(top)


def test_truncated_or_foreign_files_raise_value_error(exported, tmp_path):
    _, path, _ = exported
    data = Path(path).read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(cut, device="cpu")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model" * 100)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(junk, device="cpu")
    plain = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(plain))
    with pytest.raises(ValueError, match="metadata"):
        load_model(plain, device="cpu")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.pt")


@needs_compiler
def test_compiled_sampling_equals_torchscript(exported):
    """BackmapModel.compile: inductor-compiled sample and log_prob at one batch size give the
    TorchScript results (same seed, same noise), and other batch sizes still work."""
    _, path, x = exported
    plain = load_model(path, device="cpu")
    fast = load_model(path, device="cpu")
    fast.compile(6)
    X = plain.mapping.project(x.numpy().astype(np.float64))
    aa, lq = plain.sample(X[:2], 3, seed=5)
    aa_c, lq_c = fast.sample(X[:2], 3, seed=5)  # 2 frames x 3 = the compiled batch
    np.testing.assert_allclose(aa_c, aa, atol=1e-4)
    np.testing.assert_allclose(lq_c, lq, atol=1e-2, rtol=1e-4)
    np.testing.assert_allclose(fast.log_prob(aa), plain.log_prob(aa), atol=1e-2, rtol=1e-4)
    aa_other, _ = fast.sample(X[:1], 4, seed=5)  # another batch size: TorchScript
    assert aa_other.shape == (4, 22, 3)
    with pytest.raises(ValueError, match="batch_size"):
        fast.compile(0)
