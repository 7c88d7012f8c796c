"""The resource-adaptive ratio policy."""

from __future__ import annotations

import pytest

from rabo import config
from rabo.engine import ClientHyper
from rabo.models import build_model
from rabo.policy import (
    LinkEstimate,
    Resources,
    choose_ratio,
    estimate_flops,
    estimate_memory,
    transfer_bytes,
)
from rabo.tasks import HyperRepresentation

LADDER = [1.0, 0.5, 0.25, 0.125, 0.0625]


@pytest.fixture
def setup():
    model = build_model("mlp", (1, 28, 28), 10, [2048, 2048])
    task = HyperRepresentation(model, mu=0.01)
    hp = ClientHyper.from_config(config.load(None))
    return task, hp


def test_memory_and_flops_shrink_with_the_ratio(setup) -> None:
    task, hp = setup
    mems = [estimate_memory(task, hp, r, 64) for r in LADDER]
    flops = [estimate_flops(task, hp, r, 64) for r in LADDER]
    assert mems == sorted(mems, reverse=True) and flops == sorted(flops, reverse=True)
    # hidden-heavy: halving the width quarters the hidden-to-hidden part
    assert mems[1] / mems[0] < 0.4 and flops[1] / flops[0] < 0.4


def test_largest_fitting_ratio_is_chosen(setup) -> None:
    task, hp = setup
    mem = {r: estimate_memory(task, hp, r, 64) for r in LADDER}
    for r in LADDER:
        budget = int(mem[r] / 0.8) + 1  # exactly enough for r with the safety factor
        choice = choose_ratio(task, hp, Resources(budget), LADDER, 0.8, 0.0, 64)
        assert choice.ratio == r, (r, choice)
        assert choice.memory_bytes == mem[r]
    # a larger budget never picks a smaller ratio
    picks = [choose_ratio(task, hp, Resources(b), LADDER, 0.8, 0.0, 64).ratio
             for b in (2**20 * m for m in (1, 8, 32, 128, 1024))]
    assert [p or 0 for p in picks] == sorted(p or 0 for p in picks)


def test_nothing_fits_says_why(setup) -> None:
    task, hp = setup
    choice = choose_ratio(task, hp, Resources(1024), LADDER, 0.8, 0.0, 64)
    assert choice.ratio is None
    assert "smallest ratio 0.0625 needs" in choice.reason and "safety 0.8" in choice.reason


def test_deadline_excludes_slow_ratios(setup) -> None:
    task, hp = setup
    flops = {r: estimate_flops(task, hp, r, 64) for r in LADDER}
    rate = 1e9
    deadline = flops[0.25] / rate * 1.01  # 0.25 just fits, 0.5 does not
    choice = choose_ratio(task, hp, Resources(2**40, rate), LADDER, 0.8, deadline, 64)
    assert choice.ratio == 0.25 and choice.step_s <= deadline
    none = choose_ratio(task, hp, Resources(2**40, 1.0), LADDER, 0.8, 1e-3, 64)
    assert none.ratio is None and "deadline" in none.reason


def test_link_estimate_fits_a_fixed_part_and_seconds_per_byte() -> None:
    est = LinkEstimate()
    est.add(0, 1.0)  # nothing moved: no sample
    est.add(1000, 0.0)  # not measured (in-process)
    est.add(1000, float("nan"))
    assert est.samples == 0 and est.s_per_byte == 0.0 and est.mbit_per_s == 0.0
    # the probe round: one size seen, so no fixed part yet; the bytes carry all the time
    est.add(30_000, 0.06)
    assert est.fixed_s == 0.0 and est.s_per_byte == pytest.approx(2e-6)
    # a large round: two sizes give the fixed part (latency and overhead) and the link's rate,
    # so the probe's overhead no longer makes the link look 10x slower than it is
    est.add(2_400_000, 0.26)
    slope = 0.20 / 2_370_000
    assert est.s_per_byte == pytest.approx(slope, rel=1e-6)
    assert est.fixed_s == pytest.approx(0.06 - 30_000 * slope, rel=1e-6)
    assert est.predict(2_400_000) == pytest.approx(0.26) and est.mbit_per_s > 90
    # the link slows down: the newest rounds weigh most (LINK_FORGET per newer sample)
    for _ in range(4):
        est.add(2_400_000, 2.0)
    assert 1.5 < est.predict(2_400_000) < 2.0
    est.decay()
    assert 0.75 < est.predict(2_400_000) < 1.0


