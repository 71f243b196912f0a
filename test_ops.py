"""Tests for ops.py / ops_mlu.cpp on the CPU: parity with torchvision.ops (the independent reference), hand-computed
values, a pure-python reference for the legacy offset=1 NMS, float64 gradcheck, edge cases and the fallback routes.

Tie rule under test: equal scores keep the lower original index first. torchvision's CPU NMS sorts with an
unstable sort, so where scores tie we compare kept *sets* with torchvision and check our order separately.
ROIAlign tolerances: our kernels reproduce torchvision's arithmetic term for term, so float32 agrees to the bit in
practice; the asserts allow 1e-5 absolute (float32) / 1e-12 (float64) so a harmless reordering would not fail.
"""
import os
import subprocess
import sys

import pytest
import torch
import torchvision

import ops

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def native_backend(monkeypatch):
    """Every test starts from the default routing (FRCNN_OPS unset) and leaves no choice cached behind."""
    monkeypatch.delenv("FRCNN_OPS", raising=False)
    ops.reset_backends()
    yield
    ops.reset_backends()


def test_native_kernels_are_used_on_cpu():
    assert ops.load_extension(), ops.extension_info()["error"]
    assert ops.backend_name("cpu") == "native"


# ---------------------------------------------------------------------------------------------------- NMS
def random_boxes(n, gen, dtype=torch.float32, size=100.0, extent=400.0):
    xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * extent
    wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * size
    return torch.cat([xy, xy + wh], dim=1).to(dtype)


def unique_scores(n, gen, dtype=torch.float32):
    return (torch.randperm(n, generator=gen).to(dtype) + 1) / (n + 1)  # no ties


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_nms_matches_torchvision_random(dtype, thr):
    gen = torch.Generator().manual_seed(int(thr * 10))
    for n in (2, 10, 300, 2000):
        boxes, scores = random_boxes(n, gen, dtype), unique_scores(n, gen, dtype)
        keep = ops.nms(boxes, scores, thr)
        assert keep.dtype == torch.int64
        assert torch.equal(keep, torchvision.ops.nms(boxes, scores, thr)), (n, thr)


def test_nms_20k_boxes_matches_torchvision():
    gen = torch.Generator().manual_seed(1)
    boxes, scores = random_boxes(20000, gen, extent=1200.0), unique_scores(20000, gen)
    keep = ops.nms(boxes, scores, 0.7)
    assert 1000 < len(keep) < 20000  # both suppression and survival happen, so the comparison means something
    assert torch.equal(keep, torchvision.ops.nms(boxes, scores, 0.7))


def test_nms_zero_and_one_box():
    empty = torch.zeros(0, 4)
    keep = ops.nms(empty, torch.zeros(0), 0.5)
    assert keep.dtype == torch.int64 and keep.shape == (0,)
    assert ops.batched_nms(empty, torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5).shape == (0,)
    assert ops.nms(torch.tensor([[1.0, 2, 3, 4]]), torch.tensor([0.3]), 0.5).tolist() == [0]


def test_nms_hand_computed_iou_exactly_at_threshold():
    # A = [0,0,10,10] (area 100), B = [0,0,10,5] (area 50) lies inside A: IoU = 50 / (100 + 50 - 50) = 0.5 exactly
    # (every step is exact in float32). Suppression needs IoU > threshold, so at 0.5 B survives, below it B goes.
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 5]])
    scores = torch.tensor([0.9, 0.8])
    assert ops.nms(boxes, scores, 0.5).tolist() == [0, 1] == torchvision.ops.nms(boxes, scores, 0.5).tolist()
    assert ops.nms(boxes, scores, 0.4999).tolist() == [0] == torchvision.ops.nms(boxes, scores, 0.4999).tolist()
    # Output order is by score, not by index: with B scoring higher it comes first.
    assert ops.nms(boxes, torch.tensor([0.1, 0.2]), 0.6).tolist() == [1, 0]


