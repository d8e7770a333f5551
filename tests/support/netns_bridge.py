"""Forward 127.0.0.1:PORT (this network namespace) to 127.0.0.1:TARGET inside another one (a process's).

The Milvus server binds every address it has (its gRPC servers take no listen address), so the tests run it
in a network namespace of its own that holds nothing but loopback (`unshare -n`), and this bridge is the one
door into it. The listening sockets are made first, in the caller's namespace; then the process joins the
server's namespace (setns), where every socket it connects lives. Usage:
    python netns_bridge.py NS_PID LOCAL_PORT:TARGET_PORT [...]
"""

from __future__ import annotations

import ctypes
import socket
import sys
import threading

CLONE_NEWNET = 0x40000000


def pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(1 << 16):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(listener: socket.socket, target: int) -> None:
    while True:
        client, _ = listener.accept()
        try:
            upstream = socket.create_connection(("127.0.0.1", target), timeout=5)
            upstream.settimeout(None)
        except OSError:
            client.close()
            continue
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=pump, args=(a, b), daemon=True).start()


def main() -> None:
    ns_pid, pairs = int(sys.argv[1]), [tuple(map(int, p.split(":"))) for p in sys.argv[2:]]
    listeners = []
    for local, target in pairs:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", local))
        listener.listen(64)
        listeners.append((listener, target))
    with open(f"/proc/{ns_pid}/ns/net") as ns:
        if ctypes.CDLL(None, use_errno=True).setns(ns.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns into the server's network namespace failed")
    print("ready", flush=True)
    threads = [threading.Thread(target=serve, args=lt, daemon=True) for lt in listeners]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
