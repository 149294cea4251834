# Set-up and the project's commands. Everything installs into .venv (created if missing).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TEST_EXTRAS := test,demo,verl,trl
DEMO_EXTRAS := demo

.PHONY: test demo bench bench-gpu clean

# $(1): the extras to install, with the tested versions of constraints/dev.txt.
define install
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints/dev.txt -e '.[$(1)]'
	touch $@
endef

$(VENV)/.installed-test: pyproject.toml constraints/dev.txt
	$(call install,$(TEST_EXTRAS))

$(VENV)/.installed-demo: pyproject.toml constraints/dev.txt
	$(call install,$(DEMO_EXTRAS))

# OpenRLHF does not install without CUDA; its tests import its modules from the wheel (no dependencies).
OPENRLHF_WHEEL := .cache/openrlhf/.stamp
$(OPENRLHF_WHEEL): | $(VENV)/.installed-test
	$(BIN)/python -m pip download -q --no-deps openrlhf==0.11.2 -d .cache/openrlhf
	touch $@

test: $(VENV)/.installed-test $(OPENRLHF_WHEEL)
	$(BIN)/python -m pytest -q $(ARGS)

demo: $(VENV)/.installed-demo
	$(BIN)/python -m entropy_reg.demo $(ARGS)

bench: $(VENV)/.installed-demo
	$(BIN)/python benchmarks/bench_cpu.py $(ARGS)

# On a CUDA machine whose python has torch and triton (no venv: it uses the machine's torch).
bench-gpu:
	$(PYTHON) benchmarks/bench_gpu.py $(ARGS)

clean:
	rm -rf $(VENV) .cache build dist *.egg-info .pytest_cache .hypothesis
