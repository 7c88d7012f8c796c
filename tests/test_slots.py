"""Client slots follow a worker's instance secret across coordinator restarts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.registry import Registry, RegistryError, RegistryFull
from rabo_proto.v1 import rabo_pb2 as pb
from worker.client import WorkerExit, instance_secret

P = pb.ResourceProfile()


def test_a_restarted_registry_gives_each_instance_its_slot_back(tmp_path: Path) -> None:
    path = tmp_path / "slots.json"
    first = Registry(3, 60.0, slots_file=path)
    assert [first.register("w", P, -1, instance=s).client_id for s in "abc"] == [0, 1, 2]
    text = path.read_text()
    assert all(s not in json.loads(text)["slots"] for s in "abc")  # hashes, not secrets
    again = Registry(3, 60.0, slots_file=path)  # the coordinator restarted from its folder
    assert again.register("w", P, -1, instance="c").client_id == 2  # back in any order
    assert again.register("w", P, -1, instance="a").client_id == 0
    # a newcomer takes a slot nobody owns; none is left but b's, and b is away: b's slot
    # goes to the newcomer (so a worker that never comes back cannot block the job)
    assert again.register("w", P, -1, instance="new").client_id == 1
    with pytest.raises(RegistryFull, match="all 3 client slots are taken"):
        again.register("w", P, -1, instance="b")
    # the same instance registering again replaces its own earlier session
    rec = again.register("w", P, -1, instance="a")
    assert rec.client_id == 0 and len(again) == 3


def test_newcomers_leave_the_slots_of_known_instances_free(tmp_path: Path) -> None:
    path = tmp_path / "slots.json"
    first = Registry(3, 60.0, slots_file=path)
    first.register("w", P, -1, instance="a")  # slot 0
    first.register("w", P, -1, instance="b")  # slot 1
    again = Registry(3, 60.0, slots_file=path)
    assert again.register("w", P, -1, instance="x").client_id == 2  # not a's or b's
    assert again.register("w", P, -1, instance="b").client_id == 1


def test_a_broken_slot_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "slots.json"
    path.write_text("{not json")
    with pytest.raises(RegistryError, match="slots.json: not a slot file"):
        Registry(2, 60.0, slots_file=path)


def test_the_worker_keeps_its_secret_in_its_state_file(tmp_path: Path) -> None:
    state = tmp_path / "state" / "worker.id"
    first = instance_secret(str(state))
    assert len(first) == 32 and instance_secret(str(state)) == first
    assert oct(state.stat().st_mode & 0o777) == "0o600"
    assert instance_secret(None) != instance_secret(None)
    state.write_text("garbage\n")
    with pytest.raises(WorkerExit, match="not a worker state file"):
        instance_secret(str(state))


def test_a_retry_waits_for_workers_still_loading_their_job() -> None:
    """A round retried for want of updates does not spend its next try while registered
    workers are still loading (a restarted pod reading its data): it waits for their ready
    profile (bounded by cluster.register_timeout_s)."""
    import threading
    import time

    from coordinator.server import serve
    from rabo import config

    cfg = config.load(None, ["data.dataset=digits", "model.hidden=[16]", "clients.count=3",
                             "cluster.workers=3", "cluster.min_workers=2",
                             "cluster.register_timeout_s=30"])
    server = serve(cfg, None, bind="127.0.0.1:0", linger_s=0)
    try:
        reg = server.coord.registry
        reg.register("a", pb.ResourceProfile(memory_budget_bytes=1 << 30), 0)
        b = reg.register("b", pb.ResourceProfile(memory_budget_bytes=1 << 30, loading=True), 1)
        became_ready = threading.Event()

        def ready_later() -> None:
            time.sleep(0.5)
            became_ready.set()
            reg.touch(b.worker_id, pb.ResourceProfile(memory_budget_bytes=1 << 30))

        t = threading.Thread(target=ready_later)
        t.start()
        server.driver._wait_loading()
        assert became_ready.is_set()  # it returned only once b was ready
        assert not reg.get(b.worker_id).profile.loading
        t.join()
        # nobody loading: no wait at all
        server.driver._wait_loading()
    finally:
        server.stop(0)
