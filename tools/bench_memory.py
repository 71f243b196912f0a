"""Host memory and time of building the training data at COCO 2017's size, a subcommand of bench.py
(`python tools/bench.py startup [--polygons] [--ranks 8]`): the summed Pss of the ranks at startup and each loader
worker's private growth, for a COCO-sized json against a 2,000-image one, and the build time against
pycocotools' own load.
"""
import bench_common  # noqa: F401  first: it sets OMP_WAIT_POLICY before torch loads and finds the product
import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

import data  # noqa: E402
import launch  # noqa: E402
from bench_common import print_table  # noqa: E402


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

    import evaluate

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
            launch.atomic_write(path, lambda f: Image.fromarray(pixels).save(f, format="JPEG", quality=75))
    rng = np.random.default_rng([seed, num_images])
    ids = rng.choice(max(581929, 2 * num_images), num_images, replace=False) + 1  # COCO's range while it holds
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
    cats = rng.choice(evaluate.COCO_IDS, num_boxes)
    shapes = (["[[" + ", ".join(f"{v:.2f}" for v in rng.uniform(0, 640, 2 * rng.integers(6, 41))) + "]]"
               for _ in range(5000)] if polygons else ["[]"])
    shape_of = rng.integers(0, len(shapes), num_boxes)
    rle = '{"counts": [' + ", ".join(map(str, rng.integers(1, 500, 60).tolist())) + '], "size": [%d, %d]}'
    fmt = ('{"segmentation": %s, "area": %.2f, "iscrowd": %d, "image_id": %d, "bbox": [%.2f, %.2f, %.2f, %.2f], '
           '"category_id": %d, "id": %d}')

    def write(f):
        f.write('{"info": {"description": "synthetic, shaped like COCO 2017 train", "version": "1.0", "year": 2017}, '
                '"licenses": [' + ", ".join(f'{{"url": "http://creativecommons.org/", "id": {i}, "name": "cc"}}'
                                            for i in range(1, 9)) + '], "images": [')
        f.write(", ".join(images))
        f.write('], "annotations": [')
        columns = (ids[img_of], iw, ih, bw, bh, x, y, crowd, cats, shape_of)
        for start in range(0, num_boxes, 100000):  # Python objects for 100,000 boxes at a time, not 25M
            f.write(", " if start else "")
            f.write(", ".join(fmt % (rle % (h, w) if c else shapes[s], bw_ * bh_, c, i, x_, y_, bw_, bh_, cat, 1 + j)
                              for j, (i, w, h, bw_, bh_, x_, y_, c, cat, s) in
                              enumerate(zip(*(col[start:start + 100000].tolist() for col in columns)), start)))
        f.write('], "categories": ' + json.dumps([{"supercategory": "thing", "id": c, "name": f"class{c}"}
                                                   for c in evaluate.COCO_IDS]) + "}")
    launch.atomic_write(ann_file, write, mode="w")
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
           os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py"), "startup", "--root", args.root,
           "--as-rank", split, "--marks", marks]
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
    """Child process: the training loader of args.as_loader with args.workers workers started by args.start_method;
    prints as json each worker's Private_Dirty (KiB) once it runs (under fork as it starts: whatever it copies later
    counts; under forkserver and spawn after its first batch, when it has unpickled the dataset), after args.batches
    batches, and after a few more in which each worker first reads every image's entry (boxes, labels, size, path)
    once and runs one full gc.collect(); and the dataset's pickle in bytes (what forkserver and spawn send each
    worker). That is what a long run's workers end up doing: epochs read every entry, and a full collection writes
    to every tracked Python object it visits."""
    import json
    import multiprocessing
    import pickle

    multiprocessing.set_start_method(args.start_method, force=True)
    flag = os.path.join(args.root, f"gc_flag_{os.getpid()}")
    data.CocoDetection = FullGcDataset  # what make_train_loader builds: workers run it
    cfg = _startup_cfg(args, args.as_loader, f"num_workers={args.workers}", "ims_per_batch=2")
    loader = data.make_train_loader(cfg)
    loader.dataset.gc_flag = flag
    pickled = len(pickle.dumps(loader.dataset))
    batches = iter(loader)
    pids = [w.pid for w in batches._workers]  # torch's worker processes (DataLoader internals, for measuring)
    for _ in range(0 if args.start_method == "fork" else args.workers):
        next(batches)
    kib = {"start": [_memory_kib(pid, "Private_Dirty") for pid in pids], "pickle": pickled}
    for _ in range(args.batches):
        next(batches)
    kib["batches"] = [_memory_kib(pid, "Private_Dirty") for pid in pids]
    open(flag, "w").close()
    for _ in range(4 * args.workers + 4):  # past the batches prefetched before the flag was set
        next(batches)
    kib["gc"] = [_memory_kib(pid, "Private_Dirty") for pid in pids]
    os.remove(flag)
    print(json.dumps(kib))


