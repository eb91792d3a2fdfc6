"""Dassl.pytorch layer (installed as `textrefiner_trainers`): importing it registers the trainers."""
