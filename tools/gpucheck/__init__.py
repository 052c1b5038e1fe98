"""The GPU acceptance check behind tools/gpu_check.py (docs/gpu.md), in parts: the shared state
(state), facts about this machine (machine), the six stages (stages), the parent that runs each in a
child process with its budget (runner), the carried wheels (wheels) and the markdown report (report).

It lives beside the script, not in amodal: it measures a checkout (tests/test_gpu.py, jobs/, wheels/,
docs/results/gpu/) rather than being part of the installed package, and `python tools/gpu_check.py`
imports it from a checkout with no install because the script's folder is on sys.path.
"""
