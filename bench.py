"""Benchmarks, one subcommand each; every number is the median of --repeats timed runs after one warm-up.

    python bench.py ops                   # our NMS / ROIAlign against torchvision's, with the ratio ours/tv
    python bench.py ops --repeats 9 --device cpu
    python bench.py data                  # training data pipeline on coco_tiny: img/s per worker, ours/tv
    python bench.py eval --repeats 3      # pycocotools against the evaluator in use, on 5000 synthetic images
    python bench.py gpu --device cuda --data datasets/coco_tiny --out gpu_check   # every accelerator figure, ~8 min
    python bench.py grid --device cuda --models R-101-FPN --precisions bf16     # one part of it (also: syncs,
                                          # fidelity, trainloop, profile, extras; each writes --json)

To add a subcommand (model, data, eval): write `bench_<name>(args)` and register it in `SUBCOMMANDS` with a
function that adds its own options to its subparser; --device and --repeats are shared.
"""
import argparse
import math
import os
import statistics
import time

import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mlu":
        torch.mlu.synchronize(device)


def median_times(fns, device, repeats, warmup=1):
    """Median wall time in seconds of each fn in fns, synchronising the device around each run. The fns run in
    turn within each repeat, so load from other processes on a shared machine hits all of them alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def print_table(header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    for i, r in enumerate([header] + rows):
        print("  ".join(str(c).ljust(w) if j == 0 else str(c).rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


# ------------------------------------------------------------------------------------------------------ ops
IMAGE_HW = (800, 1216)  # upstream's test-size image, padded to a multiple of 32
FPN_LEVELS = [("P2", 1 / 4, 16, 112), ("P3", 1 / 8, 112, 224), ("P4", 1 / 16, 224, 448), ("P5", 1 / 32, 448, 800)]
# (name, spatial scale, min and max box side in pixels that upstream's LevelMapper sends to that level)


def overlapping_boxes(n, gen, num_objects=None):
    """(n, 4) proposal-like boxes: jittered copies around a few objects, so many pairs overlap at IoU > 0.7."""
    h, w = IMAGE_HW
    num_objects = num_objects or max(n // 50, 1)
    centre = torch.rand(num_objects, 2, generator=gen) * torch.tensor([w, h])
    size = torch.exp(torch.empty(num_objects, 2).uniform_(math.log(16), math.log(400), generator=gen))
    obj = torch.randint(num_objects, (n,), generator=gen)
    c = centre[obj] + torch.randn(n, 2, generator=gen) * size[obj] * 0.1
    s = size[obj] * torch.exp(torch.randn(n, 2, generator=gen) * 0.1)
    boxes = torch.cat([c - s / 2, c + s / 2], dim=1)
    return boxes.clamp(min=0).minimum(torch.tensor([w, h, w, h]) - 1.0)


def level_rois(n, images, lo, hi, gen):
    """(n, 5) rois (image index, x1, y1, x2, y2) in image pixels with sides in [lo, hi), spread over `images`."""
    h, w = IMAGE_HW
    side = torch.exp(torch.empty(n, 2).uniform_(math.log(lo), math.log(hi), generator=gen))
    x1 = torch.rand(n, generator=gen) * (w - side[:, 0]).clamp(min=1)
    y1 = torch.rand(n, generator=gen) * (h - side[:, 1]).clamp(min=1)
    idx = (torch.arange(n) * images // n).float()
    return torch.stack([idx, x1, y1, x1 + side[:, 0], y1 + side[:, 1]], dim=1)


def bench_ops(args):
    import torchvision

    import ops
    device, gen = torch.device(args.device), torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, device {device}, "
          f"{torch.get_num_threads()} threads; ours = ops.{ops.backend_name(device)}, median of {args.repeats}")
    rows = []

    def same_nms(a, b, scores):  # equal scores may come out in another order from torchvision (its sort is unstable)
        return "same" if torch.equal(a.sort()[0], b.sort()[0]) and torch.equal(scores[a], scores[b]) else "DIFFERENT"

    def row(name, ours, theirs, check):
        a, b = (1e3 * x for x in median_times([ours, theirs], device, args.repeats))
        rows.append([name, f"{a:.2f}", f"{b:.2f}", f"{a / b:.2f}", check])

    # NMS at upstream's RPN threshold 0.7; batched over 80 classes at the box head's 0.5.
    for n in (1000, 5000, 20000):
        boxes, scores = overlapping_boxes(n, gen).to(device), torch.rand(n, generator=gen).to(device)
        same = same_nms(ops.nms(boxes, scores, 0.7), torchvision.ops.nms(boxes, scores, 0.7), scores)
        row(f"nms {n // 1000}k boxes, thr 0.7", lambda: ops.nms(boxes, scores, 0.7),
            lambda: torchvision.ops.nms(boxes, scores, 0.7), same)
    n = 16000
    boxes, scores = overlapping_boxes(n, gen, num_objects=1000).to(device), torch.rand(n, generator=gen).to(device)
    labels = torch.randint(80, (n,), generator=gen).to(device)
    same = same_nms(ops.batched_nms(boxes, scores, labels, 0.5),
                    torchvision.ops.batched_nms(boxes, scores, labels, 0.5), scores)
    row("batched_nms 16k boxes, 80 classes, thr 0.5", lambda: ops.batched_nms(boxes, scores, labels, 0.5),
        lambda: torchvision.ops.batched_nms(boxes, scores, labels, 0.5), same)

    # ROIAlign, one row per FPN level with RoIs of the sizes upstream's LevelMapper sends there (the pooler
    # calls roi_align once per level): training 2 images x 512 RoIs forward + backward, test 1000 RoIs forward.
    for name, scale, lo, hi in FPN_LEVELS:
        fh, fw = IMAGE_HW[0] * scale, IMAGE_HW[1] * scale
        for phase, images, k in (("train", 2, 1024), ("test", 1, 1000)):
            feat = torch.randn(images, 256, int(fh), int(fw), generator=gen).to(device)
            rois = level_rois(k, images, lo, hi, gen).to(device)
            kw = dict(output_size=(7, 7), spatial_scale=scale, sampling_ratio=2, aligned=False)
            with torch.no_grad():
                diff = (ops.roi_align(feat, rois, **kw) - torchvision.ops.roi_align(feat, rois, **kw)).abs().max()
                row(f"roi_align fwd {phase} {name} {int(fh)}x{int(fw)}, {k} RoIs",
                    lambda: ops.roi_align(feat, rois, **kw), lambda: torchvision.ops.roi_align(feat, rois, **kw),
                    f"max|d| {diff.item():.0e}")
            if phase != "train":
                continue
            feat.requires_grad_(True)
            out_ours, out_tv = ops.roi_align(feat, rois, **kw), torchvision.ops.roi_align(feat, rois, **kw)
            grad = torch.randn(out_ours.shape, generator=gen).to(device)
            g_ours = lambda: torch.autograd.grad(out_ours, feat, grad, retain_graph=True)[0]  # noqa: E731
            g_tv = lambda: torch.autograd.grad(out_tv, feat, grad, retain_graph=True)[0]  # noqa: E731
            diff = (g_ours() - g_tv()).abs().max()
            row(f"roi_align bwd {phase} {name} {int(fh)}x{int(fw)}, {k} RoIs", g_ours, g_tv,
                f"max|d| {diff.item():.0e}")
            del feat, out_ours, out_tv
    print_table(["op", "ours ms", "torchvision ms", "ours/tv", "outputs"], rows)
    worst = max(float(r[3]) for r in rows)
    print(f"worst ratio ours/torchvision: {worst:.2f}")


# ----------------------------------------------------------------------------------------------------- model
MODEL_CASES = {  # name -> (what, implementation, preset)
    "ours-infer": ("inference", "ours", "R-50-FPN"), "tv-infer": ("inference", "torchvision", "R-50-FPN"),
    "ours-train": ("training", "ours", "R-50-FPN"), "tv-train": ("training", "torchvision", "R-50-FPN"),
    "r101-infer": ("inference", "ours", "R-101-FPN"),
}


def synthetic_batch(n, device, seed=0):
    """(images (N, 3, 800, 1216) in [0, 1), targets of 5 boxes and labels 1..80 each) on device: upstream's size."""
    gen = torch.Generator().manual_seed(seed)
    h, w = IMAGE_HW
    xy = torch.rand(n, 5, 2, generator=gen) * torch.tensor([w - 300.0, h - 300.0])
    boxes = torch.cat([xy, xy + torch.rand(n, 5, 2, generator=gen) * 250 + 20], 2).to(device)
    labels = torch.randint(1, 81, (n, 5), generator=gen).to(device)
    images = torch.rand(n, 3, h, w, generator=gen).to(device)
    return images, [{"boxes": b, "labels": l} for b, l in zip(boxes, labels)]


