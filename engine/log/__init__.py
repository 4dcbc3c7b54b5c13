"""The transaction log: its record format, the files of a resource's chain and their typed
tree values, the primary's write path, start-up recovery and a secondary's replay."""
