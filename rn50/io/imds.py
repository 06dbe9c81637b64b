"""EC2's instance metadata service (IMDSv2), as the spot watcher and the spot price lookup ask it:
a session token from `PUT /latest/api/token`, then GETs carrying it. `RN50_IMDS_URL` points it at
another server (the tests' fake IMDS on loopback)."""
from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request

logger = logging.getLogger("rn50.imds")
IMDS_URL_ENV = "RN50_IMDS_URL"
DEFAULT_IMDS_URL = "http://169.254.169.254"


def imds_url() -> str:
    """The metadata service's base URL: $RN50_IMDS_URL, else EC2's link-local address."""
    return os.environ.get(IMDS_URL_ENV) or DEFAULT_IMDS_URL


class ImdsError(Exception):
    """The metadata service could not be reached, or refused a fresh token."""


class Imds:
    """An IMDSv2 client: one session token, fetched again when IMDS answers 401."""

    def __init__(self, base_url: str, timeout_s: float = 2.0, token_ttl_s: int = 21600):
        self.base_url, self.timeout_s = base_url.rstrip("/"), timeout_s
        self.token_ttl_s = token_ttl_s
        self._token = ""

    def _request(self, method: str, path: str, headers: dict) -> tuple[int, str]:
        request = urllib.request.Request(self.base_url + path, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.status, response.read().decode(errors="replace")
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(errors="replace")
        except (OSError, ValueError) as err:  # refused, timed out, no route, bad URL
            raise ImdsError(f"{method} {self.base_url}{path}: {err}") from err

    def _fetch_token(self) -> str:
        ttl = {"X-aws-ec2-metadata-token-ttl-seconds": str(self.token_ttl_s)}
        status, body = self._request("PUT", "/latest/api/token", ttl)
        if status != 200 or not body.strip():
            raise ImdsError(f"IMDS refused a session token (HTTP {status}): {body[:200]!r}")
        return body.strip()

    def get(self, path: str) -> tuple[int, str]:
        """(HTTP status, body) of a metadata GET; a token expired in between is fetched again."""
        for _ in range(2):
            if not self._token:
                self._token = self._fetch_token()
            status, body = self._request("GET", path, {"X-aws-ec2-metadata-token": self._token})
            if status != 401:
                return status, body
            self._token = ""  # expired or revoked: one fresh token, then believe the answer
        return status, body

    def text(self, path: str, quiet: bool = False) -> str:
        """The body of a metadata GET that must succeed ('' when it does not; `quiet`: off EC2
        that is expected, so it is not worth a warning)."""
        try:
            status, body = self.get(path)
        except ImdsError as err:
            (logger.debug if quiet else logger.warning)("%s", err)
            return ""
        return body.strip() if status == 200 else ""