def build_net(impl, preset, device, overrides=(), module=None):
    """impl "ours" (model.py, or `module`: another model.py such as the previous commit's), "torchvision" (the
    fasterrcnn_resnet50_fpn builder without weights: trainable BatchNorm, all layers trainable) or "tv-frozen"
    (FasterRCNN on resnet_fpn_backbone(preset's ResNet) with FrozenBatchNorm2d and layers 2-4 trainable, as
    torchvision trains from ImageNet weights and as upstream freezes; the only torchvision R-101 Faster R-CNN)."""
    torch.manual_seed(0)
    if impl == "ours":
        import config
        import model
        cfg = config.get(preset, ["device=" + device.type, *overrides], verbose=False)
        return (module or model).build_model(cfg).to(device)
    from torchvision.models.detection import FasterRCNN, fasterrcnn_resnet50_fpn
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    # its own resize keeps the synthetic images' size: 800 x 1216 is its default target (800, 1333) already
    size = dict(min_size=min(IMAGE_HW), max_size=max(1333, *IMAGE_HW))
    if impl == "torchvision":  # weights_backbone=None too: the default would download ImageNet weights
        return fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, **size).to(device)
    name = {"R-50-FPN": "resnet50", "R-101-FPN": "resnet101"}[preset]
    return FasterRCNN(resnet_fpn_backbone(backbone_name=name, weights=None, trainable_layers=3), 91, **size).to(device)


def make_step(impl, net, what, n, device, precision=None):
    """A closure running one inference (inference mode) or one training iteration (SGD step included) of net on
    synthetic_batch(n). precision: a dict whose "autocast" entry (None or a dtype) is read at each call. Ours gets
    data.py's kind of input (BGR-255 minus a mean; preprocessing not timed); torchvision's resize/normalise runs
    inside its model and is timed with it (800x1216 is already its target size)."""
    import contextlib
    precision = precision if precision is not None else {"autocast": None}
    images, targets = synthetic_batch(n, device)
    if impl == "ours":
        x, sizes = images * 255 - 128, [IMAGE_HW] * n
        step = (lambda: net(x, sizes)) if what == "inference" else (lambda: net(x, sizes, targets))
    else:
        x = list(images)
        step = (lambda: net(x)) if what == "inference" else (lambda: net(x, targets))

    def autocast():
        dtype = precision["autocast"]
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    if what == "inference":
        net.eval()

        def run():
            with torch.inference_mode(), autocast():
                return step()
        return run
    net.train()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def run():
        with autocast():
            losses = step()
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        return losses
    return run


def _model_runner(case, device):
    """A closure running one inference (batch 1) or one training iteration (batch 2) of a MODEL_CASES case, and
    its batch size."""
    what, impl, preset = MODEL_CASES[case]
    n = 1 if what == "inference" else 2
    return make_step(impl, build_net(impl, preset, device), what, n, device), n


def _model_peak(args):
    """Child process: warm-up and one run of one case; prints its peak memory in MiB (process max RSS on cpu)."""
    import resource
    device = torch.device(args.device)
    run, _ = _model_runner(args.case, device)
    run()
    run()
    if device.type == "cpu":
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    else:
        print(getattr(torch, device.type).max_memory_allocated(device) / 2 ** 20)


def bench_model(args):
    """Times ours and torchvision alternately in this process (so load from other jobs hits both alike), and
    peak memory of each case in a fresh child process (so it is that case's own)."""
    import subprocess
    import sys

    if args.case:
        return _model_peak(args)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, image {IMAGE_HW[0]}x"
          f"{IMAGE_HW[1]}, median of {args.repeats} after 1 warm-up, runs of ours and torchvision alternating; "
          f"torchvision = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)")
    peak = {}
    for case in MODEL_CASES:
        cmd = [sys.executable, __file__, "model", "--case", case, "--device", args.device]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"bench model: case {case} failed:\n{out.stderr[-3000:]}")
        peak[case] = float(out.stdout.strip().splitlines()[-1])
    rows = []
    for what, mode in (("inference", "infer"), ("training", "train")):
        (ours, n), (tv, _) = _model_runner(f"ours-{mode}", device), _model_runner(f"tv-{mode}", device)
        a, b = (t / n for t in median_times([ours, tv], device, args.repeats))
        rows.append([f"R-50-FPN {what}, batch {n}, s per image", f"{a:.3f}", f"{b:.3f}", f"{a / b:.2f}",
                     f"{peak[f'ours-{mode}']:.0f}", f"{peak[f'tv-{mode}']:.0f}"])
        del ours, tv
    r101, _ = _model_runner("r101-infer", device)
    rows.append(["R-101-FPN inference, batch 1, s per image", f"{median_times([r101], device, args.repeats)[0]:.3f}",
                 "-", "-", f"{peak['r101-infer']:.0f}", "-"])
    mem = "peak MiB (process max RSS)" if device.type == "cpu" else "peak MiB (allocated)"
    print_table(["measurement", "ours", "torchvision", "ours/tv", f"ours {mem}", "torchvision"], rows)


def _model_options(p):
    p.add_argument("--case", choices=list(MODEL_CASES), help=argparse.SUPPRESS)  # internal: the child process


# ------------------------------------------------------------------------------------------------ accelerators
# `bench.py gpu` runs every measurement below on one accelerator, each step in a child process with a hard time
# limit, and prints a summary table last; each step is also a subcommand of its own (grid, syncs, fidelity,
# trainloop, profile, extras) that writes its figures as JSON to --json.
PRECISIONS = {"fp32": (False, None), "tf32": (True, None), "bf16": (False, torch.bfloat16)}  # (tf32, autocast)
# Dense (no sparsity) spec peaks in TFLOP/s: (FP32, TF32, BF16), SXM parts; the grid also measures a big matmul.
PEAK_TFLOPS = {"H200": (67, 494.7, 989.4), "H100": (67, 494.7, 989.4), "A100": (19.5, 156, 312), "V100": (15.7, 0, 125)}


def set_precision(name, state):
    """Apply a PRECISIONS entry: TF32 through launch.numeric_policy (as train.py and evaluate.py), autocast in
    state["autocast"] for the make_step closures."""
    import types

    import launch
    tf32, autocast = PRECISIONS[name]
    launch.numeric_policy(types.SimpleNamespace(tf32=tf32))
    state["autocast"] = autocast


def device_info(device):
    info = {"torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=p.name, memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    elif device.type == "mlu":
        info.update(name=torch.mlu.get_device_name(device))
    else:
        import platform
        info.update(name=platform.processor() or "cpu", threads=torch.get_num_threads())
    return info


def peak_memory(fn, device, net, training):
    """Peak GiB of one call of fn (after warm-up) as if net were alone on the device: the allocator's peak over what
    was allocated before the call (activations, gradients, temporaries), plus net's weights, buffers and folded
    weights and, in training, SGD's momentum. None on the CPU, where the process RSS says nothing."""
    if device.type == "cpu":
        return None
    mod = getattr(torch, device.type)
    sync(device)
    before = mod.memory_allocated(device)
    mod.reset_peak_memory_stats(device)
    fn()
    sync(device)
    kept = [t for m in net.modules() for t in getattr(m, "_folded", ())]  # model.FrozenBatchNorm2d.fold's cache
    resident = sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers(), *kept])
    momentum = sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad) if training else 0
    return (mod.max_memory_allocated(device) - before + resident + momentum) / 2**30


def count_flops(fn):
    """FLOPs of one call counted by torch.utils.flop_counter.FlopCounterMode: convolutions and matmuls, backward
    included; ROIAlign, NMS and elementwise ops are not counted."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_tflops(device, precision, size=8192, repeats=10):
    """Achieved TFLOP/s of a square matmul in a PRECISIONS entry: the card's practical peak."""
    state = {}
    set_precision(precision, state)
    dtype = state["autocast"] or torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    t = median_times([lambda: a @ b], device, repeats, warmup=2)[0]
    return 2 * size**3 / t / 1e12


def write_json(path, obj):
    import json
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=1, default=str)


