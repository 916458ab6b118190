"""The three storage tiers behind one interface, and where each one lives.

``TierConfig`` holds validated URLs (``None`` = the embedded default under ``out_dir``);
:func:`resolve_embedded` starts the embedded servers once and turns the ``None`` into concrete
URLs, so every Bytewax worker and the CLI summary use the same ones; :func:`open_writers`
connects a writer per tier. Unit of parallelism and delivery guarantee: those of each writer
(``warm_postgres``, ``hot_redis``, ``cold_parquet`` or ``cold_bigquery``): one writer set per
Bytewax worker, at-least-once delivery made exactly-once in effect by idempotent writes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable
from urllib.parse import urlparse

from dataflows.settings import redact_url
from dataflows.tables import SCHEMAS, TableRows

if TYPE_CHECKING:
    import polars as pl

    from connectors.kafka import KafkaConfig

WARM_SCHEMES = ("postgresql", "postgres")
HOT_SCHEMES = ("redis", "rediss", "unix")
COLD_SCHEMES = ("file", "bigquery")
ENV = {"warm": "WATERFLOW_WARM_URL", "hot": "WATERFLOW_HOT_URL", "cold": "WATERFLOW_COLD_URL"}
#: Warm tables a second connection writes when the warm tier has two lanes (a replay's sink,
#: ``open_writers(config, warm_lanes=2)``): the large tables no trigger or transaction ties to
#: the others, so PostgreSQL stores them beside kpi_15m (whose rollup triggers read nodes, so
#: those two stay on one connection, in order). Each lane writes its tables in batch order.
WARM_SIDE_TABLES = frozenset({"readings", "forecasts", "forecast_accuracy"})


@runtime_checkable
class TierWriter(Protocol):
    """A storage tier: takes every ``TableRows`` of the flow, keeps what it stores."""

    name: str  # 'warm' | 'hot' | 'cold' | 'stream'

    def write(self, rows: TableRows) -> None:
        """Write the rows; every write is finished (durable or raised) when this returns."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


def _check(kind: str, url: str | None, schemes: tuple[str, ...], plain_path: bool) -> str | None:
    if url is None or url == "":
        return None
    scheme = urlparse(url).scheme
    if scheme in schemes or (plain_path and scheme == ""):
        return url
    allowed = ", ".join(f"{s}://" for s in schemes) + (" or a folder" if plain_path else "")
    raise ValueError(f"{kind} tier URL {redact_url(url)!r}: expected {allowed}")


