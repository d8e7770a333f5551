# Two commands on a fresh machine:  `make demo`  (the whole pipeline)  and  `make test`.
PYTHON ?= python3
CUB ?= examples/cub_mini
RUN ?= runs/demo
# the shipped mini sample has classes 1, 9 (train) and 14, 17 (test); a full CUB download uses Song et al.'s split
SPLIT ?= $(if $(filter examples/cub_mini,$(CUB)),classes:1-10/11-20,song)
ARGS ?=

.PHONY: setup demo test browser

setup:
	$(PYTHON) -m pip install -q -e '.[dev]'

demo: setup
	cbir run --cub $(CUB) --out $(RUN) --split $(SPLIT) $(ARGS)

# Debian's chromium drives the page test (never a browser download); installed when we may.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium missing: the browser test will be skipped"; }

test: setup browser
	$(PYTHON) -m pytest -q