def bench_grid(args):
    """Ours against torchvision (tv-frozen: FrozenBN, layers 2-4 trainable, as ours) in the same process, runs
    alternating: images/s, time ratio, peak memory, achieved TFLOP/s (FLOPs counted once per case), for each
    model, training and inference batch size and precision."""
    device = torch.device(args.device)
    info = device_info(device)
    models = args.models.split(",")
    cases = [("training", int(n)) for n in args.train_batches.split(",") if n] + \
            [("inference", int(n)) for n in args.infer_batches.split(",") if n]
    precisions = [p for p in args.precisions.split(",") if p]
    peaks = {p: matmul_tflops(device, p, args.matmul_size) for p in precisions}
    spec = next((v for k, v in PEAK_TFLOPS.items() if k in info.get("name", "")), None)
    print(f"{info}; matmul {args.matmul_size}^3 TFLOP/s: " + ", ".join(f"{p} {v:.1f}" for p, v in peaks.items()),
          flush=True)
    rows, records = [], []
    for preset in models:
        overrides = args.overrides.split(";") if args.overrides else []
        nets = {impl: build_net(impl, preset, device, overrides) for impl in ("ours", "tv-frozen")}
        for what, n in cases:
            state = {"autocast": None}
            steps = {impl: make_step(impl, net, what, n, device, state) for impl, net in nets.items()}
            flops = {impl: count_flops(fn) for impl, fn in steps.items()}
            for precision in precisions:
                set_precision(precision, state)
                t_ours, t_tv = median_times([steps["ours"], steps["tv-frozen"]], device, args.repeats, warmup=2)
                mem = {impl: peak_memory(fn, device, nets[impl], what == "training") for impl, fn in steps.items()}
                tflops = flops["ours"] / t_ours / 1e12
                rec = {"model": preset, "what": what, "batch": n, "precision": precision, "ours_img_s": n / t_ours,
                       "tv_img_s": n / t_tv, "time_ratio": t_ours / t_tv, "ours_peak_gib": mem["ours"],
                       "tv_peak_gib": mem["tv-frozen"], "ours_gflop_per_img": flops["ours"] / n / 1e9,
                       "tv_gflop_per_img": flops["tv-frozen"] / n / 1e9, "ours_tflops": tflops,
                       "pct_of_matmul_peak": 100 * tflops / peaks[precision],
                       "pct_of_spec_peak": 100 * tflops / spec[list(PRECISIONS).index(precision)] if spec else None}
                records.append(rec)
                fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
                rows.append([f"{preset} {what[:5]} b{n} {precision}", f"{rec['ours_img_s']:.1f}",
                             f"{rec['tv_img_s']:.1f}", f"{rec['time_ratio']:.2f}", fmt(mem["ours"], ".1f"), fmt(mem["tv-frozen"], ".1f"),
                             f"{tflops:.1f}", f"{rec['pct_of_matmul_peak']:.0f}%", fmt(rec["pct_of_spec_peak"], ".0f")])
                print("  ".join(map(str, rows[-1])), flush=True)
            del steps
        del nets
    print(f"\nmedian of {args.repeats} after 2 warm-ups, ours and torchvision alternating; {IMAGE_HW[0]}x{IMAGE_HW[1]} "
          "images, 5 boxes; FLOPs by FlopCounterMode (conv + matmul, fwd + bwd); spec peak: dense SXM figures")
    print_table(["case", "ours img/s", "tv img/s", "ours/tv time", "ours GiB", "tv GiB", "ours TFLOP/s",
                 "% matmul peak", "% spec"], rows)
    write_json(args.json, {"info": info, "matmul_tflops": peaks, "spec_tflops": spec, "rows": records})


def _grid_options(p):
    p.add_argument("--models", default="R-50-FPN,R-101-FPN")
    p.add_argument("--train-batches", default="2,8", help="training images per device, comma-separated")
    p.add_argument("--infer-batches", default="1,8")
    p.add_argument("--precisions", default="fp32,tf32,bf16")
    p.add_argument("--matmul-size", type=int, default=8192)
    p.add_argument("--overrides", default="", help="config overrides of ours, separated by ';' (dry runs)")
    p.add_argument("--json", default="", help="write the figures here")


SYNC_OPS = {"aten::nonzero", "aten::masked_select", "aten::_unique2", "aten::unique_dim",
            "aten::unique_consecutive", "aten::bincount", "aten::equal", "aten::repeat_interleave", "aten::histc",
            "torchvision::nms", "frcnn_ops::nms"}


