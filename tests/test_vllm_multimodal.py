"""engine/rollout/vllm_backend.py on image prompts: vLLM against the builtin backend on a tiny Qwen2.5-VL (CPU, fp32);
and a stage's export (engine.checkpoint.export_hf) served by vLLM's own `LLM.chat`, against transformers.

Runs under `make test-vllm` (vLLM's CPU build in .venv-vllm) and skips elsewhere. vLLM's CPU build cannot load
Qwen2.5-VL's processors without torchvision, which .venv-vllm lacks; tests/vllm_shims.py stands in for the
torchvision parts, applied around this module's engine only. The model is the toy world's Qwen2.5-VL with wider
heads (head_dim 32 in the language model and the vision tower: vLLM's CPU attention needs >= 32).
"""

import importlib.util

import pytest
import torch
from PIL import Image

from engine.data import Processor
from engine.rollout import BuiltinBackend, SamplingParams
from tests.test_vllm_backend import _assert_same, _tokens

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm (make test-vllm)")


@pytest.fixture(scope="module")
def processor(toy_world):
    return Processor.from_pretrained(toy_world / "hf")


@pytest.fixture(scope="module")
def vl_model_dir(tmp_path_factory, processor):
    """The toy world's Qwen2.5-VL (engine/toy.py) with 2 heads of 32 in the language model and the vision tower,
    the toy tokenizer and image processor."""
    from engine.toy import ToySpec, _build_model

    spec = ToySpec(seed=0, hidden_size=64, num_heads=2, num_kv_heads=1, vision_hidden_size=64)
    model = _build_model(spec, processor.tokenizer)
    text, vision = model.config.text_config, model.config.vision_config
    assert text.hidden_size // text.num_attention_heads == vision.hidden_size // vision.num_heads == 32
    out = tmp_path_factory.mktemp("tiny_qwen2_5_vl")
    model.save_pretrained(out)
    processor.tokenizer.save_pretrained(out)
    processor.image_processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def builtin(vl_model_dir, processor):
    return BuiltinBackend(vl_model_dir, device="cpu", processor=processor)


@pytest.fixture(scope="module")
def vllm_backend(vl_model_dir, processor):
    from engine.rollout.vllm_backend import VLLMBackend
    from tests.vllm_shims import apply_vllm_cpu_vl_shims

    with pytest.MonkeyPatch.context() as mp:
        apply_vllm_cpu_vl_shims(mp)
        yield VLLMBackend(vl_model_dir, device=torch.device("cpu"), dtype=torch.float32, processor=processor,
                          max_model_len=512, enforce_eager=True, seed=0)


def _noise(h: int, w: int, seed: int) -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy())


@pytest.fixture(scope="module")
def prompts(processor):
    """One image, two images of different sizes, text only, and prompt 0's text with another image."""
    return [processor.encode("What is in <image> this picture?", [_noise(112, 112, 0)], row_id="one"),
            processor.encode("Compare <image> and <image>: which is brighter?", [_noise(56, 112, 1), _noise(84, 84, 2)],
                             row_id="two"),
            processor.encode("Name a color.", [], row_id="text"),
            processor.encode("What is in <image> this picture?", [_noise(112, 112, 3)], row_id="one_other")]


def test_prompts_cover_the_cases(prompts, processor):
    grids = [None if s.image_grid_thw is None else s.image_grid_thw.tolist() for s in prompts]
    assert grids == [[[1, 8, 8]], [[1, 4, 8], [1, 6, 6]], None, [[1, 8, 8]]]
    assert [s.input_ids.count(processor.image_token_id) for s in prompts] == [16, 8 + 9, 0, 16]


def test_greedy_matches_builtin(vllm_backend, builtin, prompts):
    """Same tokens, text and log-probs (1e-4) as the builtin; vLLM's expanded prompts equal ours (the backend
    raises otherwise); the image reaches the model (prompts 0 and 3 differ only in it, and so do their outputs)."""
    greedy = SamplingParams(temperature=0, max_new_tokens=24)
    got = vllm_backend.generate(prompts, 1, greedy)
    _assert_same(got, builtin.generate(prompts, 1, greedy))
    assert len({tuple(c.token_ids) for (c,) in got}) == len(prompts)
    assert all(len(c.token_ids) == 24 for (c,) in got)  # no early stop: every position is compared


