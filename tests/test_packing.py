"""kernels/packing.py: the C++ (and, with a GPU, CUDA) twins against the Python reference on seeded random cases,
M-RoPE positions against transformers' get_rope_index per sample, argument errors, the build, and the fallback."""

import logging
import random
import shutil

import pytest
import torch

from kernels import packing
from kernels.packing import (
    mrope_positions,
    mrope_positions_ref,
    pack,
    pack_ref,
    plan_bins,
    plan_bins_ref,
    repack,
    repack_ref,
    unpack,
    unpack_ref,
)

from ._launch import launch

IMAGE, VIDEO, VSTART, VEND = 60, 61, 62, 63  # token ids of the tiny Qwen2.5-VL config
MERGE = 2


def _need_native():
    if not packing.native_available("cpu"):
        pytest.skip("kernels._packing is not built (no C++ compiler?); the reference is all there is to test")


# ------------------------------------------------------------------------------------------------- build, fallback
def test_extension_importable():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on PATH, so setup.py skips kernels._packing")
    import kernels._packing  # noqa: F401  (fails with the build hint below if `pip install -e .` was not run)


def test_fallback_logs_once(monkeypatch, caplog):
    def missing(name):
        raise ImportError(f"No module named {name!r} (simulated)")

    monkeypatch.setattr(packing, "_modules", {})
    monkeypatch.setattr(packing.importlib, "import_module", missing)
    with caplog.at_level(logging.WARNING, logger="kernels"):
        assert plan_bins([3, 2, 5], 5) == plan_bins_ref([3, 2, 5], 5)
        cu = torch.tensor([0, 2, 5], dtype=torch.int32)
        assert torch.equal(unpack(torch.arange(5.0), cu), unpack_ref(torch.arange(5.0), cu))
        mrope_positions(torch.zeros(5, dtype=torch.int64), cu, None)
    warnings = [r for r in caplog.records if "kernels._packing" in r.getMessage()]
    assert len(warnings) == 1 and "pip install -e ." in warnings[0].getMessage()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: CUDA sources cannot be compile-checked")
@pytest.mark.subprocess
def test_nvcc_compiles_pack_cu(tmp_path):
    cmd = ["nvcc", "-std=c++17", "-O1", "-arch=sm_90", "-Xcompiler", "-fPIC", "-Icsrc/packing", "-c",
           "csrc/packing/pack.cu", "-o", str(tmp_path / "pack.o")]
    launch(cmd, timeout_s=120)


# ------------------------------------------------------------------------------------------------------ plan_bins
def test_plan_bins_random_cases_match_reference():
    _need_native()
    rng = random.Random(0)
    for _ in range(300):
        max_tokens = rng.choice([1, 7, 64, 1000])
        lengths = [rng.randint(1, max_tokens) for _ in range(rng.randint(0, 40))]
        num_ranks = rng.randint(1, 8)
        plan = plan_bins(lengths, max_tokens, num_ranks)
        assert plan == plan_bins_ref(lengths, max_tokens, num_ranks)
        bins = [b for rank in plan for b in rank]
        assert len(plan) == num_ranks and len({len(rank) for rank in plan}) == 1
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= max_tokens for b in bins)
        if any(len(b) == 0 for b in bins):  # empty bins only when every other bin holds a single sample
            assert all(len(b) <= 1 for b in bins)


def test_plan_bins_examples():
    assert plan_bins_ref([5, 3, 8, 1, 2], 8, 2) == [[[2], [1]], [[0], [4, 3]]]
    assert plan_bins_ref([4, 4, 4], 4, 4) == [[[0]], [[1]], [[2]], [[]]]
    assert plan_bins_ref([], 4, 2) == [[], []]
    assert plan_bins([9, 2], 4, truncate=True) == [[[0], [1]]]


@pytest.mark.parametrize("fn", [plan_bins, plan_bins_ref])
def test_plan_bins_errors(fn):
    with pytest.raises(ValueError, match=r"lengths\[1\] = 9 exceeds max_tokens=8"):
        fn([3, 9], 8)
    with pytest.raises(ValueError, match=r"lengths\[0\] = 0"):
        fn([0, 1], 8)
    with pytest.raises(ValueError, match="max_tokens"):
        fn([1], 0)
    with pytest.raises(ValueError, match="num_ranks"):
        fn([1], 4, num_ranks=0)


