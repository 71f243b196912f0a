"""`bench.py eval`: the COCO metric at scale, each evaluator in its own process, and the gather of the detections.

    python tools/bench.py eval --repeats 3                       # 5,000 images x 100 detections, 80 classes
    flock /tmp/frcnn-bigmem.lock python tools/bench.py eval --images 80000 --classes 365 --repeats 1 \
        --runs hotcoco:array,hotcoco:records,faster-coco-eval:array,pycocotools:array   # Objects365 v2 val's size
    python tools/bench.py eval --images 80000 --gather 4         # 8M detections from 4 gloo ranks to rank 0

The problem is generated (numpy, seed 0), never read from disk: --images images of 1024x768 with 1 to
2 x --boxes - 1 ground-truth boxes (mean --boxes; Objects365 v2 val has ~14 per image) of --classes classes drawn
with Zipf frequencies (1/rank: a long tail, as Objects365 and LVIS), 1% crowd; --dets detections per image in the
model's output form (xyxy float32, label, score): 3 noisy copies of each ground-truth box, the rest random boxes
labelled half with one of the image's classes and half from the class frequencies.
A run is EVALUATOR:INPUT: the evaluator (hotcoco, faster-coco-eval, pycocotools) reads the detections as
evaluate.py's coco_array ("array": one (N, 7) float64 array, what evaluate_coco passes) or as coco_records' dicts
("records": what evaluate_coco passed before, and what most code hands pycocotools). Each run is a child process
under an address-space cap (--cap-gib): the time from the detections to the twelve numbers (building the input,
then evaluate.coco_eval: the json's load, evaluate, accumulate, summarize) and its peak RSS (ru_maxrss, the
detections' own ~300 MiB included). Every run's twelve numbers must equal the first pycocotools run's.
"""
import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from bench_common import print_table

W, H = 1024, 768


def make_problem(folder, images, classes, boxes, dets, seed=0):
    """Writes folder/instances.json and folder/dets.npz (per detection: image index, boxes xyxy, scores, labels)."""
    rng = np.random.default_rng(seed)
    freq = 1 / np.arange(1, classes + 1)
    freq /= freq.sum()
    n_gt = rng.integers(1, 2 * boxes, images)  # (images,)
    assert 3 * n_gt.max() <= dets, f"--dets {dets} cannot hold 3 copies of {n_gt.max()} boxes"
    img = np.repeat(np.arange(images), n_gt)  # (G,)
    cat = rng.choice(classes, len(img), p=freq) + 1
    wh = np.minimum(np.exp(rng.uniform(np.log(4), np.log(400), (len(img), 2))), [W - 1, H - 1])
    xy = rng.random((len(img), 2)) * ([W, H] - wh)
    crowd = rng.random(len(img)) < 0.01
    with open(os.path.join(folder, "instances.json"), "w") as f:
        json.dump({"images": [{"id": i + 1, "file_name": f"{i + 1}.jpg", "width": W, "height": H}
                              for i in range(images)],
                   "annotations": [{"id": k + 1, "image_id": int(i) + 1, "category_id": int(c), "bbox": [x, y, w, h],
                                    "area": w * h, "iscrowd": int(z)} for k, (i, c, (x, y), (w, h), z) in
                                   enumerate(zip(img, cat, xy.tolist(), wh.tolist(), crowd))],
                   "categories": [{"id": c, "name": f"class {c}"} for c in range(1, classes + 1)]}, f)
    copy = np.repeat(np.arange(len(img)), 3)  # 3 noisy copies of each box
    c_xy = xy[copy] + rng.normal(0, 1, (len(copy), 2)) * wh[copy] / 8
    c_wh = wh[copy] * rng.uniform(0.8, 1.2, (len(copy), 2))
    n_rand = dets - 3 * n_gt  # (images,)
    r_img = np.repeat(np.arange(images), n_rand)
    first = np.concatenate([[0], np.cumsum(n_gt)[:-1]])  # each image's first box
    own = cat[first[r_img] + (rng.random(len(r_img)) * n_gt[r_img]).astype(np.int64)]  # one of the image's classes
    r_cat = np.where(rng.random(len(r_img)) < 0.5, own, rng.choice(classes, len(r_img), p=freq) + 1)
    r_wh = np.exp(rng.uniform(np.log(4), np.log(300), (len(r_img), 2)))
    r_xy = rng.random((len(r_img), 2)) * np.maximum([W, H] - r_wh, 1)
    d_img = np.concatenate([img[copy], r_img])
    order = np.argsort(d_img, kind="stable")
    d_xy, d_wh = np.concatenate([c_xy, r_xy])[order], np.concatenate([c_wh, r_wh])[order]
    np.savez(os.path.join(folder, "dets.npz"), image=d_img[order],
             boxes=np.concatenate([d_xy, d_xy + d_wh - 1], 1).astype(np.float32),  # coco_records adds the 1 back
             scores=rng.random(len(order)).astype(np.float32), labels=np.concatenate([cat[copy], r_cat])[order])
    return int(n_gt.sum()), len(order)


