# Two commands matter: `make run` and `make test` (see README.md).
# Both set up what a fresh Debian machine lacks, then run.

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
SYSTEM_PYTHON ?= /usr/bin/python3
VENV ?= .venv
CONFIG ?= etc/appliance.toml
export PYTHONPATH := $(CURDIR)

# Debian packages: DCMTK for the interoperability tests, Chromium and its driver for the
# web pages' browser test, and the Python libraries as Debian ships them, so the suite
# also runs on those versions.
DEBIAN_PACKAGES := dcmtk python3-twisted python3-pydicom python3-openssl \
	python3-service-identity python3-zope.interface python3-hypothesis \
	python3-cryptography python3-numpy python3-pil python3-venv \
	chromium chromium-driver python3-selenium

.PHONY: run test test-pypi test-debian test-package system-packages venv clean

$(VENV)/.installed: setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet --upgrade $$($(PYTHON) tools/requirements.py install_requires test)
	touch $@

venv: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/twistd --nodaemon --pidfile= appliance --config $(CONFIG)

system-packages:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		if [ "$$(id -u)" != 0 ]; then SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

# The suite on the newest releases from PyPI.
test-pypi: system-packages $(VENV)/.installed
	$(VENV)/bin/python -m twisted.trial --temp-directory=_trial_temp.pypi tests | tee _trial_pypi.log

# The suite on the versions Debian packages (the system Python and python3-*).
test-debian: system-packages
	$(SYSTEM_PYTHON) -m twisted.trial --temp-directory=_trial_temp.debian tests | tee _trial_debian.log

# The Debian package built, installed, run on port 104, upgraded and purged (tools/package_test.sh; root).
test-package:
	@$(MAKE) --no-print-directory system-packages DEBIAN_PACKAGES="$(DEB_BUILD_PACKAGES)"
	@if [ "$$(id -u)" != 0 ]; then SUDO=sudo; fi; $$SUDO bash tools/package_test.sh | tee _package.log

test:
	@status=0; \
	$(MAKE) --no-print-directory test-pypi || status=1; \
	$(MAKE) --no-print-directory test-debian || status=1; \
	$(MAKE) --no-print-directory test-package || status=1; \
	$(PYTHON) tools/trial_summary.py _trial_pypi.log _trial_debian.log _package.log || status=1; \
	exit $$status

clean:
	rm -rf $(VENV) _trial_temp* _trial_*.log _package.log _deb_build dist

# The crash-durability test at length (tools/torture.py; the suite runs 3 rounds):
# storescu streams, kill -9, restart, check every acknowledged object, 50 times.
# Then the robustness run (tools/soak.py; the suite runs a short one): hostile PDUs, 10,000
# associate/release and associate/abort cycles, floods, a trickled RQ, 50 senders at once,
# kill -9 during C-MOVE and during eviction; it ends with a report.
# Options through TORTURE_ARGS and SOAK_ARGS, e.g. make torture TORTURE_ARGS="--rounds 200 --seed 7".
.PHONY: torture
torture: system-packages $(VENV)/.installed
	@status=0; \
	$(VENV)/bin/python tools/torture.py --rounds 50 $(TORTURE_ARGS) || status=1; \
	$(VENV)/bin/python tools/soak.py $(SOAK_ARGS) || status=1; \
	exit $$status

# Coverage-guided fuzzing (atheris) of the PDU decoder, the command-set decoder and the data-set
# scanners, FUZZ_SECONDS each (default 120), from the corpus in tools/fuzz_corpus (tools/fuzz.py).
# A finding stops its target and leaves crash-* here; the run fails.
FUZZ_SECONDS ?= 120
.PHONY: fuzz
fuzz: $(VENV)/.installed
	$(VENV)/bin/pip install --quiet atheris
	@status=0; for target in pdu command dataset; do \
		echo "fuzzing $$target for $(FUZZ_SECONDS) s"; \
		$(VENV)/bin/python tools/fuzz.py $$target --seconds $(FUZZ_SECONDS) -print_final_stats=1 2>&1 | tail -12 || status=1; \
	done; \
	if ls crash-* >/dev/null 2>&1; then echo "findings: $$(ls crash-*)"; status=1; fi; \
	exit $$status

