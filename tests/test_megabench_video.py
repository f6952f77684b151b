"""MEGA-Bench videos fed as frames (engine/benchmarks/video.py, megabench.load(max_images=...)).

The expected frames follow the official rule (TIGER-AI-Lab/MEGA-Bench ee324ab, megabench/models/base_model.py:
`_set_sampling_config`, `process_video` with the default "fps" sampling) worked out by hand for small synthetic
videos: 30 frames at 10 fps, each a distinct solid colour.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from engine.benchmarks import megabench as mb
from engine.benchmarks import video

cv2 = pytest.importorskip("cv2")

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks" / "megabench"
COLOURS = [((i * 8) % 256, (255 - i * 8) % 256, (i * 83) % 256) for i in range(30)]


def _write_video(path: Path, colours=COLOURS, fps: float = 10.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (32, 32))
    assert writer.isOpened()
    for rgb in colours:
        writer.write(np.full((32, 32, 3), rgb[::-1], dtype=np.uint8))  # OpenCV writes BGR
    writer.release()
    return path


def _indices(frames: list[Image.Image]) -> list[int]:
    """Which of COLOURS each frame shows (nearest colour at the centre)."""
    out = []
    for frame in frames:
        assert frame.mode == "RGB"
        pixel = np.array(frame.getpixel((16, 16)), dtype=float)
        out.append(int(np.argmin([np.abs(pixel - c).sum() for c in COLOURS])))
    return out


def test_sampling_gap_official_rule():
    # Query video: at most one frame a second, and at most n frames: gap = max(ceil(fps), ceil(count / n)).
    assert video.sampling_gap(30, 10.0, 8, is_demo=False) == 10
    assert video.sampling_gap(300, 10.0, 8, is_demo=False) == 38
    # Demonstration video: gap = ceil(count / n), whatever the fps.
    assert video.sampling_gap(30, 10.0, 4, is_demo=True) == 8
    assert video.sampling_gap(0, 0.0, 4, is_demo=True) == 1  # unknown frame count: every frame


def test_frame_budget_official_rule():
    # max_num_image 18, total_demo_video_frames 2: 1 demo video gets 2; the query video gets what is left.
    assert video.frame_budget(18, 2, query_images=1, query_videos=1, demo_images=0, demo_videos=1) == (2, 15)
    assert video.frame_budget(18, 3, query_images=0, query_videos=2, demo_images=4, demo_videos=2) == (2, 5)
    assert video.frame_budget(18, 2, query_images=3, query_videos=0, demo_images=0, demo_videos=0) == (0, 0)
    with pytest.raises(ValueError, match="raise max_images"):
        video.frame_budget(4, 2, query_images=2, query_videos=1, demo_images=0, demo_videos=1)


def test_sample_frames_evenly_spaced(tmp_path):
    path = _write_video(tmp_path / "v.mp4")
    assert _indices(video.sample_frames(path, 8)) == [0, 10, 20]  # gap 10 (1 per second)
    assert _indices(video.sample_frames(path, 4, is_demo=True)) == [0, 8, 16, 24]  # gap ceil(30 / 4) = 8
    assert _indices(video.sample_frames(path, 2)) == [0, 15]  # gap ceil(30 / 2) = 15
    assert video.sample_frames(path, 2)[0].size == (32, 32)  # no resizing


def test_unreadable_video_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="missing.mp4"):
        video.sample_frames(tmp_path / "missing.mp4", 4)
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    with pytest.raises(ValueError, match="corrupt.mp4"):
        video.sample_frames(bad, 4)


def _video_release(tmp_path: Path) -> Path:
    """A one-row HF layout: a demonstration video, then a query image and a query video."""
    root = tmp_path / "megabench"
    root.mkdir()
    row = next(json.loads(line) for line in (FIXTURES / "hf" / "core.jsonl").read_text().splitlines()
               if json.loads(line)["task_name"] == "nextqa_mc")
    row.update(example_text="Example:\n<video>\nAnswer: A", example_media=str(["./data/demo.mp4"]),
               query_text="Look: <image> then <video>\nWhat happens?",
               query_media=str(["./data/still.png", "./data/query.mp4"]))
    (root / "core.jsonl").write_text(json.dumps(row) + "\n")
    _write_video(root / "data" / "demo.mp4")
    _write_video(root / "data" / "query.mp4")
    Image.new("RGB", (4, 4), (255, 255, 255)).save(root / "data" / "still.png")
    return root


def test_load_feeds_videos_as_frames(tmp_path):
    root = _video_release(tmp_path)
    (plain,) = mb.load(root)  # default: videos stay <video> markers
    assert plain.problem.count("<video>") == 2 and plain.images == [root / "data" / "still.png"]
    assert "video_frames" not in plain.meta

    (row,) = mb.load(root, max_images=18, demo_video_frames=2)
    # Budget: the demo video gets 2 frames (gap 15: frames 0, 15); the query video 18 - 1 - 2 = 15, so gap
    # max(ceil(10 fps), 2) = 10: frames 0, 10, 20.
    assert row.meta["video_frames"] == [2, 3] and row.meta["videos"] == [str(root / "data" / "demo.mp4"),
                                                                         str(root / "data" / "query.mp4")]
    start, end = video.VIDEO_START, video.VIDEO_END
    assert f"Example:\n{start}<image><image>{end}\nAnswer: A" in row.problem
    assert row.problem.endswith(f"Look: <image> then {start}<image><image><image>{end}\nWhat happens?")
    assert "<video>" not in row.problem and row.problem.count("<image>") == len(row.images) == 6
    assert row.images[2] == root / "data" / "still.png"
    frames = [p for i, p in enumerate(row.images) if i != 2]
    assert all(p.is_relative_to(root / "_frames") for p in frames)
    assert _indices([Image.open(p).convert("RGB") for p in frames]) == [0, 15, 0, 10, 20]

    # A second load reuses the extracted frames (not rewritten).
    stamps = [p.stat().st_mtime_ns for p in frames]
    (again,) = mb.load(root, max_images=18, demo_video_frames=2)
    assert again.images == row.images and [p.stat().st_mtime_ns for p in frames] == stamps


def test_load_corrupt_video_names_it(tmp_path):
    root = _video_release(tmp_path)
    (root / "data" / "query.mp4").write_bytes(b"garbage" * 50)
    with pytest.raises(ValueError, match="query.mp4"):
        mb.load(root, max_images=18)


def test_eval_stage_keeps_framed_video_rows(tmp_path):
    from engine.stages import eval as eval_stage
    from engine.stages.config import BenchmarkConfig

    root = _video_release(tmp_path)
    ctx = SimpleNamespace(resolve_path=lambda p: Path(p))
    cfg = SimpleNamespace(benchmarks=[BenchmarkConfig(name="mb", kind="megabench", path=str(root))])
    ((_, _, rows, left),) = eval_stage.load_benchmarks(cfg, ctx)
    assert [r.id for r in rows] == ["nextqa_mc/0"] and left == 0 and rows[0].meta["video_frames"]
    cfg.benchmarks[0].max_images = 0  # no frames: the video row is left out and counted, as before
    ((_, _, rows, left),) = eval_stage.load_benchmarks(cfg, ctx)
    assert rows == [] and left == 1


def test_read_only_release_uses_cache_dir(tmp_path, monkeypatch):
    root = _video_release(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(os, "access", lambda *a: False)  # every folder read-only
    (row,) = mb.load(root, max_images=18)
    assert all(p.is_relative_to(tmp_path / "cache" / "specs-engine" / "megabench") for p in row.images
               if p.suffix == ".jpg")
    shutil.rmtree(tmp_path / "cache")