@dataclass(frozen=True)
class TierConfig:
    """Where each tier lives. ``None`` means the embedded default under ``out_dir``."""

    warm_url: str | None
    hot_url: str | None
    cold_url: str | None
    out_dir: Path
    hot_prefix: str = "water:"  # tests use a unique prefix; production keeps the contract's
    # A live flow also writes dead letters and anomaly events to Kafka (connectors.kafka).
    stream: KafkaConfig | None = None
    # A live flow loads BigQuery from a spool every this many seconds (connectors.cold_spool);
    # None writes each batch through (replays: few, large batches).
    cold_load_every_s: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "warm_url", _check("warm", self.warm_url, WARM_SCHEMES, False))
        object.__setattr__(self, "hot_url", _check("hot", self.hot_url, HOT_SCHEMES, False))
        object.__setattr__(self, "cold_url", _check("cold", self.cold_url, COLD_SCHEMES, True))
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if not self.hot_prefix:
            raise ValueError("hot tier prefix must not be empty")

    @staticmethod
    def from_env(
        out_dir: Path,
        warm: str | None = None,
        hot: str | None = None,
        cold: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> TierConfig:
        """Arguments (the CLI's ``--warm/--hot/--cold``) first, then ``WATERFLOW_*_URL``."""
        env = os.environ if environ is None else environ
        return TierConfig(
            warm_url=warm or env.get(ENV["warm"]) or None,
            hot_url=hot or env.get(ENV["hot"]) or None,
            cold_url=cold or env.get(ENV["cold"]) or None,
            out_dir=Path(out_dir),
        )

    @property
    def embedded(self) -> bool:
        """Whether some tier still needs its embedded default."""
        return None in (self.warm_url, self.hot_url, self.cold_url)


def resolve_embedded(config: TierConfig) -> TierConfig:
    """The config with every ``None`` replaced by a started embedded service's URL."""
    if not config.embedded:
        return config
    from connectors import embedded

    out_dir = config.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    return replace(
        config,
        warm_url=config.warm_url or embedded.start_postgres(out_dir),
        hot_url=config.hot_url or embedded.start_redis(out_dir),
        cold_url=config.cold_url or (out_dir / "cold").as_uri(),
    )


def open_writers(config: TierConfig, warm_lanes: int = 1) -> list[TierWriter]:
    """Connected writers: warm (schema migrated first), hot, cold, Kafka topics if set.

    ``warm_lanes=2`` connects a second warm writer for ``WARM_SIDE_TABLES`` (its ``tables``),
    the first one taking the other tables; a sink writes them on threads of their own.
    """
    if warm_lanes not in (1, 2):
        raise ValueError(f"warm_lanes must be 1 or 2, got {warm_lanes}")
    from connectors.cold_bigquery import ColdBigQueryWriter
    from connectors.hot_redis import HotRedisWriter
    from connectors.warm_postgres import WarmPostgresWriter, migrate

    config = resolve_embedded(config)
    assert config.warm_url and config.hot_url and config.cold_url  # resolved above
    writers: list[TierWriter] = []
    try:
        # A malformed cold URL fails here, before anything is connected.
        cold = cold_writer(config.cold_url)
        migrate(config.warm_url)
        if warm_lanes == 1:
            lanes = [WarmPostgresWriter(config.warm_url)]
        else:
            rest = frozenset(SCHEMAS) - WARM_SIDE_TABLES
            lanes = [WarmPostgresWriter(config.warm_url, tables=rest),
                     WarmPostgresWriter(config.warm_url, tables=WARM_SIDE_TABLES)]
        for warm in lanes:
            warm.connect()
            writers.append(warm)
        hot = HotRedisWriter(config.hot_url, prefix=config.hot_prefix)
        hot.connect()
        writers.append(hot)
        if isinstance(cold, ColdBigQueryWriter):
            if config.cold_load_every_s is not None:
                from connectors.cold_spool import SpooledBigQueryWriter

                spool = config.out_dir / "cold-spool"
                cold = SpooledBigQueryWriter(cold, spool, config.cold_load_every_s)
            cold.connect()  # creates raw_readings if missing: DDL here, never in write()
        writers.append(cold)
        if config.stream is not None:
            from connectors.kafka import KafkaTopicsWriter

            stream = KafkaTopicsWriter(config.stream)
            stream.connect()
            writers.append(stream)
    except BaseException:
        close_all(writers)
        raise
    return writers


def cold_writer(url: str) -> TierWriter:
    """The cold tier's writer for a URL: BigQuery for ``bigquery://``, else the Parquet archive."""
    if urlparse(url).scheme == "bigquery":
        from connectors.cold_bigquery import ColdBigQueryWriter

        return ColdBigQueryWriter.from_url(url)
    from connectors.cold_parquet import ColdParquetWriter

    return ColdParquetWriter.from_url(url)


def cold_reader(url: str, since_us: int, until_us: int) -> Iterator[pl.DataFrame]:
    """The cold tier's readings of [since, until), one frame per UTC day, by (node_id, ts)."""
    if urlparse(url).scheme == "bigquery":
        from connectors.cold_bigquery import read_readings as read_bigquery

        return read_bigquery(url, since_us, until_us)
    from connectors.cold_parquet import read_readings as read_parquet

    return read_parquet(url, since_us, until_us)


def close_all(writers: list[TierWriter]) -> None:
    """Close every writer, even if one fails; raise the first failure afterwards."""
    first: BaseException | None = None
    for w in writers:
        try:
            w.close()
        except Exception as exc:  # the others must still be closed
            first = first or exc
    if first is not None:
        raise first
