"""Where a single decision's CPU goes, measured in one process, without HTTP or client threads.

The throughput benchmark (``bench_decisions.py``) runs gunicorn, the load generator and
PostgreSQL on the same cores, and its rates move by ±20 % from one minute to the next. This
script measures CPU time (``time.process_time``) of one process doing one thing at a time,
which moves by a few per cent, and prints side by side:

* per request through the Flask app (test client: routing, hooks, the whole view), the bare
  endpoint and a single decision, taking turns;
* the decision's one statement alone: through psycopg directly, and the way the view runs
  it (a pooled connection in autocommit, ``fast_rows``: bind and result processing, events);
* with ``--base REV``, the first two for that commit too (checked out in a temporary git
  worktree, run in a separate process), in alternating turns with the working tree.

    .venv/bin/python bench/bench_decisions.py --postgresql --keep    # seeds carnet_bench once
    .venv/bin/python bench/decision_cpu.py
    .venv/bin/python bench/decision_cpu.py --base 31a946d
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import orjson
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_decisions as bench  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="per turn")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--base", help="also measure this commit, in alternating turns")
    parser.add_argument("--flask-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.base:
        compare(args)
        return
    os.environ.update(CARNET_DATABASE_URL=bench.PG_BENCH, CARNET_SECRET_KEY="bench-" + "x" * 40,
                      CARNET_API_RATE_LIMIT="100000000/60", CARNET_ENV="development",
                      CARNET_BENCH_BARE="1")
    from app import app
    from portal.core.db import get_engine
    from portal.services import api_keys

    key = bench.new_key(bench.PG_BENCH)
    rng = random.Random(3)
    bodies = []
    for _ in range(args.requests):
        topic, channel = rng.choice(bench.TOPICS)
        bodies.append(orjson.dumps({
            "customer": {"email": f"c{rng.randint(1, args.customers)}@bench.example"},
            "topic": topic, "channel": channel}))
    client = app.test_client()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    def requests(path: str) -> float:
        started = time.process_time()
        for body in bodies:
            response = client.post(path, data=body, headers=headers)
            assert response.status_code == 200, response.data
        return (time.process_time() - started) / len(bodies) * 1e6

    requests("/api/v1/decisions")  # warm up: prepared statements, caches
    requests("/api/v1/_bare")
    if args.flask_only:  # one turn, for compare(): any version of the app can do this part
        print(json.dumps({"bare": requests("/api/v1/_bare"),
                          "decision": requests("/api/v1/decisions")}))
        return

    from sqlalchemy.dialects import postgresql

    from portal.core.db import reads
    from portal.core.fast_rows import _native, fetch_rows
    from portal.services.decisions import _person_with_facts

    statement = _person_with_facts("postgresql", "email", api_keys.KEY_GUARD)
    sql, order = _native(str(statement.compile(dialect=postgresql.dialect())))
    emails = [orjson.loads(body)["customer"]["email"] for body in bodies]
    key_hash = api_keys.guard_params(key)["key_hash"]

    def direct() -> float:
        dsn = bench.PG_BENCH.replace("postgresql+psycopg", "postgresql")
        with psycopg.connect(dsn, autocommit=True) as conn:
            started = time.process_time()
            for email in emails:
                values = {"value": email, "key_hash": key_hash}
                cursor = psycopg.RawCursor(conn)
                cursor.execute(sql, [values[name] for name in order], prepare=True)
                cursor.fetchall()
            return (time.process_time() - started) / len(emails) * 1e6

    def as_the_view_does() -> float:
        with app.app_context():
            started = time.process_time()
            for email in emails:
                with reads() as reader:
                    fetch_rows(reader, statement, {"value": email, "key_hash": key_hash})
            return (time.process_time() - started) / len(emails) * 1e6

    runs: dict[str, list[float]] = {"bare": [], "decision": [], "direct": [], "view": []}
    as_the_view_does()  # warm up
    for _ in range(args.turns):
        runs["bare"].append(requests("/api/v1/_bare"))
        runs["decision"].append(requests("/api/v1/decisions"))
        runs["direct"].append(direct())
        runs["view"].append(as_the_view_does())
    get_engine(app).dispose()  # type: ignore[union-attr]

    def show(name: str) -> str:
        return (f"{statistics.median(runs[name]):5.0f} µs  (" +
                ", ".join(f"{v:.0f}" for v in runs[name]) + ")")

    print()
    print(f"CPU per request in one process, PostgreSQL carnet_bench, {args.requests:,} requests "
          f"per turn, {args.turns} turns (median, then each turn)")
    print(f"  bare endpoint through Flask          {show('bare')}")
    print(f"  single decision through Flask        {show('decision')}")
    print(f"  the decision's statement, psycopg    {show('direct')}")
    print(f"  the same, as the view runs it        {show('view')}")


def compare(args: argparse.Namespace) -> None:
    """Per-request CPU through Flask of the working tree and of ``args.base``, each turn a
    fresh process of each, in alternating order."""
    with bench.checkout(args.base) as base_root:
        shutil.copy(Path(__file__), base_root / "bench" / "decision_cpu.py")
        shutil.copy(ROOT / "bench" / "bench_decisions.py", base_root / "bench")
        roots = {args.base: base_root, "working tree": ROOT}
        runs: dict[str, dict[str, list[float]]] = {name: {"bare": [], "decision": []}
                                                    for name in roots}
        for turn in range(args.turns):
            order = list(roots) if turn % 2 == 0 else list(reversed(list(roots)))
            for name in order:
                out = subprocess.run(
                    [sys.executable, "bench/decision_cpu.py", "--flask-only", "--requests",
                     str(args.requests), "--customers", str(args.customers)],
                    cwd=roots[name], check=True, capture_output=True, text=True).stdout
                measured = json.loads(out.strip().splitlines()[-1])
                for kind in ("bare", "decision"):
                    runs[name][kind].append(measured[kind])
        print()
        print(f"CPU per request through Flask, in one process, {args.requests:,} requests per "
              f"turn, {args.turns} turns each, alternating (median, then each turn)")
        for name in roots:
            bare, decided = runs[name]["bare"], runs[name]["decision"]
            print(f"  {name:>12}: bare {statistics.median(bare):5.0f} µs ("
                  + ", ".join(f"{v:.0f}" for v in bare) + f"), decision "
                  f"{statistics.median(decided):5.0f} µs ("
                  + ", ".join(f"{v:.0f}" for v in decided) + ")")


if __name__ == "__main__":
    main()
