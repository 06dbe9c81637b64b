"""A fake EC2 API on loopback answering `DescribeSpotPriceHistory`, for the cost tests.

A real HTTP server speaking EC2's query protocol: a form-encoded POST (`Action=...`,
`InstanceType.N=...`), answered with the XML EC2 writes. Any other action gets EC2's error XML."""
from __future__ import annotations

import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from xml.sax.saxutils import escape

ITEM = ("<item><instanceType>{InstanceType}</instanceType>"
        "<productDescription>{ProductDescription}</productDescription>"
        "<spotPrice>{SpotPrice}</spotPrice><timestamp>{Timestamp}</timestamp>"
        "<availabilityZone>{AvailabilityZone}</availabilityZone></item>")


class FakeEc2:
    """EC2's spot price history from `history` (dicts with ITEM's fields); `url` once started."""

    def __init__(self, history: list[dict], refuse: bool = False):
        # refuse: answer every request as EC2 answers a bad key (401 AuthFailure)
        self.history, self.refuse = history, refuse
        self.requests: list[dict[str, list[str]]] = []  # the form fields of each request
        # The region each request was signed for (SigV4's credential scope, as EC2 reads it).
        self.regions: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FakeEc2":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, form: dict[str, list[str]]) -> tuple[int, str]:
        """(status, XML body) for one request's form fields."""
        self.requests.append(form)
        if self.refuse:
            return 401, ("<Response><Errors><Error><Code>AuthFailure</Code><Message>AWS was not "
                         "able to validate the provided access credentials</Message></Error>"
                         "</Errors><RequestID>r-1</RequestID></Response>")
        if form.get("Action") != ["DescribeSpotPriceHistory"]:
            return 400, ("<Response><Errors><Error><Code>InvalidAction</Code><Message>not faked"
                         "</Message></Error></Errors><RequestID>r-1</RequestID></Response>")
        wanted = {v for k, v in _pairs(form) if k.startswith("InstanceType.")}
        items = "".join(ITEM.format(**{k: escape(str(v)) for k, v in item.items()})
                        for item in self.history if item["InstanceType"] in wanted)
        return 200, ('<?xml version="1.0" encoding="UTF-8"?>\n<DescribeSpotPriceHistoryResponse '
                     'xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>r-1</requestId>'
                     f"<spotPriceHistorySet>{items}</spotPriceHistorySet><nextToken/>"
                     "</DescribeSpotPriceHistoryResponse>")

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                scope = self.headers.get("Authorization", "").split("Credential=", 1)[-1]
                fake.regions.append(scope.split("/")[2] if scope.count("/") >= 3 else "")
                status, body = fake.answer(form)
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/xml;charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # quiet test output
                pass
        return Handler


def _pairs(form: dict[str, list[str]]):
    return ((key, value) for key, values in form.items() for value in values)
