"""What the benchmark subcommands share (bench.py, bench_accel.py, bench_memory.py): the shared command-line
flags, timing, tables, and the synthetic batches, networks and steps they time. It imports none of the tools, so
each of them imports it and bench.py, the command line, imports them all.

    times = median_times([fn_a, fn_b], device, repeats)    # seconds, median of repeats after a warm-up
    net = build_net("ours", "R-50-FPN", device, hw)         # or "torchvision", "tv-frozen"
    step = make_step("ours", net, "training", 2, device, hw)  # one timed call: forward, backward, SGD step
"""
import argparse
import contextlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the product, at the repository root
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train.py and evaluate.py run (see train.py)
import torch  # noqa: E402

import launch  # noqa: E402

IMAGE_HW = (800, 1216)  # upstream's test-size image, padded to a multiple of 32
DRY_HW = (128, 192)  # `bench.py gpu --dry-run` without --hw


def parse_hw(text):
    """(h, w) of --hw "h,w"; an argparse error (exit 2, one line) unless both are positive multiples of 32, the
    FPN's coarsest stride, as the padded batches the model sees."""
    try:
        h, w = (int(v) for v in text.split(","))
    except ValueError:
        h = w = 0
    if h <= 0 or w <= 0 or h % 32 or w % 32:
        raise argparse.ArgumentTypeError(f"{text!r} is not two positive multiples of 32 such as 800,1216")
    return h, w


def add_shared_options(p, names):
    """The flags several subcommands take, those of `names` ("device", "repeats", "hw"); a subcommand takes only
    the ones it uses, so none is accepted and then ignored."""
    if "device" in names:
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mlu, ... (default cpu)")
    if "repeats" in names:
        p.add_argument("--repeats", type=int, help="timed runs per measurement; the median is shown (default 5; "
                                                   "1 with gpu --dry-run)")
    if "hw" in names:
        p.add_argument("--hw", type=parse_hw, help="image size h,w, multiples of 32: synthetic batches, or the "
                                                   "min/max resize sizes on real images (default 800,1216 synthetic, "
                                                   "the preset's sizes on real images; gpu --dry-run 128,192)")


def size_overrides(hw):
    """Config overrides resizing real images as --hw says: the short side to min(hw), the long one at most max(hw),
    in training and at test; none without --hw (the preset's sizes)."""
    if not hw:
        return []
    short, long = min(hw), max(hw)
    return [f"min_size_train=({short},)", f"max_size_train={long}", f"min_size_test={short}", f"max_size_test={long}"]


def median_times(fns, device, repeats, warmup=1):
    """Median wall time in seconds of each fn in fns, synchronising the device around each run. The fns run in
    turn within each repeat, so load from other processes on a shared machine hits all of them alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            launch.synchronize(device)
            t0 = time.perf_counter()
            fn()
            launch.synchronize(device)
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def print_table(header, rows):
    """Prints rows (lists of cells) under header, the first column left-aligned and the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    for i, r in enumerate([header] + rows):
        print("  ".join(str(c).ljust(w) if j == 0 else str(c).rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def synthetic_batch(n, device, hw, seed=0):
    """(images (n, 3, h, w) in [0, 1), targets of 5 boxes and labels 1..80 each) on device. Box sides are 20-270
    pixels at upstream's 800-pixel short side, scaled with the short side of hw, so every box lies in the image."""
    gen = torch.Generator().manual_seed(seed)
    h, w = hw
    s = min(h, w) / IMAGE_HW[0]
    xy = torch.rand(n, 5, 2, generator=gen) * torch.tensor([w - 300.0 * s, h - 300.0 * s])
    boxes = torch.cat([xy, xy + (torch.rand(n, 5, 2, generator=gen) * 250 + 20) * s], 2).to(device)
    labels = torch.randint(1, 81, (n, 5), generator=gen).to(device)
    images = torch.rand(n, 3, h, w, generator=gen).to(device)
    return images, [{"boxes": b, "labels": l} for b, l in zip(boxes, labels)]


def build_net(impl, preset, device, hw, overrides=(), module=None):
    """impl "ours" (model.py, or `module`: another model.py such as the previous commit's), "torchvision" (the
    fasterrcnn_resnet50_fpn builder without weights: trainable BatchNorm, all layers trainable) or "tv-frozen"
    (FasterRCNN on resnet_fpn_backbone(preset's ResNet) with FrozenBatchNorm2d and layers 2-4 trainable, as
    torchvision trains from ImageNet weights and as upstream freezes; the only torchvision R-101 Faster R-CNN).
    hw: the synthetic images' size, which torchvision's own resize is told to keep."""
    torch.manual_seed(0)
    if impl == "ours":
        import config
        import model
        cfg = config.get(preset, ["device=" + device.type, *overrides], verbose=False)
        return (module or model).build_model(cfg).to(device)
    from torchvision.models.detection import FasterRCNN, fasterrcnn_resnet50_fpn
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    # torchvision scales the short side to min_size unless the long one would pass max_size: both at hw, scale 1
    size = dict(min_size=min(hw), max_size=max(1333, *hw))
    if impl == "torchvision":  # weights_backbone=None too: the default would download ImageNet weights
        return fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, **size).to(device)
    name = {"R-50-FPN": "resnet50", "R-101-FPN": "resnet101"}[preset]
    return FasterRCNN(resnet_fpn_backbone(backbone_name=name, weights=None, trainable_layers=3), 91, **size).to(device)


def make_step(impl, net, what, n, device, hw, precision=None):
    """A closure running one inference (inference mode) or one training iteration (SGD step included) of net on
    synthetic_batch(n, device, hw). precision: a dict whose "autocast" entry (None or a dtype) is read at each call.
    Ours gets data.py's kind of input (BGR-255 minus a mean; preprocessing not timed); torchvision's
    resize/normalise runs inside its model and is timed with it (build_net told it to keep hw)."""
    precision = precision if precision is not None else {"autocast": None}
    images, targets = synthetic_batch(n, device, hw)
    if impl == "ours":
        x, sizes = images * 255 - 128, [tuple(hw)] * n
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
