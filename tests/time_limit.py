"""A pytest plugin that keeps the fast set fast: a test whose call phase runs longer than the limit
fails unless it carries one of the markers of the long tests (tests/conftest.py loads it).

The limit is the ini option `fast_test_limit_s` (default FAST_TEST_LIMIT_S), so that a test of this
plugin can run it with a short one."""

from __future__ import annotations

import pytest

# Wall seconds of a test's call phase (fixtures' set-up and teardown not counted). Tests that take
# over about half of this on a quiet 2-core machine are marked slow, so CI never trips it by chance.
FAST_TEST_LIMIT_S = 10.0

# slow: the long end-to-end tests; slurm: they wait on the cluster; gpu: run by tools/gpu_check.py,
# where a compile alone may take longer than the limit.
EXEMPT_MARKERS = ("slow", "slurm", "gpu")


def pytest_addoption(parser):
    parser.addini("fast_test_limit_s", "wall seconds a test not marked slow/slurm/gpu may run",
                  default=str(FAST_TEST_LIMIT_S))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.passed:
        return
    if any(item.get_closest_marker(name) for name in EXEMPT_MARKERS):
        return
    limit = float(item.config.getini("fast_test_limit_s"))
    if call.duration > limit:
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} took {call.duration:.1f} s, over the fast set's limit of "
                           f"{limit:g} s: make it faster or mark it @pytest.mark.slow "
                           f"(tests/time_limit.py)")
