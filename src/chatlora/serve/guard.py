"""What stands between the network and the server's routes: nothing a client sends, slowly, in bulk
or with a forged name, can exhaust the server or reach a route it should not.

- `Guard` (ASGI middleware): the Host check of a keyless server (a web page that renamed an attacker's
  domain to 127.0.0.1, "DNS rebinding", must not reach it), the API key on every route but /health, and
  the request body read up to its limit within a time limit (413 as soon as the limit is passed, even
  for a body without a declared length; 408 for a body that does not arrive), then handed on.
- `guarded_protocol` (uvicorn's HTTP/1.1 protocol with two additions): a connection whose request head
  is not complete within `header_timeout_s` is closed, and connections beyond `max_connections` are
  closed as they arrive, so half-sent requests cannot hold the server's file descriptors.
- `RepeatFilter` (logging): the same message (and the same exception) is logged at most a few times a
  minute, then counted, so a flood of failing connections cannot fill a disk with one traceback.

    app = Guard(app, api_key=None, hosts=LOOPBACK_NAMES, max_body_bytes=1_000_000, body_timeout_s=30)
    uvicorn.Config(app, http=guarded_protocol(header_timeout_s=10, max_connections=1000))

And before the server starts: the API key (`resolve_api_key`: an empty key or key file is refused),
the bind address (`check_bind`: a non-loopback address needs a key) and the listening socket
(`listen`: made before the model loads, so a port in use is said at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import ipaddress
import json
import logging
import os
import socket
import time
from base64 import b64decode
from pathlib import Path

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from chatlora.errors import UserError

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
log = logging.getLogger(__name__)


async def send_error(send, status: int, message: str, kind: str = "invalid_request_error", param=None,
                     headers: dict | None = None, close: bool = False) -> None:
    """An error response in OpenAI's shape, sent directly on an ASGI channel."""
    body = json.dumps({"error": {"message": message, "type": kind, "param": param, "code": None}}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    if close:   # the rest of the request is not read: the connection cannot carry another one
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def host_name(header: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1', 'Example.com.' -> 'example.com'."""
    if header.startswith("["):
        return header[1:].partition("]")[0].lower()
    return header.rpartition(":")[0].lower().rstrip(".") if header.count(":") == 1 else header.lower().rstrip(".")


def authorized(header: str, key: str) -> bool:
    """`Authorization: Bearer KEY`, or Basic with KEY as the password (the browser's login prompt)."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "basic":
        try:
            value = b64decode(value, validate=True).decode("utf-8").partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.encode("utf-8", "surrogatepass"), key.encode("utf-8"))


class Guard:
    def __init__(self, app, api_key: str | None, hosts: frozenset | None, max_body_bytes: int,
                 body_timeout_s: float):
        """`hosts`: the names a request's Host may give (None: any; a server with a key needs no list)."""
        self.app, self.api_key, self.hosts = app, api_key, hosts
        self.max_body_bytes, self.body_timeout_s = max_body_bytes, body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.hosts is not None and "host" in headers and host_name(headers["host"]) not in self.hosts:
            return await send_error(send, 403, "this server answers to localhost only (a request for another "
                                    "name is refused); serve with an API key to accept other names",
                                    kind="permission_error", close=True)
        if self.api_key and scope["path"] != "/health" and not authorized(headers.get("authorization", ""),
                                                                          self.api_key):
            return await send_error(send, 401, "missing or wrong API key (Authorization: Bearer KEY)",
                                    kind="authentication_error", headers={"WWW-Authenticate": 'Basic realm="chatlora"'},
                                    close=True)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await send_error(send, 413, f"request body over {self.max_body_bytes} bytes", close=True)
        body = await self._read_body(receive, send)
        if body is None:
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()   # after the body: waits for the client to go away (http.disconnect)

        await self.app(scope, replay, send)

    async def _read_body(self, receive, send) -> bytes | None:
        """The whole body, or None after answering 413/408 (or when the client left)."""
        chunks, size = [], 0
        deadline = time.monotonic() + self.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                await send_error(send, 408, f"the request body did not arrive within {self.body_timeout_s:g} s",
                                 close=True)
                return None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:   # stop reading here, whatever the client meant to send
                await send_error(send, 413, f"request body over {self.max_body_bytes} bytes", close=True)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type:
    """uvicorn's h11 protocol class with a request-head timeout and a cap on open connections."""

    class GuardedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning("%d connections are open, the limit: new connections are closed at once",
                            max_connections)
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self._arm()       # part of a request head: it must be complete in time
            else:
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(header_timeout_s, self._head_expired)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_expired(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


class RepeatFilter(logging.Filter):
    """Lets the same record (logger, message template, exception type) through at most `burst` times
    per `window_s` seconds; the next one let through says how many were held back."""

    def __init__(self, burst: int = 5, window_s: float = 60.0):
        super().__init__()
        self.burst, self.window_s = burst, window_s
        self.seen: dict[tuple, list] = {}   # key -> [window start, count in window, held back]

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else None
        key = (record.name, str(record.msg), exc)
        now = time.monotonic()
        entry = self.seen.setdefault(key, [now, 0, 0])
        if now - entry[0] > self.window_s:
            entry[0], entry[1] = now, 0
        entry[1] += 1
        if entry[1] > self.burst:
            entry[2] += 1
            return False
        if entry[2]:
            record.msg = f"{record.msg} (and {entry[2]} more like it, not logged)"
            entry[2] = 0
        if len(self.seen) > 10_000:   # bounded: old keys go
            self.seen = {k: v for k, v in self.seen.items() if now - v[0] <= self.window_s}
        return True


def limit_repeats(logger_names=("uvicorn", "uvicorn.error", "uvicorn.access", "chatlora")) -> RepeatFilter:
    """One RepeatFilter on every handler of these loggers and of the root (a root handler is added
    where there is none, so that asyncio's own errors go through it too)."""
    repeat = RepeatFilter()
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(name)s: %(message)s"))
        root.addHandler(handler)
    for logger in [root] + [logging.getLogger(n) for n in logger_names]:
        for handler in logger.handlers:
            if not any(isinstance(f, RepeatFilter) for f in handler.filters):
                handler.addFilter(repeat)
    return repeat


# ---------------------------------------------------------------- before the server starts


def resolve_api_key(key: str | None, key_file: str | None) -> str | None:
    if key_file:
        try:
            key = Path(key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read the API key file {key_file}: {getattr(e, 'strerror', None) or e}") from None
        if not key:
            raise UserError(f"the API key file {key_file} is empty; refusing to start without the key it "
                            f"should hold")
    elif key is not None and not key.strip():
        raise UserError("--api-key is empty; refusing to start without the key it should give")
    key = key or os.environ.get("CHATLORA_API_KEY") or None
    if key is not None and len(key) < 8:
        raise UserError("the API key must be at least 8 characters")
    return key


def check_bind(host: str, api_key: str | None) -> None:
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not api_key:
        raise UserError(f"refusing to listen on {host} without an API key: anyone who can reach it could use "
                        f"the model. Set CHATLORA_API_KEY, or pass --api-key-file (or --api-key).")


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, made before the model loads, so that a port in use is said at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use (another server?); pick another --port") from None
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def connection_limit(wanted: int) -> int:
    """`wanted`, or less where the process may not open that many files (the soft limit is raised
    to the hard one first)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted + 256:
        target = hard if hard == resource.RLIM_INFINITY else min(hard, wanted + 256)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return wanted if soft == resource.RLIM_INFINITY else max(16, min(wanted, soft - 256))
