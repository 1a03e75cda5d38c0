"""The anyio examples (see examples/README.md)."""
