"""The spot watcher against a fake IMDSv2 on loopback (a real HTTP server), without Ray: the
token flow, a token refreshed after 401, 404 = no notice, notices well-formed or not, IMDS gone,
a drain that fails, and finding this machine's node among the GCS's."""
import logging
import threading
import time

import pytest

from rn50.distributed import spot_watcher as sw
from tests.fake_imds import NOTICE, REBALANCE, FakeImds

NODE = "ab" * 28


@pytest.fixture
def imds():
    server = FakeImds().start()
    yield server
    server.stop()


class Drains:
    """A drain function that records its calls (and can fail the first `fail` of them)."""

    def __init__(self, fail: int = 0):
        self.calls, self.fail = [], fail

    def __call__(self, node_id: str, deadline_s: int, message: str) -> None:
        self.calls.append((node_id, deadline_s, message))
        if len(self.calls) <= self.fail:
            raise RuntimeError("GCS unavailable")


def watcher(server: FakeImds, drains: Drains, **kwargs) -> sw.Watcher:
    return sw.Watcher(sw.Imds(server.url), drains, lambda: NODE, **kwargs)


def test_404_is_no_notice_and_every_get_carries_a_token(imds):
    drains = Drains()
    w = watcher(imds, drains)
    assert not any(w.poll_once() for _ in range(3))
    assert drains.calls == []
    assert imds.statuses(NOTICE) == [404, 404, 404]
    # One token (PUT with a TTL header, else the fake answers 400), reused by every GET.
    assert [m for m, _, _ in imds.requests].count("PUT") == 1
    assert all(status != 401 for _, _, status in imds.requests)


def test_notice_drains_once_with_the_deadline_at_the_action_time(imds):
    drains = Drains()
    w = watcher(imds, drains)
    imds.post_notice(in_s=90)
    thread = threading.Thread(target=sw.watch, args=(w, 0.01, threading.Event()), daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive(), "the watcher should stop once the node is drained"
    assert len(drains.calls) == 1
    node_id, deadline_s, message = drains.calls[0]
    assert node_id == NODE and 87 <= deadline_s <= 90
    assert "terminate" in message


def test_an_expired_token_is_fetched_again_after_401(imds):
    drains = Drains()
    w = watcher(imds, drains)
    assert not w.poll_once()
    imds.expire_tokens()
    imds.post_notice(in_s=60)
    assert w.poll_once()
    assert imds.statuses(NOTICE) == [404, 401, 200]
    assert [m for m, _, _ in imds.requests].count("PUT") == 2
    assert len(drains.calls) == 1


@pytest.mark.parametrize("body", ["not json", '{"action": "terminate", "time": "soon"}',
                                  '{"time": "2030-01-01T00:00:00Z"}'])
def test_a_malformed_notice_still_drains_with_awss_two_minutes(imds, body, caplog):
    drains = Drains()
    w = watcher(imds, drains)
    imds.post_notice(body=body)
    with caplog.at_level(logging.WARNING, logger="rn50.spot_watcher"):
        assert w.poll_once()
    (_, deadline_s, _), = drains.calls
    assert 118 <= deadline_s <= 120
    assert "malformed interruption notice" in caplog.text


def test_a_notice_whose_time_has_passed_drains_with_no_time_left(imds):
    drains = Drains()
    imds.post_notice(in_s=-30)
    assert watcher(imds, drains).poll_once()
    assert drains.calls[0][1] == 0


def test_unreachable_imds_is_logged_and_polling_goes_on(imds, caplog):
    gone = FakeImds().start()
    gone.stop()  # a closed port: connection refused
    drains = Drains()
    w = sw.Watcher(sw.Imds(gone.url, timeout_s=0.5), drains, lambda: NODE)
    with caplog.at_level(logging.WARNING, logger="rn50.spot_watcher"):
        assert not any(w.poll_once() for _ in range(3))
    assert caplog.text.count("IMDS unreachable") == 1, "logged once, not at every poll"
    w.imds.base_url = imds.url  # IMDS is back
    imds.post_notice(in_s=100)
    assert w.poll_once() and len(drains.calls) == 1


def test_a_failed_drain_is_tried_again_at_the_next_poll(imds):
    drains = Drains(fail=1)
    w = watcher(imds, drains)
    imds.post_notice(in_s=100)
    assert not w.poll_once()
    time.sleep(1.1)
    assert w.poll_once()
    assert len(drains.calls) == 2
    assert drains.calls[1][1] < drains.calls[0][1], "the second drain has less time left"


def test_a_rebalance_recommendation_is_logged_and_only_drains_when_asked(imds, caplog):
    imds.post_rebalance()
    drains = Drains()
    with caplog.at_level(logging.WARNING, logger="rn50.spot_watcher"):
        assert not watcher(imds, drains).poll_once()
    assert drains.calls == [] and "rebalance recommendation" in caplog.text
    assert imds.statuses(REBALANCE) == [200]
    assert watcher(imds, drains, drain_on_rebalance=True).poll_once()
    assert drains.calls[0][1] == sw.NOTICE_LEAD_S


def _node(node_id, instance_id="", ip="10.0.0.5", alive=True):
    return {"node_id": node_id, "instance_id": instance_id, "ip": ip, "alive": alive}


def test_this_machine_is_found_by_instance_id_then_by_ip():
    nodes = [_node("a", "i-1", "10.0.0.5"), _node("b", "i-2", "10.0.0.5"),
             _node("c", "i-3", "10.0.0.7"), _node("d", "i-4", "10.0.0.9", alive=False)]
    assert sw.find_node_id(nodes, "i-2", "10.0.0.5") == "b"
    assert sw.find_node_id(nodes, "i-unknown", "10.0.0.7") == "c"
    with pytest.raises(LookupError, match="pass --node-id"):
        sw.find_node_id(nodes, "", "10.0.0.5")  # two nodes on one IP: ambiguous
    with pytest.raises(LookupError):
        sw.find_node_id(nodes, "i-4", "10.0.0.9")  # that node is dead


def test_the_node_is_looked_up_from_imdss_identity(imds, monkeypatch):
    imds.values["/latest/meta-data/instance-id"] = "i-2"
    monkeypatch.setattr(sw, "gcs_nodes", lambda address: [_node("a", "i-1"), _node("b", "i-2")])
    assert sw.NodeIdentity(sw.Imds(imds.url), "head:6379")() == "b"


def test_a_bad_poll_interval_is_refused():
    with pytest.raises(SystemExit) as exit_info:
        sw.main(["--address", "127.0.0.1:6379", "--poll-s", "0"])
    assert exit_info.value.code == 2


def test_an_unexpected_error_is_logged_and_the_watcher_polls_on(imds, caplog):
    class Flaky(sw.Imds):
        calls = 0

        def get(self, path):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise KeyError("a bug")
            return super().get(path)
    drains = Drains()
    imds.post_notice(in_s=100)
    thread = threading.Thread(target=sw.watch, daemon=True, args=(
        sw.Watcher(Flaky(imds.url), drains, lambda: NODE), 0.01, threading.Event()))
    with caplog.at_level(logging.ERROR, logger="rn50.spot_watcher"):
        thread.start()
        thread.join(timeout=10)
    assert not thread.is_alive() and len(drains.calls) == 1
    assert "unexpected error in the spot watcher" in caplog.text
