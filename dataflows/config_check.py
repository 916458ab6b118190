"""The commands' configuration, checked before anything starts: one clear line per problem.

Every setting comes from a command-line option or, when the option is not given, from its
``WATERFLOW_*`` variable; both go through the checks here. A problem raises
:class:`ConfigError`, which ``waterflow`` prints as one line naming the setting the way the user
gave it (``--warm`` or ``WATERFLOW_WARM_URL``) and the cause, with no traceback and no password
(:func:`dataflows.settings.redact_url`).

Exit codes:

- 2, usage: a value that cannot work whatever runs (a URL of the wrong scheme, an unknown time
  zone, an instant that is not one, a file or archive that is not there, a number out of range).
- 1, unreachable: the value looks right but the service does not take it (a refused port, a
  database that does not exist, credentials refused, no Kafka broker answering).

The hot tier is the exception by design: Redis not answering at start is an outage the hot
writer rides out (DESIGN.md: Redis being down never stops the pipeline), so it is a one-line
warning; Redis answering "no" (credentials, TLS, database number) is an error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from dataflows.forecast_calendar import is_holiday
from dataflows.settings import check_zone, hide_secrets, parse_instant, redact_url, url_secrets
from dataflows.topology import Network, load_network

if TYPE_CHECKING:
    from connectors.kafka import KafkaConfig
    from connectors.metrics import MetricsServer
    from connectors.tiers import TierConfig

USAGE = 2
UNREACHABLE = 1
#: Environment variables whose values are secrets, besides the passwords inside URLs.
SECRET_ENV = ("WATERFLOW_KAFKA_SASL_PASSWORD", "WATERFLOW_KAFKA_SSL_KEY_PASSWORD")
URL_ENV = ("WATERFLOW_WARM_URL", "WATERFLOW_HOT_URL", "WATERFLOW_COLD_URL")
#: The utility's own public holidays, comma-separated (``--holiday``, key ``holidays``).
HOLIDAYS_ENV = "WATERFLOW_HOLIDAYS"


class ConfigError(Exception):
    """A setting that cannot work: ``str()`` is the one line to print."""

    def __init__(self, setting: str, problem: str, exit_code: int = USAGE) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem
        self.exit_code = exit_code


#: Variables whose value came from a configuration file (``dataflows.live.apply_config_file``):
#: variable -> (``FILE: key``, value), so a message names the key the user wrote.
_from_file: dict[str, tuple[str, str]] = {}


def note_file_settings(origins: Mapping[str, tuple[str, str]]) -> None:
    """Remember which variables a configuration file set (replacing what was noted before)."""
    _from_file.clear()
    _from_file.update(origins)


def file_settings() -> dict[str, tuple[str, str]]:
    """The variables the configuration file set: variable -> (``FILE: key``, value)."""
    return dict(_from_file)


@dataclass(frozen=True)
class Setting:
    """A setting's value (None: not set) and its name as the user gave it."""

    name: str
    value: str | None

    @property
    def shown(self) -> str:
        """Name and value for a message, the value's password hidden."""
        return f"{self.name} {redact_url(self.value)}" if self.value else self.name


def pick(
    option: str, given: object, env_name: str, environ: Mapping[str, str] | None = None
) -> Setting:
    """The option's value if given, else the variable's (named after what supplied it).

    A variable set from the configuration file is named by the file and its key.

    >>> pick("--tz", None, "WATERFLOW_TZ", {"WATERFLOW_TZ": "UTC"})
    Setting(name='WATERFLOW_TZ', value='UTC')
    >>> pick("--tz", "Europe/Rome", "WATERFLOW_TZ", {"WATERFLOW_TZ": "UTC"}).name
    '--tz'
    """
    if given is not None and str(given) != "":
        return Setting(option, str(given))
    env = os.environ if environ is None else environ
    value = env.get(env_name, "").strip()
    if not value:
        return Setting(option, None)
    label, from_file = _from_file.get(env_name, (env_name, None))
    return Setting(label if from_file is not None and from_file.strip() == value else env_name,
                   value)


