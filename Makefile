# Two commands do all set-up from nothing: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# torch is pinned in the same pip call as the project so the resolver keeps the
# CPU wheel; CUDA users install their own torch first (see README).
TORCH  ?= torch==2.13.0

.PHONY: install demo test test-all lint bench clean samples

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)" -e ".[all,dev]"
	@# backpack-for-pytorch pulls in torchvision (for its examples only). The torchvision that pip
	@# resolves next to a CPU-only torch is a CUDA build that cannot import, and a torchvision that
	@# cannot import also breaks transformers, so a broken one is removed.
	$(PY) -c "import torchvision" 2>/dev/null || $(PY) -m pip uninstall -y -q torchvision
	touch $(STAMP)

demo: $(STAMP)
	cd sample_checkpoints && ../$(VENV)/bin/hesscli info ckpt_step000400.pt
	cd sample_checkpoints && ../$(VENV)/bin/hesscli scan . --analyses trace,eigs,extremes,density \
		--probes 60 --top-k 5 --iters 40 --runs 4 --out ../hesscli-results
	$(VENV)/bin/hesscli plot hesscli-results

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check hesscli && $(PY) -m mypy hesscli

bench: $(STAMP)
	$(PY) -m benchmarks.run

samples: $(STAMP)
	$(PY) sample_checkpoints/make_samples.py

clean:
	rm -rf $(VENV) hesscli-results .pytest_cache .mypy_cache .ruff_cache
