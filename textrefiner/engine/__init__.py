"""The standalone runner: Dassl's training loop, outputs and checkpoints, without Dassl."""
