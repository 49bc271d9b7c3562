"""The host's resources besides the queue: log, host name, control socket, privileges."""
