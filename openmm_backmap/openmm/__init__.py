"""OpenMM-facing code: forces and plugin loading, compiled force packages, batched AA energies, the
reporter, flow moves in CG runs."""