# ----------------------------------------------------------------------------------------------------------- pack
def _random_samples(rng: random.Random, device="cpu") -> list[dict]:
    keys = rng.sample(["labels", "loss_mask", "mm_token_type_ids"], rng.randint(0, 3))
    samples = []
    for _ in range(rng.randint(1, 8)):
        n = rng.choice([1, 2, rng.randint(1, 60)])
        s = {"input_ids": torch.randint(0, 1000, (n,))}
        if "labels" in keys:
            s["labels"] = torch.randint(-100, 1000, (n,))
        if "loss_mask" in keys:
            s["loss_mask"] = torch.rand(n) > 0.5
        if "mm_token_type_ids" in keys:
            s["mm_token_type_ids"] = torch.randint(0, 2, (n,), dtype=torch.int32)
        if rng.random() < 0.5:
            grid = torch.tensor([[1, 2 * rng.randint(1, 3), 2 * rng.randint(1, 3)] for _ in range(rng.randint(1, 3))])
            s["image_grid_thw"], s["pixel_values"] = grid, torch.randn(int(grid.prod(-1).sum()), 6)
        samples.append({k: v.to(device) for k, v in s.items()})
    return samples


def _assert_packed_equal(a: packing.PackedBatch, b: packing.PackedBatch):
    assert a.max_seqlen == b.max_seqlen
    for f in ("input_ids", "cu_seqlens", "sample_index", "labels", "loss_mask", "mm_token_type_ids", "pixel_values",
              "image_grid_thw"):
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f
        if x is not None:
            assert x.dtype == y.dtype and x.device == y.device and torch.equal(x, y), f


def test_pack_random_cases_match_reference():
    _need_native()
    rng = random.Random(1)
    for _ in range(200):
        samples = _random_samples(rng)
        out = pack(samples)
        _assert_packed_equal(out, pack_ref(samples))
        assert out.cu_seqlens.dtype == torch.int32 and out.sample_index.dtype == torch.int32


@pytest.mark.parametrize("fn", [pack, pack_ref])
def test_pack_errors(fn):
    ok = {"input_ids": torch.ones(3, dtype=torch.int64), "labels": torch.ones(3, dtype=torch.int64)}
    with pytest.raises(ValueError, match="non-empty sequence"):
        fn([])
    with pytest.raises(ValueError, match=r"samples\[1\]\['input_ids'\] must be 1-D and non-empty"):
        fn([ok, {"input_ids": torch.ones(0, dtype=torch.int64), "labels": torch.ones(0, dtype=torch.int64)}])
    with pytest.raises(ValueError, match=r"samples\[1\]\['labels'\] must be \[2\]"):
        fn([ok, {"input_ids": torch.ones(2, dtype=torch.int64), "labels": torch.ones(3, dtype=torch.int64)}])
    with pytest.raises(ValueError, match=r"samples\[1\]: key 'labels'"):
        fn([ok, {"input_ids": torch.ones(2, dtype=torch.int64)}])
    with pytest.raises(ValueError, match=r"samples\[0\]: pixel_values has 5 patches"):
        fn([{**ok, "pixel_values": torch.zeros(5, 4), "image_grid_thw": torch.tensor([[1, 2, 2]])}])


# ------------------------------------------------------------------------------------------------ mrope_positions
def _qwen_sample(rng: random.Random) -> tuple[list[int], list[list[int]]]:
    """input_ids as the Qwen processor lays them out (vision_start, image pads, vision_end), plus the grids. Some
    samples start or end with an image run directly, to cover runs at the sample edges."""
    ids, grids = [], []
    num_images = rng.choice([0, 1, 1, 2, 3])
    start_with_image, end_with_image = rng.random() < 0.2, rng.random() < 0.2
    if not start_with_image or num_images == 0:
        ids += [rng.randint(0, 59) for _ in range(rng.randint(1, 12))]
    for k in range(num_images):
        t = rng.choice([1, 1, 1, 2])
        h, w = MERGE * rng.randint(1, 4), MERGE * rng.randint(1, 4)
        grids.append([t, h, w])
        if not (k == 0 and start_with_image):
            ids.append(VSTART)
        ids += [IMAGE] * (t * h * w // MERGE**2)
        if not (k == num_images - 1 and end_with_image):
            ids += [VEND] + [rng.randint(0, 59) for _ in range(rng.randint(0, 6))]
        elif rng.random() < 0.5:
            ids.append(VEND)
    return ids, grids


def _packed_row(rng: random.Random, num_samples: int):
    samples = [_qwen_sample(rng) for _ in range(num_samples)]
    ids = torch.tensor([i for s, _ in samples for i in s])
    cu = torch.tensor([0] + [len(s) for s, _ in samples], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    grid = torch.tensor([g for _, gs in samples for g in gs], dtype=torch.int64).reshape(-1, 3)
    return samples, (ids == IMAGE).long(), cu, grid


@pytest.fixture(scope="module")
def tiny_qwen():
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=64, bos_token_id=0, eos_token_id=1,
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
                  spatial_merge_size=MERGE, tokens_per_second=2)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                           vision_start_token_id=VSTART, vision_end_token_id=VEND)
    return Qwen2_5_VLModel(cfg).eval()


