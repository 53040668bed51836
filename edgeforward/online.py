"""`check-config --online`: do the ports exist and does the cloud accept each token, without sending data."""

from __future__ import annotations

import asyncio
import glob
import os
from urllib.parse import urlsplit

from .blynk import BlynkClient, RateLimiter, RefusedError, TransientError, open_session
from .config import Config
from .redact import redact

PORT_CONNECT_TIMEOUT_S = 3.0


async def check_online(config: Config) -> list[str]:
    """Return one line per problem found (empty when every port exists and every token is accepted)."""
    problems = [problem for port in config.ports if (problem := await _port_problem(port.path)) is not None]
    async with open_session(config.cloud.ca_file) as session:
        for index, device in enumerate(config.devices):
            client = BlynkClient(
                session, config.cloud.server, device.token, timeout_s=config.cloud.timeout_s, limiter=RateLimiter(1)
            )
            try:
                await client.is_hardware_connected()
            except RefusedError as exc:
                problems.append(f"device[{index}].token: the cloud refused it for {device.name}: {exc.message}")
            except TransientError as exc:
                problems.append(f"cloud.server: cannot reach {client.server} for {device.name}: {exc}")
            else:
                print(redact(f"device {device.name}: token accepted by {client.server}"))
    return problems


async def _port_problem(path: str) -> str | None:
    if "://" in path:
        try:
            parts = urlsplit(path)
            port = parts.port
        except ValueError:
            return f"port {path}: not a valid URL (host or port)"
        if parts.scheme not in ("socket", "rfc2217") or not parts.hostname or not port:
            return None
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, port), PORT_CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            return f"port {path}: cannot connect: {exc}"
        writer.close()
        return None
    return _device_problem(path)


def _device_problem(path: str) -> str | None:
    matches = glob.glob(path) if glob.has_magic(path) else ([path] if os.path.exists(path) else [])
    if len(matches) != 1:
        return f"port {path}: {'no device' if not matches else f'{len(matches)} devices'} found"
    print(redact(f"port {path}: present ({os.path.realpath(matches[0])})"))
    return None
