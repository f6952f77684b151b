"""The library-free part of the adapters (kernels/integrations/head.py): which models it refuses, the per-instance
forward wrap and its undo. Needs neither TRL nor verl."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from kernels.integrations.head import check_model, token_logprobs, wrap_forward
from tests.tiny_lm import build_tiny_qwen2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"))


def test_check_model_refuses_bias_and_logit_transforms(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    check_model(model)  # plain Qwen2: accepted
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        check_model(model)
    model.config.final_logit_softcapping = None
    model.lm_head = torch.nn.Linear(32, 32, bias=True)
    with pytest.raises(ValueError, match="bias"):
        check_model(model)


def test_wrap_forward_is_per_instance_and_undoes_in_order(model_dir):
    a, b = AutoModelForCausalLM.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.randint(3, 32, (1, 6))
    undo_1 = wrap_forward(a, lambda self, previous, *args, **kw: ("first", previous(*args, **kw)))
    undo_2 = wrap_forward(a, lambda self, previous, *args, **kw: ("second", previous(*args, **kw)))
    tag, (inner, out) = a(input_ids=ids)
    assert (tag, inner) == ("second", "first") and out.logits.shape == (1, 6, 32)
    assert not isinstance(b(input_ids=ids), tuple)  # the other instance and the class are untouched
    with pytest.raises(RuntimeError, match="undo that change first"):
        undo_1()
    undo_2()
    undo_1()
    assert "forward" not in a.__dict__ and a(input_ids=ids).logits.shape == (1, 6, 32)


def test_token_logprobs_scores_only_labelled_positions():
    hidden, weight = torch.randn(2, 5, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    labels = torch.tensor([[1, 2, -100, 4, 5], [-100, -100, -100, -100, -100]])
    logp, ent = token_logprobs(hidden, weight, labels, temperature=0.5, entropy=True)
    full = torch.log_softmax(hidden @ weight.T / 0.5, -1)
    expect = full.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)
    torch.testing.assert_close(logp, expect, rtol=1e-5, atol=1e-6)
    assert (ent[labels == -100] == 0).all() and (ent[labels != -100] > 0).all()
    logp.sum().backward()  # the all-padding row still leaves a connected graph
    assert hidden.grad[1].abs().sum() == 0 and hidden.grad[0, 0].abs().sum() > 0
