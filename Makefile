# Mailcore: the two commands that matter are `make run` and `make test`.
#
# `make test` works on a fresh Debian 12 clone as root: it makes .venv, installs the project
# with its test extras, installs the real servers the integration tests start (when missing),
# then runs ruff, mypy and trial.

SHELL := /bin/bash
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Rebuilt (pip install -e) whenever setup.py or pyproject.toml is newer than it.
STAMP := $(VENV)/.mailcore-installed

LINT_PATHS := mailcore web filters tests twisted/plugins
TRIAL_JOBS ?= 2
TRIAL_ARGS ?= -j$(TRIAL_JOBS)
RUN_ARGS ?=

# Real servers the integration tests start on 127.0.0.1 (never as system services).
# Append packages here; `make deps` installs whichever of them is not installed yet.
# postfix is only for its smtp-sink/smtp-source tools; postfix itself is never started.
TEST_SERVER_PKGS := dovecot-imapd dovecot-core spamassassin spamd spamc \
	clamav-daemon clamav clamdscan rspamd postfix swaks dovecot-pop3d poppler-utils \
	chromium chromium-driver libmagic1
# PostgreSQL 15 comes with the machine; installed only when no initdb can be found.
PG_PKG := postgresql

APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends

.PHONY: venv deps lint test run bench clean distclean

venv: $(STAMP)

$(BIN)/python:
	@if ! $(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "venv: installing python3-venv"; \
	    apt-get update && $(APT_INSTALL) python3-venv; \
	  else \
	    echo "venv: $(PYTHON) cannot make virtualenvs; install python3-venv" >&2; exit 1; \
	  fi; \
	fi
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.py pyproject.toml | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q -e '.[test,dev]'
	@touch $@

deps:
	@missing=""; \
	if ! command -v initdb >/dev/null 2>&1 \
	    && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  missing="$(PG_PKG)"; \
	fi; \
	for pkg in $(TEST_SERVER_PKGS); do \
	  dpkg-query -W -f='$${Status}\n' "$$pkg" 2>/dev/null | grep -q ' installed$$' \
	    || missing="$$missing $$pkg"; \
	done; \
	if [ -z "$${missing// }" ]; then echo "deps: every test server is installed"; exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "deps: not installed:$$missing (not root: tests that need them skip, or fail under CI)"; \
	  exit 0; \
	fi; \
	echo "deps: installing$$missing"; \
	echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
	policy=/usr/sbin/policy-rc.d; made_policy=""; \
	if [ ! -e "$$policy" ]; then \
	  printf '#!/bin/sh\nexit 101\n' > "$$policy" && chmod 755 "$$policy" && made_policy=1; \
	fi; \
	trap '[ -n "$$made_policy" ] && rm -f "$$policy"' EXIT; \
	apt-get update && $(APT_INSTALL) $$missing

lint: venv
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/mypy $(LINT_PATHS)

# Byte-compiled once before trial: the suite starts hundreds of `mailcore` and `twistd`
# processes, and where PYTHONDONTWRITEBYTECODE is set (as on this machine kind) each of them
# would compile our ~240 modules again (0.45 s of CPU each); existing .pyc files are still read.
test: venv deps lint
	$(BIN)/python -m compileall -q $(LINT_PATHS)
	$(BIN)/trial $(TRIAL_ARGS) tests

run: venv
	$(BIN)/twistd -n --pidfile= mailcore $(RUN_ARGS)

# The benchmarks need a few more tools than the tests (mbsync, wrk).
BENCH_PKGS := isync wrk

bench: venv deps
	@missing=""; for pkg in $(BENCH_PKGS); do \
	  dpkg-query -W -f='$${Status}\n' "$$pkg" 2>/dev/null | grep -q ' installed$$' \
	    || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$${missing// }" ] && [ "$$(id -u)" = 0 ]; then \
	  apt-get update && $(APT_INSTALL) $$missing; \
	fi
	@status=0; \
	$(BIN)/python bench/run.py || status=1; \
	$(BIN)/python bench/filters.py || status=1; \
	$(BIN)/python bench/fetch.py || status=1; \
	$(BIN)/python bench/migrate.py || status=1; \
	$(BIN)/python bench/mailapi.py || status=1; \
	$(BIN)/python bench/scale.py --postgres || status=1; \
	exit $$status

clean:
	rm -rf _trial_temp* build dist *.egg-info .mypy_cache .ruff_cache .hypothesis
	rm -f twisted/plugins/dropin.cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
