"""Web push throughput: Carnet's WebPushSender next to Node's ``web-push``, same service.

Run from the repository root::

    .venv/bin/python bench/bench_webpush.py [--messages 2000] [--subscriptions 50]
    .venv/bin/python bench/bench_webpush.py --smoke     # 20 messages, no npm: it still runs

A fan-out is simulated: ``messages / subscriptions`` distinct ~200-byte JSON notifications,
each sent to every fake subscription. Both clients talk HTTPS (verified against a
throw-away CA) to the same local push service, which runs in its own process so that its
work does not share a GIL with the Python client. The service verifies every VAPID JWT and
decrypts every body (``--no-verify`` turns that off to measure the clients alone; results
are then not checked for content, only for status). After each run the decrypted
plaintexts are compared with what was sent, so a fast but wrong client cannot win.

The "worker path" row sends the way ``portal.push.jobs`` does: one ``send`` per delivery
(each may carry its own language), in chunks, on the worker's threads.

``web-push`` is installed from npm into a temporary folder on each run and driven by
``/usr/bin/node`` (or ``--node``); ``--smoke`` (run by tests/test_bench_smoke.py) skips it,
as a test must not download, and sends 20 messages through Carnet's three paths only.
web-push's defaults use Node's global HTTPS agent (keep-alive on since Node 19); the
``agent`` rows pass an explicit ``https.Agent({keepAlive: true})``.
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from portal.push.webpush import (  # noqa: E402 - needs the repository root on sys.path
    VapidKeys,
    WebPushSender,
    generate_vapid_keys,
    make_push_pool,
)

SUBJECT = "mailto:push-bench@carnet.example"
TTL = 3600

NODE_SCRIPT = r"""
const fs = require('fs');
const https = require('https');
const webpush = require('web-push');
const cfg = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const payloads = cfg.payloads.map((p) => Buffer.from(p, 'base64'));
const options = {
  TTL: cfg.ttl,
  urgency: 'normal',
  timeout: 10000,
  vapidDetails: { subject: cfg.subject, publicKey: cfg.publicKey, privateKey: cfg.privateKey },
};
if (cfg.agent) {
  options.agent = new https.Agent({ keepAlive: true, maxSockets: cfg.concurrency });
}
const jobs = [];
for (const payload of payloads) for (const sub of cfg.subscriptions) jobs.push([sub, payload]);
const failures = {};
let ok = 0;
let next = 0;
async function worker() {
  while (next < jobs.length) {
    const [sub, payload] = jobs[next++];
    try {
      await webpush.sendNotification(sub, payload, options);
      ok += 1;
    } catch (err) {
      const key = String(err.statusCode || err.code || err.message);
      failures[key] = (failures[key] || 0) + 1;
    }
  }
}
(async () => {
  const started = process.hrtime.bigint();
  const cpuBefore = process.cpuUsage();
  await Promise.all(Array.from({ length: cfg.concurrency }, worker));
  const cpuUsed = process.cpuUsage(cpuBefore);
  const elapsed = Number(process.hrtime.bigint() - started) / 1e9;
  const cpu = (cpuUsed.user + cpuUsed.system) / 1e6;
  process.stdout.write(JSON.stringify({ elapsed, cpu, ok, failures }) + '\n');
  if (options.agent) options.agent.destroy();
})();
"""


# --------------------------------------------------------------------------- push service


def _serve(conn: Connection, subscriptions: int, verify: bool) -> None:
    """Child process: run the fake push service and answer bookkeeping commands."""
    from tests.support.fake_push_service import FakePushService

    with FakePushService(tls=True, verify=verify) as service:
        subs = [service.new_subscription() for _ in range(subscriptions)]
        conn.send((service.origin, service.ca_path, subs))
        while True:
            command = conn.recv()
            if command == "summary":
                conn.send(service.summary())
            elif command == "reset":
                service.reset_records()
                conn.send(True)
            else:
                conn.send(True)
                return


@dataclass
class Service:
    process: mp.process.BaseProcess
    conn: Connection
    origin: str
    ca_path: str
    subscriptions: list[dict[str, Any]]

    def call(self, command: str) -> Any:
        self.conn.send(command)
        return self.conn.recv()


def start_service(subscriptions: int, verify: bool) -> Service:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_serve, args=(child, subscriptions, verify), daemon=True)
    process.start()
    origin, ca_path, subs = parent.recv()
    return Service(process, parent, origin, ca_path, subs)


# --------------------------------------------------------------------------- workload


def make_payloads(count: int) -> list[bytes]:
    """Notifications shaped like Carnet's: title, body, link, tag, ids; about 200 bytes."""
    payloads = []
    for i in range(count):
        message = {
            "title": "Double points this weekend",
            "body": f"Hi! Earn 2x points on every purchase until Sunday. Offer #{i:04d}.",
            "url": f"/loyalty/offers/{1000 + i}",
            "tag": f"offer-{1000 + i}",
            "campaign": "spring-double-points",
            "sent_at": "2026-03-14T09:30:00Z",
        }
        payloads.append(json.dumps(message, separators=(",", ":")).encode())
    return payloads


