"""Backmapping models: the per-molecule backmapper and the residue-local protein backmapper."""
