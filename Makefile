# The two commands of a fresh machine (README.md): `make demo` and `make test`.
PYTHON ?= python3

.PHONY: install demo test test-fast cluster-up cluster-down gpu-rehearsal

install:
	$(PYTHON) -m pip install -q -e '.[test]'

# The main job on the built-in synthetic data, no cluster needed: train jobs/demo.toml (a ResNet-18
# U-Net, about three and a half minutes on 2 cores), draw one validation panel, export the test split
# to the leaderboard file and check it. The amodal-* commands are those `install` puts on the PATH.
demo: install
	amodal-launch jobs/demo.toml --cluster local --name demo
	amodal-visualize runs/demo --shards data/demo --split val -o runs/demo/panels --count 1
	amodal-launch jobs/export.toml --cluster local --set export.checkpoint=runs/demo
	amodal-submission --check runs/demo/export/test.lmdb.tar.gz --test-shards data/demo

# The whole test suite; starts the project's own single-machine Slurm cluster first.
test: install cluster-up
	$(PYTHON) -m pytest -q

# The inner loop: every test but the Slurm, slow and GPU ones; starts no cluster.
test-fast: install
	$(PYTHON) -m pytest -q -m "not slurm and not slow and not gpu"

cluster-up:
	bash slurm/local-cluster.sh up

cluster-down:
	bash slurm/local-cluster.sh down

# Before a run on the GPU machine (docs/gpu.md): its image rehearsed here (Python 3.12, torch 2.11,
# the carried wheels), once a venv is built; not part of `make test`.
gpu-rehearsal:
	bash tools/gpu_rehearsal.sh
