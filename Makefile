# The two commands of the README, on a fresh machine or not:
#   make demo    install what is missing, then the main job on its embedded default
#   make test    install what is missing, then the whole test suite (.ci/run runs the same two steps)
# `make install` alone does the set-up: requirements.txt, then the package with its compiled
# extension (setup.py finds the CUDA toolkit through nvcc itself; see its header for the flags).
# It is redone when setup.py, requirements.txt or csrc/ change, or when an import fails.

PYTHON ?= python
STAMP := build/.rcar_fast-installed
CSRC := $(shell find csrc -type f 2>/dev/null)

.PHONY: demo test install

demo: install
	$(PYTHON) -m rcar_fast demo

test: install
	$(PYTHON) -m pytest tests -q -n auto

install: $(STAMP)
	@$(PYTHON) -c "import rcar_fast, pytest, xdist, hypothesis" 2>/dev/null || \
	  { rm -f $(STAMP); $(MAKE) --no-print-directory $(STAMP); }

$(STAMP): setup.py requirements.txt $(CSRC)
	$(PYTHON) -m pip install --quiet -r requirements.txt
	$(PYTHON) -m pip install --quiet --no-build-isolation -e .
	@$(PYTHON) -c "import rcar_fast; print('rcar_fast', rcar_fast.__version__, 'backends here:', rcar_fast.available_backends())"
	@mkdir -p $(@D) && touch $@
