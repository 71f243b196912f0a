"""Benchmarks, one subcommand each; every number is the median of --repeats timed runs after one warm-up.

    python tools/bench.py ops                   # our NMS / ROIAlign against torchvision's, with the ratio ours/tv
    python tools/bench.py ops --repeats 9 --device cpu --hw 96,128
    python tools/bench.py model --repeats 3     # Faster R-CNN inference and training, ours against torchvision's
    python tools/bench.py data                  # training data pipeline on coco_tiny: img/s per worker, ours/tv
    python tools/bench.py eval --repeats 3      # pycocotools against the evaluator in use, on 5000 synthetic images
    python tools/bench.py export --repeats 3    # our ONNX file in ONNX Runtime against eager and torchvision's export
    python tools/bench.py eval --images 80000 --classes 365   # at Objects365 v2 val's size (bench_eval.py)
    python tools/bench.py gpu --device cuda --data datasets/coco_tiny --out gpu_check   # every accelerator figure
    python tools/bench.py gpu --device cpu --dry-run --hw 96,128 --out /tmp/gpu_dry   # the same code, tiny sizes
    python tools/bench.py grid --device cuda --models R-101-FPN --precisions bf16     # one part of it (also: syncs,
                                                # fidelity, trainloop, profile, extras; each writes --json)
    python tools/bench.py startup --polygons     # host memory of 8 ranks building COCO-2017-sized data
    python tools/bench.py startup --images 580000 --boxes 9700000 --only build,workers   # Objects365 v1's size

The shared flags: --device, --repeats and --hw (image size h,w), each given only to the subcommands that use it,
and passed on by `gpu` to every step that takes it. The accelerator suite lives in bench_accel.py, eval in
bench_eval.py, export in bench_export.py, startup in bench_memory.py, what they share in bench_common.py. To add
a subcommand: write `bench_<name>(args)` and register it in `subcommands()` with the shared flags it takes and a
function adding its own options.
"""
import bench_common as common  # first: it sets OMP_WAIT_POLICY before torch loads and finds the product
import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

import bench_accel  # noqa: E402
import bench_eval  # noqa: E402
import bench_export  # noqa: E402
import bench_memory  # noqa: E402
from bench_common import IMAGE_HW, build_net, make_step, median_times, print_table  # noqa: E402

FPN_LEVELS = [("P2", 1 / 4, 16, 112), ("P3", 1 / 8, 112, 224), ("P4", 1 / 16, 224, 448), ("P5", 1 / 32, 448, 800)]
# (name, spatial scale, min and max box side in pixels that upstream's LevelMapper sends to that level)


