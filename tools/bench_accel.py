"""Accelerator benchmarks, subcommands of bench.py (`python tools/bench.py gpu --device cuda`, or one part: grid,
syncs, fidelity, trainloop, profile, extras): ours against torchvision per model, batch and precision with
TFLOP/s, host synchronisations per forward before and after, CPU-vs-device agreement of detections, train.py on
real images, a profile, and the optional speed-ups; `gpu` runs them all in one call under a time budget, summary
last. Each step says in its output file at what image size it ran (--hw).
"""
import bench_common as common  # first: it sets OMP_WAIT_POLICY before torch loads and finds the product
import os  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

import config  # noqa: E402
import launch  # noqa: E402
from bench_common import IMAGE_HW, build_net, make_step, median_times, print_table  # noqa: E402

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
    launch.synchronize(device)
    before = mod.memory_allocated(device)
    mod.reset_peak_memory_stats(device)
    fn()
    launch.synchronize(device)
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
    """obj as JSON to path (nothing when path is empty), renamed into place: a step killed at its time limit leaves
    the figures written before, never half a file."""
    import json
    if path:
        launch.atomic_write(path, lambda f: json.dump(obj, f, indent=1, default=str), mode="w")


def bench_grid(args):
    """Ours against torchvision (tv-frozen: FrozenBN, layers 2-4 trainable, as ours) in the same process, runs
    alternating: images/s, time ratio, peak memory, achieved TFLOP/s (FLOPs counted once per case), for each
    model, training and inference batch size and precision."""
    device, hw = torch.device(args.device), args.hw or IMAGE_HW
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
        nets = {impl: build_net(impl, preset, device, hw, overrides) for impl in ("ours", "tv-frozen")}
        for what, n in cases:
            state = {"autocast": None}
            steps = {impl: make_step(impl, net, what, n, device, hw, state) for impl, net in nets.items()}
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
                             f"{rec['tv_img_s']:.1f}", f"{rec['time_ratio']:.2f}",
                             fmt(mem["ours"], ".1f"), fmt(mem["tv-frozen"], ".1f"),
                             f"{tflops:.1f}", f"{rec['pct_of_matmul_peak']:.0f}%", fmt(rec["pct_of_spec_peak"], ".0f")])
                print("  ".join(map(str, rows[-1])), flush=True)
            del steps
        del nets
    print(f"\nmedian of {args.repeats} after 2 warm-ups, ours and torchvision alternating; {hw[0]}x{hw[1]} "
          "images, 5 boxes; FLOPs by FlopCounterMode (conv + matmul, fwd + bwd); spec peak: dense SXM figures")
    print_table(["case", "ours img/s", "tv img/s", "ours/tv time", "ours GiB", "tv GiB", "ours TFLOP/s",
                 "% matmul peak", "% spec"], rows)
    write_json(args.json, {"info": info, "image_hw": hw, "matmul_tflops": peaks, "spec_tflops": spec,
                           "rows": records})


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


def count_cuda_syncs(fn, device):
    """Synchronisations one call of fn makes on CUDA device, from torch.cuda.set_sync_debug_mode("warn"), by
    source line of model.py/ops.py (the innermost frame of ours that led to it)."""
    import collections
    import warnings
    where = collections.Counter()
    launch.synchronize(device)
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
    device, hw = torch.device(args.device), args.hw or IMAGE_HW
    versions = {"new": None}
    if args.old_model and os.path.isfile(args.old_model):
        versions["old"] = load_model_file(args.old_model)
    elif args.old_model:
        print(f"bench syncs: {args.old_model} is absent: counting the current model.py only")
    overrides = args.overrides.split(";") if args.overrides else []
    out, rows = {}, []
    for what, n in [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(",")]:
        steps = {v: make_step("ours", build_net("ours", args.preset, device, hw, overrides, m), what, n, device, hw)
                 for v, m in versions.items()}
        results = {}
        for version, step in steps.items():  # first call: the same weights and seed for old and new
            torch.manual_seed(1)
            results[version] = step()
        if "old" in steps:
            a, b = results["old"], results["new"]
            if what == "inference":
                same = all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
                if not same:  # how far apart: the share matched, as the fidelity step counts it
                    import evaluate
                    records = [[{"image_id": i, **r} for i, d in enumerate(dets) for r in evaluate.coco_records(
                        {k: v.float().cpu() for k, v in d.items()}, {c: c for c in range(1, 91)})] for dets in (a, b)]
                    matched, n_old, n_new = evaluate.detection_agreement(*records)
                    same = f"{matched} of {n_old} old / {n_new} new detections matched"
            else:  # the old NaN objectness (no anchor sampled) is 0 now
                same = all(torch.equal(a[k], b[k]) or bool(a[k].isnan()) for k in a)
        for version, step in steps.items():
            torch.manual_seed(2)
            structural = count_host_reads(step)
            real = count_cuda_syncs(step, device) if device.type == "cuda" else (None, {})
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
    print(f"{args.preset} on {device}, {hw[0]}x{hw[1]} images: host reads per forward (training: forward and "
          "backward of one step)")
    print_table(["case", "model.py", "structural", "CUDA syncs", "by op"], rows)
    write_json(args.json, {"image_hw": hw, "cases": out})


