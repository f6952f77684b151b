"""engine/rollout: the builtin backend against transformers' own generate and a teacher-forced forward, on the
toy Qwen2.5-VL (tests/conftest.py `toy_world`), CPU fp32."""


import pytest
import torch

from engine.data import Processor, encode_rows
from engine.rollout import BuiltinBackend, Completion, SamplingParams


@pytest.fixture(scope="module")
def processor(toy_world):
    return Processor.from_pretrained(toy_world / "hf")


@pytest.fixture(scope="module")
def prompts(toy_world, processor):
    """Toy test prompts with one image each, of pairwise different lengths (so left padding differs per row)."""
    samples, _ = encode_rows(toy_world / "data" / "test.parquet", processor)
    by_len = {len(s.input_ids): s for s in samples if s.pixel_values is not None}
    assert len(by_len) >= 4, f"toy prompts have too few distinct lengths: {sorted(by_len)}"
    return [by_len[k] for k in sorted(by_len)][:4]


@pytest.fixture(scope="module")
def backend(toy_world, processor):
    return BuiltinBackend(toy_world / "hf", device="cpu", processor=processor, max_batch_size=64)


def _tokens(result: list[list[Completion]]) -> list[list[list[int]]]:
    return [[c.token_ids for c in group] for group in result]


def _prompt_inputs(sample, completion_ids=()):
    ids = torch.tensor([sample.input_ids + list(completion_ids)])
    mm = torch.tensor([sample.mm_token_type_ids + [0] * len(completion_ids)])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
                  pixel_values=sample.pixel_values, image_grid_thw=sample.image_grid_thw)
    return {k: v for k, v in inputs.items() if v is not None}


@pytest.fixture(scope="module")
def mixed_prompts(processor, prompts):
    """The image prompts plus one text-only prompt (M-RoPE delta 0 next to rows with images)."""
    return [*prompts, processor.encode("What is two plus three?", [], row_id="text-only")]


def test_greedy_matches_hf_generate(backend, mixed_prompts):
    prompts = mixed_prompts
    # The test only checks M-RoPE decode positions if the image shifts them (rope delta != 0).
    inputs = _prompt_inputs(prompts[0])
    _, deltas = backend.model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                   image_grid_thw=inputs["image_grid_thw"])
    assert deltas.item() != 0
    got = backend.generate(prompts, 1, SamplingParams(temperature=0, max_new_tokens=24))
    bad_words = [[i] for i in backend.banned_ids]  # the backend never emits vision tokens: ban them here too
    for sample, (completion,) in zip(prompts, got, strict=True):
        inputs = _prompt_inputs(sample)
        out = backend.model.generate(**inputs, do_sample=False, max_new_tokens=24, bad_words_ids=bad_words)
        ref = out[0, inputs["input_ids"].shape[1]:].tolist()
        assert completion.token_ids == ref
        eos_hit = bool(ref) and ref[-1] in backend.eos_ids
        assert completion.finish_reason == ("stop" if eos_hit else "length")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_teacher_forcing(backend, prompts, temperature):
    got = backend.generate(prompts[:3], 2, SamplingParams(temperature=temperature, max_new_tokens=16, seed=3))
    for sample, group in zip(prompts, got, strict=False):
        for c in group:
            assert len(c.logprobs) == len(c.token_ids) > 0
            with torch.no_grad():
                logits = backend.model(**_prompt_inputs(sample, c.token_ids)).logits[0].float()
            start = len(sample.input_ids) - 1  # position t predicts token t + 1
            logp = torch.log_softmax(logits[start:start + len(c.token_ids)] / temperature, -1)
            ref = logp.gather(-1, torch.tensor(c.token_ids)[:, None]).view(-1)
            torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=0)


