"""The six stages, in the order they run; each is a function (check, result) run in a child process of
its own. Each imports torch and the project inside, so that the parent never does."""

from gpucheck.stages.bench import stage_bench
from gpucheck.stages.env import stage_env
from gpucheck.stages.export import stage_export
from gpucheck.stages.loader import stage_loader
from gpucheck.stages.tests import stage_tests
from gpucheck.stages.train import stage_train

STAGES = ("env", "tests", "bench", "loader", "train", "export")
TITLES = {"env": "Environment", "tests": "GPU tests (pytest -m gpu)", "bench": "Model speed: ours against smp",
          "loader": "The loader against the GPU", "train": "The default recipe, trained for a fixed time",
          "export": "Export of the test split to the leaderboard file"}
STAGE_FUNCS = {"env": stage_env, "tests": stage_tests, "bench": stage_bench, "loader": stage_loader,
               "train": stage_train, "export": stage_export}