@pytest.mark.parametrize("fn", [mrope_positions, mrope_positions_ref])
def test_mrope_matches_get_rope_index_per_sample(fn, tiny_qwen):
    if fn is mrope_positions:
        _need_native()
    rng = random.Random(2)
    for _ in range(12):
        samples, types, cu, grid = _packed_row(rng, rng.randint(1, 6))
        pos, deltas = fn(types, cu, grid, MERGE)
        assert pos.shape == (4, types.numel()) and pos.dtype == deltas.dtype == torch.int64
        for b, (ids, grids) in enumerate(samples):
            start, end = int(cu[b]), int(cu[b + 1])
            ref_pos, ref_delta = tiny_qwen.get_rope_index(
                torch.tensor([ids]), (torch.tensor([ids]) == IMAGE).int(),
                image_grid_thw=torch.tensor(grids).reshape(-1, 3) if grids else None)
            assert torch.equal(pos[1:, start:end], ref_pos[:, 0]), f"sample {b}: {ids} {grids}"
            assert int(deltas[b]) == int(ref_delta), f"sample {b}"
            assert torch.equal(pos[0, start:end], torch.arange(end - start))


def test_mrope_random_cases_match_reference():
    _need_native()
    rng = random.Random(3)
    for _ in range(300):
        _, types, cu, grid = _packed_row(rng, rng.randint(1, 8))
        for got, want in zip(mrope_positions(types, cu, grid), mrope_positions_ref(types, cu, grid), strict=True):
            assert torch.equal(got, want)


@pytest.mark.parametrize("fn", [mrope_positions, mrope_positions_ref])
def test_mrope_errors(fn):
    types = torch.tensor([0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0])
    cu, grid = torch.tensor([0, 6, 12], dtype=torch.int32), torch.tensor([[1, 4, 4], [1, 4, 4]])
    fn(types, cu, grid)  # valid
    with pytest.raises(ValueError, match="sample 1: an image-token run's length"):
        fn(types, cu, torch.tensor([[1, 4, 4], [1, 4, 6]]))
    with pytest.raises(ValueError, match="sample 1 has length 0"):
        fn(types, torch.tensor([0, 6, 6, 12], dtype=torch.int32), grid)
    with pytest.raises(ValueError, match="sample 1: more image-token runs"):
        fn(types, cu, grid[:1])
    with pytest.raises(ValueError, match=r"image_grid_thw has more rows than the image-token runs of the 2 samples"):
        fn(types, cu, torch.cat([grid, grid[:1]]))
    with pytest.raises(ValueError, match="sample 0: mm_token_type_ids must be 0"):
        fn(torch.tensor([0, 2, 0]), torch.tensor([0, 3], dtype=torch.int32), None)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0 and end at T=12"):
        fn(types, torch.tensor([0, 6, 11], dtype=torch.int32), grid)
    with pytest.raises(ValueError, match="mm_token_type_ids must be a 1-D"):
        fn(types[None], cu, grid)
    with pytest.raises(ValueError, match="spatial_merge_size"):
        fn(types, cu, grid, 0)


# -------------------------------------------------------------------------------------------------- unpack/repack
DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.float16, torch.int32]


