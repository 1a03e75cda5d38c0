"""The trio examples (see examples/README.md)."""
