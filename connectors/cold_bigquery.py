"""Cold tier in BigQuery: every accepted reading in ``raw_readings``, kept forever.

URL: ``bigquery://PROJECT/DATASET`` (optional ``?location=EU``). The dataset and the table are
created if missing when the writer connects (never in ``write``): ``raw_readings`` is
partitioned by UTC day on ``ts`` and clustered by ``node_id``, with the columns of
``SCHEMAS['readings']`` (measurements, quality, ``flags`` as REPEATED STRING, anomaly_score,
source, run_id).

Authentication: the standard Google credentials chain (``GOOGLE_APPLICATION_CREDENTIALS``,
gcloud's application-default credentials, the metadata server). When
``WATERFLOW_BIGQUERY_ENDPOINT`` is set (e.g. ``http://127.0.0.1:9050``, the local-bigquery
emulator), requests go there with anonymous credentials instead.

How a batch is written: the ``readings`` frame is deduplicated on (node_id, ts) (last row wins),
written to an in-memory Parquet buffer, loaded into this writer's own staging table
(``WRITE_TRUNCATE``), then moved into ``raw_readings`` by one ``MERGE`` on (node_id, ts) whose
ON clause carries the batch's time range (partition pruning). Two jobs per batch; no streaming
inserts, whose insertId de-duplication lasts about a minute and does not survive a restart.

Unit of parallelism: one writer per Bytewax worker, each with its own staging table
(``_staging_raw_readings_<random>``, expiring after a day in case a worker dies before
``close`` drops it); workers MERGE into the same table, and a MERGE that loses a concurrent
update race is retried.

Delivery guarantee: ``write`` returns once the MERGE job is done, so what Bytewax snapshots
after it is stored. A replayed batch (Bytewax recovery is at-least-once), or the same readings
cut into other batches, MERGEs onto the rows already there: one row per (node_id, ts),
exactly-once in effect, across restarts. Transient failures (5xx, rate limits, timeouts,
concurrent-update conflicts) retry the whole load+MERGE, which is safe for the same reason,
up to ``ATTEMPTS`` times with exponential backoff; then ``write`` raises. Only ``readings``
frames are stored; other tables are ignored (like the Parquet archive).
"""

from __future__ import annotations

import io
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlparse

import polars as pl
import pyarrow.parquet as pq

from dataflows.model import US_PER_DAY
from dataflows.tables import KEYS, SCHEMAS, TableRows, conform

if TYPE_CHECKING:
    from google.cloud import bigquery

log = logging.getLogger(__name__)
#: Context of this module's log records (dataflows.logs shows it as fields).
LOG_CONTEXT = {"step": "write_tiers", "tier": "cold"}

TABLE = "raw_readings"
SOURCE_TABLE = "readings"  # the contract's frame that goes to BigQuery
ENDPOINT_ENV = "WATERFLOW_BIGQUERY_ENDPOINT"
#: Timeout of one HTTP request to the API (connect + read), seconds.
HTTP_TIMEOUT_S = 60.0
#: How long one load or query job may run before the attempt counts as failed, seconds.
JOB_TIMEOUT_S = 600.0
#: Attempts per batch (load + MERGE) on transient failures, and the first backoff.
ATTEMPTS = 5
BACKOFF_S = 1.0
#: Staging tables expire on their own if a worker dies before dropping its own.
STAGING_TTL = timedelta(days=1)

_MIN_TS_US = -62_135_596_800_000_000  # 0001-01-01T00:00:00Z
_MAX_TS_US = 253_402_300_799_999_999  # 9999-12-31T23:59:59.999999Z
_PROJECT = re.compile(r"^[a-z][a-z0-9.:-]{0,127}$")
_DATASET = re.compile(r"^[A-Za-z0-9_]{1,1024}$")


# --------------------------------------------------------------------------------------------
# Pure parts: URL, schema, SQL (tested without a service)


@dataclass(frozen=True)
class BigQueryTarget:
    """Where the cold tier lives: project, dataset and optional location."""

    project: str
    dataset: str
    location: str | None = None

    @property
    def table_id(self) -> str:
        return f"{self.project}.{self.dataset}.{TABLE}"


