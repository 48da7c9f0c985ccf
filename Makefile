# retu: `make test` and `make demo` each work from a fresh clone (they depend on `install`).
PY := .venv/bin/python
export OMP_NUM_THREADS ?= 2

.PHONY: install test demo bench lint

install: .venv/.installed

.venv/.installed: requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

test: install
	$(PY) -m pytest -q

demo: install
	$(PY) retu.py demo

bench: install
	$(PY) bench/sampler.py
	$(PY) bench/sft.py
	$(PY) bench/decontaminate.py

lint: install
	.venv/bin/ruff check .
