"""Exporters for Prometheus, Zabbix and Nagios (built in later issues)."""