def test_nms_ties_keep_lower_index_first():
    # Four identical boxes, identical scores: the lowest index is kept and suppresses the rest.
    boxes = torch.tensor([[0.0, 0, 10, 10]] * 4)
    assert ops.nms(boxes, torch.full((4,), 0.5), 0.5).tolist() == [0]
    # Disjoint boxes with equal scores come out in index order, behind a higher-scoring one.
    boxes = torch.tensor([[0.0, 0, 1, 1], [5, 5, 6, 6], [10, 10, 11, 11], [20, 20, 21, 21]])
    assert ops.nms(boxes, torch.tensor([0.5, 0.5, 0.9, 0.5]), 0.5).tolist() == [2, 0, 1, 3]


def test_nms_adversarial_matches_torchvision_as_sets():
    gen = torch.Generator().manual_seed(2)
    base = random_boxes(200, gen)
    boxes = torch.cat([
        base, base[:50],                                      # exact duplicates
        torch.tensor([[5.0, 5, 5, 5], [7, 7, 7, 20], [3, 3, 30, 3]]),  # zero area (point, zero width, zero height)
        torch.tensor([[20.0, 20, 10, 10], [50, 0, 40, 90]]),  # inverted
    ])
    scores = torch.randint(0, 5, (len(boxes),), generator=gen).float() / 4  # heavy ties, zeros included
    for thr in (0.0, 0.5, 0.9):
        keep, ref = ops.nms(boxes, scores, thr), torchvision.ops.nms(boxes, scores, thr)
        assert sorted(keep.tolist()) == sorted(ref.tolist()), thr
        # our order: score descending, ties by ascending index
        order = sorted(keep.tolist(), key=lambda i: (-scores[i].item(), i))
        assert keep.tolist() == order
        # degenerate boxes have IoU 0 (or 0/0) with everything, so they always survive
        assert set(range(250, 255)) <= set(keep.tolist())


def legacy_nms_reference(boxes, scores, thr):
    """maskrcnn-benchmark's NMS with +1 widths, written independently in plain python (suppress at IoU > thr,
    order by descending score with ties by index; upstream returned kept indices sorted by index instead)."""
    order = sorted(range(len(boxes)), key=lambda i: (-scores[i], i))
    area = lambda b: (b[2] - b[0] + 1) * (b[3] - b[1] + 1)  # noqa: E731
    kept = []
    for i in order:
        a = boxes[i]
        ok = True
        for j in kept:
            b = boxes[j]
            w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
            h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
            inter = w * h
            if inter / (area(a) + area(b) - inter) > thr:
                ok = False
                break
        if ok:
            kept.append(i)
    return kept


def test_nms_offset1_hand_computed():
    # A = [0,0,9,9] is 10x10 pixels under the +1 rule (area 100), B = [0,0,9,4] is 10x5 (area 50), all of B inside
    # A: IoU = 50/100 = 0.5. Without +1: areas 81 and 36, IoU = 36/81 = 0.444.
    boxes, scores = torch.tensor([[0.0, 0, 9, 9], [0, 0, 9, 4]]), torch.tensor([0.9, 0.8])
    assert ops.nms(boxes, scores, 0.47, offset=1).tolist() == [0]
    assert ops.nms(boxes, scores, 0.47, offset=0).tolist() == [0, 1]
    assert ops.nms(boxes, scores, 0.5, offset=1).tolist() == [0, 1]  # exactly at the threshold: kept


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nms_offset1_matches_python_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    # Integer corners keep every area and intersection exact, so only the final division can round; float64.
    boxes = random_boxes(400, gen, torch.float64, size=60.0, extent=200.0).round()
    scores = torch.randint(0, 50, (400,), generator=gen).double()  # ties included
    for thr in (0.3, 0.5, 0.7):
        want = legacy_nms_reference(boxes.tolist(), scores.tolist(), thr)
        assert ops.nms(boxes, scores, thr, offset=1).tolist() == want
        # The torchvision route (x2, y2 shifted by +1) must give the same boxes.
        assert sorted(ops._nms("torchvision", boxes, scores, thr, 1).tolist()) == sorted(want)


