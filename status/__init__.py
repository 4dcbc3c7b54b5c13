"""mars-status: the Textual TUI, the plain text and the monitor exit codes, all from the one snapshot."""
