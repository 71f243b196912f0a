"""The MLU half of ops.py: inputs that CNNL accepts and that give the CPU kernels' answers, and the one-time
self-test that decides, per op, whether a kernel on the MLU may be used.

Both MLU routes end in CNNL: our kernels (ops_mlu.cpp) and the torchvision kernels torch_mlu registers
(torch_mlu/csrc/aten/operators/cnnl/{nms,roi_align}.cpp), so both get the same preparation here. CNNL's contract,
from Cambricon's mlu-ops docs (mlu_op.h: mluOpNms, mluOpRoiAlignForward_v2, mluOpRoiAlignBackward_v2, which forward
to CNNL one to one), and what we do about each point:
  NMS drops a box at IoU >= threshold           -> cnnl_iou_threshold(t): the float t' with  IoU >= t'  <=>  IoU > t
  NMS drops boxes whose score is <= 0           -> rank_scores: positive, distinct scores in our order (ties by index)
  NMS needs x1 < x2 and y1 < y2                 -> degenerate boxes never reach CNNL; torchvision's rule keeps them
  ROIAlign needs x1, y1 >= 0, x2 > x1, y2 > y1  -> sanitize_rois (identity on RoIs that already qualify)
  ROIAlign documents sampling_ratio 0 = adaptive -> -1 becomes 0
"""
import torch

# ---- NMS


def cnnl_iou_threshold(t):
    """The float32 t' for which CNNL's `IoU >= t'` keeps and drops exactly what `IoU > t` does for every float32 IoU:
    the smallest float32 above t. That is float32(t) itself when rounding went up (0.3, 0.6), the next float up when
    it went down or was exact (0.5, 0.7). A subnormal t' becomes the smallest normal float (hardware may flush
    subnormals to 0, and 0 would drop every box); only IoUs below 1.2e-38 could tell the difference."""
    f = torch.tensor(float(t), dtype=torch.float32)
    if f.item() <= t:
        f = torch.nextafter(f, torch.tensor(float("inf")))
    tiny = torch.finfo(torch.float32).tiny
    return tiny if 0 < f.item() < tiny else f.item()


def rank_scores(scores):
    """Positive, distinct float32 scores in (0, 1) that decrease along one stable sort by descending score, so
    CNNL's confidence threshold 0 drops nothing and its order is ours (equal scores: lower index first)."""
    n = scores.numel()
    assert n < 2 ** 23, f"{n} boxes: rank scores k/(n+1) would no longer be distinct in float32"
    order = torch.sort(scores, descending=True, stable=True)[1]
    ranks = torch.empty(n, dtype=torch.float32, device=scores.device)
    ranks[order] = torch.arange(n, 0, -1, dtype=torch.float32, device=scores.device) / (n + 1)
    return ranks


def mlu_nms(boxes, scores, iou_threshold, offset, kernel):
    """NMS through a CNNL-backed `kernel(boxes, scores, t') -> kept indices`, with the CPU kernels' answer: kept
    indices (int64) by decreasing score, ties by lower index."""
    # x2 + offset, y2 + offset turns the legacy +1 IoU into the plain one (areas and intersections both gain +1).
    boxes = boxes.float() if not offset else torch.cat([boxes[:, :2], boxes[:, 2:] + offset], dim=1).float()
    scores = scores.float()
    # Under torchvision's rule a degenerate box (x2 <= x1 or y2 <= y1) has IoU 0 (or 0/0) with every box: it is
    # always kept and never suppresses, so it is kept without asking CNNL.
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    vi, di = valid.nonzero().squeeze(1), (~valid).nonzero().squeeze(1)
    kept = vi[kernel(boxes[vi], rank_scores(scores[vi]), cnnl_iou_threshold(iou_threshold))] if len(vi) else vi
    kept = torch.cat([kept, di]).sort()[0]  # then one stable score sort: equal scores keep the lower index first
    return kept[torch.sort(scores[kept], descending=True, stable=True)[1]]


