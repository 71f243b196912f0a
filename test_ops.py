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


# ---- NMS
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


# ---- ROIAlign
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


# ---- fallbacks
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


def test_routing_without_mlu_kernels_and_bad_modes(monkeypatch):
    # No MLU kernels and no torchvision kernels for the device: both ops make the CPU round trip, warned once.
    monkeypatch.setattr(ops, "_mlu_backends", lambda: [])
    with pytest.warns(UserWarning, match="CPU round trip"):
        assert ops._choose_backends("mlu")[0] == {"nms": "cpu-roundtrip", "roi_align": "cpu-roundtrip"}
    assert ops._choose_backends("cuda")[0] == {"nms": "torchvision", "roi_align": "torchvision"}
    monkeypatch.setenv("FRCNN_OPS", "native")
    with pytest.raises(RuntimeError, match="MLU kernels"):
        ops._choose_backends("mlu")
    monkeypatch.setenv("FRCNN_OPS", "bogus")
    with pytest.raises(ValueError, match="auto, native, torchvision, cpu"):
        ops._choose_backends("cpu")


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


# ---- the MLU preparation (ops_mlu.py), on CPU
# CNNL's contract is emulated by fake_torch_mlu.cnnl_nms (drop at IoU >= t, drop score <= 0, valid boxes only) and
# checked by fake_torch_mlu._check_roi_contract; torchvision's CPU kernels stand in for CNNL's ROIAlign arithmetic.
import ops_mlu  # noqa: E402
from fake_torch_mlu import _check_roi_contract, cnnl_nms  # noqa: E402

F32_ABOVE = {0.3: 0.30000001192092896, 0.5: 0.5000000596046448, 0.6: 0.6000000238418579, 0.7: 0.7000000476837158}


@pytest.mark.parametrize("t", [0.3, 0.5, 0.6, 0.7, 0.05, 1.0])
def test_cnnl_iou_threshold_turns_ge_into_gt(t):
    # float32(0.3) and float32(0.6) lie above the real value, float32(0.7) below it, 0.5 is exact: by hand, the
    # smallest float32 above t is float32(t) for 0.3 and 0.6 and the next float up for 0.5 and 0.7.
    tp = ops_mlu.cnnl_iou_threshold(t)
    if t in F32_ABOVE:
        assert tp == F32_ABOVE[t]
    f = torch.tensor(t, dtype=torch.float32)
    for direction in (float("inf"), float("-inf")):
        g = f.clone()
        for _ in range(6):  # every float32 IoU within 6 steps of float32(t): IoU >= t' exactly when IoU > t
            assert (g.item() >= tp) == (g.item() > t), (t, g.item(), tp)
            g = torch.nextafter(g, torch.tensor(direction))
    assert ops_mlu.cnnl_iou_threshold(0.0) == torch.finfo(torch.float32).tiny  # no subnormal t'


def test_rank_scores_positive_distinct_in_our_order():
    scores = torch.tensor([0.0, 0.5, -1.0, 0.5, 0.9, 0.0])
    r = ops_mlu.rank_scores(scores)
    assert (r > 0).all() and len(set(r.tolist())) == 6
    # descending score, equal scores by lower index: 4, 1, 3, 0, 5, 2
    assert torch.argsort(r, descending=True).tolist() == [4, 1, 3, 0, 5, 2]


