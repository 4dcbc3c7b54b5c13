"""mars-status: renders the one status model (built in later issues)."""
