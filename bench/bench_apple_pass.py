"""Benchmark: signed Apple Wallet store cards per second, Carnet vs passkit-generator.

Run from the repository root::

    .venv/bin/python bench/bench_apple_pass.py [--passes 200] [--node-passes 40] [--rounds 7]
    .venv/bin/python bench/bench_apple_pass.py --smoke    # a few passes, no npm: it still runs

Both sides build the same card (same pass.json content, images, en/fr strings) signed with
the same development certificates (from ``passes.devcerts``).  passkit-generator (Node.js)
is installed from npm into a temporary folder by this script.  Each side gets a warm-up,
then several timed rounds of N builds; the median rate is reported.  One output of each
side is checked with ``openssl smime -verify`` trusting only the development root (so the
intermediate must travel in the signature), so that neither wins by skipping work.
``--skip-node`` measures Carnet alone; ``--smoke`` (run by tests/test_bench_smoke.py) does
that with a few passes, as a test must not download.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from passes.apple import (
    DEFAULT_STRINGS,
    News,
    StoreCard,
    build_store_card,
    load_credentials,
    render_pass_json,
)
from passes.devcerts import create_dev_apple_credentials
from passes.images import default_pass_images

PASS_TYPE_ID = "pass.com.example.carnet"
TEAM_ID = "ABCDE12345"
KEY_PASSWORD = "bench-password"

NODE_BENCH = r"""
const fs = require("node:fs");
const path = require("node:path");
const { PKPass } = require(path.join(process.argv[2], "node_modules", "passkit-generator"));

const input = JSON.parse(fs.readFileSync(process.argv[3], "utf8"));
const certificates = {
  wwdr: fs.readFileSync(input.wwdr),
  signerCert: fs.readFileSync(input.certificate),
  signerKey: fs.readFileSync(input.privateKey),
  signerKeyPassphrase: input.password ?? undefined,
};
const passJson = Buffer.from(input.passJson, "utf8");
const images = Object.fromEntries(
  Object.entries(input.images).map(([name, b64]) => [name, Buffer.from(b64, "base64")]),
);

function build(i) {
  const pass = new PKPass({ "pass.json": passJson, ...images }, certificates, {
    serialNumber: `bench-${i}`,
  });
  for (const [lang, table] of Object.entries(input.strings)) pass.localize(lang, table);
  return pass.getAsBuffer();
}

