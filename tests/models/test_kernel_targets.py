"""Every Triton kernel specialisation keel launches, compiled for real GPUs on the CPU (tools/kernel_check.py):
it compiles, its shared memory fits the target, and no registers spill. The CPU suite otherwise runs the
kernel in Triton's interpreter, which accepts what a GPU compiler rejects and says nothing of resources.

bench_decode.py's presets in bf16 (what a GPU runs) and the wide-head MLA layouts go to sm_80, sm_90a and
sm_100a; the presets in fp32 and the CPU suite's own layouts (tests/models/decode_kernel_cases.py) to
sm_90a. Identical specialisations compile once: about 45 compiles, 40 s on 2 cores from a cold cache."""

import pytest
import torch

from tests.helpers import TINY_GPT
from tests.models import decode_kernel_cases as cases
from tools import kernel_check
from tools.kernel_check import Case


def suite_cases() -> list[Case]:
    """The launches of tests/models/test_decode_kernels.py (which a GPU runs compiled), captured on meta."""
    from models.kernels.decode import plan

    out = []
    # one shape per layout: the others differ only in which integers divide by 16
    for dtype, layouts in (("fp32", cases.LAYOUTS), ("bf16", cases.BF16)):
        for layout in layouts:
            (q, k, v, q_rope, k_rope, lengths, scale), options = cases.kernel_inputs(
                layout, "ragged-empty-split", "meta", kernel_check.DTYPES[dtype])
            out.append(Case(f"suite {layout} {dtype}", plan(q, k, v, lengths, scale, q_rope, k_rope, **options), dtype))
    models = [(t, []) for t in cases.TYPES] + [(t, ["attention.qk_norm=true"]) for t in cases.QK_NORM]
    for t, extra in models:
        overrides = [*TINY_GPT, f"attention={t}", *extra]
        for launch in kernel_check.capture_launches(overrides, [(2, 11)], torch.float32)[2, 11]:
            out.append(Case(f"suite model {t}{' qk-norm' if extra else ''}", launch, "fp32"))
    return out


@pytest.fixture(scope="module")
def resources(megatron_world):
    presets = kernel_check.preset_cases()
    everywhere = [c for c in presets if c.dtype == "bf16"]
    return (kernel_check.check(everywhere, list(kernel_check.TARGETS))
            + kernel_check.check([c for c in presets if c.dtype == "fp32"] + suite_cases(), ["sm_90a"]))


def test_every_launch_compiles_and_fits_shared_memory_and_the_benchmarked_ones_do_not_spill(resources):
    bad = [r for r in resources if not (r.ok if r.case.startswith(("memory-bound", "mla-")) else r.fits)]
    assert not bad, "\n" + kernel_check.table(bad)
    assert {r.target for r in resources} == set(kernel_check.TARGETS)
    names = " ".join(r.case for r in resources)
    for expected in ("memory-bound gqa bf16", "memory-bound mla fp32", "mla-64-heads", "suite gta", "suite model mla"):
        assert expected in names


def test_the_check_sees_a_kernel_that_does_not_fit(megatron_world, monkeypatch):
    """Without query-head blocks (all 128 heads of a latent in one program, the kernel before them) absorbed
    MLA needs more shared memory than an H100 gives a block: the check must say so."""
    from models.kernels import decode

    monkeypatch.setattr(decode, "head_block", lambda g, ev: decode._pad(g))
    wide = kernel_check.capture_launches(kernel_check.WIDE_HEADS["mla-128-heads"], [(32, 4096)], torch.bfloat16)
    (row,) = kernel_check.check([Case("untiled mla-128-heads", wide[32, 4096][0], "bf16")], ["sm_90a"])
    assert not row.ok and (row.shared_bytes > row.shared_limit or row.spill_bytes > 0), row


def test_mixed_dtypes_are_refused_in_one_line():
    """An fp32 query over a bf16 cache runs in the interpreter but does not compile for a GPU."""
    from models.kernels.decode import plan

    (q, k, v, q_rope, k_rope, lengths, scale), options = cases.kernel_inputs("gqa", "b1-one-token", "meta")
    with pytest.raises(ValueError, match="query and cache dtypes differ") as error:
        plan(q, k.to(torch.bfloat16), v.to(torch.bfloat16), lengths, scale, **options)
    assert "\n" not in str(error.value) and "float32" in str(error.value) and "bfloat16" in str(error.value)
