"""engine/rollout/continuous.py: continuous batching in the builtin backend against its static twin, on the toy
Qwen2.5-VL (tests/conftest.py `toy_world`), CPU fp32."""

import pytest
import torch

from engine.data import Processor, encode_rows
from engine.rollout import BuiltinBackend, SamplingParams


@pytest.fixture(scope="module")
def processor(toy_world):
    return Processor.from_pretrained(toy_world / "hf")


@pytest.fixture(scope="module")
def prompts(toy_world, processor):
    """Four image prompts of pairwise different lengths and one text-only prompt."""
    samples, _ = encode_rows(toy_world / "data" / "test.parquet", processor)
    by_len = {len(s.input_ids): s for s in samples if s.pixel_values is not None}
    return [by_len[k] for k in sorted(by_len)][:4] + [processor.encode("What is two plus three?", [], row_id="t")]


@pytest.fixture(scope="module")
def backend(toy_world, processor):
    return BuiltinBackend(toy_world / "hf", device="cpu", processor=processor, max_batch_size=3)


def _run(backend, batching, prompts, n, sampling, slots=None):
    backend.batching = batching
    if slots is not None:
        backend.max_batch_size = slots
    return backend.generate(prompts, n, sampling), backend.timing


def _assert_same(got, want):
    for g, w in zip(got, want, strict=True):
        assert [c.token_ids for c in g] == [c.token_ids for c in w]
        assert [c.finish_reason for c in g] == [c.finish_reason for c in w]
        assert [c.text for c in g] == [c.text for c in w]
        for a, b in zip(g, w, strict=True):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=0, max_new_tokens=20),
                                      SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=20, seed=4)],
                         ids=["greedy", "sampled"])
def test_continuous_equals_static(backend, prompts, sampling, monkeypatch):
    """3 slots for 10 rows: slots are refilled mid-run and the ring of decode columns wraps; every completion, its
    log-probs and finish reason equal the static schedule's (per-row RNG streams make sampled runs comparable)."""
    free, _ = _run(backend, "static", prompts, 2, sampling)
    # Make a token that some rows draw mid-way a stop token: those rows end early, the others run to the limit.
    drawn = [t for g in free for c in g for t in c.token_ids[4:]]
    monkeypatch.setattr(backend, "eos_ids", [*backend.eos_ids, max(set(drawn), key=drawn.count)])
    continuous, _ = _run(backend, "continuous", prompts, 2, sampling)
    static, _ = _run(backend, "static", prompts, 2, sampling)
    _assert_same(continuous, static)
    lengths = {len(c.token_ids) for g in continuous for c in g}
    assert len(lengths) > 1 and max(lengths) == 20, lengths


def test_samples_do_not_depend_on_the_slot(backend, prompts):
    """Under a seed, a row's completion is the same with 1, 4 or 16 slots (other neighbours, other slots)."""
    sampling = SamplingParams(temperature=1.0, max_new_tokens=12, seed=9)
    runs = [_run(backend, "continuous", prompts, 3, sampling, slots=k)[0] for k in (1, 4, 16)]
    backend.max_batch_size = 3
    for other in runs[1:]:
        _assert_same(other, runs[0])
    assert len({tuple(c.token_ids) for g in runs[0] for c in g}) > 1


def test_long_tail_needs_fewer_decode_steps(backend, prompts, monkeypatch):
    """A long-tail length mix (40 extra stop tokens at near-uniform sampling: ~8% stop chance a token, so most rows
    are short and a few run to the limit): continuous batching needs far fewer decode steps than static batches of
    the same slot count, for the same completions; the static run's time goes largely to the tail."""
    vocab = backend.model.get_output_embeddings().weight.shape[0]
    extra = [i for i in range(vocab) if i not in backend.banned_ids and i not in backend.eos_ids][100:140]
    monkeypatch.setattr(backend, "eos_ids", sorted(backend.eos_ids + extra))
    sampling = SamplingParams(temperature=50.0, max_new_tokens=48, seed=1)
    continuous, t_cont = _run(backend, "continuous", prompts, 6, sampling, slots=6)
    static, t_static = _run(backend, "static", prompts, 6, sampling, slots=6)
    backend.max_batch_size = 3
    _assert_same(continuous, static)
    lengths = sorted(len(c.token_ids) for g in static for c in g)
    assert lengths[len(lengths) // 2] < 15 and lengths[-1] >= 30, lengths  # short median, a long tail
    assert t_cont.num_decode_steps <= 0.75 * t_static.num_decode_steps, (t_cont, t_static)
    assert t_cont.slot_use > t_static.slot_use
    assert t_static.tail_s > 0 and t_cont.tail_s >= 0


def test_prefill_shared_across_refills(backend, prompts):
    """A prompt whose samples get slots in different refills is still prefilled once (its K/V kept meanwhile)."""
    calls = []
    hook = backend.model.model.visual.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        _run(backend, "continuous", prompts[:2], 4, SamplingParams(temperature=1.0, max_new_tokens=6), slots=3)
    finally:
        hook.remove()
        backend.max_batch_size = 3
    assert sum(calls) == sum(p.pixel_values.shape[0] for p in prompts[:2])


def test_timing_parts(backend, prompts):
    _, timing = _run(backend, "continuous", prompts, 2, SamplingParams(temperature=1.0, max_new_tokens=8))
    parts = timing.prefill_s + timing.decode_s + timing.tail_s
    assert 0 < parts <= timing.total_s and timing.num_decode_steps >= 7
    assert set(timing.metrics()) == {"time/rollout_generate_s", "time/rollout_prefill_s", "time/rollout_decode_s",
                                     "time/rollout_tail_s", "rollout/slot_use"}


def test_bad_batching_name(toy_world, processor):
    with pytest.raises(ValueError, match="batching"):
        BuiltinBackend(toy_world / "hf", device="cpu", processor=processor, batching="dynamic")


def test_no_prompts(backend):
    """A rank with nothing to sample (a distill stage's last chunk) gets nothing back, in either schedule."""
    for batching in ("continuous", "static"):
        assert _run(backend, batching, [], 2, SamplingParams(max_new_tokens=4))[0] == []
        assert backend.timing.total_s == 0.0


def test_prefill_takes_upcoming_prompts_within_budget(backend, prompts, monkeypatch):
    """Needed prompts are always prefilled; more upcoming ones join while the padded batch fits PREFILL_TOKENS and
    the prompt cap. Prefilling ahead changes no completion."""
    from engine.rollout.continuous import _prefill_batch

    lens = [len(p.input_ids) for p in prompts]  # ascending image prompts, then the shorter text prompt
    monkeypatch.setattr(backend, "PREFILL_TOKENS", 3 * max(lens[:3]))
    assert _prefill_batch(backend, prompts, [0, 1, 2, 3, 4], 1, most=5) == [0, 1, 2]
    assert _prefill_batch(backend, prompts, [0, 1, 2, 3, 4], 1, most=2) == [0, 1]
    assert _prefill_batch(backend, prompts, [3, 4], 2, most=1) == [3, 4]  # needed ones beat the caps
    monkeypatch.setattr(backend, "PREFILL_TOKENS", 1)
    assert _prefill_batch(backend, prompts, [0, 1, 2], 1, most=3) == [0]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=16, seed=2)
    one_by_one = _run(backend, "continuous", prompts, 3, sampling, slots=4)[0]
    monkeypatch.setattr(backend, "PREFILL_TOKENS", 8192)
    _assert_same(_run(backend, "continuous", prompts, 3, sampling, slots=4)[0], one_by_one)
    backend.max_batch_size = 3
