# Two entry points, both safe to re-run (nothing is rebuilt or downloaded twice):
#   make run    set everything up, fetch the default models, run the main job on them
#   make test   set everything up, fetch the default models, run the test suite
VENV := .venv
HANDOFF := $(VENV)/bin/handoff

.PHONY: setup models run test proto

setup:
	bash scripts/setup.sh

models: setup
	$(HANDOFF) models fetch

run: models
	$(HANDOFF) generate --max-tokens 96

test: models
	$(VENV)/bin/python -m pytest

proto: setup
	$(VENV)/bin/python scripts/gen_proto.py
