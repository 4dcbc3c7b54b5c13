# The two entry points: `make demo` and `make test`. Both install what they need first, so they
# work on a fresh Debian 12 machine where we are root (CI) as well as on a developer's machine.

VENV    ?= .venv
PY      := $(VENV)/bin/python
# Debian's python3: python3-libnbd (a real NBD client used by the tests) is built for it only.
SYSPY   ?= /usr/bin/python3
APT_PKGS := python3 python3-venv python3-libnbd libnbd-bin qemu-utils nbdkit fio fuse3 e2fsprogs util-linux tmux \
            iptables rsync iperf3

.PHONY: all deps venv test demo bench clean

all: test

deps:
	@missing=""; for p in $(APT_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "make: need root to install:$$missing" >&2; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(VENV)/.installed: pyproject.toml | deps
	$(SYSPY) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: deps $(VENV)/.installed

test: venv
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

demo: venv
	$(PY) demo/demo.py

bench: venv
	$(PY) bench/bench_write.py
	$(PY) bench/bench_replication.py
	$(PY) bench/bench_status.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
