# One-command entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
TINY_MODEL ?= models/tiny-sd21
DURATION ?= 60

.PHONY: setup demo segment-demo test clean

# torch goes in first and pinned: a dependency's bare `torch` would otherwise pull a multi-GB CUDA build.
$(BIN)/iseg: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e '.[onnx,test]'
	touch $@

setup: $(BIN)/iseg

$(TINY_MODEL)/model_index.json: | $(BIN)/iseg
	$(BIN)/iseg make-tiny-model $(TINY_MODEL) --family sd21 --seed 0

# Segment the bundled sample images with the tiny model; prints where masks and overlays went.
segment-demo: $(BIN)/iseg $(TINY_MODEL)/model_index.json
	$(BIN)/iseg segment engine/samples/*.png --model $(TINY_MODEL) --classes scratch,dent,crack \
		--bg-context "metal surface, table, background" --out out/demo --save-maps

# The demo daemon on a synthetic camera (tiny model built on first run) with the operator console;
# a demo operator gets a fresh random password, printed with the console URL. Ctrl-C stops it early.
demo: $(BIN)/iseg
	@$(BIN)/iseg users add demo --role operator --random-password --config configs/demo.yaml | \
		sed -n 's/^  password: //p' | { read -r pw; printf '\nconsole:  http://127.0.0.1:8080/\nuser:     demo\npassword: %s\n\n' "$$pw"; }
	$(BIN)/iseg run --config configs/demo.yaml --duration $(DURATION)

test: $(BIN)/iseg
	$(BIN)/python -m pytest -q

clean:
	rm -rf out models .pytest_cache
