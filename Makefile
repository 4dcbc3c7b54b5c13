# The two entry points: `make demo` and `make test`. Both install what they need first, so they
# work on a fresh Debian 12 machine where we are root (CI) as well as on a developer's machine.

VENV    ?= .venv
PY      := $(VENV)/bin/python
# Debian's python3: python3-libnbd (a real NBD client used by the tests) is built for it only.
SYSPY   ?= /usr/bin/python3
APT_PKGS := python3 python3-venv python3-libnbd libnbd-bin qemu-utils nbdkit fio fuse3 libfuse2 iproute2 e2fsprogs util-linux tmux prometheus \
            iptables rsync iperf3 man-db openssl gcc pkg-config libglib2.0-dev libgnutls28-dev \
            postgresql zabbix-server-pgsql zabbix-frontend-php php-pgsql apache2 libapache2-mod-php zabbix-agent sudo
# The Zabbix packages: tests/zabbix_server.py starts a real Zabbix 6.0 (server, frontend API, agent) on 127.0.0.1.

# `make install`: the wheel of this tree in its own venv, commands and man pages linked into PREFIX,
# the systemd unit into /etc (docs/install.md). DESTDIR stages it under another root, used in place:
# a venv is not relocatable, its scripts name their interpreter by absolute path.
PREFIX    ?= /usr/local
MARS_HOME ?= /opt/mars
DESTDIR   ?=
UNITDIR   ?= /etc/systemd/system
COMMANDS  := marsd marsadm mars-status mars-exporter mars-zabbix check_mars
MANPAGES  := man8/marsd.8 man8/marsadm.8 man1/mars-status.1 man8/mars-exporter.8
UNITS     := marsd.service mars-exporter.service

.PHONY: all deps venv test demo bench torture clean install uninstall

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
	$(PY) -m pytest -q -ra -n 2 --dist loadgroup --durations=30 $(PYTEST_ARGS)

demo: venv
	$(PY) demo/demo.py

# The full fault campaign (tests/faults/, docs/fault-campaign.md): the same tests as in `make test`,
# at full size (MARS_TORTURE=1: 200+ power cuts, 1000 crash rounds, 1M inputs per decoder, minutes of
# partitions). Each prints a `campaign:` line of figures; bench/README.md has the table.
torture: venv
	@{ MARS_TORTURE=1 MARS_PARTITION_S=600 $(PY) -m pytest -q -s -ra -o timeout=0 tests/faults \
	  tests/test_quiet.py::test_a_long_partition_with_changes_on_both_sides_converges_without_a_whole_tree \
	  tests/test_crash.py::test_sigkill_under_write_load \
	  $(PYTEST_ARGS); echo $$? > torture.rc; } 2>&1 \
	  | tee torture.log
	@echo "== fault campaign figures (torture.log) =="; grep '^campaign:' torture.log || true
	@rc=$$(cat torture.rc); rm -f torture.rc; exit $$rc

bench: venv
	$(PY) bench/bench_write.py
	$(PY) bench/bench_replication.py
	$(PY) bench/bench_status.py
	$(PY) bench/bench_exporter.py
	$(PY) bench/bench_handover.py
	$(PY) bench/bench_quiet.py
	$(PY) bench/bench_traffic.py
	$(PY) bench/bench_resize.py
	$(PY) bench/bench_wan.py
	$(PY) bench/bench_nbd_tls.py
	$(PY) bench/bench_sparse.py

install:
	@$(SYSPY) -c 'import venv, ensurepip' 2>/dev/null || { \
	  echo "make install: $(SYSPY) cannot create a venv; install python3-venv (apt-get install python3-venv)" >&2; exit 1; }
	@for d in $(DESTDIR)$(MARS_HOME) $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(UNITDIR); do \
	  mkdir -p $$d 2>/dev/null && [ -w $$d ] || { \
	    echo "make install: cannot write to $$d; run it as root (sudo make install) or set DESTDIR" >&2; exit 1; }; \
	done
	$(SYSPY) -m venv $(DESTDIR)$(MARS_HOME)
	$(DESTDIR)$(MARS_HOME)/bin/python -m pip install -q --upgrade pip
	@# The wheel, built from a clean copy of this tree (a stale build/ would leak into it, and the
	@# tree may be read-only); then its dependencies, then the wheel itself again by force: a tree
	@# with the same version number must still replace what is installed.
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && mkdir "$$tmp/src" && \
	tar -cf - --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist --exclude='*.egg-info' \
	  --exclude=__pycache__ --exclude=.pytest_cache --exclude=.hypothesis . | tar -xf - -C "$$tmp/src" && \
	$(DESTDIR)$(MARS_HOME)/bin/python -m pip wheel -q --no-deps -w "$$tmp" "$$tmp/src" && \
	$(DESTDIR)$(MARS_HOME)/bin/python -m pip install -q "$$tmp"/mars_replication-*.whl && \
	$(DESTDIR)$(MARS_HOME)/bin/python -m pip install -q --no-deps --force-reinstall "$$tmp"/mars_replication-*.whl
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/man/man8 $(DESTDIR)$(PREFIX)/share/man/man1
	@# Relative links: right in the staged root and in the final one alike.
	for c in $(COMMANDS); do ln -sfr $(DESTDIR)$(MARS_HOME)/bin/$$c $(DESTDIR)$(PREFIX)/bin/$$c; done
	for m in $(MANPAGES); do ln -sfr $(DESTDIR)$(MARS_HOME)/share/man/$$m $(DESTDIR)$(PREFIX)/share/man/$$m; done
	install -d $(DESTDIR)$(UNITDIR)
	for u in $(UNITS); do sed 's|/opt/mars/|$(MARS_HOME)/|g' systemd/$$u > $(DESTDIR)$(UNITDIR)/$$u && \
	  chmod 644 $(DESTDIR)$(UNITDIR)/$$u; done
	@echo "installed MARS into $(DESTDIR)$(MARS_HOME); next: systemctl daemon-reload && systemctl enable --now marsd mars-exporter"

uninstall:
	for c in $(COMMANDS); do rm -f $(DESTDIR)$(PREFIX)/bin/$$c; done
	for m in $(MANPAGES); do rm -f $(DESTDIR)$(PREFIX)/share/man/$$m; done
	for u in $(UNITS); do rm -f $(DESTDIR)$(UNITDIR)/$$u; done
	rm -rf $(DESTDIR)$(MARS_HOME)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
