import math

import pytest

from optim.schedule import lr_factor
from optim.config import ScheduleConfig


def test_constant_with_and_without_warmup():
    assert [lr_factor(s, 10, ScheduleConfig(name="constant")) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    cfg = ScheduleConfig(name="constant", warmup_steps=4)
    assert [lr_factor(s, 10, cfg) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_cosine_endpoints_and_midpoint():
    cfg = ScheduleConfig(name="cosine", warmup_steps=0, min_lr_ratio=0.1)
    assert lr_factor(0, 100, cfg) == pytest.approx(1.0)
    assert lr_factor(50, 100, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, 100, cfg) == pytest.approx(0.1)
    warm = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.0)
    assert lr_factor(9, 110, warm) == pytest.approx(1.0)
    assert lr_factor(60, 110, warm) == pytest.approx(0.5)


def test_wsd_holds_then_decays_linearly():
    cfg = ScheduleConfig(name="wsd", warmup_steps=0, decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_factor(79, 100, cfg) == 1.0
    assert lr_factor(90, 100, cfg) == pytest.approx(0.5)
    assert lr_factor(100, 100, cfg) == pytest.approx(0.0)
    values = [lr_factor(s, 100, cfg) for s in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert all(math.isfinite(v) for v in values)


def test_every_schedule_name_has_a_shape_and_an_unknown_one_is_an_error():
    from optim.config import ScheduleName
    from optim.schedule import DECAY

    assert set(DECAY) == set(ScheduleName)
    cfg = ScheduleConfig(name="wsd")
    cfg.name = "linear"  # set after the config's own check: no silent fall-through to a shape
    with pytest.raises(ValueError, match=r"^lr.name='linear' is unknown; choose one of constant, cosine, wsd$"):
        lr_factor(50, 100, cfg)
