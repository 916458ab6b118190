"""The live flow from Kafka: killed and resumed, it leaves every tier as a clean replay does.

A simulated network with injected incidents and dead letters is written as JSON lines, replayed
once as the reference (``waterflow replay``), and published to a topic of the test's own; the
live flow (``waterflow run``, its own process, recovery on) reads the topic. Real PostgreSQL,
Redis and the Tansu broker the test command started.
"""

from __future__ import annotations

import random
import signal
import time

import pytest

from tests.integration import live_helpers as live
from tests.integration.conftest import fresh_database, hot_prefixes

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def messages(tmp_path_factory):
    """The JSON-lines file (about 100k readings and a few dead letters) and its network file."""
    folder = tmp_path_factory.mktemp("live")
    path = live.write_messages_file(folder)
    return path, live.network_file(folder)


@pytest.fixture(scope="module")
def reference(messages, tmp_path_factory, redis_url):
    """The warm tables, ledger and hot state of a clean replay of the file."""
    path, network = messages
    folder = tmp_path_factory.mktemp("reference")
    with fresh_database("waterflow_ref") as url, hot_prefixes(redis_url, 1) as (prefix,):
        live.replay(path, network, url, prefix, folder / "cold", folder / "out", redis_url)
        yield {
            "warm": live.warm_tables(url),
            "ledger": live.ledger(url),
            "hot": live.hot_state(redis_url, prefix),
        }


def test_live_run_killed_twice_and_stopped_equals_a_clean_replay(
    messages, reference, kafka_brokers, redis_url, tmp_path
):
    path, network = messages
    topic = live.publish_file(path, kafka_brokers, partitions=4)
    rng = random.Random()
    with fresh_database("waterflow_live") as url, hot_prefixes(redis_url, 1) as (prefix,):
        cold = tmp_path / "cold"
        cmd = live.run_command(topic, kafka_brokers, network, url, cold.as_uri(),
                               tmp_path / "recovery")
        env = live.run_env(redis_url, prefix)
        env["WATERFLOW_KAFKA_QUARANTINE_TOPIC"] = f"{topic}.quarantine"
        env["WATERFLOW_KAFKA_ANOMALIES_TOPIC"] = f"{topic}.anomalies"
        # Small polls, so the input takes several writes to store.
        env["WATERFLOW_KAFKA_POLL_MAX"] = "100"
        log = tmp_path / "run.log"
        held = []
        # SIGKILL (a crash) at random points, and between them a graceful stop (SIGTERM, as a
        # service manager stops it): each once the warm tier holds a random share of the input
        # in its own band, so that a fast machine's large writes cannot carry a run past its
        # end before its stop.
        total = reference["ledger"][2]
        for sig, (lo, hi) in zip((signal.SIGKILL, signal.SIGTERM, signal.SIGKILL),
                                 ((0.05, 0.15), (0.25, 0.35), (0.45, 0.55)), strict=True):
            target = int(total * rng.uniform(lo, hi))
            after = max(1, target - live.readings_count(url))
            held.append(live.kill_mid_run(cmd, env, url, after, rng.uniform(0.0, 0.1), log, sig))
        assert held[-1] < reference["ledger"][2], f"the stops came after the end: {held}"
        with pytest.raises(AssertionError):  # the run was interrupted, not finished
            assert live.ledger(url)[0] == "finished"
        live.run_to_end(cmd, env, log)

        # Warm: the very tables of the replay, and one run whose ledger is the replay's.
        live.assert_same_warm(live.warm_tables(url), reference["warm"])
        assert live.ledger(url) == reference["ledger"]
        state, rows_in, accepted, quarantined, duplicates, _ = live.ledger(url)
        assert state == "finished" and rows_in == accepted + quarantined + duplicates
        assert quarantined >= len(live.BAD_MESSAGES)

        # Cold: every accepted reading exactly once in the files a loader would read.
        keys = live.parquet_keys(cold)
        assert keys.height == accepted
        assert keys.unique().height == accepted

        # Hot: the newest reading of every node, and at least its last 48 h of readings (a
        # reading right at the 48 h edge may stay until the next trim, as writes are cut).
        hot, expected = live.hot_state(redis_url, prefix), live.expected_hot(
            reference["warm"]["readings"])
        assert hot.keys() == expected.keys()
        for node, (newest, count) in expected.items():
            assert hot[node][0] == newest and count <= hot[node][1] <= count + 1, node

        # Dead letters on their topic: the raw bytes, with reason, partition and offset.
        letters = live.dead_letters(kafka_brokers, f"{topic}.quarantine", quarantined)
        # Every message that is no reading is a dead letter (validation's quarantine records,
        # e.g. conflicting duplicates, go there too, but their count is not checked here).
        injected = sum(line in live.BAD_MESSAGES for line in path.read_bytes().splitlines())
        assert len({dict(m.headers())["id"] for m in letters}) >= injected
        reasons = {dict(m.headers())["reason"].decode() for m in letters}
        assert {"parse_error", "missing_field", "unknown_measurement"} <= reasons
        for m in letters:
            headers = dict(m.headers())
            assert headers["source"].decode().startswith(f"{topic}/")
            assert int(headers["offset"]) >= 0
        assert {m.value() for m in letters} >= {b"{not json", b'["an", "array"]'}


