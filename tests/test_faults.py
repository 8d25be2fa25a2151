"""Fault suite: each case is a misuse or a concurrency hazard, replayed, with the clear error or the
correct result it must give.

Kept fast: small analytic TorchScript energies, one small compiled package (about 15 s to build on
two cores), and the shared tiny fixtures of ``conftest.py`` only where a real model file is needed.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import openmm
import pytest
import torch
from _backmap_helpers import needs_compiler

from openmm_backmap.openmm import forces
from openmm_backmap.openmm.plugin import native_plugin_status

N_BEADS = 6
N_THREADS = 4
N_CALLS = 100


class PairEnergy(torch.nn.Module):
    """E = sum_{i<j} (|x_i - x_j| - 0.3)^2 (kJ/mol, nm): every position enters every force."""

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        d = positions[:, None, :] - positions[None, :, :]
        r = torch.sqrt(torch.sum(d * d, dim=-1) + 1e-12)
        return 0.5 * torch.sum((r - 0.3) ** 2)


def _positions(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(scale=0.5, size=(N_BEADS, 3))


def _threaded_matches_serial(system: openmm.System) -> None:
    """Four Contexts on one System: 4 threads x 100 getState calls equal the serial values exactly."""
    platform = openmm.Platform.getPlatformByName("Reference")
    contexts = [openmm.Context(system, openmm.VerletIntegrator(0.001), platform) for _ in range(N_THREADS)]
    for i, context in enumerate(contexts):
        context.setPositions(_positions(10 + i) * openmm.unit.nanometer)

    def evaluate(context: openmm.Context) -> tuple[float, np.ndarray]:
        state = context.getState(getEnergy=True, getForces=True)
        return (
            state.getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole),
            state.getForces(asNumpy=True).value_in_unit(openmm.unit.kilojoule_per_mole / openmm.unit.nanometer),
        )

    serial = [evaluate(c) for c in contexts]
    assert len({round(e, 9) for e, _ in serial}) == N_THREADS  # distinct configurations: a mix-up shows
    results: list[list[tuple[float, np.ndarray]]] = [[] for _ in contexts]
    barrier = threading.Barrier(N_THREADS)

    def work(i: int) -> None:
        barrier.wait()
        for _ in range(N_CALLS):
            results[i].append(evaluate(contexts[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread is stuck (deadlock in the force callback)"
    for i, (energy, force) in enumerate(serial):
        assert len(results[i]) == N_CALLS
        wrong = [k for k, (e, f) in enumerate(results[i]) if e != energy or not np.array_equal(f, force)]
        assert not wrong, f"context {i}: {len(wrong)} of {N_CALLS} threaded calls differ from the serial value"


def _threaded_backends() -> list[str]:
    return ["python"] + (["native"] if native_plugin_status()[0] else [])


@pytest.mark.parametrize("backend", _threaded_backends())
def test_threads_share_torchscript_system(backend):
    system = forces.create_cg_system(np.full(N_BEADS, 12.0), torch.jit.script(PairEnergy()), backend=backend)
    _threaded_matches_serial(system)


@pytest.fixture(scope="module")
def pair_package(tmp_path_factory) -> Path:
    from openmm_backmap.openmm.compiled import compile_model

    path = tmp_path_factory.mktemp("faults") / "pair.pt2"
    compile_model(PairEnergy(), N_BEADS, path)
    return path


@needs_compiler
@pytest.mark.parametrize("backend", _threaded_backends())
def test_threads_share_compiled_system(pair_package, backend):
    system = forces.create_cg_system(np.full(N_BEADS, 12.0), str(pair_package), backend=backend)
    _threaded_matches_serial(system)


# ----------------------------------------------------------------------------- model files: kind and checksum
@pytest.fixture(scope="module")
def cg_file(tmp_path_factory) -> Path:
    """A small CG flow potential over the six-bead ALA2 graph, fitted to a synthetic chain."""
    from test_potentials import BRANCHED6, synthetic_chain

    from openmm_backmap.geometry import bond_length_range
    from openmm_backmap.io.checkpoints import make_cg_spec
    from openmm_backmap.io.model_files import export_cg
    from openmm_backmap.models.cg_potential import CGFlowPotential

    X = synthetic_chain(200, BRANCHED6, seed=1)
    model = CGFlowPotential.from_data(X, BRANCHED6, n_layers=2, hidden=8, n_bins=4, seed=2)
    spec = make_cg_spec(model)
    spec["masses"] = [12.0] * N_BEADS
    spec["cg_bond_range_nm"] = list(bond_length_range(X, BRANCHED6))  # as train_cg_from_files records it
    path = tmp_path_factory.mktemp("faults_cg") / "cg.pt"
    export_cg(model, spec, path)
    return path


def _flip_weight_byte(source: Path, target: Path) -> None:
    """Copy ``source`` with one byte flipped in the middle of its largest tensor record."""
    import zipfile

    data = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_len, extra_len = (
        int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little"),
        int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little"),
    )
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2 + 1] ^= 0x40  # a high mantissa/exponent bit of one weight
    target.write_bytes(bytes(data))


def test_cg_file_records_checksum_and_loads(cg_file):
    from openmm_backmap.io.model_files import load_cg_potential, payload_checksum, read_model_file

    module, meta, files = read_model_file(cg_file)
    assert meta["checksum"]["sha256"] == payload_checksum(module, files)
    load_cg_potential(cg_file)


def test_flipped_byte_is_refused(cg_file, tmp_path):
    from openmm_backmap.io.model_files import load_cg_potential, load_model_bytes

    bad = tmp_path / "flipped.pt"
    _flip_weight_byte(cg_file, bad)
    with pytest.raises(ValueError, match="corrupt.*SHA-256"):
        load_cg_potential(bad)
    with pytest.raises(ValueError, match="corrupt.*SHA-256"):
        load_model_bytes(bad)
    with pytest.raises(ValueError, match="corrupt.*SHA-256"):
        forces.create_cg_system(np.full(N_BEADS, 12.0), str(bad), backend="python")


def test_file_without_checksum_still_loads(cg_file, tmp_path):
    """A file written before checksums existed (its metadata has none) loads without a check."""
    import json

    from openmm_backmap.io.model_files import EXTRA_FILES, load_cg_potential

    files = {name: "" for name in EXTRA_FILES}
    module = torch.jit.load(str(cg_file), _extra_files=files)
    meta = json.loads(files["metadata.json"])
    del meta["checksum"]
    old = tmp_path / "old.pt"
    torch.jit.save(
        module, str(old), _extra_files={"metadata.json": json.dumps(meta), "cg_topology.pdb": files["cg_topology.pdb"]}
    )
    _, loaded = load_cg_potential(old)
    assert "checksum" not in loaded


def test_cg_potential_given_as_backmapper_names_its_kind(cg_file):
    from openmm_backmap.io.backmap_model import load_model

    with pytest.raises(ValueError, match=r"cg\.pt is a CG-potential, not a backmapper"):
        load_model(cg_file, device="cpu")


def test_backmapper_given_as_force_names_its_kind(tiny_ala2):
    with pytest.raises(ValueError, match=r"model\.pt is a backmapper, not a CG potential"):
        forces.create_force(str(tiny_ala2["model"]), backend="python")


def test_backmapper_file_records_checksum(tiny_ala2):
    from openmm_backmap.io.model_files import payload_checksum, read_model_file

    module, meta, files = read_model_file(tiny_ala2["model"])
    assert meta["checksum"]["sha256"] == payload_checksum(module, files)
    assert files["system.xml"]  # the embedded System is part of the checksummed payload


@needs_compiler
def test_package_given_as_model_file_says_what_it_is(pair_package):
    from openmm_backmap.io.backmap_model import load_model

    with pytest.raises(ValueError, match=r"pair\.pt2 is a compiled force package"):
        load_model(pair_package, device="cpu")


@needs_compiler
def test_package_given_to_the_reporter_says_what_it_is(pair_package, tmp_path):
    """The reporter blamed a `.pt2` as a corrupt model file; it names the file's kind, writes nothing."""
    from openmm_backmap.openmm.reporter import BackmapReporter

    with pytest.raises(ValueError, match=r"pair\.pt2 is a compiled force package"):
        BackmapReporter(tmp_path / "aa.dcd", 10, model=pair_package, energyFile=tmp_path / "w.csv")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- command line: counts and outputs