@dataclass
class RunFigures:
    seconds: float
    cpu_seconds: float  # client process CPU (user + system), all threads
    ok: int
    failures: dict[str, int]


Runner = Callable[[], RunFigures]


@dataclass
class Result:
    label: str
    figures: RunFigures
    summary: dict[str, Any]

    @property
    def rate(self) -> float:
        return self.figures.ok / self.figures.seconds if self.figures.seconds else 0.0

    @property
    def cpu_us_per_message(self) -> float:
        return self.figures.cpu_seconds / self.figures.ok * 1e6 if self.figures.ok else 0.0


def run_carnet(
    service: Service, keys: VapidKeys, payloads: list[bytes], workers: int
) -> RunFigures:
    pool = make_push_pool(maxsize=max(workers, 1), ca_certs=service.ca_path)
    # The local push service listens on 127.0.0.1, a private address: allowed here.
    with pool, WebPushSender(keys, SUBJECT, timeout=10.0, pool=pool,
                             allow_private=True) as sender:
        failures: dict[str, int] = {}
        ok = 0
        started, cpu_started = time.perf_counter(), time.process_time()
        for payload in payloads:
            for outcome in sender.send_many(
                service.subscriptions, payload, ttl=TTL, workers=workers
            ):
                if outcome.delivered:
                    ok += 1
                else:
                    key = f"{outcome.status}:{outcome.http_status}"
                    failures[key] = failures.get(key, 0) + 1
        seconds = time.perf_counter() - started
        return RunFigures(seconds, time.process_time() - cpu_started, ok, failures)


def run_worker_path(service: Service, keys: VapidKeys, payloads: list[bytes]) -> RunFigures:
    """What ``portal.push.jobs.deliver`` does with a claimed chunk (without the database):
    one ``send`` per delivery, since each may carry its own language, on the worker's threads."""
    from portal.push.jobs import SEND_CHUNK, SEND_THREADS, _send
    from portal.push.messages import Outgoing

    pool = make_push_pool(maxsize=SEND_THREADS, ca_certs=service.ca_path)
    items = [Outgoing(0, sub, payload, TTL, "normal", None)
             for payload in payloads for sub in service.subscriptions]
    with pool, WebPushSender(keys, SUBJECT, timeout=10.0, pool=pool,
                             allow_private=True) as sender, \
            ThreadPoolExecutor(SEND_THREADS) as threads:
        failures: dict[str, int] = {}
        ok = 0
        started, cpu_started = time.perf_counter(), time.process_time()
        for start in range(0, len(items), SEND_CHUNK):
            chunk = items[start:start + SEND_CHUNK]
            for outcome in threads.map(lambda item: _send(sender, item), chunk):
                if isinstance(outcome, Exception) or not outcome.delivered:
                    key = str(outcome) if isinstance(outcome, Exception) else outcome.status
                    failures[key] = failures.get(key, 0) + 1
                else:
                    ok += 1
        seconds = time.perf_counter() - started
        return RunFigures(seconds, time.process_time() - cpu_started, ok, failures)


def run_node(
    node: str,
    prefix: Path,
    service: Service,
    keys: VapidKeys,
    payloads: list[bytes],
    concurrency: int,
    agent: bool,
) -> RunFigures:
    config = prefix / "config.json"
    config.write_text(
        json.dumps(
            {
                "subject": SUBJECT,
                "publicKey": keys.public_key,
                "privateKey": keys.private_key_b64url,
                "ttl": TTL,
                "subscriptions": service.subscriptions,
                "payloads": [base64.b64encode(p).decode() for p in payloads],
                "concurrency": concurrency,
                "agent": agent,
            }
        )
    )
    env = dict(os.environ, NODE_EXTRA_CA_CERTS=service.ca_path, NODE_PATH=str(prefix))
    completed = subprocess.run(
        [node, str(prefix / "bench.js"), str(config)],
        cwd=prefix,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"node failed: {completed.stderr[-2000:]}")
    data = json.loads(completed.stdout.strip().splitlines()[-1])
    return RunFigures(
        float(data["elapsed"]), float(data["cpu"]), int(data["ok"]), dict(data["failures"])
    )