def _random_values(rng: random.Random, dtype, device="cpu"):
    lengths = [rng.choice([0, 1, rng.randint(1, 40)]) for _ in range(rng.randint(1, 9))]
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32 if rng.random() < 0.7 else torch.int64)
    values = (torch.randn(int(cu[-1])) * 50).to(dtype)
    return values.to(device), cu.to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unpack_repack_random_cases_match_reference(dtype):
    _need_native()
    rng = random.Random(4)
    for _ in range(100):
        values, cu = _random_values(rng, dtype)
        pad = rng.choice([0, 1, -100]) if dtype != torch.bool else rng.choice([False, True])
        max_len = None if rng.random() < 0.7 else int(cu.diff().max()) + rng.randint(0, 3)
        padded = unpack(values, cu, pad, max_len)
        assert torch.equal(padded, unpack_ref(values, cu, pad, max_len))
        assert torch.equal(repack(padded, cu), values) and torch.equal(repack_ref(padded, cu), values)


def test_unpack_repack_gradients_match_reference():
    _need_native()
    rng = random.Random(5)
    for _ in range(20):
        values, cu = _random_values(rng, torch.float32)
        w = torch.randn(cu.numel() - 1, int(cu.diff().max()))
        grads = []
        for fn in (unpack, unpack_ref):
            v = values.clone().requires_grad_()
            (fn(v, cu, -1.0) * w).sum().backward()
            grads.append(v.grad)
        assert torch.equal(grads[0], grads[1])
        p = w.clone().requires_grad_()
        (repack(p, cu) * values).sum().backward()
        assert torch.equal(p.grad, unpack_ref(values, cu, 0.0))


@pytest.mark.parametrize("pair", [(unpack, repack), (unpack_ref, repack_ref)], ids=["native", "ref"])
def test_unpack_repack_errors(pair):
    do_unpack, do_repack = pair
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="values must be 1-D"):
        do_unpack(torch.zeros(5, 1), cu)
    with pytest.raises(ValueError, match="max_len=2 is shorter"):
        do_unpack(torch.zeros(5), cu, max_len=2)
    with pytest.raises(ValueError, match="end at T=4"):
        do_unpack(torch.zeros(4), cu)
    with pytest.raises(ValueError, match="cu_seqlens must be int32 or int64"):
        do_unpack(torch.zeros(5), cu.float())
    with pytest.raises(ValueError, match="padded must be"):
        do_repack(torch.zeros(3, 3), cu)
    with pytest.raises(ValueError, match="fewer than the longest"):
        do_repack(torch.zeros(2, 2), cu)


# ------------------------------------------------------------------------------------------------------------ GPU
@pytest.mark.requires_cuda
def test_cuda_twins_match_reference():
    if not packing.native_available("cuda"):
        pytest.fail("kernels._packing_cuda is not built: run `pip install -e . --no-build-isolation` with nvcc")
    rng = random.Random(6)
    for _ in range(50):
        samples = _random_samples(rng, "cuda")
        _assert_packed_equal(pack(samples), pack_ref(samples))
    for _ in range(100):
        _, types, cu, grid = _packed_row(rng, rng.randint(1, 8))
        got = mrope_positions(types.cuda(), cu.cuda(), grid.cuda())
        for g, w in zip(got, mrope_positions_ref(types, cu, grid), strict=True):
            assert g.is_cuda and torch.equal(g.cpu(), w)
    long_types = torch.tensor(([0] * 200 + [1] * 64 + [0] * 5) * 3)  # image runs cross 256-token tiles
    long_cu = torch.tensor([0, 269, 538, 807], dtype=torch.int32)
    long_grid = torch.tensor([[1, 16, 16]] * 3)
    for g, w in zip(mrope_positions(long_types.cuda(), long_cu.cuda(), long_grid.cuda()),
                    mrope_positions_ref(long_types, long_cu, long_grid), strict=True):
        assert torch.equal(g.cpu(), w)
    types = torch.tensor([0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0], device="cuda")
    with pytest.raises(ValueError, match="sample 1: an image-token run's length"):
        mrope_positions(types, torch.tensor([0, 6, 12], dtype=torch.int32, device="cuda"),
                        torch.tensor([[1, 4, 4], [1, 4, 6]], device="cuda"))
    for dtype in DTYPES:
        for _ in range(20):
            values, cu = _random_values(rng, dtype, "cuda")
            padded = unpack(values, cu, 1)
            assert torch.equal(padded.cpu(), unpack_ref(values.cpu(), cu.cpu(), 1))
            assert torch.equal(repack(padded, cu), values)