@pytest.mark.parametrize(
    "argv",
    [
        [
            "train-cg",
            "--topology",
            "t.pdb",
            "--trajectory",
            "t.dcd",
            "--mapping",
            "m.json",
            "--out",
            "o.ckpt",
            "--epochs",
            "0",
        ],
        [
            "train",
            "--topology",
            "t.pdb",
            "--trajectory",
            "t.dcd",
            "--mapping",
            "m.json",
            "--out",
            "o.ckpt",
            "--epochs",
            "-3",
        ],
        [
            "train",
            "--topology",
            "t.pdb",
            "--trajectory",
            "t.dcd",
            "--mapping",
            "m.json",
            "--out",
            "o.ckpt",
            "--batch-size",
            "0",
        ],
        [
            "train-cg",
            "--topology",
            "t.pdb",
            "--trajectory",
            "t.dcd",
            "--mapping",
            "m.json",
            "--out",
            "o.ckpt",
            "--stride",
            "0",
        ],
        ["backmap", "--model", "m.pt", "--cg", "c.dcd", "--cg-topology", "c.pdb", "--out", "o.dcd", "--samples", "0"],
        [
            "backmap",
            "--model",
            "m.pt",
            "--cg",
            "c.dcd",
            "--cg-topology",
            "c.pdb",
            "--out",
            "o.dcd",
            "--batch-size",
            "0",
        ],
        ["evaluate", "--model", "m.pt", "--reference", "r.dcd", "--topology", "t.pdb", "--out", "r", "--frames", "0"],
    ],
)
def test_counts_below_one_are_refused(argv, capsys):
    from openmm_backmap.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "must be >= 1" in capsys.readouterr().err


def _backmap_argv(tmp_path: Path, out: str, *extra: str) -> list[str]:
    for name in ("m.pt", "c.dcd", "c.pdb"):
        (tmp_path / name).write_text("")
    return [
        "backmap",
        "--model",
        str(tmp_path / "m.pt"),
        "--cg",
        str(tmp_path / "c.dcd"),
        "--cg-topology",
        str(tmp_path / "c.pdb"),
        "--out",
        out,
        *extra,
    ]


