"""The asyncio examples (see examples/README.md)."""