# The benchmarks, the Disk-Server against DCMTK and Debian's Orthanc; results go to bench/results/.
# bench/store_bench.py: C-STORE throughput beside storescp and Orthanc (1, 2, 4 and 8 senders).
# bench/ingest_profile.py: where one C-STORE's time goes in the Disk-Server (phase timers, medians), and
# the floor: the durable steps alone (file made, written, fsynced, linked, its directory fsynced).
# bench/query_bench.py: C-FIND and C-MOVE beside Orthanc, and C-FIND at 20k and 1M instances.
# bench/load_bench.py: a ~100 MB study loaded into the Memory-Server from the Disk-Server and from
# Orthanc, beside Orthanc -> storescp (C-MOVE): MB/s and the receiver's peak RSS.
# `make bench` runs them all (each even if one before it failed), `make bench-store`,
# `make bench-profile`, `make bench-query` or `make bench-load` one. Options through BENCH_ARGS for the
# three benchmarks (--repeat N, --workdir DIR), STORE_BENCH_ARGS, PROFILE_ARGS, QUERY_BENCH_ARGS or
# LOAD_BENCH_ARGS for one,
# e.g. make bench BENCH_ARGS="--repeat 3".
BENCH_PACKAGES := dcmtk orthanc
.PHONY: bench bench-store bench-profile bench-query bench-load bench-packages

bench-packages:
	@$(MAKE) --no-print-directory system-packages DEBIAN_PACKAGES="$(BENCH_PACKAGES)"

bench-store: bench-packages $(VENV)/.installed
	$(VENV)/bin/python bench/store_bench.py $(BENCH_ARGS) $(STORE_BENCH_ARGS)

bench-profile: bench-packages $(VENV)/.installed
	$(VENV)/bin/python bench/ingest_profile.py $(PROFILE_ARGS)
	$(VENV)/bin/python bench/ingest_profile.py --corpus large $(PROFILE_ARGS)

bench-query: bench-packages $(VENV)/.installed
	$(VENV)/bin/python bench/query_bench.py $(BENCH_ARGS) $(QUERY_BENCH_ARGS)

bench-load: bench-packages $(VENV)/.installed
	$(VENV)/bin/python bench/load_bench.py $(BENCH_ARGS) $(LOAD_BENCH_ARGS)

bench: bench-packages $(VENV)/.installed
	@status=0; \
	$(MAKE) --no-print-directory bench-store || status=1; \
	$(MAKE) --no-print-directory bench-profile || status=1; \
	$(MAKE) --no-print-directory bench-query || status=1; \
	$(MAKE) --no-print-directory bench-load || status=1; \
	exit $$status

# The Debian package, built from a clean copy of the committed tree (git archive of HEAD) into dist/:
# dicom-appliance_VERSION_all.deb, then checked with lintian.  DEB_BUILD_PACKAGES are what building needs.
DEB_BUILD_PACKAGES := debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools \
	python3-wheel lintian fakeroot
.PHONY: deb
deb:
	@$(MAKE) --no-print-directory system-packages DEBIAN_PACKAGES="$(DEB_BUILD_PACKAGES)"
	rm -rf _deb_build && mkdir -p _deb_build/src dist
	git archive HEAD | tar -x -C _deb_build/src
	cd _deb_build/src && env -u PYTHONPATH PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b --no-sign >../build.log 2>&1 || { tail -40 ../build.log; exit 1; }
	cp _deb_build/*.deb dist/
	lintian --fail-on error _deb_build/*.deb
	@ls -1 dist/*.deb