# ---- ROIAlign
def sanitize_rois(rois):
    """(K, 5) RoIs that CNNL accepts: x1, y1 clamped at 0, and x2 (y2) raised just above x1 (y1) where it is not
    above. RoIs that already qualify are returned unchanged. With aligned=False the result equals torchvision's on
    the original RoI whenever its corners were >= 0: a width below one feature pixel counts as one pixel there
    (torchvision/csrc/ops/cpu/roi_align_kernel.cpp), and the raised x2 stays within it. Corners < 0 (never made by
    the detector, which clips proposals to the image) change the result."""
    r = rois.float().clone()
    r[:, 1:3] = r[:, 1:3].clamp(min=0)
    for lo, hi in ((1, 3), (2, 4)):
        # 1e-3 above x1, and at least one float step where 1e-3 is below half an ulp (coordinates >= 2^14)
        raised = torch.nextafter(r[:, lo] + 1e-3, torch.tensor(float("inf"), device=r.device))
        r[:, hi] = torch.where(r[:, hi] > r[:, lo], r[:, hi], raised)
    return r


def mlu_roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned, kernel):
    """ROIAlign through a CNNL-backed `kernel(input, rois, output_size, spatial_scale, sampling_ratio, aligned)`
    (differentiable), in float32, with CNNL-safe RoIs; the output has the input's dtype."""
    r = sanitize_rois(rois)
    out = kernel(input.float(), r, output_size, float(spatial_scale), max(int(sampling_ratio), 0), bool(aligned))
    if aligned and sampling_ratio <= 0:
        # torchvision: with aligned=True an empty RoI keeps size <= 0, so adaptive sampling takes no sample and the
        # output is 0; the raised corner would sample one point instead.
        empty = (rois[:, 3] <= rois[:, 1]) | (rois[:, 4] <= rois[:, 2])
        out = out * (~empty).to(out.dtype)[:, None, None, None]
    return out.to(input.dtype)