class FullGcDataset(data.CocoDetection):
    """data.CocoDetection whose items, once the file named by its gc_flag exists, first read every entry and run one
    full collection (once per process). A class of this module, so spawned workers unpickle it too."""
    collected = False

    def __getitem__(self, key):
        if not FullGcDataset.collected and os.path.exists(self.gc_flag):
            import gc
            for i in range(len(self)):
                self.boxes[i], self.labels[i], self.sizes[i], self.path(i)
            FullGcDataset.collected = gc.collect() or True
        return super().__getitem__(key)


def _child(args, *extra):
    """The last line of `bench.py startup --root ROOT *extra` run in a child process, as json."""
    import json
    import subprocess
    import sys
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py"), "startup",
           "--root", args.root, *extra]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"bench startup: {' '.join(extra)} failed:\n{out.stdout[-2000:]}{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _worker_growth(args, split, method):
    """Each loader worker's Private_Dirty growth (MiB) from its start over args.batches batches of `split`, and
    after one full garbage collection in each, its Private_Dirty (MiB) at the start, the dataset's pickle (MiB)."""
    kib = _child(args, "--as-loader", split, "--workers", str(args.workers), "--batches", str(args.batches),
                 "--start-method", method)
    return [[(b - a) / 1024 for a, b in zip(kib["start"], kib[k])] for k in ("batches", "gc")] + [
        [a / 1024 for a in kib["start"]], kib["pickle"] / 2 ** 20]


