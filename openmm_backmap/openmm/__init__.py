"""openmm"""