# ---- self-test
def _near_threshold_pairs(t, offset, first_column):
    """Box pairs (A, B), B inside A, whose float32 IoU is float32(t), the floats either side of it and t' (where a
    wrong >=/> rule, a wrong nudge or a lost +1 shows). A = [x,0,a,a], B = [x,0,a,w]; side a and width w are
    searched so that the IoU computed the way torchvision and our kernels compute it, a*w / ((a*a + a*w) - a*w) in
    float32, hits the target exactly. Each pair sits in its own 100-pixel column; offset=1 boxes are one pixel
    shorter, so (x2 - x1 + 1) reproduces the offset-0 sizes exactly."""
    f = torch.tensor(t, dtype=torch.float32)
    up, down = torch.tensor(float("inf")), torch.tensor(float("-inf"))
    boxes = []
    for target in sorted({f.item(), torch.nextafter(f, up).item(), torch.nextafter(f, down).item(),
                          cnnl_iou_threshold(t)}):
        for a in range(16, 64):
            base = torch.tensor(a * target, dtype=torch.float32)
            ws = base + torch.arange(-256, 257, dtype=torch.float32) * (torch.nextafter(base, up) - base)
            hits = ((a * ws) / ((a * a + a * ws) - a * ws) == target).nonzero().squeeze(1)
            if len(hits):
                break
        assert len(hits), f"no box pair found with float32 IoU {target!r}"
        w, x = ws[hits[0]].item(), 100.0 * (first_column + len(boxes) // 2)
        boxes += [[x, 0, x + a - offset, a - offset], [x, 0, x + a - offset, w - offset]]
    return torch.tensor(boxes)


def _plain_mode(self_test):
    """The self-test runs at the model's first op call, which may sit under no_grad, inference_mode or autocast:
    it runs outside all three."""
    import functools

    @functools.wraps(self_test)
    def wrapper(run, reference, device):
        with torch.inference_mode(False), torch.enable_grad(), \
                torch.autocast(torch.device(device).type, enabled=False):
            return self_test(run, reference, device)
    return wrapper


@_plain_mode
def self_test_nms(run, reference, device):
    """'' when `run(boxes, scores, iou_threshold, offset)` on `device` keeps what `reference` (the CPU kernels, same
    signature, CPU tensors) keeps, in the same order, else what differed. ~200 random boxes on a 1/16 grid (so the
    legacy +1 shift is exact) with duplicates, tied and zero scores and degenerate boxes, plus pairs whose IoU sits
    at and next to the threshold; thresholds 0.3, 0.5, 0.6, 0.7 (float32 above, exact, above, below the real
    value), offsets 0 and 1."""
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(160, 2, generator=gen) * 300
    rand = torch.cat([xy, xy + torch.rand(160, 2, generator=gen) * 80 + 1], 1).mul(16).round().div(16)
    rand = torch.cat([rand, rand[:24], torch.tensor([[5.0, 5, 5, 5], [40, 40, 30, 50], [7, 7, 9, 7]])])
    for offset in (0, 1):
        for t in (0.3, 0.5, 0.6, 0.7):
            boxes = torch.cat([rand, _near_threshold_pairs(t, offset, first_column=5)])  # columns right of rand
            scores = torch.randint(0, 40, (len(rand),), generator=gen).float() / 40  # ties and zeros
            scores = torch.cat([scores, torch.tensor([0.9, 0.8]).repeat((len(boxes) - len(rand)) // 2)])
            want = reference(boxes, scores, t, offset)
            try:
                got = run(boxes.to(device), scores.to(device), t, offset).cpu()
            except Exception as e:  # noqa: BLE001
                return f"nms raised {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            if not torch.equal(got, want):
                diff = sorted(set(got.tolist()) ^ set(want.tolist()))
                return (f"nms (threshold {t}, offset {offset}) kept {len(got)} boxes, the CPU kernel {len(want)}"
                        + (f"; they differ on boxes {diff[:6]}" if diff else "; same boxes, another order"))
    return ""


ROI_TOLERANCE = 1e-3  # absolute, float32, forward and input gradient; the values are O(1)


@_plain_mode
def self_test_roi_align(run, reference, device):
    """'' when `run(input, rois, output_size, spatial_scale, sampling_ratio, aligned)` on `device` matches
    `reference` (the CPU kernels, same signature), forward and input gradient, within ROI_TOLERANCE, else what
    differed. The model's own settings: two images with RoIs on image 1 too, 12 RoIs, 64 channels, scales 1/4 and
    1/16, sampling 2 and adaptive (-1), aligned both ways; RoIs inside the image, crossing its far edge, and
    (aligned=False) zero-width and inverted."""
    gen = torch.Generator().manual_seed(1)
    for scale in (1 / 4, 1 / 16):
        h, w = int(96 * scale) + 1, int(128 * scale) + 1  # a 96x128 image's feature map
        x = torch.randn(2, 64, h, w, generator=gen)
        xy = torch.rand(12, 2, generator=gen) * torch.tensor([100.0, 80])
        rois = torch.cat([torch.tensor([[0.0]] * 5 + [[1.0]] * 7), xy, xy + torch.rand(12, 2, generator=gen) * 60 + 2],
                         1)
        for aligned in (False, True):
            r = rois.clone()
            if not aligned:
                r[3, 3], r[9, 4] = r[3, 1], r[9, 2] - 5  # zero width; inverted height
            for ratio in (2, -1):
                grad = torch.randn(12, 64, 7, 7, generator=gen)
                want, want_g = _roi_run(reference, x, r, scale, ratio, aligned, grad, "cpu")
                try:
                    got, got_g = _roi_run(run, x, r, scale, ratio, aligned, grad, device)
                except Exception as e:  # noqa: BLE001
                    return f"roi_align raised {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                for name, a, b in (("forward", got, want), ("input gradient", got_g, want_g)):
                    err = (a - b).abs().max().item()
                    if not err <= ROI_TOLERANCE:  # also catches NaN
                        return (f"roi_align {name} (scale 1/{round(1 / scale)}, sampling {ratio}, aligned "
                                f"{aligned}) differs from the CPU kernel by {err:.3g} > {ROI_TOLERANCE}")
    return ""


def _roi_run(fn, x, rois, scale, ratio, aligned, grad, device):
    xd = x.to(device).detach().requires_grad_(True)
    out = fn(xd, rois.to(device), (7, 7), scale, ratio, aligned)
    out.backward(grad.to(device))
    return out.detach().cpu(), xd.grad.cpu()
