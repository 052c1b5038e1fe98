# The two commands of a fresh machine (README.md): `make demo` and `make test`.
PYTHON ?= python3

.PHONY: install demo test cluster-up cluster-down

install:
	$(PYTHON) -m pip install -q -e '.[test]'

# The main job on the built-in synthetic data, no cluster needed.
demo: install
	$(PYTHON) -m amodal.launch jobs/smoke.toml --cluster local

# The whole test suite; starts the project's own single-machine Slurm cluster first.
test: install cluster-up
	$(PYTHON) -m pytest -q

cluster-up:
	bash slurm/local-cluster.sh up

cluster-down:
	bash slurm/local-cluster.sh down
