"""The Prometheus, Zabbix and Nagios faces of the status model (none is built yet).

Each renders :mod:`mars.engine.model`'s snapshot and findings, as mars-status does, and imports
nothing else of the engine (tests/test_layers.py holds that rule).
"""