def count_host_reads(fn):
    """Structural count of the device-to-host synchronisations one call of fn would make on an accelerator, by
    op: ops whose output size or value the host must read (nonzero, unique, NMS, boolean-mask indexing), seen with
    a TorchDispatchMode, and Tensor methods that read values (.item(), .tolist(), .cpu(), bool(), int(), float()),
    patched. Works on the CPU."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode
    counts = collections.Counter()

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name
            if name in SYNC_OPS:
                counts[name] += 1
            elif name in ("aten::index", "aten::index_put_", "aten::_index_put_impl_") and any(
                    t is not None and t.dtype == torch.bool for t in args[1]):
                if name == "aten::index" or args[2].numel() > 1:  # x[mask] = scalar is masked_fill: no read
                    counts[name + " (bool mask)"] += 1
            return func(*args, **(kwargs or {}))
    names = ("tolist", "cpu", "item", "__bool__", "__int__", "__float__")  # host reads the mode does not see
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def patched(name, original):
        def f(self, *a, **k):
            counts[f"Tensor.{name}"] += 1
            return original(self, *a, **k)
        return f
    for name, original in originals.items():
        setattr(torch.Tensor, name, patched(name, original))
    try:
        with Mode():
            fn()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return dict(counts)


def count_cuda_syncs(fn):
    """Synchronisations one call of fn makes on CUDA, from torch.cuda.set_sync_debug_mode("warn"), by source line
    of model.py/ops.py (the innermost frame of ours that led to it)."""
    import collections
    import warnings
    where = collections.Counter()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            where[f"{os.path.basename(w.filename)}:{w.lineno}"] += 1
    return sum(where.values()), dict(where.most_common())


def load_model_file(path):
    """A model.py kept elsewhere (the previous commit's: git show af428b4:model.py > .before/model.py), as a module."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("model_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_syncs(args):
    """Host reads in the forward of ours (and of --old-model, the code before this change), R-50-FPN inference and
    one training step: structural counts by op, and on CUDA the real synchronisations by source line; with
    --old-model also the time of old and new alternating (FP32) and whether their outputs are equal."""
    device = torch.device(args.device)
    versions = {"new": None}
    if args.old_model and os.path.isfile(args.old_model):
        versions["old"] = load_model_file(args.old_model)
    elif args.old_model:
        print(f"bench syncs: {args.old_model} is absent: counting the current model.py only")
    overrides = args.overrides.split(";") if args.overrides else []
    out, rows = {}, []
    for what, n in [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(",")]:
        steps = {v: make_step("ours", build_net("ours", args.preset, device, overrides, m), what, n, device)
                 for v, m in versions.items()}
        results = {}
        for version, step in steps.items():  # first call: the same weights and seed for old and new
            torch.manual_seed(1)
            results[version] = step()
        if "old" in steps:
            a, b = results["old"], results["new"]
            if what == "inference":
                same = all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
                if not same:  # how far apart: the share matched as in test_evaluate.py
                    import evaluate
                    from test_evaluate import detection_agreement
                    records = [[{"image_id": i, **r} for i, d in enumerate(dets) for r in evaluate.coco_records(
                        {k: v.float().cpu() for k, v in d.items()}, {c: c for c in range(1, 91)})] for dets in (a, b)]
                    matched, n_old, n_new = detection_agreement(*records)
                    same = f"{matched} of {n_old} old / {n_new} new detections matched"
            else:  # the old NaN objectness (no anchor sampled) is 0 now
                same = all(torch.equal(a[k], b[k]) or bool(a[k].isnan()) for k in a)
        for version, step in steps.items():
            torch.manual_seed(2)
            structural = count_host_reads(step)
            real = count_cuda_syncs(step) if device.type == "cuda" else (None, {})
            out[f"{what} b{n} {version}"] = {"structural": structural, "structural_total": sum(structural.values()),
                                             "cuda_syncs": real[0], "cuda_by_line": real[1]}
            rows.append([f"{what} b{n}", version, sum(structural.values()), "-" if real[0] is None else real[0],
                         ", ".join(f"{k.split('::')[-1]} {v}" for k, v in sorted(structural.items()))])
        if "old" in steps:
            times = median_times([steps["old"], steps["new"]], device, args.repeats, warmup=1)
            out[f"{what} b{n} time"] = {"old_s": times[0], "new_s": times[1], "outputs_equal": same}
            rows.append([f"{what} b{n}", "new/old time", f"{times[1] / times[0]:.3f}", "",
                         "outputs equal" if same is True else f"outputs DIFFER: {same}"])
        del steps, results
    print(f"{args.preset} on {device}: host reads per forward (training: forward and backward of one step)")
    print_table(["case", "model.py", "structural", "CUDA syncs", "by op"], rows)
    write_json(args.json, out)


def _syncs_options(p):
    p.add_argument("--preset", default="R-50-FPN")
    p.add_argument("--cases", default="inference:1,inference:8,training:2", help="what:batch,...")
    p.add_argument("--old-model", default=".before/model.py", help="a previous model.py to count too, if present")
    p.add_argument("--overrides", default="", help="config overrides, separated by ';' (dry runs)")
    p.add_argument("--json", default="")


def bench_fidelity(args):
    """Folder inference of the same random-init weights on the CPU (FP32) and on --device in FP32 (TF32 off),
    TF32 and bf16 autocast: the share of detections matched (same label, IoU > 0.99, score within 1e-3; the
    test_evaluate.py rule). Demo preset (100 detections per image at random init) and R-50-FPN (score_thresh 0)."""
    import tempfile

    import checkpoint
    import config
    import data
    import evaluate
    import model
    from test_evaluate import detection_agreement
    device = torch.device(args.device)
    paths = evaluate.image_paths(args.images)[0]
    out, rows = {}, []
    for preset, overrides, count in (("demo", [], args.demo_images),
                                     ("R-50-FPN", ["score_thresh=0.0"], args.r50_images)):
        torch.manual_seed(0)
        cfg = config.get(preset, ["device=cpu", *overrides] + (args.overrides.split(";") if args.overrides else []),
                         verbose=False)
        ckpt = os.path.join(tempfile.mkdtemp(), f"{preset}_random.pth")
        checkpoint.save(ckpt, model.build_model(cfg), cfg)
        records = {}
        runs = [("cpu", "fp32")] + [(args.device, p) for p in args.precisions.split(",")]
        for k, (dev, precision) in enumerate(runs):
            net, cfg_d, d, _ = evaluate.load(ckpt, None, [f"device={dev}", "test_ims_per_batch=1", "num_workers=2"],
                                             verbose=False)
            state = {}
            set_precision(precision, state)
            loader = data.make_test_loader(cfg_d, dataset=data.ImageFiles(paths[:count], cfg_d))
            t0 = time.perf_counter()
            with (torch.autocast(d.type, dtype=state["autocast"]) if state["autocast"] else torch.inference_mode()):
                dets = evaluate.predict(net, loader, d)
            seconds = time.perf_counter() - t0
            label = {i: i for i in range(1, cfg_d.num_classes)}
            records[k] = [{"file_name": os.path.basename(paths[i]), **r} for i in sorted(dets)
                          for r in evaluate.coco_records(dets[i], label)]
            if k == 0:
                rows.append([preset, "cpu fp32", len(records[0]), "reference", f"{seconds:.1f}"])
                continue
            matched, n_ref, n = detection_agreement(records[0], records[k])
            share = matched / max(n_ref, n, 1)
            out[f"{preset} {precision}"] = {"matched": matched, "cpu_detections": n_ref, "device_detections": n,
                                            "share": share, "seconds": seconds, "images": count}
            rows.append([preset, f"{dev} {precision}", n, f"{100 * share:.2f}%", f"{seconds:.1f}"])
    print(f"folder inference on {args.images}: detections matched against the CPU's (label, IoU > 0.99, score 1e-3)")
    print_table(["weights", "run", "detections", "matched", "seconds"], rows)
    write_json(args.json, out)


def _fidelity_options(p):
    p.add_argument("--images", default="datasets/coco_tiny/val2017")
    p.add_argument("--demo-images", type=int, default=80)
    p.add_argument("--r50-images", type=int, default=8)
    p.add_argument("--precisions", default="fp32,tf32,bf16")
    p.add_argument("--overrides", default="", help="config overrides of both, separated by ';' (dry runs)")
    p.add_argument("--json", default="")


def bench_trainloop(args):
    """train.py as a user runs it, on real images (--data, read again and again by its iteration-based sampler)
    with the real loader on --workers processes: images/s and the share of each iteration spent waiting for data,
    from its log.jsonl, the first log_period iterations (warm-up) left out. Its final checkpoint and evaluation
    run after the timed loop."""
    import json
    import subprocess
    import sys
    import tempfile
    import checkpoint
    import config
    import model
    out_dir = tempfile.mkdtemp(prefix="trainloop_")
    here = os.path.dirname(os.path.abspath(__file__))
    cfg = config.get(args.config, verbose=False)  # random initial weights, saved: train.py refuses none for a
    checkpoint.save(os.path.join(out_dir, "init.pth"), model.build_model(cfg), cfg)  # frozen preset
    cmd = [sys.executable, os.path.join(here, "train.py"), "--config", args.config, f"data_root={args.data}",
           f"output_dir={out_dir}", f"weights={os.path.join(out_dir, 'init.pth')}",
           f"device={args.device}", f"ims_per_batch={args.batch}", f"num_workers={args.workers}",
           f"max_iter={args.iters}", f"log_period={args.log_period}", "checkpoint_period=1000000000",
           f"amp={'' if args.amp == 'fp32' else args.amp}"] + (args.overrides.split(";") if args.overrides else [])
    print(" ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=here)
    wall = time.perf_counter() - t0
    log = os.path.join(out_dir, "log.jsonl")
    records = [json.loads(line) for line in open(log)] if os.path.isfile(log) else []
    loop = [r for r in records if "time" in r][1:]
    result = {"command": " ".join(cmd), "returncode": proc.returncode, "wall_s": wall, "records": loop,
              "stderr_tail": proc.stderr[-2000:] if proc.returncode else ""}
    if loop:
        t = sum(r["time"] for r in loop) / len(loop)
        d = sum(r["data_time"] for r in loop) / len(loop)
        result.update(img_s=args.batch / t, s_per_iter=t, data_share=d / t, memory_mb=loop[-1]["memory_mb"])
        print(f"train.py {args.config} amp={args.amp} {args.batch} images/iteration, {args.workers} workers: "
              f"{result['img_s']:.1f} img/s, {t:.3f} s/iter, waiting for data {100 * d / t:.0f}% of it, "
              f"peak {result['memory_mb']:.0f} MiB (exit {proc.returncode}, {wall:.0f} s in all)")
    else:
        print(f"train.py gave no timed iterations (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    write_json(args.json, result)


def _trainloop_options(p):
    p.add_argument("--config", default="R-101-FPN")
    p.add_argument("--data", default="datasets/coco_tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--log-period", type=int, default=10)
    p.add_argument("--amp", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--overrides", default="", help="more train.py overrides, separated by ';' (dry runs)")
    p.add_argument("--json", default="")


def bench_profile(args):
    """torch.profiler over --repeats steps after warm-up: the top ops by device time (CPU time on the CPU) and how
    busy the device was over the wall time (a low share means host-bound: Python, launches, synchronisations)."""
    device = torch.device(args.device)
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    overrides = args.overrides.split(";") if args.overrides else []
    text = []
    for spec in args.cases.split(";"):
        impl, preset, what, n, precision = spec.split(",")
        state = {}
        net = build_net(impl, preset, device, overrides if impl == "ours" else ())
        step = make_step(impl, net, what, int(n), device, state)
        set_precision(precision, state)
        for _ in range(2):
            step()
        sync(device)
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                step()
            sync(device)
            wall = time.perf_counter() - t0
        events = prof.key_averages()
        busy = sum(getattr(e, key, 0) for e in events) / 1e6 if device.type == "cuda" else None
        head = (f"== {impl} {preset} {what} batch {n} {precision}: {1e3 * wall / args.repeats:.1f} ms per step"
                + (f", device busy {100 * busy / wall:.0f}% of the wall time" if busy is not None else ""))
        print(head, flush=True)
        text += [head, events.table(sort_by=key, row_limit=args.rows, max_name_column_width=60), ""]
        del net, step, prof
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(text))


def _profile_options(p):
    p.add_argument("--cases", default="ours,R-50-FPN,inference,1,fp32;tv-frozen,R-50-FPN,inference,1,fp32;"
                                      "ours,R-101-FPN,training,8,bf16", help="impl,preset,what,batch,precision;...")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--overrides", default="", help="config overrides of ours, separated by ';' (dry runs)")
    p.add_argument("--out", default="", help="write the tables here")


def bench_extras(args):
    """The optional speed-ups, each against the default in the same process, alternating: fused against foreach
    SGD (R-101-FPN's parameters), channels_last off against on, and compile_backbone (torch.compile of the
    backbone; reduce-overhead adds CUDA graphs), with the compile time and whether the results are equal.
    Figures go to --json after each one, so a time limit keeps what was measured."""
    device = torch.device(args.device)
    overrides = args.overrides.split(";") if args.overrides else []
    out = {}

    def record(name, **kw):
        out[name] = kw
        print(name, ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in kw.items()),
              flush=True)
        write_json(args.json, out)

    # fused SGD: one kernel per parameter group instead of foreach's few per step
    params = [p for p in build_net("ours", "R-101-FPN", device, overrides).parameters() if p.requires_grad]
    gen = torch.Generator(device=device).manual_seed(0)
    grads = [torch.randn(p.shape, generator=gen, device=device) for p in params]
    opts, copies = {}, {}
    for kind in ("foreach", "fused"):
        copies[kind] = [p.detach().clone().requires_grad_() for p in params]
        for p, g in zip(copies[kind], grads):
            p.grad = g.clone()
        try:
            opts[kind] = torch.optim.SGD(copies[kind], lr=0.02, momentum=0.9, weight_decay=1e-4, **{kind: True})
        except (RuntimeError, TypeError) as e:
            record(f"sgd {kind}", error=str(e)[:200])
    if len(opts) == 2:
        t = median_times([opts["foreach"].step, opts["fused"].step], device, args.repeats, warmup=2)
        same = all(torch.equal(a, b) for a, b in zip(copies["foreach"], copies["fused"]))
        record("sgd fused vs foreach", foreach_ms=1e3 * t[0], fused_ms=1e3 * t[1], params_equal_after_steps=same)
    del params, grads, opts, copies
    for precision in args.precisions.split(","):
        for what, n in (("inference", 1), ("training", 2)):
            state = {}
            steps = [make_step("ours", build_net("ours", "R-50-FPN", device, overrides + [f"channels_last={v}"]),
                               what, n, device, state) for v in (True, False)]
            set_precision(precision, state)
            t = median_times(steps, device, args.repeats, warmup=2)
            record(f"channels_last off/on R-50-FPN {what} b{n} {precision}", on_ms=1e3 * t[0], off_ms=1e3 * t[1],
                   off_over_on=t[1] / t[0])
    for mode, what, n, precision in [m.split(":") for m in args.compile.split(",") if m]:
        state = {}
        eager = make_step("ours", build_net("ours", "R-50-FPN", device, overrides), what, int(n), device, state)
        compiled = make_step("ours", build_net("ours", "R-50-FPN", device, overrides + [f"compile_backbone={mode}"]),
                             what, int(n), device, state)
        set_precision(precision, state)
        t0 = time.perf_counter()
        try:
            compiled()
            compiled()  # a second call: dynamo recompiles once when it sees its first shape again
        except Exception as e:  # noqa: BLE001  (a compiler failure is a finding, not a crash of the bench)
            record(f"compile {mode} {what} b{n} {precision}", error=f"{type(e).__name__}: {str(e)[:300]}")
            continue
        compile_s = time.perf_counter() - t0
        t = median_times([eager, compiled], device, args.repeats, warmup=1)
        torch.manual_seed(3)
        a = eager()
        torch.manual_seed(3)
        b = compiled()
        if what == "inference":
            diff = max(((x["boxes"] - y["boxes"]).abs().max().item() if x["boxes"].shape == y["boxes"].shape
                        else float("inf")) for x, y in zip(a, b))
        else:
            diff = max(abs(a[k].item() - b[k].item()) for k in a)
        record(f"compile {mode} R-50-FPN {what} b{n} {precision}", eager_ms=1e3 * t[0], compiled_ms=1e3 * t[1],
               compiled_over_eager=t[1] / t[0], compile_s=compile_s, max_abs_diff=diff)


def _extras_options(p):
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--compile", default="default:inference:1:bf16,reduce-overhead:inference:1:bf16,"
                                        "default:training:2:bf16", help="mode:what:batch:precision,...")
    p.add_argument("--overrides", default="", help="config overrides of ours, separated by ';' (dry runs)")
    p.add_argument("--json", default="")


def bench_gpu(args):
    """Every accelerator figure in one call: the CUDA tests, fidelity, host syncs before/after, the grid against
    torchvision, train.py on real images, profiles and the optional speed-ups, each step a child process with its
    own time limit inside --budget seconds; files in --out (at most 8), a summary table printed last.

        python3 bench.py gpu --device cuda --data datasets/coco_tiny --out $OUT          # ~8 minutes on an H200
        python bench.py gpu --device cpu --dry-run --out /tmp/gpu_dry                    # the same code, tiny sizes
    """
    import json
    import signal
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    args.out, args.data = os.path.abspath(args.out), os.path.abspath(args.data)
    os.makedirs(args.out, exist_ok=True)
    out = lambda name: os.path.join(args.out, name)  # noqa: E731
    me = [sys.executable, os.path.abspath(__file__)]
    common = ["--device", args.device]
    dry = args.dry_run
    tiny = "stage_blocks=(1,1,1,1);stem_channels=8;width_per_group=4;fpn_channels=16;mlp_dim=32"
    hw = ["--hw", "128,192"] if dry else []
    reps = ["--repeats", "1" if dry else "5"]
    steps = [  # (name, command, seconds), the target figures first
        ("grid", me + ["grid", *common, *hw, *reps, "--json", out("grid.json")] + (
            ["--train-batches", "1", "--infer-batches", "1", "--precisions", "fp32,bf16", "--matmul-size", "256",
             "--overrides", tiny] if dry else []), 240),
        ("trainloop", me + ["trainloop", *common, "--data", args.data, "--json", out("trainloop.json")] + (
            ["--config", "demo", "--batch", "2", "--workers", "1", "--iters", "4", "--log-period", "2", "--overrides",
             "min_size_train=(128,);max_size_train=192;min_size_test=128;max_size_test=192;num_classes=81;"
             "test_ims_per_batch=8"] if dry else []), 150),
        ("syncs", me + ["syncs", *common, *hw, *reps, "--json", out("syncs.json")] + (["--overrides", tiny] if dry
                                                                                      else []), 90),
        ("fidelity", me + ["fidelity", *common, "--images", os.path.join(args.data, "val2017"), "--json",
                           out("fidelity.json")] + (["--demo-images", "4", "--r50-images", "1", "--precisions",
                                                      "fp32,bf16", "--overrides", "min_size_test=128;max_size_test=192"]
                                                     if dry else []), 120),
        ("pytest", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_ops.py", "test_model.py",
                    "test_evaluate.py", "-k", "cuda or agreement or finite"], 150),
        ("profile", me + ["profile", *common, *hw, "--repeats", "3", "--out", out("profile.txt")] + (
            ["--cases", "ours,R-50-FPN,inference,1,fp32;tv-frozen,R-50-FPN,inference,1,fp32;"
                        "ours,R-50-FPN,training,1,bf16", "--overrides", tiny] if dry else []), 90),
        ("extras", me + ["extras", *common, *hw, *reps, "--json", out("extras.json")] + (
            ["--compile", "", "--overrides", tiny] if dry else []), 240),
    ]
    deadline = time.time() + args.budget
    status = {}
    with open(out("log.txt"), "w") as log:
        for name, cmd, limit in steps:
            if args.only and name not in args.only.split(","):
                continue
            left = deadline - time.time()
            if left < 20:
                status[name] = "skipped: out of --budget"
                continue
            limit = min(limit * (1 if not dry else 3), left)
            log.write(f"\n===== {name}: {' '.join(cmd)} (limit {limit:.0f} s)\n")
            log.flush()
            t0 = time.time()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=here,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
            try:
                rc = proc.wait(timeout=limit)
                status[name] = f"exit {rc}, {time.time() - t0:.0f} s"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the step and its children (train.py, loader workers)
                proc.wait()
                status[name] = f"TIMED OUT after {limit:.0f} s (partial figures kept)"
            print(f"bench gpu: {name}: {status[name]}", flush=True)
    summary = gpu_summary(args.out, status)
    with open(out("summary.txt"), "w") as f:
        f.write(summary)
    print(summary)


