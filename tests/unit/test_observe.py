from connectors.metrics import REGISTRY
from dataflows.model import AnomalyEvent
from dataflows.observe import OpenAnomalies


def _event(ended_at=None):
    return AnomalyEvent("obs-1", "obs-node", "flow_rate", "leak", 0, ended_at, 0.9, 1.0, 2.0, 3.0)


def _active():
    labels = {"node_id": "obs-node", "kind": "leak"}
    return REGISTRY.get_sample_value("waterflow_active_anomalies", labels) or 0.0


def test_an_event_reported_again_is_counted_once_and_uncounted_when_it_ends():
    opened = OpenAnomalies()
    before = _active()
    opened.record([_event()])
    opened.record([_event()])  # an open event is re-sent with every batch that changes it
    assert _active() == before + 1
    opened.record([_event(ended_at=10)])
    assert _active() == before
    opened.record([_event(ended_at=10)])  # a closed event reported again changes nothing
    assert _active() == before


def test_district_events_count_on_the_district_gauge_only():
    from dataflows.observe import OPEN_DISTRICT_ANOMALIES

    def district(name):
        labels = {"district": name, "kind": "leak"}
        return REGISTRY.get_sample_value("waterflow_district_active_anomalies", labels) or 0.0

    event = AnomalyEvent("obs-d", "obs-d9", "mnf", "leak", 0, None, 0.9, 1.0, 2.0, 3.0)
    node_before, before = _active(), district("obs-d9")
    OPEN_DISTRICT_ANOMALIES.record([event])
    assert district("obs-d9") == before + 1 and _active() == node_before
    OPEN_DISTRICT_ANOMALIES.record([AnomalyEvent("obs-d", "obs-d9", "mnf", "leak", 0, 5, 0.9,
                                                 1.0, 2.0, 3.0)])
    assert district("obs-d9") == before