def test_batched_nms_matches_torchvision():
    gen = torch.Generator().manual_seed(3)
    for n, classes in ((500, 3), (5000, 80)):  # torchvision: coordinate trick below 4000 values, per-class loop above
        boxes, scores = random_boxes(n, gen), unique_scores(n, gen)
        idxs = torch.randint(0, classes, (n,), generator=gen) * 7 - 3  # sparse, negative category ids are fine
        keep = ops.batched_nms(boxes, scores, idxs, 0.5)
        assert torch.equal(keep, torchvision.ops.batched_nms(boxes, scores, idxs, 0.5))
        assert torch.equal(ops._batched_nms("torchvision", boxes, scores, idxs, 0.5, 0), keep)


def test_batched_nms_categories_do_not_interact():
    boxes = torch.tensor([[0.0, 0, 10, 10]] * 3)
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert ops.batched_nms(boxes, scores, torch.tensor([0, 1, 0]), 0.5).tolist() == [0, 1]
    assert ops.batched_nms(boxes, scores, torch.tensor([4, 4, 4]), 0.5).tolist() == [0]


# ----------------------------------------------------------------------------------------------- ROIAlign
def ramp(h=4, w=4, channels=1, dtype=torch.float32):
    """(1, channels, h, w) with value 4y + x + 16c: bilinear interpolation of a linear map is exact."""
    y, x = torch.meshgrid(torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype), indexing="ij")
    return torch.stack([4 * y + x + 16 * c for c in range(channels)])[None]


@pytest.mark.parametrize("channels_last", [False, True])
def test_roi_align_hand_computed(channels_last):
    f = ramp(channels=2)
    if channels_last:  # the (N,H,W,C) kernel path
        f = f.contiguous(memory_format=torch.channels_last)

    def one(roi, size, ratio, aligned=False, c=0):
        return ops.roi_align(f, torch.tensor([roi]), size, 1.0, ratio, aligned)[0, c]

    # RoI [0.5, 2.5]^2, 2x2 bins of side 1, one sample each at the bin centres x, y in {1, 2}: f = 4y + x.
    assert one([0, 0.5, 0.5, 2.5, 2.5], 2, 1).tolist() == [[5.0, 6.0], [9.0, 10.0]]
    assert one([0, 0.5, 0.5, 2.5, 2.5], 2, 1, c=1).tolist() == [[21.0, 22.0], [25.0, 26.0]]
    # Legacy quirk (aligned=False): a zero-size RoI is widened to 1 pixel, sample at (1.5, 1.5): 4*1.5 + 1.5.
    assert one([0, 1, 1, 1, 1], 1, 1).item() == 7.5
    # aligned=True shifts by -0.5 and keeps size 0: the fixed sample sits at (0.5, 0.5): 2.5; adaptive sampling
    # gives ceil(0) = 0 samples and the output is 0.
    assert one([0, 1, 1, 1, 1], 1, 1, aligned=True).item() == 2.5
    assert one([0, 1, 1, 1, 1], 1, -1, aligned=True).item() == 0.0
    # Sample at (3.5, 3.5), between the last row/column and the border: clamped to pixel (3, 3) = 15.
    assert one([0, 3, 3, 4, 4], 1, 1).item() == 15.0
    # x from -3 to 1 (width 4), y from 0 to 1, a 2x2 grid: x samples at -2 (< -1: contributes 0, still counted)
    # and 0; y samples at 0.25 and 0.75 give f = 1 and 3 at x = 0. Mean over 4 samples: (0 + 0 + 1 + 3) / 4.
    assert one([0, -3, 0, 1, 1], 1, 2).item() == 1.0
    # Wholly outside the map: every sample is beyond x > W, output 0.
    assert one([0, 10, 10, 20, 20], 2, -1).tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_roi_align_backward_hand_computed():
    f = ramp().requires_grad_(True)
    # Two RoIs. The first puts each of its 2x2 samples on a pixel centre (1,1), (1,2), (2,1), (2,2): weight 1
    # each. The second's one sample is clamped to (3, 3). Output gradients 1, 2, 3, 4 and 5.
    rois = torch.tensor([[0, 0.5, 0.5, 2.5, 2.5], [0, 3, 3, 4, 4]])
    out = torch.cat([ops.roi_align(f, rois[:1], 2, 1.0, 1).flatten(), ops.roi_align(f, rois[1:], 1, 1.0, 1).flatten()])
    out.backward(torch.tensor([1.0, 2, 3, 4, 5]))
    want = torch.zeros(4, 4)
    want[1, 1], want[1, 2], want[2, 1], want[2, 2], want[3, 3] = 1, 2, 3, 4, 5
    assert torch.equal(f.grad[0, 0], want)


