"""MARS in Python: asynchronous block replication with monitoring as a first-class part.

The subpackages live in the repository's top-level folders (see pyproject.toml):
``mars.engine`` ← ``engine/``, ``mars.status`` ← ``status/``, ``mars.exporters`` ← ``exporters/``.
"""

__version__ = "0.1.0"
