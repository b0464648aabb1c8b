"""End to end against a real portcullis binary: the SDK's signatures are accepted by the proxy,
the verified identity reaches the upstream, and replays and tampered bodies are refused.

Runs when PORTCULLIS_BIN names the binary (CI sets it; e.g. target/release/portcullis), and is
skipped otherwise. Everything listens on 127.0.0.1.
"""

import http.server
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import requests

from portcullis_sign import HttpxSignatureAuth, SignatureAuth

KEY_ID = "client-42-2026-11"
CLIENT = "client-42"
SECRET = b"portcullis-sdk-proxy-test-secret-0123456789"
START_TIMEOUT = 20.0


def free_port():
    # The port is free when this returns; another process could take it before the proxy
    # binds it, which on a CI runner is rare enough to accept.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Upstream:
    """A real HTTP upstream that records every request it receives and answers 200."""

    def __init__(self):
        self.received = []
        self._lock = threading.Lock()
        upstream = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with upstream._lock:
                    upstream.received.append(
                        {
                            "method": self.command,
                            "path": self.path,
                            "headers": {k.lower(): v for k, v in self.headers.items()},
                            "body": body,
                        }
                    )
                data = b'{"ok":true}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def last(self, path):
        with self._lock:
            for r in reversed(self.received):
                if r["path"] == path:
                    return r
        raise AssertionError(f"the upstream never received {path}; it got {[r['path'] for r in self.received]}")

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def portcullis(tmp_path_factory):
    binary = os.environ.get("PORTCULLIS_BIN")
    if not binary:
        pytest.skip("PORTCULLIS_BIN is not set (point it at the portcullis binary to run this test)")
    binary = str(Path(binary).resolve())

    upstream = Upstream()
    tmp = tmp_path_factory.mktemp("portcullis")
    # Trailing newline on purpose: DESIGN.md says it is trimmed.
    (tmp / "client-42.secret").write_bytes(SECRET + b"\n")
    listen, admin = free_port(), free_port()
    config = tmp / "portcullis.toml"
    config.write_text(
        f"""\
[server]
listen = "127.0.0.1:{listen}"

[admin]
listen = "127.0.0.1:{admin}"

[upstream]
url = "http://127.0.0.1:{upstream.port}"

[signature]
max_skew = "300s"
[[signature.keys]]
id = "{KEY_ID}"
client = "{CLIENT}"
secret_file = "{tmp / 'client-42.secret'}"
algorithm = "hmac-sha256"

[[routes]]
name = "signed"
path_prefix = "/signed"
require = ["signature"]
""",
        "utf-8",
    )
    log = open(tmp / "portcullis.log", "wb")
    proc = subprocess.Popen(
        [binary, "proxy", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=tmp
    )

    def stop():
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        upstream.stop()

    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise AssertionError(
                    f"portcullis exited with {proc.returncode}:\n{(tmp / 'portcullis.log').read_text()}"
                )
            try:
                if requests.get(f"http://127.0.0.1:{admin}/healthz", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"portcullis /healthz did not answer in {START_TIMEOUT}s:\n"
                    f"{(tmp / 'portcullis.log').read_text()}"
                )
            time.sleep(0.1)
        yield {"base": f"http://127.0.0.1:{listen}", "upstream": upstream}
    finally:
        stop()


def problem_code(response):
    assert response.status_code == 401, response.text
    return response.json()["code"]


def assert_identity_reached_upstream(portcullis, path):
    received = portcullis["upstream"].last(path)
    assert received["headers"].get("x-auth-client") == CLIENT
    assert received["headers"].get("x-auth-key-id") == KEY_ID
    return received


def test_requests_get_with_query_is_forwarded_with_identity(portcullis):
    path = "/signed/items?b=2&a=%20x&page=1"
    r = requests.get(portcullis["base"] + path, auth=SignatureAuth(KEY_ID, SECRET), timeout=5)
    assert r.status_code == 200, r.text
    assert_identity_reached_upstream(portcullis, path)


def test_requests_post_json_is_forwarded_with_identity(portcullis):
    path = "/signed/transactions/requests"
    r = requests.post(
        portcullis["base"] + path, json={"amount": "12.50", "note": "é"}, auth=SignatureAuth(KEY_ID, SECRET), timeout=5
    )
    assert r.status_code == 200, r.text
    received = assert_identity_reached_upstream(portcullis, path)
    assert json.loads(received["body"]) == {"amount": "12.50", "note": "é"}


def test_httpx_get_and_post_are_forwarded_with_identity(portcullis):
    with httpx.Client(auth=HttpxSignatureAuth(KEY_ID, SECRET), timeout=5) as client:
        r = client.get(portcullis["base"] + "/signed/items?x=httpx&y=%2F")
        assert r.status_code == 200, r.text
        assert_identity_reached_upstream(portcullis, "/signed/items?x=httpx&y=%2F")
        r = client.post(portcullis["base"] + "/signed/transactions/httpx", json={"amount": "1.00"})
        assert r.status_code == 200, r.text
        assert_identity_reached_upstream(portcullis, "/signed/transactions/httpx")


def test_spoofed_identity_headers_are_replaced(portcullis):
    path = "/signed/spoof"
    r = requests.get(
        portcullis["base"] + path,
        headers={"X-Auth-Client": "admin", "X-Auth-Key-Id": "root"},
        auth=SignatureAuth(KEY_ID, SECRET),
        timeout=5,
    )
    assert r.status_code == 200, r.text
    assert_identity_reached_upstream(portcullis, path)


def test_unsigned_request_is_refused(portcullis):
    assert problem_code(requests.get(portcullis["base"] + "/signed/items", timeout=5)) == "signature_missing"


def test_replayed_request_is_refused(portcullis):
    prepared = requests.Request(
        "POST", portcullis["base"] + "/signed/replay", json={"n": 1}, auth=SignatureAuth(KEY_ID, SECRET)
    ).prepare()
    with requests.Session() as session:
        first = session.send(prepared, timeout=5)
        assert first.status_code == 200, first.text
        second = session.send(prepared, timeout=5)
    assert problem_code(second) == "nonce_replayed"


def test_tampered_body_is_refused(portcullis):
    prepared = requests.Request(
        "POST", portcullis["base"] + "/signed/tamper", json={"amount": "1.00"}, auth=SignatureAuth(KEY_ID, SECRET)
    ).prepare()
    prepared.body = b'{"amount": "9.00"}'
    prepared.headers["Content-Length"] = str(len(prepared.body))
    with requests.Session() as session:
        r = session.send(prepared, timeout=5)
    assert problem_code(r) == "signature_mismatch"
    assert all(rec["path"] != "/signed/tamper" for rec in portcullis["upstream"].received)


def test_tampered_query_is_refused(portcullis):
    prepared = requests.Request(
        "GET", portcullis["base"] + "/signed/items?amount=1", auth=SignatureAuth(KEY_ID, SECRET)
    ).prepare()
    prepared.url = prepared.url.replace("amount=1", "amount=9")
    with requests.Session() as session:
        assert problem_code(session.send(prepared, timeout=5)) == "signature_mismatch"
