"""In-process (world size 1) tests of the training loop: checkpoint round trip, HF export, non-finite steps.

The process group is gloo with one rank, the same code path FSDP2 and DCP take under torchrun.
"""

import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import Qwen2_5_VLForConditionalGeneration

from engine.checkpoint import Checkpointer, export_hf
from engine.config import ModelConfig
from engine.data import Processor, collate, encode_rows
from engine.dist import _free_port, init_distributed, lockstep, max_and_sum
from engine.model import Policy
from engine.sections import CheckpointConfig, OptimConfig, TrainConfig
from engine.stages.common import build_policy
from engine.trainer import NonFiniteError, Trainer


@pytest.fixture(scope="module")
def dist_info():
    return init_distributed()


@pytest.fixture(scope="module")
def batches(toy_world):
    processor = Processor.from_pretrained(toy_world / "hf")
    samples, _ = encode_rows(toy_world / "data" / "sft.parquet", processor, template="{problem}",
                             response_column="response")
    return [collate(samples[i : i + 4], processor.pad_id) for i in range(0, 16, 4)]


def _make(toy_world, dist_info, tmp_path, **train):
    policy, hf_model = build_policy(toy_world / "hf", ModelConfig(dtype="float32"), dist_info)
    trainer = Trainer(policy, optim=OptimConfig(lr=1e-3, warmup_steps=1), train=TrainConfig(**train),
                      checkpoint=CheckpointConfig(every=2, keep=2), stage_dir=tmp_path, dist_info=dist_info,
                      total_steps=4)
    return policy, hf_model, trainer


def _sft_loss(policy):
    def loss_fn(mb):
        logp = policy(mb)
        return -logp.mean(), {"train/loss": -logp.mean(), "train/num_tokens": mb["attention_mask"].sum()}
    return loss_fn


def _params(model):
    return {k: v.full_tensor().clone() for k, v in model.state_dict().items()}


def test_checkpoint_round_trip_gives_identical_next_step(toy_world, dist_info, batches, tmp_path):
    policy, _, trainer = _make(toy_world, dist_info, tmp_path)
    loss_fn = _sft_loss(policy)
    for step in range(2):
        trainer.train_step([batches[step]], loss_fn)
        trainer.step += 1
    trainer.save()
    expected = trainer.train_step([batches[2]], loss_fn)
    after = _params(policy)

    fresh, _, trainer2 = _make(toy_world, dist_info, tmp_path)
    assert trainer2.resume() and trainer2.step == 2
    assert trainer2.scheduler.last_epoch == trainer.scheduler.last_epoch - 1
    got = trainer2.train_step([batches[2]], _sft_loss(fresh))
    assert got["train/loss"] == expected["train/loss"] and got["train/grad_norm"] == expected["train/grad_norm"]
    for k, v in _params(fresh).items():
        assert torch.equal(v, after[k]), k


def test_checkpoints_keep_last_k_and_ignore_partial(toy_world, dist_info, tmp_path):
    policy, _, trainer = _make(toy_world, dist_info, tmp_path)
    ckpt = Checkpointer(tmp_path / "checkpoints", CheckpointConfig(keep=2), dist_info)
    for step in (1, 2, 3):
        ckpt.save(step, policy, trainer.optimizer, {"step": step})
    (tmp_path / "checkpoints" / "step-000009.tmp").mkdir()  # a save that crashed half way
    assert ckpt.steps() == [2, 3]
    with pytest.raises(ValueError, match=r"step 7: .* does not exist \(found: \[2, 3\]\)"):
        ckpt.load(7, policy, trainer.optimizer)


def test_hf_export_loads_and_gives_same_logprobs(toy_world, dist_info, batches, tmp_path):
    policy, hf_model, trainer = _make(toy_world, dist_info, tmp_path)
    trainer.train_step([batches[0]], _sft_loss(policy))
    with torch.no_grad():
        trained = policy(batches[1])
    export_hf(policy, hf_model, toy_world / "hf", tmp_path / "hf", dist_info)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert (tmp_path / "hf" / name).is_file(), name
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        again = Policy(loaded)(batches[1])
        base = Policy(Qwen2_5_VLForConditionalGeneration.from_pretrained(toy_world / "hf"))(batches[1])
    torch.testing.assert_close(again, trained, rtol=0, atol=1e-6)
    assert not torch.allclose(base, trained)  # the export holds the trained weights, not the initial ones
    Processor.from_pretrained(tmp_path / "hf")  # tokenizer and image processor travel with it


def test_non_finite_steps_are_skipped_then_stop(toy_world, dist_info, batches, tmp_path):
    policy, _, trainer = _make(toy_world, dist_info, tmp_path, max_bad_steps=2)
    good = _sft_loss(policy)

    def nan_loss(mb):
        loss, stats = good(mb)
        return loss * float("nan"), {**stats, "train/loss": stats["train/loss"] * float("nan")}

    before = _params(policy)
    values = trainer.train_step([batches[0]], nan_loss)
    assert values["train/skipped"] and values["train/num_skipped"] == 1 and math.isnan(values["train/loss"])
    for k, v in _params(policy).items():
        assert torch.equal(v, before[k]), f"{k} changed on a skipped step"
    assert not trainer.train_step([batches[0]], good)["train/skipped"]  # a good step resets the streak
    trainer.step = 1
    trainer.save()
    trainer.train_step([batches[0]], nan_loss)
    with pytest.raises(NonFiniteError, match="2 optimizer steps in a row .*checkpoints/step-000001"):
        trainer.train_step([batches[0]], nan_loss)
    assert trainer.checkpointer.steps() == [1]
    assert json.loads((trainer.checkpointer.path(1) / "trainer.json").read_text())["num_skipped"] == 1


def _lockstep_worker(rank: int, port: int, out_dir) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    items = [["a"], ["b", "c", "d"]][rank]
    cpu = torch.device("cpu")
    got = lockstep(items, cpu)
    empty = lockstep([] if rank == 0 else items, cpu, filler="f")
    maxes, sums = max_and_sum([len(items), 7 * rank], [10 * (rank + 1), rank + 1], cpu)
    (out_dir / f"{rank}.json").write_text(json.dumps({"got": got, "empty": empty, "maxes": maxes, "sums": sums}))
    dist.destroy_process_group()


@pytest.mark.subprocess
def test_lockstep_and_max_and_sum_on_two_ranks(tmp_path):
    """Two gloo ranks: the shorter list is padded with its first item (or the filler), marked not real; one
    exchange gives maxes and sums."""
    mp.spawn(_lockstep_worker, args=(_free_port(), tmp_path), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert r0["got"] == [["a", True], ["a", False], ["a", False]]
    assert r1["got"] == [["b", True], ["c", True], ["d", True]]
    assert r0["empty"] == [["f", False]] * 3
    assert r0["maxes"] == r1["maxes"] == [3, 7] and r0["sums"] == r1["sums"] == [30, 3]
    assert lockstep(["x"], torch.device("cpu"), num=2) == [("x", True), ("x", False)]  # known count: no exchange
