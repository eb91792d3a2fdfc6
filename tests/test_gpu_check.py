"""benchmarks/gpu_check.py runs on the CPU at toy sizes, so it is not broken when a GPU comes.

One run of two variants (the slowest part of the full `--device cpu --small` run is building and
evaluating all 13): with a tolerance no fp16 logit can meet, exactly the logit checks fail, each
with its FAIL line, the exit status is 1, and every other check passes.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import HANG_TIMEOUT

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_the_cpu_and_fails_loudly(tmp_path):
    results = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--small",
         "--only", "CoOp+TR,PromptKD+TR amp", "--skip", "sweep,torchrun", "--steps", "2",
         "--tolerance", "1e-9", "--work", str(tmp_path / "work"), "--json", str(results)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert done.returncode == 1, done.stdout + done.stderr
    found = json.loads(results.read_text())
    failed = sorted(c["name"] for c in found["checks"] if not c["ok"])
    assert failed == ["CoOp+TR logits vs fp32 CPU", "PromptKD+TR amp logits vs fp32 CPU"], found
    for name in failed:
        assert f"FAIL {name}: max |diff| / logit scale" in done.stdout
    passed = {c["name"] for c in found["checks"] if c["ok"]}
    assert {"CoOp+TR training", "CoOp+TR classifier once per evaluation",
            "PromptKD+TR amp training", "PromptKD+TR amp classifier once per evaluation",
            "feature store read back exact", "feature store evaluation"} <= passed
    rows = {row["variant"]: row for row in found["methods"]}
    assert rows["CoOp+TR"]["precision"] == "fp16"  # the published config's
    assert rows["PromptKD+TR amp"]["precision"] == "amp"
    for row in rows.values():
        assert row["classifier_calls"] == 1 and row["refine_calls"] == 1
        # the same trained weights in fp32 on the CPU: fp16 / bfloat16 rounding only
        assert 0 < row["logit_difference"] < 1e-2
        assert row["step_ms"] > 0 and row["eval_img_s"] > 0 and row["encoder_img_s"] > 0
    assert found["device"] == "cpu" and found["torch"] and found["date"]
    assert "SKIP" not in done.stdout  # skipped sections (--skip) print nothing
