"""docs/preregistration.md states exactly the constants of tools/experiments/preregistration.py (no run
may start under values the page does not show), the presets run the registered horizons, and the edge rule."""

from __future__ import annotations

import dataclasses
import re

from tests.helpers import ROOT
from tools.experiments import preregistration as reg

PAGE = ROOT / "docs" / "preregistration.md"
ROW = re.compile(r"^\| `([A-Z_]+(?:\.[a-z_]+)?)` \| `([^`]+)` \|", re.MULTILINE)


def test_the_page_states_every_registered_constant_as_the_code_has_it():
    stated = dict(ROW.findall(PAGE.read_text()))
    expected = {"MAX_EXTENSIONS": reg.MAX_EXTENSIONS, "ALPHA": reg.ALPHA, "INTERVAL": reg.INTERVAL}
    for name in ("ATTENTION_LONG", "WARMUP_LONG"):
        design = getattr(reg, name)
        expected |= {f"{name}.{f.name}": getattr(design, f.name) for f in dataclasses.fields(design)}
    assert set(stated) == set(expected)
    for key, text in stated.items():
        assert eval(text, {"range": range, "tuple": tuple}) == expected[key], key


def test_the_presets_run_the_registered_horizons_and_the_grids_fit_the_design():
    from pretrain.config import compose_config
    from tools.experiments.seeds import REPORTED_SEEDS, TUNING_SEEDS

    a, w = reg.ATTENTION_LONG, reg.WARMUP_LONG
    assert compose_config([f"+experiment={a.preset}", "+attention_d128=gqa"]).trainer.max_steps == a.steps
    for preset in w.presets:
        assert compose_config([f"+experiment={preset}"]).trainer.max_steps == w.steps
    assert w.tune_at in w.lrs  # tune-lr reuses the tune stage's runs at the chosen length or τ
    assert max(w.warmups) <= w.steps // 2 and a.margin > 0 and w.margin > 0
    for design in (a, w):
        assert set(design.tuning_seeds) <= set(TUNING_SEEDS) and set(design.seeds) <= set(REPORTED_SEEDS)


def test_a_grid_is_extended_past_the_edge_its_choice_sits_on_by_its_own_step():
    assert reg.extension((5e-4, 1e-3, 2e-3), 2e-3) == 4e-3 and reg.extension((5e-4, 1e-3, 2e-3), 5e-4) == 2.5e-4
    assert reg.extension((5e-4, 1e-3, 2e-3), 1e-3) is None  # inside
    assert reg.extension((30, 100, 300, 1000), 1000, high=1500, integer=True) == 1500  # capped at half the run
    assert reg.extension((30, 100, 300, 1000, 1500), 1500, high=1500, integer=True) is None  # nothing past the cap
    assert reg.extension((30, 100, 300, 1000), 30, integer=True) == 9
    assert reg.at_edge((1,), 1) is False and reg.at_edge((1, 2), None) is False