def gpu_summary(folder, status):
    """The short table of `bench.py gpu`: what each step gave, the issue's targets next to the figures."""
    import json
    import re

    def load(name):
        path = os.path.join(folder, name)
        try:
            return json.load(open(path))
        except (OSError, ValueError):
            return None
    lines = ["", "==== bench.py gpu summary ===="]
    grid, syncs, fid, loop, extras = (load(f"{n}.json") for n in ("grid", "syncs", "fidelity", "trainloop", "extras"))
    if grid:
        lines.append(f"device: {grid['info']}; matmul TFLOP/s {grid['matmul_tflops']}")
    for name, s in status.items():
        lines.append(f"step {name}: {s}")
    log = open(os.path.join(folder, "log.txt")).read() if os.path.isfile(os.path.join(folder, "log.txt")) else ""
    tests = re.findall(r"^(\d+ (?:passed|failed).*?) in [\d.]+s", log, re.M)
    lines.append(f"pytest (-k 'cuda or agreement or finite'): {tests[0] if tests else 'no result line'}")
    if fid:
        lines.append("fidelity vs CPU FP32 (label, IoU > 0.99, score within 1e-3): " + "; ".join(
            f"{k} {100 * v['share']:.2f}% of {v['cpu_detections']}" for k, v in fid.items()))
    if syncs:
        for case in sorted({k.rsplit(" ", 1)[0] for k in syncs}):
            old, new, t = (syncs.get(f"{case} {v}") for v in ("old", "new", "time"))
            fmt = lambda r: f"{r['structural_total']} structural / {r['cuda_syncs']} CUDA" if r else "-"  # noqa
            lines.append(f"host syncs R-50-FPN {case}: before {fmt(old)}, after {fmt(new)}"
                         + (f"; time after/before {t['new_s'] / t['old_s']:.3f}, outputs equal {t['outputs_equal']}"
                            if t else ""))
    if grid:
        rows = {(r["model"], r["what"], r["batch"], r["precision"]): r for r in grid["rows"]}
        lines.append("case: ours img/s, torchvision img/s, ours/tv time, ours peak GiB, ours TFLOP/s (% matmul peak)")
        for (m, w, b, p), r in rows.items():
            mem = "-" if r["ours_peak_gib"] is None else f"{r['ours_peak_gib']:.1f}"
            lines.append(f"  {m} {w} b{b} {p}: {r['ours_img_s']:.1f}, {r['tv_img_s']:.1f}, {r['time_ratio']:.2f}, "
                         f"{mem}, {r['ours_tflops']:.1f} ({r['pct_of_matmul_peak']:.0f}%)")

        def best(model, what, batch, precisions):
            found = [rows[k] for k in [(model, what, batch, p) for p in precisions] if k in rows]
            return max(found, key=lambda r: r["ours_img_s"]) if found else None
        targets = [("inference R-50-FPN b1 FP32: ours/tv time <= 0.8", best("R-50-FPN", "inference", 1, ["fp32"]),
                    lambda r: r["time_ratio"] <= 0.8, "time_ratio"),
                   ("inference R-101-FPN b8 TF32/bf16: >= 60 img/s",
                    best("R-101-FPN", "inference", 8, ["tf32", "bf16"]), lambda r: r["ours_img_s"] >= 60, "ours_img_s"),
                   ("training R-101-FPN b8 bf16: >= 35 img/s", best("R-101-FPN", "training", 8, ["bf16"]),
                    lambda r: r["ours_img_s"] >= 35, "ours_img_s"),
                   ("training R-101-FPN b8 bf16: ours/tv time <= 0.8", best("R-101-FPN", "training", 8, ["bf16"]),
                    lambda r: r["time_ratio"] <= 0.8, "time_ratio")]
        for text, r, ok, key in targets:
            lines.append(f"target {text}: " + ("not measured" if r is None else
                                               f"{r[key]:.2f} ({r['precision']}) {'MET' if ok(r) else 'NOT MET'}"))
    if loop:
        lines.append(f"train.py loop: {loop.get('command', '')[-160:]}")
        lines.append("  " + (f"{loop['img_s']:.1f} img/s, {loop['s_per_iter']:.3f} s/iter, data wait "
                             f"{100 * loop['data_share']:.0f}%, exit {loop['returncode']}" if "img_s" in loop
                             else f"no timed iterations, exit {loop['returncode']}: {loop['stderr_tail'][-300:]}"))
    if extras:
        for k, v in extras.items():
            lines.append(f"extra {k}: " + ", ".join(f"{a} {b:.4g}" if isinstance(b, float) else f"{a} {b}"
                                                   for a, b in v.items()))
    lines.append("files: summary.txt log.txt grid.json syncs.json fidelity.json trainloop.json extras.json profile.txt")
    return "\n".join(lines) + "\n"


