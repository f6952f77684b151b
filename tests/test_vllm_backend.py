"""engine/rollout/vllm_backend.py: the vLLM backend against the builtin backend on a tiny text Qwen2 (CPU, fp32).

The tests marked `needs_vllm` run under `make test-vllm` (its own venv .venv-vllm with vLLM's CPU build) and skip
elsewhere; among them a 2-process torchrun run (tests/vllm_colocate_worker.py). The rest run in the normal suite:
config validation without vLLM, and the image round trip and pad collapsing that turn our `Sample`s into vLLM
multimodal prompts (image prompts through vLLM itself: tests/test_vllm_multimodal.py).
"""

import importlib.util
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from engine.data import Processor, encode_rows
from engine.rollout import BuiltinBackend, Completion, SamplingParams
from engine.rollout.vllm_backend import collapse_image_pads, images_from_pixel_values
from engine.sections import RolloutConfig

from ._launch import python, start

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm (make test-vllm)")

QUESTIONS = ("What is two plus three?", "Name a color.", "Count the dots in the picture, then add four to it.",
             "Which shape is larger: the red square or the blue circle? Think step by step before answering.")


@pytest.fixture(scope="module")
def processor(toy_world):
    return Processor.from_pretrained(toy_world / "hf")


# ------------------------------------------------------------------------------------------------ no vLLM needed


def _hide_vllm(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))


def test_config_without_vllm(monkeypatch):
    """Without vLLM, backend = 'vllm' passes the check (the stage falls back to builtin) unless the recipe requires
    vLLM or asks for tensor parallelism, which only vLLM has."""
    _hide_vllm(monkeypatch)
    assert RolloutConfig(backend="vllm").check() == []
    for cfg in (RolloutConfig(backend="vllm", require=True), RolloutConfig(backend="vllm", tensor_parallel_size=4)):
        problems = cfg.check()
        assert len(problems) == 1 and "vLLM is not installed" in problems[0] and "make test-vllm" in problems[0]
    assert RolloutConfig(backend="builtin").check() == []
    assert "needs backend = 'vllm'" in RolloutConfig(tensor_parallel_size=2).check()[0]


def test_make_backend_falls_back_to_builtin(monkeypatch, toy_world, processor):
    """No vLLM: make_backend says so (once) and returns the builtin backend with the recipe's builtin settings; with
    require, or tensor parallelism, it stops with the install command."""
    import engine.rollout as rollout_pkg

    _hide_vllm(monkeypatch)
    said = []
    monkeypatch.setattr(rollout_pkg, "warn_once", said.append)
    args = dict(device=torch.device("cpu"), dtype=torch.float32, processor=processor)
    backend = rollout_pkg.make_backend("vllm", toy_world / "hf", max_batch_rows=5, batching="static", **args)
    assert isinstance(backend, BuiltinBackend) and backend.max_batch_size == 5 and backend.batching == "static"
    assert len(said) == 1 and "not installed" in said[0] and "builtin" in said[0]
    # the stage's description line names the backend that will run, not only the one asked for
    assert rollout_pkg.backend_label("vllm") == "vllm (not installed: builtin)"
    assert rollout_pkg.backend_label("builtin") == "builtin"
    for kwargs in (dict(require=True), dict(tensor_parallel_size=2)):
        with pytest.raises(RuntimeError, match=r"pip install -e '\.\[vllm\]'"):
            rollout_pkg.make_backend("vllm", toy_world / "hf", **kwargs, **args)
    with pytest.raises(ValueError, match="unknown rollout backend"):
        rollout_pkg.make_backend("sglang", toy_world / "hf", **args)


