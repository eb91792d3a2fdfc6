"""Run under torchrun by tests/test_distributed.py: `textrefiner-train` once per argument list in
the JSON file argv[1], in one process group (one launch instead of one per method)."""
import json
import sys

from textrefiner.train import main

if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        runs = json.load(f)
    for args in runs:
        code = main(args)
        if code:
            sys.exit(f"textrefiner-train {' '.join(args)} exited with {code}")
