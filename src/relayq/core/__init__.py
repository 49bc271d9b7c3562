"""The pure core: rules as functions of their inputs (no files, sockets, clock or environment)."""
