"""The long-running process: its life, dispatch, the watcher, workers and agents, control."""
