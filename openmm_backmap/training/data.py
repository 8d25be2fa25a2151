"""Training data: (x, X) pairs from AA trajectories, split into contiguous time blocks.

Positions are nm throughout. Splits are made of contiguous blocks of frames, because frames close
in time are correlated and a random split would leak the validation set into training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mdtraj as md
import numpy as np

from openmm_backmap.mapping import CGMapping


def block_split(
    n_frames: int,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    n_blocks: int = 10,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Split frame indices into train / validation / test sets made of contiguous time blocks.

    The trajectory is cut into ``n_blocks`` equal contiguous blocks; whole blocks are assigned to
    the splits in the given proportions (at least one block each for a non-zero fraction), in an
    order shuffled by ``seed``. Indices within each split stay in time order.
    """
    if n_frames < 1:
        raise ValueError("no frames to split")
    fractions = np.asarray(fractions, dtype=float)
    if fractions.shape != (3,) or np.any(fractions < 0) or abs(fractions.sum() - 1) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    n_blocks = int(min(n_blocks, n_frames))
    wanted = int((fractions > 0).sum())
    if n_blocks < wanted:
        raise ValueError(f"{n_frames} frames cannot be split into {wanted} non-empty blocks")
    counts = np.floor(fractions * n_blocks).astype(int)
    counts[(fractions > 0) & (counts == 0)] = 1
    while counts.sum() > n_blocks:
        counts[int(np.argmax(counts))] -= 1
    counts[0] += n_blocks - counts.sum()
    edges = np.linspace(0, n_frames, n_blocks + 1).round().astype(int)
    order = np.random.default_rng(seed).permutation(n_blocks)
    out, start = {}, 0
    for name, count in zip(("train", "val", "test"), counts):
        blocks = np.sort(order[start : start + count])
        start += count
        idx = [np.arange(edges[b], edges[b + 1]) for b in blocks]
        out[name] = np.concatenate(idx) if idx else np.zeros(0, dtype=int)
    return out


@dataclass
class PairDataset:
    """(x, X) pairs: AA positions ``x`` (N, n_aa, 3) and their CG projections ``X`` (N, n_cg, 3), nm.

    ``frames`` are the indices of the frames in the source trajectory (time order kept), so that
    temporal models can find each frame's predecessor (``previous`` is -1 where the predecessor is
    not in this set).
    """

    x: np.ndarray
    X: np.ndarray
    frames: np.ndarray

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def previous(self) -> np.ndarray:
        """Index (into this dataset) of each frame's predecessor in time, or -1."""
        pos = {int(f): i for i, f in enumerate(self.frames)}
        return np.array([pos.get(int(f) - 1, -1) for f in self.frames], dtype=np.int64)

    def tensors(self, dtype=None):
        """The pairs as torch tensors (float32 by default)."""
        import torch

        dtype = dtype or torch.float32
        return torch.as_tensor(self.x, dtype=dtype), torch.as_tensor(self.X, dtype=dtype)


def make_pairs(
    traj: md.Trajectory,
    mapping: CGMapping,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    n_blocks: int = 10,
    seed: int = 0,
) -> dict[str, PairDataset]:
    """Build train / val / test :class:`PairDataset` s from a trajectory and a mapping."""
    if traj.n_atoms != mapping.n_aa:
        raise ValueError(f"the trajectory has {traj.n_atoms} atoms but the mapping expects {mapping.n_aa}")
    x = traj.xyz.astype(np.float64)
    mapping.check_positions(x, "trajectory coordinates")
    X = mapping.project(x)
    return {
        name: PairDataset(x[idx], X[idx], idx)
        for name, idx in block_split(traj.n_frames, fractions, n_blocks, seed).items()
    }
