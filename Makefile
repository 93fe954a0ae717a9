# Every target installs what it needs: a fresh clone runs `make serve` or `make test` directly.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install serve test lint typecheck unit redis proxy clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev,bench]" -e "clients[cli,plot]"
	touch $(STAMP)

install: $(STAMP)

serve: install ## run the server on 127.0.0.1:8000 (in-memory store, default model)
	$(VENV)/bin/tta-server serve

redis: install ## make sure a Redis answers for the integration tests (starts one if needed)
	$(PY) -m tests.support.redis_server

proxy: ## haproxy for tests/integration/test_routing_proxy.py: Debian's package when root and missing; never fails
	@command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    { apt-get install -y -qq haproxy >/dev/null 2>&1 || \
	      { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq haproxy >/dev/null 2>&1; }; }; } || \
	  echo "proxy: haproxy not installed; the routing test will be skipped"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy

test: redis proxy lint typecheck ## ruff, mypy and the whole pytest suite
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