@pytest.mark.parametrize(
    "case, message",
    [
        ("input", "also the command's --cg: writing it would destroy the input"),
        ("exists", "exists; pass --overwrite"),
        ("format", "unsupported format .txt"),
        ("folder", "does not exist"),
    ],
)
def test_backmap_outputs_checked_before_work(tmp_path, capsys, case, message):
    """The input files are empty: any computation would fail with another message."""
    from openmm_backmap.cli import main

    out = {
        "input": tmp_path / "c.dcd",
        "exists": tmp_path / "old.dcd",
        "format": tmp_path / "o.txt",
        "folder": tmp_path / "missing" / "o.dcd",
    }[case]
    (tmp_path / "old.dcd").write_text("keep")
    assert main(_backmap_argv(tmp_path, str(out))) == 2
    assert message in capsys.readouterr().err
    assert (tmp_path / "old.dcd").read_text() == "keep"


def test_overwrite_lets_an_existing_output_through(tmp_path, capsys):
    """With --overwrite the existing file passes the output check and the command reaches its inputs."""
    from openmm_backmap.cli import main

    (tmp_path / "old.dcd").write_text("keep")
    argv = _backmap_argv(tmp_path, str(tmp_path / "old.dcd"), "--overwrite")
    (tmp_path / "c.pdb").write_text("ATOM      1  CA  ALA A   1       0.000   0.000   0.000  1.00  0.00\nEND\n")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "exists" not in err and "m.pt" in err  # the (empty) model file is what fails now


def test_train_out_equal_to_input_is_refused(tmp_path, capsys):
    from openmm_backmap.cli import main

    traj = tmp_path / "t.dcd"
    traj.write_text("")
    assert (
        main(
            [
                "train-cg",
                "--topology",
                "t.pdb",
                "--trajectory",
                str(traj),
                "--mapping",
                "m.json",
                "--out",
                str(traj),
                "--overwrite",
            ]
        )
        == 2
    )
    assert "also the command's --trajectory" in capsys.readouterr().err
    assert traj.exists()


def test_compile_output_must_be_pt2(tmp_path, capsys):
    from openmm_backmap.cli import main

    assert main(["compile", str(tmp_path / "cg.pt"), "-o", str(tmp_path / "cg.pt")]) == 2
    assert "also the command's model" in capsys.readouterr().err
    assert main(["compile", str(tmp_path / "cg.pt"), "-o", str(tmp_path / "cg.so")]) == 2
    assert "unsupported format .so" in capsys.readouterr().err


# ----------------------------------------------------------------------------- command line: output directories
class _WorkStarted(Exception):
    """Raised by the stand-ins for the commands' work: a check that passes reaches it."""


def _stop_work(*args, **kwargs):
    raise _WorkStarted


# command -> (the function its work starts with, module.attribute; argv before --out; its input options)
_DIR_COMMANDS = {
    "reference": ("openmm_backmap.systems.reference.generate_reference", ["reference", "ala2"], []),
    "demo": ("openmm_backmap.demo.run_demo", ["demo", "--quick"], []),
    "evaluate": (
        "openmm_backmap.io.trajectories.require_unrestrained",
        ["evaluate", "--model", "{m.pt}", "--reference", "{r.dcd}", "--topology", "{t.pdb}"],
        ["--model", "--reference", "--topology"],
    ),
    "hybrid": (
        "openmm_backmap.sampling.hybrid.run_hybrid",
        ["hybrid", "--model", "{m.pt}", "--cg-model", "{cg.pt}", "--start", "{s.pdb}", "--iterations", "1"],
        ["--model", "--cg-model", "--start"],
    ),
    "peptides": ("openmm_backmap.systems.peptides.run", ["peptides"], []),
}


def _dir_argv(tmp_path: Path, monkeypatch, command: str, out: Path | str, *extra: str) -> list[str]:
    """The command's argv with empty input files in ``tmp_path/inputs``; its work replaced by
    :func:`_stop_work`, so a refusal shows it came before any MD, training or sampling."""
    import importlib

    target, argv, _ = _DIR_COMMANDS[command]
    module, attribute = target.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(module), attribute, _stop_work)
    filled = []
    for item in argv:
        if item.startswith("{"):  # an input file, each in a folder of its own
            name = item[1:-1]
            folder = tmp_path / "inputs" / name.replace(".", "_")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text("")
            item = str(folder / name)
        filled.append(item)
    return [*filled, "--out", str(out), *extra]


@pytest.mark.parametrize("command", list(_DIR_COMMANDS))
@pytest.mark.parametrize(
    "case, message",
    [
        ("file", "is a file; give a directory"),
        ("under a file", "cannot be created or written: Not a directory"),
        ("not empty", "already holds {}; pass --overwrite"),
    ],
)
def test_output_directory_checked_before_work(tmp_path, monkeypatch, capsys, command, case, message):
    """An --out that is a file, that cannot be created, or that already has content (for `reference`
    one of the files it writes; the resumable `peptides` continues it) is refused, naming the path,
    before the command's work starts; nothing that is there is touched."""
    from openmm_backmap.cli import main

    (tmp_path / "o").mkdir()
    keep = tmp_path / "o" / ("ala2.dcd" if command == "reference" else "old.txt")
    keep.write_text("keep")
    out = {"file": keep, "under a file": keep / "run", "not empty": keep.parent}[case]
    argv = _dir_argv(tmp_path, monkeypatch, command, out)
    if command == "peptides" and case == "not empty":
        with pytest.raises(_WorkStarted):
            main(argv)
        return
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--out {out}" in err and message.format(keep.name) in err
    assert keep.read_text() == "keep"


