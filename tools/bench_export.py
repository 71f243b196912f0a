"""`bench.py export`: our R-50-FPN exported by export.py and run by ONNX Runtime against our eager PyTorch, and
torchvision's fasterrcnn_resnet50_fpn exported the same way, on the CPU; then where ONNX Runtime's time goes.

    python tools/bench.py export --repeats 3
"""
import bench_common as common  # first: it sets OMP_WAIT_POLICY before torch loads and finds the product
import time  # noqa: E402

import torch  # noqa: E402

from bench_common import IMAGE_HW, build_net, median_times, print_table  # noqa: E402


def options(p):
    p.add_argument("--opset", type=int, default=17, help="our file's opset (default 17, export.py's)")


def bench_export(args):
    """Our R-50-FPN exported by export.py and run by ONNX Runtime against our eager PyTorch, and torchvision's
    fasterrcnn_resnet50_fpn exported as its test_onnx.py does (opset 11, its resize inside the graph) against its
    eager run; CPU, batch 1, random weights, all four alternating in this process, ONNX Runtime with torch's thread
    count. Also the files' sizes and export times."""
    import os
    import tempfile
    import warnings

    import config
    import evaluate
    import export
    import onnxruntime

    device, hw, threads = torch.device("cpu"), args.hw or IMAGE_HW, torch.get_num_threads()
    cfg = config.get("R-50-FPN", ["device=cpu"], verbose=False)
    ours, tv = build_net("ours", "R-50-FPN", device, hw).eval(), build_net("torchvision", "R-50-FPN", device, hw).eval()
    images, _ = common.synthetic_batch(1, device, hw)
    x, sizes = images * 255 - 128, [tuple(hw)]  # ours: data.py's kind of input; torchvision normalises inside
    with tempfile.TemporaryDirectory() as tmp:
        paths, took = {"ours": os.path.join(tmp, "ours.onnx"), "tv": os.path.join(tmp, "tv.onnx")}, {}
        t0 = time.perf_counter()
        export.export(ours, cfg, [], paths["ours"], args.opset, hw=hw)
        took["ours"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on torchvision's code: not ours to act on
            kwargs = {"dynamo": False} if "dynamo" in torch.onnx.export.__code__.co_varnames else {}
            torch.onnx.export(tv, ([images[0]],), paths["tv"], opset_version=11, input_names=["images_tensors"],
                              output_names=["boxes", "labels", "scores"], do_constant_folding=True,
                              dynamic_axes={"images_tensors": [0, 1, 2], "boxes": [0, 1], "labels": [0],
                                            "scores": [0]}, **kwargs)
        took["tv"] = time.perf_counter() - t0
        runner = evaluate.OnnxDetector(paths["ours"], threads=threads)
        profiled = _profiled_session(paths["ours"], threads)
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads, opts.log_severity_level = threads, 3
        tv_session = onnxruntime.InferenceSession(paths["tv"], opts, providers=["CPUExecutionProvider"])
        mib = {k: os.path.getsize(p) / 2 ** 20 for k, p in paths.items()}

    def eager(net, *a):
        with torch.inference_mode():
            return net(*a)
    fns = [lambda: eager(ours, x, sizes), lambda: runner(x, sizes),
           lambda: eager(tv, [images[0]]), lambda: tv_session.run(None, {"images_tensors": images[0].numpy()})]
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, cpu, {threads} threads (both), image "
          f"{hw[0]}x{hw[1]}, batch 1, random weights, median of {args.repeats} after 1 warm-up, all alternating; "
          f"ours at opset {args.opset}, torchvision's at 11")
    ours_eager, ours_ort, tv_eager, tv_ort = median_times(fns, device, args.repeats)
    print_table(["measurement", "s per image", "ONNX/eager", "file MiB", "export s"], [
        ["ours, eager PyTorch", f"{ours_eager:.3f}", "-", "-", "-"],
        ["ours, ONNX Runtime", f"{ours_ort:.3f}", f"{ours_ort / ours_eager:.2f}", f"{mib['ours']:.1f}",
         f"{took['ours']:.1f}"],
        ["torchvision, eager PyTorch", f"{tv_eager:.3f}", "-", "-", "-"],
        ["torchvision, ONNX Runtime", f"{tv_ort:.3f}", f"{tv_ort / tv_eager:.2f}", f"{mib['tv']:.1f}",
         f"{took['tv']:.1f}"]])
    print(f"ours in ONNX Runtime / torchvision's in ONNX Runtime: {ours_ort / tv_ort:.2f}")
    _export_floor(ours, x, sizes, profiled, ours_eager)


def _profiled_session(path, threads):
    """An ONNX Runtime session on path that records each node's time."""
    import os
    import tempfile

    import onnxruntime
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level, opts.enable_profiling = threads, 3, True
    opts.profile_file_prefix = os.path.join(tempfile.gettempdir(), f"bench_export_{os.getpid()}")
    return onnxruntime.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _export_floor(net, x, sizes, session, eager_s):
    """Where ONNX Runtime's time goes (one profiled run, by operator), the model's multiply-adds (torch's flop
    counter on the eager run), and the time they alone take at ONNX Runtime's own convolution rate: how far below
    eager an exported float32 file can get on this CPU."""
    import collections
    import json
    import os

    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:  # torch 2.1 counts nothing in inference_mode
        net(x, sizes)
    flops = {str(k).split(".")[-1]: v for k, v in counter.get_flop_counts().get("Global", {}).items()}
    session.run(None, {"image": x.numpy(), "image_size": torch.tensor(sizes[0]).numpy()})
    path = session.end_profiling()
    with open(path) as f:
        events = json.load(f)
    os.remove(path)
    ms = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            ms[e["args"]["op_name"]] += e["dur"] / 1000
    conv_rate = flops.get("convolution", 0) / ms["Conv"] / 1e6  # GFLOP/s
    floor = sum(flops.values()) / conv_rate / 1e9
    print("ONNX Runtime, one profiled run, ms by operator: " +
          ", ".join(f"{op} {t:.0f}" for op, t in ms.most_common(6)) +
          f", the rest {sum(ms.values()) - sum(t for _, t in ms.most_common(6)):.0f}; convolutions at "
          f"{conv_rate:.0f} GFLOP/s")
    parts = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in flops.items())
    print(f"the model's {sum(flops.values()) / 1e9:.1f} GFLOP ({parts}) alone take {floor:.2f} s at that rate: "
          f"{floor / eager_s:.2f}x of our eager time")
