"""Torch models: the conditional backmapper q(x | X) and the CG flow potential. No OpenMM here."""
