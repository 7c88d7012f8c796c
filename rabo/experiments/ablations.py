"""``rabo experiment ablations``: what each part of RABO's submodel setting contributes.

Against RABO's own setting (rolling masks tied to the layer width, the consistent scaler,
uniform weighting) on the same clients and budgets as ``rabo experiment claims``: static,
random and FedRolex's one-unit rolling masks; no scaler and HeteroFL's forward scaler;
inverse-ratio weighting on label skew; and the control with x frozen at its initialisation
(the upper level switched off). The method definitions, tables, plots and verdict rules are
the claims experiment's (``rabo.experiments.claims``); only the grid differs. RABO's own runs
are the claims experiment's runs, served by the run store when both ran on the same code.

Not part of ``make bench`` (its 40-minute budget holds the core comparison): ``make
ablations`` runs it with the robustness experiment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rabo.experiments import claims, common
from rabo.experiments.claims import CONTROLS, EVAL_EVERY, MASKS, MASKS_SCALER, SKEW, Block, Preset

NAME = "ablations"

PRESETS = {
    # the settings where issue 10 found each effect, at convergence: 300 rounds, 3 seeds
    "reduced": Preset(
        blocks=(Block(("mnist",), ("iid",), ("RABO", *CONTROLS, "RABO static",
                                            "RABO rolling, stride 1", "RABO no scaler",
                                            "RABO static, no scaler", "RABO + forward scaler"),
                      ("A",)),
                Block(("digits",), ("shards",), ("RABO", "RABO static", "RABO rolling, stride 1",
                                                 "RABO no scaler", *SKEW), ("A",)),
                Block(("mnist",), ("dirichlet",), ("RABO", *SKEW), ("A",))),
        seeds=(0, 1, 2), rounds=300, extra=EVAL_EVERY),
    "full": Preset(
        blocks=(Block(("mnist", "digits", "mnist1d"), ("iid", "shards", "dirichlet"),
                      ("RABO", *CONTROLS, *MASKS, *MASKS_SCALER, *SKEW)),),
        seeds=(0, 1, 2, 3, 4), rounds=500, extra=EVAL_EVERY),
    "tiny": Preset(
        blocks=(Block(("digits",), ("iid",), ("RABO", *CONTROLS, "RABO static")),),
        seeds=(0, 1), rounds=3,
        extra=("model.hidden=[16]", "clients.count=4", "data.batch_size=32")),
}


def build_specs(preset: str) -> list[common.RunSpec]:
    return claims.build_specs(preset, PRESETS)


def run(preset: str, out: Path, jobs: int,
        store: common.RunStore | None = None) -> dict[str, Any]:
    return claims.run(preset, out, jobs, store, name=NAME, presets=PRESETS)


def plot(data: dict[str, Any], out: Path) -> list[Path]:
    return claims.plot(data, out)


def section(data: dict[str, Any], rel: str) -> tuple[str, list[dict[str, str]]]:
    return claims.section(data, rel, "## 1b. Ablations: masks, scalers, weighting and the "
                                     "upper level")
