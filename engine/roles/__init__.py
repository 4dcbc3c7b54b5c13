"""A resource attached on this node, in its role: the primary's runtime (log, export,
checkpoints) and the secondary's (sync, fetch, replay), behind one runtime interface."""
