"""The policy's log-probs equal transformers' full-logits log-softmax; Qwen2 text models load too;
activation checkpointing and vision freezing do not change the numbers."""

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM

from engine.config import ModelConfig
from engine.data import Processor, collate, encode_rows
from engine.dist import init_distributed
from engine.model import Policy, load_hf_model
from engine.stages.common import build_policy


def _full_logits_logprobs(hf_model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = hf_model(**inputs, use_cache=False).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    logp = torch.log_softmax(logits, -1).gather(2, targets.clamp(min=0)[..., None]).squeeze(-1)
    return logp[mask]


@pytest.fixture(scope="module")
def batch(toy_world):
    processor = Processor.from_pretrained(toy_world / "hf")
    samples, _ = encode_rows(toy_world / "data" / "sft.parquet", processor, response_column="response")
    return collate(samples[:5], processor.pad_id)


def test_vlm_policy_matches_full_logits(toy_world, batch):
    hf_model = load_hf_model(toy_world / "hf")
    assert isinstance(hf_model, Qwen2_5_VLForConditionalGeneration)
    with torch.no_grad():
        ours = Policy(hf_model, chunk_tokens=7)(batch)
        ref = _full_logits_logprobs(hf_model, batch)
    assert ours.shape == ref.shape == ((batch["labels"][:, 1:] != -100).sum(),)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_text_qwen2_loads_and_matches(tmp_path):
    config = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    hf_model = load_hf_model(tmp_path)
    ids = torch.randint(0, 97, (2, 11))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        torch.testing.assert_close(Policy(hf_model)(batch), _full_logits_logprobs(hf_model, batch), rtol=1e-5,
                                   atol=1e-5)


def test_unsupported_or_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        load_hf_model(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="'llama' .* is not supported"):
        load_hf_model(tmp_path)


def test_activation_checkpointing_and_frozen_vision(toy_world, batch):
    dist_info = init_distributed()
    results = []
    for ac in (False, True):
        policy, hf_model = build_policy(toy_world / "hf", ModelConfig(dtype="float32", activation_checkpointing=ac),
                                        dist_info)
        policy.train()
        loss = -policy(batch).mean()
        loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in policy.named_parameters() if p.grad is not None}
        assert not any("visual" in n for n in grads)  # frozen vision tower gets no gradient
        assert all(not p.requires_grad for n, p in policy.named_parameters() if "visual" in n)
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-6)
    for name, g in results[0][1].items():
        torch.testing.assert_close(g, results[1][1][name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attn", ["varlen", "sdpa"])
def test_packed_row_matches_padded_batch(toy_world, attn):
    from engine.packed_rows import pack_samples

    processor = Processor.from_pretrained(toy_world / "hf")
    samples, _ = encode_rows(toy_world / "data" / "sft.parquet", processor, response_column="response")
    chosen = [samples[i] for i in (3, 0, 7, 5)]  # different lengths and tasks, each with an image
    padded_model = load_hf_model(toy_world / "hf", attn_implementation="sdpa")
    packed_model = load_hf_model(toy_world / "hf", attn_implementation=attn)
    packed = pack_samples(chosen, merge_size=processor.merge_size)
    assert packed["position_ids"].shape == (4, 1, sum(len(s.input_ids) for s in chosen))
    padded_policy, packed_policy = Policy(padded_model), Policy(packed_model)
    with torch.no_grad():
        ref = padded_policy(collate(chosen, processor.pad_id))
        got = packed_policy(packed)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # Gradients agree too (the loss is a sum over the same tokens).
    for policy, batch in ((padded_policy, collate(chosen, processor.pad_id)), (packed_policy, packed)):
        policy.zero_grad()
        policy(batch).sum().backward()
    for (name, a), (_, b) in zip(padded_policy.named_parameters(), packed_policy.named_parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_varlen_attention_matches_per_sample_sdpa():
    from engine.attention import attention_ref, boundaries_from_positions

    torch.manual_seed(0)
    lengths = [5, 1, 12, 7]
    q, k, v = torch.randn(1, 4, 25, 8), torch.randn(1, 2, 25, 8), torch.randn(1, 2, 25, 8)
    pos = torch.cat([torch.arange(n) for n in lengths])
    cu = boundaries_from_positions(pos)
    assert cu.tolist() == [0, 5, 6, 18, 25]
    out = attention_ref(q, k, v, cu, None)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        kk, vv = k[:, :, s:e].repeat_interleave(2, 1), v[:, :, s:e].repeat_interleave(2, 1)
        scores = q[:, :, s:e] @ kk.transpose(-1, -2) / 8**0.5
        scores = scores.masked_fill(torch.ones(e - s, e - s, dtype=torch.bool).triu(1), float("-inf"))
        torch.testing.assert_close(out[:, s:e], (scores.softmax(-1) @ vv).transpose(1, 2))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # expected on CPU
def test_flex_attention_matches_per_sample_sdpa():
    """The FlexAttention path (CUDA without flash-attn or varlen_attn) on CPU, forward only (torch has no CPU
    backward for it); a second row with other boundaries must not reuse the first row's cached mask."""
    from engine.attention import attention_flex, attention_ref, backend

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 25, 8), torch.randn(1, 2, 25, 8), torch.randn(1, 2, 25, 8)
    for bounds in ([0, 5, 6, 18, 25], [0, 20, 25]):
        cu = torch.tensor(bounds, dtype=torch.int32)
        with torch.no_grad():
            torch.testing.assert_close(attention_flex(q, k, v, cu, 0.3), attention_ref(q, k, v, cu, 0.3))
    assert backend("cpu") == "sdpa" and backend("cuda") in ("flash_attn", "varlen_attn", "flex")


def test_text_only_batch_runs_the_vision_tower_once(toy_world):
    """A VLM micro-batch without images still calls the vision tower (FSDP2 ranks stay in lockstep), and the
    dummy pass changes nothing."""
    processor = Processor.from_pretrained(toy_world / "hf")
    hf_model = load_hf_model(toy_world / "hf")
    ids = processor.tokenizer("<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\nhi")["input_ids"]
    ids = torch.tensor([ids])
    labels = ids.clone()
    labels[:, :-3] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    calls = []
    hook = hf_model.model.visual.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        got = Policy(hf_model)(batch)
    hook.remove()
    with torch.no_grad():
        ref = _full_logits_logprobs(hf_model, batch)
    assert len(calls) == 1
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (varlen_attn has no CPU kernel); the CPU "
                    "path of the same attention is checked in test_packed_row_matches_padded_batch")
def test_packed_varlen_on_cuda_matches_padded(toy_hf):
    from engine.packed_rows import pack_samples
    from engine.toy import ToySpec, _sft_responses, generate_split

    processor = Processor.from_pretrained(toy_hf)
    spec = ToySpec(seed=0, num_train=64, num_test=16)
    train = generate_split(spec, "train")
    responses = _sft_responses(spec, train)
    chosen = [processor.encode(train[i].problem, [train[i].image], response=responses[i], row_id=str(i))
              for i in (3, 0, 7, 5)]
    to_cuda = lambda b: {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in b.items()}  # noqa: E731
    padded = Policy(load_hf_model(toy_hf, attn_implementation="sdpa").cuda())
    packed = Policy(load_hf_model(toy_hf, attn_implementation="varlen").cuda())
    with torch.no_grad():
        ref = padded(to_cuda(collate(chosen, processor.pad_id)))
        got = packed(to_cuda(pack_samples(chosen, merge_size=processor.merge_size)))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; the CPU reference is checked in "
                    "test_varlen_attention_matches_per_sample_sdpa and the flex path forward in "
                    "test_flex_attention_matches_per_sample_sdpa")
@pytest.mark.parametrize("kind", ["flash_attn", "varlen_attn", "flex"])
def test_cuda_attention_paths_match_reference(kind):
    """Every CUDA path, forward and gradients, bf16, against sdpa per sample on awkward lengths."""
    from engine import attention

    if kind == "flash_attn" and attention.flash_attn_varlen_func is None:
        pytest.skip("flash-attn is not installed (pip install .[flash])")
    if kind == "varlen_attn" and attention.varlen_attn is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    torch.manual_seed(0)
    lengths = [37, 1, 130, 64, 9]
    total, cu = sum(lengths), torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32).cuda()
    q = torch.randn(1, 8, total, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 2, total, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 2, total, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    fns = {"flash_attn": lambda *a: attention._attention_flash(*a[:3], cu, max(lengths), 0.125),
           "varlen_attn": lambda *a: attention._attention_cuda(*a[:3], cu, max(lengths), 0.125),
           "flex": lambda *a: attention.attention_flex(*a[:3], cu, 0.125)}
    out = fns[kind](q, k, v)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    ref = attention.attention_ref(q, k, v, cu, 0.125)
    ref_grads = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=5e-2, atol=5e-2)
