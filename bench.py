"""Benchmarks, one subcommand each; every number is the median of --repeats timed runs after one warm-up.

    python bench.py ops                   # our NMS / ROIAlign against torchvision's, with the ratio ours/tv
    python bench.py ops --repeats 9 --device cpu
    python bench.py data                  # training data pipeline on coco_tiny: img/s per worker, ours/tv
    python bench.py eval --repeats 3      # pycocotools against the evaluator in use, on 5000 synthetic images

To add a subcommand (model, data, eval): write `bench_<name>(args)` and register it in `SUBCOMMANDS` with a
function that adds its own options to its subparser; --device and --repeats are shared.
"""
import argparse
import math
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


def _model_runner(case, device):
    """A closure running one inference (batch 1) or one training iteration (batch 2, SGD step included) of the
    case on upstream-sized inputs (800x1216, 5 boxes per image), and its batch size."""
    what, impl, preset = MODEL_CASES[case]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    n = 1 if what == "inference" else 2
    h, w = IMAGE_HW
    xy = torch.rand(n, 5, 2, generator=gen) * torch.tensor([w - 300.0, h - 300.0])
    boxes = torch.cat([xy, xy + torch.rand(n, 5, 2, generator=gen) * 250 + 20], 2).to(device)
    labels = torch.randint(1, 81, (n, 5), generator=gen).to(device)
    images = torch.rand(n, 3, h, w, generator=gen).to(device)
    targets = [{"boxes": b, "labels": l} for b, l in zip(boxes, labels)]
    if impl == "ours":
        import config
        import model
        net = model.build_model(config.get(preset, ["device=" + device.type], verbose=False)).to(device)
        x, sizes = images * 255 - 128, [IMAGE_HW] * n  # stands in for data.py's output; preprocessing not timed
        step = (lambda: net(x, sizes)) if what == "inference" else (lambda: net(x, sizes, targets))
    else:
        import torchvision
        # weights_backbone=None too: the default would download ImageNet weights. Its resize/normalise runs
        # inside the model and is timed with it (800x1216 is already its target size).
        net = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).to(device)
        x = list(images)
        step = (lambda: net(x)) if what == "inference" else (lambda: net(x, targets))
    if what == "inference":
        net.eval()

        def run():
            with torch.inference_mode():
                step()
        return run, n
    net.train()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def run():
        loss = sum(step().values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return run, n


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
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, help_text, add_options) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mlu, ... (default cpu)")
        p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement; the median is shown")
        add_options(p)
        p.set_defaults(func=fn)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    args.func(args)


if __name__ == "__main__":
    main()