@pytest.mark.parametrize("command", [c for c in _DIR_COMMANDS if _DIR_COMMANDS[c][2]])
def test_output_directory_that_is_or_holds_an_input_is_refused(tmp_path, monkeypatch, capsys, command):
    """--out equal to one of the command's inputs, or a directory that holds one, is refused even
    with --overwrite, and the input is left as it was."""
    from openmm_backmap.cli import main

    for option in _DIR_COMMANDS[command][2]:
        argv = _dir_argv(tmp_path, monkeypatch, command, "", "--overwrite")
        given = argv[argv.index(option) + 1]
        argv[argv.index("--out") + 1] = given
        assert main(argv) == 2
        assert f"--out {given} is also the command's {option}" in capsys.readouterr().err
        argv[argv.index("--out") + 1] = str(tmp_path)  # a folder above the input's
        assert main(argv) == 2
        assert f"--out {tmp_path} contains the command's --" in capsys.readouterr().err
        argv[argv.index("--out") + 1] = str(Path(given).parent)
        assert main(argv) == 2
        assert f"--out {Path(given).parent} contains the command's {option} {given}" in capsys.readouterr().err
        assert Path(given).is_file() and Path(given).read_text() == ""


@pytest.mark.parametrize("command", list(_DIR_COMMANDS))
def test_output_directory_is_created_and_overwrite_lets_content_through(tmp_path, monkeypatch, command):
    """A new --out (and its missing parents) is created by the check; an existing one with content
    passes with --overwrite (`peptides` without it); either way the command's work is reached."""
    from openmm_backmap.cli import main

    fresh = tmp_path / "a" / "b"
    with pytest.raises(_WorkStarted):
        main(_dir_argv(tmp_path, monkeypatch, command, fresh))
    assert fresh.is_dir() and not list(fresh.iterdir())  # the writability probe leaves nothing behind
    (fresh / "old.txt").write_text("keep")
    with pytest.raises(_WorkStarted):  # `peptides` resumes what is there: it has no --overwrite
        main(_dir_argv(tmp_path, monkeypatch, command, fresh, *(["--overwrite"] if command != "peptides" else [])))
    assert (fresh / "old.txt").read_text() == "keep"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("command", list(_DIR_COMMANDS))
def test_read_only_output_directory_is_refused(tmp_path, monkeypatch, capsys, command):
    from openmm_backmap.cli import main

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        for out in (locked, locked / "new"):
            assert main(_dir_argv(tmp_path, monkeypatch, command, out)) == 2
            assert f"--out {out} cannot be created or written: Permission denied" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def test_reference_shares_a_data_folder_but_keeps_its_files(tmp_path, monkeypatch, capsys):
    """`reference` writes NAME.* into a data folder that may hold other systems: another system's
    files do not stop it, its own files are refused without --overwrite."""
    from openmm_backmap.cli import main

    (tmp_path / "chignolin.pdb").write_text("keep")
    with pytest.raises(_WorkStarted):
        main(_dir_argv(tmp_path, monkeypatch, "reference", tmp_path))
    (tmp_path / "ala2.dcd").write_text("keep")
    (tmp_path / "ala2.json").write_text("keep")
    assert main(_dir_argv(tmp_path, monkeypatch, "reference", tmp_path)) == 2
    assert f"--out {tmp_path} already holds ala2.dcd, ala2.json; pass --overwrite" in capsys.readouterr().err
    with pytest.raises(_WorkStarted):
        main(_dir_argv(tmp_path, monkeypatch, "reference", tmp_path, "--overwrite"))


def test_entropy_outputs_checked_before_work(tmp_path, monkeypatch, capsys):
    """`entropy` writes a JSON with a Markdown table and a PNG beside it: each of the three is checked
    like the other commands' output files, and the counts must be >= 1, before any model is loaded."""
    import openmm_backmap.analysis.entropy as entropy
    from openmm_backmap.cli import main

    monkeypatch.setattr(entropy, "run", _stop_work)
    for name in ("m.pt", "r.dcd", "t.pdb"):
        (tmp_path / name).write_text("")
    base = ["entropy", "--model", str(tmp_path / "m.pt"), "--reference", str(tmp_path / "r.dcd")]
    base += ["--topology", str(tmp_path / "t.pdb"), "--out"]
    assert main([*base, str(tmp_path / "m.pt")]) == 2
    assert "also the command's --model" in capsys.readouterr().err
    assert main([*base, str(tmp_path / "e.txt")]) == 2
    assert "unsupported format .txt" in capsys.readouterr().err
    (tmp_path / "e.md").write_text("keep")
    assert main([*base, str(tmp_path / "e.json")]) == 2
    assert f"{tmp_path / 'e.md'} exists; pass --overwrite" in capsys.readouterr().err
    assert main([*base, str(tmp_path / "f.json"), "--frames", "0"]) == 2
    assert "--frames must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(_WorkStarted):
        main([*base, str(tmp_path / "e.json"), "--overwrite"])