def random_rois(k, images, h, w, gen, dtype=torch.float32, scale=1.0):
    """Image-coordinate RoIs for a (h, w) map at `scale`: inside, partly and wholly outside, tiny, huge, inverted."""
    H, W = h / scale, w / scale
    xy = torch.rand(k, 2, generator=gen, dtype=torch.float64) * torch.tensor([W, H]) * 1.4 - 0.2 * torch.tensor([W, H])
    wh = torch.rand(k, 2, generator=gen, dtype=torch.float64) * torch.tensor([W, H]) * 0.6
    wh[: k // 8] *= 1e-3                          # tiny
    wh[k // 8: k // 4] *= 4                        # huge (larger than the map)
    wh[k // 4: k // 4 + k // 16] *= -0.2           # inverted
    idx = torch.randint(0, images, (k, 1), generator=gen).double()
    return torch.cat([idx, xy, xy + wh], dim=1).to(dtype)


CASES = [  # (images, channels, h, w, k, output size, spatial scale, sampling ratio, aligned)
    (1, 3, 10, 13, 40, 7, 1.0, -1, False),
    (2, 4, 12, 9, 60, (3, 5), 0.5, 2, False),
    (3, 2, 25, 38, 80, 7, 1 / 32, 2, True),
    (2, 5, 16, 16, 50, 2, 0.25, -1, True),
    (2, 16, 20, 30, 400, 7, 0.125, 0, False),  # many RoIs on a small map: the (N,H,W,C) path
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_roi_align_matches_torchvision(case, dtype):
    images, channels, h, w, k, size, scale, ratio, aligned = case
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(images, channels, h, w, generator=gen, dtype=dtype)
    rois = random_rois(k, images, h, w, gen, dtype, scale)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):  # both kernel paths
        a, b = inp.clone().requires_grad_(True), inp.clone().requires_grad_(True)
        out = ops.roi_align(a, rois, size, scale, ratio, aligned)
        ref = torchvision.ops.roi_align(b, rois, size, scale, ratio, aligned)
        assert out.abs().sum() > 0 and (out == 0).any()  # RoIs inside and outside the map both occur
        torch.testing.assert_close(out, ref, **tol)
        grad = torch.randn(out.shape, generator=gen, dtype=dtype)
        out.backward(grad)
        ref.backward(grad)
        torch.testing.assert_close(a.grad, b.grad, **tol)


def test_roi_align_list_of_boxes_empty_and_half():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    boxes = [torch.tensor([[0.0, 0, 4, 4]]), torch.tensor([[1.0, 1, 6, 7], [2, 2, 3, 3]])]
    torch.testing.assert_close(ops.roi_align(x, boxes, 2), torchvision.ops.roi_align(x, boxes, 2))
    empty = ops.roi_align(x.requires_grad_(True), torch.zeros(0, 5), (7, 7))
    assert empty.shape == (0, 3, 7, 7)
    empty.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    out = ops.roi_align(x.detach().half(), boxes, 2)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ops.roi_align(x.detach(), boxes, 2), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("ratio", [-1, 2])
def test_roi_align_gradcheck(aligned, ratio):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 2, 6, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    # Off-grid corners keep samples away from pixel boundaries, where bilinear sampling has kinks.
    rois = torch.tensor([[0, 0.3, 0.7, 4.6, 5.2], [1, -1.3, 2.1, 3.3, 7.9], [1, 2.2, 1.1, 2.9, 1.6]],
                        dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: ops.roi_align(t, rois, (3, 2), 1.0, ratio, aligned), (x,))


# ------------------------------------------------------------------------------------------- fallbacks
def test_forced_torchvision_fallback(monkeypatch):
    monkeypatch.setenv("FRCNN_OPS", "torchvision")
    ops.reset_backends()
    assert ops.backend_name("cpu") == "torchvision"
    gen = torch.Generator().manual_seed(7)
    boxes, scores = random_boxes(300, gen), unique_scores(300, gen)
    assert torch.equal(ops.nms(boxes, scores, 0.5), torchvision.ops.nms(boxes, scores, 0.5))
    x = torch.randn(1, 2, 8, 8, generator=gen, requires_grad=True)
    out = ops.roi_align(x, torch.tensor([[0, 1.0, 1, 6, 6]]), 3, 1.0, 2)
    assert out.grad_fn is not None and "_RoIAlign" not in type(out.grad_fn).__name__  # torchvision's autograd
    out.sum().backward()
    assert x.grad.abs().sum() > 0


def test_cpu_roundtrip_route_matches_native():
    gen = torch.Generator().manual_seed(8)
    boxes, scores = random_boxes(200, gen), unique_scores(200, gen)
    idxs = torch.randint(0, 4, (200,), generator=gen)
    assert torch.equal(ops._nms("cpu-roundtrip", boxes, scores, 0.5, 1), ops.nms(boxes, scores, 0.5, 1))
    assert torch.equal(ops._batched_nms("cpu-roundtrip", boxes, scores, idxs, 0.5, 0),
                       ops.batched_nms(boxes, scores, idxs, 0.5))
    x = torch.randn(1, 2, 8, 8, generator=gen, requires_grad=True)
    rois = torch.tensor([[0, 1.0, 1, 6, 6]])
    out = ops._roi_align("cpu-roundtrip", x, rois, 3, 1.0, 2, False)
    assert torch.equal(out, ops.roi_align(x, rois, 3, 1.0, 2))
    out.sum().backward()
    assert x.grad.abs().sum() > 0


def test_mlu_routing_without_our_kernels(monkeypatch):
    # No MLU kernels are built here; the route then depends on torch_mlu registering torchvision's kernels.
    assert not ops.extension_info()["mlu"]
    monkeypatch.setattr(ops, "_tv_has_kernel", lambda op, key: True)
    assert ops._choose_backend("mlu")[0] == "torchvision"
    monkeypatch.setattr(ops, "_tv_has_kernel", lambda op, key: False)
    with pytest.warns(UserWarning, match="CPU round trip"):
        assert ops._choose_backend("mlu")[0] == "cpu-roundtrip"
    assert ops._choose_backend("cuda")[0] == "torchvision"
    monkeypatch.setenv("FRCNN_OPS", "native")
    with pytest.raises(RuntimeError, match="MLU kernels"):
        ops._choose_backend("mlu")
    monkeypatch.setenv("FRCNN_OPS", "bogus")
    with pytest.raises(ValueError, match="auto, native, torchvision, cpu"):
        ops._choose_backend("cpu")


def test_build_failure_falls_back_to_torchvision(tmp_path):
    # A fresh process with an empty build cache and no working compiler: it must say so in one line, use
    # torchvision's kernels and still give the right answer.
    code = ("import torch, torchvision, ops\n"
            "b = torch.tensor([[0., 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]]); s = torch.tensor([.9, .8, .7])\n"
            "assert ops.nms(b, s, 0.5).tolist() == [0, 2]\n"
            "print('BACKEND', ops.backend_name('cpu'))\n")
    env = dict(os.environ, FRCNN_OPS_BUILD_DIR=str(tmp_path), CXX=str(tmp_path / "no-such-compiler"))
    env.pop("FRCNN_OPS", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "BACKEND torchvision" in proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("ops: ")]
    assert len(lines) == 1 and "did not build" in lines[0], proc.stderr