def install_web_push(node: str) -> tuple[Path, str]:
    """``npm install web-push`` into a fresh temporary folder; returns it and a label."""
    prefix = Path(tempfile.mkdtemp(prefix="carnet-bench-web-push-"))
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed")
    command = [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--silent"]
    subprocess.run([*command, "web-push"], check=True, timeout=180)
    (prefix / "bench.js").write_text(NODE_SCRIPT)
    version = json.loads((prefix / "node_modules/web-push/package.json").read_text())["version"]
    node_version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return prefix, f"web-push {version} on Node {node_version}"


def measure(
    label: str, service: Service, expected: list[bytes], verify: bool, run: Runner
) -> Result:
    """One timed run, then proof from the service that every message arrived intact."""
    service.call("reset")
    figures = run()
    summary = service.call("summary")
    plaintexts = summary.pop("plaintexts")
    if figures.ok != len(expected) or figures.failures:
        raise RuntimeError(
            f"{label}: {figures.ok}/{len(expected)} delivered, failures {figures.failures}"
        )
    if summary["statuses"] != {201: len(expected)}:
        raise RuntimeError(f"{label}: the push service saw {summary['statuses']}")
    if verify and plaintexts != expected:
        raise RuntimeError(f"{label}: decrypted payloads differ from what was sent")
    return Result(label, figures, summary)


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--subscriptions", type=int, default=50)
    parser.add_argument("--workers", type=int, default=4, help="concurrent sends")
    parser.add_argument("--rounds", type=int, default=2, help="best of N per configuration")
    parser.add_argument("--no-verify", action="store_true", help="service skips VAPID+decrypt")
    parser.add_argument("--node", default=shutil.which("node") or "/usr/bin/node")
    parser.add_argument("--skip-node", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="20 messages, one round, no npm: "
                        "checks that the benchmark runs, its figures mean nothing")
    args = parser.parse_args()
    if args.smoke:
        args.messages, args.subscriptions, args.rounds, args.skip_node = 20, 4, 1, True

    verify = not args.no_verify
    distinct = max(1, args.messages // args.subscriptions)
    payloads = make_payloads(distinct)
    total = distinct * args.subscriptions
    expected = sorted(p for p in payloads for _ in range(args.subscriptions))
    keys = generate_vapid_keys()

    prefix: Path | None = None
    node_label = "web-push skipped" + (" (smoke: no npm install)" if args.smoke else "")
    if not args.skip_node:
        print("installing web-push from npm...", flush=True)
        prefix, node_label = install_web_push(args.node)

    workers = args.workers
    carnet_seq, carnet_par = "carnet sequential", f"carnet send_many workers={workers}"
    carnet_worker = "carnet worker path threads=8"
    node_seq, node_seq_agent = "web-push sequential (defaults)", "web-push sequential agent"
    node_par = f"web-push concurrency={workers} (defaults)"
    node_par_agent = f"web-push concurrency={workers} agent"
    service = start_service(args.subscriptions, verify)
    try:
        configs: list[tuple[str, Runner]] = [
            (carnet_seq, functools.partial(run_carnet, service, keys, payloads, 1)),
            (carnet_par, functools.partial(run_carnet, service, keys, payloads, workers)),
            (carnet_worker, functools.partial(run_worker_path, service, keys, payloads)),
        ]
        if prefix is not None:
            node = functools.partial(run_node, args.node, prefix, service, keys, payloads)
            configs += [
                (node_seq, functools.partial(node, 1, False)),
                (node_seq_agent, functools.partial(node, 1, True)),
                (node_par, functools.partial(node, workers, False)),
                (node_par_agent, functools.partial(node, workers, True)),
            ]
        best: dict[str, Result] = {}
        for _ in range(args.rounds):
            for label, run in configs:
                result = measure(label, service, expected, verify, run)
                if label not in best or result.rate > best[label].rate:
                    best[label] = result
    finally:
        service.call("stop")
        service.process.join(timeout=10)
        if prefix is not None:
            shutil.rmtree(prefix, ignore_errors=True)

    checks = "verifies VAPID and decrypts every message" if verify else "only counts (--no-verify)"
    print()
    print(
        f"{total} messages ({distinct} payloads x {args.subscriptions} subscriptions, "
        f"~{sum(map(len, payloads)) // len(payloads)} bytes each) over HTTPS to a local push "
        f"service that {checks}; best of {args.rounds} rounds; {node_label}"
    )
    print()
    print(f"{'client':42} {'sends/s':>8} {'seconds':>8} {'client CPU us/msg':>18} {'conns':>6}")
    for result in best.values():
        print(
            f"{result.label:42} {result.rate:8.0f} {result.figures.seconds:8.2f} "
            f"{result.cpu_us_per_message:18.0f} {result.summary['connections_opened']:6d}"
        )
    print()
    pairs = [
        (carnet_seq, node_seq),
        (carnet_seq, node_seq_agent),
        (carnet_par, node_par),
        (carnet_par, node_par_agent),
    ]
    for mine, theirs in pairs:
        if mine in best and theirs in best:
            ratio = best[mine].rate / best[theirs].rate
            cpu = best[theirs].cpu_us_per_message / best[mine].cpu_us_per_message
            print(
                f"{mine} / {theirs}: {ratio:.2f}x sends/s, {cpu:.2f}x less client CPU per message"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