def _gpu_options(p):
    p.add_argument("--data", default="datasets/coco_tiny", help="COCO-layout folder (train2017, val2017, annotations)")
    p.add_argument("--out", default="gpu_check", help="folder for the figures (at most 8 files)")
    p.add_argument("--budget", type=float, default=480, help="seconds for all steps together (default 480)")
    p.add_argument("--only", default="", help="comma-separated steps to run (default all)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes and counts: the whole script on a CPU")


# ----------------------------------------------------------------------------------------------------- data
def bench_data(args):
    """Training pipeline (decode, resize, flip, normalise, targets) in images per second per worker process (one
    thread, as in a loader worker) on coco_tiny, against torchvision's CocoDetection + PIL resize + hflip +
    to_tensor (upstream's pipeline, less its box bookkeeping) in the same run, alternating; then the whole
    loader with --workers worker processes, collate and padding included."""
    import contextlib
    import io
    import os

    import config
    import data
    import torchvision
    import torchvision.transforms.functional as TF

    COCO_TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "datasets", "coco_tiny")
    if not os.path.isdir(COCO_TINY):
        print(f"bench data: skipped, {COCO_TINY} is absent (it comes with ../shared)")
        return
    cfg = config.get(args.config, [f"data_root={COCO_TINY}", f"num_workers={args.workers}", "ims_per_batch=2"],
                     verbose=False)
    ds = data.CocoDetection(COCO_TINY, cfg.train_split, cfg, train=True)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' progress lines
        tv = torchvision.datasets.CocoDetection(os.path.join(COCO_TINY, cfg.train_split), os.path.join(
            COCO_TINY, "annotations", f"instances_{cfg.train_split}.json"))
    index = {img_id: k for k, img_id in enumerate(tv.ids)}
    calls = [0]

    def ours():
        calls[0] += 1
        for k in range(len(ds)):
            ds[(k, f"bench:{calls[0]}:{k}")]

    def torchvision_ref():
        for k, img_id in enumerate(ds.ids):
            img, _ = tv[index[img_id]]
            w, h = data.resize_size(*img.size, cfg.min_size_train[0], cfg.max_size_train)
            img = TF.resize(img, [h, w])
            TF.to_tensor(TF.hflip(img) if k % 2 else img)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a loader worker process
    t_ours, t_tv = median_times([ours, torchvision_ref], torch.device("cpu"), args.repeats)
    torch.set_num_threads(threads)
    a, b = len(ds) / t_ours, len(ds) / t_tv
    loader = iter(data.make_train_loader(cfg, 0, 1))
    next(loader)  # the workers start
    t0 = time.perf_counter()
    n = 2 * max(1, len(ds) // 2)
    for _ in range(n // 2):
        next(loader)
    rate = n / (time.perf_counter() - t0)
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, {args.config} sizes (short {cfg.min_size_train}, "
          f"long <= {cfg.max_size_train}), coco_tiny {cfg.train_split} ({len(ds)} images), median of {args.repeats}")
    print_table(["measurement", "ours", "torchvision", "ours/tv"], [
        ["training pipeline, img/s per worker", f"{a:.1f}", f"{b:.1f}", f"{a / b:.2f}"],
        [f"loader, {args.workers} workers, batch 2, img/s total", f"{rate:.1f}", "-", "-"],
        ["loader, img/s per worker", f"{rate / max(1, args.workers):.1f}", "-", "-"]])


def _data_options(p):
    p.add_argument("--config", default="R-101-FPN", help="preset whose input sizes to use (default R-101-FPN)")
    p.add_argument("--workers", type=int, default=2, help="loader worker processes (default 2)")


# -------------------------------------------------------------------------------------------------- eval
def bench_eval(args):
    """pycocotools against the evaluator evaluate.py picks, on a synthetic COCO-sized problem: args.images
    images with 1-15 boxes of 80 classes, 100 noisy or random detections per image; the twelve numbers must agree."""
    import contextlib, io, json, os, random, tempfile  # noqa: E401
    import evaluate
    rng = random.Random(0)
    images, anns, dets = [], [], []
    for i in range(1, args.images + 1):
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480})
        for _ in range(rng.randint(1, 15)):
            w, h = rng.uniform(4, 300), rng.uniform(4, 300)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": rng.randint(1, 80), "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": int(rng.random() < 0.01)})
    for a in anns:
        for _ in range(3):
            x, y, w, h = a["bbox"]
            dets.append({"image_id": a["image_id"], "category_id": a["category_id"], "score": rng.random(),
                         "bbox": [x + rng.gauss(0, w / 8), y + rng.gauss(0, h / 8), w * rng.uniform(.8, 1.2), h * rng.uniform(.8, 1.2)]})
    while len(dets) < 100 * args.images:
        dets.append({"image_id": rng.randint(1, args.images), "category_id": rng.randint(1, 80), "score": rng.random(),
                     "bbox": [rng.uniform(0, 600), rng.uniform(0, 440), rng.uniform(4, 200), rng.uniform(4, 200)]})
    ann_file = os.path.join(tempfile.mkdtemp(), "instances.json")
    with open(ann_file, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in range(1, 81)]}, f)
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    chosen = evaluate.coco_evaluator()
    results = {}

    def run(ev):
        with contextlib.redirect_stdout(io.StringIO()):
            results[ev[0]] = evaluate.coco_stats(ann_file, dets, ev)
    ref = ("pycocotools", COCO, COCOeval)
    t_ref, t_ours = median_times([lambda: run(ref), lambda: run(chosen)], torch.device("cpu"), args.repeats, warmup=0)
    same = results["pycocotools"] == results[chosen[0]]
    print(f"{args.images} images, {len(anns)} boxes, {len(dets)} detections; AP {results['pycocotools']['AP']:.4f}")
    print_table(["evaluator", "seconds", "ratio to pycocotools", "12 numbers"], [
        ["pycocotools", f"{t_ref:.2f}", "1.00", "reference"],
        [chosen[0], f"{t_ours:.2f}", f"{t_ours / t_ref:.3f}", "identical" if same else "DIFFERENT"]])


