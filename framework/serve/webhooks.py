"""Webhook URLs: which ones the server may call, and one delivery attempt.

A caller picks the webhook URL, so without a check the server would POST
wherever it is told, internal services included. A URL is accepted only
when every address its host resolves to is public, or allowed by
`server.webhook_allow`; the check is made after DNS resolution, and the
attempt then connects to the very address that was checked (the Host header
and TLS name stay the URL's), so a name that resolves differently a moment
later cannot redirect it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from framework.errors import BadRequest, ConfigError

if TYPE_CHECKING:  # imported where used: the server starts sooner without it
    import httpx

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Retried: the receiver may be back, or less busy, later. Any other answer is final.
RETRY_STATUSES = {429}


class Allow:
    """`server.webhook_allow`: host names, addresses and networks exempt from the check."""

    def __init__(self, entries: list[str]) -> None:
        self.hosts: set[str] = set()
        self.networks: list[Network] = []
        for entry in entries:
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                if not entry or any(c in entry for c in "/: "):
                    raise ConfigError(
                        f"server.webhook_allow: {entry!r} is neither a host name, an address nor a "
                        "network; write e.g. hooks.internal, 10.0.0.5 or 10.0.0.0/8"
                    ) from None
                self.hosts.add(entry.lower().rstrip("."))

    def allows(self, host: str, address: Address) -> bool:
        return host in self.hosts or any(address in net for net in self.networks)


def _public(address: Address) -> bool:
    # is_global is False for loopback, private, link-local (the cloud metadata address
    # 169.254.169.254 among them), shared (100.64/10), reserved and unspecified ranges.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


@dataclass(frozen=True)
class Target:
    url: httpx.URL
    host: str
    address: str


def check(url: object, allow: Allow) -> Target:
    """The URL's target, resolved and checked; raises BadRequest saying why not.

    Blocking (DNS): call it on a thread.
    """
    if not isinstance(url, str):
        raise BadRequest(f'"response_webhook" must be a URL string, got {url!r}')
    import httpx

    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise BadRequest(f'"response_webhook" {url!r} is not a valid URL ({exc})') from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise BadRequest(f'"response_webhook" must be an http:// or https:// URL with a host, got {url!r}')
    host = parsed.host.lower().rstrip(".")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise BadRequest(f'"response_webhook" host {host!r} does not resolve ({exc}); check the URL') from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    refused = [a for a in addresses if not _public(a) and not allow.allows(host, a)]
    if refused or not addresses:
        raise BadRequest(
            f'"response_webhook" host {host!r} resolves to {refused[0] if refused else "nothing"}, '
            "a loopback, private, link-local or reserved address, which this server does not call; "
            "use a public URL, or have an operator list the host in server.webhook_allow"
        )
    return Target(parsed, host, str(addresses[0]))


async def check_async(url: object, allow: Allow) -> Target:
    return await asyncio.to_thread(check, url, allow)


@dataclass
class Outcome:
    """One attempt: `ok`, or why not and whether another attempt may do better."""

    ok: bool
    retry: bool
    status: int | None
    error: str
    kind: str  # the metrics' outcome label

    def as_doc(self) -> dict[str, Any]:
        return {"ok": self.ok, "status": self.status, "error": self.error}


def delivery_client() -> httpx.AsyncClient:
    """The client deliveries are made with."""
    import httpx

    # No redirects: a receiver could otherwise send the answer on to an address never checked.
    # No kept-alive connections: one to a checked address must not carry another host's call.
    return httpx.AsyncClient(follow_redirects=False, trust_env=False,
                             limits=httpx.Limits(max_keepalive_connections=0))


async def attempt(client: httpx.AsyncClient, url: str, allow: Allow, body: bytes, batch_id: str,
                  timeout: float) -> Outcome:
    """POST `body` to the webhook once, to the address checked just before."""
    import httpx

    try:
        target = await check_async(url, allow)
    except BadRequest as exc:  # the name now resolves somewhere it may not: final
        return Outcome(False, False, None, str(exc), "refused")
    pinned = target.url.copy_with(host=target.address)
    headers = {"host": target.url.netloc.decode("ascii"), "content-type": "application/json",
               "x-mb-batch-id": batch_id}
    extensions = {"sni_hostname": target.host} if target.url.scheme == "https" else {}
    try:
        resp = await client.post(pinned, content=body, headers=headers, timeout=timeout,
                                 extensions=extensions)
    except httpx.TimeoutException:
        return Outcome(False, True, None, f"no answer within {timeout:g} s", "timeout")
    except httpx.TransportError as exc:
        return Outcome(False, True, None, f"{type(exc).__name__}: {exc}", "connection_error")
    if 200 <= resp.status_code < 300:
        return Outcome(True, False, resp.status_code, "", "ok")
    retry = resp.status_code >= 500 or resp.status_code in RETRY_STATUSES
    return Outcome(False, retry, resp.status_code, f"HTTP {resp.status_code}",
                   f"http_{resp.status_code // 100}xx")


def shown(url: str) -> str:
    """The URL without its query string, which may carry the receiver's secret token."""
    return url.split("?", 1)[0]
