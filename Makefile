# relayq: `make demo` shows it working, `make test` proves it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TEST_PACKAGES := s-nail git-email libmailtools-perl php-cli swaks strace groff-base man-db python3-aiosmtpd python3-dnspython python3-uvloop python3-pytest monitoring-plugins-standard
# 4 workers on 2 cores: most tests wait (on subprocesses, sockets, timeouts), not compute.
# One test at a time per worker, so the slow ones tests/conftest.py puts first spread out.
PYTEST_ARGS ?= -n 4 --maxschedchunk 1

.PHONY: demo test venv test-deps lint clean bench fuzz man deb

$(BIN)/python:
	@$(PYTHON) -c "import ensurepip, venv" >/dev/null 2>&1 || scripts/apt-install.sh python3-venv
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

demo: venv
	@bash scripts/demo.sh

# Debian's logwatch, unpacked and not installed (it depends on an MTA): tests/system/test_logwatch.py;
# node_exporter likewise (its package would start a service): tests/integration/test_metrics.py
LOGWATCH_DIR := build/logwatch

test-deps:
	@scripts/apt-install.sh $(TEST_PACKAGES) $(DEB_PACKAGES)
	@scripts/unpack-deb.sh logwatch $(LOGWATCH_DIR)
	@scripts/unpack-deb.sh prometheus-node-exporter build/node-exporter

test: venv test-deps
	$(BIN)/ruff check src tests bench fuzz
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/pytest $(PYTEST_ARGS) -q

lint: venv
	$(BIN)/ruff check src tests bench fuzz
	$(BIN)/mypy
	$(BIN)/lint-imports

# the man pages, generated from the config schema, the flag tables and the parser (built, not committed)
man: venv
	$(BIN)/python -m relayq.cli.manpages build/man docs

# the Debian package (debian/), built and checked by lintian in build/deb/
DEB_PACKAGES := debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools \
	python3-wheel python3-aiosmtpd python3-dnspython lintian
deb:
	@scripts/apt-install.sh $(DEB_PACKAGES)
	@scripts/build-deb.sh

clean:
	rm -rf $(VENV) demo build *.egg-info

bench: venv
	$(BIN)/relayq install --root /var/tmp/relayq-bench/root --venv >/dev/null
	$(BIN)/python bench/submit.py --sendmail /var/tmp/relayq-bench/root/usr/sbin/sendmail
	$(BIN)/python bench/drain.py
	$(BIN)/python bench/wakeup.py
	$(BIN)/python bench/scale.py
	if [ "$$(id -u)" = 0 ]; then $(BIN)/python bench/handover.py; fi

FUZZ_SECONDS ?= 60
fuzz: venv
	@mkdir -p fuzz/artifacts
	@for t in address headers envelope aliases reply flags; do \
		echo "== fuzz/$$t.py for $(FUZZ_SECONDS) s"; \
		$(BIN)/python fuzz/$$t.py -max_total_time=$(FUZZ_SECONDS) -artifact_prefix=fuzz/artifacts/ \
			2>&1 | tail -2 || exit 1; \
	done
