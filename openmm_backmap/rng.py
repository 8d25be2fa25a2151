"""Random streams of the package's own, so that seeded samplers repeat without reseeding torch."""

from __future__ import annotations

import torch

__all__ = ["TorchStream"]


class TorchStream:
    """A random stream of torch's own, for models that draw from torch's global generator.

    Inside ``with stream:`` torch's CPU generator (and the current CUDA device's, when CUDA is
    initialised) runs from this stream's state, and the global state is restored on exit: a seeded
    sampler is reproducible without reseeding torch for the rest of the program. The state pickles.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.state = torch.Generator().manual_seed(self.seed).get_state()
        self.cuda_state: torch.Tensor | None = None
        self._fork = None

    def __enter__(self) -> TorchStream:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self._fork = torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else [])
        self._fork.__enter__()
        torch.set_rng_state(self.state)
        if cuda:
            if self.cuda_state is None:
                self.cuda_state = torch.Generator(device="cuda").manual_seed(self.seed).get_state()
            torch.cuda.set_rng_state(self.cuda_state)
        return self

    def __exit__(self, *exc) -> None:
        self.state = torch.get_rng_state()
        if self.cuda_state is not None and torch.cuda.is_initialized():
            self.cuda_state = torch.cuda.get_rng_state()
        fork, self._fork = self._fork, None
        fork.__exit__(*exc)

    def __getstate__(self) -> dict:
        return {
            "seed": self.seed,
            "state": self.state.clone(),
            "cuda_state": None if self.cuda_state is None else self.cuda_state.clone(),
        }

    def __setstate__(self, state: dict) -> None:
        self.seed, self.state, self.cuda_state, self._fork = state["seed"], state["state"], state["cuda_state"], None