# ----------------------------------------------------------------------------- backmap: the write path
@pytest.fixture
def cg_input(tiny_ala2, tmp_path):
    """Six CG frames of the tiny ALA2 run (DCD) with their CG topology (PDB)."""
    cg = tiny_ala2["mapping"].cg_trajectory(tiny_ala2["traj"][:6])
    cg.save_dcd(str(tmp_path / "cg.dcd"))
    cg[0].save_pdb(str(tmp_path / "cg.pdb"))
    return tmp_path / "cg.dcd", tmp_path / "cg.pdb"


def _full_disk(original):
    """A writer that stores half of what it would write, then fails like a full disk."""
    import errno

    def write(*args, **kwargs):
        original(*args, **kwargs)
        path = Path(next(a for a in args if isinstance(a, str | Path)))
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return write


@pytest.mark.parametrize("suffix", [".dcd", ".h5", ".nc"])
def test_backmap_full_disk_names_path_and_counts_and_keeps_old_files(tiny_ala2, cg_input, monkeypatch, suffix):
    """A disk that fills while the trajectory is written: the error names the file, the frame and
    atom counts; the files an earlier run wrote there are untouched and no partial file is left."""
    import mdtraj as md

    from openmm_backmap.backmap import backmap_trajectory

    folder = cg_input[0].parent
    out, energies = folder / f"aa{suffix}", folder / "w.csv"
    out.write_bytes(b"earlier run")
    energies.write_text("earlier run")
    monkeypatch.setattr(md.Trajectory, "save", _full_disk(md.Trajectory.save))
    with pytest.raises(OSError) as err:
        backmap_trajectory(tiny_ala2["model"], *cg_input, out, samples=2, energies=energies, progress=False)
    message = str(err.value)
    assert (
        f"cannot write the backmapped trajectory {out} (12 frames of 22 atoms, from 6 CG frames x 2 samples)" in message
    )
    assert "No space left on device" in message
    assert out.read_bytes() == b"earlier run" and energies.read_text() == "earlier run"
    assert sorted(p.name for p in folder.iterdir()) == sorted(["cg.dcd", "cg.pdb", out.name, "w.csv"])


def test_backmap_energies_write_failure_keeps_both_old_files(tiny_ala2, cg_input, monkeypatch):
    """The trajectory is written but the energies CSV fails: neither replaces the earlier pair (the
    two files stay a matching pair), the error names the CSV and its row count."""
    import openmm_backmap.backmap as backmap

    folder = cg_input[0].parent
    out, energies = folder / "aa.dcd", folder / "w.csv"
    out.write_bytes(b"earlier run")
    energies.write_text("earlier run")
    monkeypatch.setattr(backmap, "write_backmap_energies", _full_disk(backmap.write_backmap_energies))
    with pytest.raises(OSError, match=rf"cannot write the energies file {energies} \(12 rows, 12 frames of 22"):
        backmap.backmap_trajectory(tiny_ala2["model"], *cg_input, out, samples=2, energies=energies, progress=False)
    assert out.read_bytes() == b"earlier run" and energies.read_text() == "earlier run"
    assert sorted(p.name for p in folder.iterdir()) == ["aa.dcd", "cg.dcd", "cg.pdb", "w.csv"]
    monkeypatch.undo()  # the same call with working writers replaces both
    res = backmap.backmap_trajectory(tiny_ala2["model"], *cg_input, out, samples=2, energies=energies, progress=False)
    assert res["n_samples"] == 12 and energies.read_text().count("\n") == 13
    # and the AA topology beside the trajectory, written once both files are in place
    assert sorted(p.name for p in folder.iterdir()) == ["aa.dcd", "aa.pdb", "cg.dcd", "cg.pdb", "w.csv"]


@pytest.mark.parametrize(
    "name, error, message",
    [
        ("aa.txt", ValueError, r"aa\.txt: unsupported format \.txt; use one of \.dcd"),
        ("aa", ValueError, r"unsupported format \(no suffix\)"),
        ("missing/aa.dcd", OSError, r"missing/aa\.dcd: .*missing is not an existing folder"),
        ("cg.pdb/aa.dcd", OSError, r"cg\.pdb/aa\.dcd: .*cg\.pdb is not an existing folder"),
        ("sub.dcd", OSError, r"trajectory .*sub\.dcd is a directory"),
    ],
)
def test_backmap_output_checked_before_the_model_is_loaded(tiny_ala2, cg_input, monkeypatch, name, error, message):
    """An output mdtraj cannot write (format, folder) is refused before the model is loaded, not after
    the sampling."""
    import openmm_backmap.backmap as backmap

    (cg_input[0].parent / "sub.dcd").mkdir()
    monkeypatch.setattr(backmap, "load_model", _stop_work)
    with pytest.raises(error, match=message):
        backmap.backmap_trajectory(tiny_ala2["model"], *cg_input, cg_input[0].parent / name, progress=False)
    with pytest.raises(OSError, match=r"energies file .*missing/w\.csv: .*not an existing folder"):
        backmap.backmap_trajectory(
            tiny_ala2["model"], *cg_input, cg_input[0].parent / "aa.dcd", energies=cg_input[0].parent / "missing/w.csv"
        )