def load_dets(folder):
    """predict's {index: {"boxes", "scores", "labels"}} of dets.npz."""
    d = dict(np.load(os.path.join(folder, "dets.npz")))  # read once: an NpzFile reads the array at every d[k]
    split = np.flatnonzero(np.diff(d["image"])) + 1
    cols = {k: np.split(d[k], split) for k in ("boxes", "scores", "labels")}
    return {int(d["image"][s]): {k: torch.from_numpy(v[n]) for k, v in cols.items()}
            for n, s in enumerate(np.concatenate([[0], split]))}


def evaluator(name):
    if name == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
        return name, COCO, COCOeval
    if name == "hotcoco":
        import hotcoco
        return name, hotcoco.COCO, hotcoco.COCOeval
    from faster_coco_eval import COCO, COCOeval_faster
    return name, COCO, COCOeval_faster


def child(args):
    """One run in this process: prints {"seconds", "input_s", "peak_gib", "stats"} as the last line."""
    import contextlib
    import io

    import evaluate
    name, kind = args.child.split(":")
    ev = evaluator(name)
    dets = load_dets(args.problem)
    ids = list(range(1, max(dets) + 2))  # image index i has id i + 1
    label_to_cat_id = {c: c for c in range(1, args.classes + 1)}
    use = resource.getrusage(resource.RUSAGE_SELF)
    cpu0, t0 = use.ru_utime + use.ru_stime, time.perf_counter()
    if kind == "array":
        results = evaluate.coco_array(dets, ids, label_to_cat_id)
    else:
        results = [{"image_id": ids[i], **r} for i in sorted(dets) for r in evaluate.coco_records(dets[i],
                                                                                                   label_to_cat_id)]
    t1 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        stats = evaluate.coco_stats(os.path.join(args.problem, "instances.json"), results, ev)
    t2 = time.perf_counter()
    use = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"seconds": t2 - t0, "input_s": t1 - t0, "cpu_s": use.ru_utime + use.ru_stime - cpu0,
                      "peak_gib": use.ru_maxrss / 2 ** 20, "stats": stats}))


def run_child(argv, cap_gib, timeout):
    """The last line of a child's output as json, or the reason it gave none."""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (int(cap_gib * 2 ** 30),) * 2)
    try:
        out = subprocess.run([sys.executable, os.path.abspath(sys.argv[0]), "eval", *argv], capture_output=True,
                             text=True, preexec_fn=cap, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"over the {timeout} s time cap"
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["(no message)"])[-1]
        return f"failed ({'over the %g GiB cap: ' % cap_gib if 'MemoryError' in out.stderr else ''}{last[:80]})"
    return json.loads(out.stdout.strip().splitlines()[-1])


