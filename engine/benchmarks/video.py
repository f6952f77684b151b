"""Video frames for image-only models, the way MEGA-Bench's official models feed videos (TIGER-AI-Lab/MEGA-Bench,
commit ee324ab, megabench/models/base_model.py: `BaseModel._set_sampling_config` and `BaseModel.process_video`;
re-implemented, not copied).

Official rule, per query:
  * frame budget: a demonstration video gets ceil(total_demo_video_frames / number of demonstration videos) frames;
    a query (or task-global) video gets (max_num_image - demonstration images shown - query images - demonstration
    frames) // number of query videos; a budget <= 0 is an error ("raise the number of maximum images").
  * sampling (the default "fps" strategy): frames are read in order and every gap-th one is kept, starting with
    frame 0, where gap = ceil(frame_count / n) for a demonstration video and max(ceil(fps), ceil(frame_count / n))
    for a query video (at most one frame per second); frame_count is the container's CAP_PROP_FRAME_COUNT. So a
    video yields ceil(frames read / gap) <= n frames, evenly spaced.
  * the frames (JPEG files) are sent as images between the texts "<video frames start>" and "<video frames end>",
    where the video's placeholder was (models/openai.py: `OpenAI.create_media_content`, prompt.json).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from PIL import Image

VIDEO_START, VIDEO_END = "<video frames start>", "<video frames end>"  # the official models/prompt.json texts


def frame_budget(max_images: int, demo_video_frames: int, query_images: int, query_videos: int, demo_images: int,
                 demo_videos: int) -> tuple[int, int]:
    """(frames per demonstration video, frames per query video) under the official image budget; `demo_images`
    counts the demonstration images actually shown, `query_*` include the task-global media."""
    demo = math.ceil(demo_video_frames / demo_videos) if demo_videos else 0
    if not query_videos:
        return demo, 0
    left = max_images - demo_images - query_images - demo * demo_videos
    if left <= 0:
        raise ValueError(f"no frames left for the query videos: {max_images} images allowed, {demo_images} "
                         f"demonstration images, {query_images} query images and {demo_videos} demonstration videos "
                         f"of {demo} frames; raise max_images")
    return demo, left // query_videos


def sampling_gap(frame_count: int, fps: float, num_frames: int, is_demo: bool) -> int:
    """Keep every gap-th frame: the official "fps" rule (at most ~1 frame a second for query videos)."""
    by_count = math.ceil(frame_count / num_frames) if num_frames else 1
    gap = by_count if is_demo else max(math.ceil(fps), by_count)
    return max(gap, 1)  # an unknown frame count (0) would make the official gap 0


def sample_frames(path: str | Path, num_frames: int, is_demo: bool = False) -> list[Image.Image]:
    """At most `num_frames` RGB frames of the video at `path`, evenly spaced by the official rule (frame 0, gap,
    2 gap, ...; see `sampling_gap`)."""
    import cv2  # opencv-python-headless; only MEGA-Bench's video tasks need it

    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise ValueError(f"cannot open video {path}")
        gap = sampling_gap(int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), cap.get(cv2.CAP_PROP_FPS) or 0.0, num_frames,
                           is_demo)
        frames, index = [], 0
        while True:
            keep = index % gap == 0
            ok = cap.grab()
            if not ok:
                break
            if keep:
                ok, bgr = cap.retrieve()
                if not ok:
                    raise ValueError(f"cannot decode frame {index} of video {path}")
                frames.append(Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
            index += 1
    finally:
        cap.release()
    if not frames:
        raise ValueError(f"no frames could be read from video {path}")
    return frames


def cached_frames(path: Path, num_frames: int, is_demo: bool, cache_dir: Path) -> list[Path]:
    """`sample_frames` written once as JPEG files under `cache_dir` (one folder per video, frame count and kind) and
    reused by later loads; a list file written last (atomically) marks a complete set."""
    folder = cache_dir / f"{'demo' if is_demo else 'query'}-{num_frames}"
    listing = folder / "frames.txt"
    stamp = f"{path.stat().st_size} {path.stat().st_mtime_ns}"
    if listing.is_file():
        stored, *names = listing.read_text().splitlines()
        files = [folder / name for name in names]
        if stored == stamp and all(f.is_file() for f in files):
            return files
    try:
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for k, frame in enumerate(sample_frames(path, num_frames, is_demo)):
            out = folder / f"{k:04d}.jpg"
            tmp = folder / f"{k:04d}.{os.getpid()}.tmp"
            frame.save(tmp, format="JPEG", quality=95)  # cv2.imwrite's default JPEG quality, as the official code
            tmp.replace(out)  # atomic: a concurrent loader never sees half a file
            files.append(out)
        tmp = folder / f"frames.{os.getpid()}.tmp"
        tmp.write_text("\n".join([stamp, *(f.name for f in files)]) + "\n")
        tmp.replace(listing)
    except OSError as e:
        raise RuntimeError(f"cannot write the frames of {path} to {folder} ({e})") from e
    return files
