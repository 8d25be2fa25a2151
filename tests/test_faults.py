"""Fault suite: each case is a misuse or a concurrency hazard, replayed, with the clear error or the
correct result it must give.

Kept fast: small analytic TorchScript energies, one small compiled package (about 15 s to build on
two cores), and the shared tiny fixtures of ``conftest.py`` only where a real model file is needed.
"""

from __future__ import annotations

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
        return (state.getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole),
                state.getForces(asNumpy=True).value_in_unit(openmm.unit.kilojoule_per_mole / openmm.unit.nanometer))

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