def test_expanded_prompt_mismatch_is_caught(vllm_backend, toy_world):
    """A sample whose image was resized beyond the checkpoint's max_pixels reaches vLLM with fewer pads: caught."""
    big = Processor.from_pretrained(toy_world / "hf", max_pixels=224 * 224)
    sample = big.encode("What is in <image> this picture?", [_noise(224, 224, 5)], row_id="too_big")
    assert sample.image_grid_thw.tolist() == [[1, 16, 16]]
    with pytest.raises(RuntimeError, match="'too_big'.*preprocessor_config.json"):
        vllm_backend.generate([sample], 1, SamplingParams(temperature=0, max_new_tokens=2))


def test_update_weights_matches_builtin(vllm_backend, builtin, prompts):
    """After an update of the vision tower alone, then of everything, outputs equal the builtin's after the same
    update and differ from before; restoring the weights restores the outputs. The vision-only update also
    checks that no stale image features (vLLM's encoder cache) survive an update."""
    greedy = SamplingParams(temperature=0, max_new_tokens=16)
    before = vllm_backend.generate(prompts, 1, greedy)
    original = {k: v.detach().clone() for k, v in builtin.model.state_dict().items()}
    visual = [k for k in original if k.startswith("model.visual.")]
    assert len(visual) > 10
    gen = torch.Generator().manual_seed(0)
    noise = {k: 0.05 * torch.randn(v.shape, generator=gen) for k, v in original.items()}
    vision_only = {k: v + noise[k] if k in visual else v for k, v in original.items()}
    everything = {k: v + noise[k] for k, v in original.items()}
    try:
        for weights, text_changes in ((vision_only, False), (everything, True)):
            vllm_backend.update_weights(weights.items())
            builtin.update_weights(weights.items())
            after = vllm_backend.generate(prompts, 1, greedy)
            _assert_same(after, builtin.generate(prompts, 1, greedy))
            changed = [a != b for a, b in zip(_tokens(after), _tokens(before), strict=True)]
            assert changed == [True, True, text_changes, True]
    finally:
        vllm_backend.update_weights(original.items())
        builtin.update_weights(original.items())
    _assert_same(vllm_backend.generate(prompts, 1, greedy), before)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_and_seed(vllm_backend, builtin, prompts, temperature):
    """A seed fixes the samples; sampled log-probs are log softmax(logits / T) of a teacher-forced HF forward with
    the images (and mm_token_type_ids, from which transformers derives the M-RoPE positions)."""
    sampling = SamplingParams(temperature=temperature, top_p=0.9, max_new_tokens=12, seed=3)
    got = vllm_backend.generate(prompts, 3, sampling)
    assert vllm_backend.generate(prompts, 3, sampling) == got
    other = vllm_backend.generate(prompts, 3, SamplingParams(temperature=temperature, top_p=0.9, max_new_tokens=12,
                                                             seed=4))
    assert _tokens(other) != _tokens(got)
    assert all(len({tuple(c.token_ids) for c in g}) > 1 for g in got)  # the n samples differ
    for sample, group in zip(prompts, got, strict=True):
        for c in group:
            assert len(c.logprobs) == len(c.token_ids) > 0
            ids = sample.input_ids + c.token_ids
            inputs = {"input_ids": torch.tensor([ids]),
                      "mm_token_type_ids": torch.tensor([sample.mm_token_type_ids + [0] * len(c.token_ids)])}
            if sample.image_grid_thw is not None:
                inputs.update(pixel_values=sample.pixel_values, image_grid_thw=sample.image_grid_thw)
            with torch.no_grad():
                logits = builtin.model(**inputs).logits[0].float()
            start = len(sample.input_ids) - 1  # position t predicts token t + 1
            logp = torch.log_softmax(logits[start:start + len(c.token_ids)] / temperature, -1)
            ref = logp.gather(-1, torch.tensor(c.token_ids)[:, None]).view(-1)
            torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def exported_dir(vl_model_dir, tmp_path_factory):
    """vl_model_dir as a training stage leaves it: loaded by the stages' loader (meta model + safetensors slices)
    and written by their export (engine.checkpoint.export_hf, the function engine/stages/_train.py calls), in
    files of at most 1 MiB so that the export has several safetensors files and the index."""
    from engine.checkpoint import export_hf
    from engine.dist import DistInfo
    from engine.model import Policy, build_meta_model, load_weights

    hf_model = build_meta_model(vl_model_dir, attn_implementation="sdpa")
    load_weights(hf_model, vl_model_dir, torch.device("cpu"))
    out = tmp_path_factory.mktemp("export") / "hf"
    export_hf(Policy(hf_model), hf_model, vl_model_dir, out, DistInfo(0, 1, 0, torch.device("cpu"), "gloo"),
              max_shard_bytes=2**20)
    return out