@pytest.mark.parametrize(
    "argv",
    [
        ["hybrid", "--model", "m.pt", "--cg-model", "c.pt", "--start", "s.pdb", "--iterations", "1", "--out", "o"],
        ["train", "--topology", "t.pdb", "--trajectory", "t.dcd", "--mapping", "m.json", "--out", "o.ckpt"],
    ],
)
@pytest.mark.parametrize("value", ["-1", "x"])
def test_step_counts_below_zero_are_refused(argv, value, capsys):
    """MD step counts may be 0 (none) but not negative: `hybrid --langevin-steps -1` ran a chain
    without AA dynamics, silently."""
    from openmm_backmap.cli import main

    option = "--langevin-steps" if argv[0] == "hybrid" else "--energy-steps"
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, option, value])
    assert exit_info.value.code == 2
    assert (
        "must be >= 0, got -1" if value == "-1" else "expected a whole number >= 0, got 'x'"
    ) in capsys.readouterr().err


def test_peptides_count_below_one_is_refused(tmp_path, monkeypatch, capsys):
    """`peptides --n-peptides 0` made the default 48 peptides."""
    from openmm_backmap.cli import main

    for value in ("0", "-2"):
        argv = _dir_argv(tmp_path, monkeypatch, "peptides", tmp_path / "corpus", "--n-peptides", value)
        assert main(argv) == 2
        assert f"--n-peptides must be >= 1, got {value}" in capsys.readouterr().err


def test_peptides_bad_long_set_is_refused(tmp_path, monkeypatch, capsys):
    from openmm_backmap.cli import main

    for option, value, rule in (("--n-long", "-1", ">= 0"), ("--n-helical", "-3", ">= 0"), ("--long-ps", "0", "> 0")):
        argv = _dir_argv(tmp_path, monkeypatch, "peptides", tmp_path / "corpus", option, value)
        assert main(argv) == 2
        assert f"{option} must be {rule}, got {value}" in capsys.readouterr().err
    assert not (tmp_path / "corpus" / "train").exists()


def test_export_output_equal_to_its_checkpoint_is_refused(tmp_path, capsys):
    from openmm_backmap.cli import main

    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(b"checkpoint")
    assert main(["export", str(ckpt), "-o", str(ckpt), "--overwrite"]) == 2
    assert f"--output {ckpt} is also the command's checkpoint" in capsys.readouterr().err
    (tmp_path / "m.pt").write_bytes(b"old model")
    assert main(["export", str(ckpt), "-o", str(tmp_path / "m.pt")]) == 2
    assert "m.pt exists; pass --overwrite" in capsys.readouterr().err
    assert ckpt.read_bytes() == b"checkpoint" and (tmp_path / "m.pt").read_bytes() == b"old model"


@pytest.mark.parametrize("factor, message", [(10.0, "look like Angstrom"), (0.1, "look 10x too small")])
def test_train_cg_refuses_coordinates_in_the_wrong_unit(tiny_ala2, tmp_path, factor, message):
    """A trajectory whose coordinates are 10x off (Angstrom stored where nm belong, or the reverse)
    trained a CG potential of the wrong size without a word; `train` refused it already."""
    from openmm_backmap.training.config import CGPotentialTraining
    from openmm_backmap.training.pipeline import train_cg_from_files

    traj = tiny_ala2["traj"][:40]
    traj.xyz = traj.xyz * factor
    traj.save_dcd(str(tmp_path / "scaled.dcd"))
    tiny_ala2["mapping"].to_json(tmp_path / "six.json")
    with pytest.raises(ValueError, match=rf"training coordinates of .*scaled\.dcd: bond lengths .*{message}"):
        train_cg_from_files(
            str(tiny_ala2["paths"]["pdb"]),
            str(tmp_path / "scaled.dcd"),
            str(tmp_path / "six.json"),
            tmp_path / "cg.ckpt",
            CGPotentialTraining(epochs=1),
            progress=False,
            log=lambda _: None,
        )
    assert not (tmp_path / "cg.ckpt").exists()


# ----------------------------------------------------------------------------- coordinates in Angstrom
def test_backmapper_records_cg_bond_range(tiny_ala2):
    from openmm_backmap.geometry import bond_length_range
    from openmm_backmap.io.backmap_model import load_model

    model = load_model(tiny_ala2["model"], device="cpu")
    X0 = tiny_ala2["mapping"].project(tiny_ala2["traj"].xyz[:1].astype(np.float64))
    lo, hi = model.metadata["cg_bond_range_nm"]
    assert (lo, hi) == pytest.approx(bond_length_range(X0, model.metadata["cg_bonds"]))
    assert 0.1 < lo <= hi < 0.5  # CG bonds of ALA2 in nm


