"""The memory plan (engine/plan.py) against measurements on CPU: parameter, gradient and optimizer bytes exactly;
activations (the storages autograd saves in a forward, measured with saved_tensors_hooks, parameters excluded)
and the builtin backend's KV cache within 15%; the command line says which stage does not fit and why."""

import pytest
import torch
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, Qwen2Config, Qwen2ForCausalLM

from engine import attention, plan
from engine.config import ModelConfig
from engine.data import Processor, collate, encode_rows
from engine.dist import init_distributed
from engine.fsdp import build_optimizer
from engine.sections import OptimConfig
from engine.stages.common import build_policy

from .conftest import REPO


def _local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn()` runs (parameters excluded)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return seen


@pytest.fixture(scope="module")
def toy_batch(toy_world):
    processor = Processor.from_pretrained(toy_world / "hf")
    samples, _ = encode_rows(toy_world / "data" / "sft.parquet", processor, response_column="response")
    return collate(samples[:4], processor.pad_id)


def test_state_bytes_equal_the_tensors(toy_world, toy_batch):
    dist_info = init_distributed()
    policy, hf_model = build_policy(toy_world / "hf", ModelConfig(dtype="float32"), dist_info)
    optimizer = build_optimizer(policy, OptimConfig(lr=1e-3))
    policy(toy_batch).sum().backward()
    optimizer.step()
    measured = {
        "params": sum(_local_bytes(p) for p in policy.parameters()),
        "grads": sum(_local_bytes(p.grad) for p in policy.parameters() if p.grad is not None),
        "optimizer": sum(_local_bytes(v) for s in optimizer.state.values() for v in s.values()),
    }
    shape = plan.model_shape(AutoConfig.from_pretrained(toy_world / "hf"), freeze_vision=True)
    assert plan.state_bytes(shape, world=1) == measured
    assert measured["grads"] < measured["params"]  # the frozen vision tower has none


@pytest.mark.parametrize("layers,hidden,inter,heads,kv", [(2, 64, 160, 4, 2), (3, 96, 224, 6, 2), (2, 128, 96, 8, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_bytes_within_15_percent(layers, hidden, inter, heads, kv, dtype, checkpointing):
    config = Qwen2Config(vocab_size=101, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv)
    model = Qwen2ForCausalLM._from_config(config, attn_implementation=attention.register()).to(dtype).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tokens = 700
    ids = torch.randint(0, 101, (1, tokens))
    pos = torch.cat([torch.arange(300), torch.arange(400)])[None]  # two packed samples
    seen = _saved_bytes(lambda: model.model(input_ids=ids, position_ids=pos, use_cache=False))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    measured = sum(v for k, v in seen.items() if k not in params)
    shape = plan.model_shape(config, freeze_vision=True)
    c = dtype.itemsize
    expected = plan.activation_bytes(shape, tokens, c, checkpointing)
    if checkpointing:  # a forward saves the layer inputs only; the recomputed layer exists during backward
        expected -= tokens * plan.layer_activation_bytes(shape, c)
    assert abs(measured - expected) <= 0.15 * measured, (measured, expected)


def test_kv_cache_bytes_equal_the_cache(toy_world):
    from engine.data import Sample  # noqa: F401  (the backend's prompts)
    from engine.rollout.base import SamplingParams
    from engine.rollout.builtin import BuiltinBackend

    processor = Processor.from_pretrained(toy_world / "hf")
    samples, _ = encode_rows(toy_world / "data" / "sft.parquet", processor, response_column="response")
    backend = BuiltinBackend(toy_world / "hf", device="cpu", processor=processor, max_batch_size=8)
    backend.generate(samples[:3], 2, SamplingParams(temperature=1.0, max_new_tokens=5, seed=0))
    rows, length = backend._cache_shape
    measured = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
                   for layer in backend._cache.layers)
    shape = plan.model_shape(AutoConfig.from_pretrained(toy_world / "hf"), freeze_vision=True)
    assert rows == 6 and measured == plan.kv_cache_bytes(shape, rows, length, 4)


def test_plan_command_says_what_does_not_fit(toy_world, tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text((REPO / "tests" / "fixtures" / "plan_recipe.toml").read_text().format(
        hf=toy_world / "hf", data=toy_world / "data" / "train.parquet"))
    assert plan.main([str(recipe), "--gpus", "2", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "grpo (grpo): peak" in out and "fits" in out and "kv cache" in out
    big_cache = "--stages.grpo.rollout.max_batch_rows=4096"
    assert plan.main([str(recipe), "--gpus", "2", "--gpu-memory", "3.5", big_cache]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "lower rollout.max_batch_rows" in out


def test_plan_command_reads_a_cached_hub_id(toy_world, tmp_path, capsys, monkeypatch):
    """model.path as a Hugging Face id in the local cache: the plan reads the snapshot's config.json (it used to
    look for '<org>/<name>/config.json' relative to the working directory and stop)."""
    from engine import hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "cached_snapshot", lambda repo_id: toy_world / "hf" if repo_id == "toy/tiny" else None)
    recipe = tmp_path / "r.toml"
    recipe.write_text((REPO / "tests" / "fixtures" / "plan_recipe.toml").read_text().format(
        hf="toy/tiny", data=toy_world / "data" / "train.parquet"))
    assert plan.main([str(recipe), "--gpus", "2", "--gpu-memory", "80"]) == 0
    assert "grpo (grpo): peak" in capsys.readouterr().out


def test_startup_check_stops_an_oversized_recipe_before_loading(toy_world, tmp_path):
    from engine.config import load_config

    recipe = tmp_path / "r.toml"
    recipe.write_text((REPO / "tests" / "fixtures" / "plan_recipe.toml").read_text().format(
        hf=toy_world / "hf", data=toy_world / "data" / "train.parquet"))
    cfg = load_config(recipe, ["--stages.grpo.rollout.max_batch_rows=4096"])
    cuda = torch.device("cuda")
    with pytest.raises(ValueError, match=r"stage\(s\) grpo do not fit in 3.5 GiB .* --ignore-memory-plan"):
        plan.check_at_startup(cfg, 2, cuda, allow_oversize=False, gpu_memory_gib=3.5)
    plan.check_at_startup(cfg, 2, cuda, allow_oversize=True, gpu_memory_gib=3.5)  # warns, starts
    plan.check_at_startup(cfg, 2, cuda, allow_oversize=False, gpu_memory_gib=80)
    plan.check_at_startup(cfg, 2, torch.device("cpu"), allow_oversize=False)  # CPU: logged, never raises


def test_planned_peak_is_logged_beside_the_measured_one(toy_world, tmp_path):
    """A training stage gets the plan's peak for its own settings (what metrics.jsonl records on CUDA as
    mem/plan_peak_gib), and Metrics writes it when given."""
    import json

    from engine.config import parse_config
    from engine.metrics import Metrics

    stage = {"name": "s", "kind": "sft", "init": "model", "data": {"train": str(toy_world / "data" / "sft.parquet")}}
    cfg = parse_config({"run": {"name": "p"}, "model": {"path": str(toy_world / "hf")}, "stages": [stage]},
                       [f"--run.out_dir={tmp_path}"])
    config = AutoConfig.from_pretrained(toy_world / "hf")
    peak = plan.planned_peak_gib(cfg.stages[0], cfg.model, config, 2, torch.device("cpu"))
    expected = plan.plan_stage(cfg.stages[0], cfg.model, plan.model_shape(config, cfg.model.freeze_vision), 2, "cpu",
                               0.0)
    assert peak == expected.peak / plan.GIB > 0
    metrics = Metrics(tmp_path / "metrics.jsonl", is_main=True, total_steps=1, plan_peak_gib=peak)
    metrics.log(1, {"train/loss": 1.0, "train/grad_norm": 1.0, "train/lr": 1e-3, "train/num_tokens": 10.0},
                step_s=0.1)
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["mem/plan_peak_gib"] == peak