def test_export_serves_in_vllm(exported_dir):
    """A stage's export, used as a user would: vLLM's `LLM.chat` on image + text messages. With the export's chat
    template, tokenizer and image processor, vLLM builds the same prompt as transformers' AutoProcessor on the
    export; its greedy tokens are the argmax of transformers' `from_pretrained` model on the export at every step
    (a teacher-forced forward over prompt + vLLM's tokens), log-probs to 1e-4; the two images give different
    outputs (the image reaches the model)."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
    from vllm import LLM
    from vllm import SamplingParams as VllmSampling

    from tests.vllm_shims import apply_vllm_cpu_vl_shims

    files = {f.name for f in exported_dir.iterdir()}
    assert {"model.safetensors.index.json", "config.json", "chat_template.jinja", "tokenizer.json",
            "tokenizer_config.json", "preprocessor_config.json"} <= files, files
    assert sum(f.endswith(".safetensors") for f in files) > 1
    num_new = 8
    images = [_noise(112, 112, 0), _noise(84, 112, 1)]
    text = {"type": "text", "text": "What is in this picture?"}
    with pytest.MonkeyPatch.context() as mp:
        apply_vllm_cpu_vl_shims(mp)
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process, where the shims apply
        llm = LLM(model=str(exported_dir), dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
                  kv_cache_memory_bytes=64 * 2**20, enable_chunked_prefill=False, limit_mm_per_prompt={"video": 0})
        # ignore_eos: both sides produce num_new tokens whatever the toy model emits (stopping is not under test)
        chats = [[{"role": "user", "content": [{"type": "image_pil", "image_pil": im}, text]}] for im in images]
        outs = llm.chat(chats, VllmSampling(temperature=0, max_tokens=num_new, ignore_eos=True, logprobs=0),
                        use_tqdm=False)
        hf_processor = AutoProcessor.from_pretrained(exported_dir)
        del llm
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(exported_dir, dtype=torch.float32)
    image_id = model.config.image_token_id
    for image, out in zip(images, outs, strict=True):
        chat = [{"role": "user", "content": [{"type": "image", "image": image}, text]}]
        inputs = hf_processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                  return_tensors="pt")
        prompt, new = list(out.prompt_token_ids), list(out.outputs[0].token_ids)
        assert inputs["input_ids"][0].tolist() == prompt
        assert len(new) == num_new and prompt.count(image_id) > 0
        ids = torch.tensor([prompt + new])
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                           mm_token_type_ids=(ids == image_id).long()).logits[0]
        logp = torch.log_softmax(logits[len(prompt) - 1:-1].float(), -1)  # position t predicts token t + 1
        assert logp.argmax(-1).tolist() == new
        got = [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, new, strict=True)]
        torch.testing.assert_close(torch.tensor(got), logp.gather(-1, torch.tensor(new)[:, None]).view(-1),
                                   atol=1e-4, rtol=0)
    assert outs[0].outputs[0].token_ids != outs[1].outputs[0].token_ids
