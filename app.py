import gc

from portal import create_app

app = create_app()

# Everything loaded so far (Flask, SQLAlchemy, the app) lives as long as the process. Frozen,
# the collector stops re-scanning it in every full collection: a 10,000-item batch decision
# allocates enough to trigger several, and they cost about a third of its time.
gc.freeze()
# A young collection every 50,000 allocations instead of 700: a batch decision allocates a
# few hundred thousand objects that live until its answer is sent, and each collection
# walked them again (about a fifth of a batch's time, measured in-process). Cycles are rare
# in request handling; memory they hold waits a little longer.
gc.set_threshold(50_000, 20, 100)