# --------------------------------------------------------------------------------------
# Values (exit 2)


def zone(setting: Setting, default: str = "Europe/Rome") -> str:
    """The time zone of a setting (default Europe/Rome)."""
    try:
        return check_zone(setting.value or default)
    except ValueError as exc:
        raise ConfigError(setting.name, str(exc)) from None


def instant(setting: Setting) -> int | None:
    """µs UTC of an ISO instant or date, or None when not set."""
    if setting.value is None:
        return None
    try:
        return parse_instant(setting.value)
    except ValueError as exc:
        raise ConfigError(setting.name, str(exc)) from None


def whole_number(setting: Setting, default: int, minimum: int = 0) -> int:
    """A whole number of at least ``minimum`` (default when not set)."""
    if setting.value is None:
        return default
    text = setting.value.strip()
    if not text.lstrip("-").isdigit() or int(text) < minimum:
        raise ConfigError(setting.name, f"must be a whole number >= {minimum}, got {text!r}")
    return int(text)


def port(setting: Setting) -> int | None:
    """A TCP port number, or None when not set."""
    if setting.value is None:
        return None
    text = setting.value.strip()
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ConfigError(setting.name, f"must be a port number (0-65535), got {text!r}")
    return int(text)


def network(setting: Setting) -> Network:
    """The network topology file of a setting, or the defaults when not set."""
    if setting.value is None:
        return Network()
    path = Path(setting.value)
    if not path.is_file():
        raise ConfigError(setting.name, f"no network file at {path}")
    try:
        return load_network(path)
    except (ValueError, OSError) as exc:  # tomllib's errors are ValueErrors
        raise ConfigError(setting.name, str(exc)) from None


def holidays(setting: Setting) -> tuple[str, ...]:
    """The extra public holidays of a setting, () when not set.

    Comma-separated, each 'MM-DD' (every year) or 'YYYY-MM-DD' (once), checked by the
    forecasts' own calendar (:func:`dataflows.forecast_calendar.is_holiday`) in a common year:
    an 'MM-DD' is read in every year of the data, so 02-29 cannot be one.

    >>> holidays(Setting("WATERFLOW_HOLIDAYS", "08-16, 2026-06-29,"))
    ('08-16', '2026-06-29')
    >>> holidays(Setting("--holiday", "08-16,13-45"))
    Traceback (most recent call last):
    ...
    dataflows.config_check.ConfigError: --holiday: a holiday must be 'MM-DD' or 'YYYY-MM-DD', \
got '13-45'
    """
    if setting.value is None:
        return ()
    days = tuple(part.strip() for part in setting.value.split(",") if part.strip())
    for text in days:
        try:
            is_holiday(date(2023, 1, 1), (text,))
        except ValueError as exc:
            problem = str(exc)
            if _leap_day(text):
                problem += " (02-29 is not in every year: give it with its year, YYYY-02-29)"
            raise ConfigError(setting.name, problem) from None
        except OverflowError:  # a year of more digits than a C long holds
            raise ConfigError(setting.name, f"year out of range in {text!r}") from None
    return days


def _leap_day(text: str) -> bool:
    """Whether the calendar reads ``text`` in a leap year (only: 02-29)."""
    try:
        is_holiday(date(2024, 1, 1), (text,))
    except (ValueError, OverflowError):
        return False
    return True


_SCHEMES = {
    "warm": (("postgresql", "postgres"), "postgresql://USER@HOST:PORT/DATABASE"),
    "hot": (("redis", "rediss", "unix"), "redis://[:PASSWORD@]HOST:PORT/DB, rediss:// or unix://"),
    "cold": (("file", "bigquery", ""), "file:///PATH, a folder, or bigquery://PROJECT/DATASET"),
}