def nms_case(seed, n=300):
    gen = torch.Generator().manual_seed(seed)
    boxes = random_boxes(n, gen, size=60.0, extent=200.0).mul(16).round().div(16)
    boxes[:5, 2] = boxes[:5, 0]  # zero width: degenerate (with offset=1, one pixel wide)
    boxes[5:10, 2] = boxes[5:10, 0] - 2  # inverted: degenerate with either offset
    scores = torch.randint(0, 8, (n,), generator=gen).float() / 8  # ties, an eighth of them exactly 0
    return boxes, scores


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("t", [0.3, 0.5, 0.6, 0.7])
def test_mlu_nms_under_cnnl_rules_equals_cpu_kernel(t, offset):
    boxes, scores = nms_case(int(t * 10) + offset)
    pairs = ops_mlu._near_threshold_pairs(t, offset, first_column=5)  # IoUs at and beside the threshold
    boxes = torch.cat([boxes, pairs])
    scores = torch.cat([scores, torch.tensor([0.9, 0.8]).repeat(len(pairs) // 2)])
    want = ops.nms(boxes, scores, t, offset)
    assert torch.equal(ops_mlu.mlu_nms(boxes, scores, t, offset, kernel=cnnl_nms), want)
    # the inputs exercise every rule: CNNL's kernel alone drops zero scores, refuses degenerate boxes, and with
    # the real threshold (or the old nudge, one float above float32(t)) keeps another set at the threshold
    valid = ops._shift_legacy(boxes, offset)
    live = (valid[:, 2] > valid[:, 0]) & (valid[:, 3] > valid[:, 1])
    assert (scores[want] == 0).any() and not live[want].all()
    with pytest.raises(RuntimeError, match="BAD_PARAM"):
        cnnl_nms(valid, scores, t)
    f = torch.tensor(t, dtype=torch.float32)
    old_nudge = torch.nextafter(f, torch.tensor(1.0)).item()
    for wrong in {f.item(), old_nudge} - {ops_mlu.cnnl_iou_threshold(t)}:  # no nudge is right for 0.3 and 0.6
        got = ops_mlu.mlu_nms(boxes, scores, t, offset, kernel=lambda b, s, _: cnnl_nms(b, s, wrong))
        assert not torch.equal(got, want), wrong


def test_sanitize_rois_keeps_valid_rois_and_torchvision_results():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 8, 20, 24, generator=gen)
    rois = random_rois(64, 2, 20, 24, gen, scale=0.25)
    rois[:, 1:] = rois[:, 1:].clamp(min=0)  # corners >= 0, as the detector's clipped proposals
    rois[:4, 3] = rois[:4, 1]  # zero width
    rois[4:8, 4] = rois[4:8, 2] - 3  # inverted height
    safe = ops_mlu.sanitize_rois(rois)
    _check_roi_contract(safe, 0)
    ok = (rois[:, 3] > rois[:, 1]) & (rois[:, 4] > rois[:, 2])
    assert ok.sum() > 40 and torch.equal(safe[ok], rois[ok])  # valid RoIs: bit for bit unchanged
    for ratio in (2, 0):  # aligned=False: a sub-pixel width counts as one pixel, so the result is unchanged
        assert torch.equal(torchvision.ops.roi_align(x, safe, 7, 0.25, ratio),
                           torchvision.ops.roi_align(x, rois, 7, 0.25, ratio))
    # aligned=True, adaptive: torchvision gives 0 for empty RoIs, and so does the MLU preparation
    tv = lambda x, r, size, s, ratio, al: torchvision.ops.roi_align(x, r, size, s, ratio, al)  # noqa: E731
    torch.testing.assert_close(ops_mlu.mlu_roi_align(x, rois, (7, 7), 0.25, -1, True, kernel=tv),
                               torchvision.ops.roi_align(x, rois, 7, 0.25, -1, True), atol=1e-6, rtol=1e-6)
    # coordinates past 2^14, where 1e-3 is below half a float step, still get x2 > x1
    far = ops_mlu.sanitize_rois(torch.tensor([[0, 40000.0, 3, 40000, 3]]))
    assert far[0, 3] > far[0, 1] and far[0, 4] > far[0, 2]


def test_mlu_roi_align_maps_adaptive_sampling_to_zero():
    seen = []

    def kernel(x, r, size, scale, ratio, aligned):
        _check_roi_contract(r, ratio)  # CNNL documents 0 (adaptive) and no negative value
        seen.append(ratio)
        return torchvision.ops.roi_align(x, r, size, scale, ratio, aligned)

    x = torch.randn(1, 4, 10, 10)
    rois = torch.tensor([[0, 1.0, 1, 30, 20]])
    out = ops_mlu.mlu_roi_align(x, rois, (3, 3), 0.25, -1, False, kernel=kernel)
    assert seen == [0] and torch.equal(out, torchvision.ops.roi_align(x, rois, 3, 0.25, -1))


# ---- the self-test's power, on CPU
def cnnl_route(b, s, t, o):
    return ops_mlu.mlu_nms(b, s, t, o, kernel=cnnl_nms)


def tv_roi(x, r, size, scale, ratio, aligned):
    return torchvision.ops.roi_align(x, r, size, scale, ratio, aligned)


def cpu_nms(*args):  # the self-tests' reference, as ops passes it
    return ops._nms(ops.backend_name("cpu", "nms"), *args)


def cpu_roi_align(*args):
    return ops._roi_align(ops.backend_name("cpu", "roi_align"), *args)


def test_self_test_passes_right_kernels_and_rejects_wrong_ones():
    assert ops_mlu.self_test_nms(cnnl_route, cpu_nms, "cpu") == ""
    f32 = lambda t: torch.tensor(t, dtype=torch.float32)  # noqa: E731
    wrong_nms = {
        "no nudge (CNNL's >= at t)": lambda b, s, t, o: ops_mlu.mlu_nms(
            b, s, t, o, lambda bb, ss, _: cnnl_nms(bb, ss, t)),
        "old nudge (next float above float32(t))": lambda b, s, t, o: ops_mlu.mlu_nms(
            b, s, t, o, lambda bb, ss, _: cnnl_nms(bb, ss, torch.nextafter(f32(t), f32(1)).item())),
        "offset ignored": lambda b, s, t, o: cnnl_route(b, s, t, 0),
        "centre-size box mode": lambda b, s, t, o: ops_mlu.mlu_nms(b, s, t, o, lambda bb, ss, tt: cnnl_nms(
            torch.cat([bb[:, :2] - bb[:, 2:] / 2, bb[:, :2] + bb[:, 2:] / 2], 1), ss, tt)),
        "CNNL without the preparation": lambda b, s, t, o: cnnl_nms(ops._shift_legacy(b, o), s, t),
    }
    for name, run in wrong_nms.items():
        assert ops_mlu.self_test_nms(run, cpu_nms, "cpu") != "", name

    def route(kernel):
        return lambda *a: ops_mlu.mlu_roi_align(*a, kernel=kernel)

    assert ops_mlu.self_test_roi_align(route(tv_roi), cpu_roi_align, "cpu") == ""
    wrong_roi = {
        "aligned ignored": lambda x, r, size, s, ratio, al: tv_roi(x, r, size, s, ratio, False),
        "scale 1/8": lambda x, r, size, s, ratio, al: tv_roi(x, r, size, 0.125, ratio, al),
        "sampling fixed at 2": lambda x, r, size, s, ratio, al: tv_roi(x, r, size, s, 2, al),
        "channels reversed": lambda x, r, size, s, ratio, al: tv_roi(x, r, size, s, ratio, al).flip(1),
        "no gradient scaling": lambda x, r, size, s, ratio, al: ScaleGrad.apply(tv_roi(x, r, size, s, ratio, al)),
    }
    for name, kernel in wrong_roi.items():
        assert ops_mlu.self_test_roi_align(route(kernel), cpu_roi_align, "cpu") != "", name


class ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient doubled: a backward kernel that is wrong while the forward is right."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return 2 * g


# ---- building for the MLU
def test_build_cache_key_changes_with_torch_mlu_and_cnnl(tmp_path, monkeypatch):
    from torch.utils import cpp_extension
    built = []
    monkeypatch.setattr(cpp_extension, "load", lambda name, **kw: built.append(name))
    monkeypatch.setenv("FRCNN_OPS_BUILD_DIR", str(tmp_path / "cache"))
    inc = tmp_path / "include"
    inc.mkdir()
    fake = type(sys)("torch_mlu")
    monkeypatch.setitem(sys.modules, "torch_mlu", fake)
    for version, cnnl in (("1.22.2-torch2.1.0", 26), ("1.22.3-torch2.1.0", 26), ("1.22.3-torch2.1.0", 28)):
        fake.__version__ = version
        (inc / "cnnl.h").write_text(f"#define CNNL_MAJOR 1\n#define CNNL_MINOR {cnnl}\n")
        ops._build(["-DWITH_MLU"], [str(inc)], [], "mlu")
    assert len(set(built)) == 3, built  # an SDK upgrade gets its own build, never the stale .so


def test_neuware_home_defaults_to_cambricons_path(monkeypatch):
    import importlib.util
    real_isdir, real_find_spec = os.path.isdir, importlib.util.find_spec
    monkeypatch.delenv("NEUWARE_HOME", raising=False)
    monkeypatch.setattr(os.path, "isdir", lambda p: p == "/usr/local/neuware" or real_isdir(p))
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: n == "torch_mlu" or real_find_spec(n, *a))
    fake, ext = type(sys)("torch_mlu"), type(sys)("torch_mlu.utils.cpp_extension")
    # torch_mlu's own lookup: NEUWARE_HOME, else /usr/local/neuware_home (torch_mlu/utils/cpp_extension.py)
    ext.include_paths = lambda: [os.path.join(os.environ.get("NEUWARE_HOME", "/usr/local/neuware_home"), "include")]
    ext.library_paths = lambda: [os.path.join(os.environ.get("NEUWARE_HOME", "/usr/local/neuware_home"), "lib64")]
    fake.utils = type(sys)("torch_mlu.utils")
    fake.utils.cpp_extension = ext
    for name, mod in (("torch_mlu", fake), ("torch_mlu.utils", fake.utils), ("torch_mlu.utils.cpp_extension", ext)):
        monkeypatch.setitem(sys.modules, name, mod)
    args, why = ops._mlu_build_args()
    assert os.environ.get("NEUWARE_HOME") == "/usr/local/neuware"
    assert why == "cnnl.h not found in torch_mlu's include paths"  # looked in /usr/local/neuware/include


def test_cpu_runs_do_not_show_torchs_cuda_home_line():
    # torch's CUDA builds say "No CUDA runtime is found, using CUDA_HOME=..." when cpp_extension is imported on a
    # machine without a GPU; ops.py imports it for the native build, where the line would read like a fault
    code = "import ops; ops._cpp_extension(); import sys; print('imported', file=sys.stderr)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr.strip().endswith("imported"), proc.stderr
    assert "No CUDA runtime" not in proc.stderr + proc.stdout