def _syncs_options(p):
    p.add_argument("--preset", default="R-50-FPN")
    p.add_argument("--cases", default="inference:1,inference:8,training:2", help="what:batch,...")
    p.add_argument("--old-model", default=".before/model.py", help="a previous model.py to count too, if present")
    p.add_argument("--overrides", default="", help="config overrides, separated by ';' (dry runs)")
    p.add_argument("--json", default="")


def bench_fidelity(args):
    """Folder inference of the same random-init weights on the CPU (FP32) and on --device in FP32 (TF32 off),
    TF32 and bf16 autocast: the share of detections matched (same label, IoU > 0.99, score within 1e-3:
    evaluate.detection_agreement). Demo preset (100 detections per image at random init) and R-50-FPN
    (score_thresh 0), each at its preset's test size or as --hw says."""
    import tempfile

    import checkpoint
    import data
    import evaluate
    import model
    paths = evaluate.image_paths([args.images])[0]
    out, rows = {}, []
    for preset, overrides, count in (("demo", [], args.demo_images),
                                     ("R-50-FPN", ["score_thresh=0.0"], args.r50_images)):
        torch.manual_seed(0)
        overrides = overrides + common.size_overrides(args.hw) + (args.overrides.split(";") if args.overrides else [])
        cfg = config.get(preset, ["device=cpu", *overrides], verbose=False)
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
                rows.append([preset, f"{cfg_d.min_size_test}/{cfg_d.max_size_test}", "cpu fp32", len(records[0]),
                             "reference", f"{seconds:.1f}"])
                continue
            matched, n_ref, n = evaluate.detection_agreement(records[0], records[k])
            share = matched / max(n_ref, n, 1)
            out[f"{preset} {precision}"] = {"matched": matched, "cpu_detections": n_ref, "device_detections": n,
                                            "share": share, "seconds": seconds, "images": count,
                                            "min_size_test": cfg_d.min_size_test, "max_size_test": cfg_d.max_size_test}
            rows.append([preset, f"{cfg_d.min_size_test}/{cfg_d.max_size_test}", f"{dev} {precision}", n,
                         f"{100 * share:.2f}%", f"{seconds:.1f}"])
    print(f"folder inference on {args.images}: detections matched against the CPU's (label, IoU > 0.99, score 1e-3)")
    print_table(["weights", "short/long side", "run", "detections", "matched", "seconds"], rows)
    write_json(args.json, {"image_hw": args.hw, "runs": out})


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
    from its log.jsonl, the first log_period iterations (warm-up) left out, and the resize sizes it ran at (the
    preset's, or --hw's) from the config it logged. Its final checkpoint and evaluation run after the timed loop."""
    import json
    import subprocess
    import sys
    import tempfile
    import checkpoint
    import model
    out_dir = tempfile.mkdtemp(prefix="trainloop_")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
    overrides = common.size_overrides(args.hw) + (args.overrides.split(";") if args.overrides else [])
    cfg = config.get(args.config, overrides, verbose=False)  # random initial weights, saved: train.py refuses none
    checkpoint.save(os.path.join(out_dir, "init.pth"), model.build_model(cfg), cfg)  # for a frozen preset
    cmd = [sys.executable, os.path.join(here, "train.py"), "--config", args.config, f"data_root={args.data}",
           f"output_dir={out_dir}", f"weights={os.path.join(out_dir, 'init.pth')}",
           f"device={args.device}", f"ims_per_batch={args.batch}", f"num_workers={args.workers}",
           f"max_iter={args.iters}", f"log_period={args.log_period}", "checkpoint_period=1000000000",
           f"amp={'' if args.amp == 'fp32' else args.amp}", *overrides]
    print(" ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=here)
    wall = time.perf_counter() - t0
    log = os.path.join(out_dir, "log.jsonl")
    records = [json.loads(line) for line in open(log)] if os.path.isfile(log) else []
    loop = [r for r in records if "time" in r][1:]
    logged = next((r["config"] for r in records if "config" in r), {})
    sizes = {k: logged.get(k) for k in ("min_size_train", "max_size_train", "min_size_test", "max_size_test")}
    result = {"command": " ".join(cmd), "returncode": proc.returncode, "wall_s": wall, "image_hw": args.hw,
              "sizes": sizes, "records": loop, "stderr_tail": proc.stderr[-2000:] if proc.returncode else ""}
    if loop:
        t = sum(r["time"] for r in loop) / len(loop)
        d = sum(r["data_time"] for r in loop) / len(loop)
        result.update(img_s=args.batch / t, s_per_iter=t, data_share=d / t, memory_mb=loop[-1]["memory_mb"])
        print(f"train.py {args.config} amp={args.amp} {args.batch} images/iteration (short side "
              f"{sizes['min_size_train']}, long <= {sizes['max_size_train']}), {args.workers} workers: "
              f"{result['img_s']:.1f} img/s, {t:.3f} s/iter, waiting for data {100 * d / t:.0f}% of it, "
              f"peak {result['memory_mb']:.0f} MiB (exit {proc.returncode}, {wall:.0f} s in all)")
    else:
        print(f"train.py gave no timed iterations (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    write_json(args.json, result)
    if proc.returncode:  # so `bench.py gpu` lists the step as failed, not as "exit 0"
        raise SystemExit(f"bench trainloop: train.py exited with {proc.returncode}")


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
    device, hw = torch.device(args.device), args.hw or IMAGE_HW
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    overrides = args.overrides.split(";") if args.overrides else []
    text = []
    for spec in args.cases.split(";"):
        impl, preset, what, n, precision = spec.split(",")
        state = {}
        net = build_net(impl, preset, device, hw, overrides if impl == "ours" else ())
        step = make_step(impl, net, what, int(n), device, hw, state)
        set_precision(precision, state)
        for _ in range(2):
            step()
        launch.synchronize(device)
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                step()
            launch.synchronize(device)
            wall = time.perf_counter() - t0
        events = prof.key_averages()
        busy = sum(getattr(e, key, 0) for e in events) / 1e6 if device.type == "cuda" else None
        head = (f"== {impl} {preset} {what} batch {n} {precision} {hw[0]}x{hw[1]}: {1e3 * wall / args.repeats:.1f} "
                f"ms per step"
                + (f", device busy {100 * busy / wall:.0f}% of the wall time" if busy is not None else ""))
        print(head, flush=True)
        text += [head, events.table(sort_by=key, row_limit=args.rows, max_name_column_width=60), ""]
        del net, step, prof
    if args.out:
        launch.atomic_write(args.out, lambda f: f.write("\n".join(text)), mode="w")


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
    device, hw = torch.device(args.device), args.hw or IMAGE_HW
    overrides = args.overrides.split(";") if args.overrides else []
    out = {}
    print(f"{hw[0]}x{hw[1]} images", flush=True)

    def record(name, **kw):
        out[name] = kw
        print(name, ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in kw.items()),
              flush=True)
        write_json(args.json, {"image_hw": hw, "records": out})

    # fused SGD: one kernel per parameter group instead of foreach's few per step
    params = [p for p in build_net("ours", "R-101-FPN", device, hw, overrides).parameters() if p.requires_grad]
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
            steps = [make_step("ours", build_net("ours", "R-50-FPN", device, hw, overrides + [f"channels_last={v}"]),
                               what, n, device, hw, state) for v in (True, False)]
            set_precision(precision, state)
            t = median_times(steps, device, args.repeats, warmup=2)
            record(f"channels_last off/on R-50-FPN {what} b{n} {precision}", on_ms=1e3 * t[0], off_ms=1e3 * t[1],
                   off_over_on=t[1] / t[0])
    for mode, what, n, precision in [m.split(":") for m in args.compile.split(",") if m]:
        state = {}
        eager = make_step("ours", build_net("ours", "R-50-FPN", device, hw, overrides), what, int(n), device, hw,
                          state)
        compiled = make_step("ours", build_net("ours", "R-50-FPN", device, hw,
                                               overrides + [f"compile_backbone={mode}"]), what, int(n), device, hw,
                             state)
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

        python tools/bench.py gpu --device cuda --data datasets/coco_tiny --out $OUT      # ~8 minutes on an H200
        python tools/bench.py gpu --device cpu --dry-run --hw 96,128 --out /tmp/gpu_dry  # the same code, tiny sizes

    --device, --repeats and --hw go to every step that takes them: the synthetic batches of grid, syncs, profile
    and extras are h x w, trainloop and fidelity resize their real images to short side min(hw), long side at
    most max(hw). Without --hw: 800x1216 and the presets' sizes, or 128x192 everywhere with --dry-run.
    """
    import json
    import signal
    import subprocess
    import sys
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
    args.out, args.data = os.path.abspath(args.out), os.path.abspath(args.data)
    out = lambda name: os.path.join(args.out, name)  # noqa: E731
    me = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py")]
    dry = args.dry_run
    hw = args.hw or (common.DRY_HW if dry else None)
    device = ["--device", args.device] + (["--hw", f"{hw[0]},{hw[1]}"] if hw else [])  # the flags of every step
    reps = ["--repeats", str(args.repeats)]
    models = ["--models", args.models] if args.models else []
    precisions = ["--precisions", args.precisions or "fp32,bf16"] if args.precisions or dry else []
    tiny = "stage_blocks=(1,1,1,1);stem_channels=8;width_per_group=4;fpn_channels=16;mlp_dim=32"
    loop_dry = ["--config", "demo", "--batch", "2", "--workers", "1", "--iters", "4", "--log-period", "2"]
    if dry:  # the demo preset on --data's classes (coco_tiny: 80), as a user sets num_classes
        try:
            with open(os.path.join(args.data, "annotations", "instances_train2017.json")) as f:
                classes = len(json.load(f)["categories"]) + 1
        except (OSError, ValueError, KeyError):
            classes = 81  # the trainloop step then says what is wrong with --data (train.py's own message)
        loop_dry += ["--overrides", f"num_classes={classes};test_ims_per_batch=8"]
    steps = [  # (name, command, seconds), the target figures first
        ("grid", me + ["grid", *device, *reps, *models, *precisions, "--json", out("grid.json")] + (
            ["--train-batches", "1", "--infer-batches", "1", "--matmul-size", "256", "--overrides", tiny] if dry
            else []), 240),
        ("trainloop", me + ["trainloop", *device, "--data", args.data, "--json", out("trainloop.json")] + (
            loop_dry if dry else []), 150),
        ("syncs", me + ["syncs", *device, *reps, "--json", out("syncs.json")] + (["--overrides", tiny] if dry
                                                                                 else []), 90),
        ("fidelity", me + ["fidelity", *device, *precisions, "--images", os.path.join(args.data, "val2017"), "--json",
                           out("fidelity.json")] + (["--demo-images", "4", "--r50-images", "1"] if dry else []), 120),
        ("pytest", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_ops.py", "test_model.py",
                    "test_evaluate.py", "-k", "cuda or agreement or finite"], 150),
        ("profile", me + ["profile", *device, *reps, "--out", out("profile.txt")] + (
            ["--cases", "ours,R-50-FPN,inference,1,fp32;tv-frozen,R-50-FPN,inference,1,fp32;"
                        "ours,R-50-FPN,training,1,bf16", "--overrides", tiny] if dry else []), 90),
        ("extras", me + ["extras", *device, *reps, *precisions, "--json", out("extras.json")] + (
            ["--compile", "", "--overrides", tiny] if dry else []), 240),
    ]
    unknown = set(args.only + args.skip) - {name for name, _, _ in steps}
    if unknown:
        raise config.UserError(f"bench gpu: --only/--skip name {', '.join(sorted(unknown))}, not steps; the steps "
                               f"are {', '.join(name for name, _, _ in steps)}")
    steps = [step for step in steps if (not args.only or step[0] in args.only) and step[0] not in args.skip]
    readers = [name for name, _, _ in steps if name in ("trainloop", "fidelity")]
    absent = [p for p in ("annotations/instances_train2017.json", "train2017", "val2017")
              if not os.path.exists(os.path.join(args.data, p))]
    if readers and absent:  # before any device time is spent
        raise config.UserError(f"bench gpu: --data {args.data} has no {', '.join(absent)}, which "
                               f"{' and '.join(readers)} read: give --data a folder in COCO's layout such as "
                               f"datasets/coco_tiny, or leave them out with --skip {','.join(readers)}")
    os.makedirs(args.out, exist_ok=True)
    deadline = time.time() + args.budget
    status = {}
    with open(out("log.txt"), "w") as log:
        for name, cmd, limit in steps:
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
    summary = gpu_summary(args.out, status, hw)
    launch.atomic_write(out("summary.txt"), lambda f: f.write(summary), mode="w")
    print(summary)


