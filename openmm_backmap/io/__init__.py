"""Files: model files (every format version), checkpoints, energy files, trajectories, PDB text."""