def test_angstrom_cg_input_is_refused(tiny_ala2):
    from openmm_backmap.io.backmap_model import load_model

    model = load_model(tiny_ala2["model"], device="cpu")
    X = tiny_ala2["mapping"].project(tiny_ala2["traj"].xyz[:4].astype(np.float64))
    aa, _ = model.sample(X, 1, seed=0)  # nm passes
    assert aa.shape == (4, model.n_aa, 3)
    with pytest.raises(ValueError, match="look like Angstrom"):
        model.sample(10.0 * X, 1, seed=0)


def test_angstrom_training_data_is_refused(tiny_ala2):
    from openmm_backmap.models.backmapper import Backmapper

    x = tiny_ala2["traj"].xyz[:20].astype(np.float64)
    with pytest.raises(ValueError, match="training coordinates.*look like Angstrom"):
        Backmapper.from_data(tiny_ala2["mapping"], 10.0 * x, n_layers=1, hidden=8, n_hidden=1)


# ----------------------------------------------------------------------------- AA System against the topology
def _elements(tiny_ala2) -> list[str]:
    return [a.element.symbol for a in tiny_ala2["traj"].topology.atoms]


def test_system_of_another_molecule_same_count_is_refused(tiny_ala2):
    """Same particle count, masses permuted (another molecule or atom order): refused, naming particles."""
    from openmm_backmap.openmm.energies import check_system_matches, load_system

    system = load_system(tiny_ala2["system_xml"])
    check_system_matches(system, _elements(tiny_ala2))  # its own topology passes
    masses = [system.getParticleMass(i) for i in range(system.getNumParticles())]
    heavy = next(i for i, m in enumerate(masses) if m._value > 10)
    system.setParticleMass(heavy, masses[heavy] + 20.0 * openmm.unit.dalton)  # e.g. a C where a Cl was
    with pytest.raises(ValueError, match=r"particle .* differ from their element's by more than 0.5 Da"):
        check_system_matches(system, _elements(tiny_ala2))


def test_particle_count_mismatch_names_both_counts(tiny_ala2):
    from openmm_backmap.openmm.energies import check_system_matches, load_system

    system = load_system(tiny_ala2["system_xml"])
    system.addParticle(1.0)
    n = system.getNumParticles()
    with pytest.raises(ValueError, match=rf"has {n} particles but the topology has {n - 1} atoms"):
        check_system_matches(system, _elements(tiny_ala2))


def test_hydrogen_mass_repartitioning_is_accepted(tiny_ala2):
    """HMR moves 2 Da from each heavy atom onto its hydrogen: masses differ, the total does not."""
    from openmm_backmap.openmm.energies import check_system_matches, load_system

    system = load_system(tiny_ala2["system_xml"])
    for a, b in tiny_ala2["traj"].topology.bonds:
        h, heavy = (a, b) if a.element.symbol == "H" else (b, a)
        if h.element.symbol == "H" and heavy.element.symbol != "H":
            system.setParticleMass(h.index, system.getParticleMass(h.index) + 2.0 * openmm.unit.dalton)
            system.setParticleMass(heavy.index, system.getParticleMass(heavy.index) - 2.0 * openmm.unit.dalton)
    check_system_matches(system, _elements(tiny_ala2))


def test_train_refuses_system_of_another_molecule(tiny_ala2, tmp_path):
    from openmm_backmap.openmm.energies import load_system
    from openmm_backmap.training.pipeline import aa_constraints

    system = load_system(tiny_ala2["system_xml"])
    system.setParticleMass(0, 80.0)
    path = tmp_path / "other.xml"
    path.write_text(openmm.XmlSerializer.serialize(system))
    with pytest.raises(ValueError, match=r"other\.xml does not match the elements of the topology"):
        aa_constraints(tiny_ala2["traj"], str(path))


# ----------------------------------------------------------------------------- overlapping groups, empty trajectories
def _overlapping_mapping(tiny_ala2):
    from openmm_backmap.mapping import CGMapping

    m = tiny_ala2["mapping"]
    groups = [list(map(int, g)) for g in m.groups]
    groups[1] = groups[1] + [groups[0][0]]  # the first atom of bead 0 also in bead 1
    return CGMapping(m.topology, groups, names=list(m.names)), groups[0][0]


def test_train_cg_refuses_overlapping_groups(tiny_ala2, tmp_path):
    from openmm_backmap.training.config import CGPotentialTraining
    from openmm_backmap.training.pipeline import train_cg_from_files

    mapping, atom = _overlapping_mapping(tiny_ala2)
    mapping.to_json(tmp_path / "overlap.json")
    paths = tiny_ala2["paths"]
    with pytest.raises(ValueError, match=rf"atom {atom} is in bead 0 .* and bead 1 .*a CG potential"):
        train_cg_from_files(
            paths["pdb"],
            paths["dcd"],
            str(tmp_path / "overlap.json"),
            tmp_path / "cg.ckpt",
            CGPotentialTraining(epochs=1),
            progress=False,
            log=lambda _: None,
        )
    assert not (tmp_path / "cg.ckpt").exists()


def test_backmapper_refuses_overlapping_groups(tiny_ala2):
    from openmm_backmap.models.backmapper import Backmapper

    mapping, atom = _overlapping_mapping(tiny_ala2)
    with pytest.raises(ValueError, match=rf"atom {atom} is in bead 0 .*a backmapper needs disjoint groups"):
        Backmapper(mapping)


