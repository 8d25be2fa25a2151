#!/usr/bin/env bash
# Train a backmapper and a CG potential on an all-atom trajectory, then export both as
# self-contained TorchScript model files. Run from an empty directory.
set -euo pipefail

openmm-backmap reference ala2 --ns 10 --seed 1 --out data/

# any preset (ca, backbone, heavy-backbone, residue-com) or a groups JSON file
openmm-backmap train --topology data/ala2.pdb --trajectory data/ala2.dcd --mapping heavy-backbone \
    --aa-system data/ala2_system.xml --epochs 15 --out backmapper.ckpt
openmm-backmap train-cg --topology data/ala2.pdb --trajectory data/ala2.dcd --mapping heavy-backbone \
    --out cg.ckpt

openmm-backmap export backmapper.ckpt -o backmapper.pt   # embeds the AA System given to train
openmm-backmap export cg.ckpt -o cg.pt
# optional: the CG force with energy and forces fused into one library (~2 minutes; this machine only)
openmm-backmap compile cg.pt -o cg.pt2
openmm-backmap info cg.pt2
openmm-backmap info backmapper.pt

# the model file opens with torch alone, no openmm_backmap needed:
python -c "import torch; m = torch.jit.load('backmapper.pt'); print(m.sample(torch.zeros(1, 5, 3) + torch.randn(1, 5, 3) * 0.2, 2)[0].shape)"
