import gc

from portal import create_app

app = create_app()

# Everything loaded so far (Flask, SQLAlchemy, the app) lives as long as the process. Frozen,
# the collector stops re-scanning it in every full collection: a 10,000-item batch decision
# allocates enough to trigger several, and they cost about a third of its time.
gc.freeze()
