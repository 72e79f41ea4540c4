"""TLS to the broker: `rediss://` and `amqps://` URLs, the server verified against a CA.

One rule for both brokers: a TLS URL verifies the server's certificate *and* its name
(the URL's host must be in the certificate), against the CA file the playbooks generated
(TTG_BROKER_CA_FILE) or, without one, the system's trust store. TLS 1.2 at least. A CA file
with a plain URL is a configuration error, not a silent downgrade.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import urlsplit

from ttg.errors import ConfigError

TLS_SCHEMES = frozenset({"rediss", "amqps"})


def is_tls(url: str) -> bool:
    return urlsplit(url).scheme in TLS_SCHEMES


def check_ca_file(url: str, ca_file: str | None) -> None:
    """One clear line for a CA file that cannot be used with this URL."""
    if not ca_file:
        return
    scheme = urlsplit(url).scheme
    if scheme not in TLS_SCHEMES:
        raise ConfigError(
            f"a broker CA file is set (TTG_BROKER_CA_FILE={ca_file}) but the broker URL is "
            f"plain {scheme}://: use {scheme}s:// for TLS, or unset the CA file")
    try:
        ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot use the broker CA file {ca_file}: {exc}") from exc


def client_context(ca_file: str | None) -> ssl.SSLContext:
    """A client context that verifies the server's certificate chain and host name."""
    ctx = ssl.create_default_context(cafile=ca_file or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def redis_kwargs(url: str, ca_file: str | None) -> dict[str, Any]:
    """redis-py's TLS options for a `rediss://` URL (none for a plain one)."""
    if urlsplit(url).scheme != "rediss":
        return {}
    kwargs: dict[str, Any] = {"ssl_cert_reqs": "required", "ssl_check_hostname": True,
                              "ssl_min_version": ssl.TLSVersion.TLSv1_2}
    if ca_file:
        kwargs["ssl_ca_certs"] = ca_file
    return kwargs


def refusal(exc: BaseException, what: str, ca_file: str | None) -> ConfigError | None:
    """A ConfigError when `exc` (or what caused it) is a failed TLS handshake that no retry
    can mend: the server's certificate or name did not verify, or the server speaks no TLS."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        text = str(e)
        if isinstance(e, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in text:
            reason = getattr(e, "verify_message", None) or text
            return ConfigError(
                f"TLS to {what}: the server's certificate did not verify ({reason}) against "
                f"{ca_file or 'the system trust store'}; check TTG_BROKER_CA_FILE and that the "
                "URL's host is a name in the certificate")
        if "WRONG_VERSION_NUMBER" in text or "record layer failure" in text:
            return ConfigError(f"TLS to {what}: the server does not speak TLS on that port "
                               "(a plain listener?); use the plain URL or enable TLS there")
        todo.extend([e.__cause__, e.__context__, *e.args])
    return None


def unreachable_hint(url: str) -> str:
    """What to check when a broker cannot be reached at all: its listener may not be of the
    kind the URL asks for (a plain one answers a TLS handshake with silence, and a TLS one
    resets a plaintext client)."""
    if is_tls(url):
        return " (the URL asks for TLS: does the server listen with TLS on that port?)"
    return " (a plain URL: if the server listens with TLS only, use rediss:// or amqps://)"
