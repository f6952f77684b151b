"""Checkpoint saves after divergence (engine/checkpoint.py's save path)."""

from .test_trainer import _make, _sft_loss, batches, dist_info  # noqa: F401 -- fixtures


def test_no_checkpoint_while_steps_are_skipped(toy_world, dist_info, batches, tmp_path):  # noqa: F811
    """Checkpoints saved during skipped (non-finite) steps used to push the last finite one out of `keep`, so the
    checkpoint named as the last good one held diverged weights."""
    policy, _, trainer = _make(toy_world, dist_info, tmp_path, max_bad_steps=10)
    good = _sft_loss(policy)

    def nan_loss(mb):
        loss, stats = good(mb)
        return loss * float("nan"), {**stats, "train/loss": stats["train/loss"] * float("nan")}

    trainer.run_step([batches[0]], good)
    trainer.save()  # step 1: finite
    for _ in range(3):  # keep = 2: two suspect saves would have pruned step 1
        trainer.run_step([batches[0]], nan_loss)
        trainer.save()
    assert trainer.checkpointer.steps() == [1]
    trainer.run_step([batches[0]], good)  # a finite step again: saving resumes
    trainer.save()
    assert trainer.checkpointer.steps() == [1, 5]
