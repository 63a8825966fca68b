"""What the fault tests share: a real database per test (file or schema, not a rolled-back
connection, because the point is what survives a failure), a live HTTP server, browsers
signed in through a manage link, a TCP proxy that can take PostgreSQL away and bring it
back, the worker as a real subprocess, and bounded waits on conditions."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import requests
from flask import Flask
from sqlalchemy import Engine, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session
from werkzeug.serving import make_server

from portal import create_app
from portal.core.config import ROOT
from portal.core.db import get_engine, make_engine, new_session
from portal.models.customer import Customer
from portal.services.accounts import create_customer
from tests.conftest import app_config, prepare_schema
from tests.support.databases import fresh_database

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float = 20.0, what: str = "condition",
             every: float = 0.02) -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


@contextmanager
def live_database(kind: str, folder: Path, application_name: str | None = None
                  ) -> Iterator[str]:
    """A fresh database with the schema and catalog; on PostgreSQL the URL names the
    connections with ``application_name`` so a test can find (and terminate) only its own."""
    with fresh_database(kind, folder) as url:
        if kind == "postgresql" and application_name:
            url = f"{url}&application_name={application_name}"
        engine = make_engine(url)
        try:
            prepare_schema(engine)
        finally:
            engine.dispose()
        yield url


def make_live_app(url: str, tmp_path: Path, **overrides: Any) -> Flask:
    return create_app(app_config(tmp_path, DATABASE_URL=url, **overrides))


def dispose(app: Flask) -> None:
    bind = get_engine(app)
    if isinstance(bind, Engine):
        bind.dispose()


def add_customer(app: Flask, email: str, **fields: Any) -> Customer:
    session = new_session(app)
    with session.begin():
        customer = create_customer(session, email, **fields)
    session.close()
    return customer


def count(engine: Engine, sql: str, **params: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(sql), params).scalar_one())


class LiveServer:
    """The app on a real socket (werkzeug, one thread per request), as a browser sees it."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def manage_path(app: Flask, customer: Customer) -> str:
    from portal.web.links import manage_link

    with app.test_request_context():
        return "/" + manage_link(customer).split("/", 3)[3]


def signed_in_browser(server: LiveServer, customer: Customer) -> requests.Session:
    """A separate HTTP client signed in by following the customer's emailed manage link."""
    browser = requests.Session()
    r = browser.get(server.url + manage_path(server.app, customer), timeout=10)
    assert r.status_code == 200 and r.url.endswith("/preferences"), r.status_code
    return browser


def customer_id(app: Flask, email: str) -> int:
    session: Session = new_session(app)
    with session.begin():
        found = session.scalars(select(Customer.id).where(Customer.email == email)).one()
    session.close()
    return int(found)


# --- PostgreSQL behind a proxy that can go down ----------------------------------------------


class TcpProxy:
    """Forwards 127.0.0.1:<port> to the database. ``down()`` closes the listening socket and
    every open connection (clients see resets, then connection refused); ``up()`` listens on
    the same port again. The application is never told."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()

    def url_for(self, url: str) -> str:
        return make_url(url).set(host="127.0.0.1", port=self.port).render_as_string(
            hide_password=False)

    def up(self) -> TcpProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._sockets.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def terminate_backends(admin_url: str, application_name: str) -> int:
    """``pg_terminate_backend`` for the connections this test's app opened, and no others,
    waiting (up to 5 s each) until they are gone, as after a server restart."""
    admin = make_engine(admin_url)
    try:
        with admin.begin() as conn:
            return len(conn.execute(text(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                "WHERE application_name = :name AND pid <> pg_backend_pid()"),
                {"name": application_name}).all())
    finally:
        admin.dispose()


# --- the worker as a real process ------------------------------------------------------------


class WorkerProcess:
    """``flask --app app worker`` in its own process group, against ``url``."""

    def __init__(self, url: str, log: Path, **settings: Any) -> None:
        self.env = dict(os.environ, CARNET_DATABASE_URL=url, CARNET_ENV="development",
                        CARNET_SECRET_KEY="faults-" + "k" * 40, PYTHONUNBUFFERED="1",
                        **{f"CARNET_{k}": str(v) for k, v in settings.items()})
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        flask = str(Path(sys.executable).parent / "flask")
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([flask, "--app", "app", "worker"], cwd=ROOT,
                                         env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        return self

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is cleaned up, as when a machine dies."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
