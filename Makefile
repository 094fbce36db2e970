# Thin wrapper: everything lives in scripts/dev.sh so machines without make work the same.
.PHONY: setup demo test lint bench
setup:
	bash scripts/dev.sh setup
demo:
	bash scripts/dev.sh demo
test:
	bash scripts/dev.sh test
lint:
	bash scripts/dev.sh lint
