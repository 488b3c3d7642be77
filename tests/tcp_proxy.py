"""A userspace TCP proxy for fault tests: stall (stop forwarding, keep the connections) or cut
(close them all, refuse new ones) the traffic to one endpoint. Used by tests/test_node_faults.py
and the chaos suite (tests/chaos/faults.py)."""

from __future__ import annotations

import selectors
import socket
import threading


class Proxy:
    """A TCP proxy in front of ``target`` (``tcp://host:port``) that can stall or cut."""

    def __init__(self, target: str, host: str = "127.0.0.1") -> None:
        thost, port = target.removeprefix("tcp://").rsplit(":", 1)
        self.target = (thost, int(port))
        self.listener = socket.create_server((host, 0))  # ``host``: where dialling nodes reach it
        self.listener.setblocking(False)
        self.endpoint = f"tcp://{host}:{self.listener.getsockname()[1]}"
        self.stalled = threading.Event()
        self.cut = threading.Event()
        self._stop = threading.Event()
        self._pairs: dict[socket.socket, socket.socket] = {}
        self._accepted: set[socket.socket] = set()
        #: bytes forwarded towards the target (what the dialling node sent)
        self.sent_up = 0
        self._thread = threading.Thread(target=self._run, name="test-proxy", daemon=True)
        self._thread.start()

    def _close(self, sel: selectors.BaseSelector, s: socket.socket) -> None:
        other = self._pairs.pop(s, None)
        for x in (s, other):
            if x is None:
                continue
            self._pairs.pop(x, None)
            try:
                sel.unregister(x)
            except (KeyError, ValueError):
                pass
            x.close()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        while not self._stop.is_set():
            if self.cut.is_set():
                for s in list(self._pairs):
                    if s in self._pairs:
                        self._close(sel, s)
            stalled = self.stalled.is_set()
            for key, _ in sel.select(timeout=0.01):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                if s is self.listener:
                    try:
                        conn, _ = self.listener.accept()
                    except OSError:
                        continue
                    if self.cut.is_set():
                        conn.close()
                        continue
                    try:
                        up = socket.create_connection(self.target, timeout=1)
                    except OSError:
                        conn.close()
                        continue
                    for x in (conn, up):
                        x.setblocking(False)
                        sel.register(x, selectors.EVENT_READ)
                    self._pairs[conn], self._pairs[up] = up, conn
                    self._accepted.add(conn)
                    continue
                if stalled:
                    continue
                try:
                    data = s.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                other = self._pairs.get(s)
                if not data or other is None:
                    self._close(sel, s)
                    continue
                if other not in self._accepted:
                    self.sent_up += len(data)
                try:
                    other.setblocking(True)
                    other.settimeout(2)
                    other.sendall(data)
                    other.setblocking(False)
                except OSError:
                    self._close(sel, s)
            if stalled:
                # Readable sockets stay readable while stalled: do not spin on them.
                self._stop.wait(0.005)
        for s in list(self._pairs):
            s.close()
        self.listener.close()
        sel.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