def test_empty_and_header_only_trajectories_are_named(tiny_ala2, tmp_path):
    import mdtraj as md

    from openmm_backmap.io.trajectories import load_trajectory

    pdb = tiny_ala2["paths"]["pdb"]
    empty = tmp_path / "empty.dcd"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.dcd is empty \(0 bytes\): it has no frames"):
        load_trajectory(empty, pdb)
    one = tmp_path / "one.dcd"
    n = tiny_ala2["traj"].n_atoms
    with md.formats.DCDTrajectoryFile(str(one), "w") as fh:
        fh.write(tiny_ala2["traj"].xyz[:1] * 10.0)
    header = tmp_path / "header.dcd"
    header.write_bytes(one.read_bytes()[: -(n * 3 * 4 + 3 * 8)])  # the frame's three coordinate records cut off
    with pytest.raises(ValueError, match=rf"header\.dcd .* cannot be read \(topology: {n} atoms\): it has no frames"):
        load_trajectory(header, pdb)


# ----------------------------------------------------------------------------- periodic box against CG bonds
def test_box_smaller_than_twice_longest_bond_is_refused(cg_file):
    from openmm_backmap.geometry import check_box_fits
    from openmm_backmap.io.model_files import read_model_file

    longest = read_model_file(cg_file)[1]["cg_bond_range_nm"][1]
    small = np.eye(3) * 1.5 * longest
    with pytest.raises(ValueError, match="less than twice the longest CG bond"):
        forces.create_cg_system(
            np.full(N_BEADS, 12.0),
            str(cg_file),
            backend="python",
            usesPeriodicBoundaryConditions=True,
            boxVectors=small,
        )
    check_box_fits(np.eye(3) * 2.01 * longest, longest)  # wide enough passes
    with pytest.raises(ValueError, match="narrowest"):
        check_box_fits(np.diag([5.0, 5.0, 1.9 * longest]), longest)


# ----------------------------------------------------------------------------- counts in the library, sizes at run time
@pytest.mark.parametrize(
    "kind, field",
    [
        ("BackmapperTraining", "epochs"),
        ("BackmapperTraining", "batch_size"),
        ("CGPotentialTraining", "epochs"),
        ("CGPotentialTraining", "stride"),
    ],
)
def test_training_settings_refuse_counts_below_one(kind, field):
    from openmm_backmap.training import config

    with pytest.raises(ValueError, match=rf"{field} = 0"):
        getattr(config, kind)(**{field: 0})
    with pytest.raises(ValueError, match=rf"{field} = -2"):
        getattr(config, kind)(**{field: -2})


def test_backmap_batch_size_zero_is_a_clear_error(tmp_path):
    from openmm_backmap.backmap import backmap_trajectory

    with pytest.raises(ValueError, match="batch_size=0"):
        backmap_trajectory(tmp_path / "m.pt", tmp_path / "c.dcd", tmp_path / "c.pdb", tmp_path / "o.dcd", batch_size=0)


@needs_compiler
def test_package_in_system_of_another_size_names_both_counts(pair_package):
    with pytest.raises(ValueError, match=rf"built for {N_BEADS} particles, but the System has 4"):
        forces.create_cg_system(np.full(4, 12.0), str(pair_package), backend="python")
    system = openmm.System()
    for _ in range(4):
        system.addParticle(12.0)
    system.addForce(forces.create_force(str(pair_package), backend="python"))  # no count given: found at run time
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(_positions(0)[:4] * openmm.unit.nanometer)
    with pytest.raises(Exception, match=rf"built for {N_BEADS} particles, but the System has 4"):
        context.getState(getEnergy=True)


def test_reporter_refuses_a_box_smaller_than_twice_the_longest_cg_bond(setup, tmp_path):
    """A periodic CG box narrower than twice the longest CG bond seen in training would make
    make_whole wrap bonds to shorter images: the reporter refuses it at the report, naming the step,
    and writes no frame."""
    import copy

    import openmm
    from openmm import app, unit

    from openmm_backmap.io.backmap_model import load_model
    from openmm_backmap.openmm.reporter import BackmapReporter

    longest = load_model(setup["model"]).metadata["cg_bond_range_nm"][1]
    system = copy.deepcopy(setup["cg_system"])
    for force in system.getForces():
        force.setUsesPeriodicBoundaryConditions(True)
    width = 1.5 * longest
    system.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*(width * (i == k) for k in range(3))) for i in range(3)))
    sim = app.Simulation(
        setup["cg_top"].to_openmm(),
        system,
        openmm.VerletIntegrator(0.001 * unit.picoseconds),
        openmm.Platform.getPlatformByName("Reference"),
    )
    sim.context.setPositions(setup["X0"])
    reporter = BackmapReporter(tmp_path / "aa.dcd", 5, model=setup["model"], energyFile=tmp_path / "w.csv")
    sim.reporters.append(reporter)
    with pytest.raises(ValueError, match=r"periodic box at step 5 .*less than twice the longest CG bond"):
        sim.step(5)
    reporter.close()
    energy_file = tmp_path / "w.csv"
    assert not energy_file.exists() or energy_file.read_text().count("\n") <= 1  # a header at most, no row