def test_seed_determinism(backend, prompts):
    sampling = SamplingParams(temperature=1.0, max_new_tokens=12, seed=7)
    first = backend.generate(prompts, 2, sampling)
    again = backend.generate(prompts, 2, sampling)
    other = backend.generate(prompts, 2, SamplingParams(temperature=1.0, max_new_tokens=12, seed=8))
    assert first == again
    assert _tokens(first) != _tokens(other)


def test_n_groups_and_batch_chunks(toy_world, processor, backend, prompts):
    greedy = SamplingParams(temperature=0, max_new_tokens=10)
    single = backend.generate(prompts, 1, greedy)
    # Chunks of 3 rows split prompt groups across batches; greedy output must not notice.
    small = BuiltinBackend(toy_world / "hf", device="cpu", processor=processor, max_batch_size=3)
    grouped = small.generate(prompts, 3, greedy)
    assert [len(g) for g in grouped] == [3] * len(prompts)
    for i, (one, group) in enumerate(zip(single, grouped, strict=True)):
        assert all(c.prompt_index == i for c in group)
        assert all(c.token_ids == one[0].token_ids and c.text == one[0].text for c in group)
    sampled = backend.generate(prompts, 4, SamplingParams(temperature=1.0, max_new_tokens=10))
    assert [[c.prompt_index for c in g] for g in sampled] == [[i] * 4 for i in range(len(prompts))]
    assert all(len({tuple(c.token_ids) for c in g}) > 1 for g in sampled)  # the n samples differ


def test_shared_prefill_equals_separate_prompts(backend, mixed_prompts):
    """A prompt's n rows share one prefill (its K/V copied out): same tokens and log-probs, sampled under the same
    seed, as n separate copies of the prompt each prefilled on their own; the vision tower sees each image once."""
    import copy

    n = 3
    sampling = SamplingParams(temperature=1.0, max_new_tokens=10, seed=11)
    calls = []
    hook = backend.model.model.visual.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        shared = backend.generate(mixed_prompts, n, sampling)
    finally:
        hook.remove()
    copies = [copy.copy(p) for p in mixed_prompts for _ in range(n)]  # distinct objects: no sharing
    separate = backend.generate(copies, 1, sampling)
    flat = [c for group in shared for c in group]
    assert [c.token_ids for c in flat] == [g[0].token_ids for g in separate]
    for a, b in zip(flat, separate, strict=True):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b[0].logprobs), atol=1e-5, rtol=0)
    patches = sum(p.pixel_values.shape[0] for p in mixed_prompts if p.pixel_values is not None)
    assert sum(calls) == patches  # one pass over each prompt's patches, not n


def test_decode_cache_is_reused_without_stale_state(toy_world, processor, prompts):
    """Batches of one (rows, length) shape refill one decode cache in place (same K/V addresses, which a CUDA-graph
    decode step needs); what an earlier batch left in it does not change the next batch's output."""
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    fresh = BuiltinBackend(toy_world / "hf", device="cpu", processor=processor).generate(prompts[2:], 1, greedy)
    backend = BuiltinBackend(toy_world / "hf", device="cpu", processor=processor)
    # Same rows and padded length, other row order and sampled tokens: the same (rows, length) shape.
    backend.generate(prompts[2:][::-1], 1, SamplingParams(temperature=1.0, max_new_tokens=8, seed=3))
    cache = backend._cache
    assert backend._cache_shape == (2, len(prompts[3].input_ids) + 8)
    pointers = [layer.keys.data_ptr() for layer in cache.layers]
    assert _tokens(backend.generate(prompts[2:], 1, greedy)) == _tokens(fresh)
    assert backend._cache is cache and [layer.keys.data_ptr() for layer in cache.layers] == pointers
    backend.generate(prompts, 2, greedy)  # another shape: a new cache
    assert backend._cache_shape == (8, len(prompts[-1].input_ids) + 8)
    backend.sleep()
    assert backend._cache is None