# --------------------------------------------------------------------------------------------------- startup
# COCO 2017's 80 category ids: 1..90 with ten gaps, as in instances_train2017.json.
COCO_CAT_IDS = [c for c in range(1, 91) if c not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def make_coco_sized(root, split, num_images, num_boxes, polygons, pool=2000, seed=0):
    """root/annotations/instances_{split}.json shaped like COCO 2017's train json: num_images images (sparse ids up
    to 581929 in shuffled order, COCO's per-image fields), num_boxes annotations on all but 0.86% of them (1.06%
    crowd with RLE counts, some boxes under a pixel that training drops), COCO's 80 category ids; segmentation
    empty, or with `polygons` one polygon of 6-40 points each, COCO's mean size (the json is then ~450 MB, as
    COCO's 448 MB). The images are `pool` small JPEGs in root/pool behind one symlink per file name in
    root/{split}, their json sizes the files' own. Written once: the json comes last, so absent means not done."""
    import json
    import os

    import numpy as np
    from PIL import Image

    ann_file = os.path.join(root, "annotations", f"instances_{split}.json")
    if os.path.isfile(ann_file):
        return ann_file
    for sub in ("annotations", "pool", split):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    sizes = np.random.default_rng(seed).integers(48, 129, (pool, 2))  # (w, h) of each pool JPEG
    for k, (w, h) in enumerate(sizes.tolist()):
        path = os.path.join(root, "pool", f"{k}.jpg")
        if not os.path.isfile(path):
            pixels = np.random.default_rng([seed, k]).integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path + ".tmp.jpg", quality=75)
            os.replace(path + ".tmp.jpg", path)
    rng = np.random.default_rng([seed, num_images])
    ids = rng.choice(581929, num_images, replace=False) + 1
    which = rng.integers(0, pool, num_images)
    for img_id, k in zip(ids.tolist(), which.tolist()):
        link = os.path.join(root, split, f"{img_id:012d}.jpg")
        if not os.path.lexists(link):
            os.symlink(os.path.join("..", "pool", f"{k}.jpg"), link)
    images = [f'{{"license": {1 + i % 8}, "file_name": "{i:012d}.jpg", "coco_url": "http://images.cocodataset.org/'
              f'train2017/{i:012d}.jpg", "height": {sizes[k, 1]}, "width": {sizes[k, 0]}, "date_captured": '
              f'"2013-11-14 11:18:45", "flickr_url": "http://farm4.staticflickr.com/3153/2970773875_164f0c0b83_z.jpg",'
              f' "id": {i}}}' for i, k in zip(ids.tolist(), which.tolist())]
    img_of = rng.choice(np.flatnonzero(rng.random(num_images) >= 0.0086), num_boxes)
    iw, ih = sizes[which[img_of], 0], sizes[which[img_of], 1]
    bw, bh = iw * rng.uniform(0.005, 0.9, num_boxes), ih * rng.uniform(0.005, 0.9, num_boxes)
    x, y = rng.random(num_boxes) * (iw - bw), rng.random(num_boxes) * (ih - bh)
    crowd = rng.random(num_boxes) < 0.0106
    cats = rng.choice(COCO_CAT_IDS, num_boxes)
    shapes = (["[[" + ", ".join(f"{v:.2f}" for v in rng.uniform(0, 640, 2 * rng.integers(6, 41))) + "]]"
               for _ in range(5000)] if polygons else ["[]"])
    shape_of = rng.integers(0, len(shapes), num_boxes)
    rle = '{"counts": [' + ", ".join(map(str, rng.integers(1, 500, 60).tolist())) + '], "size": [%d, %d]}'
    fmt = ('{"segmentation": %s, "area": %.2f, "iscrowd": %d, "image_id": %d, "bbox": [%.2f, %.2f, %.2f, %.2f], '
           '"category_id": %d, "id": %d}')
    tmp = ann_file + ".tmp"
    with open(tmp, "w") as f:
        f.write('{"info": {"description": "synthetic, shaped like COCO 2017 train", "version": "1.0", "year": 2017}, '
                '"licenses": [' + ", ".join(f'{{"url": "http://creativecommons.org/", "id": {i}, "name": "cc"}}'
                                            for i in range(1, 9)) + '], "images": [')
        f.write(", ".join(images))
        f.write('], "annotations": [')
        columns = [a.tolist() for a in (ids[img_of], iw, ih, bw, bh, x, y, crowd, cats, shape_of)]
        for start in range(0, num_boxes, 100000):
            f.write(", " if start else "")
            f.write(", ".join(fmt % (rle % (h, w) if c else shapes[s], bw_ * bh_, c, i, x_, y_, bw_, bh_, cat, 1 + j)
                              for j, (i, w, h, bw_, bh_, x_, y_, c, cat, s) in
                              enumerate(zip(*(col[start:start + 100000] for col in columns)), start)))
        f.write('], "categories": ' + json.dumps([{"supercategory": "thing", "id": c, "name": f"class{c}"}
                                                   for c in COCO_CAT_IDS]) + "}")
    os.replace(tmp, ann_file)
    return ann_file


def _memory_kib(pid, field):
    """One field of /proc/PID/smaps_rollup (Pss, Private_Dirty ...) in KiB; 0 once the process is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(root_pid):
    """The pids below root_pid in the process tree (children, their children ...), from /proc."""
    import os
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    out, todo = [], list(children.get(root_pid, []))
    while todo:
        out.append(todo.pop())
        todo += children.get(out[-1], [])
    return out


def _startup_cfg(args, split, *extra):
    import config
    return config.get("demo", [f"data_root={args.root}", f"train_split={split}", "min_size_train=(64,)",
                               "max_size_train=128", *extra], verbose=False)


def _startup_rank(args):
    """One torchrun rank: the training loader (dataset and sampler) as train.py builds it, then wait for the other
    ranks, so the monitor sees all of them holding their data at once. No model, no process group."""
    import os

    import data
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    t0 = time.perf_counter()
    loader = data.make_train_loader(_startup_cfg(args, args.as_rank, "num_workers=0", f"ims_per_batch={world}"),
                                    rank, world)
    with open(os.path.join(args.marks, str(rank)), "w") as f:
        f.write(f"{time.perf_counter() - t0:.2f}")
    deadline = time.time() + 900
    while len(os.listdir(args.marks)) < world and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    del loader


def _startup_peak(args, split):
    """Peak summed Pss (GiB) of the ranks of `torchrun --nproc_per_node args.ranks` building the training loader
    of `split`, sampled every 20 ms (the torchrun agent not counted), and the slowest rank's build time."""
    import os
    import subprocess
    import sys
    import tempfile

    marks = tempfile.mkdtemp(prefix="marks", dir=args.root)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}",
           __file__, "startup", "--root", args.root, "--as-rank", split, "--marks", marks]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, sum(_memory_kib(pid, "Pss") for pid in _descendants(proc.pid)))
        time.sleep(0.02)
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"bench startup: torchrun failed ({proc.returncode}):\n{out[-3000:]}")
    build = max(float(open(os.path.join(marks, name)).read()) for name in os.listdir(marks))
    return peak / 2 ** 20, build


def _startup_loader(args):
    """Child process: the training loader of args.as_loader with args.workers workers; prints each worker's
    Private_Dirty (KiB) as it starts (just forked: whatever it copies later counts), after args.batches batches,
    and after a few more in which each worker first reads every image's entry (boxes, labels, size, path) once and
    runs one full gc.collect(), as json. That is what a long run's workers end up doing: epochs read every entry,
    and a full collection writes to every tracked Python object it visits."""
    import gc
    import json
    import multiprocessing

    import data
    full_gc, collected = multiprocessing.Value("b", 0, lock=False), []  # shared flag; a per-process list
    getitem = data.CocoDetection.__getitem__

    def getitem_then_collect(self, key):
        if full_gc.value and not collected:
            for i in range(len(self)):
                self.boxes[i], self.labels[i], self.sizes[i], self.path(i)
            collected.append(gc.collect())
        return getitem(self, key)
    data.CocoDetection.__getitem__ = getitem_then_collect  # before the workers fork, so they run it
    cfg = _startup_cfg(args, args.as_loader, f"num_workers={args.workers}", "ims_per_batch=2")
    batches = iter(data.make_train_loader(cfg))
    pids = [w.pid for w in batches._workers]  # torch's worker processes (DataLoader internals, for measuring)
    kib = {"start": [_memory_kib(pid, "Private_Dirty") for pid in pids]}
    for _ in range(args.batches):
        next(batches)
    kib["batches"] = [_memory_kib(pid, "Private_Dirty") for pid in pids]
    full_gc.value = 1
    for _ in range(4 * args.workers + 4):  # past the batches prefetched before the flag was set
        next(batches)
    kib["gc"] = [_memory_kib(pid, "Private_Dirty") for pid in pids]
    print(json.dumps(kib))