def gather_rank(args):
    """One rank of --gather: its share of the detections to rank 0 through launch.gather_objects, packed (what
    predict sends) or as the {index: det} dict of tensors (before); rank 0 prints what it took."""
    import evaluate
    import launch
    rank, world = launch.env()[:2]
    dets = load_dets(args.problem)
    # the test loader's shards, each tensor its own, as the model returns them
    mine = {i: {k: v.clone() for k, v in d.items()} for i, d in dets.items() if i % world == rank}
    del dets
    launch.init_process_group(torch.device("cpu"), rank, world)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if args.gather_form == "packed":
        parts = launch.gather_objects(evaluate.pack(mine))
        merged = {i: d for p in parts for i, d in evaluate.unpack(p).items()} if parts else None
    else:
        parts = launch.gather_objects(mine)
        merged = {i: d for p in parts for i, d in p.items()} if parts else None
    t1 = time.perf_counter()
    if rank == 0:
        n = sum(len(d["scores"]) for d in merged.values())
        print(json.dumps({"seconds": t1 - t0, "detections": n, "images": len(merged), "peak_gib": resource.getrusage(
            resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, "before_gib": rss / 2 ** 20}))
    launch.finish(world)


def bench_gather(args, problem):
    rows = []
    for form in ("dict", "packed"):
        runs = []
        for _ in range(args.repeats):
            with socket.socket() as sock:  # a free port
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            procs = [subprocess.Popen([sys.executable, os.path.abspath(sys.argv[0]), "eval", "--gather-rank",
                                       "--gather-form", form, "--problem", problem], stdout=subprocess.PIPE,
                                      text=True, env=dict(os.environ, RANK=str(r), WORLD_SIZE=str(args.gather),
                                                          LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                                          MASTER_PORT=str(port))) for r in range(args.gather)]
            outs = [p.communicate()[0] for p in procs]
            assert all(p.returncode == 0 for p in procs), f"a rank failed: {[p.returncode for p in procs]}"
            runs.append(json.loads(outs[0].strip().splitlines()[-1]))
        r = runs[0]
        rows.append([f"{form}: {'predict' if form == 'packed' else 'before'}", f"{r['detections']:,}",
                     f"{statistics.median(x['seconds'] for x in runs):.2f}",
                     f"{max(x['before_gib'] for x in runs):.2f}", f"{max(x['peak_gib'] for x in runs):.2f}"])
    print(f"gather to rank 0 of {args.gather} gloo ranks (through the TCP store), median of {args.repeats}:")
    print_table(["what each rank sends", "detections", "seconds", "rank 0 RSS before GiB", "rank 0 peak GiB"], rows)


def bench_eval(args):
    if args.child:
        return child(args)
    if args.gather_rank:
        return gather_rank(args)
    folder = args.problem or tempfile.mkdtemp(prefix="bench_eval_")
    try:
        if args.problem and os.path.exists(os.path.join(folder, "dets.npz")):
            print(f"the problem generated before in {folder} (--images and the like as then)")
        else:
            os.makedirs(folder, exist_ok=True)
            t0 = time.perf_counter()
            n_gt, n_det = make_problem(folder, args.images, args.classes, args.boxes, args.dets)
            print(f"{args.images:,} images, {n_gt:,} boxes of {args.classes} classes, {n_det:,} detections "
                  f"(generated in {time.perf_counter() - t0:.0f} s)")
        print(f"load {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores")
        bench_gather(args, folder) if args.gather else bench_runs(args, folder)
    finally:
        if not args.problem:
            shutil.rmtree(folder)


def bench_runs(args, folder):
    import evaluate
    runs = args.runs or ([f"{evaluate.coco_evaluator()[0]}:array", "pycocotools:records"])
    results = {r: [] for r in runs}
    for _ in range(args.repeats):  # the runs in turn, so load from other processes hits each alike
        for r in runs:
            results[r].append(run_child(["--child", r, "--problem", folder, "--classes", str(args.classes)],
                                        args.cap_gib, args.timeout))
            x = results[r][-1]  # as it comes: a long run's figures are not lost with a later one
            print(r, x if not isinstance(x, dict) else {k: v for k, v in x.items() if k != "stats"},
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    ref = next((v[0]["stats"] for r, v in results.items() if r.startswith("pycocotools") and isinstance(v[0], dict)),
               None)
    t_ref, c_ref = next(((statistics.median(x["seconds"] for x in v), statistics.median(x["cpu_s"] for x in v))
                         for r, v in results.items() if r.startswith("pycocotools")
                         and all(isinstance(x, dict) for x in v)), (None, None))
    rows = []
    for r, v in results.items():
        bad = next((x for x in v if not isinstance(x, dict)), None)
        if bad:
            rows.append([r, bad] + [""] * 6)
            continue
        t, c = (statistics.median(x[k] for x in v) for k in ("seconds", "cpu_s"))
        rows.append([r, f"{t:.1f}", f"{statistics.median(x['input_s'] for x in v):.1f}", f"{c:.1f}",
                     f"{t / t_ref:.3f} / {c / c_ref:.3f}" if t_ref else "-", f"{max(x['peak_gib'] for x in v):.2f}",
                     "-" if ref is None else agreement([x["stats"] for x in v], ref)])
    print(f"median of {args.repeats}, each run its own process under a {args.cap_gib:g} GiB address-space cap"
          + (f"; pycocotools' AP {ref['AP']:.4f}" if ref else ""))
    print_table(["evaluator:input", "seconds", "of which input", "CPU s", "to pycocotools: s / CPU", "peak RSS GiB",
                 "12 numbers"], rows)
    if any(row[-1] == "DIFFERENT" for row in rows):
        raise SystemExit(1)


def agreement(runs, ref):
    """"identical", "max |d| 1e-16" (the fast evaluators' last bit: numpy builds average precisions differently)
    or "DIFFERENT" of the twelve numbers of runs against pycocotools'."""
    d = max(abs(x[k] - ref[k]) for x in runs for k in ref)
    return "identical" if d == 0 else f"max |d| {d:.0e}" if d <= 1e-12 else "DIFFERENT"


def options(p):
    p.add_argument("--images", type=int, default=5000, help="images (default 5000; Objects365 v2 val: 80000)")
    p.add_argument("--classes", type=int, default=80, help="classes (default 80; Objects365: 365)")
    p.add_argument("--boxes", type=int, default=14, help="mean ground-truth boxes per image (default 14)")
    p.add_argument("--dets", type=int, default=100, help="detections per image (default 100)")
    p.add_argument("--runs", type=lambda s: s.split(","), help="EVALUATOR:INPUT runs, comma-separated (default "
                   "evaluate.py's evaluator:array,pycocotools:records)")
    p.add_argument("--cap-gib", type=float, default=14, help="address-space cap of each run (default 14)")
    p.add_argument("--timeout", type=float, help="seconds after which a run is stopped (default none)")
    p.add_argument("--gather", type=int, default=0, help="instead: the gather of the detections from this many "
                   "gloo ranks to rank 0")
    p.add_argument("--problem", help="a folder to generate the problem into and keep, or to reuse from a "
                   "previous run (default: a temporary one, removed)")
    for flag in ("--child", "--gather-form"):
        p.add_argument(flag, help=argparse.SUPPRESS)
    p.add_argument("--gather-rank", action="store_true", help=argparse.SUPPRESS)