def _startup_build(args):
    """Child process: one build of the training dataset (args.as_build: pycocotools' COCO(json), ours with the
    index cache emptied first, or ours mapping the index), as json: seconds and this process's peak RSS (MiB)."""
    import contextlib
    import io
    import json
    import resource
    import shutil
    t0 = time.perf_counter()
    if args.as_build == "coco":
        from pycocotools.coco import COCO
        with contextlib.redirect_stdout(io.StringIO()):
            COCO(os.path.join(args.root, "annotations", f"instances_{args.split}.json"))
    else:  # an index folder of its own: the workers part's loaders may be mapping ROOT/cache meanwhile
        os.environ["FRCNN_DATA_CACHE"] = os.path.join(args.root, "cache_build")
        if args.as_build == "cold":
            shutil.rmtree(os.environ["FRCNN_DATA_CACHE"], ignore_errors=True)
            t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            data.CocoDetection(args.root, args.split, _startup_cfg(args, args.split), train=True)
    print(json.dumps({"s": time.perf_counter() - t0,
                      "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def bench_startup(args):
    """Host memory and time of building the training data on a COCO-2017-sized synthetic json against a small one
    (make_coco_sized): (a) peak summed Pss of --ranks torchrun ranks building the loader at once, with the index
    cache cold and warm; (b) each loader worker's Private_Dirty growth from its start over --batches batches;
    under each of --start-methods, and the dataset's pickle; (c) building the training dataset, cache cold and warm,
    against pycocotools' own COCO(json) load, each in its own process (its peak RSS reported), alternating, median
    of --repeats. The cache goes to ROOT/cache (FRCNN_DATA_CACHE), emptied for each cold run; the warm rows
    are left out when the data.py under test writes no cache (run from an older checkout, for a before/after)."""
    import shutil
    import subprocess
    import tempfile

    args.root = args.root or os.path.join(tempfile.gettempdir(), "frcnn_bench_startup" + "_polygons" * args.polygons)
    if args.as_rank:
        return _startup_rank(args)
    cache = os.environ["FRCNN_DATA_CACHE"] = os.path.join(args.root, "cache")
    if args.as_loader:
        return _startup_loader(args)
    if args.as_build:
        return _startup_build(args)
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
    for method in args.start_methods if "workers" in args.only else ():
        growth = {split: _worker_growth(args, split, method) for split in (small, big)}
        for k, what in enumerate((f"{args.batches} batches", f"{args.batches} batches, every entry read, full gc")):
            a, b = max(growth[small][k]), max(growth[big][k])
            rows.append([f"{method}: worker Private_Dirty growth MiB, {what}, worst of {args.workers}", f"{a:.1f}",
                         f"{b:.1f}", f"{b - a:+.1f}", "<= +10"])
        rows.append([f"{method}: worker Private_Dirty MiB once started, worst", f"{max(growth[small][2]):.0f}",
                     f"{max(growth[big][2]):.0f}", f"{max(growth[big][2]) - max(growth[small][2]):+.0f}", "-"])
        rows.append([f"training dataset pickled MiB (sent to each {method} worker)", f"{growth[small][3]:.3f}",
                     f"{growth[big][3]:.3f}", "-", "<= 16"])
        print(f"{method}: each worker's growth MiB ({args.batches} batches; then every entry read + a full gc): " +
              "; ".join(f"{split}: " + ", ".join(f"{x:.1f}" for x in growth[split][0]) + "; " +
                        ", ".join(f"{x:.1f}" for x in growth[split][1]) for split in (small, big)))
    if "build" in args.only:  # each build in its own process, so its peak RSS is its own; alternating, median
        runs = {how: [] for how in ("coco", "cold", "warm")}
        for _ in range(args.repeats):
            for how in runs:
                runs[how].append(_child(args, "--as-build", how, "--split", big))
        t, peak = ({how: statistics.median(r[key] for r in rs) for how, rs in runs.items()} for key in ("s", "peak"))
        rows.append([f"pycocotools COCO(json) s, {big}", "-", f"{t['coco']:.1f}", "-", "-"])
        rows.append([f"training dataset build s, cache cold, {big}", "-", f"{t['cold']:.1f}",
                     f"x{t['cold'] / t['coco']:.2f} of COCO", "<= x0.5"])
        rows.append([f"training dataset build s, cache warm, {big}", "-", f"{t['warm']:.1f}", "-", "<= 2"])
        for how, what in (("coco", "pycocotools COCO(json)"), ("cold", "build, cache cold"),
                          ("warm", "build, cache warm")):
            rows.append([f"{what}: its process's peak RSS GiB, {big}", "-", f"{peak[how] / 1024:.2f}", "-",
                         "<= 2" if how == "cold" else "-"])
    print_table(["measurement", small, big, "big - small", "target"], rows)
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


def _startup_options(p):
    p.add_argument("--polygons", action="store_true", help="polygon segmentation of COCO's size (a ~450 MB json)")
    p.add_argument("--root", help="where the synthetic data goes (default: a folder in the temp dir, kept for reuse)")
    p.add_argument("--ranks", type=int, default=8, help="torchrun processes (default 8)")
    p.add_argument("--workers", type=int, default=2, help="loader worker processes (default 2)")
    p.add_argument("--batches", type=int, default=300, help="batches of 2 images the workers load (default 300)")
    p.add_argument("--images", type=int, default=118287,
                   help="images in the big json (default COCO 2017 train's; any number)")
    p.add_argument("--boxes", type=int, default=860001, help="annotations in the big json (default COCO 2017's)")
    p.add_argument("--small", type=int, default=2000, help="images in the small json (default 2000)")
    p.add_argument("--only", default="startup,workers,build", type=lambda s: s.split(","),
                   help="comma-separated parts to run: startup (a), workers (b), build (c) (default all)")
    p.add_argument("--as-rank", help=argparse.SUPPRESS)  # internal: a torchrun rank building this split
    p.add_argument("--start-methods", default="fork,forkserver,spawn", type=lambda s: s.split(","),
                   help="the workers part under each of these start methods (default fork,forkserver,spawn)")
    p.add_argument("--as-loader", help=argparse.SUPPRESS)  # internal: the loader child process on this split
    p.add_argument("--start-method", help=argparse.SUPPRESS)  # internal: the loader child's start method
    p.add_argument("--as-build", choices=["coco", "cold", "warm"], help=argparse.SUPPRESS)  # internal: one build
    p.add_argument("--split", help=argparse.SUPPRESS)  # internal: the build child's split
    p.add_argument("--marks", help=argparse.SUPPRESS)
