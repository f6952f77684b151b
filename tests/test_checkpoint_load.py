"""Resuming from damaged or hostile checkpoints (engine/checkpoint.py's load path, engine/dcp_safe.py)."""
# ruff: noqa: F811 -- the fixtures dist_info and batches come from test_trainer

import io
import json
import logging
import pathlib
import pickle
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.checkpoint import CheckpointDamagedError, Checkpointer, load_rng_file, rng_state, set_rng_state
from engine.dcp_safe import SafeLoadPlanner
from engine.dist import DistInfo, _free_port
from engine.sections import CheckpointConfig

from .test_trainer import _make, _params, _sft_loss, batches, dist_info  # noqa: F401 -- fixtures


class _Payload:
    """Unpickling this writes `marker`: a stand-in for any code a crafted checkpoint would run."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.write_text, (self.marker, "code ran")


@pytest.fixture
def engine_log():
    """What the `engine` logger says during a test (whether or not setup_logging stopped its propagation)."""
    text = io.StringIO()
    handler = logging.StreamHandler(text)
    logging.getLogger("engine").addHandler(handler)
    yield text
    logging.getLogger("engine").removeHandler(handler)


def _two_checkpoints(toy_world, dist_info, batches, tmp_path):
    """A trainer with checkpoints at steps 1 and 2 (keep = 2); returns the parameters at step 1."""
    policy, _, trainer = _make(toy_world, dist_info, tmp_path)
    loss_fn = _sft_loss(policy)
    trainer.run_step([batches[0]], loss_fn)
    trainer.save()
    at_step_1 = _params(policy)
    trainer.run_step([batches[1]], loss_fn)
    trainer.save()
    assert trainer.checkpointer.steps() == [1, 2]
    return at_step_1


def _truncate_shard(step_dir):
    shard = max(step_dir.glob("*.distcp"), key=lambda f: f.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return shard.name


DAMAGES = {
    "truncated shard": lambda d: _truncate_shard(d),
    "garbage trainer.json": lambda d: (d / "trainer.json").write_bytes(b"\x00\xff garbage"),
    "trainer.json without the trainer's keys": lambda d: (d / "trainer.json").write_text('{"step": 2}'),
    "missing .metadata": lambda d: (d / ".metadata").unlink(),
    "garbage .metadata": lambda d: (d / ".metadata").write_bytes(b"not a pickle"),
    "garbage rng file": lambda d: (d / "rng-rank0.pt").write_bytes(b"PK\x03\x04 not a torch file"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_newest_checkpoint_resumes_from_the_previous(toy_world, dist_info, batches, tmp_path, engine_log,
                                                            damage):
    """A damaged newest checkpoint used to give a raw traceback (EOFError, KeyError, JSONDecodeError) and the
    complete older one was never tried."""
    at_step_1 = _two_checkpoints(toy_world, dist_info, batches, tmp_path)
    ckpt_dir = tmp_path / "checkpoints"
    DAMAGES[damage](ckpt_dir / "step-000002")

    fresh, _, trainer = _make(toy_world, dist_info, tmp_path)
    assert trainer.resume()
    assert trainer.step == 1
    for k, v in _params(fresh).items():
        assert torch.equal(v, at_step_1[k]), k
    said = engine_log.getvalue()
    assert "step-000002" in said and "resuming from the older step 1" in said
    # The damaged one is kept for inspection, out of the way of the next save and of the next resume.
    assert trainer.checkpointer.steps() == [1] and (ckpt_dir / "step-000002.damaged").is_dir()


def test_no_usable_checkpoint_lists_every_one_tried(toy_world, dist_info, batches, tmp_path):
    _two_checkpoints(toy_world, dist_info, batches, tmp_path)
    ckpt_dir = tmp_path / "checkpoints"
    (ckpt_dir / "step-000002" / ".metadata").unlink()
    (ckpt_dir / "step-000001" / "trainer.json").write_text("[1, 2")
    _, _, trainer = _make(toy_world, dist_info, tmp_path)
    with pytest.raises(CheckpointDamagedError) as e:
        trainer.resume()
    msg = str(e.value)
    assert "step-000002: .metadata is missing" in msg
    assert "step-000001: trainer.json is unreadable (JSONDecodeError" in msg
    assert "move" in msg and "aside" in msg
    assert trainer.checkpointer.steps() == [1, 2]  # left in place: a rerun says the same until they are dealt with


def test_metadata_pickle_that_runs_code_is_refused(toy_world, dist_info, batches, tmp_path):
    """DCP reads `.metadata` with plain pickle.load: a crafted one ran its code when a run resumed."""
    _two_checkpoints(toy_world, dist_info, batches, tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / "checkpoints" / "step-000002" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    _, _, trainer = _make(toy_world, dist_info, tmp_path)
    assert trainer.checkpointer.problem(2).startswith(".metadata is unreadable (UnpicklingError: refused global")
    assert trainer.resume() and trainer.step == 1
    assert not marker.exists()


def test_rng_pickle_that_runs_code_is_refused(toy_world, dist_info, batches, tmp_path):
    """rng-rank<r>.pt was loaded with weights_only=False."""
    _two_checkpoints(toy_world, dist_info, batches, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"torch": _Payload(marker), "python": 0, "numpy": 0},
               tmp_path / "checkpoints" / "step-000002" / "rng-rank0.pt")
    _, _, trainer = _make(toy_world, dist_info, tmp_path)
    assert trainer.resume() and trainer.step == 1
    assert not marker.exists()


def test_non_tensor_items_load_without_code(tmp_path):
    """DCP's default planner loads optimizer hyperparameters with torch.load(weights_only=False)."""
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        SafeLoadPlanner().load_bytes(None, buf)
    assert not marker.exists()


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    """New files hold tensors and plain values; files in the earlier format (numpy's state tuple) still load."""
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    torch.save(rng_state(), tmp_path / "new.pt")
    old = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    torch.save(old, tmp_path / "old.pt")
    expected = (torch.rand(2), random.random(), np.random.rand())
    for name in ("new.pt", "old.pt"):
        set_rng_state(load_rng_file(tmp_path / name))
        assert (torch.rand(2), random.random(), np.random.rand())[1:] == expected[1:], name
        set_rng_state(load_rng_file(tmp_path / name))
        assert torch.equal(torch.rand(2), expected[0]), name