def parse_url(url: str) -> BigQueryTarget:
    """The target of ``bigquery://PROJECT/DATASET[?location=LOC]``; ValueError names the URL.

    >>> parse_url("bigquery://my-project/water_cold?location=EU")
    BigQueryTarget(project='my-project', dataset='water_cold', location='EU')
    """
    parsed = urlparse(url)
    if parsed.scheme != "bigquery":
        raise ValueError(f"cold tier {url!r}: expected bigquery://PROJECT/DATASET")
    project, dataset = parsed.netloc, parsed.path.strip("/")
    if not _PROJECT.match(project):
        raise ValueError(f"cold tier {url!r}: {project!r} is not a BigQuery project id")
    if not _DATASET.match(dataset):
        raise ValueError(
            f"cold tier {url!r}: dataset {dataset!r} must be letters, digits and underscores"
        )
    query = parse_qs(parsed.query)
    unknown = set(query) - {"location"}
    if unknown:
        raise ValueError(f"cold tier {url!r}: unknown option(s) {sorted(unknown)}")
    location = query.get("location", [None])[-1]
    return BigQueryTarget(project, dataset, location)


def _bq_type(dtype: Any) -> tuple[str, str]:
    """(BigQuery type, mode) of a polars dtype of the readings schema."""
    if dtype == pl.String:
        return "STRING", "NULLABLE"
    if dtype == pl.Float64:
        return "FLOAT64", "NULLABLE"
    if isinstance(dtype, pl.Datetime):
        return "TIMESTAMP", "NULLABLE"
    if isinstance(dtype, pl.List) and dtype.inner == pl.String:
        return "STRING", "REPEATED"
    raise TypeError(f"cold tier: no BigQuery type for column dtype {dtype}")


def schema_fields() -> list[tuple[str, str, str]]:
    """(name, type, mode) of every column of ``raw_readings``, in ``SCHEMAS`` order.

    >>> schema_fields()[:2]
    [('node_id', 'STRING', 'REQUIRED'), ('ts', 'TIMESTAMP', 'REQUIRED')]
    """
    out = []
    for name, dtype in SCHEMAS[SOURCE_TABLE].items():
        kind, mode = _bq_type(dtype)
        if name in KEYS[SOURCE_TABLE]:
            mode = "REQUIRED"
        out.append((name, kind, mode))
    return out


def _quote(table_id: str) -> str:
    # Every part was validated by parse_url (or is ours), so a backquoted path is safe.
    return f"`{table_id}`"


def merge_sql(target: str, staging: str) -> str:
    """The MERGE moving a staged batch into ``raw_readings`` on (node_id, ts).

    ``@lo``/``@hi`` (the batch's time range) in the ON clause let BigQuery prune partitions,
    so a batch scans only the days it touches.
    """
    columns = list(SCHEMAS[SOURCE_TABLE])
    key = KEYS[SOURCE_TABLE]
    on = " AND ".join(f"T.{k} = S.{k}" for k in key)
    sets = ", ".join(f"{c} = S.{c}" for c in columns if c not in key)
    names = ", ".join(columns)
    values = ", ".join(f"S.{c}" for c in columns)
    return (
        # Only constants: SCHEMAS column names and table ids parse_url validated; values are
        # the @lo/@hi query parameters.
        f"MERGE {_quote(target)} T USING {_quote(staging)} S "  # nosec B608
        f"ON {on} AND T.ts BETWEEN @lo AND @hi "
        f"WHEN MATCHED THEN UPDATE SET {sets} "
        f"WHEN NOT MATCHED THEN INSERT ({names}) VALUES ({values})"
    )


def select_sql(target: str) -> str:
    """Readings of one time range, in the readings schema's column order, by (node_id, ts)."""
    names = ", ".join(SCHEMAS[SOURCE_TABLE])
    return (
        # Only constants: SCHEMAS column names and a table id parse_url validated.
        f"SELECT {names} FROM {_quote(target)} "  # nosec B608
        "WHERE ts >= @lo AND ts < @hi ORDER BY node_id, ts"
    )


def parquet_bytes(frame: pl.DataFrame) -> bytes:
    """A readings frame as Parquet that BigQuery loads into ``raw_readings`` as is.

    Timestamps in microseconds UTC, ``flags`` as a standard Parquet LIST (loaded with list
    inference into REPEATED STRING), like the Parquet archive.
    """
    buf = io.BytesIO()
    pq.write_table(
        frame.to_arrow(),
        buf,
        compression="zstd",
        coerce_timestamps="us",
        use_compliant_nested_type=True,
    )
    return buf.getvalue()


def _transient(exc: BaseException) -> bool:
    """Whether a failure may pass on a new attempt (rather than fail the same way again)."""
    from google.api_core import exceptions as gexc

    if isinstance(
        exc,
        gexc.ServerError | gexc.TooManyRequests | gexc.RetryError | TimeoutError | ConnectionError,
    ):
        return True
    text = str(exc).lower()
    # Concurrent MERGEs into the same partitions: BigQuery aborts one with this message.
    return any(
        s in text
        for s in ("concurrent update", "backenderror", "ratelimitexceeded", "timed out", "timeout")
    )