def overlapping_boxes(n, gen, hw, num_objects=None):
    """(n, 4) proposal-like boxes in an image of size hw: jittered copies around a few objects, so many pairs
    overlap at IoU > 0.7."""
    h, w = hw
    num_objects = num_objects or max(n // 50, 1)
    centre = torch.rand(num_objects, 2, generator=gen) * torch.tensor([w, h])
    size = torch.exp(torch.empty(num_objects, 2).uniform_(math.log(16), math.log(400), generator=gen))
    obj = torch.randint(num_objects, (n,), generator=gen)
    c = centre[obj] + torch.randn(n, 2, generator=gen) * size[obj] * 0.1
    s = size[obj] * torch.exp(torch.randn(n, 2, generator=gen) * 0.1)
    boxes = torch.cat([c - s / 2, c + s / 2], dim=1)
    return boxes.clamp(min=0).minimum(torch.tensor([w, h, w, h]) - 1.0)


def level_rois(n, images, lo, hi, gen, hw):
    """(n, 5) rois (image index, x1, y1, x2, y2) in the pixels of an image of size hw, sides in [lo, hi), spread
    over `images`."""
    h, w = hw
    side = torch.exp(torch.empty(n, 2).uniform_(math.log(lo), math.log(hi), generator=gen))
    x1 = torch.rand(n, generator=gen) * (w - side[:, 0]).clamp(min=1)
    y1 = torch.rand(n, generator=gen) * (h - side[:, 1]).clamp(min=1)
    idx = (torch.arange(n) * images // n).float()
    return torch.stack([idx, x1, y1, x1 + side[:, 0], y1 + side[:, 1]], dim=1)


def bench_ops(args):
    import torchvision

    import ops
    device, gen, hw = torch.device(args.device), torch.Generator().manual_seed(0), args.hw or IMAGE_HW
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, device {device}, "
          f"{torch.get_num_threads()} threads; ours = ops.{ops.backend_name(device)}, median of {args.repeats}; "
          f"image {hw[0]}x{hw[1]}")
    rows = []

    def same_nms(a, b, scores):  # equal scores may come out in another order from torchvision (its sort is unstable)
        return "same" if torch.equal(a.sort()[0], b.sort()[0]) and torch.equal(scores[a], scores[b]) else "DIFFERENT"

    def row(name, ours, theirs, check):
        a, b = (1e3 * x for x in median_times([ours, theirs], device, args.repeats))
        rows.append([name, f"{a:.2f}", f"{b:.2f}", f"{a / b:.2f}", check])

    # NMS at upstream's RPN threshold 0.7; batched over 80 classes at the box head's 0.5.
    for n in args.nms_boxes:
        boxes, scores = overlapping_boxes(n, gen, hw).to(device), torch.rand(n, generator=gen).to(device)
        same = same_nms(ops.nms(boxes, scores, 0.7), torchvision.ops.nms(boxes, scores, 0.7), scores)
        row(f"nms {n / 1000:g}k boxes, thr 0.7", lambda: ops.nms(boxes, scores, 0.7),
            lambda: torchvision.ops.nms(boxes, scores, 0.7), same)
    n = 16000
    boxes, scores = overlapping_boxes(n, gen, hw, num_objects=1000).to(device), torch.rand(n, generator=gen).to(device)
    labels = torch.randint(80, (n,), generator=gen).to(device)
    same = same_nms(ops.batched_nms(boxes, scores, labels, 0.5),
                    torchvision.ops.batched_nms(boxes, scores, labels, 0.5), scores)
    row("batched_nms 16k boxes, 80 classes, thr 0.5", lambda: ops.batched_nms(boxes, scores, labels, 0.5),
        lambda: torchvision.ops.batched_nms(boxes, scores, labels, 0.5), same)

    # ROIAlign, one row per FPN level with RoIs of the sizes upstream's LevelMapper sends there (the pooler
    # calls roi_align once per level): training 2 images x 512 RoIs forward + backward, test 1000 RoIs forward
    # (--rois).
    for name, scale, lo, hi in FPN_LEVELS:
        fh, fw = hw[0] * scale, hw[1] * scale
        for phase, images, k in (("train", 2, args.rois[0]), ("test", 1, args.rois[-1])):
            feat = torch.randn(images, 256, int(fh), int(fw), generator=gen).to(device)
            rois = level_rois(k, images, lo, hi, gen, hw).to(device)
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


def _ops_options(p):
    p.add_argument("--nms-boxes", default=[1000, 5000, 20000], type=lambda s: [int(v) for v in s.split(",")],
                   help="box counts of the NMS rows, comma-separated (default 1000,5000,20000)")
    p.add_argument("--rois", default=[1024, 1000], type=lambda s: [int(v) for v in s.split(",")],
                   help="RoIs of the training (2 images) and test (1 image) ROIAlign rows (default 1024,1000)")


MODEL_CASES = {  # name -> (what, implementation, preset)
    "ours-infer": ("inference", "ours", "R-50-FPN"), "tv-infer": ("inference", "torchvision", "R-50-FPN"),
    "ours-train": ("training", "ours", "R-50-FPN"), "tv-train": ("training", "torchvision", "R-50-FPN"),
    "r101-infer": ("inference", "ours", "R-101-FPN"),
}


def _model_runner(case, device, hw):
    """A closure running one inference (batch 1) or one training iteration (batch 2) of a MODEL_CASES case on
    images of size hw, and its batch size."""
    what, impl, preset = MODEL_CASES[case]
    n = 1 if what == "inference" else 2
    return make_step(impl, build_net(impl, preset, device, hw), what, n, device, hw), n


def _model_peak(args):
    """Child process: warm-up and one run of one case; prints its peak memory in MiB (process max RSS on cpu)."""
    import resource
    device = torch.device(args.device)
    run, _ = _model_runner(args.case, device, args.hw or IMAGE_HW)
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
    device, hw = torch.device(args.device), args.hw or IMAGE_HW
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, image {hw[0]}x"
          f"{hw[1]}, median of {args.repeats} after 1 warm-up, runs of ours and torchvision alternating; "
          f"torchvision = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)")
    peak = {}
    for case in MODEL_CASES:
        cmd = [sys.executable, __file__, "model", "--case", case, "--device", args.device, "--hw", f"{hw[0]},{hw[1]}"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"bench model: case {case} failed:\n{out.stderr[-3000:]}")
        peak[case] = float(out.stdout.strip().splitlines()[-1])
    rows = []
    for what, mode in (("inference", "infer"), ("training", "train")):
        (ours, n), (tv, _) = _model_runner(f"ours-{mode}", device, hw), _model_runner(f"tv-{mode}", device, hw)
        a, b = (t / n for t in median_times([ours, tv], device, args.repeats))
        rows.append([f"R-50-FPN {what}, batch {n}, s per image", f"{a:.3f}", f"{b:.3f}", f"{a / b:.2f}",
                     f"{peak[f'ours-{mode}']:.0f}", f"{peak[f'tv-{mode}']:.0f}"])
        del ours, tv
    r101, _ = _model_runner("r101-infer", device, hw)
    rows.append(["R-101-FPN inference, batch 1, s per image", f"{median_times([r101], device, args.repeats)[0]:.3f}",
                 "-", "-", f"{peak['r101-infer']:.0f}", "-"])
    mem = "peak MiB (process max RSS)" if device.type == "cpu" else "peak MiB (allocated)"
    print_table(["measurement", "ours", "torchvision", "ours/tv", f"ours {mem}", "torchvision"], rows)


