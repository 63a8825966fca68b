"""Single decisions and batches of two versions of Carnet, measured at the same time.

On a shared machine the rate of one endpoint moves by ±20 % from one minute to the next, so
two versions measured one after the other cannot be told apart by less than that. This script
serves both at once, the working tree and another commit (checked out in a temporary git
worktree), each under gunicorn (2 gthread workers × 8 threads) on its own port, against the
same PostgreSQL database, and takes short turns between them: bare endpoint, then single
decisions, on one version, then on the other, the order swapped every round. Then the same
paced load (300 requests/s) on each, for latency; then 10,000-item batches, one on each
version in turn. It prints, for each version, the median rates, the ratio of decisions to
bare, p50/p99 at that load, and the batches' server time.

    .venv/bin/python bench/bench_decisions.py --postgresql --keep    # seeds carnet_bench once
    .venv/bin/python bench/compare_versions.py --base 31a946d --rounds 8 --seconds 5

Both versions run with this checkout's virtualenv; the database is not seeded or changed
(one API key is added).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import bench_decisions as bench  # noqa: E402
import httpx  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the commit to compare with")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0, help="per run")
    parser.add_argument("--customers", type=int, default=1_000_000,
                        help="how many carnet_bench holds")
    parser.add_argument("--rate", type=float, default=300.0, help="paced load for latency")
    parser.add_argument("--batches", type=int, default=10,
                        help="10,000-item batches per version, taking turns")
    args = parser.parse_args()
    with bench.checkout(args.base) as base_root:
        compare(args, base_root)


def compare(args: argparse.Namespace, base_root: Path) -> None:
    servers: dict[str, subprocess.Popen] = {}
    try:
        key = bench.new_key(bench.PG_BENCH)
        roots = {args.base: base_root, "working tree": ROOT}
        ports = dict(zip(roots, (8781, 8782), strict=True))
        for name, root in roots.items():
            servers[name] = bench.start_server(bench.PG_BENCH, ports[name], root=root)
        n = args.customers

        def decision_body(rng: random.Random) -> dict:
            topic, channel = rng.choice(bench.TOPICS)
            return {"customer": {"email": f"c{rng.randint(1, n)}@bench.example"},
                    "topic": topic, "channel": channel}

        rates: dict[tuple[str, str], list[float]] = {(name, kind): [] for name in roots
                                                     for kind in ("bare", "decision")}
        latencies: dict[str, list[float]] = {name: [] for name in roots}
        for name in roots:  # warm up
            bench.load(f"http://127.0.0.1:{ports[name]}", key, "/api/v1/decisions",
                       decision_body, 2, 4)
        for turn in range(args.rounds):
            order = list(roots) if turn % 2 == 0 else list(reversed(list(roots)))
            for name in order:
                url = f"http://127.0.0.1:{ports[name]}"
                rates[(name, "bare")].append(bench.load(
                    url, key, "/api/v1/_bare", lambda rng: {}, args.seconds, 16)[0])
                rates[(name, "decision")].append(bench.load(
                    url, key, "/api/v1/decisions", decision_body, args.seconds, 16)[0])
            for name in order:
                url = f"http://127.0.0.1:{ports[name]}"
                latencies[name] += bench.load(url, key, "/api/v1/decisions", decision_body,
                                              args.seconds, 8, rate=args.rate)[1]
        items = [decision_body(random.Random(i)) for i in range(10_000)]
        batch: dict[str, list[float]] = {name: [] for name in roots}
        clients = {name: httpx.Client(base_url=f"http://127.0.0.1:{ports[name]}", timeout=300,
                                      headers={"Authorization": f"Bearer {key}"})
                   for name in roots}
        try:
            for name in roots:  # warm up
                clients[name].post("/api/v1/decisions/batch", json={"items": items})
            for turn in range(args.batches):
                order = list(roots) if turn % 2 == 0 else list(reversed(list(roots)))
                for name in order:
                    r = clients[name].post("/api/v1/decisions/batch", json={"items": items})
                    assert r.status_code == 200, r.text[:300]
                    batch[name].append(bench.parse_server_timing(r.headers["Server-Timing"])
                                       ["app"])
        finally:
            for client in clients.values():
                client.close()
        print()
        print(f"Batches of 10,000 decisions, {args.batches} each, taking turns: server time "
              "(Server-Timing app)")
        for name in roots:
            print(f"  {name:>12}: median {statistics.median(batch[name]):5.0f} ms, fastest "
                  f"{min(batch[name]):5.0f} ms, slowest {max(batch[name]):5.0f} ms")
        print()
        print(f"Single decisions, two versions served side by side, {args.rounds} rounds of "
              f"{args.seconds:.0f} s, taking turns (PostgreSQL carnet_bench, {n:,} customers)")
        for name in roots:
            bare, decided = rates[(name, "bare")], rates[(name, "decision")]
            per_round = ", ".join(f"{d / b:.2f}" for d, b in zip(decided, bare, strict=True))
            print(f"  {name:>12}: bare {statistics.median(bare):6.0f} req/s, decisions "
                  f"{statistics.median(decided):6.0f} req/s (medians) = "
                  f"{statistics.median(decided) / statistics.median(bare):.2f} of bare "
                  f"(per round: {per_round})")
            print(f"  {'':>12}  at {args.rate:.0f} req/s: p50 {bench.pct(latencies[name], .5):.1f}"
                  f" ms, p99 {bench.pct(latencies[name], .99):.1f} ms "
                  f"({len(latencies[name]):,} requests)")
    finally:
        for proc in servers.values():
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
