"""A TCP proxy on 127.0.0.1, run as its own process (``python tests/cluster/proxy.py LISTEN TARGET``): SIGUSR1 closes
the listening socket and every connection (clients then get "connection refused"), SIGUSR2 listens again on the same
port. A process of its own, because a proxy thread in the test's process would need the GIL that GDAL holds while
it waits for the proxy's answer."""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading

connections: list[socket.socket] = []
lock = threading.Lock()
state: dict[str, socket.socket | None] = {"listener": None}


def pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def serve(listener: socket.socket, target: int) -> None:
    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", target))
        except OSError:
            client.close()
            continue
        with lock:
            connections.extend([client, upstream])
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=pipe, args=(a, b), daemon=True).start()


def accept(port: int, target: int) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(64)
    state["listener"] = listener
    threading.Thread(target=serve, args=(listener, target), daemon=True).start()


def refuse() -> None:
    with lock:
        listener = state["listener"]
        if listener is not None:
            listener.close()
            state["listener"] = None
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        connections.clear()


def main() -> None:
    port, target = int(sys.argv[1]), int(sys.argv[2])
    signal.signal(signal.SIGUSR1, lambda *_: refuse())
    signal.signal(signal.SIGUSR2, lambda *_: accept(port, target))
    accept(port, target)
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
