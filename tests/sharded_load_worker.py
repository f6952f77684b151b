"""Run by tests/test_sharded_load.py, as one plain process or under torchrun: for each checkpoint directory given,
build the model on the meta device, shard it with FSDP2, load this rank's rows, and compare every local shard and
buffer with a plain `from_pretrained` load, bit for bit. Writes `<out>/rank<r>.json`: per checkpoint the comparison,
or {"error": message} when loading raised ValueError (the next checkpoint is still tried).

With EXPORT_SHARD_BYTES set, each loaded model is then exported with engine.checkpoint.export_hf (files of at most
that many bytes) to `<out>/export-<i>`.

    python tests/sharded_load_worker.py OUT_DIR CKPT_DIR [CKPT_DIR ...]
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from engine.checkpoint import export_hf  # noqa: E402
from engine.dist import destroy_distributed, init_distributed  # noqa: E402
from engine.fsdp import parallelize  # noqa: E402
from engine.hf_files import shard_rows  # noqa: E402
from engine.model import Policy, build_meta_model, load_hf_model, load_weights  # noqa: E402


def compare(ckpt: Path, dist_info, export_to: Path | None) -> dict:
    model = build_meta_model(ckpt, attn_implementation="sdpa")
    policy = Policy(model)
    parallelize(policy, model, dist_info, param_dtype=torch.float32, activation_checkpointing=True,
                freeze_vision=True)
    num_bytes = load_weights(model, ckpt, dist_info.device)
    ref = load_hf_model(ckpt, attn_implementation="sdpa")
    ref_tensors = dict(ref.named_parameters())
    ref_tensors.update(ref.named_buffers())
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    mismatched = []
    for name, tensor in tensors.items():
        local, start = shard_rows(tensor)
        expected = ref_tensors[name].detach()
        expected = expected[start:start + local.shape[0]] if local.dim() else expected
        if local.dtype != expected.dtype or not torch.equal(local, expected):
            mismatched.append(name)
    if export_to is not None:
        export_hf(policy, model, ckpt, export_to, dist_info, max_shard_bytes=int(os.environ["EXPORT_SHARD_BYTES"]))
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return {"names": sorted(tensors), "ref_names": sorted(ref_tensors), "mismatched": mismatched,
            "bytes_read": num_bytes,
            "local_param_numel": sum(shard_rows(p)[0].numel() for p in model.parameters()),
            "param_numel": sum(p.numel() for p in model.parameters()), "tied": tied, "training": model.training,
            "sharded": [n for n, p in model.named_parameters() if type(p).__name__ == "DTensor"]}


def main() -> int:
    out = Path(sys.argv[1])
    dist_info = init_distributed()
    try:
        results = {}
        for i, ckpt in enumerate(sys.argv[2:]):
            export_to = out / f"export-{i}" if "EXPORT_SHARD_BYTES" in os.environ else None
            try:
                results[ckpt] = compare(Path(ckpt), dist_info, export_to)
            except ValueError as e:  # what the test of bad checkpoints expects, on every rank
                results[ckpt] = {"error": str(e)}
        (out / f"rank{dist_info.rank}.json").write_text(json.dumps(results))
        return 0
    finally:
        destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