def _worker_growth(args, split):
    """Each loader worker's Private_Dirty growth (MiB) from its start over args.batches batches of `split`, and
    after one full garbage collection in each."""
    import json
    import subprocess
    import sys
    cmd = [sys.executable, __file__, "startup", "--root", args.root, "--as-loader", split, "--workers",
           str(args.workers), "--batches", str(args.batches)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"bench startup: the loader failed:\n{out.stdout[-2000:]}{out.stderr[-3000:]}")
    kib = json.loads(out.stdout.strip().splitlines()[-1])
    return [[(b - a) / 1024 for a, b in zip(kib["start"], kib[k])] for k in ("batches", "gc")]


def bench_startup(args):
    """Host memory and time of building the training data on a COCO-2017-sized synthetic json against a small one
    (make_coco_sized): (a) peak summed Pss of --ranks torchrun ranks building the loader at once, with the index
    cache cold and warm; (b) each loader worker's Private_Dirty growth from its start over --batches batches;
    (c) building the training dataset, cache cold and warm, against pycocotools' own COCO(json) load, alternating,
    median of --repeats. The cache goes to ROOT/cache (FRCNN_DATA_CACHE), emptied for each cold run; the warm rows
    are left out when the data.py under test writes no cache (run from an older checkout, for a before/after)."""
    import contextlib
    import io
    import os
    import shutil
    import subprocess
    import tempfile

    args.root = args.root or os.path.join(tempfile.gettempdir(), "frcnn_bench_startup" + "_polygons" * args.polygons)
    if args.as_rank:
        return _startup_rank(args)
    if args.as_loader:
        return _startup_loader(args)
    import data
    from pycocotools.coco import COCO
    cache = os.environ["FRCNN_DATA_CACHE"] = os.path.join(args.root, "cache")
    big, small = f"train{args.images}", f"train{args.small}"
    t0 = time.perf_counter()
    for split, n in ((big, args.images), (small, args.small)):
        make_coco_sized(args.root, split, n, args.boxes * n // args.images, args.polygons)
    sizes = {s: os.path.getsize(os.path.join(args.root, "annotations", f"instances_{s}.json")) for s in (big, small)}
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, {load}; data {args.root} ready in "
          f"{time.perf_counter() - t0:.0f} s: {big} {sizes[big] / 2 ** 20:.0f} MiB json, {small} "
          f"{sizes[small] / 2 ** 20:.1f} MiB json, segmentation {'polygons' if args.polygons else 'empty'}")
    rows = []
    for state in ("cold", "warm") if "startup" in args.only else ():
        if state == "warm" and not os.path.isdir(cache):
            break  # the code under test wrote no index (it has no cache): warm is cold again
        peaks = {}
        for split in (small, big):
            if state == "cold":
                shutil.rmtree(cache, ignore_errors=True)
            peaks[split] = _startup_peak(args, split)
        (a, ta), (b, tb) = peaks[small], peaks[big]
        rows.append([f"{args.ranks} ranks' startup, peak summed Pss GiB, cache {state}", f"{a:.2f}", f"{b:.2f}",
                     f"{b - a:+.2f}", "<= +2"])
        rows.append([f"{args.ranks} ranks' startup, slowest rank's loader s, cache {state}", f"{ta:.1f}", f"{tb:.1f}",
                     f"{tb - ta:+.1f}", "-"])
    if "workers" in args.only:
        growth = {split: _worker_growth(args, split) for split in (small, big)}
        for k, what in enumerate((f"{args.batches} batches", f"{args.batches} batches, every entry read, full gc")):
            a, b = max(growth[small][k]), max(growth[big][k])
            rows.append([f"loader worker Private_Dirty growth MiB, {what}, worst of {args.workers}", f"{a:.1f}",
                         f"{b:.1f}", f"{b - a:+.1f}", "<= +10"])
        print("each worker's growth MiB (300 batches; then every entry read + a full gc): " + "; ".join(
            f"{split}: " + ", ".join(f"{x:.1f}" for x in growth[split][0]) + "; " +
            ", ".join(f"{x:.1f}" for x in growth[split][1]) for split in (small, big)))
    cfg = _startup_cfg(args, big)

    def coco():
        with contextlib.redirect_stdout(io.StringIO()):
            COCO(os.path.join(args.root, "annotations", f"instances_{big}.json"))

    def cold():
        shutil.rmtree(cache, ignore_errors=True)
        data.CocoDetection(args.root, big, cfg, train=True)

    def warm():
        data.CocoDetection(args.root, big, cfg, train=True)
    if "build" in args.only:
        t_coco, t_cold = median_times([coco, cold], torch.device("cpu"), args.repeats, warmup=0)
        rows.append([f"pycocotools COCO(json) s, {big}", "-", f"{t_coco:.1f}", "-", "-"])
        rows.append([f"training dataset build s, cache cold, {big}", "-", f"{t_cold:.1f}", f"{t_cold - t_coco:+.1f}",
                     "<= COCO + 2"])
        if os.path.isdir(cache):  # the code under test keeps an index: a second build maps it
            t_warm = median_times([warm], torch.device("cpu"), args.repeats, warmup=0)[0]
            rows.append([f"training dataset build s, cache warm, {big}", "-", f"{t_warm:.1f}",
                         f"{t_warm - t_coco:+.1f}", "-"])
    print_table(["measurement", small, big, "big - small", "target"], rows)
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


def _startup_options(p):
    p.add_argument("--polygons", action="store_true", help="polygon segmentation of COCO's size (a ~450 MB json)")
    p.add_argument("--root", help="where the synthetic data goes (default: a folder in the temp dir, kept for reuse)")
    p.add_argument("--ranks", type=int, default=8, help="torchrun processes (default 8)")
    p.add_argument("--workers", type=int, default=2, help="loader worker processes (default 2)")
    p.add_argument("--batches", type=int, default=300, help="batches of 2 images the workers load (default 300)")
    p.add_argument("--images", type=int, default=118287, help="images in the big json (default COCO 2017 train's)")
    p.add_argument("--boxes", type=int, default=860001, help="annotations in the big json (default COCO 2017's)")
    p.add_argument("--small", type=int, default=2000, help="images in the small json (default 2000)")
    p.add_argument("--only", default="startup,workers,build", type=lambda s: s.split(","),
                   help="comma-separated parts to run: startup (a), workers (b), build (c) (default all)")
    p.add_argument("--as-rank", help=argparse.SUPPRESS)  # internal: a torchrun rank building this split
    p.add_argument("--as-loader", help=argparse.SUPPRESS)  # internal: the loader child process on this split
    p.add_argument("--marks", help=argparse.SUPPRESS)


# ------------------------------------------------------------------------------------------------- main
SUBCOMMANDS = {  # name -> (function, help, function adding its own options)
    "ops": (bench_ops, "NMS and ROIAlign: ours against torchvision's", lambda p: None),
    "data": (bench_data, "training data pipeline: images per second per worker on coco_tiny", _data_options),
    "eval": (bench_eval, "COCO evaluation: pycocotools against the evaluator in use, same numbers",
             lambda p: p.add_argument("--images", type=int, default=5000, help="synthetic images (default 5000)")),
    "model": (bench_model, "Faster R-CNN R-50-FPN inference and training: ours against torchvision's", _model_options),
    "startup": (bench_startup, "host memory and time of building the training data, COCO-2017-sized json against "
                               "a 2,000-image one", _startup_options),
    "grid": (bench_grid, "accelerators: models x batches x precisions against torchvision, TFLOP/s", _grid_options),
    "syncs": (bench_syncs, "host synchronisations per forward, before and after", _syncs_options),
    "fidelity": (bench_fidelity, "the same weights on the CPU and the device: detections matched", _fidelity_options),
    "trainloop": (bench_trainloop, "train.py on real images, the real loader: img/s, data wait", _trainloop_options),
    "profile": (bench_profile, "torch.profiler: top ops and device busy share", _profile_options),
    "extras": (bench_extras, "fused SGD, channels_last, torch.compile of the backbone", _extras_options),
    "gpu": (bench_gpu, "every accelerator figure in one call, summary last (the device check)", _gpu_options),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, help_text, add_options) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mlu, ... (default cpu)")
        p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement; the median is shown")
        p.add_argument("--hw", default="", help="synthetic image size h,w (default 800,1216; smaller for dry runs)")
        add_options(p)
        p.set_defaults(func=fn)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.hw:
        global IMAGE_HW
        IMAGE_HW = tuple(int(v) for v in args.hw.split(","))
    args.func(args)


if __name__ == "__main__":
    main()
