#!/usr/bin/env python3
"""Open N keep-alive connections to HOST:PORT, send one GET PATH on each, read the answer,
then hold them all open (idle) until killed. Writes "<n ok> <n non-200>" to READY_FILE once
every connection has had its answer. Standard library only."""
import signal, socket, sys, time

host, port, path, n, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
req = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: keep-alive\r\n\r\n".encode()
socks, ok, bad = [], 0, 0
for i in range(n):
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(req)
    socks.append(s)
for s in socks:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v.strip())
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    if head.startswith(b"HTTP/1.1 200"):
        ok += 1
    else:
        bad += 1
with open(ready, "w") as f:
    f.write(f"{ok} {bad}\n")
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    time.sleep(3600)