def test_compiled_decode_warns_past_the_recompile_limit(backend, monkeypatch):
    """Each (rows, cache length) is one compiled variant; the third distinct shape past a limit of 2 is reported,
    once."""
    from engine.rollout import builtin

    seen, limit = [], torch._dynamo.config.recompile_limit
    monkeypatch.setattr(builtin, "warn_once", seen.append)
    monkeypatch.setattr(backend, "compile_decode", True)
    monkeypatch.setattr(backend, "_decode_shapes", set())
    with torch._dynamo.config.patch(recompile_limit=2):  # (monkeypatch's undo breaks dynamo's config aliases)
        for shape in [(1, 256), (2, 256), (1, 256), (2, 512), (4, 512)]:
            backend._note_decode_shape(shape)
    assert len(seen) == 1 and "recompile_limit (2)" in seen[0]
    assert torch._dynamo.config.recompile_limit == limit


def test_batches_take_shortest_prompts_first(toy_world, processor, prompts, monkeypatch):
    """Several static batches: prompts are grouped shortest first (less left padding); results keep the prompt order
    and equal the one-batch results."""
    greedy = SamplingParams(temperature=0, max_new_tokens=6)
    mixed = [prompts[2], prompts[0], prompts[3], prompts[1]]  # lengths out of order
    one_batch = BuiltinBackend(toy_world / "hf", device="cpu", processor=processor).generate(mixed, 2, greedy)
    small = BuiltinBackend(toy_world / "hf", device="cpu", processor=processor, max_batch_size=4, batching="static")
    seen = []
    batch = small._generate_batch
    monkeypatch.setattr(small, "_generate_batch", lambda samples, *a: seen.append(
        [len(s.input_ids) for s in samples]) or batch(samples, *a))
    split = small.generate(mixed, 2, greedy)
    assert seen == [[len(prompts[0].input_ids)] * 2 + [len(prompts[1].input_ids)] * 2,
                    [len(prompts[2].input_ids)] * 2 + [len(prompts[3].input_ids)] * 2]
    assert _tokens(split) == _tokens(one_batch)
    assert [[c.prompt_index for c in g] for g in split] == [[i, i] for i in range(4)]


def test_top_p_tiny_is_greedy(backend, prompts):
    greedy = backend.generate(prompts, 1, SamplingParams(temperature=0, max_new_tokens=12))
    nucleus = backend.generate(prompts, 2, SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=12))
    for g, group in zip(greedy, nucleus, strict=True):
        assert all(c.token_ids == g[0].token_ids for c in group)
        # at temperature 1 the log-probs are the plain log_softmax, as for greedy
        assert all(c.logprobs == pytest.approx(g[0].logprobs, abs=1e-6) for c in group)


