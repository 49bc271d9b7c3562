"""relayq: a sendmail-compatible submission agent and null-client MTA."""

__version__ = "0.1.0"
