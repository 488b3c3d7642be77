"""Real MQTT (mosquitto) and NATS JetStream (nats-server -js) brokers for the bridge tests.

Each broker runs on a free loopback port (never the default one) with its files in a temp
directory, and is stopped by PID. Tests that need a broker skip with the reason when its binary
is not installed (``apt-get install -y mosquitto nats-server``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.util import wait_until

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto"
                                         if os.path.exists("/usr/sbin/mosquitto") else None)
NATS_SERVER = shutil.which("nats-server") or ("/usr/sbin/nats-server"
                                             if os.path.exists("/usr/sbin/nats-server") else None)


def free_port() -> int:
    """A loopback port nobody listens on right now (bind port 0, read it, close)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Broker:
    """One broker process that can be stopped and restarted on the same port and files."""

    def __init__(self, argv: list[str], port: int, workdir: Path, name: str) -> None:
        self.argv = argv
        self.port = port
        self.workdir = workdir
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.logfile = workdir / f"{name}.out"

    def start(self) -> None:
        assert self.proc is None, "already running"
        with open(self.logfile, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                         cwd=self.workdir)
        wait_until(lambda: _listening(self.port) or self.proc is None or
                   self.proc.poll() is not None, 10, what=f"{self.name} listening")
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited: {self.logfile.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the process by its PID (SIGTERM lets it save its state)."""
        p = self.proc
        if p is None:
            return
        self.proc = None
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        wait_until(lambda: not _listening(self.port), 5, what=f"{self.name} stopped")

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def make_tls(workdir: Path) -> dict[str, str]:
    """A throwaway CA and a server certificate for 127.0.0.1 (openssl CLI): file paths."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = workdir / "tls"
    d.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ext = d / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for argv in (
        ["req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
         "-subj", "/CN=zeromesh test CA"],
        ["req", *ec, "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=localhost"],
        ["x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", "srv.pem", "-days", "1", "-extfile", str(ext)],
    ):
        subprocess.run(["openssl", *argv], cwd=d, check=True, capture_output=True)
    return {"ca": str(d / "ca.pem"), "cert": str(d / "srv.pem"), "key": str(d / "srv.key")}


def start_mosquitto(workdir: Path, *, tls: dict[str, str] | None = None,
                    user: tuple[str, str] | None = None) -> Broker:
    """A mosquitto with persistence (sessions and queued QoS 1 messages survive a restart),
    optionally TLS only and/or a user/password (anonymous refused)."""
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (apt-get install -y mosquitto)")
    port = free_port()
    data = workdir / "mosq"
    data.mkdir(parents=True, exist_ok=True)
    conf = workdir / "mosquitto.conf"
    extra = ""
    if tls is not None:
        extra += f"cafile {tls['ca']}\ncertfile {tls['cert']}\nkeyfile {tls['key']}\n"
    if user is not None:
        pwfile = workdir / "passwd"
        subprocess.run([shutil.which("mosquitto_passwd") or "mosquitto_passwd", "-b", "-c",
                        str(pwfile), *user], check=True, capture_output=True)
        extra += f"password_file {pwfile}\n"
    if os.geteuid() == 0:
        # Started as root, mosquitto drops to the "mosquitto" user, which cannot read the
        # test's 0700 temp dirs (persistence, password file): keep it as root.
        extra += "user root\n"
    conf.write_text(
        f"listener {port} 127.0.0.1\n" + extra +
        f"allow_anonymous {'false' if user else 'true'}\n"
        "persistence true\n"
        f"persistence_location {data}/\n"
        "autosave_interval 1\n"
        "max_queued_messages 0\n"
        "max_inflight_messages 1000\n"
        "log_dest stdout\n"
        "log_type error\nlog_type warning\n")
    b = Broker([MOSQUITTO, "-c", str(conf)], port, workdir, "mosquitto")
    b.start()
    return b


def start_nats(workdir: Path, *, tls: dict[str, str] | None = None,
               user: tuple[str, str] | None = None) -> Broker:
    """A nats-server with JetStream, its store in ``workdir``; optionally TLS and a user."""
    if NATS_SERVER is None:
        pytest.skip("nats-server is not installed (apt-get install -y nats-server)")
    port = free_port()
    store = workdir / "js"
    store.mkdir(parents=True, exist_ok=True)
    argv = [NATS_SERVER, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)]
    if tls is not None:
        argv += ["--tls", "--tlscert", tls["cert"], "--tlskey", tls["key"]]
    if user is not None:
        argv += ["--user", user[0], "--pass", user[1]]
    b = Broker(argv, port, workdir, "nats")
    b.start()
    return b


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    """A running mosquitto on a free loopback port; stopped at teardown."""
    b = start_mosquitto(tmp_path)
    try:
        yield b
    finally:
        b.stop(signal.SIGKILL)


@pytest.fixture
def nats_js(tmp_path: Path) -> Iterator[Broker]:
    """A running nats-server -js on a free loopback port; stopped at teardown."""
    b = start_nats(tmp_path)
    try:
        yield b
    finally:
        b.stop(signal.SIGKILL)
