"""The reporter's output files (io/reporter_outputs.py) write every byte through short writes."""

from __future__ import annotations

import os

import mdtraj as md
import numpy as np

import openmm_backmap.io.reporter_outputs as outputs


def test_short_writes_continue_at_the_right_byte(tmp_path, monkeypatch):
    """The OS may write fewer bytes than asked (a signal, a nearly full disk): each write continues
    where the last one stopped, byte for byte, also for the DCD's multi-dimensional record buffer,
    and the file mdtraj reads back holds the frames written."""
    real = os.pwrite
    calls = []

    def short(fd, data, offset):
        calls.append(len(data))
        return real(fd, bytes(memoryview(data).cast("B")[:7]), offset)

    monkeypatch.setattr(outputs.os, "pwrite", short)
    grid = outputs.StepGrid(10, 10, 2)
    xyz = np.random.default_rng(0).normal(0.0, 1.0, (4, 5, 3))
    dcd = outputs.DCDOutput(tmp_path / "a.dcd", 5)
    dcd.lock()
    dcd.begin(0, None)
    dcd.write(xyz[:2], 0.01, grid)
    dcd.write(xyz[2:], 0.02, grid)
    dcd.close()
    assert max(calls) > 7  # the writes were cut short
    top = md.Topology()
    residue = top.add_residue("X", top.add_chain())
    for _ in range(5):
        top.add_atom("C", md.element.carbon, residue)
    back = md.load_dcd(str(tmp_path / "a.dcd"), top=top)
    np.testing.assert_allclose(back.xyz, xyz.astype(np.float32), atol=1e-6)
    csv = outputs.EnergyOutput(tmp_path / "w.csv")
    csv.lock()
    csv.begin(0)
    csv.write("10,0.01,0,1,2,3,4\n10,0.01,1,1,2,3,4\n")
    csv.close()
    assert (tmp_path / "w.csv").read_text().splitlines()[1:] == ["10,0.01,0,1,2,3,4", "10,0.01,1,1,2,3,4"]
