# The two commands that set up a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
#: e.g. `make demo DEMO_ARGS=--secure-aggregation`
DEMO_ARGS ?=

.PHONY: demo demo-dp test venv protos lint typecheck images charts clean

$(VENV)/.installed-dev: requirements/constraints.txt requirements/runtime.txt requirements/dev.txt pyproject.toml scripts/install.sh
	scripts/install.sh $(VENV) dev

venv: $(VENV)/.installed-dev

## demo: the embedded end-to-end job (coordinator + silo agents as processes, mTLS, loopback)
demo: venv
	$(PY) -m gptfl.cli.main demo $(DEMO_ARGS)

## demo-dp: the same comparison with DP-SGD at every silo (epsilon 8, delta 1e-5 per silo and job)
demo-dp: venv
	$(PY) -m gptfl.cli.main demo --dp --epsilon 8 --delta 1e-5

## test: lint, type check and the whole test suite (pytest exit 5, "no tests ran", fails)
test: venv lint typecheck
	$(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: venv
	$(PY) -m mypy

## protos: regenerate gptfl/proto from proto/ with the pinned grpcio-tools
protos: venv
	$(PY) scripts/gen_protos.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

## images: the CPU image (all entry points) and the CUDA synth image; needs a Docker engine
images:
	docker build -f deploy/docker/Dockerfile      -t gptfl:0.1.0      .
	docker build -f deploy/docker/Dockerfile.cuda -t gptfl-cuda:0.1.0 .

## charts: helm lint/template + kubernetes-validate for every chart and ci/ values file
charts: venv
	$(PY) scripts/check_charts.py
