"""The NBD export: the sans-I/O protocol core and the asyncio server that moves its bytes."""
