"""A loopback TCP forwarder that can drop every connection through it at once.

It sits between gRPC clients and a server (both on 127.0.0.1) and copies bytes both ways, TLS
included, without looking at them. :meth:`DroppingProxy.drop_all` resets every open
connection, as a flaky network or a restarted load balancer does; new connections are
forwarded again right away. Everything is bounded: at most :data:`MAX_CONNECTIONS` at once,
and :meth:`DroppingProxy.close` waits a bounded time for its threads.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading

MAX_CONNECTIONS = 32
_POLL_S = 0.2
_CHUNK = 1 << 16


class DroppingProxy:
    """Listens on ``127.0.0.1:<free port>`` and forwards each connection to :attr:`target`.

    The target (``127.0.0.1:PORT``) may be set after the proxy started, so that the proxy's
    address can go into a config before the server it forwards to has a port; until then,
    connections are closed at once.
    """

    def __init__(self, target: str | None = None) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_POLL_S)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._open: set[_Pair] = set()
        self._threads: list[threading.Thread] = []
        #: connections accepted so far, and how many of them came after the last drop
        self.accepted = 0
        self.accepted_since_drop = 0
        self._accepter = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._accepter.start()

    def drop_all(self) -> int:
        """Resets every open connection (both sides see an error); returns how many."""
        with self._lock:
            pairs = list(self._open)
            self.accepted_since_drop = 0
        for pair in pairs:
            pair.reset()
        return len(pairs)

    def close(self) -> None:
        self._closed.set()
        self.drop_all()
        self._accepter.join(5)
        for thread in self._threads:
            thread.join(5)
        self._listener.close()

    def __enter__(self) -> DroppingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            target = self.target
            with self._lock:
                if target is None or len(self._open) >= MAX_CONNECTIONS:
                    client.close()
                    continue
                self.accepted += 1
                self.accepted_since_drop += 1
            host, _, port = target.rpartition(":")
            try:
                upstream = socket.create_connection((host, int(port)), timeout=5)
            except OSError:
                client.close()
                continue
            pair = _Pair(client, upstream)
            with self._lock:
                self._open.add(pair)
            thread = threading.Thread(target=self._pump, args=(pair,), daemon=True)
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def _pump(self, pair: _Pair) -> None:
        try:
            pair.pump(self._closed)
        finally:
            with self._lock:
                self._open.discard(pair)
            pair.close()


class _Pair:
    """One forwarded connection: the client's socket and the one to the server."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self._sockets = (client, upstream)
        self._peer = {client: upstream, upstream: client}
        self._reset = threading.Event()
        for sock in self._sockets:
            sock.setblocking(True)
            sock.settimeout(None)

    def pump(self, closed: threading.Event) -> None:
        """Copies bytes both ways until either side closes, a reset, or ``closed``."""
        with selectors.DefaultSelector() as selector:
            for sock in self._sockets:
                selector.register(sock, selectors.EVENT_READ)
            while not closed.is_set() and not self._reset.is_set():
                for key, _ in selector.select(_POLL_S):
                    source: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        data = source.recv(_CHUNK)
                        if not data:
                            return
                        self._peer[source].sendall(data)
                    except OSError:
                        return

    def reset(self) -> None:
        """Ends the connection on both sides at once, mid-stream.

        The shutdown wakes the pump, which then closes the sockets; with a zero linger time
        that close sends a TCP reset.
        """
        self._reset.set()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()