def tier_url(kind: str, setting: Setting) -> str | None:
    """A tier URL whose scheme fits the tier (``kind``: warm, hot, cold), or None if unset.

    >>> tier_url("warm", Setting("--warm", "mysql://u:s3cret@h/x"))
    Traceback (most recent call last):
    ...
    dataflows.config_check.ConfigError: --warm: expected postgresql://USER@HOST:PORT/DATABASE, \
got mysql://u:***@h/x
    """
    if setting.value is None:
        return None
    schemes, form = _SCHEMES[kind]
    try:
        scheme = urlsplit(setting.value).scheme
    except ValueError:
        scheme = "?"
    if scheme not in schemes:
        raise ConfigError(setting.name, f"expected {form}, got {redact_url(setting.value)}")
    if kind == "cold":
        _check_cold(setting)
    return setting.value


def _check_cold(setting: Setting) -> None:
    from connectors.cold_parquet import archive_root

    assert setting.value is not None
    try:
        if urlsplit(setting.value).scheme == "bigquery":
            from connectors.cold_bigquery import parse_url

            parse_url(setting.value)
            return
        root = archive_root(setting.value)
    except ValueError as exc:
        secrets = url_secrets([setting.value])
        raise ConfigError(setting.name, hide_secrets(str(exc), secrets)) from None
    if root.exists() and not root.is_dir():
        raise ConfigError(setting.name, f"{root} is a file, not a folder for the archive")


def archive_exists(setting: Setting) -> None:
    """A cold tier to read from (backfill) must hold an archive of readings."""
    from connectors.cold_parquet import TABLE, archive_root

    assert setting.value is not None
    if urlsplit(setting.value).scheme == "bigquery":
        return  # its table is looked up by the reader, which names it if missing
    root = archive_root(setting.value)
    if not (root / TABLE).is_dir():
        raise ConfigError(setting.shown, f"no archive of readings at {root / TABLE}")


def tiers(
    out: Path,
    warm: Setting,
    hot: Setting | None = None,
    cold: Setting | None = None,
    hot_prefix: str = "water:",
) -> TierConfig:
    """The tiers' configuration, every URL checked (unset ones stay embedded)."""
    from connectors.tiers import TierConfig

    if not hot_prefix:
        raise ConfigError("--hot-prefix", "must not be empty")
    return TierConfig(
        warm_url=tier_url("warm", warm),
        hot_url=tier_url("hot", hot) if hot is not None else None,
        cold_url=tier_url("cold", cold) if cold is not None else None,
        out_dir=out,
        hot_prefix=hot_prefix,
    )


def kafka(brokers: Setting, topic: str | None = None) -> KafkaConfig:
    """The Kafka configuration: brokers from the setting, the rest from WATERFLOW_KAFKA_*."""
    from connectors.kafka import KafkaConfig

    if brokers.value is None:
        raise ConfigError("--brokers", "no Kafka broker: give --brokers or set "
                          "WATERFLOW_KAFKA_BROKERS (host:port,...)")
    bad = [b for b in brokers.value.split(",") if not _host_port(b.strip())]
    if bad:
        raise ConfigError(brokers.name, f"expected host:port[,host:port...], got {bad[0]!r}")
    return KafkaConfig.from_env(brokers=brokers.value, topic=topic)


def _host_port(text: str) -> bool:
    host, _, number = text.rpartition(":")
    return bool(host) and number.isdigit() and 0 < int(number) <= 65535


# --------------------------------------------------------------------------------------
# Services (exit 1)


def reach_warm(setting: Setting, url: str) -> None:
    """PostgreSQL must take a connection."""
    from connectors.probe import probe_warm

    cause = probe_warm(url)
    if cause is not None:
        raise ConfigError(_named(setting, url), f"cannot connect: {cause}", UNREACHABLE)


def reach_hot(setting: Setting, url: str) -> None:
    """Redis refusing is an error; Redis not answering is a warning (an outage to ride out)."""
    from connectors.probe import probe_hot

    found = probe_hot(url)
    if found is None:
        return
    refused, cause = found
    if refused:
        raise ConfigError(_named(setting, url), f"refused: {cause}", UNREACHABLE)
    print(f"warning: {_named(setting, url)}: not answering now ({cause}); the run goes on and "
          "the hot tier catches up when Redis answers", file=sys.stderr)


