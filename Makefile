# Shortcuts for the README commands; run after the README install (which creates .venv). Another environment:
# `make test BIN=/path/to/venv/bin`.
BIN ?= .venv/bin

.PHONY: demo test lint

demo:  ## convert SmolLM2 to CLA2, uptrain, eval before/after, write the report (README quickstart)
	$(BIN)/clakit demo

test:  ## what CI runs
	$(BIN)/python -m pytest -q -x

lint:  ## what CI's lint runs (.ci/run): ruff's rules; the code is not held to ruff's formatter
	$(BIN)/ruff check .
