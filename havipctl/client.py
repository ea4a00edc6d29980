"""HTTP client of the allocator API (docs/contract.md#http-api): one method per route, typed errors (see
errors.py).

It speaks only HTTP: it does not import the allocator's server modules. Every method returns the decoded JSON
together with the text exactly as received (`--json` prints that untouched), or None for 204 No Content.

An https:// allocator is verified — its certificate chain against the system's CAs, or against the CA file given
(`--cacert`, `HAVIP_CA_FILE`), and its host name — with TLS 1.2 at the oldest; there is no way to switch that off.
A failed verification is said in words (errors.certificate_problem) and nothing is sent.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx

from havipctl.errors import (
    HOST_MISMATCH,
    ApiError,
    AuthenticationFailed,
    ServerNotTrusted,
    UnexpectedResponse,
    Unreachable,
    UsageError,
    certificate_problem,
    tls_problem,
)

Json = dict[str, Any]

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_REQUEST_TIMEOUT_S = 30.0
USER_AGENT = "havipctl/0.1.0"


@dataclass(frozen=True, slots=True)
class Reply:
    """A successful answer: the JSON object, and the body as received."""

    body: Json
    raw: str
    replayed: bool = False  # Idempotent-Replayed: true (POST /v1/havips with a reused Idempotency-Key)

    @property
    def items(self) -> list[Json]:
        items = self.body.get("items")
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise UnexpectedResponse("unexpected answer from the allocator: a page without a list of items")
        return items

    @property
    def next_page_token(self) -> str | None:
        token = self.body.get("next_page_token")
        return token if isinstance(token, str) and token else None


class _Unset:
    """Marks an argument that was not given (as opposed to an explicit None/null)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


