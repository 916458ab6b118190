"""One short look at each configured service before a command starts its work.

A command that cannot reach its warm tier or its broker should say so in one line at once,
not fail deep inside a flow with a traceback. Each probe connects once with a short timeout
and returns ``None`` when the service answers, else the cause as one line of text. Causes may
quote the client library's message; the caller hides secrets and names the setting
(``dataflows.config_check``).
"""

from __future__ import annotations

import socket
import ssl
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from connectors.kafka import KafkaConfig

#: Seconds a probe waits for a service: long enough for a busy server, short for a typo.
PROBE_TIMEOUT_S = 5
#: How a Kafka cause starts when librdkafka refused a setting before asking any broker.
INVALID_SETTING = "invalid client setting: "


def one_line(message: object) -> str:
    r"""A client library's (often multi-line) message as one line.

    >>> one_line('connection failed: refused\n\tIs the server running?')
    'connection failed: refused Is the server running?'
    """
    return " ".join(str(message).split())


def probe_warm(url: str) -> str | None:
    """Whether PostgreSQL at ``url`` takes a connection (refused port, no such database...)."""
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=max(1, round(PROBE_TIMEOUT_S))) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return one_line(exc).removeprefix("connection failed: ")
    return None


def probe_cold(url: str) -> str | None:
    """Whether a BigQuery cold tier's client can be built, i.e. its credentials load.

    A key file the client cannot use, or no credentials at all, fail here instead of inside the
    flow. No request is sent (none is free of cost or side effects on BigQuery); an archive
    folder (``file://``) needs no probe.
    """
    if urlsplit(url).scheme != "bigquery":
        return None
    from connectors.cold_bigquery import make_client, parse_url

    try:
        client = make_client(parse_url(url))
    except Exception as exc:  # google.auth's errors, ValueError of a malformed key, ...
        return one_line(f"{type(exc).__name__}: {exc}")
    client.close()
    return None


def probe_hot(url: str) -> tuple[bool, str] | None:
    """Whether Redis at ``url`` answers a PING: ``None``, or (refused, cause).

    ``refused`` is True when Redis answered but said no (credentials, TLS, a wrong database
    number): a setting to fix. False means it did not answer at all, which the hot tier
    rides out like any outage (``connectors.hot_redis``).
    """
    import redis

    client = None
    try:
        client = redis.from_url(
            url, socket_connect_timeout=PROBE_TIMEOUT_S, socket_timeout=PROBE_TIMEOUT_S
        )
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        if isinstance(exc, redis.AuthenticationError):
            return True, one_line(exc)
        if _certificate_refused(exc):
            return True, (f"{one_line(exc)} (give the CA that signed the server's certificate "
                          "as ?ssl_ca_certs=/path/ca.pem)")
        mismatch = _tls_mismatch(url)
        if mismatch is not None:
            return True, f"{mismatch} ({one_line(exc)})"
        return False, one_line(exc)
    except (redis.RedisError, ValueError) as exc:
        return True, one_line(exc)
    finally:
        if client is not None:
            client.close()
    return None


def _certificate_refused(exc: BaseException) -> bool:
    """Whether a connection failed on the server's certificate (a setting, not an outage)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _tls_mismatch(url: str) -> str | None:
    """Why a Redis that did not answer ``url`` may be there after all, speaking the other way.

    A plain ``redis://`` to a TLS-only port is reset, and ``rediss://`` to a plain port waits
    in vain: both would look like an outage. One look at the port in the other protocol (a
    TLS handshake, or an inline PING) tells a wrong scheme from a Redis that is down.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        return None
    address = (parts.hostname, parts.port or 6379)
    where = f"{address[0]}:{address[1]}"
    try:
        with socket.create_connection(address, timeout=PROBE_TIMEOUT_S) as sock:
            if parts.scheme == "redis":
                # Only whether the port speaks TLS at all: nothing is sent over this socket.
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                try:
                    context.wrap_socket(sock).close()
                except ssl.SSLError as exc:
                    if "ALERT" not in str(exc.reason):  # a TLS server's alert is TLS too
                        return None
                return f"{where} speaks TLS only: use rediss://"
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except OSError:  # refused, reset, timed out: nothing to tell
        return None
    if reply[:1] in (b"+", b"-"):
        return f"{where} speaks plain Redis, not TLS: use redis://"
    return None


def probe_kafka(config: KafkaConfig) -> str | None:
    """Whether a broker of ``config`` answers a metadata request."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    # librdkafka would log every failed connection attempt to stderr: the one line we
    # return says it all.
    try:
        # A property librdkafka rejects (WATERFLOW_KAFKA_SASL_MECHANISM=SCRAM-SHA-1024...)
        # fails here, when the client is built, before any broker is asked.
        admin = AdminClient({**config.client_config(), "log_level": 0})
    except KafkaException as exc:
        return f"{INVALID_SETTING}{one_line(exc.args[0].str() if exc.args else exc)}"
    try:
        admin.list_topics(timeout=PROBE_TIMEOUT_S)
    except KafkaException as exc:
        return one_line(exc.args[0].str() if exc.args else exc)
    return None