def test_update_weights_roundtrip(backend, prompts):
    greedy = SamplingParams(temperature=0, max_new_tokens=12)
    before = backend.generate(prompts, 1, greedy)
    names = ["model.language_model.layers.0.self_attn.q_proj.weight", "lm_head.weight"]
    params = dict(backend.model.named_parameters())
    original = [(k, params[k].detach().clone()) for k in names]
    gen = torch.Generator().manual_seed(0)
    try:
        backend.update_weights((k, (v + 0.5 * torch.randn(v.shape, generator=gen)).double()) for k, v in original)
        assert _tokens(backend.generate(prompts, 1, greedy)) != _tokens(before)
    finally:
        backend.update_weights(original)
    assert backend.generate(prompts, 1, greedy) == before
    with pytest.raises(ValueError, match="model.no_such.weight"):
        backend.update_weights([("model.no_such.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="shape"):
        backend.update_weights([("lm_head.weight", torch.zeros(3, 3))])


def test_length_limit(backend, prompts):
    for (c,) in backend.generate(prompts, 1, SamplingParams(temperature=0, max_new_tokens=24)):
        if c.finish_reason == "length":
            assert len(c.token_ids) == 24 and len(c.logprobs) == 24


def test_stop_on_eos(backend, prompts, monkeypatch):
    greedy = SamplingParams(temperature=0, max_new_tokens=16)
    free = backend.generate(prompts, 1, greedy)
    # Make the 4th greedy token of prompt 0 an eos id: that row stops there (token kept), the others run on.
    eos = free[0][0].token_ids[3]
    monkeypatch.setattr(backend, "eos_ids", [*backend.eos_ids, eos])
    got = backend.generate(prompts, 1, greedy)
    for (c,), (f,) in zip(got, free, strict=True):
        k = f.token_ids.index(eos) + 1 if eos in f.token_ids else len(f.token_ids)
        assert c.token_ids == f.token_ids[:k] and c.logprobs == pytest.approx(f.logprobs[:k], abs=1e-6)
        assert c.finish_reason == ("stop" if eos in f.token_ids else f.finish_reason)
    assert len(got[0][0].token_ids) <= 4 and got[0][0].finish_reason == "stop"


def test_vision_tokens_banned(backend, prompts):
    # Near-uniform sampling over 512 tokens: about 2 draws in 256 would be vision tokens without the ban.
    got = backend.generate(prompts, 8, SamplingParams(temperature=50.0, max_new_tokens=32))
    drawn = [t for g in got for c in g for t in c.token_ids]
    assert len(drawn) > 500 and not set(drawn) & set(backend.banned_ids)


def test_text_only_qwen2(tmp_path, processor):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=processor.end_of_turn_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    backend = BuiltinBackend(tmp_path, device="cpu", processor=processor)
    prompts = [processor.encode(q, []) for q in ("What is two plus three?", "Name a color.", "Count the dots")]
    got = backend.generate(prompts, 1, SamplingParams(temperature=0, max_new_tokens=12))
    for sample, (completion,) in zip(prompts, got, strict=True):
        ids = torch.tensor([sample.input_ids])
        out = backend.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=12, bad_words_ids=[[i] for i in backend.banned_ids])
        assert completion.token_ids == out[0, ids.shape[1]:].tolist()
    with pytest.raises(ValueError, match="text model"):
        backend.generate([_image_prompt(processor)], 1, SamplingParams(max_new_tokens=2))


def _image_prompt(processor):
    from PIL import Image

    return processor.encode("What is shown?", [Image.new("RGB", (112, 112), (200, 30, 30))])


def test_bad_sampling_params(backend, prompts):
    with pytest.raises(ValueError, match="temperature"):
        backend.generate(prompts, 1, SamplingParams(temperature=-1))
    with pytest.raises(ValueError, match="top_p"):
        backend.generate(prompts, 1, SamplingParams(top_p=0))
    with pytest.raises(ValueError, match="n must be"):
        backend.generate(prompts, 0, SamplingParams())


@pytest.mark.slow
def test_compiled_decode_step_matches_eager(toy_world, processor, backend, mixed_prompts):
    """compile_decode=True (torch.compile of the static-shape decode step; CUDA graphs on a GPU): the same greedy
    tokens and log-probs, and the same samples under a seed, as the eager step (~20-90 s of compiling on CPU)."""
    compiled = BuiltinBackend(toy_world / "hf", device="cpu", processor=processor, compile_decode=True)
    for sampling in (SamplingParams(temperature=0, max_new_tokens=12), SamplingParams(temperature=1.0,
                                                                                    max_new_tokens=12, seed=5)):
        want, got = backend.generate(mixed_prompts, 1, sampling), compiled.generate(mixed_prompts, 1, sampling)
        assert _tokens(got) == _tokens(want)
        for (a,), (b,) in zip(want, got, strict=True):
            torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=1e-4, rtol=0)


def test_close_frees_the_model(toy_world, processor):
    import gc
    import weakref

    backend = BuiltinBackend(toy_world / "hf", device="cpu", processor=processor, compile_decode=False)
    model = weakref.ref(backend.model)
    backend.close()
    gc.collect()
    assert model() is None
    with pytest.raises(AttributeError):
        backend.generate([processor.encode("hi", [], row_id="x")], 1, SamplingParams(max_new_tokens=2))
