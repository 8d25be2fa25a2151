"""OpenMM-facing pieces: Systems read into batched torch energies."""
