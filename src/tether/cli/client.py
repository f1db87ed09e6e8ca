"""The CLI's HTTP client: finds the server (``TETHER_ADDR``), authenticates as the local user.

``TETHER_ADDR`` may be ``http://HOST:PORT``, ``HOST:PORT`` or ``unix:/path/to/tether.sock``.
Unset, the CLI uses the data directory's unix socket when a server is listening there, and the
configured TCP address otherwise. The user's token is obtained by exchanging the local
credential (``credentials/<user>`` in the data dir) and cached beside it (0600) until it is a
minute from expiry.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import httpx

from tether.config import DataDir, write_private
from tether.errors import AuthenticationError, ConfigError, TetherError
from tether.identity.exchange import GRANT_TYPE_TOKEN_EXCHANGE, TOKEN_TYPE_USER_CREDENTIAL
from tether.identity.jws import decode_unverified

__all__ = ["ApiClient", "ApiError"]

TIMEOUT = httpx.Timeout(10.0, connect=3.0)


class ApiError(TetherError):
    """An error the server returned, in its own words."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    def diagnostics(self) -> str:
        return f"{self.message} ({self.code}, HTTP {self.status})"


class ApiClient:
    def __init__(self, data_dir: DataDir, addr: str | None = None) -> None:
        self.data_dir = data_dir
        addr = addr or os.environ.get("TETHER_ADDR")
        if addr and addr.startswith("unix:"):
            self.target = addr
            transport = httpx.HTTPTransport(uds=addr[len("unix:") :].removeprefix("//"))
            base = "http://tether"
        elif addr:
            base = addr if "://" in addr else f"http://{addr}"
            self.target = base
            transport = httpx.HTTPTransport()
        elif data_dir.socket_path.exists():
            self.target = f"unix:{data_dir.socket_path}"
            transport = httpx.HTTPTransport(uds=str(data_dir.socket_path))
            base = "http://tether"
        else:
            base = f"http://{data_dir.load_config().listen}"
            self.target = base
            transport = httpx.HTTPTransport()
        self._http = httpx.Client(base_url=base, transport=transport, timeout=TIMEOUT)

    def __repr__(self) -> str:
        return f"ApiClient(target={self.target!r})"

    def close(self) -> None:
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        json_body: Any = None,
        form: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
    ) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            resp = self._http.request(
                method, path, headers=headers, json=json_body, data=form, params=params
            )
        except httpx.TransportError as e:
            raise TetherError(
                f"cannot reach the Tether server at {self.target} ({type(e).__name__})",
                hint="start it with 'tether serve', or set TETHER_ADDR",
            ) from e
        try:
            doc = resp.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            doc = None
        if resp.status_code >= 400:
            if isinstance(doc, dict) and "error" in doc:
                raise ApiError(
                    resp.status_code, str(doc["error"]), str(doc.get("error_description", ""))
                )
            raise ApiError(resp.status_code, "http_error", resp.text[:200])
        return doc

    # the local user -------------------------------------------------------------------------
    def _user(self) -> str:
        return os.environ.get("TETHER_USER") or self.data_dir.load_config().admin_user

    def user_token(self) -> str:
        user = self._user()
        cache = self.data_dir.credentials / f"{user}.jwt"
        try:
            token = cache.read_text().strip()
            _, payload = decode_unverified(token)
            if int(payload.get("exp", 0)) - time.time() > 60:
                return token
        except (OSError, TetherError, ValueError):
            pass
        cred_file = Path(
            os.environ.get("TETHER_CREDENTIAL_FILE") or self.data_dir.credentials / user
        )
        try:
            credential = cred_file.read_text().strip()
        except OSError as e:
            raise ConfigError(
                f"no local credential for user {user!r} at {cred_file}",
                hint="run 'tether init' or set TETHER_CREDENTIAL_FILE",
            ) from e
        doc = self.request(
            "POST",
            "/v1/token",
            form={
                "grant_type": GRANT_TYPE_TOKEN_EXCHANGE,
                "subject_token": credential,
                "subject_token_type": TOKEN_TYPE_USER_CREDENTIAL,
            },
        )
        token = str(doc["access_token"])
        try:
            tmp = cache.with_suffix(".tmp")
            write_private(tmp, token)
            tmp.replace(cache)
        except OSError:
            pass  # caching is an optimisation
        return token


def read_token_file(path: str) -> str:
    """A token from a file ("-" for stdin); accepts a raw token or the JSON `delegate` prints."""
    import sys

    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    text = text.strip()
    if text.startswith("{"):
        try:
            text = str(json.loads(text)["token"])
        except (ValueError, KeyError) as e:
            raise AuthenticationError(f"{path}: JSON without a 'token' field") from e
    if not text:
        raise AuthenticationError(f"{path} holds no token")
    return text
