"""The SMTP listener on loopback, `-bs`, and its prefork."""
