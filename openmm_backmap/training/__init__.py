"""Training: the one epoch loop, the backmapper and CG-potential trainers, and the file-to-model pipelines."""
