"""Loyalty accruals through the API on PostgreSQL, with Idempotency-Key, next to the bare
endpoint served by the same gunicorn server and workers (``CARNET_BENCH_BARE=1`` adds
``/api/v1/_bare``, constant JSON: the difference is the cost of authentication, validation, the
key's claim, the member's row lock, the ledger entry, its lot, the tier window and the change
feed, all in one transaction).

Prints, in one run: the SQL statements and database round trips of one accrual (counted
in-process on the same database, after a few accruals of the same member), bare requests/s
and accruals/s (closed loop, as fast as the clients go) with
their ratio and p50/p99; accrual p50/p99 at half the measured rate; replays/s (the same
requests again with their keys); and checks that the ledger holds exactly one entry per 201.

    .venv/bin/python bench/bench_accruals.py
    .venv/bin/python bench/bench_accruals.py --members 50000 --seconds 20 --threads 16
    .venv/bin/python bench/bench_accruals.py --smoke      # a few seconds: it still runs

The database ``carnet_bench_loyalty`` on the local PostgreSQL is created for the run and dropped
afterwards (an existing one is dropped first); no other database is touched. Server: gunicorn
2 workers × 8 threads (gthread), started as in ``bench_decisions.py``. ``--smoke`` (run by
tests/test_bench_smoke.py) uses a SQLite file instead, 50 members, 1 worker and short phases
on a free port: its figures only show that every step still works.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, insert, select, text
from sqlalchemy.orm import Session

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_decisions import free_port, pct, start_server  # noqa: E402

import portal.models  # noqa: E402,F401
from portal.core.db import Base, make_engine  # noqa: E402
from portal.loyalty.ledger import NO_EXPIRY  # noqa: E402
from portal.loyalty.models import IdempotencyRecord, LedgerEntry, Member  # noqa: E402
from portal.loyalty.program import program_from_spec, record_terms  # noqa: E402
from portal.models.customer import Customer  # noqa: E402
from portal.services import api_keys  # noqa: E402
from portal.services.catalog import load_catalog_file, sync_catalog  # noqa: E402
from tests.support.statements import counting  # noqa: E402

DATABASE = "carnet_bench_loyalty"
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
PG_BENCH = f"postgresql+psycopg://postgres@127.0.0.1:5432/{DATABASE}"


def recreate_database(drop_only: bool = False) -> None:
    admin = make_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"))
        if not drop_only:
            conn.execute(text(f"CREATE DATABASE {DATABASE}"))
    admin.dispose()


def seed(url: str, members: int) -> tuple[str, list[str]]:
    """Customers who are all members (bronze, zero balance, the caches as enrollment sets
    them: nothing to expire, nothing earned in the window), and a key with every scope."""
    engine = make_engine(url)
    Base.metadata.create_all(engine)
    spec = load_catalog_file(ROOT / "portal" / "catalog.toml")
    program = program_from_spec(spec)
    assert program is not None
    now = datetime.now(UTC)
    numbers: set[str] = set()
    while len(numbers) < members:
        numbers.add(program.number.generate())
    ordered = sorted(numbers)
    with Session(engine) as session, session.begin():
        sync_catalog(session, spec)
        record_terms(session, program)
        for start in range(0, members, 10_000):
            chunk = range(start + 1, min(members, start + 10_000) + 1)
            session.execute(insert(Customer), [
                {"id": i, "public_id": f"cus_l{i:09d}", "email": f"m{i}@bench.example",
                 "locale": "fr", "auth_epoch": 0, "created_at": now, "updated_at": now}
                for i in chunk])
            session.execute(insert(Member), [
                {"id": i, "customer_id": i, "member_number": ordered[i - 1], "enrolled_at": now,
                 "terms_version": program.terms.version, "tier": program.base_tier.key,
                 "balance": 0, "lifetime_earned": 0, "lifetime_redeemed": 0,
                 "tier_changed_at": now, "updated_at": now, "next_expiry_at": NO_EXPIRY,
                 "window_earned": 0, "window_from": program.window_start(now)}
                for i in chunk])
        if engine.dialect.name == "postgresql":  # SQLite continues after the largest id
            for table in ("customers", "loyalty_members"):
                session.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                     f"(SELECT MAX(id) FROM {table}))"))
        key = api_keys.create_key(session, "bench", list(api_keys.SCOPES)).secret
    with engine.begin() as conn:
        conn.execute(text("ANALYZE"))
    engine.dispose()
    return key, ordered


Request = tuple[str, dict[str, Any], dict[str, str]]   # path, body, headers


def count_accrual(url: str, key: str, number: str, workdir: Path) -> tuple[int, int]:
    """(SQL statements, round trips) of one accrual through the app, in-process: the fifth
    earn of one member, so the figures are those of a member with a history. Round trips add
    BEGIN/COMMIT (a connection checkout costs none: the pool checks the idle socket with
    ``poll()``, see ``portal/core/db.py``)."""
    from portal import create_app

    app = create_app({"TESTING": True, "DATABASE_URL": url, "INSTANCE_PATH": str(workdir),
                      "SECRET_KEY": "bench-" + "x" * 40, "API_RATE_LIMIT": "100000000/60"})
    bind = app.extensions["carnet.db"]["bind"]
    client = app.test_client()
    try:
        for n in range(5):
            with counting(bind) as tally:
                r = client.post(f"/api/v1/loyalty/members/{number}/transactions",
                                json={"type": "earn", "points": 10, "reason": f"Count {n}",
                                      "source_ref": f"COUNT-{n}"},
                                headers={"Authorization": f"Bearer {key}",
                                         "Idempotency-Key": f"count-{n}"})
            if r.status_code != 201:
                raise SystemExit(f"counting accrual answered {r.status_code}: {r.text}")
        return len(tally.statements), tally.round_trips
    finally:
        bind.dispose()
        logging.getLogger("httpx").setLevel(logging.WARNING)   # the app turned logging on


def run(base: str, key: str, make: Callable[[random.Random, int], Request], seconds: float,
        threads: int, expect: int, rate: float | None = None
        ) -> tuple[float, list[float], int, list[Request]]:
    """Closed loop (``rate`` None) or paced at ``rate`` requests/s in total. Returns the rate
    achieved, the latencies, the number of unexpected statuses and the requests sent."""
    latencies: list[float] = []
    sent: list[Request] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds
    interval = threads / rate if rate else 0.0

    def client_loop(index: int) -> None:
        rng = random.Random(index)
        mine: list[float] = []
        done: list[Request] = []
        next_at = time.perf_counter() + rng.uniform(0, interval)
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"},
                          timeout=30) as client:
            for n in itertools.count():
                if interval:
                    delay = next_at - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    next_at += interval
                if time.perf_counter() >= stop_at:
                    break
                path, body, headers = make(rng, index * 10_000_000 + n)
                started = time.perf_counter()
                r = client.post(path, json=body, headers=headers)
                mine.append(time.perf_counter() - started)
                done.append((path, body, headers))
                if r.status_code != expect:
                    with lock:
                        errors[0] += 1
        with lock:
            latencies.extend(mine)
            sent.extend(done)

    pool = [threading.Thread(target=client_loop, args=(i,)) for i in range(threads)]
    started = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return len(latencies) / (time.perf_counter() - started), latencies, errors[0], sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=10.0, help="per throughput run")
    parser.add_argument("--threads", type=int, default=16, help="client threads")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--smoke", action="store_true", help="SQLite, tiny sizes, a few "
                        "seconds: checks that the benchmark runs, its figures mean nothing")
    args = parser.parse_args()
    workers, worker_threads, warm_up = 2, 8, 2.0
    if args.smoke:
        args.members, args.seconds, args.threads, args.port = 50, 0.4, 2, free_port()
        workers, worker_threads, warm_up = 1, 4, 0.4
    workdir = Path(tempfile.mkdtemp(prefix="carnet-bench-accruals-"))
    url = f"sqlite:///{workdir / 'bench.db'}" if args.smoke else PG_BENCH
    if not args.smoke:
        recreate_database()
    server = None
    try:
        started = time.perf_counter()
        key, numbers = seed(url, args.members)
        print(f"seeded {args.members:,} members in {time.perf_counter() - started:.1f} s")
        statements, round_trips = count_accrual(url, key, numbers[0], workdir / "count")
        print(f"one accrual: {statements} SQL statements, {round_trips} database round trips "
              "(with BEGIN/COMMIT)")
        server = start_server(url, args.port, workers, worker_threads)
        base = f"http://127.0.0.1:{args.port}"
        run_id = [0]

        def accrual(rng: random.Random, n: int) -> Request:
            order = f"R{run_id[0]}-{n}"
            return (f"/api/v1/loyalty/members/{rng.choice(numbers)}/transactions",
                    {"type": "earn", "points": rng.randint(1, 400), "reason": f"Order {order}",
                     "source_ref": order, "store": "Paris 11"},
                    {"Idempotency-Key": f"earn-{order}"})

        def bare(rng: random.Random, n: int) -> Request:
            return "/api/v1/_bare", {}, {}

        def phase(name: str, make: Callable[[random.Random, int], Request], expect: int,
                  seconds: float, rate: float | None = None
                  ) -> tuple[float, list[float], int, list[Request]]:
            run_id[0] += 1
            result = run(base, key, make, seconds, args.threads, expect, rate)
            print(f"  {name:<34} {result[0]:8.0f} req/s  p50 {pct(result[1], .5):6.1f} ms  "
                  f"p99 {pct(result[1], .99):6.1f} ms  ({result[2]} unexpected)", flush=True)
            return result

        print(f"{'SQLite (smoke)' if args.smoke else 'PostgreSQL'}, {args.members:,} members, "
              f"gunicorn {workers} workers × {worker_threads} threads (gthread), "
              f"{args.threads} client threads, {os.cpu_count()} CPUs shared with the client")
        phase("warm-up (accruals)", accrual, 201, warm_up)
        phase("warm-up (bare)", bare, 200, warm_up)
        bare_rps, bare_lat, _, _ = phase("bare endpoint (constant JSON)", bare, 200,
                                         args.seconds)
        rps, lat, errors, sent = phase("accrual with Idempotency-Key", accrual, 201,
                                       args.seconds)
        half = phase(f"accrual at half load ({rps / 2:.0f}/s)", accrual, 201, args.seconds,
                     rate=rps / 2)
        replays = itertools.cycle(random.Random(1).sample(sent, min(len(sent), 200_000)))
        lock = threading.Lock()

        def replay(rng: random.Random, n: int) -> Request:
            with lock:
                return next(replays)

        replay_rps = phase("replay (same key, same body)", replay, 201, args.seconds)[0]

        engine = make_engine(url)
        with Session(engine) as session:
            entries = session.scalar(select(func.count()).select_from(LedgerEntry))
            records = session.scalar(select(func.count()).select_from(IdempotencyRecord))
        engine.dispose()
        print(f"  ratio accruals / bare              {rps / bare_rps:8.3f}")
        print(f"  statements per accrual             {statements:8d}  "
              f"({round_trips} round trips)")
        print(f"  ledger entries {entries:,}, idempotency records {records:,} "
              f"({errors + half[2]} unexpected statuses)")
        print(json.dumps({"db": "sqlite" if args.smoke else "postgresql",
                          "members": args.members, "bare_rps": round(bare_rps),
                          "accrual_rps": round(rps), "ratio": round(rps / bare_rps, 3),
                          "bare_p50_ms": round(pct(bare_lat, .5), 1),
                          "bare_p99_ms": round(pct(bare_lat, .99), 1),
                          "accrual_p50_ms": round(pct(lat, .5), 1),
                          "accrual_p99_ms": round(pct(lat, .99), 1),
                          "half_load_p50_ms": round(pct(half[1], .5), 1),
                          "half_load_p99_ms": round(pct(half[1], .99), 1),
                          "replay_rps": round(replay_rps),
                          "statements_per_accrual": statements,
                          "round_trips_per_accrual": round_trips}))
        if entries != records:
            raise SystemExit("ledger entries and idempotency records disagree")
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        if not args.smoke:
            recreate_database(drop_only=True)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
