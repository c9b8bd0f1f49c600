# Two commands: `make run` starts the gateway on the embedded defaults, `make test` passes.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Debian packages the tests use as real peers and tools (DCMTK clients, Orthanc, tesseract,
# Chromium for browser tests, strace to prove no unredacted file is written, OpenLDAP slapd,
# systemd-analyze to verify the units, sshd for SFTP, 7-Zip and unzip to open exports,
# libturbojpeg0 for wsidicomizer's whole-slide conversion, zip as bench/export.py's peer, gcc
# to build bench/ingest.py's durable storescp)
SYSTEM_PACKAGES := dcmtk orthanc tesseract-ocr chromium strace slapd ldap-utils systemd \
                   openssh-server p7zip-full unzip libturbojpeg0 zip postgresql gcc
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lint system-deps venv bench clean

run: $(STAMP)
	$(VENV)/bin/fiona up

# ruff and mypy first: a lint error fails `make test` like a failing test. Two test processes
# (pytest-xdist, a module's tests stay together): most tests wait on daemons and peers, so two
# halve the wall time on CI's 2 cores
test: system-deps $(STAMP)
	$(MAKE) --no-print-directory lint
	$(PY) -m pytest -q -n 2 --dist loadscope

# ruff and mypy, configured in pyproject.toml
lint: $(STAMP)
	$(VENV)/bin/ruff check fiona tests bench bin
	$(VENV)/bin/mypy fiona

bench: system-deps $(STAMP)
	$(PY) bench/ingest.py
	$(PY) bench/deid.py

venv: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; fi

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