def reach_kafka(setting: Setting, config: KafkaConfig) -> None:
    """A broker must answer."""
    from connectors import probe

    cause = probe.probe_kafka(config)
    if cause is not None and cause.startswith(probe.INVALID_SETTING):
        # librdkafka refused a setting before any broker was asked: a value to fix.
        raise ConfigError(f"{setting.name} {','.join(config.brokers)}", cause, USAGE)
    if cause is not None:
        raise ConfigError(
            f"{setting.name} {','.join(config.brokers)}",
            f"no Kafka broker answered within {probe.PROBE_TIMEOUT_S:g} s ({cause})",
            UNREACHABLE,
        )


def reach_cold(setting: Setting, url: str) -> None:
    """A BigQuery cold tier's credentials must load (an archive folder needs nothing)."""
    from connectors.probe import probe_cold

    cause = probe_cold(url)
    if cause is not None:
        raise ConfigError(
            _named(setting, url), f"cannot use its credentials: {cause}", UNREACHABLE
        )


def reach_tiers(
    config: TierConfig, warm: Setting, hot: Setting, cold: Setting | None = None
) -> None:
    """Probe the tiers that are not embedded (their URLs were checked by :func:`tiers`)."""
    if config.warm_url is not None:
        reach_warm(warm, config.warm_url)
    if config.hot_url is not None:
        reach_hot(hot, config.hot_url)
    if cold is not None and config.cold_url is not None:
        reach_cold(cold, config.cold_url)


def _named(setting: Setting, url: str) -> str:
    return f"{setting.name} {redact_url(url)}"


# --------------------------------------------------------------------------------------
# The command line


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the usage is one --help away)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Print ``prog: error: message`` and exit 2."""
        self.exit(USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def instant_arg(text: str) -> int:
    """An argparse type: µs UTC of an ISO instant with offset, or of a date."""
    try:
        return parse_instant(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def count_arg(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def add_holiday_option(p: argparse.ArgumentParser) -> None:
    """``--holiday``, repeatable; its values are checked by :func:`holidays`."""
    p.add_argument("--holiday", action="append", metavar="MM-DD|YYYY-MM-DD",
                   help="a public holiday of the utility's besides the Italian ones (the "
                   "town's patron saint): forecasts take it as a Sunday; repeatable or "
                   f"comma-separated, replaces {HOLIDAYS_ENV} (default: {HOLIDAYS_ENV}, or "
                   "none)")


def holiday_option(values: list[str] | None) -> str | None:
    """The ``--holiday`` values as one value, the way ``WATERFLOW_HOLIDAYS`` gives them."""
    return ",".join(values) if values else None


def holidays_given(
    values: list[str] | None, environ: Mapping[str, str] | None = None
) -> tuple[str, ...]:
    """The checked holidays of ``--holiday`` (``values``), else of ``WATERFLOW_HOLIDAYS``."""
    return holidays(pick("--holiday", holiday_option(values), HOLIDAYS_ENV, environ))


def secrets_in_env(environ: Mapping[str, str] | None = None) -> set[str]:
    """Secret values configured in the environment, to keep them out of any message."""
    env = os.environ if environ is None else environ
    found = url_secrets(env.get(name) for name in URL_ENV)
    found.update(v for name in SECRET_ENV if (v := env.get(name, "")))
    return found


def serve_metrics(setting: str, port: int) -> MetricsServer:
    """``/metrics`` served on ``port``, or one line naming the address and the cause (exit 1)."""
    from connectors.metrics import serve

    try:
        return serve(port)
    except OSError as exc:
        raise ConfigError(
            setting, f"cannot serve on {exc.filename}: {exc.strerror}", UNREACHABLE
        ) from None