# --------------------------------------------------------------------------------------------
# Client


def make_client(target: BigQueryTarget) -> bigquery.Client:
    """A client for ``target``: the emulator when ``WATERFLOW_BIGQUERY_ENDPOINT`` is set."""
    from google.cloud import bigquery

    endpoint = os.environ.get(ENDPOINT_ENV)
    if endpoint:
        from google.auth.credentials import AnonymousCredentials

        return bigquery.Client(
            project=target.project,
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options={"api_endpoint": endpoint},
            location=target.location,
        )
    # The standard credentials chain (ADC); the project of the URL is billed.
    return bigquery.Client(project=target.project, location=target.location)


def _api_retry() -> Any:
    """Retry of single API calls (not jobs): transient HTTP errors, within a deadline."""
    from google.cloud.bigquery import DEFAULT_RETRY

    return DEFAULT_RETRY.with_deadline(HTTP_TIMEOUT_S * 2)


def ensure_table(client: bigquery.Client, target: BigQueryTarget) -> bigquery.Table:
    """Create the dataset and ``raw_readings`` (day-partitioned on ts, clustered) if missing."""
    from google.cloud import bigquery

    dataset = bigquery.Dataset(f"{target.project}.{target.dataset}")
    if target.location:
        dataset.location = target.location
    client.create_dataset(dataset, exists_ok=True, retry=_api_retry(), timeout=HTTP_TIMEOUT_S)
    table = bigquery.Table(target.table_id, schema=_schema())
    table.time_partitioning = bigquery.TimePartitioning(
        type_=bigquery.TimePartitioningType.DAY, field="ts"
    )
    table.clustering_fields = ["node_id"]
    table.description = "waterflow cold tier: every accepted reading (one row per node_id, ts)"
    return client.create_table(table, exists_ok=True, retry=_api_retry(), timeout=HTTP_TIMEOUT_S)


def _schema() -> list[bigquery.SchemaField]:
    from google.cloud import bigquery

    return [bigquery.SchemaField(n, t, mode=m) for n, t, m in schema_fields()]


def _ts_param(name: str, us: int) -> Any:
    from google.cloud import bigquery

    # BigQuery's TIMESTAMP range is years 1-9999: an open-ended bound is clamped into it.
    us = min(max(us, _MIN_TS_US), _MAX_TS_US)
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)
    return bigquery.ScalarQueryParameter(name, "TIMESTAMP", moment)


# --------------------------------------------------------------------------------------------
# The writer


