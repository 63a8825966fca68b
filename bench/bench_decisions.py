"""Decision API benchmark: seeds customers, serves the app with gunicorn (2 gthread workers)
and prints, side by side:

* single decisions/s vs a bare endpoint answering constant JSON through the same server,
  workers and middleware (``CARNET_BENCH_BARE=1`` adds ``/api/v1/_bare``: the difference is
  the cost of authentication, validation, lookups and the precedence rules);
* p50/p99 latency of single decisions at half the measured throughput;
* server time of one 10,000-item batch (the API's ``Server-Timing`` header: time spent in the
  application, with its phases), next to the time the client waited;
* audience export rows/s as NDJSON, with the serving worker's peak RSS, and on PostgreSQL the
  same candidate query through ``COPY ... TO STDOUT`` as the floor.

    .venv/bin/python bench/bench_decisions.py                       # SQLite, 100,000 customers
    .venv/bin/python bench/bench_decisions.py --postgresql          # carnet_bench, 1,000,000
    .venv/bin/python bench/bench_decisions.py --postgresql --customers 200000
    .venv/bin/python bench/bench_decisions.py --smoke     # a few seconds: it still runs

The PostgreSQL database ``carnet_bench`` is created and dropped by this script. ``--smoke``
(run by tests/test_bench_smoke.py) shrinks everything to a few seconds on SQLite, on a free
port: its figures only show that every step still works.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpx
from sqlalchemy import insert, text
from sqlalchemy.orm import Session

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import portal.models  # noqa: E402,F401
from portal.core.db import Base, make_engine  # noqa: E402
from portal.models.consent import ConsentEvent, ConsentState, ContactRule, Suppression  # noqa: E402
from portal.models.customer import Customer  # noqa: E402
from portal.services import api_keys  # noqa: E402
from portal.services.catalog import get_catalog, load_catalog_file, sync_catalog  # noqa: E402

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
PG_BENCH = "postgresql+psycopg://postgres@127.0.0.1:5432/carnet_bench"
TOPICS = [("newsletter", "email"), ("offers", "email"), ("offers", "sms"), ("events", "email")]


def setup_database(args: argparse.Namespace, workdir: Path) -> str:
    if not args.postgresql:
        return f"sqlite:///{workdir / 'bench.db'}"
    admin = make_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text("DROP DATABASE IF EXISTS carnet_bench WITH (FORCE)"))
        conn.execute(text("CREATE DATABASE carnet_bench"))
    admin.dispose()
    return PG_BENCH


def drop_database(args: argparse.Namespace) -> None:
    if args.postgresql and not args.keep:
        admin = make_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text("DROP DATABASE IF EXISTS carnet_bench WITH (FORCE)"))
        admin.dispose()


def rows_for(first: int, n: int, event_id: int, rng: random.Random
             ) -> tuple[list[list[dict]], int]:
    """Realistic preferences: ~40 % opted in to the newsletter by email, ~20 % to offers by
    email, ~10 % by SMS (some of them withdrawn since), 2 % suppressed, 5 % with contact
    rules, 60 % with a phone number."""
    now = datetime.now(UTC)
    customers, events, states, suppressions, rules = [], [], [], [], []
    for i in range(first, first + n):
        customers.append({"id": i, "public_id": f"cus_b{i:09d}", "email": f"c{i}@bench.example",
                          "phone": f"+3361{i:08d}" if rng.random() < 0.6 else None,
                          "locale": "fr" if i % 3 else "en", "auth_epoch": 0,
                          "created_at": now, "updated_at": now})
        for (topic, channel), share in zip(TOPICS, (0.4, 0.2, 0.1, 0.15), strict=True):
            if rng.random() < share:
                event_id += 1
                state = "withdrawn" if rng.random() < 0.1 else "granted"
                events.append({"id": event_id, "customer_id": i, "topic_key": topic,
                               "channel": channel, "state": state, "source": "import",
                               "actor": "bench", "wording_version": 1, "occurred_at": now})
                states.append({"customer_id": i, "topic_key": topic, "channel": channel,
                               "state": state, "event_id": event_id, "updated_at": now})
        if rng.random() < 0.02:
            suppressions.append({"customer_id": i, "channel": "email", "reason": "hard_bounce",
                                 "source": "bench", "created_at": now})
        if rng.random() < 0.05:
            rules.append({"customer_id": i, "channel": "email", "max_per_week": 3})
    return [customers, events, states, suppressions, rules], event_id


def copy_rows(engine, table: str, rows: list[dict]) -> None:
    """PostgreSQL COPY FROM STDIN: minutes for millions of rows instead of hours."""
    if not rows:
        return
    columns = list(rows[0])
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row([row[c] for c in columns])
        raw.commit()
    finally:
        raw.close()


def seed(url: str, n: int, postgresql: bool) -> str:
    # imported here: the comparing scripts run this file inside checkouts of older commits
    from portal.models import decision_facts

    engine = make_engine(url)
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        sync_catalog(session, load_catalog_file(ROOT / "portal" / "catalog.toml"))
    started = time.perf_counter()
    rng = random.Random(7)
    tables = (Customer.__table__, ConsentEvent.__table__, ConsentState.__table__,
              Suppression.__table__, ContactRule.__table__)
    step = 200_000
    event_id = 0
    if postgresql:
        # The copies of each customer's facts (portal.models.decision_facts) are computed
        # once at the end, instead of by a trigger for each of a million rows.
        with engine.begin() as conn:
            for table, trigger in decision_facts.trigger_names("postgresql"):
                conn.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER {trigger}"))
    for start in range(0, n, step):
        batch, event_id = rows_for(start + 1, min(step, n - start), event_id, rng)
        for table, rows in zip(tables, batch, strict=True):
            if postgresql:
                copy_rows(engine, table.name, rows)
            else:
                with engine.begin() as conn:
                    for i in range(0, len(rows), 20_000):
                        conn.execute(insert(table), rows[i:i + 20_000])
    if postgresql:
        with engine.begin() as conn:
            for table, trigger in decision_facts.trigger_names("postgresql"):
                conn.execute(text(f"ALTER TABLE {table} ENABLE TRIGGER {trigger}"))
            conn.execute(text(decision_facts.rebuild_statement("postgresql")))
            for table in ("customers", "consent_events", "suppressions"):
                conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                  f"(SELECT COALESCE(MAX(id), 1) FROM {table}))"))
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
    with Session(engine) as session, session.begin():
        key = api_keys.create_key(session, "bench", list(api_keys.SCOPES)).secret
    print(f"seeded {n:,} customers in {time.perf_counter() - started:.1f} s")
    engine.dispose()
    return key


def new_key(url: str) -> str:
    engine = make_engine(url)
    with Session(engine) as session, session.begin():
        name = f"bench-{int(time.time() * 1000)}"
        key = api_keys.create_key(session, name, list(api_keys.SCOPES)).secret
    engine.dispose()
    return key


def start_server(url: str, port: int, workers: int = 2, threads: int = 8, root: Path = ROOT
                 ) -> subprocess.Popen:
    """gunicorn serving the app found in ``root`` (another checkout: bench/compare_versions.py)
    on ``port``, with the bare endpoint, once it answers."""
    env = dict(os.environ, CARNET_DATABASE_URL=url, CARNET_SECRET_KEY="bench-" + "x" * 40,
               CARNET_BENCH_BARE="1", CARNET_API_RATE_LIMIT="100000000/60",
               CARNET_ENV="development")
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    proc = subprocess.Popen(
        [gunicorn, "-w", str(workers), "-k", "gthread", "--threads", str(threads),
         "-b", f"127.0.0.1:{port}",
         "--log-level", "warning", "app:app"], cwd=root, env=env, start_new_session=True)
    for _ in range(300):
        if proc.poll() is not None:
            raise SystemExit(f"gunicorn exited with status {proc.returncode} in {root}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/v1/_bare").status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"gunicorn did not start in {root}")


@contextmanager
def checkout(rev: str) -> Iterator[Path]:
    """Another commit of this repository in a temporary git worktree (to measure it beside
    the working tree), removed afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix="carnet-checkout-"))
    root = workdir / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(root),
                    rev], check=True)
    try:
        yield root
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(root)],
                       check=False)
        shutil.rmtree(workdir, ignore_errors=True)


