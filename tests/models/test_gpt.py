"""The GPT model: document masking and per-document positions against running documents alone."""

import pytest
import torch

from data.loader import model_inputs
from tests.helpers import build_tiny_gpt


def _two_documents():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 128, (10,), generator=g), torch.randint(0, 128, (6,), generator=g)
    batch = {"tokens": torch.cat([a, b])[None], "doc_ids": torch.tensor([[0] * 10 + [1] * 6]),
             "loss_mask": torch.ones(1, 16)}
    return a, b, batch


@torch.no_grad()
def _logits(gpt, inputs):
    """The logits on the CPU, whichever device the model is on (the inputs follow the model)."""
    device = next(gpt.parameters()).device
    tokens, positions, mask = (None if x is None else x.to(device)
                               for x in (inputs["tokens"], inputs["position_ids"], inputs["attention_mask"]))
    return gpt(tokens, positions, mask).cpu()


@pytest.mark.parametrize("positions", ["rope", "learned_absolute"])
def test_masked_second_document_sees_nothing_of_the_first(megatron_world, positions):
    _, gpt = build_tiny_gpt(["data.reset_position_ids=true", "data.document_mask=true",
                             f"model.position_embedding={positions}"], device=megatron_world.device)
    a, b, batch = _two_documents()
    packed = _logits(gpt, model_inputs(batch, reset_position_ids=True, document_mask=True))
    alone = {"tokens": b[None], "position_ids": torch.arange(6)[None], "attention_mask": None}
    torch.testing.assert_close(packed[0, 10:], _logits(gpt, alone)[0], rtol=1e-5, atol=1e-5)
    first = {"tokens": a[None], "position_ids": torch.arange(10)[None], "attention_mask": None}
    torch.testing.assert_close(packed[0, :10], _logits(gpt, first)[0], rtol=1e-5, atol=1e-5)


def test_without_the_options_documents_interact(megatron_world):
    _, gpt = build_tiny_gpt(device=megatron_world.device)
    _, b, batch = _two_documents()
    packed = _logits(gpt, model_inputs(batch, reset_position_ids=False, document_mask=False))
    alone = {"tokens": b[None], "position_ids": torch.arange(6)[None], "attention_mask": None}
    assert not torch.allclose(packed[0, 10:], _logits(gpt, alone)[0], atol=1e-4)


def test_with_rope_the_mask_alone_isolates_documents(megatron_world):
    # without the reset, document b is rotated as if it started at 10, but RoPE is relative
    _, gpt = build_tiny_gpt(device=megatron_world.device)
    _, b, batch = _two_documents()
    packed = _logits(gpt, model_inputs(batch, reset_position_ids=False, document_mask=True))
    alone = {"tokens": b[None], "position_ids": torch.arange(6)[None], "attention_mask": None}
    torch.testing.assert_close(packed[0, 10:], _logits(gpt, alone)[0], rtol=1e-4, atol=1e-4)
