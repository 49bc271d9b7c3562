"""The queue: the only code touching queue files (spool, maildrop writer, enqueue funnel)."""