def gpu_summary(folder, status, hw):
    """The short table of `bench.py gpu`: what each step gave, the issue's targets next to the figures. hw: the
    --hw every step got (None: 800x1216 and the presets' sizes)."""
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
    lines.append(f"image size: {hw[0]}x{hw[1]} in every step (each given --hw)" if hw else
                 f"image size: {IMAGE_HW[0]}x{IMAGE_HW[1]} synthetic, the presets' sizes in trainloop and fidelity")
    if grid:
        lines.append(f"device: {grid['info']}; matmul TFLOP/s {grid['matmul_tflops']}")
    for name, s in status.items():
        lines.append(f"step {name}: {s}")
    log = open(os.path.join(folder, "log.txt")).read() if os.path.isfile(os.path.join(folder, "log.txt")) else ""
    tests = re.findall(r"^(\d+ (?:passed|failed).*?) in [\d.]+s", log, re.M)
    lines.append(f"pytest (-k 'cuda or agreement or finite'): {tests[0] if tests else 'no result line'}")
    if fid:
        lines.append("fidelity vs CPU FP32 (label, IoU > 0.99, score within 1e-3): " + "; ".join(
            f"{k} {100 * v['share']:.2f}% of {v['cpu_detections']}" for k, v in fid["runs"].items()))
    if syncs:
        cases = syncs["cases"]
        for case in sorted({k.rsplit(" ", 1)[0] for k in cases}):
            old, new, t = (cases.get(f"{case} {v}") for v in ("old", "new", "time"))
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
        for k, v in extras["records"].items():
            lines.append(f"extra {k}: " + ", ".join(f"{a} {b:.4g}" if isinstance(b, float) else f"{a} {b}"
                                                   for a, b in v.items()))
    lines.append("files: summary.txt log.txt grid.json syncs.json fidelity.json trainloop.json extras.json profile.txt")
    return "\n".join(lines) + "\n"


def _gpu_options(p):
    p.add_argument("--data", default="datasets/coco_tiny", help="COCO-layout folder (train2017, val2017, annotations)")
    p.add_argument("--out", default="gpu_check", help="folder for the figures (at most 8 files)")
    p.add_argument("--budget", type=float, default=480, help="seconds for all steps together (default 480)")
    steps = lambda s: [v for v in s.split(",") if v]  # noqa: E731
    p.add_argument("--only", default=[], type=steps, help="comma-separated steps to run (default all)")
    p.add_argument("--skip", default=[], type=steps, help="comma-separated steps to leave out (default none)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes and counts: the whole script on a CPU")
    p.add_argument("--models", default="", help="presets of the grid, comma-separated (default: the grid's)")
    p.add_argument("--precisions", default="", help="of the grid, fidelity and extras, comma-separated (default: "
                                                    "theirs; fp32,bf16 with --dry-run)")
