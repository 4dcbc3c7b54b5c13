"""marsd: the reconcile loop, the event bus and the control socket's server."""
