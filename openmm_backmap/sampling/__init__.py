"""Sampling with the models: the hybrid CG-to-AA Markov chain."""
