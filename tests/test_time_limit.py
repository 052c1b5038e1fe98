"""The fast set's time limit (tests/time_limit.py): an unmarked test over the limit fails the run, one
marked slow, slurm or gpu does not, and one under the limit passes."""

import time_limit

INNER_TESTS = """
import time
import pytest

def test_quick():
    pass

def test_long():
    time.sleep(0.3)

@pytest.mark.slow
def test_long_slow():
    time.sleep(0.3)

@pytest.mark.slurm
def test_long_slurm():
    time.sleep(0.3)

@pytest.mark.gpu
def test_long_gpu():
    time.sleep(0.3)

def test_long_failing():
    time.sleep(0.3)
    assert False, "its own failure"
"""


def test_limit_fails_only_unmarked_long_tests(pytester):
    pytester.makeini("""
        [pytest]
        fast_test_limit_s = 0.2
        markers =
            slurm: cluster
            slow: long
            gpu: GPU
    """)
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = pytester.runpytest("-p", "time_limit", "--strict-markers", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, failed=2)
    outcomes = {r.nodeid.split("::")[1]: r.outcome for r in result.reprec.getreports("pytest_runtest_logreport")
                if r.when == "call"}
    assert outcomes == {"test_quick": "passed", "test_long": "failed", "test_long_slow": "passed",
                        "test_long_slurm": "passed", "test_long_gpu": "passed", "test_long_failing": "failed"}
    result.stdout.fnmatch_lines(["*test_long took * s, over the fast set's limit of 0.2 s*mark it @pytest.mark.slow*"])
    # a test that fails on its own keeps its own error
    result.stdout.fnmatch_lines(["*its own failure*"])


def test_default_limit_is_the_named_constant(pytester):
    config = pytester.parseconfig("-p", "time_limit")
    assert float(config.getini("fast_test_limit_s")) == time_limit.FAST_TEST_LIMIT_S == 10.0


def test_the_suite_runs_with_the_limit(request):
    assert request.config.pluginmanager.has_plugin("time_limit")
    assert request.config.getoption("strict_markers")
