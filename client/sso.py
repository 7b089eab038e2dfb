"""Single sign-on for `pushgate-client connect --sso`: OpenID Connect's authorization
code flow with PKCE and a loopback redirect (RFC 8252, what native apps use).

The auth service says where the provider is and issues the nonce (BeginSso); we print
the provider's URL (and open a browser when we can), listen on 127.0.0.1 for the
redirect, redeem the code at the provider's token endpoint as a public client (the
PKCE verifier proves we started the flow), and hand the ID token to the auth service,
which validates it (auth_service/oidc.py). The ID token is never logged or kept.
"""

import asyncio
import base64
import contextlib
import hashlib
import json
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
import webbrowser
from collections.abc import Callable
from dataclasses import dataclass

from pushgate_api import auth_pb2

from .auth import AuthClient, ClientError, ClientSession

REDIRECT_PATH = "/callback"
HTTP_TIMEOUT_SECONDS = 10.0
MAX_REQUEST_BYTES = 8192
PAGE = (
    "<!doctype html><meta charset=utf-8><title>pushgate</title>"
    "<p>{}</p><p>You can close this window.</p>"
)


@dataclass(frozen=True)
class SsoOptions:
    open_browser: bool = True  # also print the URL, always
    redirect_port: int = 0  # 127.0.0.1 port for the redirect; 0: any free one
    announce: Callable[[str], None] = print  # shows the person the URL to open


def pkce_pair() -> tuple[str, str]:
    """A PKCE code verifier and its S256 challenge (RFC 7636)."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def authorization_url(
    begin: auth_pb2.BeginSsoResponse, redirect_uri: str, state: str, challenge: str
) -> str:
    query = urllib.parse.urlencode(
        {
            "response_type": "code",
            "client_id": begin.client_id,
            "redirect_uri": redirect_uri,
            "scope": " ".join(begin.scopes),
            "state": state,
            "nonce": begin.nonce,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
    )
    separator = "&" if "?" in begin.authorization_endpoint else "?"
    return begin.authorization_endpoint + separator + query


def callback_result(target: str, state: str) -> tuple[str | None, str | None]:
    """(code, None) from the redirect's request target, or (None, what went wrong);
    (None, None) if it is no redirect of ours (e.g. a browser's /favicon.ico)."""
    parsed = urllib.parse.urlsplit(target)
    if parsed.path != REDIRECT_PATH:
        return None, None
    query = urllib.parse.parse_qs(parsed.query)
    if query.get("state", [""])[0] != state:
        return None, None  # not the answer to our request: ignored, keep waiting
    if "error" in query:
        description = query.get("error_description", [""])[0]
        return None, f"the provider refused: {query['error'][0]} {description}".strip()
    code = query.get("code", [""])[0]
    return (code, None) if code else (None, "the provider's redirect carries no code")


class LoopbackReceiver:
    """An HTTP listener on 127.0.0.1 that waits for the provider's redirect."""

    def __init__(self, state: str, port: int = 0) -> None:
        self.state = state
        self.port = port
        self._result: asyncio.Future = asyncio.get_running_loop().create_future()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> "LoopbackReceiver":
        try:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        except OSError as error:
            raise ClientError(
                f"cannot listen on 127.0.0.1:{self.port} for the sign-in redirect: "
                f"{error.strerror}",
                retryable=False,
            ) from None
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.close()
        with contextlib.suppress(Exception):
            await self._server.wait_closed()

    @property
    def redirect_uri(self) -> str:
        return f"http://127.0.0.1:{self.port}{REDIRECT_PATH}"

    async def code(self, timeout: float) -> str:
        try:
            code, problem = await asyncio.wait_for(asyncio.shield(self._result), timeout)
        except TimeoutError:
            raise ClientError("single sign-on was not completed in time", retryable=False) from None
        if problem:
            raise ClientError(f"single sign-on failed: {problem}", retryable=False)
        return code

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HTTP_TIMEOUT_SECONDS)
            parts = head[:MAX_REQUEST_BYTES].split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            target = parts[1] if len(parts) == 3 and parts[0] == "GET" else ""
            code, problem = callback_result(target, self.state)
            if code is None and problem is None:
                status, text = "404 Not Found", "Not a pushgate sign-in."
            else:
                status = "200 OK"
                text = "pushgate: signed in." if code else "pushgate: sign-in failed."
                if not self._result.done():
                    self._result.set_result((code, problem))
            body = PAGE.format(text).encode()
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()


def redeem(begin: auth_pb2.BeginSsoResponse, code: str, verifier: str, redirect: str) -> str:
    """The ID token for an authorization code (a public client: PKCE; the client
    secret only where the provider gives native apps a public one)."""
    token_endpoint = begin.token_endpoint
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect,
        "client_id": begin.client_id,
        "code_verifier": verifier,
    }
    if begin.client_secret:
        form["client_secret"] = begin.client_secret
    body = urllib.parse.urlencode(form).encode()
    request = urllib.request.Request(
        token_endpoint,
        data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_SECONDS) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as error:
        try:
            said = json.load(error).get("error", error.reason)
        except (ValueError, AttributeError):
            said = error.reason
        raise ClientError(
            f"the provider refused the sign-in code at {token_endpoint}: {said}", retryable=False
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise ClientError(
            f"cannot reach the provider's token endpoint {token_endpoint}: "
            f"{getattr(error, 'reason', error)}",
            retryable=True,
        ) from None
    id_token = answer.get("id_token") if isinstance(answer, dict) else None
    if not isinstance(id_token, str) or not id_token:
        raise ClientError("the provider answered without an ID token", retryable=False)
    return id_token


async def sso_login(auth: AuthClient, options: SsoOptions) -> ClientSession:
    """Sign in at the provider the auth service names, and log in with the ID token."""
    begin = await auth.begin_sso()
    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(16)
    async with LoopbackReceiver(state, options.redirect_port) as receiver:
        url = authorization_url(begin, receiver.redirect_uri, state, challenge)
        options.announce(f"sign in at your identity provider (a browser may open):\n  {url}")
        if options.open_browser:
            with contextlib.suppress(Exception):  # no browser here: the URL was printed
                await asyncio.get_running_loop().run_in_executor(None, webbrowser.open, url)
        left = begin.nonce_expires_at_unix_ms / 1000 - time.time()  # then the nonce is gone
        code = await receiver.code(max(left, 1.0))
    id_token = await asyncio.get_running_loop().run_in_executor(
        None, redeem, begin, code, verifier, receiver.redirect_uri
    )
    return await auth.login_sso(id_token)
