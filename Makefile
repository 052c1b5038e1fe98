# The two commands of a fresh machine (README.md): `make demo` and `make test`.
PYTHON ?= python3

.PHONY: install demo test cluster-up cluster-down

install:
	$(PYTHON) -m pip install -q -e '.[test]'

# The main job on the built-in synthetic data, no cluster needed: train, export the test split to the
# leaderboard file, check it. DEMO_STEPS sets the training length.
DEMO_STEPS ?= 300
demo: install
	$(PYTHON) -m amodal.launch jobs/smoke.toml --cluster local --name demo --set train.steps=$(DEMO_STEPS) --set train.val_every=100
	$(PYTHON) -m amodal.launch jobs/export.toml --cluster local --set export.checkpoint=runs/demo
	$(PYTHON) tools/make_submission.py --check runs/demo/export/test.lmdb.tar.gz --test-shards data/smoke

# The whole test suite; starts the project's own single-machine Slurm cluster first.
test: install cluster-up
	$(PYTHON) -m pytest -q

cluster-up:
	bash slurm/local-cluster.sh up

cluster-down:
	bash slurm/local-cluster.sh down
