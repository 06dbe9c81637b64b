"""A fake EC2 instance metadata service (IMDSv2) on loopback, for the spot watcher's tests.

A real HTTP server: `PUT /latest/api/token` (with `X-aws-ec2-metadata-token-ttl-seconds`) hands
out a token; every GET needs a live one in `X-aws-ec2-metadata-token` or gets 401. The spot
notice and the rebalance recommendation answer 404 until the test posts them."""
from __future__ import annotations

import json
import secrets
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NOTICE = "/latest/meta-data/spot/instance-action"
REBALANCE = "/latest/meta-data/events/recommendations/rebalance"


def iso_utc(epoch_s: float) -> str:
    """`2026-12-01T08:22:00Z`, as IMDS writes times."""
    return datetime.fromtimestamp(epoch_s, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeImds:
    """IMDSv2 for one instance; `url` is its base URL once started."""

    def __init__(self, instance_id: str = "i-0123456789abcdef0", local_ip: str = "10.0.0.5"):
        self.values = {"/latest/meta-data/instance-id": instance_id,
                       "/latest/meta-data/local-ipv4": local_ip}
        self.tokens: dict[str, float] = {}  # token -> expiry (epoch s)
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.notice_served_at: float | None = None  # when a GET first got the notice
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> "FakeImds":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def post_notice(self, in_s: float = 120.0, action: str = "terminate",
                    body: str | None = None) -> float:
        """Answer the spot notice from now on: `action` in `in_s` seconds (or `body` verbatim);
        returns the action time (epoch s)."""
        at = time.time() + in_s
        with self.lock:
            self.values[NOTICE] = body if body is not None else json.dumps(
                {"action": action, "time": iso_utc(at)})
        return at

    def post_rebalance(self) -> None:
        """Answer the rebalance recommendation from now on."""
        with self.lock:
            self.values[REBALANCE] = json.dumps({"noticeTime": iso_utc(time.time())})

    def expire_tokens(self) -> None:
        """Every token handed out so far stops working (as after its TTL)."""
        with self.lock:
            self.tokens.clear()

    def statuses(self, path: str) -> list[int]:
        """The status of every GET of `path` so far."""
        with self.lock:
            return [s for m, p, s in self.requests if m == "GET" and p == path]

    def _answer(self, method: str, path: str, headers) -> tuple[int, str]:
        with self.lock:
            if method == "PUT":
                if path != "/latest/api/token":
                    return 403, ""
                ttl = headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
                if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                    return 400, "bad TTL"
                token = secrets.token_urlsafe(24)
                self.tokens[token] = time.time() + int(ttl)
                return 200, token
            if self.tokens.get(headers.get("X-aws-ec2-metadata-token", ""), 0) < time.time():
                return 401, ""
            if path not in self.values:
                return 404, "Not Found"
            if path == NOTICE and self.notice_served_at is None:
                self.notice_served_at = time.time()
            return 200, self.values[path]

    def _handler(self):
        imds = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, method: str) -> None:
                status, body = imds._answer(method, self.path, self.headers)
                with imds.lock:
                    imds.requests.append((method, self.path, status))
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._reply("GET")

            def do_PUT(self):
                self._reply("PUT")

            def log_message(self, *args):  # quiet: the tests read `requests` instead
                pass

        return Handler
