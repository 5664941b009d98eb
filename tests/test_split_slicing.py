"""The sliced model computes what the whole model computes: same logits, same loss and the
same gradients, for a cut at either end and in the middle."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from fedlib.split.slicing import causal_lm_loss, slice_model


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.eval()
    return model


@pytest.mark.parametrize("cut", [0, 1, 2])  # the tiny model has 2 blocks: both ends and the middle
def test_sliced_forward_and_loss_equal_the_whole_model(tiny_model, cut):
    ids = torch.randint(3, tiny_model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(cut))
    whole = tiny_model(input_ids=ids, labels=ids)
    slices = slice_model(tiny_model, cut)
    assert len(slices.middle.layers) == 2 - cut
    logits = slices.head(slices.middle(slices.front(ids)))
    torch.testing.assert_close(logits, whole.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(causal_lm_loss(logits, ids), whole.loss, atol=1e-6, rtol=1e-6)


def test_gradients_flow_back_through_the_cut(tiny_model):
    """Backward across the cut by hand (as the two processes do it) gives the whole model's
    gradients on both sides."""
    ids = torch.randint(3, tiny_model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(9))
    tiny_model.zero_grad()
    tiny_model(input_ids=ids, labels=ids).loss.backward()
    expected = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
    tiny_model.zero_grad()

    slices = slice_model(tiny_model, 1)
    sent = slices.front(ids)  # client → server: activations
    received = sent.detach().requires_grad_()
    middle_out = slices.middle(received)
    returned = middle_out.detach().requires_grad_()  # server → client
    loss = causal_lm_loss(slices.head(returned), ids)
    loss.backward()
    middle_out.backward(returned.grad)  # client → server: gradient at the top cut
    sent.backward(received.grad)  # server → client: gradient at the bottom cut
    for name, param in tiny_model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], atol=1e-5, rtol=1e-4, msg=name)
    tiny_model.zero_grad()


def test_cut_out_of_range_is_named(tiny_model):
    with pytest.raises(ValueError, match="split.cut=3 must be between 0 and the model's 2 blocks"):
        slice_model(tiny_model, 3)