for (let i = 0; i < input.warmup; i++) build(i);
const rates = [];
for (let r = 0; r < input.rounds; r++) {
  const start = process.hrtime.bigint();
  for (let i = 0; i < input.passes; i++) build(i);
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  rates.push(input.passes / seconds);
}
fs.writeFileSync(input.sample, build(0));
process.stdout.write(JSON.stringify({ rates }));
"""


def bench_card() -> StoreCard:
    return StoreCard(
        pass_type_id=PASS_TYPE_ID,
        team_id=TEAM_ID,
        serial_number="bench-0",
        organization_name="Carnet",
        description="Carnet loyalty card",
        member_name="Zoé Martin",
        member_number="CARNET-000123",
        points=1250,
        tier="Silver",
        next_tier="450 points to Gold",
        web_service_url="https://carnet.example/wallet",
        authentication_token="0123456789abcdef0123",
        terms="Points expire after 24 months.",
        manage_url="https://carnet.example/preferences",
        news=News("Winter sale", "20% off this weekend"),
    )


def openssl_verifies(pkpass: bytes, ca_file: Path, workdir: Path) -> bool:
    openssl = shutil.which("openssl")
    if openssl is None:
        return False
    with zipfile.ZipFile(io.BytesIO(pkpass)) as archive:
        archive.extractall(workdir)
    result = subprocess.run(
        [
            openssl,
            "smime",
            "-verify",
            "-binary",
            "-inform",
            "DER",
            "-in",
            str(workdir / "signature"),
            "-content",
            str(workdir / "manifest.json"),
            "-CAfile",
            str(ca_file),
            "-purpose",
            "any",
            "-out",
            "/dev/null",
        ],  # fmt: skip
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


def node_version() -> str:
    node = shutil.which("node") or "/usr/bin/node"
    return subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()


def run_python(card: StoreCard, paths: dict[str, Path], args: argparse.Namespace) -> list[float]:
    credentials = load_credentials(
        paths["certificate"], paths["private_key"], paths["wwdr"], KEY_PASSWORD
    )
    for _ in range(args.warmup):
        build_store_card(card, credentials)
    rates = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        for _ in range(args.passes):
            build_store_card(card, credentials)
        rates.append(args.passes / (time.perf_counter() - start))
    return rates


def install_passkit_generator(workdir: Path) -> tuple[Path, str]:
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit("npm is required to install passkit-generator")
    prefix = workdir / "node"
    prefix.mkdir()
    print("installing passkit-generator from npm…", flush=True)
    subprocess.run(
        [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--silent",
         "passkit-generator"],
        check=True,
        timeout=120,
    )  # fmt: skip
    version = json.loads(
        (prefix / "node_modules" / "passkit-generator" / "package.json").read_text()
    )["version"]
    return prefix, version


def run_node(
    card: StoreCard,
    paths: dict[str, Path],
    args: argparse.Namespace,
    workdir: Path,
    prefix: Path,
    key: tuple[Path, str | None],
    name: str,
) -> tuple[list[float], bytes]:
    node = shutil.which("node") or "/usr/bin/node"
    images = default_pass_images("C", (35, 64, 143), (255, 255, 255))
    sample = workdir / f"{name}.pkpass"
    (workdir / f"{name}.json").write_text(
        json.dumps(
            {
                "passJson": json.dumps(render_pass_json(card), ensure_ascii=False),
                "images": {name: base64.b64encode(data).decode() for name, data in images.items()},
                "strings": {lang: dict(table) for lang, table in DEFAULT_STRINGS.items()},
                "wwdr": str(paths["wwdr"]),
                "certificate": str(paths["certificate"]),
                "privateKey": str(key[0]),
                "password": key[1],
                "warmup": min(args.warmup, args.node_passes),
                "rounds": args.rounds,
                "passes": args.node_passes,
                "sample": str(sample),
            }
        )
    )
    script = workdir / "bench.js"
    script.write_text(NODE_BENCH)
    out = subprocess.run(
        [node, str(script), str(prefix), str(workdir / f"{name}.json")],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if out.returncode != 0:
        raise SystemExit(f"passkit-generator run failed:\n{out.stderr}")
    return json.loads(out.stdout)["rates"], sample.read_bytes()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=200, help="builds per timed round (Python)")
    parser.add_argument(
        "--node-passes",
        type=int,
        default=40,
        help="builds per timed round for passkit-generator (slower: fewer keep the run short)",
    )
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed builds first")
    parser.add_argument("--skip-node", action="store_true", help="Carnet's side only")
    parser.add_argument("--smoke", action="store_true", help="a few passes, no npm: checks "
                        "that the benchmark runs, its figures mean nothing")
    args = parser.parse_args()
    if args.smoke:
        args.passes, args.rounds, args.warmup, args.skip_node = 5, 3, 1, True

    with tempfile.TemporaryDirectory(prefix="carnet-bench-") as tmp:
        workdir = Path(tmp)
        paths = create_dev_apple_credentials(
            workdir / "creds", PASS_TYPE_ID, TEAM_ID, password=KEY_PASSWORD
        )
        card = bench_card()
        # passkit-generator decrypts the key on every build; also measure it with a
        # plain key so that PBKDF2 cost alone does not explain the difference.
        plain_key = workdir / "plain-key.pem"
        plain_key.write_bytes(
            load_credentials(
                paths["certificate"], paths["private_key"], paths["wwdr"], KEY_PASSWORD
            ).private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )

        node: dict[str, tuple[list[float], bytes]] = {}
        if not args.skip_node:
            prefix, version = install_passkit_generator(workdir)
            print(f"running passkit-generator {version} on node {node_version()}…", flush=True)
            node["enc"] = run_node(
                card, paths, args, workdir, prefix, (paths["private_key"], KEY_PASSWORD), "enc"
            )
            node["plain"] = run_node(
                card, paths, args, workdir, prefix, (plain_key, None), "plain"
            )
        print(f"running passes.apple on Python {sys.version.split()[0]}…", flush=True)
        python_rates = run_python(card, paths, args)
        credentials = load_credentials(
            paths["certificate"], paths["private_key"], paths["wwdr"], KEY_PASSWORD
        )
        python_sample = build_store_card(card, credentials)

        verified: dict[str, bool] = {}
        for name, sample in (("py", python_sample), *((n, data) for n, (_, data) in node.items())):
            (workdir / f"verify-{name}").mkdir()
            verified[name] = openssl_verifies(sample, paths["root_ca"], workdir / f"verify-{name}")

    py_median = statistics.median(python_rates)
    print()
    node_passes = f" / {args.node_passes} (Node)" if node else ""
    print(
        f"{args.rounds} timed rounds of {args.passes} (Python){node_passes} "
        f"signed passes each, after a warm-up"
    )
    print(f"{'':24}{'median/s':>10}{'min/s':>10}{'max/s':>10}  openssl verify")
    for label, name in (
        ("passes.apple (Python)", "py"),
        ("passkit-generator", "enc"),
        ("  (unencrypted key)", "plain"),
    ):
        rates = python_rates if name == "py" else node.get(name, ([], b""))[0]
        if not rates:
            reason = "smoke: no npm install" if args.smoke else "--skip-node"
            print(f"{label:24}{'skipped (' + reason + ')':>30}")
            continue
        print(
            f"{label:24}{statistics.median(rates):10.1f}{min(rates):10.1f}{max(rates):10.1f}"
            f"  {'ok' if verified[name] else 'FAILED'}"
        )
    if node:
        js_median = statistics.median(node["enc"][0])
        plain_median = statistics.median(node["plain"][0])
        print(f"ratio (Python / passkit-generator): {py_median / js_median:.1f}×")
        print(f"ratio (Python / passkit-generator, unencrypted key): "
              f"{py_median / plain_median:.1f}×")
    return 0 if all(verified.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
