"""Meta-device construction + per-rank sharded loading (engine.model.load_weights) equals transformers'
from_pretrained bit for bit, on 1 and 2 ranks, for bf16 and fp32, tied and untied, one file and several; a bad
checkpoint stops every rank with an error naming the file and tensor."""

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig

from engine import plan
from engine.model import load_hf_model

from ._launch import REPO, child_env, launch, python
from .tiny_checkpoints import save_qwen2, save_qwen2_5_vl

WORKER = REPO / "tests" / "sharded_load_worker.py"


def _run(out: Path, ckpts: list[Path], nproc: int, export_shard_bytes: int = 0) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    env = child_env(EXPORT_SHARD_BYTES=str(export_shard_bytes)) if export_shard_bytes else child_env()
    return launch(python(WORKER, out, *ckpts, nproc=nproc), timeout_s=300, env=env, check=False)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return {
        "vl-bf16-tied-sharded": save_qwen2_5_vl(root / "a", dtype=torch.bfloat16, tied=True, max_shard_size="60KB"),
        "vl-fp32-untied": save_qwen2_5_vl(root / "b", dtype=torch.float32, tied=False),
        "qwen2-bf16-untied": save_qwen2(root / "c", dtype=torch.bfloat16, tied=False),
        "qwen2-fp32-tied-sharded": save_qwen2(root / "d", dtype=torch.float32, tied=True, max_shard_size="40KB"),
    }


@pytest.mark.subprocess
@pytest.mark.parametrize("nproc", [1, 2])
def test_sharded_load_equals_from_pretrained(checkpoints, tmp_path, nproc):
    assert (checkpoints["vl-bf16-tied-sharded"] / "model.safetensors.index.json").is_file()
    # The 2-rank run also exports each loaded model (streaming, files of at most 50 KB): see the export test below.
    result = _run(tmp_path, list(checkpoints.values()), nproc, export_shard_bytes=50_000 if nproc == 2 else 0)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)]
    for key, ckpt in checkpoints.items():
        per_rank = [r[str(ckpt)] for r in ranks]
        assert "error" not in per_rank[0], per_rank[0]
        for res in per_rank:
            assert res["mismatched"] == [], (key, res["mismatched"])
            assert res["names"] == res["ref_names"], key  # every parameter and buffer, inv_freq included
            assert any("inv_freq" in n for n in res["names"]), key
            assert res["tied"] == ("-tied" in key), key
            assert not res["training"], key  # eval mode, as from_pretrained returns the model
            assert res["sharded"], key
        # The shards partition the parameters: together the ranks hold each element once, and read only that.
        assert sum(r["local_param_numel"] for r in per_rank) == per_rank[0]["param_numel"], key
        if nproc == 2:
            assert all(0 < r["local_param_numel"] < r["param_numel"] for r in per_rank), key
        # The memory plan's parameter bytes are this rank's shard bytes exactly.
        shape = plan.model_shape(AutoConfig.from_pretrained(ckpt), freeze_vision=True)
        for rank, r in enumerate(per_rank):
            assert plan.state_bytes(shape, nproc, rank)["params"] == r["local_param_numel"] * 4, (key, rank)
        itemsize = 2 if "bf16" in key else 4
        assert sum(r["bytes_read"] for r in per_rank) == per_rank[0]["param_numel"] * itemsize, key
    if nproc == 2:
        _check_exports(checkpoints, tmp_path)


def _check_exports(checkpoints: dict[str, Path], out: Path) -> None:
    """Each streamed export (2 ranks, several files + index) loads with from_pretrained and equals the source
    checkpoint's from_pretrained bit for bit, in the source's dtype (fp32 masters of bf16 weights round-trip)."""
    for i, (key, ckpt) in enumerate(checkpoints.items()):
        exported = out / f"export-{i}"
        assert not (out / f"export-{i}.tmp").exists(), key
        index = json.loads((exported / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1, key
        assert (exported / "generation_config.json").is_file(), key  # side files copied from the source
        assert json.loads((exported / "config.json").read_text())["dtype"] == \
            json.loads((ckpt / "config.json").read_text())["dtype"], key
        with safe_open(exported / index["weight_map"][next(iter(index["weight_map"]))], "pt") as f:
            stored = f.get_slice(next(iter(f.keys()))).get_dtype()
        assert stored == ("BF16" if "bf16" in key else "F32"), key
        ours = load_hf_model(exported, attn_implementation="sdpa").state_dict()
        ref = load_hf_model(ckpt, attn_implementation="sdpa").state_dict()
        assert ours.keys() == ref.keys(), key
        assert not [k for k in ref if not torch.equal(ours[k], ref[k])], key


def _bad_checkpoints(root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (checkpoint dir, regex the error must match)."""
    missing_file = save_qwen2(root / "missing_file", dtype=torch.bfloat16, tied=False, max_shard_size="40KB")
    shard = sorted(missing_file.glob("model-*.safetensors"))[1]
    shard.unlink()
    bad_shape = save_qwen2(root / "bad_shape", dtype=torch.float32, tied=False)
    config = json.loads((bad_shape / "config.json").read_text())
    config["intermediate_size"] = 96
    (bad_shape / "config.json").write_text(json.dumps(config))
    missing_tensor = save_qwen2(root / "missing_tensor", dtype=torch.float32, tied=False)
    from safetensors.torch import load_file, save_file
    sd = load_file(missing_tensor / "model.safetensors")
    del sd["model.layers.1.self_attn.k_proj.weight"]
    save_file(sd, missing_tensor / "model.safetensors", metadata={"format": "pt"})
    other = root / "llama"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "llama"}')
    return {
        "missing_file": (missing_file, rf"names 1 missing file\(s\) \['{shard.name}'\]"),
        "bad_shape": (bad_shape, r"model.layers.0.mlp.gate_proj.weight in model.safetensors: shape \[80, 48\], "
                                 r"the model \(config.json\) expects \[96, 48\]"),
        "missing_tensor": (missing_tensor, r"model.layers.1.self_attn.k_proj.weight: missing"),
        "unsupported": (other, r"'llama' .* is not supported"),
    }


@pytest.mark.subprocess
def test_bad_checkpoints_fail_on_every_rank(tmp_path):
    bad = _bad_checkpoints(tmp_path / "ckpts")
    # One launch for all: each rank must raise for each checkpoint and reach the next, none left in a collective.
    result = _run(tmp_path / "out", [ckpt for ckpt, _ in bad.values()], nproc=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in (0, 1):
        found = json.loads((tmp_path / "out" / f"rank{rank}.json").read_text())
        for name, (ckpt, pattern) in bad.items():
            assert re.search(pattern, found[str(ckpt)].get("error", "")), (name, rank, found[str(ckpt)])


def test_builtin_rollout_copy_loads_in_its_dtype(toy_world):
    """The builtin backend's inference copy, filled from the files in bf16, equals from_pretrained cast to bf16, and
    its rotary inverse frequencies are the exact fp32 ones (not rounded through bf16)."""
    from engine.rollout.builtin import BuiltinBackend

    backend = BuiltinBackend(toy_world / "hf", device="cpu", dtype=torch.bfloat16)
    ref = load_hf_model(toy_world / "hf", attn_implementation="sdpa")
    ours = backend.model.state_dict()
    for name, value in ref.state_dict().items():
        assert ours[name].dtype == torch.bfloat16 and torch.equal(ours[name], value.to(torch.bfloat16)), name
    buffers = dict(backend.model.named_buffers())
    for name, value in ref.named_buffers():
        assert buffers[name].dtype == torch.float32 and torch.equal(buffers[name], value), name
    assert any("inv_freq" in n for n in buffers)
