"""`textrefiner-sweep`: experiments as sweeps of textrefiner-train runs (see cli.py, spec.py)."""