def test_problem_names_the_truncated_shard(toy_world, dist_info, batches, tmp_path):
    _two_checkpoints(toy_world, dist_info, batches, tmp_path)
    name = _truncate_shard(tmp_path / "checkpoints" / "step-000002")
    ckpt = Checkpointer(tmp_path / "checkpoints", CheckpointConfig(), dist_info)
    assert ckpt.problem(1) == ""
    assert ckpt.problem(2).startswith(f"{name} is truncated (")
    json.loads((tmp_path / "checkpoints" / "step-000001" / "trainer.json").read_text())


def _two_rank_worker(rank: int, port: int, root) -> None:
    """Saves steps 1 and 2 of a small model on two gloo ranks, damages rank 1's RNG file of step 2 (a problem only
    rank 1 sees), then resumes; writes what each rank loaded."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    info = DistInfo(rank, 2, rank, torch.device("cpu"), "gloo")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    ckpt = Checkpointer(root / "checkpoints", CheckpointConfig(keep=2), info)
    weights = {}
    for step in (1, 2):
        model(torch.ones(2, 4)).sum().backward()
        optimizer.step()
        weights[step] = model.weight.detach().clone()
        ckpt.save(step, model, optimizer, {"step": step})
    if rank == 1:
        (ckpt.path(2) / "rng-rank1.pt").write_bytes(b"garbage")
    dist.barrier()
    with torch.no_grad():
        model.weight.zero_()
    state = ckpt.load_latest(model, optimizer)
    same = torch.equal(model.weight, weights[1])
    (root / f"{rank}.json").write_text(json.dumps({"step": state["step"], "weights_of_step_1": same,
                                                   "steps": ckpt.steps()}))
    dist.destroy_process_group()


@pytest.mark.subprocess
def test_a_problem_one_rank_sees_makes_every_rank_fall_back(tmp_path):
    """Every rank agrees on which checkpoint it resumes from, even when only one rank's file is damaged (a rank
    that went on alone would leave the others in a different collective)."""
    mp.spawn(_two_rank_worker, args=(_free_port(), tmp_path), nprocs=2)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got == {"step": 1, "weights_of_step_1": True, "steps": [1]}, rank
    assert (tmp_path / "checkpoints" / "step-000002.damaged").is_dir()
