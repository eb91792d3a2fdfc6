"""The sweep's one live line (finished / running / queued / failed, time left) and its summary at
the end, for either executor: `Progress(runs).update(states)`, then `progress.summary(states)`.

States: "finished", "running", "queued", "failed", "blocked" (its training run failed), "skipped"
(finished before this sweep started: not counted in the time estimate).
"""
from __future__ import annotations

import sys
import time
from statistics import mean

from .plan import Run
from .plan import read_status

PLAIN_EVERY_S = 30.0  # not a terminal (a log file, Slurm's output): one line this often at most


class Progress:
    def __init__(self, runs: list, stream=None, clock=time.monotonic):
        self.runs = {run.key: run for run in runs}
        self.stream = stream or sys.stderr
        self.clock = clock
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.started: dict = {}  # key -> start time (this sweep's runs)
        self.seconds: dict = {}  # key -> wall seconds of the runs this sweep finished
        self._last_plain = None
        self._last_line = ""

    def started_run(self, key: str) -> None:
        self.started[key] = self.clock()

    def ended_run(self, key: str, ok: bool) -> None:
        if ok and key in self.started:
            self.seconds[key] = self.clock() - self.started[key]

    def line(self, states: dict, slots: int = 1) -> str:
        counts = {s: sum(1 for v in states.values() if v == s)
                  for s in ("finished", "skipped", "running", "queued", "failed", "blocked")}
        done = counts["finished"] + counts["skipped"]
        text = (f"[sweep] {done}/{len(states)} finished, {counts['running']} running, "
                f"{counts['queued']} queued, {counts['failed']} failed")
        if counts["blocked"]:
            text += f", {counts['blocked']} blocked"
        if self.seconds and (counts["queued"] or counts["running"]):
            # the runs left, each as long as the finished ones on average, `slots` at a time
            runs_left = counts["queued"] + counts["running"] / 2
            left = mean(self.seconds.values()) * runs_left / max(slots, 1)
            text += f", about {_duration(left)} left"
        return text

    def update(self, states: dict, slots: int = 1, force: bool = False) -> None:
        text = self.line(states, slots)
        if self.tty:
            if text == self._last_line and not force:
                return
            pad = max(len(self._last_line) - len(text), 0)
            self.stream.write("\r" + text + " " * pad)
            self.stream.flush()
        else:
            now = self.clock()
            if force or (text != self._last_line and (
                    self._last_plain is None or now - self._last_plain >= PLAIN_EVERY_S)):
                self.stream.write(text + "\n")
                self.stream.flush()
                self._last_plain = now
        self._last_line = text

    def summary(self, states: dict, reasons: dict | None = None) -> str:
        """The end: counts, then each failed run with its error line, log and rerun command,
        and each blocked run with why."""
        reasons = reasons or {}
        lines = [self.line(states)]
        failed = [k for k, s in states.items() if s == "failed"]
        for key in failed:
            run: Run = self.runs[key]
            status = read_status(run) or {}
            lines += [f"FAILED {key}",
                      f"  error: {status.get('error') or reasons.get(key, 'no status recorded')}",
                      f"  log: {run.log}",
                      f"  rerun: {run.command()}"]
        for key in (k for k, s in states.items() if s == "blocked"):
            lines.append(f"BLOCKED {key}: {reasons.get(key, 'its training run failed')}")
        if failed:
            lines.append("textrefiner-sweep ... --retry-failed reruns the failed runs.")
        return "\n".join(lines)

    def finish(self, states: dict, reasons: dict | None = None) -> None:
        if self.tty:  # the summary's first line takes the live line's place
            self.stream.write("\r" + " " * len(self._last_line) + "\r")
        self.stream.write(self.summary(states, reasons) + "\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