@dataclass
class ColdBigQueryWriter:
    """MERGEs each ``readings`` frame into ``raw_readings`` through a Parquet load job."""

    target: BigQueryTarget
    name: str = "cold"
    attempts: int = ATTEMPTS
    backoff_s: float = BACKOFF_S
    _client: bigquery.Client | None = field(default=None, init=False, repr=False)
    _staging: str = field(default="", init=False, repr=False)

    @classmethod
    def from_url(cls, url: str) -> ColdBigQueryWriter:
        """A writer for ``bigquery://PROJECT/DATASET`` (validated now, connected later)."""
        return cls(parse_url(url))

    def connect(self) -> None:
        """Create the client, the dataset, ``raw_readings`` and this writer's staging table."""
        from google.cloud import bigquery

        try:
            client = make_client(self.target)
            try:
                ensure_table(client, self.target)
            except Exception:
                # Workers connecting at once race to create the dataset and table; the loser's
                # call can fail with another error than "already exists" (the emulator answers
                # 500). Then the table is there: fetching it is the check.
                time.sleep(1.0)
                client.get_table(self.target.table_id, retry=_api_retry(), timeout=HTTP_TIMEOUT_S)
            staging_id = (
                f"{self.target.project}.{self.target.dataset}."
                f"_staging_{TABLE}_{uuid.uuid4().hex[:12]}"
            )
            staging = bigquery.Table(staging_id, schema=_schema())
            staging.expires = datetime.now(UTC) + STAGING_TTL
            client.create_table(staging, exists_ok=True, retry=_api_retry(), timeout=HTTP_TIMEOUT_S)
        except Exception as exc:
            raise RuntimeError(
                f"cold tier: cannot prepare BigQuery table {self.target.table_id}: {exc}"
            ) from exc
        self._client, self._staging = client, staging_id

    def write(self, rows: TableRows) -> None:
        """Load and MERGE the readings of ``rows``; other tables are ignored."""
        if rows.table != SOURCE_TABLE or rows.frame.height == 0:
            return
        if self._client is None:
            self.connect()
        # MERGE fails when two source rows match one target row: one row per key, last wins.
        frame = rows.frame.unique(subset=list(KEYS[SOURCE_TABLE]), keep="last", maintain_order=True)
        payload = parquet_bytes(frame)
        ts = frame["ts"].dt.epoch("us")
        lo, hi = int(ts.min()), int(ts.max())  # type: ignore[arg-type]
        last: Exception | None = None
        for attempt in range(1, self.attempts + 1):
            try:
                self._load_and_merge(payload, lo, hi)
                return
            except Exception as exc:
                if not _transient(exc):
                    raise RuntimeError(
                        f"cold tier: writing {frame.height} readings to "
                        f"{self.target.table_id} failed: {exc}"
                    ) from exc
                last = exc
                if attempt < self.attempts:
                    delay = self.backoff_s * 2 ** (attempt - 1)
                    log.warning(
                        "cold tier: %d readings for %s failed (try %d/%d), retry in %.1fs: %s",
                        frame.height, self.target.table_id, attempt, self.attempts, delay, exc,
                        extra=LOG_CONTEXT,
                    )
                    time.sleep(delay)
        raise RuntimeError(
            f"cold tier: writing {frame.height} readings to {self.target.table_id} failed "
            f"after {self.attempts} attempts: {last}"
        ) from last

    def _load_and_merge(self, payload: bytes, lo: int, hi: int) -> None:
        from google.cloud import bigquery

        assert self._client is not None
        config = bigquery.LoadJobConfig(
            source_format=bigquery.SourceFormat.PARQUET,
            write_disposition=bigquery.WriteDisposition.WRITE_TRUNCATE,
            schema=_schema(),
        )
        options = bigquery.ParquetOptions()
        options.enable_list_inference = True  # a LIST of strings -> REPEATED STRING
        config.parquet_options = options
        load = self._client.load_table_from_file(
            io.BytesIO(payload),
            self._staging,
            job_config=config,
            job_id_prefix="waterflow_stage_",
            timeout=HTTP_TIMEOUT_S,
        )
        load.result(timeout=JOB_TIMEOUT_S)
        query = self._client.query(
            merge_sql(self.target.table_id, self._staging),
            job_config=bigquery.QueryJobConfig(
                query_parameters=[_ts_param("lo", lo), _ts_param("hi", hi)]
            ),
            job_id_prefix="waterflow_merge_",
            timeout=HTTP_TIMEOUT_S,
        )
        query.result(timeout=JOB_TIMEOUT_S)

    def close(self) -> None:
        """Drop this writer's staging table (nothing is pending after ``write``)."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            client.delete_table(self._staging, not_found_ok=True, timeout=HTTP_TIMEOUT_S)
        except Exception as exc:  # it expires by itself: not worth failing a finished run
            log.warning("cold tier: could not drop staging table %s: %s", self._staging, exc,
                        extra=LOG_CONTEXT)
        finally:
            client.close()


# --------------------------------------------------------------------------------------------
# Reading back (backfill)


def read_readings(url: str, since_us: int, until_us: int) -> Iterator[pl.DataFrame]:
    """The readings of [since, until) in ``raw_readings``, one frame per UTC day, by (node, ts).

    Frames have the columns and dtypes of ``SCHEMAS['readings']``. One query per day bounds
    memory and touches one partition each.
    """
    from google.cloud import bigquery

    target = parse_url(url)
    client = make_client(target)
    try:
        # The days actually held first, so a wide --since/--until (or years between two
        # stretches of data) does not cost a query per empty day.
        held = client.query(
            # Only the table id parse_url validated; the range goes in as parameters.
            f"SELECT DISTINCT UNIX_MICROS(TIMESTAMP_TRUNC(ts, DAY)) AS day "  # nosec B608
            f"FROM {_quote(target.table_id)} WHERE ts >= @lo AND ts < @hi ORDER BY day",
            job_config=bigquery.QueryJobConfig(
                query_parameters=[_ts_param("lo", since_us), _ts_param("hi", until_us)]
            ),
            timeout=HTTP_TIMEOUT_S,
        ).result(timeout=JOB_TIMEOUT_S)
        for day in [int(r["day"]) for r in held]:
            lo, hi = max(day, since_us), min(day + US_PER_DAY, until_us)
            job = client.query(
                select_sql(target.table_id),
                job_config=bigquery.QueryJobConfig(
                    query_parameters=[_ts_param("lo", lo), _ts_param("hi", hi)]
                ),
                timeout=HTTP_TIMEOUT_S,
            )
            table = job.result(timeout=JOB_TIMEOUT_S).to_arrow(create_bqstorage_client=False)
            if table.num_rows:
                yield conform(SOURCE_TABLE, pl.from_arrow(table))  # type: ignore[arg-type]
    finally:
        client.close()