def test_trainer_weight_stream_fits_the_vllm_check(toy_world):
    """The GRPO stage's weight stream (engine/stages/experience.py::sync_weights, from the policy wrapper's
    parameters) declares exactly the HF state dict the vLLM backend checks against, and yields what it declares."""
    from transformers import AutoConfig

    from engine.model import Policy, load_hf_model
    from engine.rollout.vllm_backend import _state_dict_shapes, weight_problems
    from engine.stages.experience import sync_weights

    class Recorder:
        def update_weights(self, stream):
            self.shapes, self.yielded = stream.shapes, [(name, tuple(t.shape)) for name, t in stream]

    config = AutoConfig.from_pretrained(toy_world / "hf")
    tied = bool(getattr(config, "tie_word_embeddings", False)
                or getattr(config.get_text_config(), "tie_word_embeddings", False))
    recorder = Recorder()
    sync_weights(Policy(load_hf_model(toy_world / "hf", attn_implementation="sdpa")), recorder, torch.bfloat16)
    expected = _state_dict_shapes(config)
    assert weight_problems(expected, list(recorder.shapes.items()), tied=tied) == []
    assert sorted(recorder.yielded) == sorted(recorder.shapes.items())
    partial = [(k, v) for k, v in recorder.shapes.items() if "layers.0." not in k]
    assert "missing name" in weight_problems(expected, partial, tied=tied)[0]
    wrong = [*recorder.shapes.items(), ("model.no_such.weight", (1,))]
    assert "unknown name" in weight_problems(expected, wrong, tied=tied)[0]


def test_images_from_pixel_values_roundtrip(toy_world, processor):
    """Rebuilt images re-process to the same pixels and grids, bit for bit (toy images and odd-sized noise)."""
    from PIL import Image

    samples, _ = encode_rows(toy_world / "data" / "test.parquet", processor)
    gen = torch.Generator().manual_seed(0)
    noise = [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy())
             for h, w in ((61, 97), (150, 47))]
    two = processor.encode("<image> left, <image> right: which is brighter?", noise, row_id="noise")
    for s in [*[s for s in samples if s.pixel_values is not None][:3], two]:
        images = images_from_pixel_values(s.pixel_values, s.image_grid_thw, processor.image_processor)
        assert len(images) == len(s.image_grid_thw)
        again = processor.image_processor(images=images, return_tensors="pt")
        assert torch.equal(again["image_grid_thw"].long(), s.image_grid_thw)
        assert torch.equal(again["pixel_values"].float(), s.pixel_values)
    with pytest.raises(ValueError, match="patch rows"):
        images_from_pixel_values(two.pixel_values[:-4], two.image_grid_thw, processor.image_processor)


def test_collapse_image_pads(processor):
    pad = processor.image_token_id
    assert collapse_image_pads([1, pad, pad, pad, 2, pad, 3, pad, pad], pad) == [1, pad, 2, pad, 3, pad]
    assert collapse_image_pads([1, 2, 3], pad) == [1, 2, 3]


