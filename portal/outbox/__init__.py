"""The outbox: the change feed every write appends to (``changes``), its reading with
cursors that never skip a late commit (``feed``), and the worker loop that runs the jobs
the domains register (``worker``)."""