def _model_options(p):
    p.add_argument("--case", choices=list(MODEL_CASES), help=argparse.SUPPRESS)  # internal: the child process


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

    root = args.data
    cfg = config.get(args.config, [f"data_root={root}", f"num_workers={args.workers}", "ims_per_batch=2",
                                   *common.size_overrides(args.hw)], verbose=False)
    ds = data.CocoDetection(root, cfg.train_split, cfg, train=True)  # data.MissingData names what is absent
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' progress lines
        tv = torchvision.datasets.CocoDetection(os.path.join(root, cfg.train_split), os.path.join(
            root, "annotations", f"instances_{cfg.train_split}.json"))
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
          f"long <= {cfg.max_size_train}), {root} {cfg.train_split} ({len(ds)} images), median of {args.repeats}")
    print_table(["measurement", "ours", "torchvision", "ours/tv"], [
        ["training pipeline, img/s per worker", f"{a:.1f}", f"{b:.1f}", f"{a / b:.2f}"],
        [f"loader, {args.workers} workers, batch 2, img/s total", f"{rate:.1f}", "-", "-"],
        ["loader, img/s per worker", f"{rate / max(1, args.workers):.1f}", "-", "-"]])


def _data_options(p):
    p.add_argument("--data", default="datasets/coco_tiny", help="COCO-layout folder (default datasets/coco_tiny)")
    p.add_argument("--config", default="R-101-FPN", help="preset whose input sizes to use (default R-101-FPN)")
    p.add_argument("--workers", type=int, default=2, help="loader worker processes (default 2)")


def subcommands():
    """name -> (function, help, the shared flags it takes (bench_common.add_shared_options), function adding its
    own options)."""
    a, m = bench_accel, bench_memory
    every = ("device", "repeats", "hw")
    return {
        "ops": (bench_ops, "NMS and ROIAlign: ours against torchvision's", every, _ops_options),
        "data": (bench_data, "training data pipeline: images per second per worker on coco_tiny", ("repeats", "hw"),
                 _data_options),
        "eval": (bench_eval.bench_eval, "COCO evaluation at any size: the evaluators, each in its own process, "
                 "same numbers; or the gather of the detections", ("repeats",), bench_eval.options),
        "export": (bench_export.bench_export, "ONNX export: our file and torchvision's in ONNX Runtime against eager, "
                   "on the CPU", ("repeats", "hw"), bench_export.options),
        "model": (bench_model, "Faster R-CNN R-50-FPN inference and training: ours against torchvision's", every,
                  _model_options),
        "startup": (m.bench_startup, "host memory and time of building the training data, COCO-2017-sized json "
                                     "against a 2,000-image one", ("repeats",), m._startup_options),
        "grid": (a.bench_grid, "accelerators: models x batches x precisions against torchvision, TFLOP/s", every,
                 a._grid_options),
        "syncs": (a.bench_syncs, "host synchronisations per forward, before and after", every, a._syncs_options),
        "fidelity": (a.bench_fidelity, "the same weights on the CPU and the device: detections matched",
                     ("device", "hw"), a._fidelity_options),
        "trainloop": (a.bench_trainloop, "train.py on real images, the real loader: img/s, data wait", ("device", "hw"),
                      a._trainloop_options),
        "profile": (a.bench_profile, "torch.profiler: top ops and device busy share", every, a._profile_options),
        "extras": (a.bench_extras, "fused SGD, channels_last, torch.compile of the backbone", every, a._extras_options),
        "gpu": (a.bench_gpu, "every accelerator figure in one call, summary last (the device check)", every,
                a._gpu_options),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, help_text, shared, add_options) in subcommands().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        common.add_shared_options(p, shared)
        add_options(p)
        p.set_defaults(func=fn)
    args = parser.parse_args(argv)
    if "repeats" in args:
        if args.repeats is None:
            args.repeats = 1 if getattr(args, "dry_run", False) else 5
        if args.repeats < 1:
            parser.error(f"--repeats must be >= 1, got {args.repeats}")
    args.func(args)


if __name__ == "__main__":
    import launch
    launch.run_cli(main)