def free_port() -> int:
    """A port nothing listens on now (smoke runs: several checkouts may bench at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def worker_pids(proc: subprocess.Popen) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def load(base: str, key: str, path: str, body_for, seconds: float, threads: int,
         rate: float | None = None) -> tuple[float, list[float], int]:
    """Closed loop (``rate`` None: as fast as possible) or paced at ``rate`` requests/s."""
    latencies: list[float] = []
    errors = [0]
    stop_at = time.perf_counter() + seconds
    lock = threading.Lock()
    interval = threads / rate if rate else 0.0

    def run(seed_: int) -> None:
        rng = random.Random(seed_)
        mine: list[float] = []
        headers = {"Authorization": f"Bearer {key}"}
        next_at = time.perf_counter() + rng.uniform(0, interval)
        with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
            while True:
                if interval:
                    delay = next_at - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    next_at += interval
                if time.perf_counter() >= stop_at:
                    break
                started = time.perf_counter()
                r = client.post(path, json=body_for(rng))
                mine.append(time.perf_counter() - started)
                if r.status_code != 200:
                    errors[0] += 1
        with lock:
            latencies.extend(mine)

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    started = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return len(latencies) / (time.perf_counter() - started), latencies, errors[0]


def parse_server_timing(header: str) -> dict[str, float]:
    """``auth;dur=1.2, parse;dur=30.5, app;dur=140.1`` -> {"auth": 1.2, ...} (milliseconds)."""
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        out[name] = float(dur)
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgresql", action="store_true", help="use carnet_bench on the "
                        "local PostgreSQL instead of a SQLite file")
    parser.add_argument("--customers", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=8.0, help="per throughput run")
    parser.add_argument("--threads", type=int, default=16, help="client threads")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn worker processes")
    parser.add_argument("--worker-threads", type=int, default=8, help="threads per worker")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--reuse", action="store_true", help="PostgreSQL: reuse carnet_bench "
                        "as a --keep run left it (same --customers) instead of seeding again")
    parser.add_argument("--batch", type=int, default=10_000, help="items per batch")
    parser.add_argument("--batches", type=int, default=5, help="batches timed")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on SQLite, a few "
                        "seconds: checks that the benchmark runs, its figures mean nothing")
    args = parser.parse_args()
    if args.smoke:
        args.postgresql = args.reuse = args.keep = False
        args.customers, args.seconds, args.threads = 300, 0.4, 2
        args.workers, args.worker_threads, args.port = 1, 4, free_port()
        args.batch, args.batches = 200, 2
    n = args.customers or (1_000_000 if args.postgresql else 100_000)
    workdir = Path(tempfile.mkdtemp(prefix="carnet-bench-"))
    if args.reuse and args.postgresql:
        args.keep = True
        url = PG_BENCH
    else:
        url = setup_database(args, workdir)
    server = None
    try:
        key = new_key(url) if args.reuse and args.postgresql else seed(url, n, args.postgresql)
        server = start_server(url, args.port, args.workers, args.worker_threads)
        base = f"http://127.0.0.1:{args.port}"

        def decision_body(rng: random.Random) -> dict:
            topic, channel = rng.choice(TOPICS)
            return {"customer": {"email": f"c{rng.randint(1, n)}@bench.example"},
                    "topic": topic, "channel": channel}

        load(base, key, "/api/v1/decisions", decision_body, min(2, args.seconds), 4)  # warm up
        # Bare and decisions take turns, three runs each: the machine's noise falls on both
        # alike, and the medians are compared.
        bare_runs: list[float] = []
        decision_runs: list[float] = []
        errors = 0
        for _ in range(3):
            bare_runs.append(load(base, key, "/api/v1/_bare", lambda rng: {}, args.seconds,
                                  args.threads)[0])
            rate, _, failed = load(base, key, "/api/v1/decisions", decision_body, args.seconds,
                                   args.threads)
            decision_runs.append(rate)
            errors += failed
        bare_rps, rps = statistics.median(bare_runs), statistics.median(decision_runs)
        half_rps, lat, _ = load(base, key, "/api/v1/decisions", decision_body, args.seconds,
                                max(4, args.threads // 2), rate=rps / 2)

        items = [decision_body(random.Random(i)) for i in range(args.batch)]
        batch_times: list[float] = []
        server_timings: list[dict[str, float]] = []
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"},
                          timeout=300) as client:
            for _ in range(args.batches):
                started = time.perf_counter()
                r = client.post("/api/v1/decisions/batch", json={"items": items})
                batch_times.append(time.perf_counter() - started)
                assert r.status_code == 200 and len(r.json()["results"]) == args.batch
                server_timings.append(parse_server_timing(r.headers["Server-Timing"]))

            pids = worker_pids(server)
            before = {pid: rss_kb(pid) for pid in pids}
            peak = dict(before)
            exports: list[tuple[int, float]] = []
            copies: list[tuple[int, float]] = []
            # Export and COPY take turns, three times each: the machine's noise then falls
            # on both sides alike, and the medians are compared.
            for _ in range(3):
                exports.append(export_once(client, pids, peak))
                if args.postgresql:
                    copies.append(copy_export(url))
            busiest = max(pids, key=lambda p: peak[p] - before[p])
            rows, export_s = sorted(exports, key=lambda e: e[1])[1]

        copy_rate = sorted(copies, key=lambda c: c[1])[1] if copies else None

        print()
        print(f"Carnet decision API — {'PostgreSQL' if args.postgresql else 'SQLite'}, "
              f"{n:,} customers, gunicorn {args.workers} workers × {args.worker_threads} threads "
              f"(gthread), "
              f"{args.threads} client threads, {os.cpu_count()} CPUs shared with the client")
        best = min(server_timings, key=lambda t: t["app"])
        median_server = statistics.median(t["app"] for t in server_timings)
        print(f"  bare endpoint (constant JSON)   {bare_rps:8.0f} req/s   (median of 3 runs of "
              f"{args.seconds:g} s: " + ", ".join(f"{r:.0f}" for r in bare_runs) + ")")
        print(f"  single decision                 {rps:8.0f} req/s   (median of 3, taking turns "
              f"with bare: " + ", ".join(f"{r:.0f}" for r in decision_runs)
              + f"; {errors} non-200)   = {rps / bare_rps:.2f} of bare")
        print(f"  at half load ({half_rps:5.0f} req/s)    p50 {pct(lat, .5):6.1f} ms   "
              f"p99 {pct(lat, .99):6.1f} ms")
        batch_label = f"batch of {args.batch:,} decisions"
        print(f"  {batch_label:<32}server {median_server:6.0f} ms (median of {args.batches}; "
              f"best {best['app']:.0f} ms = "
              + ", ".join(f"{k} {v:.0f}" for k, v in best.items() if k != "app")
              + f"); client waited {statistics.median(batch_times):.2f} s")
        print(f"  audience NDJSON newsletter/email {rows:,} rows in {export_s:.2f} s (median of "
              f"3) = {rows / export_s:,.0f} rows/s; serving worker RSS {before[busiest] / 1024:.0f}"
              f" → peak {peak[busiest] / 1024:.0f} MiB")
        if copy_rate is not None:
            print(f"  COPY (same candidate query) TO STDOUT            {copy_rate[0]:,} rows in "
                  f"{copy_rate[1]:.2f} s (median of 3, taking turns with the export) = "
                  f"{copy_rate[0] / copy_rate[1]:,.0f} rows/s; export = "
                  f"{rows / export_s / (copy_rate[0] / copy_rate[1]):.2f} of COPY")
        print(json.dumps({"db": "postgresql" if args.postgresql else "sqlite", "customers": n,
                          "smoke": args.smoke, "batch": args.batch,
                          "bare_rps": round(bare_rps), "decision_rps": round(rps),
                          "p50_ms": round(pct(lat, .5), 1), "p99_ms": round(pct(lat, .99), 1),
                          "decision_vs_bare": round(rps / bare_rps, 2),
                          "batch_server_ms": round(median_server),
                          "batch_client_s": round(statistics.median(batch_times), 3),
                          "export_rows_per_s": round(rows / export_s),
                          "copy_rows_per_s": round(copy_rate[0] / copy_rate[1]) if copy_rate
                          else None}))
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        drop_database(args)
        shutil.rmtree(workdir, ignore_errors=True)


def export_once(client: httpx.Client, pids: list[int], peak: dict[int, int]
                ) -> tuple[int, float]:
    """One NDJSON export of newsletter/email: (lines, seconds); ``peak`` keeps the highest RSS
    each worker reached meanwhile."""
    sampling = [True]

    def sample() -> None:
        while sampling[0]:
            for pid in pids:
                peak[pid] = max(peak[pid], rss_kb(pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    rows = 0
    try:
        with client.stream("GET", "/api/v1/audiences/newsletter/email",
                           headers={"Accept": "application/x-ndjson"}) as stream:
            # Counted by chunk, as the COPY side counts: splitting lines in Python on this
            # end cost as much CPU as producing them on the other.
            for data in stream.iter_raw():
                rows += data.count(b"\n")
        return rows, time.perf_counter() - started
    finally:
        sampling[0] = False
        sampler.join()


def copy_export(url: str) -> tuple[int, float]:
    """The candidate query of the audience export, straight out of PostgreSQL."""
    from sqlalchemy.dialects import postgresql

    from portal.services.audiences import candidates

    engine = make_engine(url)
    with Session(engine) as session:
        topic = get_catalog(session).get("newsletter")
    assert topic is not None
    query = candidates(topic, "email", 0, 10**12).with_only_columns(
        Customer.public_id, Customer.email, Customer.locale)
    sql = str(query.compile(dialect=postgresql.dialect(),
                            compile_kwargs={"literal_binds": True}))
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        started = time.perf_counter()
        out = io.BytesIO()
        with cur.copy(f"COPY ({sql}) TO STDOUT") as copy:
            for data in copy:
                out.write(data)
        elapsed = time.perf_counter() - started
    finally:
        raw.close()
        engine.dispose()
    return out.getvalue().count(b"\n"), elapsed


if __name__ == "__main__":
    main()