def test_two_workers_give_the_same_tiers_as_one(
    messages, reference, kafka_brokers, redis_url, tmp_path
):
    path, network = messages
    topic = live.publish_file(path, kafka_brokers, partitions=4)
    with fresh_database("waterflow_w2") as url, hot_prefixes(redis_url, 1) as (prefix,):
        env = live.run_env(redis_url, prefix)
        cmd = live.run_command(topic, kafka_brokers, network, url, (tmp_path / "cold").as_uri(),
                               None, "-w", "2")
        live.run_to_end(cmd, env, tmp_path / "w.log")
        live.assert_same_warm(live.warm_tables(url), reference["warm"])
        assert live.ledger(url) == reference["ledger"]
        cold = live.parquet_keys(tmp_path / "cold")
        assert cold.height == cold.unique().height == reference["ledger"][2]


#: Timely's communication thread can panic at the shutdown of a cluster ("Send thread panic",
#: seen once in a loaded full run, never alone); such an attempt is run once more. Any other
#: failure, or the panic twice, fails the test.
SHUTDOWN_PANIC = "Send thread panic"


def test_two_processes_give_the_same_warm_tier(
    messages, reference, kafka_brokers, redis_url, tmp_path
):
    path, network = messages
    topic = live.publish_file(path, kafka_brokers, partitions=4)
    for attempt in (1, 2):
        folder = tmp_path / f"attempt-{attempt}"
        folder.mkdir()
        with (
            fresh_database("waterflow_p2") as url,
            hot_prefixes(redis_url, 1) as (prefix,),
        ):
            addresses = ";".join(f"127.0.0.1:{p}" for p in live.free_ports(2))
            env = live.run_env(redis_url, prefix)
            procs = [
                live.start(
                    live.run_command(topic, kafka_brokers, network, url,
                                     (folder / "cold").as_uri(), None, "-i", str(i),
                                     "-a", addresses, "--run-id", f"two-processes-{attempt}"),
                    env, folder / f"p{i}.log",
                )
                for i in range(2)
            ]
            codes = [proc.wait(timeout=600) for proc in procs]
            logs = [(folder / f"p{i}.log").read_text() for i in range(2)]
            if attempt == 1 and any(codes) and any(SHUTDOWN_PANIC in log for log in logs):
                print(f"attempt 1 ended with {SHUTDOWN_PANIC!r}: {codes}")
                continue
            for code, log in zip(codes, logs, strict=True):
                assert code == 0, log[-4000:]
            live.assert_same_warm(live.warm_tables(url), reference["warm"])
            assert live.ledger(url)[1:] == reference["ledger"][1:]
            cold = live.parquet_keys(folder / "cold")
            assert cold.height == cold.unique().height == reference["ledger"][2]
            return


def test_replay_killed_then_rerun_equals_a_clean_replay(messages, redis_url, tmp_path):
    path, network = messages
    with (
        fresh_database("waterflow_clean") as clean,
        fresh_database("waterflow_rerun") as url,
        hot_prefixes(redis_url, 2) as (clean_prefix, prefix),
    ):
        # The reference is the same command, run once without a kill (see live_helpers).
        env = live.run_env(redis_url, clean_prefix)
        live.run_to_end(live.replay_command(path, network, clean, clean_prefix,
                                            tmp_path / "cold-clean", tmp_path / "out-clean",
                                            redis_url), env, tmp_path / "clean.log")
        reference = {"warm": live.warm_tables(clean), "ledger": live.ledger(clean)}

        cold = tmp_path / "cold"
        cmd = live.replay_command(path, network, url, prefix, cold, tmp_path / "out", redis_url)
        env = live.run_env(redis_url, prefix)
        env["WATERFLOW_HEARTBEAT_S"] = "1"
        log = tmp_path / "replay.log"
        stored = live.kill_mid_run(cmd, env, url, random.randint(1, 20000), 0.5, log)
        total = reference["ledger"][2]
        assert 0 < stored < total, "the kill came after the end of the input"

        # The killed run is not recorded as finished: missing three heartbeats, it reads as
        # interrupted, and it counts no more accepted readings than the warm tier holds.
        deadline = time.monotonic() + 30
        while live.ledgers(url)[0][0] != "interrupted":
            assert time.monotonic() < deadline, live.ledgers(url)
            time.sleep(0.5)
        killed = live.ledgers(url)[0]
        assert killed[2] <= stored

        live.run_to_end(cmd, env, log)
        live.assert_same_warm(live.warm_tables(url), reference["warm"])
        runs = live.ledgers(url)
        assert [r[0] for r in runs] == ["interrupted", "finished"]
        assert runs[1] == reference["ledger"]
        keys = live.parquet_keys(cold)
        assert keys.height == keys.unique().height == total
