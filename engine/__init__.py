"""The replication engine: marsd, marsadm, the state tree, the transaction log, NBD."""