def test_link_policy_probes_then_fits_step_plus_transfer(setup) -> None:
    task, hp = setup
    big = 2**40
    # the link is not measured yet: the smallest ratio, whatever the memory allows
    probe = choose_ratio(task, hp, Resources(big, 1e9), LADDER, 0.8, 2.0, 64, link=True)
    assert probe.ratio == min(LADDER) and probe.bound == "probe"
    assert "not measured yet" in probe.reason
    # no deadline: the link does not matter, nor without policy.link
    assert choose_ratio(task, hp, Resources(big, 1e9), LADDER, 0.8, 0.0, 64,
                        link=True).ratio == 1.0
    slow = Resources(big, 0.0, 8e-6 / 1.0)  # 1 Mbit/s
    assert choose_ratio(task, hp, slow, LADDER, 0.8, 2.0, 64).ratio == 1.0
    # the largest ratio whose transfer fits: just above the transfer time of 0.25
    deadline = transfer_bytes(task, 0.25) * slow.link_s_per_byte * 1.01
    choice = choose_ratio(task, hp, slow, LADDER, 0.8, deadline, 64, link=True)
    assert choice.ratio == 0.25 and choice.bound == "link"
    assert choice.transfer_s <= deadline
    assert "transfer at 1 Mbit/s" in choice.reason and "ratio 0.5 needs" in choice.reason
    # 16-bit slices halve the bytes: the same link then carries the next ratio's... at 2x
    half = choose_ratio(task, hp, slow, LADDER, 0.8, deadline, 64, link=True, element_bytes=2)
    assert half.ratio == 0.25 and half.transfer_s == pytest.approx(choice.transfer_s / 2)
    assert transfer_bytes(task, 0.5, 2) == transfer_bytes(task, 0.5) // 2
    # the compute counts too: with a step that takes most of the deadline, a smaller ratio
    flops = estimate_flops(task, hp, 0.25, 64)
    busy = Resources(big, flops / (0.9 * deadline), slow.link_s_per_byte)
    assert choose_ratio(task, hp, busy, LADDER, 0.8, deadline, 64, link=True).ratio < 0.25
    # a link so slow that even the smallest ratio misses the deadline: not assigned, and why
    crawl = Resources(big, 0.0, 8e-6 / 0.001)
    none = choose_ratio(task, hp, crawl, LADDER, 0.8, 1.0, 64, link=True)
    assert none.ratio is None and "transfer at 0.001 Mbit/s" in none.reason
    assert none.bound == "link"
    assert choose_ratio(task, hp, Resources(1024), LADDER, 0.8, 0.0, 64).bound == "memory"


def test_a_worker_left_out_for_its_link_is_tried_again_as_its_estimate_decays() -> None:
    """The round loop's plan: a worker whose measured link misses the deadline even at the
    smallest ratio is not assigned, but its estimate halves each round it is left out, so it
    gets the smallest ratio again (and is measured afresh) instead of being out for good."""
    from rabo.job import Job
    from rabo.rounds import Member, RoundLoop, Transport

    class Links(Transport):
        measures_links = True

    job = Job.from_config(config.load(None, [
        "data.dataset=digits", "model.hidden=[64]", "clients.count=1", "policy.link=true",
        "policy.deadline_s=1"]))
    loop = RoundLoop(job, Links(), job.engine.init_state())
    est = LinkEstimate()
    est.add(1000, 16.0)  # 16 ms per byte: even the smallest ratio misses 1 s by far
    loop.links["w"] = est
    member = Member("w", 0, Resources(2**40, 0.0))
    smallest = transfer_bytes(job.task, min(job.cfg.policy.ladder))
    assigned = []
    for q in range(1, 40):
        tasks, out = loop.plan(q, [member])
        assigned.append(bool(tasks))
        if tasks:
            break
        assert "transfer at" in out["w"]
    first = assigned.index(True)
    assert first > 0  # left out at first
    assert est.predict(smallest) <= 1.0  # tried again once the decayed estimate fits
    # the simulator measures no links: no probe, the ladder's largest
    (task,), _ = RoundLoop(job, Transport(), job.engine.init_state()).plan(1, [member])
    assert task.plan.ratio == 1.0 and task.bound != "probe"


def test_simulated_memory_budgets_map_to_ratios() -> None:
    from rabo.job import Job

    cfg = config.load(None, ["data.dataset=digits", "model.hidden=[512, 512]", "clients.count=3",
                             "clients.memory_budgets=[1GiB, 24MiB, 1KiB]"])
    ratios = Job.from_config(cfg).simulated_ratios()
    assert ratios[0] == 1.0 and 0 < ratios[1] < 1.0 and ratios[2] == 0.0


def test_each_worker_record_says_what_bound_its_ratio_and_the_estimates(tmp_path) -> None:
    """metrics.jsonl carries, per worker, the resource that bound its ratio and the policy's
    estimates beside the measurements; the round line shows the binding resource."""
    from rabo.metrics import read_metrics
    from rabo.runner import format_progress, simulate

    cfg = config.load(None, ["data.dataset=digits", "model.hidden=[512, 512]",
                             "clients.count=2", "clients.memory_budgets=[1GiB, 24MiB]",
                             "rounds=1"])
    simulate(cfg, tmp_path)
    (rec,) = read_metrics(tmp_path)
    big, small = rec["clients"]
    assert big["ratio"] == 1.0 and big["bound"] == "none"
    assert small["ratio"] < 1.0 and small["bound"] == "memory"
    from rabo.job import Job

    job = Job.from_config(cfg)
    for c in (big, small):
        assert c["estimated_peak_mem_bytes"] == estimate_memory(
            job.task, job.hyper, c["ratio"], job.step_batch(c["client_id"]))
        assert c["estimated_s"] == 0.0  # no deadline, no throughput: no time estimate
    assert f"ratios [1,{small['ratio']:g}(memory)]" in format_progress(rec, 1)
    fixed = config.load(None, ["data.dataset=digits", "clients.count=2",
                               "clients.ratios=[1, 0.5]", "rounds=1"])
    simulate(fixed, tmp_path / "fixed")
    assert {c["bound"] for c in read_metrics(tmp_path / "fixed")[0]["clients"]} == {"fixed"}


def test_modes_full_and_exclusion() -> None:
    from rabo.job import Job

    base = ["data.dataset=digits", "model.hidden=[512, 512]", "clients.count=3",
            "clients.memory_budgets=[1GiB, 24MiB, 1KiB]"]
    full = Job.from_config(config.load(None, [*base, "clients.mode=full"])).simulated_ratios()
    excl = Job.from_config(config.load(None, [*base, "clients.mode=exclusion"])
                           ).simulated_ratios()
    assert full == [1.0, 1.0, 1.0]
    assert excl == [1.0, 0.0, 0.0]
    job = Job.from_config(config.load(None, [*base, "clients.mode=exclusion"]))
    ratio, why = job.ratio_for(1, None)
    assert ratio == 1.0  # no limit known: fits the full model, so it takes part
