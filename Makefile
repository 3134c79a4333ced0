# Two entry points, both safe to re-run (nothing is rebuilt or downloaded twice):
#   make run    set everything up, fetch the default models, run the main job on them
#   make test   set everything up, fetch the default models, run the test suite
# and, for development, make test-fast (no end-to-end tier) and make test-unit.
VENV := .venv
HANDOFF := $(VENV)/bin/handoff

.PHONY: setup models run test test-fast test-unit proto

setup:
	bash scripts/setup.sh

models: setup
	$(HANDOFF) models fetch

# The default prompt's answer ends at the model's end of turn (about 290 tokens), well within 512.
run: models
	$(HANDOFF) generate --max-tokens 512

# The tests also cover `serve-cloud --ray`: Ray Serve is an extra that only they install.
test test-fast test-unit: export HANDOFF_EXTRAS ?= cloud,test,ray

test: models
	$(VENV)/bin/python -m pytest --durations=25

# For development: the tiers without the real pair (tests/conftest.py marks every test unit, tiny or
# e2e). The tiny tier fetches the edge GGUF, for its tokenizer, on first use.
test-fast: setup
	$(VENV)/bin/python -m pytest -m "unit or tiny"

test-unit: setup
	$(VENV)/bin/python -m pytest -m unit

proto: setup
	$(VENV)/bin/python scripts/gen_proto.py
