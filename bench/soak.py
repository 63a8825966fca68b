"""Soak: mixed traffic at a fixed rate for several minutes against PostgreSQL, with the app
under gunicorn (2 gthread workers) and the background worker running beside it.

Open loop: every request has a scheduled send time (``rate`` per second, evenly spaced),
and its latency is measured from that time, so a server that falls behind shows it as
queueing delay instead of silently slowing the load down. The mix:

* 70 % decisions (``POST /api/v1/decisions``, random customer, topic and channel);
* 20 % portal pages of signed-in customers (``/preferences`` and ``/loyalty``, alternately);
* 10 % loyalty accruals (``POST .../transactions``, a fresh ``Idempotency-Key`` each).

It prints errors by status, p50/p99 per kind, the achieved rate, and the resident memory of
each gunicorn worker and of the worker process at the start and the end.

    .venv/bin/python bench/soak.py                     # 5 minutes, 60 req/s, 50,000 customers
    .venv/bin/python bench/soak.py --minutes 3 --rate 60

The PostgreSQL database ``carnet_soak`` is created and dropped by this script; no other
database is touched.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import httpx
from sqlalchemy import select, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_decisions import TOPICS, rss_kb, seed, worker_pids  # noqa: E402

from portal import create_app  # noqa: E402
from portal.core.db import make_engine, new_session  # noqa: E402
from portal.loyalty import ledger as loyalty  # noqa: E402
from portal.loyalty.program import load_program  # noqa: E402
from portal.models.customer import Customer  # noqa: E402
from portal.services.consent import Proof  # noqa: E402

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
PG_SOAK = "postgresql+psycopg://postgres@127.0.0.1:5432/carnet_soak"
SECRET = "soak-" + "s" * 40
MIX = (("decision", 0.7), ("page", 0.2), ("accrual", 0.1))


def recreate_database() -> None:
    admin = make_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text("DROP DATABASE IF EXISTS carnet_soak WITH (FORCE)"))
        conn.execute(text("CREATE DATABASE carnet_soak"))
    admin.dispose()


def drop_database() -> None:
    admin = make_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text("DROP DATABASE IF EXISTS carnet_soak WITH (FORCE)"))
    admin.dispose()


def prepare_people(members: int, signed_in: int, workdir: Path
                   ) -> tuple[list[str], list[tuple[str, str]]]:
    """Enroll ``members`` customers in the loyalty programme and make manage links for
    ``signed_in`` of them; returns member numbers and (customer id, manage path)."""
    app = create_app({"INSTANCE_PATH": str(workdir / "instance"), "DATABASE_URL": PG_SOAK,
                      "SECRET_KEY": SECRET, "BASE_URL": "http://127.0.0.1"})
    program = load_program(app.config["CATALOG_PATH"])
    assert program is not None, "the catalog has no [loyalty] programme"
    numbers: list[str] = []
    links: list[tuple[str, str]] = []
    session = new_session(app)
    with session.begin():
        customers = list(session.scalars(select(Customer).order_by(Customer.id)
                                         .limit(max(members, signed_in))))
        for c in customers[:members]:
            member = loyalty.enroll(session, program, c, program.terms.version,
                                    Proof("import", "soak"))
            numbers.append(member.member_number)
    session.close()
    from portal.web.links import manage_link

    with app.test_request_context():
        for c in customers[:signed_in]:
            links.append((c.public_id, "/" + manage_link(c).split("/", 3)[3]))
    return numbers, links


def start_processes(port: int, workdir: Path) -> tuple[subprocess.Popen, subprocess.Popen]:
    env = dict(os.environ, CARNET_DATABASE_URL=PG_SOAK, CARNET_SECRET_KEY=SECRET,
               CARNET_API_RATE_LIMIT="100000000/60", CARNET_ENV="development",
               CARNET_BASE_URL=f"http://127.0.0.1:{port}")
    bindir = Path(sys.executable).parent
    server = subprocess.Popen(
        [str(bindir / "gunicorn"), "-w", "2", "-k", "gthread", "--threads", "8", "-b",
         f"127.0.0.1:{port}", "--log-level", "warning", "app:app"], cwd=ROOT, env=env,
        start_new_session=True)
    log = (workdir / "worker.log").open("wb")
    background = subprocess.Popen([str(bindir / "flask"), "--app", "app", "worker"], cwd=ROOT,
                                  env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                return server, background
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit("gunicorn did not start")


def sign_in(base: str, links: list[tuple[str, str]]) -> list[str]:
    cookies = []
    with httpx.Client(base_url=base, timeout=30) as client:
        for _, path in links:
            r = client.get(path)
            assert r.status_code == 302, r.status_code
            cookies.append(r.cookies["carnet_session"])
    return cookies


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else 0.0


def drive(base: str, key: str, n: int, numbers: list[str], cookies: list[str],
          rate: float, seconds: float, threads: int) -> tuple[dict, dict, float, int]:
    """Send ``rate`` requests/s for ``seconds``; latency counts from the scheduled time."""
    total = int(rate * seconds)
    rng = random.Random(11)
    kinds = rng.choices([k for k, _ in MIX], [w for _, w in MIX], k=total)
    order = itertools.count()
    lock = threading.Lock()
    latencies: dict[str, list[float]] = defaultdict(list)
    statuses: dict[str, Counter[int | str]] = defaultdict(Counter)
    start = time.perf_counter() + 0.5
    orders = itertools.count(1)

    def request(client: httpx.Client, kind: str, r: random.Random) -> int:
        if kind == "decision":
            topic, channel = r.choice(TOPICS)
            return client.post("/api/v1/decisions", headers={"Authorization": f"Bearer {key}"},
                               json={"customer": {"email": f"c{r.randint(1, n)}@bench.example"},
                                     "topic": topic, "channel": channel}).status_code
        if kind == "page":
            path = "/preferences" if r.random() < 0.5 else "/loyalty"
            status = client.get(path, headers={"Cookie": f"carnet_session={r.choice(cookies)}"}
                                ).status_code
            client.cookies.clear()  # senders' API calls carry no portal cookie
            return status
        with lock:
            ref = next(orders)
        return client.post(
            f"/api/v1/loyalty/members/{r.choice(numbers)}/transactions",
            headers={"Authorization": f"Bearer {key}", "Idempotency-Key": uuid.uuid4().hex},
            json={"type": "earn", "points": r.randint(1, 200), "reason": f"Order {ref}",
                  "source_ref": f"soak-{ref}"}).status_code

    def run(seed_: int) -> None:
        r = random.Random(seed_)
        with httpx.Client(base_url=base, timeout=30) as client:
            while True:
                i = next(order)
                if i >= total:
                    return
                due = start + i / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                try:
                    status: int | str = request(client, kinds[i], r)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                done = time.perf_counter() - due
                with lock:
                    latencies[kinds[i]].append(done)
                    statuses[kinds[i]][status] += 1

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - start
    return latencies, statuses, elapsed, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=60.0, help="requests per second, total")
    parser.add_argument("--customers", type=int, default=50_000)
    parser.add_argument("--members", type=int, default=2_000)
    parser.add_argument("--signed-in", type=int, default=200)
    parser.add_argument("--threads", type=int, default=64, help="client threads (enough "
                        "that sends leave on schedule)")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--keep", action="store_true", help="keep carnet_soak afterwards")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="carnet-soak-"))
    recreate_database()
    server = background = None
    try:
        key = seed(PG_SOAK, args.customers, True)
        numbers, links = prepare_people(args.members, args.signed_in, workdir)
        server, background = start_processes(args.port, workdir)
        base = f"http://127.0.0.1:{args.port}"
        cookies = sign_in(base, links)
        drive(base, key, args.customers, numbers, cookies, args.rate, 5, 16)  # warm up
        pids = {f"gunicorn worker {pid}": pid for pid in worker_pids(server)}
        pids["background worker"] = background.pid
        before = {name: rss_kb(pid) for name, pid in pids.items()}
        latencies, statuses, elapsed, total = drive(base, key, args.customers, numbers,
                                                    cookies, args.rate, args.minutes * 60,
                                                    args.threads)
        after = {name: rss_kb(pid) for name, pid in pids.items()}
        alive = background.poll() is None

        print()
        print(f"Carnet soak — PostgreSQL, {args.customers:,} customers, {args.members:,} "
              f"members, {args.minutes:g} min at {args.rate:g} req/s scheduled (open loop)")
        print(f"  sent {total:,} requests in {elapsed:.1f} s: {total / elapsed:.1f} req/s "
              f"achieved")
        errors = Counter()
        for kind, _ in MIX:
            got = statuses[kind]
            ok = sum(v for s, v in got.items() if isinstance(s, int) and s < 400)
            bad = {s: v for s, v in got.items() if not (isinstance(s, int) and s < 400)}
            errors.update(bad)
            print(f"  {kind:<9} {sum(got.values()):>6} requests  ok {ok:>6}  "
                  f"p50 {pct(latencies[kind], 0.5):6.1f} ms  p99 {pct(latencies[kind], 0.99):7.1f}"
                  f" ms  errors {dict(bad) or 0}")
        print(f"  errors by status: {dict(errors) or 'none'}")
        for name in pids:
            print(f"  RSS {name:<22} {before[name] / 1024:6.1f} MiB -> "
                  f"{after[name] / 1024:6.1f} MiB")
        print(f"  background worker still running: {alive}")
    finally:
        for proc in (server, background):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        if not args.keep:
            drop_database()


if __name__ == "__main__":
    main()
