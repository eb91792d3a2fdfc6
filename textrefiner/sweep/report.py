"""The sweep's report: textrefiner-results' Markdown, CSV and PNG of OUT (placeholder)."""
from __future__ import annotations

import os

from .. import results


def write_report(out_dir, spec) -> list:
    return [] if results.main([str(out_dir), "--out", os.path.join(str(out_dir), "report")]) \
        else [os.path.join(str(out_dir), "report", "results.md")]
