"""Loyalty expiry at scale: seed a million ledger entries, then time the nightly jobs.

Run from the repository root::

    .venv/bin/python bench/bench_loyalty_expiry.py                       # SQLite file
    .venv/bin/python bench/bench_loyalty_expiry.py --pg postgresql+psycopg://postgres@127.0.0.1:5432/postgres
    .venv/bin/python bench/bench_loyalty_expiry.py --smoke   # 3,000 entries: it still runs

With ``--pg`` the server's ``carnet_bench`` database is created for the run and dropped
afterwards (an existing ``carnet_bench`` is dropped first); no other database is touched.

Each member has earns spread over the last 36 months and a few redeems that consumed the
oldest lots, exactly as the ledger services would have left them (balances, lots and
allocations agree). About a third of the lots are past their 24-month expiry and still open,
as if the job had not run for a while. The job then runs as ``flask loyalty expire`` does:
batches of members, a commit after each. A second run must find nothing, and the tier
recomputation is timed on its own.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sqlalchemy import Engine, func, insert, select, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

import portal.models  # noqa: E402,F401 - every table in Base.metadata
from portal.core.db import Base, make_engine  # noqa: E402
from portal.loyalty.jobs import expire_batches, tier_batches  # noqa: E402
from portal.loyalty.models import LedgerEntry, Lot, LotAllocation, Member  # noqa: E402
from portal.loyalty.program import LoyaltyProgram, program_from_spec  # noqa: E402
from portal.models.customer import Customer  # noqa: E402
from portal.services.catalog import load_catalog_file, sync_catalog  # noqa: E402

BENCH_DB = "carnet_bench"
CATALOG = ROOT / "portal" / "catalog.toml"


def generate(program: LoyaltyProgram, members: int, entries: int, now: datetime,
             seed: int = 7) -> dict[str, list[tuple]]:
    """Rows for every table, consistent with what the services would have written."""
    rng = random.Random(seed)
    per_member = entries // members
    rows: dict[str, list[tuple]] = {"customers": [], "members": [], "ledger": [], "lots": [],
                                    "allocations": []}
    entry_id = allocation_id = 0
    start = now - timedelta(days=3 * 365)
    for member_id in range(1, members + 1):
        redeems = rng.randint(1, 3)
        earns = per_member - redeems
        moments = sorted(start + timedelta(seconds=rng.randrange(3 * 365 * 86400))
                         for _ in range(per_member))
        kinds = ["earn"] * earns + ["redeem"] * redeems
        rng.shuffle(kinds)
        kinds.sort(key=lambda k: k == "redeem" and rng.random() < 0.3)  # no redeem first
        if kinds[0] == "redeem":
            kinds[0], kinds[-1] = kinds[-1], kinds[0]
        lots: list[list] = []          # [entry_id, remaining]
        balance = earned = redeemed = 0
        for moment, kind in zip(moments, kinds, strict=True):
            entry_id += 1
            if kind == "earn":
                points = rng.randint(5, 400)
                expires = program.expires_at(moment)
                rows["ledger"].append((entry_id, member_id, "earn", points, "Order",
                                       f"O-{entry_id}", "Store", "bench", moment, moment,
                                       expires, None))
                lots.append([entry_id, points, moment, expires, points])
                balance += points
                earned += points
                continue
            wanted = min(balance, rng.randint(50, 600))
            if wanted <= 0:
                entry_id -= 1
                continue
            rows["ledger"].append((entry_id, member_id, "redeem", -wanted, "Reward", None,
                                   "Store", "bench", moment, moment, None, None))
            left = wanted
            for lot in lots:
                if left == 0:
                    break
                taken = min(lot[4], left)
                if taken:
                    lot[4] -= taken
                    left -= taken
                    allocation_id += 1
                    rows["allocations"].append((allocation_id, lot[0], entry_id, taken))
            balance -= wanted
            redeemed += wanted
        for lot_id, points, moment, expires, remaining in lots:
            rows["lots"].append((lot_id, member_id, moment, expires, points, remaining))
        rows["customers"].append((member_id, f"cus_bench_{member_id}", 0, start, start))
        rows["members"].append((member_id, member_id, f"{member_id:012d}", start, 1, "bronze",
                                balance, earned, redeemed, start))
    return rows


COLUMNS = {
    "customers": ("id", "public_id", "auth_epoch", "created_at", "updated_at"),
    "members": ("id", "customer_id", "member_number", "enrolled_at", "terms_version", "tier",
                "balance", "lifetime_earned", "lifetime_redeemed", "updated_at"),
    "ledger": ("id", "member_id", "kind", "points", "reason", "source_ref", "store", "actor",
               "occurred_at", "recorded_at", "expires_at", "reverses_id"),
    "lots": ("entry_id", "member_id", "earned_at", "expires_at", "points", "remaining"),
    "allocations": ("id", "lot_id", "entry_id", "points"),
}
TABLES = {"customers": Customer.__table__, "members": Member.__table__,
          "ledger": LedgerEntry.__table__, "lots": Lot.__table__,
          "allocations": LotAllocation.__table__}


def load(engine: Engine, rows: dict[str, list[tuple]]) -> None:
    if engine.dialect.name == "postgresql":
        raw = engine.raw_connection()
        try:
            cursor = raw.cursor()
            for name in COLUMNS:
                table = TABLES[name].name
                with cursor.copy(f"COPY {table} ({', '.join(COLUMNS[name])}) FROM STDIN") as cp:
                    for row in rows[name]:
                        cp.write_row(row)
                if "id" in COLUMNS[name]:
                    cursor.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                   f"(SELECT max(id) FROM {table}))")
            cursor.execute("ANALYZE")
            raw.commit()
        finally:
            raw.close()
        return
    with engine.begin() as conn:
        for name, columns in COLUMNS.items():
            data = rows[name]
            for start in range(0, len(data), 50_000):
                conn.execute(insert(TABLES[name]),
                             [dict(zip(columns, row, strict=True))
                              for row in data[start:start + 50_000]])
        conn.exec_driver_sql("ANALYZE")


def pg_bench_url(server_url: str) -> str:
    url = make_url(server_url)
    admin = make_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)"))
            conn.execute(text(f"CREATE DATABASE {BENCH_DB}"))
    finally:
        admin.dispose()
    return url.set(database=BENCH_DB).render_as_string(hide_password=False)


def drop_pg_bench(server_url: str) -> None:
    admin = make_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)"))
    finally:
        admin.dispose()


def run(url: str, members: int, entries: int, batch_size: int) -> None:
    engine = make_engine(url)
    try:
        Base.metadata.create_all(engine)
        spec = load_catalog_file(CATALOG)
        program = program_from_spec(spec)
        assert program is not None
        with Session(engine) as session, session.begin():
            sync_catalog(session, spec)
        now = datetime.now(UTC).replace(microsecond=0)
        started = time.perf_counter()
        rows = generate(program, members, entries, now)
        generated = time.perf_counter() - started
        started = time.perf_counter()
        load(engine, rows)
        loaded = time.perf_counter() - started
        total = len(rows["ledger"])
        print(f"database      {engine.dialect.name}")
        print(f"seeded        {total:,} ledger entries, {len(rows['lots']):,} lots, "
              f"{len(rows['allocations']):,} allocations, {members:,} members "
              f"(generated in {generated:.1f} s, loaded in {loaded:.1f} s)")
        del rows

        with Session(engine, expire_on_commit=False) as session:
            due = session.scalar(select(func.count()).select_from(Lot).where(
                Lot.remaining > 0, Lot.expires_at <= now))
            started = time.perf_counter()
            expired_members = expired_lots = expired_points = 0
            for batch in expire_batches(session, now, batch_size=batch_size):
                session.commit()
                expired_members += batch.members
                expired_lots += batch.lots
                expired_points += batch.points
            session.commit()
            first = time.perf_counter() - started
            print(f"expiry        {first:.2f} s: {expired_points:,} points from "
                  f"{expired_lots:,} lots (of {due:,} due) for {expired_members:,} members")
            print(f"              {total / first:,.0f} ledger entries/s scanned, "
                  f"{expired_lots / first:,.0f} lots/s expired, batches of {batch_size}")

            started = time.perf_counter()
            second = sum(b.lots for b in expire_batches(session, now, batch_size=batch_size))
            session.commit()
            rerun = time.perf_counter() - started
            print(f"second run    {rerun:.2f} s, {second} lots expired (must be 0)")

            started = time.perf_counter()
            changed = 0
            for tier_batch in tier_batches(session, program, now, batch_size=batch_size):
                session.commit()
                changed += sum(tier_batch.changed.values())
            tiers = time.perf_counter() - started
            print(f"tiers         {tiers:.2f} s for {members:,} members "
                  f"({members / tiers:,.0f} members/s), {changed:,} tiers changed")
            balance_ok = session.scalar(select(func.count()).select_from(Member).where(
                Member.balance != select(func.coalesce(func.sum(LedgerEntry.points), 0))
                .where(LedgerEntry.member_id == Member.id).scalar_subquery()))
            print(f"check         {balance_ok} members whose balance differs from the ledger")
            if second or balance_ok:
                raise SystemExit("the expiry left lots to expire again, or balances wrong")
    finally:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--members", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--pg", metavar="URL", help="PostgreSQL server URL (any database on it "
                        f"to connect to); the run uses a '{BENCH_DB}' database it creates")
    parser.add_argument("--smoke", action="store_true", help="3,000 entries on SQLite: checks "
                        "that the benchmark runs, its figures mean nothing")
    args = parser.parse_args()
    if args.smoke:
        args.entries, args.members, args.batch_size, args.pg = 3000, 100, 40, None
    if args.pg:
        url = pg_bench_url(args.pg)
        try:
            run(url, args.members, args.entries, args.batch_size)
        finally:
            drop_pg_bench(args.pg)
        return
    with tempfile.TemporaryDirectory() as folder:
        run(f"sqlite:///{folder}/bench.db", args.members, args.entries, args.batch_size)


if __name__ == "__main__":
    main()