def display_url(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _segment(value: str) -> str:
    """One path segment, percent-encoded (an id is never allowed to change the path)."""
    return quote(value, safe="")


def _params(**values: object) -> dict[str, str]:
    params: dict[str, str] = {}
    for key, value in values.items():
        if value is None:
            continue
        params[key] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return params


def tls_context(ca_file: str | None = None) -> ssl.SSLContext:
    """The context havipctl verifies an https:// allocator with: the chain against the CA file given, else the
    system's CAs (OpenSSL's default locations; SSL_CERT_FILE and SSL_CERT_DIR move them), the host name, TLS 1.2 or
    later. ValueError in words when the CA file cannot be read or holds no certificate."""
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except FileNotFoundError:
        raise ValueError(f"{ca_file} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{ca_file} is a directory, not a file") from None
    except PermissionError:
        raise ValueError(f"{ca_file} cannot be read: permission denied") from None
    except ssl.SSLError:
        raise ValueError(f"{ca_file} holds no PEM certificate (-----BEGIN CERTIFICATE-----)") from None
    except OSError as exc:
        raise ValueError(f"{ca_file} cannot be read: {exc.strerror or exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _certificate_names(certificate: dict[str, Any]) -> list[str]:
    """The names and addresses a certificate (as SSLSocket.getpeercert decodes it) is for: its subjectAltName, else
    its subject's common name."""
    names = [str(value) for _, value in certificate.get("subjectAltName", ())]
    if names:
        return names
    return [str(value) for rdn in certificate.get("subject", ()) for key, value in rdn if key == "commonName"]


def _chain_of(exc: BaseException) -> Iterator[BaseException]:
    """The exception and its causes (httpx → httpcore → the socket's or ssl's own)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def ssl_error_in(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind a connection failure (httpx and aiormq wrap it), if one is."""
    return next((e for e in _chain_of(exc) if isinstance(e, ssl.SSLError)), None)


def _oserror_reason(exc: BaseException) -> str | None:
    for current in _chain_of(exc):
        if isinstance(current, ConnectionRefusedError):
            return "connection refused"
        if isinstance(current, socket.gaierror):
            return f"unknown host ({current.strerror or current})"
        if isinstance(current, OSError) and current.strerror:
            return current.strerror[0].lower() + current.strerror[1:]
    return None


class AllocatorClient:
    """Synchronous client of one allocator. Use as a context manager, or call close()."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
        ca_file: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.ca_file = ca_file
        # A transport given (tests: a mock) makes no connection of its own, so it needs no TLS context.
        verify = self.verifying_context() if transport is None else True
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            self._http = httpx.Client(
                base_url=self.url,
                headers=headers,
                timeout=httpx.Timeout(request_timeout, connect=connect_timeout),
                transport=transport,
                follow_redirects=False,
                verify=verify,
            )
        except (httpx.InvalidURL, httpx.UnsupportedProtocol, ValueError) as exc:
            raise UsageError(f"invalid allocator URL {display_url(url)!r}: {exc}") from None

    def verifying_context(self) -> ssl.SSLContext:
        """The context the allocator's certificate is verified with (chain, host name, TLS 1.2 or later)."""
        try:
            return tls_context(self.ca_file)
        except ValueError as exc:
            raise UsageError(f"CA file: {exc}") from None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AllocatorClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- transport ---------------------------------------------------------------------------------------

    def _send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Json | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply | None:
        try:
            response = self._http.request(method, path, params=params, json=body, headers=headers)
        except httpx.TimeoutException as exc:
            if isinstance(exc, httpx.ConnectTimeout):
                reason = f"connection timed out after {self.connect_timeout:g} s"
            else:
                reason = f"no answer within {self.request_timeout:g} s"
            raise Unreachable(f"cannot reach the allocator at {display_url(self.url)}: {reason}") from None
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
            raise UsageError(f"invalid allocator URL {display_url(self.url)!r}: {exc}") from None
        except httpx.RemoteProtocolError as exc:
            reason = _oserror_reason(exc) or f"the connection broke without an answer ({exc})"
            if self._address()[0] == "http" and self._speaks_tls():
                reason = f"the server speaks TLS on this port: use https://{self._netloc()}"
            raise Unreachable(f"cannot reach the allocator at {display_url(self.url)}: {reason}") from None
        except httpx.TransportError as exc:
            # A TLS error while connecting is the handshake's: the certificate, or the protocol.
            tls_error = ssl_error_in(exc) if isinstance(exc, httpx.ConnectError) else None
            if isinstance(tls_error, ssl.SSLCertVerificationError):
                problem = self._certificate_problem(tls_error)
                url = display_url(self.url)
                raise ServerNotTrusted(f"cannot verify the allocator at {url}: {problem}") from None
            if tls_error is not None:
                reason = tls_problem(tls_error)
            else:
                reason = _oserror_reason(exc) or str(exc) or type(exc).__name__
            raise Unreachable(f"cannot reach the allocator at {display_url(self.url)}: {reason}") from None
        return self._reply(response)

    # ---- TLS diagnostics ----------------------------------------------------------------------------------
    # Only to say what went wrong, after a request failed: each opens a connection of its own, completes the
    # handshake (or not) and closes it. No request is sent on them, no token, nothing of the user's.

    def _address(self) -> tuple[str, str, int]:
        parts = urlsplit(self.url)
        scheme = parts.scheme.lower()
        return scheme, parts.hostname or "", parts.port or (443 if scheme == "https" else 80)

    def _netloc(self) -> str:
        _, host, port = self._address()
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _handshake(self, context: ssl.SSLContext) -> dict[str, Any] | None:
        """The peer's certificate, decoded when `context` verifies it ({} when it does not); None when no TLS
        handshake completes."""
        _, host, port = self._address()
        try:
            with (
                socket.create_connection((host, port), timeout=self.connect_timeout) as raw,
                context.wrap_socket(raw, server_hostname=host) as tls,
            ):
                return tls.getpeercert() or {}
        except (OSError, ValueError):  # ssl.SSLError is an OSError
            return None

    def _speaks_tls(self) -> bool:
        """Whether the server at an http:// URL answers a TLS handshake instead (its certificate unverified: only
        the protocol is asked)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return self._handshake(context) is not None

    def _certificate_problem(self, error: ssl.SSLCertVerificationError) -> str:
        """What is wrong with the server's certificate; for a host name that does not match, the names it is for
        (read from a handshake that verifies the chain as before, but not the name)."""
        _, host, _ = self._address()
        names: list[str] | None = None
        if error.verify_code in HOST_MISMATCH:
            context = self.verifying_context()
            context.check_hostname = False
            certificate = self._handshake(context)
            names = _certificate_names(certificate) if certificate else None
        return certificate_problem(error, host=host, ca_file=self.ca_file, names=names)

    def _reply(self, response: httpx.Response) -> Reply | None:
        status = response.status_code
        if status == 204:
            return None
        text = response.text
        try:
            decoded: Any = json.loads(text) if text else None
        except ValueError:
            decoded = None
        error = _error_of(decoded)
        if status == 401:
            said = f" (the allocator said: {error.message})" if error is not None and error.message else ""
            raise AuthenticationFailed(f"authentication failed: check HAVIP_API_TOKEN / --token{said}")
        if status >= 400:
            if error is not None:
                raise ApiError(status, error.code, error.message, error.details)
            snippet = " ".join(text.split())[:200] or response.reason_phrase or "no body"
            raise ApiError(status, f"HTTP_{status}", snippet)
        if not isinstance(decoded, dict):
            kind = "not a JSON object" if text else "an empty body"
            raise UnexpectedResponse(
                f"unexpected answer from {display_url(self.url)} (HTTP {status}, {kind}): is this the allocator?"
            )
        return Reply(decoded, text, replayed=response.headers.get("Idempotent-Replayed", "").lower() == "true")

    def _get(self, path: str, params: Mapping[str, str] | None = None) -> Reply:
        return _required(self._send("GET", path, params=params))

    # ---- VPCs -------------------------------------------------------------------------------------------

    def create_vpc(self, name: str, cidr: str) -> Reply:
        return _required(self._send("POST", "/v1/vpcs", body={"name": name, "cidr": cidr}))

    def list_vpcs(self, *, limit: int | None = None, page_token: str | None = None) -> Reply:
        return self._get("/v1/vpcs", _params(limit=limit, page_token=page_token))

    def get_vpc(self, vpc_id: str) -> Reply:
        return self._get(f"/v1/vpcs/{_segment(vpc_id)}")

    def delete_vpc(self, vpc_id: str) -> None:
        self._send("DELETE", f"/v1/vpcs/{_segment(vpc_id)}")

    # ---- subnets ----------------------------------------------------------------------------------------

    def create_subnet(
        self, vpc_id: str, name: str, cidr: str, *, segment: str | None = None, vlan: int | None = None
    ) -> Reply:
        body: dict[str, Any] = {"vpc_id": vpc_id, "name": name, "cidr": cidr}
        if segment is not None:
            body["segment"] = segment
        if vlan is not None:
            body["vlan"] = vlan
        return _required(self._send("POST", "/v1/subnets", body=body))

    def list_subnets(
        self, *, vpc_id: str | None = None, limit: int | None = None, page_token: str | None = None
    ) -> Reply:
        return self._get("/v1/subnets", _params(vpc_id=vpc_id, limit=limit, page_token=page_token))

    def get_subnet(self, subnet_id: str) -> Reply:
        return self._get(f"/v1/subnets/{_segment(subnet_id)}")

    def delete_subnet(self, subnet_id: str) -> None:
        self._send("DELETE", f"/v1/subnets/{_segment(subnet_id)}")

    # ---- instances --------------------------------------------------------------------------------------

    def register_instance(self, subnet_id: str, name: str, private_ip: str, mac: str) -> Reply:
        body = {"subnet_id": subnet_id, "name": name, "private_ip": private_ip, "mac": mac}
        return _required(self._send("POST", "/v1/instances", body=body))

    def list_instances(
        self,
        *,
        vpc_id: str | None = None,
        subnet_id: str | None = None,
        limit: int | None = None,
        page_token: str | None = None,
    ) -> Reply:
        params = _params(vpc_id=vpc_id, subnet_id=subnet_id, limit=limit, page_token=page_token)
        return self._get("/v1/instances", params)

    def get_instance(self, instance_id: str) -> Reply:
        return self._get(f"/v1/instances/{_segment(instance_id)}")

    def deregister_instance(self, instance_id: str, *, force: bool = False) -> None:
        params = _params(force=True) if force else None
        self._send("DELETE", f"/v1/instances/{_segment(instance_id)}", params=params)

    # ---- HAVIPs -----------------------------------------------------------------------------------------

    def allocate_havip(
        self,
        subnet_id: str,
        *,
        name: str | None = None,
        address: str | None = None,
        candidates: Sequence[str] = (),
        idempotency_key: str | None = None,
    ) -> Reply:
        body: Json = {"subnet_id": subnet_id}
        if name is not None:
            body["name"] = name
        if address is not None:
            body["address"] = address
        if candidates:
            body["candidates"] = list(candidates)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else None
        return _required(self._send("POST", "/v1/havips", body=body, headers=headers))

    def list_havips(
        self,
        *,
        vpc_id: str | None = None,
        subnet_id: str | None = None,
        state: str | None = None,
        address: str | None = None,
        limit: int | None = None,
        page_token: str | None = None,
    ) -> Reply:
        params = _params(
            vpc_id=vpc_id, subnet_id=subnet_id, state=state, address=address, limit=limit, page_token=page_token
        )
        return self._get("/v1/havips", params)

    def get_havip(self, havip_id: str) -> Reply:
        return self._get(f"/v1/havips/{_segment(havip_id)}")

    def update_havip(
        self,
        havip_id: str,
        *,
        name: str | None = UNSET,
        candidates: Sequence[str] = UNSET,
        force: bool = False,
    ) -> Reply:
        """PATCH: only the fields given are sent (name=None sends null: the name is removed)."""
        body: Json = {}
        if name is not UNSET:
            body["name"] = name
        if candidates is not UNSET:
            body["candidates"] = list(candidates)
        params = _params(force=True) if force else None
        return _required(self._send("PATCH", f"/v1/havips/{_segment(havip_id)}", body=body, params=params))

    def release_havip(self, havip_id: str, *, force: bool = False) -> None:
        params = _params(force=True) if force else None
        self._send("DELETE", f"/v1/havips/{_segment(havip_id)}", params=params)

    def associate_eip(self, havip_id: str, *, address: str | None = None) -> Reply | None:
        body: Json = {} if address is None else {"address": address}
        return self._send("POST", f"/v1/havips/{_segment(havip_id)}/eip", body=body)

    def dissociate_eip(self, havip_id: str) -> Reply | None:
        return self._send("DELETE", f"/v1/havips/{_segment(havip_id)}/eip")

    def list_transitions(self, havip_id: str, *, limit: int | None = None, page_token: str | None = None) -> Reply:
        params = _params(limit=limit, page_token=page_token)
        return self._get(f"/v1/havips/{_segment(havip_id)}/transitions", params)

    # ---- audit ------------------------------------------------------------------------------------------

    def list_rejected_claims(
        self, *, havip_id: str | None = None, limit: int | None = None, page_token: str | None = None
    ) -> Reply:
        return self._get("/v1/claims/rejected", _params(havip_id=havip_id, limit=limit, page_token=page_token))


# ---- pages --------------------------------------------------------------------------------------------------

PageFetch = Callable[[str | None], Reply]


def pages(fetch: PageFetch, page_token: str | None = None) -> Iterator[Reply]:
    """Every page from `page_token` on, following next_page_token (a token seen twice stops the walk)."""
    seen: set[str] = set()
    while True:
        page = fetch(page_token)
        yield page
        page_token = page.next_page_token
        if page_token is None or page_token in seen:
            return
        seen.add(page_token)


def all_pages(fetch: PageFetch, page_token: str | None = None) -> Reply:
    """The items of every page as one page, in the API's shape, with next_page_token null."""
    items: list[Json] = []
    for page in pages(fetch, page_token):
        items.extend(page.items)
    body: Json = {"items": items, "next_page_token": None}
    return Reply(body, json.dumps(body, ensure_ascii=False, separators=(",", ":")))


# ---- helpers ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ErrorBody:
    code: str
    message: str
    details: list[Any] | None


def _error_of(decoded: Any) -> _ErrorBody | None:
    """The code, message and details of an `{"error": {"code", "message", "details"?}}` body; None otherwise."""
    if not isinstance(decoded, dict):
        return None
    error = decoded.get("error")
    if not isinstance(error, dict) or not isinstance(error.get("code"), str):
        return None
    message = error.get("message")
    details = error.get("details")
    return _ErrorBody(
        error["code"],
        " ".join(str(message).split()) if message is not None else "",
        details if isinstance(details, list) and details else None,
    )


def _required(reply: Reply | None) -> Reply:
    if reply is None:
        raise UnexpectedResponse("unexpected answer from the allocator: no content where a resource was expected")
    return reply
