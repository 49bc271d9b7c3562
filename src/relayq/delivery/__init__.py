"""Taking mail out of the queue: the runner, its decisions, the transports, background delivery."""
