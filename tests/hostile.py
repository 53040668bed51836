"""A real HTTP server on loopback that answers each token with its own hostile behaviour."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from aiohttp import web

# mode -> how the server answers a request carrying a token in that mode. {qs} is the request's path and query
# (the token included), {token} the token, {port}/{tls_port} the server's own plain and TLS ports.
REDIRECTS: Mapping[str, str] = {
    "redirect_port_out_of_range": "http://127.0.0.1:99999{qs}",
    "redirect_broken_ipv6": "http://[::1{qs}",
    "redirect_empty_host": "http://:0{qs}",
    "redirect_userinfo": "http://edge:{token}@127.0.0.1:{port}{qs}",
    "redirect_ftp": "ftp://127.0.0.1:{port}{qs}",
    "redirect_relative": "{qs}",
    "redirect_tls_to_plain_server": "https://127.0.0.1:{port}{qs}",
    "redirect_untrusted_tls": "https://127.0.0.1:{tls_port}{qs}",
}
ANSWERS = (
    "echo_invalid_token",  # 400 "Invalid token." followed by the URL and the token: parks the device
    "echo_unknown_400",  # 400 with an unknown message echoing the URL: refused, bisected, dead-lettered
    "echo_500",  # 500 whose body is the URL and the token
    "echo_429",  # 429 with the token as Retry-After and the URL as body
    "reset",  # the connection is dropped without an answer
)
MODES = (*REDIRECTS, *ANSWERS)


@dataclass
class HostileServer:
    """Plain http on `port`, the same app over TLS (an untrusted certificate) on `tls_port`."""

    modes: dict[str, str] = field(default_factory=dict)  # token -> mode
    default: str = "reset"
    tls_context: ssl.SSLContext | None = None
    port: int = 0
    tls_port: int = 0
    seen: list[str] = field(default_factory=list)  # the modes of the requests that arrived
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> HostileServer:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._answer)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        if self.tls_context is not None:
            tls_site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.tls_context)
            await tls_site.start()
            self.tls_port = self._runner.addresses[1][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        token = request.query.get("token", "")
        mode = self.modes.get(token, self.default)
        self.seen.append(mode)
        url = str(request.url)
        if mode in REDIRECTS:
            location = REDIRECTS[mode].format(qs=request.path_qs, token=token, port=self.port, tls_port=self.tls_port)
            return web.Response(status=308, headers={"Location": location})
        answer = _ANSWERS.get(mode)
        if answer is not None:
            return await answer(request, token, url)
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=503)


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    body = json.dumps({"error": {"message": message}})
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)


async def _invalid_token(_request: web.Request, token: str, url: str) -> web.Response:
    return _error(400, f"Invalid token. {url} ({token})")


async def _unknown(_request: web.Request, token: str, url: str) -> web.Response:
    return _error(400, f"Something new about {url} and {token}")


async def _server_error(_request: web.Request, token: str, url: str) -> web.Response:
    return web.Response(status=500, text=f"crashed on {url} for {token}")


async def _too_many(_request: web.Request, token: str, url: str) -> web.Response:
    return web.Response(status=429, text=f"slow down {url}", headers={"Retry-After": token})


async def _reset(request: web.Request, _token: str, _url: str) -> web.Response:
    if request.transport is not None:
        request.transport.abort()
    await asyncio.sleep(0)
    return web.Response(status=503)


_ANSWERS: Mapping[str, Callable[[web.Request, str, str], Awaitable[web.Response]]] = {
    "echo_invalid_token": _invalid_token,
    "echo_unknown_400": _unknown,
    "echo_500": _server_error,
    "echo_429": _too_many,
    "reset": _reset,
}
