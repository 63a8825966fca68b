"""Every benchmark still runs: each ``bench/bench_*.py`` (what ``make bench`` runs) in its smoke
mode, as a subprocess, must exit 0 and print its figures.

A benchmark nobody runs for a while breaks silently when the code it drives changes (a
signature, a setting, a table). The smoke modes shrink the data to a few hundred rows and
the timed phases to fractions of a second, use SQLite and a free port, and skip what would
download (the Node.js sides, from npm): the figures they print mean nothing, but every step
that produces them has run. The scripts that need a seeded PostgreSQL database
(``compare_versions.py``, ``decision_cpu.py``, ``soak.py``) are only imported, through
``--help``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"

# For each benchmark, lines its smoke run must print: the side-by-side figures.
FIGURES: dict[str, list[str]] = {
    "bench_accruals.py": [
        r"bare endpoint \(constant JSON\)\s+\d+ req/s",
        r"accrual with Idempotency-Key\s+\d+ req/s",
        r"ratio accruals / bare\s+\d+\.\d+",
        r"ledger entries \d+, idempotency records \d+",
        r'^\{"db": "sqlite".*"ratio"',
    ],
    "bench_apple_pass.py": [
        r"passes\.apple \(Python\)\s+\d+\.\d\s+\d+\.\d\s+\d+\.\d\s+ok",
        r"passkit-generator\s+skipped \(smoke: no npm install\)",
    ],
    "bench_decisions.py": [
        r"bare endpoint \(constant JSON\)\s+\d+ req/s",
        r"single decision\s+\d+ req/s .* = \d+\.\d+ of bare",
        r"batch of 200 decisions\s+server\s+\d+ ms",
        r"audience NDJSON newsletter/email \d+ rows",
        r'^\{"db": "sqlite", "customers": 300, "smoke": true',
    ],
    "bench_loyalty_expiry.py": [
        r"^expiry\s+\d+\.\d+ s: [\d,]+ points from [\d,]+ lots",
        r"^second run\s+\d+\.\d+ s, 0 lots expired",
        r"^tiers\s+\d+\.\d+ s for 100 members",
        r"^check\s+0 members whose balance differs",
    ],
    "bench_webpush.py": [
        r"^carnet sequential\s+\d+\s+\d+\.\d+\s+\d+\s+1$",
        r"^carnet send_many workers=4\s+\d+",
        r"^carnet worker path threads=8\s+\d+",
        r"web-push skipped \(smoke: no npm install\)",
    ],
}


def run(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARNET_")}
    return subprocess.run([sys.executable, str(BENCH / script), *args], cwd=BENCH.parent,
                          env=env, capture_output=True, text=True, timeout=timeout, check=False)


def test_every_benchmark_has_a_smoke_run_here():
    assert sorted(p.name for p in BENCH.glob("bench_*.py")) == sorted(FIGURES)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(FIGURES))
def test_benchmark_smoke_run(script: str):
    done = run(script, "--smoke", timeout=120)
    assert done.returncode == 0, f"{script} --smoke exited {done.returncode}:\n{done.stderr}"
    missing = [line for line in FIGURES[script]
               if not re.search(line, done.stdout, re.MULTILINE)]
    assert not missing, f"{script} --smoke did not print {missing}:\n{done.stdout}"


@pytest.mark.slow
@pytest.mark.parametrize("script", ["compare_versions.py", "decision_cpu.py", "soak.py"])
def test_benchmark_helpers_import(script: str):
    done = run(script, "--help", timeout=60)
    assert done.returncode == 0, f"{script} --help exited {done.returncode}:\n{done.stderr}"
    assert "usage:" in done.stdout
