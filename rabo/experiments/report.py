"""``rabo experiment report``: docs/RESULTS.md from the JSON files in docs/results alone.

Every number in the report is read from those files (written by ``rabo experiment ...``,
``rabo bench system``, and ``make bench``'s ``rabo bench estimator --json`` /
``rabo bench transport --json``); verdicts are computed by fixed rules stated next to them.
Missing files leave their section out with a note.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rabo.experiments import ablations, claims, communication, coverage, estimators, system
from rabo.experiments.common import read_results
from rabo.experiments.markdown import table

# --------------------------------------------------------------------------- the document


def build_report(results: dict[str, dict[str, Any]], rel: str) -> str:
    parts: list[str] = []
    heads: list[dict[str, str]] = []
    if "claims" in results:
        text, h = claims.section(results["claims"], rel)
        parts.append(text)
        heads += h
    else:
        parts.append("## 1. Claims\n\n(no claims.json: run `rabo experiment claims`)\n")
    if "ablations" in results:
        text, h = ablations.section(results["ablations"], rel)
        parts.append(text)
        heads += h
    if "estimators" in results or "bench_estimator" in results:
        text, h = estimators.section(results.get("estimators"), results.get("bench_estimator"),
                                     rel)
        parts.append(text)
        heads += h
    for name, d in sorted(results.items()):
        if not name.startswith("bench_estimator_"):
            continue
        gpu = d.get("machine", {}).get("gpu") or d.get("device", "?")
        text, h = estimators.bench_estimator_block(d, name)
        parts.append(f"### 2b. Estimator cost on {gpu}\n\n*Produced by* `rabo bench estimator "
                     f"--device {d.get('device')} --json` on a lent machine; kept here as "
                     f"`{name}.json`, not part of `make bench`.\n\n" + text)
        heads += h
    if "coverage" in results:
        text, h = coverage.section(results["coverage"], rel)
        parts.append(text)
        heads += h
    if "communication" in results or "bench_transport" in results:
        text, h = communication.section(results.get("communication"),
                                        results.get("bench_transport"), rel)
        parts.append(text)
        heads += h
    if "system" in results:
        text, h = system.section(results["system"], rel)
        parts.append(text)
        heads += h
    for name, d in sorted(results.items()):
        if not name.startswith("system_") or not d.get("ratio"):
            continue
        m = d.get("machine", {})
        gpu = m.get("gpu") or d["ratio"].get("device")
        text, h = system.ratio_block(d["ratio"], rel, f"{name}_ratio.png")
        parts.append(f"### 5b. Per-ratio worker cost on {gpu}\n\n*Produced by* "
                     f"`{d['command']}` on a lent machine with an {gpu} (torch "
                     f"{m.get('torch', '?')}), {d.get('generated', '?')}; its `system.json` "
                     f"is kept here as `{name}.json`. A GPU step of these small models is "
                     f"bound by kernel launches, so its time hardly depends on the ratio; "
                     f"the allocator's peak is exact.\n\n" + text)
        heads += h
    if "bench_network_link" in results:
        from rabo.experiments import links

        text, h = links.section(results["bench_network_link"])
        parts.append(text)
        heads += h
    if "bench_policy" in results:
        from rabo.experiments import calibration

        text, h = calibration.section(results["bench_policy"])
        parts.append(text)
        heads += h
    if "robust" in results:
        from rabo.experiments import robust

        text, h = robust.section(results["robust"], rel)
        parts.append(text)
        heads += h
    if "models" in results:
        from rabo.experiments import models

        text, h = models.section(results["models"], rel)
        parts.append(text)
        heads += h
    slow_links = {name.removeprefix("bench_network_wire_"): d for name, d in results.items()
             if name.startswith("bench_network_wire_")}
    if "wire" in results or slow_links:
        from rabo.experiments import wire

        text, h = wire.section(results["wire"], rel) if "wire" in results else (
            "## 8. Compressed slices on the wire\n\n(no wire.json: run `rabo experiment "
            "wire`)\n", [])
        if slow_links:
            block, lh = wire.link_block(slow_links)
            text += "\n" + block
            h += lh
        parts.append(text)
        heads += h
    from rabo.experiments.cli import BENCH_GROUPS

    walls: list[tuple[str, float]] = [(name, float(d["wall_s"])) for name, d in results.items()
                                      if isinstance(d, dict) and d.get("wall_s") is not None
                                      and not name.startswith(("system_", "bench_"))]
    in_bench = [(n, w) for n, w in walls if n in (*BENCH_GROUPS, "system")]
    apart = [(n, w) for n, w in walls if (n, w) not in in_bench]
    stored = sum(int(d.get("stored_runs") or 0) for d in results.values()
                 if isinstance(d, dict))
    presets = sorted({d.get("preset", "?") for name, d in results.items()
                      if isinstance(d, dict) and "preset" in d and not name.startswith("system_")})
    head = [
        "# Results",
        "",
        "Generated by `rabo experiment report` from the JSON files in `docs/results/` (written "
        "by `rabo experiment "
        "claims|ablations|estimators|coverage|communication|robust|models|wire`, "
        "`rabo bench system`, "
        "and `make bench`'s `rabo bench estimator --json` / `rabo bench transport --json`). "
        "Do not edit by hand: every number below is read from those files, and every verdict "
        "is computed from them by the rule stated next to it. Simulations use the in-process "
        "runner (`rabo.runner.simulate`), which the parity tests pin to the gRPC and "
        "torch.distributed transports.",
        "",
        f"Presets in these files: {', '.join(presets) or 'none'} (`reduced` is what `make "
        f"bench` runs; `FULL=1 make bench` / `--full` runs the whole grids). Wall time per "
        f"results file of `make bench` (s): " + ", ".join(f"{n} {w:.0f}" for n, w in in_bench)
        + f"; total {sum(w for _, w in in_bench):.0f} s, to which `rabo bench estimator` and "
        "`rabo bench transport` add their own (their JSON carries no wall time)"
        + (". Run apart (`make ablations`): " + ", ".join(f"{n} {w:.0f}" for n, w in apart)
           if apart else "")
        + (f". {stored} simulations were served by the run store (the same configuration on "
           "the same code, run for an earlier experiment: e.g. RABO's own runs in the "
           "estimator and ablation grids); they add no time" if stored else "")
        + ". Files named "
        "`system_<device>.json` and `bench_estimator_<device>.json` come from runs on a lent "
        "accelerator machine and are not part of `make bench`.",
        "",
        "Timing caveat: a 2-core machine shared with other jobs while these ran; times are "
        "medians where repeated, and still noisy (20% and more between runs).",
        "",
        "## Headline",
        "",
        table(["claim", "verdict", "evidence (from the sections below)"],
              [[h["claim"], h["verdict"], h["evidence"]] for h in heads]),
        "",
    ]
    return "\n".join(head + parts)


def write_report(results_dir: Path, target: Path) -> Path:
    import os

    results = read_results(results_dir)
    rel = os.path.relpath(Path(results_dir).resolve(), Path(target).resolve().parent)
    text = build_report(results, rel)
    # regenerate the plots from the same JSON, so the figures never disagree with the tables
    for name, mod in (("claims", claims), ("ablations", ablations), ("estimators", estimators),
                      ("coverage", coverage), ("communication", communication)):
        if name in results:
            mod.plot(results[name], Path(results_dir))
    from rabo.experiments import system

    for name, d in results.items():
        if name == "system" or name.startswith("system_"):
            system.plot(d, Path(results_dir))
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return target
