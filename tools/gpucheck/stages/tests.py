"""Stage 2: `pytest -m gpu` (tests/test_gpu.py) on the device, one row per test."""

from __future__ import annotations

import json
import os

from gpucheck.state import ROOT, Check, Result


def stage_tests(check: Check, res: Result) -> None:
    import pytest

    rows = res.table("tests/test_gpu.py", ["test", "outcome", "seconds", "note or message"])
    notes = check.work / "test-notes.jsonl"
    notes.unlink(missing_ok=True)
    os.environ["AMODAL_GPU_NOTES"] = str(notes)
    os.environ["AMODAL_TEST_DEVICE"] = check.device
    counts: dict[str, int] = {}

    class Recorder:
        """One row per test, written as soon as the test is done (a stage stopped by its budget keeps them)."""

        def __init__(self):
            self.seconds: dict[str, float] = {}

        def pytest_runtest_logreport(self, report):
            name = report.nodeid.split("::")[-1]
            self.seconds[name] = self.seconds.get(name, 0.0) + report.duration
            done = report.when == "call" or (report.when == "setup" and not report.passed) or \
                (report.when == "teardown" and report.failed)
            if not done:
                return
            if report.skipped:
                outcome = "skipped"
                message = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
                message = message.removeprefix("Skipped: ")
            elif report.failed:
                outcome = "failed" if report.when == "call" else f"error in {report.when}"
                message = _failure_line(report.longreprtext)
            else:
                outcome, message = "passed", ""
            said = [n["note"] for n in map(json.loads, notes.read_text().splitlines()) if n["test"] == name] \
                if notes.exists() else []
            counts[outcome] = counts.get(outcome, 0) + 1
            res.add(rows, name, outcome, self.seconds[name], "; ".join(filter(None, [message, *said])))

    args = ["-m", "gpu", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra", "-W", "ignore::pytest.PytestConfigWarning",
            "--rootdir", str(ROOT), str(ROOT / "tests" / "test_gpu.py")]
    code = pytest.main(args, plugins=[Recorder()])
    res.summary(", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no test ran")
    if not check.cuda and counts.get("skipped"):
        res.note("skipped rows are CUDA-only checks; they run, and must pass, on a GPU")
    if check.cuda and counts.get("skipped"):
        res.note("a test skipped on CUDA: each test should run there; see its reason")
    if code not in (0, pytest.ExitCode.OK):
        raise RuntimeError(f"pytest exit status {int(code)}"
                           + (": some tests failed" if code == pytest.ExitCode.TESTS_FAILED else ""))


def _failure_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("E ")]
    return (lines[0][1:].strip() if lines else text.strip().splitlines()[-1] if text.strip() else "")[:300]

