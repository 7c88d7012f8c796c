"""``rabo experiment report``: docs/RESULTS.md from the JSON files in docs/results alone.

Every number in the report is read from those files (written by ``rabo experiment ...``,
``rabo bench system``, and ``make bench``'s ``rabo bench estimator --json`` /
``rabo bench transport --json``); verdicts are computed by fixed rules stated next to them.
Missing files leave their section out with a note.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rabo.experiments import claims, common, communication, coverage, estimators
from rabo.experiments.common import read_results

MIB = 2**20


# --------------------------------------------------------------------------- formatting


def pct(st: dict[str, Any] | None) -> str:
    """Accuracy statistics as 'mean ± std (min-max)' in percent."""
    if not st or st.get("mean") is None:
        return "n/a"
    if st["n"] == 1:
        return f"{100 * st['mean']:.1f}"
    return (f"{100 * st['mean']:.1f} ± {100 * st['std']:.1f} "
            f"({100 * st['min']:.1f}–{100 * st['max']:.1f})")


def pct1(st: dict[str, Any] | None) -> str:
    """The mean only, in percent."""
    if not st or st.get("mean") is None:
        return "n/a"
    return f"{100 * st['mean']:.1f}"


def num(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def sig(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}g}"


def mean_of(st: dict[str, Any] | None, digits: int = 3) -> str:
    return num(st.get("mean") if st else None, digits)


def ratios_str(ratios: list[float]) -> str:
    from collections import Counter

    c = Counter(ratios)
    return ", ".join(f"{n}x{r:g}" for r, n in sorted(c.items(), reverse=True))


def table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def produced_by(data: dict[str, Any], extra: str = "") -> str:
    cfgs = ", ".join(f"`{c}`" for c in data.get("configs", []))
    when = data.get("generated", "?")
    m = data.get("machine", {})
    load = m.get("loadavg_at_end")
    load_s = f", load average at the end {load[0]:.1f}" if load else ""
    if m.get("git_commit"):
        mod = m.get("git_modified_files") or []
        load_s += f"; commit {m['git_commit']}" + (f" with {len(mod)} locally modified "
                                                   f"file(s)" if mod else "")
    return (f"*Produced by* `{data['command']}` (preset `{data['preset']}`)"
            + (f" from {cfgs}" if cfgs else "") + f"{extra}; {data.get('wall_s', 0):.0f} s "
            f"on {m.get('cpus', '?')} CPUs ({m.get('platform', '?')}, torch "
            f"{m.get('torch', '?')}{load_s}), {when}.")


def image(name: str, results_rel: str, alt: str) -> str:
    return f"![{alt}]({results_rel}/{name})"


def verdict_word(ok: int, n: int) -> str:
    if n == 0:
        return "not tested"
    if ok == n:
        return "supported"
    if ok == 0:
        return "**not supported**"
    return f"**partly supported** ({ok} of {n})"


def settings_line(cfg: dict[str, Any]) -> str:
    m, d, c, i, o, e = (cfg["model"], cfg["data"], cfg["clients"], cfg["inner"], cfg["outer"],
                        cfg["estimator"])
    hidden = "-".join(str(h) for h in m["hidden"])
    return (f"task {cfg['task']}, {cfg['algorithm'].upper()}, {m['kind']} {hidden}"
            f"{'' if m['scaler'] in ('none', False) else ', ' + str(m['scaler']) + ' scaler'}"
            f", {c['count']} clients, batch "
            f"{d['batch_size']}, K = {i['steps']} inner steps (lr {i['lr']:g}), x optimizer "
            f"{o['optimizer']} (lr {o['lr']:g}), estimator {e['name']} (delta {e['delta']:g}, "
            f"eta_v {e['eta_v']:g}, R {e['radius']:g}), masks {cfg['mask']['policy']}, "
            f"lower level {cfg['lower_level']}, aggregation weighting "
            f"{cfg['aggregation']['weighting']}")


# --------------------------------------------------------------------------- sections


def _class_and_width_tables(rows: list[dict[str, Any]], task: str) -> list[str]:
    """Per-class accuracy of the core methods in the non-iid settings (where a gap comes
    from), and RABO's global model at each width (HeteroFL's per-width accuracy)."""
    out: list[str] = []
    skewed = [r for r in rows if r["task"] == task and r["split"] != "iid"
              and r["method"] in claims.BASELINES and r.get("test_acc_per_class")]
    if skewed:
        classes = len(skewed[0]["test_acc_per_class"])
        out.append(f"Task {task}, non-iid settings: final test accuracy per class (%, mean over "
                   "seeds), which shows where the gap to the full model comes from:")
        out.append("")
        out.append(table(["data", "split", "method", *[str(c) for c in range(classes)]],
                         [[r["dataset"], r["split"], r["method"],
                           *["-" if a is None else f"{100 * a:.0f}"
                             for a in r["test_acc_per_class"]]] for r in skewed]))
        out.append("")
    widths = [r for r in rows if r["task"] == task and r["method"] == "RABO"
              and r.get("test_acc_per_width")]
    if widths:
        keys = sorted(widths[0]["test_acc_per_width"], key=float, reverse=True)
        out.append(f"Task {task}, RABO: test accuracy of the global model's submodel at each "
                   "width (%, mean over seeds; the mask of the last round):")
        out.append("")
        out.append(table(["data", "split", *[f"r = {k}" for k in keys]],
                         [[r["dataset"], r["split"],
                           *[f"{100 * r['test_acc_per_width'][k]:.1f}" for k in keys]]
                          for r in widths]))
        out.append("")
    return out


def section_claims(data: dict[str, Any], rel: str) -> tuple[str, list[dict[str, str]]]:
    s = data["settings"]
    lines = ["## 1. RABO and RAFBO against the full model, exclusion and the mask policies", ""]
    lines.append(produced_by(data))
    lines.append("")
    lines.append("Settings: " + "; ".join(settings_line(c) for c in data["base_configs"].values())
                 + ".")
    if s.get("extra_overrides"):
        lines.append(f"Overrides on every run of this preset: "
                     f"`{' '.join(s['extra_overrides'])}`.")
    lines.append(f"Seeds {s['seeds']}, {s['rounds']} rounds. Per method overrides: "
                 + "; ".join(f"{m}: `{' '.join(v) or '(none)'}`" for m, v in s["methods"].items())
                 + ". Per data set: " + "; ".join(f"{k}: `{' '.join(v) or '(none)'}`"
                                                 for k, v in s["dataset_overrides"].items())
                 + ". Splits: " + "; ".join(f"{k}: `{' '.join(v)}`"
                                            for k, v in s["split_overrides"].items()) + ".")
    lines.append(f"Clients' memory budgets (`clients.memory_budgets`) are derived per run from "
                 f"`rabo.policy.estimate_memory` so that the ratio policy picks "
                 f"{', '.join(f'{r:g}' for r in s['tier_ratios'])} (cycled over the clients); "
                 "the chosen ratios are checked and listed. `full` puts every client at ratio 1; "
                 "`exclusion` keeps only the clients that fit ratio 1.")
    lines.append("")
    rows = claims.rows(data)
    for task in sorted({r["task"] for r in rows}):
        lines.append(f"**Task {task}** (final test accuracy of the full-width global model "
                     f"in %, mean ± std (min–max) over seeds, at round {s['rounds']}; early = "
                     f"at round {common.EARLY_ROUND}, still warming up; upper loss = the global "
                     "model's validation loss over every client's split; clients' f = the "
                     "clients' own submodel losses at the start of the last round (a "
                     "different quantity); payload = tensor bytes of all clients per round, "
                     "both ways; worker compute = sum over clients of `compute_s` per round; "
                     "x change = ||x_Q - x_0|| / ||x_0||):")
        lines.append("")
        lines.append(table(
            ["data", "split", "method", "ratios", "test acc %", "best acc %", "early acc %",
             "upper loss", "clients' f", "C_x*", "payload MiB/round",
             "worker compute s/round", "x change"],
            [[r["dataset"], r["split"], r["method"], ratios_str(r["ratios"]),
              pct(r["test_acc"]), pct1(r["best_test_acc"]), pct1(r["early_test_acc"]),
              mean_of(r["upper_loss"], 3), mean_of(r["client_upper_loss"], 3),
              mean_of(r["C_x_star"], 1),
              mean_of(r["payload_mib_per_round"], 2), mean_of(r["compute_s_per_round"], 3),
              mean_of(r["x_rel_change"], 3)] for r in rows if r["task"] == task]))
        lines.append("")
        lines.extend(_class_and_width_tables(rows, task))
        for name in (f"claims_curves_{task}.png", f"claims_final_{task}.png"):
            lines.append(image(name, rel, name))
        lines.append("")
    if any(r["method"] in claims.MASKS + claims.MASKS_SCALER for r in rows):
        lines.append(image("claims_masks.png", rel, "mask policies"))
        lines.append("")
    v = claims.verdicts(data)
    heads: list[dict[str, str]] = []

    def summarize(items: list[dict[str, Any]], key: str) -> str:
        by_split: dict[str, list[dict[str, Any]]] = {}
        for it in items:
            by_split.setdefault("iid" if it["setting"].endswith("/iid") else "non-iid",
                                []).append(it)
        return "; ".join(f"{k}: {sum(1 for i in its if i['ok'])} of {len(its)}"
                         for k, its in sorted(by_split.items()))

    close = v["close_to_full"]
    if close:
        worst = max(close, key=lambda c: c["gap"])
        ok = sum(1 for c in close if c["ok"])
        rule = ", ".join(f"{k} {100 * t:g}" for k, t in claims.GAP_TARGET.items())
        each = "; ".join(f"{c['setting']} {100 * c['gap']:+.1f} (target <= "
                         f"{100 * c['target']:g}{'' if c['ok'] else ': MISSED'})"
                         for c in close)
        text = (f"RABO within its target of the full model in {ok} of {len(close)} settings "
                f"({summarize(close, 'gap')}); largest gap {100 * worst['gap']:.1f} points "
                f"({worst['setting']}). Gap full - RABO in points: {each}")
        lines.append(f"- **Mixed ratios close to the full model** (rule: mean gap at most, in "
                     f"points, {rule}): {verdict_word(ok, len(close))}. {text}.")
        heads.append({"claim": "Resource-adaptive RABO (ratios 1..1/8) is close to the full "
                               "model (all at ratio 1)",
                      "verdict": verdict_word(ok, len(close)), "evidence": text})
    beats = v["beats_exclusion"]
    if beats:
        ok = sum(1 for b in beats if b["ok"])
        best = max(beats, key=lambda b: b["diff"])
        worst = min(beats, key=lambda b: b["diff"])
        text = (f"RABO above exclusion by more than the seeds' std in {ok} of {len(beats)} "
                f"settings ({summarize(beats, 'diff')}); differences from "
                f"{100 * worst['diff']:+.1f} ({worst['setting']}) to {100 * best['diff']:+.1f} "
                f"points ({best['setting']})")
        lines.append(f"- **Training the small clients' submodels beats excluding them** (rule: "
                     f"mean difference > the larger std): {verdict_word(ok, len(beats))}. "
                     f"{text}.")
        heads.append({"claim": "Including resource-limited clients (dual pruning) beats "
                               "excluding them", "verdict": verdict_word(ok, len(beats)),
                      "evidence": text})
    rf = v["rafbo_vs_rabo"]
    if rf:
        ok = sum(1 for b in rf if b["ok"])
        text = "; ".join(f"{b['setting']}: {100 * b['diff']:+.1f}" for b in rf)
        lines.append(f"- **RAFBO matches RABO** (rule: |mean difference| <= 2 points): "
                     f"{verdict_word(ok, len(rf))}. RAFBO - RABO in points: {text}.")
        heads.append({"claim": "RAFBO reaches what RABO reaches",
                      "verdict": verdict_word(ok, len(rf)),
                      "evidence": f"RAFBO - RABO (points): {text}"})
        t_steps = [o.split("=", 1)[1] for o in s["methods"].get("RAFBO", [])
                   if o.startswith("outer.local_steps=")]
        if t_steps:
            lines.append(f"  (RAFBO runs `outer.local_steps={t_steps[0]}` local iterations per "
                         f"round, each with the K inner steps, so its clients do "
                         f"{t_steps[0]}x RABO's lower-level work per round: see the worker "
                         f"compute column. Equal rounds are not equal work.)")
    mask_names = claims.MASKS + claims.MASKS_SCALER + claims.SKEW
    masks = [r for r in rows if r["method"] in ("RABO", *mask_names)
             and any(x["method"] in mask_names and x["task"] == r["task"]
                     and x["dataset"] == r["dataset"] and x["split"] == r["split"]
                     for x in rows)]
    if masks:
        text = "; ".join(f"{r['task']}/{r['dataset']}/{r['split']} "
                         + (f"RABO ({claims._mask_label(data, r['task'])})"
                            if r["method"] == "RABO" else r["method"])
                         + f": {pct(r['test_acc'])}" for r in masks)
        lines.append(f"- **Masks, scalers and weighting against RABO's own setting** (final "
                     f"test accuracy %; the table above has the spread): {text}.")
    up = v["upper_level_helps"]
    if up:
        ok = sum(1 for b in up if b["ok"])
        text = "; ".join(f"{b['setting']}: {100 * b['diff']:+.1f} points (std "
                         f"{100 * b['spread']:.1f})" for b in up)
        lines.append(f"- **The upper level contributes** (control: the same run with x frozen "
                     f"at its initialisation, `outer.lr=1.0e-9`; rule: RABO - frozen > the "
                     f"larger std): {verdict_word(ok, len(up))}. {text}.")
        heads.append({"claim": "Optimizing x (the upper level) improves on leaving it at its "
                               "initialisation (control)",
                      "verdict": verdict_word(ok, len(up)), "evidence": text})
    still = [r for r in rows if r["method"] not in claims.CONTROLS
             and r["x_rel_change"]["mean"] is not None and r["x_rel_change"]["mean"] < 1e-4]
    if still:
        lines.append("- **x did not move** (||x_Q - x_0|| / ||x_0|| < 1e-4) in: "
                     + ", ".join(f"{r['task']}/{r['dataset']}/{r['split']} {r['method']} "
                                 f"({r['x_rel_change']['mean']:.1e})" for r in still)
                     + ": there the upper level had no effect on the result.")
    blown = [r for r in rows if (r["x_rel_change"]["max"] or 0) > 2.0]
    if blown:
        lines.append("- **x grew to more than twice its initial norm** (a sign of "
                     "instability) in: " + ", ".join(
                         f"{r['task']}/{r['dataset']}/{r['split']} {r['method']} (largest "
                         f"{r['x_rel_change']['max']:.3g}, test acc {pct(r['test_acc'])})"
                         for r in blown) + ".")
    lines.append("")
    lines.append("*What this shows*: final (at convergence), best and early test accuracy "
                 "of the full-width global model, its validation loss, accuracy per class and "
                 "per width, coverage, payload bytes and worker compute of each method over "
                 "seeds, with the ratio policy really choosing the ratios from memory budgets. "
                 "*What it does not show*: wall-clock speed of a real deployment (simulated "
                 "clients run one after the other in one process); memory per ratio (a simulated "
                 "client's step peak is the simulator process's RSS high-water mark, which "
                 "holds every client's data and the runtime, so the ratio barely shows in it; "
                 "section 5 measures it per ratio in a process of its own); FedNest's "
                 "reference numbers (500 epochs, 100 clients) are another protocol.")
    lines.append("")
    return "\n".join(lines), heads


def bench_estimator_block(bench: dict[str, Any], name: str
                          ) -> tuple[str, list[dict[str, str]]]:
    """The tables and verdicts of one ``rabo bench estimator --json`` file (``name``.json)."""
    lines: list[str] = []
    heads: list[dict[str, str]] = []
    device = bench.get("device", "cpu")
    gpu = bench.get("machine", {}).get("gpu")
    where = (f"device {device}" + (f" ({gpu}, torch {bench['machine'].get('torch', '?')})"
                                   if gpu and device == "cuda" else "")
             + f", {bench.get('torch_threads')} torch threads")
    peak = ("the CUDA allocator's peak above its allocation before the call" if device == "cuda"
            else "RSS high-water mark above the baseline")
    lines.append(f"From `rabo bench estimator --json` (`docs/results/{name}.json`, {where}; one "
                 "estimator call on fixed workloads, each in a fresh process; time = median of "
                 f"repeated calls; peak = {peak}):")
    lines.append("")
    q = bench.get("quadratic", {})
    lines.append("Relative error against the closed-form hypergradient of a quadratic "
                 "(float64): " + ", ".join(f"{k} {v['rel_error']:.1e}" for k, v in q.items())
                 + ".")
    lines.append("")
    brow = []
    for w, per in bench.get("workloads", {}).items():
        for est, r in per.items():
            pm = r.get("peak_mem_vs_exact")
            brow.append([w, est, f"{1e3 * r['time_s']:.1f}", num(r["time_vs_exact"], 2),
                         f"{r['peak_bytes'] / MIB:.1f}", num(pm, 2)])
    lines.append(table(["workload", "estimator", "time ms", "time x exact", "peak MiB",
                        "peak x exact"], brow))
    lines.append("")
    tg = bench.get("targets", [])
    if tg:
        lines.append("Targets of `rabo bench estimator`: " + "; ".join(
            f"{t['workload']} {t['estimator']} {t['metric']} = {t['value']:.2f} "
            f"({t['target']}: {'met' if t['met'] else 'MISSED'})" for t in tg) + ".")
        lines.append("")
    fd = [(w, per["fd-central"]["time_vs_exact"], per["fd-central"]["peak_mem_vs_exact"])
          for w, per in bench.get("workloads", {}).items() if "fd-central" in per]
    if fd:
        cheaper_t = sum(1 for _, t, _ in fd if t < 1)
        cheaper_m = sum(1 for _, _, m in fd if m is not None and m < 1)
        text = ("fd-central time x exact: "
                + ", ".join(f"{w} {t:.2f}" for w, t, _ in fd) + "; peak memory x exact: "
                + ", ".join(f"{w} {num(m, 2)}" for w, _, m in fd))
        lines.append(f"- **fd-central is cheaper than exact in time**: "
                     f"{verdict_word(cheaper_t, len(fd))}; **in memory**: "
                     f"{verdict_word(cheaper_m, len(fd))}. {text}.")
        on = f" ({gpu or device})" if device != "cpu" else ""
        heads.append({"claim": "The second-order-free estimator costs less than exact "
                               f"Hessian-vector products (time / memory){on}",
                      "verdict": f"time: {verdict_word(cheaper_t, len(fd))}; memory: "
                                 f"{verdict_word(cheaper_m, len(fd))}",
                      "evidence": text})
    lines.append("")
    return "\n".join(lines), heads


def section_estimators(data: dict[str, Any] | None, bench: dict[str, Any] | None, rel: str
                       ) -> tuple[str, list[dict[str, str]]]:
    lines = ["## 2. Hypergradient estimators", ""]
    heads: list[dict[str, str]] = []
    if data:
        s = data["settings"]
        lines.append(produced_by(data))
        lines.append("")
        lines.append(f"Data {s['datasets']}, splits {s['splits']}, seeds {s['seeds']}, "
                     f"{s['rounds']} rounds; every estimator gets budgets sized for itself so "
                     f"that all train the same submodels (ratios "
                     f"{', '.join(f'{r:g}' for r in s['tier_ratios'])}).")
        lines.append("")
        rows = estimators.rows(data)
        ref = {(r["task"], r["dataset"], r["split"]): r for r in rows
               if r["estimator"] == "exact" and r["budgets"] == "own"}
        out_rows = []
        for r in rows:
            ex = ref.get((r["task"], r["dataset"], r["split"]))
            c1 = r["compute_s_client_round_ratio_1"]["mean"]
            e1 = ex["compute_s_client_round_ratio_1"]["mean"] if ex else None
            out_rows.append([
                r["task"], r["dataset"], r["split"], r["estimator"],
                "own" if r["budgets"] == "own" else "sized for fd-central",
                ratios_str(r["ratios"]), pct(r["test_acc"]), mean_of(r["upper_loss"], 3),
                mean_of(r["compute_s_per_round"], 3),
                num(1e3 * c1, 1) if c1 is not None else "n/a",
                num(c1 / e1, 2) if c1 is not None and e1 else "n/a"])
        lines.append(table(["task", "data", "split", "estimator", "budgets", "ratios",
                            "test acc %", "upper loss", "worker compute s/round",
                            "ms per ratio-1 client step", "x exact"], out_rows))
        lines.append("")
        lines.append("(`ms per ratio-1 client step`: median `compute_s` of the ratio-1 clients, "
                     "a whole local step: K inner steps plus the estimator; measured while two "
                     "simulations shared the 2 CPUs with other jobs, so +-20% is noise.)")
        lines.append("")
        pol = data.get("policy_under_fd_central_budgets") or []
        if pol:
            lines.append("Ratios the policy picks for each estimator under the *same* budgets "
                         "(sized for fd-central; 0 = fits nothing, not assigned):")
            lines.append("")
            lines.append(table(["task", "estimator", "ratios picked", "estimate at ratio 1",
                                "estimate at 1/8"],
                               [[p["task"], p["estimator"],
                                 ", ".join("none" if x is None else f"{x:g}"
                                           for x in p["ratios"]),
                                 f"{p['estimate_at_ratio_1_bytes'] / MIB:.2f} MiB",
                                 f"{p['estimate_at_ratio_1_8_bytes'] / MIB:.2f} MiB"]
                                for p in pol]))
            lines.append("")
        lines.append(image("estimators.png", rel, "estimators"))
        lines.append("")
        # verdict: accuracy of the FD estimators against exact
        diffs = []
        for r in rows:
            ex = ref.get((r["task"], r["dataset"], r["split"]))
            if r["budgets"] != "own" or not ex or r["estimator"] not in ("fd-central",
                                                                          "fd-forward"):
                continue
            diffs.append((f"{r['task']}/{r['estimator']}",
                          r["test_acc"]["mean"] - ex["test_acc"]["mean"],
                          max(r["test_acc"]["std"] or 0, ex["test_acc"]["std"] or 0)))
        if diffs:
            ok = sum(1 for _, d, sd in diffs if abs(d) <= max(0.01, sd))
            text = "; ".join(f"{n}: {100 * d:+.1f} points" for n, d, _ in diffs)
            lines.append(f"- **Finite-difference estimators reach exact's accuracy** (rule: "
                         f"|difference| <= max(1 point, std)): {verdict_word(ok, len(diffs))}. "
                         f"{text}.")
            heads.append({"claim": "Second-order-free (finite-difference) hypergradients reach "
                                   "the accuracy of exact ones",
                          "verdict": verdict_word(ok, len(diffs)), "evidence": text})
        failed = []
        for r in rows:
            ex = ref.get((r["task"], r["dataset"], r["split"]))
            if ex and r["test_acc"]["mean"] is not None and \
                    r["test_acc"]["mean"] < ex["test_acc"]["mean"] - 0.05:
                failed.append(f"{r['task']}/{r['dataset']}/{r['split']} {r['estimator']} "
                              f"({'own' if r['budgets'] == 'own' else 'fd-central'} budgets): "
                              f"{pct(r['test_acc'])} against exact's "
                              f"{pct(ex['test_acc'])}")
        if failed:
            text = "; ".join(failed)
            lines.append(f"- **More than 5 points below exact**: {text}. (`neumann` rebuilds v "
                         "from N terms of a fixed step `estimator.neumann_eta` each call and "
                         "projects it onto the ball of radius `estimator.radius`. The series "
                         "converges only while that step is below 2/L, L the largest "
                         "eigenvalue of the lower level's Hessian, and L grows as training "
                         "grows the features; past that point the projection bounds v but v no "
                         "longer points anywhere useful. The other estimators carry v from "
                         "round to round and take one step of it per call.)")
            heads.append({"claim": "Every estimator trains the same job (more than 5 points "
                                   "below exact = failed)", "verdict": "**not supported**",
                          "evidence": text})
        lines.append("")
    else:
        lines.append("(no estimators.json: run `rabo experiment estimators`)")
        lines.append("")
    if bench:
        text, h = bench_estimator_block(bench, "bench_estimator")
        lines.append(text)
        heads += h
    else:
        lines.append("(no bench_estimator.json: `make bench` writes it with `rabo bench "
                     "estimator --json`)")
        lines.append("")
    lines.append("*What this shows*: accuracy of each estimator inside the same RABO job at the "
                 "same submodels, and what each pays in compute; the policy's analytic memory "
                 "estimate differs per estimator, so under one budget they can get different "
                 "submodels (second table). *What it does not show*: GPU behaviour beyond one "
                 "bench run on a lent card (2b, where present), kernels without double backward "
                 "(where only the finite-difference estimators "
                 "run at all); the time ratios of `rabo bench estimator` move by 2x between "
                 "runs on this shared 2-core machine.")
    lines.append("")
    return "\n".join(lines), heads


def section_coverage(data: dict[str, Any], rel: str) -> tuple[str, list[dict[str, str]]]:
    s = data["settings"]
    an = coverage.analyze(data)
    lines = ["## 3. Coverage: convergence against C_x*", ""]
    lines.append(produced_by(data))
    lines.append("")
    lines.append(f"{s['clients']} clients, k of them at ratio 1 and the rest at "
                 f"{s['other_clients_ratio']:g} (memory budgets chosen so the policy picks "
                 f"those), static masks, so C_x* = k; k in {s['ratio_1_clients_k']}, seeds "
                 f"{s['seeds']}, {s['rounds']} rounds. The measure is the exact, full-batch "
                 f"hypergradient of the full-width global model, ||grad Phi(x_q)||^2 with "
                 f"grad Phi = grad_x f - J^T H^-1 grad_y f over every client's data (CG on exact "
                 f"Hessian-vector products, every {s['hypergradient_every']} rounds; a point "
                 f"whose CG residual is above {s['cg_residual_ok']:g} is refused and counted). "
                 f"The first {s['warmup_rounds']} rounds are the warm-up and are left out; "
                 f"T(q) is the tail average of the measure over the measured rounds in "
                 f"[q/2, q], fitted for q >= {2 * s['warmup_rounds']}.")
    lines.append("")
    heads: list[dict[str, str]] = []
    for st in an["settings"]:
        lines.append(f"**Task {st['task']}, {st['dataset']} {st['split']}**")
        lines.append("")
        lines.append(table(
            ["k at ratio 1", "C_x*", "test acc %", "T(Q)", "min ||grad Phi||^2 after warm-up",
             "slope of log T(q) vs log q", "refused points (CG residual)"],
            [[str(p["k"]), mean_of(p["C_x_star"], 1), pct(p["test_acc"]),
              sig(p["T_final"]["mean"], 4), sig(p["min_sq_norm"]["mean"], 4),
              num(p["loglog_slope_T_vs_q"], 2), str(p["refused_points"])]
             for p in st["per_k"]]))
        lines.append("")
        lines.append(image(f"coverage_{st['task']}_{st['dataset']}_{st['split']}.png", rel,
                           "coverage"))
        lines.append("")
        n = st["pairs"]
        acc_ok, t_ok = st["acc_increasing_pairs"], st["T_decreasing_pairs"]
        where = f"task {st['task']}, {st['dataset']} {st['split']}"
        if not any(p["rounds"] for p in st["per_k"]):
            refused = sum(p["refused_points"] for p in st["per_k"])
            why = (f"not measured: all {refused} exact-hypergradient points after the warm-up "
                   f"were refused for their CG residual (g is not strongly convex in y here, "
                   f"so H^-1 grad_y f is not defined); accuracy increases with C_x* in "
                   f"{acc_ok} of {n} pairs of k")
            lines.append(f"- **Rate in Q and C_x***: {why}.")
            lines.append("")
            heads.append({"claim": f"The exact hypergradient measure falls with Q and C_x* "
                                   f"({where})", "verdict": "not measured", "evidence": why})
            continue
        c_text = (f"T(Q) decreases with C_x* in {t_ok} of {n} pairs of k; accuracy increases "
                  f"in {acc_ok} of {n}")
        c_word = verdict_word(t_ok, n)
        cf = st.get("fit_log_T_Q_vs_log_C") or {}
        if cf:
            c_text += (f"; log T(Q) = {cf['intercept']:.3g} {cf['slope']:+.2f} log C_x*, R^2 "
                       f"{cf['r2']:.2f} (the bound's exponent: -0.5; a steeper slope is "
                       f"consistent with an upper bound)")
        lines.append(f"- **Decreasing in C_x* at the last round** (rule: T(Q) smaller for the "
                     f"larger C_x* in every pair of k): {c_word}; {c_text}.")
        q_slopes = [(p["C_x_star"]["mean"], p["loglog_slope_T_vs_q"]) for p in st["per_k"]]
        q_ok = sum(1 for _, x in q_slopes if x == x and x < 0)
        q_text = ("slopes of log T(q) on log q after the warm-up: "
                  + ", ".join(f"C_x*={c:g}: {x:+.2f}" for c, x in q_slopes)
                  + " (the bound: -0.5 or steeper)")
        q_word = verdict_word(q_ok, len(q_slopes))
        lines.append(f"- **Decreasing in Q after the warm-up** (rule: negative slope for every "
                     f"C_x*): {q_word}; {q_text}.")
        lines.append("")
        heads.append({"claim": f"After the warm-up, the exact hypergradient measure falls with "
                               f"rounds Q for every C_x* ({where})",
                      "verdict": q_word, "evidence": q_text})
        heads.append({"claim": f"At the last round, the measure falls with C_x* ({where})",
                      "verdict": c_word, "evidence": c_text})
    lines.append("*What this shows*: how the true stationarity measure of the upper level "
                 "(not a client's stochastic estimate) evolves when fewer clients cover the "
                 "tail of x, everything else equal, past the warm-up. *What it does not show*: "
                 "the constant of the bound; the theorem is an upper bound, so a faster decay "
                 "does not contradict it; C_x* here also changes the total compute (more "
                 "ratio-1 clients do more work). Task B's lower level (an MLP's cross-entropy "
                 "with per-weight L2) is not strongly convex in y, as the theory assumes: CG "
                 "meets negative curvature there, and such points are refused (counted in the "
                 "table).")
    lines.append("")
    return "\n".join(lines), heads


def section_communication(data: dict[str, Any] | None, transport: dict[str, Any] | None,
                          rel: str) -> tuple[str, list[dict[str, str]]]:
    lines = ["## 4. Communication per outer step: RABO against FedNest", ""]
    heads: list[dict[str, str]] = []
    if data:
        lines.append(produced_by(data))
        lines.append("")
        lines.append("RABO/RAFBO: one round per outer step; bytes are the measured tensor "
                     "payload of a run (`payload_down_bytes` + `payload_up_bytes`, median per "
                     "round, all clients). FedNest: 2T + N + 3 rounds per outer step with T = "
                     "`inner.steps`, N = `estimator.neumann_terms` of the same config, every "
                     "round moving full-size vectors of every client; bytes counted from the "
                     "model's parameter shapes: per client, down 2 d_x + (2T + N + 2) d_y, up "
                     "2 d_x + (2T + N + 1) d_y (our per-round accounting, documented in "
                     "`rabo/experiments/communication.py`; only the round total is FedNest's).")
        lines.append("")
        rows = communication.rows(data)
        for t in rows:
            lines.append(f"**{t['setting']}** (d_x = {t['d_x']:,}, d_y = {t['d_y']:,} "
                         f"parameters)")
            lines.append("")
            lines.append(table(["method", "ratios", "rounds / outer step", "MiB / outer step",
                                "down MiB", "up MiB", "x FedNest", "source"],
                               [[e["method"], ratios_str(e["ratios"]) if e.get("ratios")
                                 else "all full", str(e["rounds_per_outer_step"]),
                                 f"{e['bytes_per_outer_step'] / MIB:.3f}",
                                 f"{e['down_bytes'] / MIB:.3f}", f"{e['up_bytes'] / MIB:.3f}",
                                 f"{e['vs_fednest']:.3f}", e["source"]]
                                for e in t["entries"]]))
            lines.append("")
        first = data["counted"][rows[0]["setting"]] if rows else None
        if first:
            lines.append(f"FedNest's count for other T and N ({rows[0]['setting']}), MiB per "
                         f"outer step:")
            lines.append("")
            ns = sorted({x["N"] for x in first["fednest_sensitivity"]})
            ts = sorted({x["T"] for x in first["fednest_sensitivity"]})
            cell = {(x["T"], x["N"]): x for x in first["fednest_sensitivity"]}
            lines.append(table(["T \\ N", *[str(n) for n in ns]],
                               [[str(t), *[f"{cell[(t, n)]['rounds']} rounds, "
                                           f"{4 * first['clients'] * (cell[(t, n)]['down_elems'] + cell[(t, n)]['up_elems']) / MIB:.2f}"  # noqa: E501
                                           for n in ns]] for t in ts]))
            lines.append("")
        lines.append(image("communication.png", rel, "communication"))
        lines.append("")
        ev = []
        for t in rows:
            rabo = next((e for e in t["entries"] if e["method"] == "RABO"), None)
            full = next((e for e in t["entries"] if e["method"].startswith("full")), None)
            fed = t["entries"][0]
            if rabo:
                ev.append(f"{t['setting']}: RABO {rabo['vs_fednest']:.3f}x FedNest's bytes"
                          + (f" (full model {full['vs_fednest']:.3f}x)" if full else "")
                          + f", 1 vs {fed['rounds_per_outer_step']} rounds")
        ok = sum(1 for t in rows for e in t["entries"] if e["method"] == "RABO"
                 and e["vs_fednest"] < 1)
        n = sum(1 for t in rows for e in t["entries"] if e["method"] == "RABO")
        text = "; ".join(ev)
        lines.append(f"- **Fewer rounds and bytes per outer step than FedNest**: "
                     f"{verdict_word(ok, n)}. {text}.")
        heads.append({"claim": "One communication round per outer step and fewer bytes than "
                               "FedNest (counted)", "verdict": verdict_word(ok, n),
                      "evidence": text})
        lines.append("")
        lines.append("*What this shows*: the communication each scheme needs for one outer "
                     "step. *What it does not show*: accuracy per byte against FedNest (FedNest "
                     "is counted, not run: its T global inner rounds and N-term Neumann series "
                     "per outer step may make more progress per outer step than RABO's single "
                     "round); the round count matters most where latency, not bandwidth, "
                     "dominates.")
        lines.append("")
    else:
        lines.append("(no communication.json: run `rabo experiment communication`)")
        lines.append("")
    if transport:
        lines.append("From `rabo bench transport --json` (`docs/results/bench_transport.json`: a "
                     f"real coordinator and {transport['workers']} echo worker processes, "
                     f"{transport['params']:,} parameters, ratios {transport['ratios']}): "
                     f"payload {transport['payload_bytes'] / MIB:.2f} MiB per round, wire "
                     f"{(transport['wire_bytes'] or 0) / MIB:.2f} MiB "
                     f"(wire / payload = {num(transport['wire_vs_payload'], 5)}); round "
                     f"overhead {1e3 * transport['round_overhead_s']:.0f} ms against "
                     f"{1e3 * transport['loopback_transfer_s']:.0f} ms for the same bytes over a "
                     f"loopback socket and {1e3 * transport['grpc_floor_s']:.0f} ms through bare "
                     f"gRPC streams. Payload fraction per ratio (received / sent, against "
                     f"r^2 + 0.03): " + "; ".join(
                         f"r={r}: {f['down_fraction']:.4f} / {f['up_fraction']:.4f} "
                         f"({f['r_squared_plus_0.03']:.4f})"
                         for r, f in transport["payload_fraction_by_ratio"].items()) + ".")
        tg = transport.get("targets", [])
        if tg:
            lines.append("")
            lines.append("Targets of `rabo bench transport`: " + "; ".join(
                f"{t['what']} = {t['value']:.3f} ({t['target']}: "
                f"{'met' if t['met'] else 'MISSED'})" for t in tg) + ".")
        lines.append("")
    return "\n".join(lines), heads


def ratio_block(ratio: dict[str, Any], rel: str, img: str) -> tuple[str, list[dict[str, str]]]:
    """The per-ratio worker cost table (CPU or GPU measurements)."""
    lines: list[str] = []
    heads: list[dict[str, str]] = []
    methods = {x.get("peak_method") for wl in ratio["workloads"] for x in wl["rows"]}
    peak_text = ("the CUDA allocator's peak above its allocation before one call (after a "
                 "warm-up call)" if methods == {"cuda-allocator"} else
                 "resident-set high-water mark above the baseline taken just before one call "
                 "(after a warm-up call), glibc's mmap threshold pinned")
    lines.append(f"**Per-worker compute and peak memory against the ratio** "
                 f"(`rabo.engine.client_step`, one local step: K inner steps + estimator, on "
                 f"{ratio['device']}; each number from a fresh process: time = median of "
                 f"repeated calls after warm-up; peak = {peak_text}; estimate = "
                 f"`rabo.policy.estimate_memory`):")
    lines.append("")
    rows = []
    for wl in ratio["workloads"]:
        for x in wl["rows"]:
            rows.append([wl["workload"], f"{x['ratio']:g}", f"{1e3 * x['time_s']:.1f}",
                         num(x["time_vs_full"], 3), num(x["ratio"] ** 2, 4),
                         f"{x['peak_bytes'] / MIB:.2f}", f"{x['estimate_bytes'] / MIB:.2f}",
                         num(x["peak_vs_full"], 3), num(x["estimate_vs_full"], 3),
                         num(x["peak_vs_estimate"], 2),
                         f"{x['payload_bytes'] / MIB:.2f}"])
    lines.append(table(["workload", "ratio", "time ms", "time x r=1", "r^2", "peak MiB",
                        "estimate MiB", "peak x r=1", "estimate x r=1", "peak / estimate",
                        "payload MiB"], rows))
    lines.append("")
    lines.append(image(img, rel, "per-ratio worker cost"))
    lines.append("")
    under = [(wl["workload"], x["ratio"], x["peak_vs_estimate"]) for wl in ratio["workloads"]
             for x in wl["rows"] if x["peak_vs_estimate"] is not None]
    if under:
        above = [u for u in under if u[2] > 1.0]
        text = (f"measured peak / estimate from {min(u[2] for u in under):.2f} to "
                f"{max(u[2] for u in under):.2f}; above the estimate in {len(above)} of "
                f"{len(under)} cases" + (": " + ", ".join(f"{w} r={r:g} ({v:.2f})"
                                                         for w, r, v in above)
                                         if above else ""))
        lines.append(f"- **The policy's memory estimate bounds the measured step peak**: "
                     f"{verdict_word(len(under) - len(above), len(under))}; {text}. The "
                     f"policy keeps a safety factor (`policy.safety`, default 0.8) on top.")
        heads.append({"claim": f"The policy's memory estimate covers the measured per-step "
                               f"peak ({ratio['device']})",
                      "verdict": verdict_word(len(under) - len(above), len(under)),
                      "evidence": text})
        saves = []
        for wl in ratio["workloads"]:
            small = min(wl["rows"], key=lambda x: x["ratio"])
            if small["ratio"] < 1 and small["peak_vs_full"] is not None:
                saves.append(f"{wl['workload']}: r={small['ratio']:g} needs "
                             f"{small['peak_vs_full']:.3f}x the memory and "
                             f"{small['time_vs_full']:.2f}x the time of r=1 "
                             f"(r^2 = {small['ratio'] ** 2:.4f})")
        if saves:
            text = "; ".join(saves)
            lines.append(f"- **What a small submodel saves a worker** ({ratio['device']}): "
                         f"{text}.")
            heads.append({"claim": f"Pruned submodels cut a worker's memory and compute "
                                   f"({ratio['device']})",
                          "verdict": "measured", "evidence": text})
        lines.append("")
    return "\n".join(lines), heads


def section_system(data: dict[str, Any], rel: str) -> tuple[str, list[dict[str, str]]]:
    lines = ["## 5. System: round overhead, coordinator CPU, wire bytes, transports, "
             "per-ratio worker cost", ""]
    m = data.get("machine", {})
    pc = data.get("part_commands") or {}
    partly = sorted({c for c in pc.values() if c != data["command"]})
    lines.append(f"*Produced by* `{data['command']}` (`coordinator/sysbench.py`, preset "
                 f"`{data['preset']}`"
                 + (f"; parts re-run with {', '.join(f'`{c}`' for c in partly)}" if partly
                    else "")
                 + f"); {data.get('wall_s', 0):.0f} s on {m.get('cpus', '?')} CPUs, "
                 f"{data.get('generated', '?')}. {data.get('device_note', '')}.")
    lines.append("")
    heads: list[dict[str, str]] = []
    grid = data.get("grid")
    if grid:
        lines.append(f"**Round overhead and coordinator CPU** (a coordinator in the benchmark "
                     f"process and N echo worker processes, `python -m worker.echo`, on "
                     f"127.0.0.1; task A MLP sized to P parameters on digits; ratios 1, 1/2, "
                     f"1/4, 1/8 cycled; {grid['rounds']} rounds, medians of rounds 2..R; "
                     f"coordinator CPU = user+system seconds of the benchmark process per round, "
                     f"`getrusage(RUSAGE_SELF)`; echo workers compute nothing, so overhead = round "
                 f"time; RSS = the process's resident set at the end of the point, which hosts "
                 f"every point in turn):")
        lines.append("")
        lines.append(table(
            ["workers", "params", "payload MiB/round", "wire / payload", "round s",
             "overhead s", "loopback s (same bytes)", "coordinator CPU s/round",
             "CPU / round time", "payload MB/s", "coordinator RSS MiB"],
            [[str(p["workers"]), f"{p['params'] / 1e6:.2f}M",
              f"{p['payload_bytes_per_round'] / MIB:.1f}", num(p["wire_vs_payload"], 5),
              num(p["round_s"], 3), num(p["round_overhead_s"], 3),
              num(p["loopback_transfer_s"], 3), num(p["coordinator_cpu_s_per_round"], 3),
              num(p["coordinator_cpu_utilisation"], 2), num(p["payload_mb_per_s"], 0),
              num((p["coordinator_rss_bytes_end"] or 0) / MIB, 0)]
             for p in sorted(grid["points"], key=lambda p: (p["params_target"],
                                                              p["workers"]))]))
        lines.append("")
        for sk in grid.get("skipped", []):
            lines.append(f"- skipped {sk['workers']} workers x {sk['params'] / 1e6:g}M: "
                         f"{sk['reason']}")
        if grid.get("skipped"):
            lines.append("")
        lines.append(image("system_grid.png", rel, "system grid"))
        lines.append("")
        wv = [p["wire_vs_payload"] for p in grid["points"] if p["wire_vs_payload"]]
        if wv:
            text = (f"wire / payload from {min(wv):.5f} to {max(wv):.5f} over "
                    f"{len(wv)} points")
            lines.append(f"- **Bytes on the wire follow the payload**: {text}.")
            heads.append({"claim": "Bytes on the wire are the pruned payload (no hidden "
                                   "overhead)",
                          "verdict": "supported" if max(wv) <= 1.03 else "**not supported**",
                          "evidence": text})
        over = [(p["workers"], p["params"], p["round_overhead_s"], p["loopback_transfer_s"])
                for p in grid["points"]]
        if over:
            worst = max(over, key=lambda o: o[2] / o[3] if o[3] else 0)
            lines.append(f"- Round overhead is {min(o[2] / o[3] for o in over):.1f}x to "
                         f"{worst[2] / worst[3]:.1f}x the time of the same bytes over a "
                         f"loopback socket (worst at {worst[0]} workers x "
                         f"{worst[1] / 1e6:.1f}M): gRPC Python's streaming and the "
                         f"coordinator's slicing, checksumming and aggregation on 2 cores "
                         f"shared with the echo workers.")
        lines.append("")
    cmp_ = data.get("compare")
    if cmp_:
        lines.append("**The same job over gRPC and over torch.distributed (gloo)** "
                     "(`rabo bench compare-transports --json`; medians per round, rounds "
                     "2..R):")
        lines.append("")
        rows = []
        for c in cmp_:
            if "error" in c:
                rows.append([c["name"], "FAILED", c["error"][-200:], "", "", "", "", "", ""])
                continue
            g, d = c["grpc"], c["gloo"]
            for key, unit, scale in (("payload_bytes", "MiB", MIB), ("wire_bytes", "MiB", MIB),
                                     ("round_s", "s", 1), ("compute_s", "s", 1),
                                     ("transfer_s", "s", 1), ("aggregation_s", "s", 1),
                                     ("test_acc", "", 1)):
                gv, dv = g.get(key), d.get(key)
                rows.append([c["name"], f"{key} {unit}".strip(),
                             "n/a" if gv is None else f"{gv / scale:.4f}",
                             "n/a" if dv is None else f"{dv / scale:.4f}"])
            rows.append([c["name"], "max |x, y, v| difference of the final states",
                         f"{c['max_abs_diff_final_state']:.2e}", ""])
        lines.append(table(["job", "per round", "gRPC", "gloo"], rows))
        lines.append("")
        lines.append("Commands: " + "; ".join(f"`{c['command']}`" for c in cmp_
                                               if "command" in c) + ".")
        lines.append("")
        diffs = [c["max_abs_diff_final_state"] for c in cmp_ if "error" not in c]
        if diffs:
            text = f"final x, y, v differ by at most {max(diffs):.1e} between gRPC and gloo"
            lines.append(f"- **Both transports compute the same model**: {text}.")
            heads.append({"claim": "gRPC and torch.distributed (gloo) run the same job to the "
                                   "same model",
                          "verdict": "supported" if max(diffs) <= 1e-6 else "**not supported**",
                          "evidence": text})
            lines.append("")
    ratio = data.get("ratio")
    if ratio:
        text, h = ratio_block(ratio, rel, f"{data.get('experiment', 'system')}_ratio.png")
        lines.append(text)
        heads += h
    lines.append("*What this shows*: the coordinator's cost per round as workers and model "
                 "size grow, that the bytes on the TCP connections are the pruned payload, that "
                 "both transports give the same model, and what a submodel saves a worker. "
                 "*What it does not show*: multi-machine networks (everything is on loopback), "
                 "GPU workers (none here; 5b below has a per-ratio measurement on a lent GPU), "
                 "worker count beyond what fits one 2-core machine "
                 "(128 echo processes share the 2 cores with the coordinator, so round times "
                 "at that size are CPU-bound, not network-bound).")
    lines.append("")
    return "\n".join(lines), heads


# --------------------------------------------------------------------------- the document


def build_report(results: dict[str, dict[str, Any]], rel: str) -> str:
    parts: list[str] = []
    heads: list[dict[str, str]] = []
    if "claims" in results:
        text, h = section_claims(results["claims"], rel)
        parts.append(text)
        heads += h
    else:
        parts.append("## 1. Claims\n\n(no claims.json: run `rabo experiment claims`)\n")
    if "estimators" in results or "bench_estimator" in results:
        text, h = section_estimators(results.get("estimators"), results.get("bench_estimator"),
                                     rel)
        parts.append(text)
        heads += h
    for name, d in sorted(results.items()):
        if not name.startswith("bench_estimator_"):
            continue
        gpu = d.get("machine", {}).get("gpu") or d.get("device", "?")
        text, h = bench_estimator_block(d, name)
        parts.append(f"### 2b. Estimator cost on {gpu}\n\n*Produced by* `rabo bench estimator "
                     f"--device {d.get('device')} --json` on a lent machine; kept here as "
                     f"`{name}.json`, not part of `make bench`.\n\n" + text)
        heads += h
    if "coverage" in results:
        text, h = section_coverage(results["coverage"], rel)
        parts.append(text)
        heads += h
    if "communication" in results or "bench_transport" in results:
        text, h = section_communication(results.get("communication"),
                                        results.get("bench_transport"), rel)
        parts.append(text)
        heads += h
    if "system" in results:
        text, h = section_system(results["system"], rel)
        parts.append(text)
        heads += h
    for name, d in sorted(results.items()):
        if not name.startswith("system_") or not d.get("ratio"):
            continue
        m = d.get("machine", {})
        gpu = m.get("gpu") or d["ratio"].get("device")
        text, h = ratio_block(d["ratio"], rel, f"{name}_ratio.png")
        parts.append(f"### 5b. Per-ratio worker cost on {gpu}\n\n*Produced by* "
                     f"`{d['command']}` on a lent machine with an {gpu} (torch "
                     f"{m.get('torch', '?')}), {d.get('generated', '?')}; its `system.json` "
                     f"is kept here as `{name}.json`. A GPU step of these small models is "
                     f"bound by kernel launches, so its time hardly depends on the ratio; "
                     f"the allocator's peak is exact.\n\n" + text)
        heads += h
    if "robust" in results:
        from rabo.experiments import robust

        text, h = robust.section(results["robust"], rel)
        parts.append(text)
        heads += h
    walls: list[tuple[str, float]] = [(name, float(d["wall_s"])) for name, d in results.items()
                                      if isinstance(d, dict) and d.get("wall_s") is not None
                                      and not name.startswith("system_")]
    presets = sorted({d.get("preset", "?") for name, d in results.items()
                      if isinstance(d, dict) and "preset" in d and not name.startswith("system_")})
    head = [
        "# Results",
        "",
        "Generated by `rabo experiment report` from the JSON files in `docs/results/` (written "
        "by `rabo experiment claims|estimators|coverage|communication|robust`, `rabo bench "
        "system`, "
        "and `make bench`'s `rabo bench estimator --json` / `rabo bench transport --json`). "
        "Do not edit by hand: every number below is read from those files, and every verdict "
        "is computed from them by the rule stated next to it. Simulations use the in-process "
        "runner (`rabo.runner.simulate`), which the parity tests pin to the gRPC and "
        "torch.distributed transports.",
        "",
        f"Presets in these files: {', '.join(presets) or 'none'} (`reduced` is what `make "
        f"bench` runs; `FULL=1 make bench` / `--full` runs the whole grids). Wall time per "
        f"results file (s): " + ", ".join(f"{n} {w:.0f}" for n, w in walls)
        + f"; total {sum(w for _, w in walls):.0f} s, to which `rabo bench estimator` and "
        "`rabo bench transport` add their own (their JSON carries no wall time). Files named "
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
    for name, mod in (("claims", claims), ("estimators", estimators), ("coverage", coverage),
                      ("communication", communication)):
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
