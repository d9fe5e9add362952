# Two entry points: `make demo` (sample every digit class from the shipped digits model
# with classifier-free guidance and write a labelled grid) and `make test`. Both create .venv on first use. torch is pinned to 2.13.0 here
# because that release is the CPU build available offline on our machines; the
# package itself only asks for torch>=2.2.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps 'k-diffusion==0.1.1.post1'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/diffsampler demo --model digits --solver dpmpp_2m --steps 15 --scale 2 --out out/

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) out .pytest_cache