# ------------------------------------------------------------------------------------------------ vLLM (CPU build)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, processor):
    """A random text Qwen2 with the toy tokenizer; head_dim 32 (vLLM's CPU attention needs >= 32)."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tok = processor.tokenizer
    eot, eos = processor.end_of_turn_id, tok.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(vocab_size=-(-len(tok) // 64) * 64, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=1024, initializer_range=0.1, tie_word_embeddings=False,
                         bos_token_id=eos, eos_token_id=eot, pad_token_id=eos)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=eos, pad_token_id=eos, eos_token_id=[eot, eos])
    out = tmp_path_factory.mktemp("tiny_qwen2")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def builtin(model_dir, processor):
    return BuiltinBackend(model_dir, device="cpu", processor=processor)


@pytest.fixture(scope="module")
def vllm_backend(model_dir, processor):
    from engine.rollout.vllm_backend import VLLMBackend

    return VLLMBackend(model_dir, device=torch.device("cpu"), dtype=torch.float32, processor=processor,
                       max_model_len=512, enforce_eager=True, seed=0)


@pytest.fixture(scope="module")
def prompts(processor):
    return [processor.encode(q, [], row_id=f"q{i}") for i, q in enumerate(QUESTIONS)]


def _tokens(result: list[list[Completion]]) -> list[list[list[int]]]:
    return [[c.token_ids for c in group] for group in result]


def _assert_same(got: list[list[Completion]], ref: list[list[Completion]]) -> None:
    """Identical tokens, text and finish reasons; log-probs to 1e-4 (fp32 kernels differ in summation order)."""
    assert _tokens(got) == _tokens(ref)
    for g, r in zip(got, ref, strict=True):
        for c, d in zip(g, r, strict=True):
            assert (c.prompt_index, c.text, c.finish_reason) == (d.prompt_index, d.text, d.finish_reason)
            torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(d.logprobs), atol=1e-4, rtol=0)


@needs_vllm
def test_same_stop_and_banned_ids(vllm_backend, builtin):
    assert vllm_backend.eos_ids == builtin.eos_ids and len(vllm_backend.eos_ids) == 2
    assert vllm_backend.banned_ids == builtin.banned_ids and len(vllm_backend.banned_ids) == 4


@needs_vllm
def test_greedy_matches_builtin(vllm_backend, builtin, prompts):
    greedy = SamplingParams(temperature=0, max_new_tokens=32)
    got = vllm_backend.generate(prompts, 1, greedy)
    _assert_same(got, builtin.generate(prompts, 1, greedy))
    assert len({tuple(c.token_ids) for (c,) in got}) == len(prompts)  # the prompts lead to different outputs


@needs_vllm
def test_update_weights_matches_builtin(vllm_backend, builtin, prompts, processor):
    # A prompt longer than one of vLLM's CPU KV blocks (128 tokens): its prefix blocks are cached, and stale
    # after the update unless the backend resets the prefix cache.
    prompts = [*prompts, processor.encode(" ".join(QUESTIONS * 3), [], row_id="long")]
    assert 128 < len(prompts[-1].input_ids) < 512 - 24
    greedy = SamplingParams(temperature=0, max_new_tokens=24)
    before = vllm_backend.generate(prompts, 1, greedy)
    original = {k: v.detach().clone() for k, v in builtin.model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    perturbed = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in original.items()}
    try:
        vllm_backend.update_weights(perturbed.items())
        builtin.update_weights(perturbed.items())
        after = vllm_backend.generate(prompts, 1, greedy)
        _assert_same(after, builtin.generate(prompts, 1, greedy))
        assert _tokens(after) != _tokens(before)
    finally:
        vllm_backend.update_weights(original.items())
        builtin.update_weights(original.items())
    _assert_same(vllm_backend.generate(prompts, 1, greedy), before)
    # Nothing is loaded when the names or shapes are wrong, or the state dict is partial.
    with pytest.raises(ValueError, match="unknown name.*model.no_such.weight"):
        vllm_backend.update_weights([*original.items(), ("model.no_such.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="missing name"):
        vllm_backend.update_weights([("lm_head.weight", original["lm_head.weight"])])
    with pytest.raises(ValueError, match="shape mismatch: lm_head.weight"):
        vllm_backend.update_weights({**original, "lm_head.weight": torch.zeros(3, 3)}.items())
    _assert_same(vllm_backend.generate(prompts, 1, greedy), before)


@needs_vllm
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_and_seed(vllm_backend, builtin, prompts, temperature):
    """Sampled log-probs are log softmax(logits / T) of a teacher-forced HF forward; a seed fixes the samples."""
    sampling = SamplingParams(temperature=temperature, top_p=0.9, max_new_tokens=16, seed=3)
    got = vllm_backend.generate(prompts, 3, sampling)
    assert vllm_backend.generate(prompts, 3, sampling) == got
    other = vllm_backend.generate(prompts, 3, SamplingParams(temperature=temperature, top_p=0.9, max_new_tokens=16,
                                                             seed=4))
    assert _tokens(other) != _tokens(got)
    assert [[c.prompt_index for c in g] for g in got] == [[i] * 3 for i in range(len(prompts))]
    assert all(len({tuple(c.token_ids) for c in g}) > 1 for g in got)  # the n samples differ
    for sample, group in zip(prompts, got, strict=True):
        for c in group:
            assert len(c.logprobs) == len(c.token_ids) > 0
            ids = torch.tensor([sample.input_ids + c.token_ids])
            with torch.no_grad():
                logits = builtin.model(input_ids=ids).logits[0].float()
            start = len(sample.input_ids) - 1  # position t predicts token t + 1
            logp = torch.log_softmax(logits[start:start + len(c.token_ids)] / temperature, -1)
            ref = logp.gather(-1, torch.tensor(c.token_ids)[:, None]).view(-1)
            torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=0)


@needs_vllm
def test_length_limit_matches_builtin(vllm_backend, builtin, prompts):
    sampling = SamplingParams(temperature=0, max_new_tokens=24)
    got = vllm_backend.generate(prompts, 1, sampling)
    _assert_same(got, builtin.generate(prompts, 1, sampling))
    short = vllm_backend.generate(prompts, 1, SamplingParams(temperature=0, max_new_tokens=5))
    assert all(len(c.token_ids) == 5 and c.finish_reason == "length" for (c,) in short)


@needs_vllm
def test_stop_token_kept_like_builtin(vllm_backend, builtin, prompts, monkeypatch):
    greedy = SamplingParams(temperature=0, max_new_tokens=16)
    free = builtin.generate(prompts, 1, greedy)
    eos = free[0][0].token_ids[3]  # the 4th greedy token of prompt 0 becomes a stop token
    monkeypatch.setattr(builtin, "eos_ids", [*builtin.eos_ids, eos])
    monkeypatch.setattr(vllm_backend, "eos_ids", [*vllm_backend.eos_ids, eos])
    got = vllm_backend.generate(prompts, 1, greedy)
    _assert_same(got, builtin.generate(prompts, 1, greedy))
    assert got[0][0].token_ids[-1] == eos and got[0][0].finish_reason == "stop"


@needs_vllm
def test_vision_tokens_banned(vllm_backend, prompts):
    # Near-uniform sampling over ~1k tokens: about 4 draws in 1024 would be vision tokens without the ban.
    got = vllm_backend.generate(prompts, 8, SamplingParams(temperature=50.0, max_new_tokens=32))
    drawn = [t for g in got for c in g for t in c.token_ids]
    assert len(drawn) > 500 and not set(drawn) & set(vllm_backend.banned_ids)


@needs_vllm
def test_sleep_wake_and_bad_inputs(vllm_backend, prompts, processor):
    from PIL import Image

    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    before = vllm_backend.generate(prompts, 1, greedy)
    vllm_backend.sleep()
    with pytest.raises(RuntimeError, match="wake"):
        vllm_backend.generate(prompts, 1, greedy)
    vllm_backend.wake()
    assert vllm_backend.generate(prompts, 1, greedy) == before
    image_prompt = processor.encode("What is shown?", [Image.new("RGB", (112, 112), (200, 30, 30))])
    with pytest.raises(ValueError, match="text model"):
        vllm_backend.generate([image_prompt], 1, greedy)
    with pytest.raises(ValueError, match="n must be"):
        vllm_backend.generate(prompts, 0, greedy)


@needs_vllm
def test_many_seeded_requests(vllm_backend, prompts):
    """More prompt tokens than one scheduler step takes (4096): on CPU a chunked prefill of a seeded request
    crashed vLLM 0.32 ("CPU Generator does not use offset"); the backend turns chunked prefill off there."""
    many = prompts * 8
    assert sum(len(s.input_ids) for s in many) * 4 > 4096
    sampling = SamplingParams(temperature=1.0, max_new_tokens=4, seed=11)
    got = vllm_backend.generate(many, 4, sampling)
    assert [len(g) for g in got] == [4] * len(many) and vllm_backend.generate(many, 4, sampling) == got


@needs_vllm
@pytest.mark.subprocess
def test_torchrun_colocation(model_dir, toy_world, tmp_path):
    """2 torchrun ranks, one engine each inside the trainer's gloo group (external_launcher); the checks are in
    tests/vllm_colocate_worker.py (outputs equal the builtin's before and after an update, independent engines,
    the process group survives a dropped backend, clean exit)."""
    worker = Path(__file__).with_name("vllm_colocate_worker.py")
    log_path = tmp_path / "torchrun.log"
    with log_path.open("w") as log:
        proc = start(python(worker, model_dir, toy_world / "hf", tmp_path, nproc=2), stdout=log)
        try:
            rc = proc.wait(timeout=480)  # ~70 s on 2 busy cores
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            _stop_torchrun(proc, worker.name, sorted(tmp_path.glob("pid*")))
    output = log_path.read_text()
    assert rc == 0, f"torchrun {'timed out' if rc is None else f'exited with {rc}'}:\n{output[-6000:]}"
    assert "Traceback" not in output, output[-6000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert (r["world_size"], r["vllm_world_size"], r["engine_world_size"], r["tp_size"]) == (2, 2, 1, 1)
        assert r["executor"] == "external_launcher" and r["same_as_other_ranks"] == []
        assert r["max_logprob_diff"] <= 1e-4 and r["num_tokens"] == 2 * 4 * (16 + 8 * r["rank"])


def _stop_torchrun(proc: subprocess.Popen, worker_name: str, pid_files: list[Path]) -> None:
    """Stop torchrun (its own session) and any worker still alive; workers have sessions of their own."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # torchrun's agent stops its workers on SIGTERM
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for pid in (int(f.read_text()) for f in pid_files):
        cmdline = Path(f"/proc/{pid}/cmdline")
        try:
            if worker_name in cmdline.read_bytes().decode(errors="replace"):  # still our worker, not a reused pid
                os.killpg(pid, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass


@needs_vllm
def test_weight_stream_is_checked_first_and_consumed_lazily(vllm_backend, builtin, prompts):
    """A WeightStream (what the GRPO stage sends) is checked by its declared names and shapes before any tensor is
    made, then consumed as vLLM loads: far fewer tensors are alive at once than the state dict holds. A stream that
    yields what it did not declare leaves the engine refusing to generate."""
    import gc
    import weakref

    from engine.rollout import WeightStream

    greedy = SamplingParams(temperature=0, max_new_tokens=12)
    before = vllm_backend.generate(prompts, 1, greedy)
    original = {k: v.detach().clone() for k, v in builtin.model.state_dict().items()}
    shapes = {k: tuple(v.shape) for k, v in original.items()}
    alive, made = [], []

    def tensors(scale=0.05, lie=None):
        gen = torch.Generator().manual_seed(0)
        for k, v in original.items():
            gc.collect()
            made.append(k)
            alive.append(sum(r() is not None for r in _refs))
            t = v + scale * torch.randn(v.shape, generator=gen)
            _refs.append(weakref.ref(t))
            yield (k, t) if k != lie else (k, torch.zeros(3, 3))

    _refs: list = []
    try:
        vllm_backend.update_weights(WeightStream(shapes, tensors))
        builtin.update_weights(WeightStream(shapes, tensors))
        _assert_same(vllm_backend.generate(prompts, 1, greedy), builtin.generate(prompts, 1, greedy))
        assert len(made) == 2 * len(original) and max(alive[:len(original)]) <= len(original) // 2, alive
        made.clear()
        with pytest.raises(ValueError, match="missing name"):  # declared shapes are checked before any tensor
            vllm_backend.update_weights(WeightStream({"lm_head.weight": shapes["lm_head.weight"]}, tensors))
        assert made == []
        with pytest.raises(RuntimeError, match="part-updated"):
            vllm_backend.update_weights(WeightStream(shapes, lambda: tensors(lie="lm_head.weight")))
        with pytest.raises(RuntimeError, match="build a new backend"):
            vllm_backend.generate(prompts, 1, greedy)
    finally:
        vllm_backend._partial_weights = False  # the full original state dict goes back in below
        vllm_backend.update_weights(original.items())
        builtin.update_weights(original.items())
    assert vllm_backend.generate(prompts, 1, greedy) == before
    assert vllm_backend.timing is not None and vllm_backend.timing.total_s > 0
    assert set(vllm_backend.timing.metrics()) == {"time/rollout_generate_s"}


@needs_vllm
def test_torchrun_tensor_parallel(model_dir, toy_world, tmp_path):
    """2 torchrun ranks, one engine over both (tensor_parallel_size=2): the ranks pool their prompts and each gets
    its own completions back, equal to the builtin's (checks in tests/vllm_tp_worker.py)."""
    worker = Path(__file__).with_name("vllm_tp_worker.py")
    log_path = tmp_path / "torchrun.log"
    with log_path.open("w") as log:
        proc = start(python(worker, model_dir, toy_world / "hf", tmp_path, nproc=2), stdout=log)
        try:
            rc = proc.wait(timeout=480)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            _stop_torchrun(proc, worker.name, sorted(tmp_path.glob("pid*")))
    output = log_path.read_text()
    assert rc == 0, f"torchrun {'timed out' if rc is None else f'exited with {rc}'}:\n{output[-6000:]}"
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["tp_size"] for r in results] == [2, 2] and all(r["num_tokens"] > 0 for r in results[:1])
