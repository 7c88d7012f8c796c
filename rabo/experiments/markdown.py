"""Markdown helpers shared by every experiment's section of docs/RESULTS.md (formatting
only: no experiment's schema or verdict rules live here)."""

from __future__ import annotations

import math
from typing import Any

MIB = 2**20


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
