"""The blocking examples (see examples/README.md)."""
