"""Export a checkpoint to one ONNX file that runs without PyTorch: ONNX Runtime, TensorRT, Cambricon's MagicMind.

    python export.py --ckpt output/demo/model_final.pth --output demo.onnx
    python export.py --ckpt e2e_faster_rcnn_R_50_FPN_1x.pth --config R-50-FPN --output m.onnx [--opset 11]
    python evaluate.py --ckpt demo.onnx                        # its COCO AP, run by ONNX Runtime
    python evaluate.py --ckpt m.onnx --images photos/ --output dets.json

Takes any checkpoint evaluate.py takes (ours carry their config; upstream's .pth need --config), and the same
overrides (score_thresh=..., detections_per_img=...: they are baked into the graph). Needs onnx and onnxruntime
(pip install -r requirements-onnx.txt).

The graph is the model from the padded image on; resizing, normalisation and padding stay on the host
(data.py's, as evaluate.py does them), so an exported file and PyTorch see the same pixels:
    inputs   image       float32 (1, 3, H, W): one image, BGR-255 minus the pixel mean, zero-padded to 32; H, W
                         dynamic (any multiple of 32)
             image_size  int64 (2,): (h, w), the image's size before padding
    outputs  boxes (D, 4) float32 x1y1x2y2 in the padded input's pixels, +1 widths; scores (D,); labels (D,) int64
             1..K-1: evaluate.py's detections before rescaling to the original image
Batch 1: a batch of several images is run one image at a time (evaluate.py does so with an exported file).
Only standard ONNX operators (NMS as NonMaxSuppression, ROIAlign as RoiAlign with upstream's legacy alignment),
no custom domain. The file's metadata holds the resolved config (preprocessing included) and the class names.

Exporter: the TorchScript-based tracer (torch.onnx.export(dynamo=False)), the one that exports this model on both
torch 2.1 and the newest torch: torch.export (dynamo=True) stops at the data-dependent box count after NMS.
Default opset 17: the newest torch 2.1's tracer writes, which ONNX Runtime and TensorRT 10 both take; opset 11 is
the oldest allowed (older TensorRT, MagicMind).
"""
import json
import os
import warnings

import torch

import config
import evaluate
import launch
import ops

DEFAULT_OPSET = 17


class Detector(torch.nn.Module):
    """What the exported graph computes: (image (1, 3, H, W), image_size (2,) int64) -> boxes, scores, labels."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, image, image_size):
        det = self.net(image, [image_size])[0]
        return det["boxes"], det["scores"], det["labels"]


def max_opset():
    """The newest opset this torch's TorchScript-based exporter writes (17 on torch 2.1, 20 on 2.14)."""
    try:
        from torch.onnx._internal.torchscript_exporter import _constants
    except ImportError:
        from torch.onnx import _constants
    return getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 17)


def require_onnx():
    """onnx and onnxruntime, or a UserError naming the pip command."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise config.UserError(f"exporting and running .onnx files needs onnx and onnxruntime ({e}): "
                               f"pip install -r requirements-onnx.txt") from None
    return onnx, onnxruntime


def export(net, cfg, categories, path, opset=DEFAULT_OPSET, hw=None):
    """Trace net (eval mode, CPU) on a synthetic image of size hw (default: the config's test size padded to 32)
    and write the ONNX file to path, through a temporary file so a failure leaves nothing. Returns the sample input
    (image, image_size) the trace ran on."""
    onnx, _ = require_onnx()
    h, w = hw or (-(-cfg.min_size_test // 32) * 32, -(-cfg.max_size_test // 32) * 32)
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, h, w, generator=gen) * 50  # the trace follows no value: any pixels do
    size = torch.tensor([h, w], dtype=torch.int64)
    kwargs = {"dynamo": False} if "dynamo" in torch.onnx.export.__code__.co_varnames else {}
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the tracer's notes on sizes read as Python numbers: each is dealt with in model.py (export tests)
            warnings.simplefilter("ignore")
            torch.onnx.export(Detector(net).eval(), (image, size), tmp, opset_version=opset,
                              input_names=["image", "image_size"], output_names=["boxes", "scores", "labels"],
                              dynamic_axes={"image": {2: "height", 3: "width"}, "boxes": {0: "detections"},
                                            "scores": {0: "detections"}, "labels": {0: "detections"}},
                              do_constant_folding=True, **kwargs)
        graph = onnx.load(tmp)
        meta = {evaluate.ONNX_CONFIG: json.dumps(config.to_dict(cfg)),
                evaluate.ONNX_CATEGORIES: json.dumps(categories), "opset": str(opset),
                "exported_with": f"torch {torch.__version__}"}
        for key, value in meta.items():
            graph.metadata_props.add(key=key, value=value)
        onnx.checker.check_model(graph)
        onnx.save(graph, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return image, size


def sample_image(cfg):
    """The first image of the config's val split as evaluate.py feeds it: ((1, 3, H, W) padded, (h, w), its path),
    where that split is on this machine (the demo's once it has trained, COCO's val2017 once downloaded); else
    None, and the check runs on the traced random input."""
    import data
    try:
        ds = data.CocoDetection(cfg.data_root, cfg.val_split, cfg, False, cfg.val_ann, cfg.val_images)
        if not len(ds):
            return None
        images, sizes, _, _ = data.collate([ds[0]], cfg.size_divisibility)
    except (config.UserError, OSError):  # no such split here, or one that evaluate.py would refuse: no sample
        return None
    return images, sizes[0], ds.path(0)


def check_output(path):
    """Refuse, before any work, an output that is a folder or cannot be written."""
    if os.path.isdir(path):
        raise config.UserError(f"--output {path} is a folder; name the .onnx file to write (--output "
                               f"{os.path.join(path, 'model.onnx')})")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise config.UserError(f"cannot create the output folder {folder!r}: {e.strerror}") from None
    probe = os.path.join(folder, f".{os.path.basename(path)}.probe{os.getpid()}")
    try:  # a real write: root passes os.access on a read-only mount or an immutable folder
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise config.UserError(f"--output {path}: cannot write in {folder!r}: {e.strerror}") from None


def main(argv=None):
    p = config.parser(__doc__)
    p.add_argument("--ckpt", required=True, help="upstream's .pth (with --config) or one of ours")
    p.add_argument("--output", required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, {ops.ONNX_MIN_OPSET}.."
                   f"{max_opset()} with this torch (default {DEFAULT_OPSET}; 11 for older TensorRT and MagicMind)")
    args, overrides = config.parse(p, argv)
    require_onnx()
    if not ops.ONNX_MIN_OPSET <= args.opset <= max_opset():
        raise config.UserError(f"--opset {args.opset}: this export needs opset {ops.ONNX_MIN_OPSET} or newer "
                               f"(NonMaxSuppression, RoiAlign and TopK with a computed k) and torch "
                               f"{torch.__version__}'s exporter writes at most {max_opset()}")
    check_output(args.output)
    if args.ckpt.lower().endswith(".onnx"):
        raise config.UserError(f"--ckpt {args.ckpt} is already an ONNX file; export takes a PyTorch checkpoint")
    if not args.config:
        import checkpoint
        ckpt = checkpoint.load(args.ckpt)
        if not (isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict)):
            raise config.UserError(f"{args.ckpt} carries no config (upstream's checkpoints do not): name its preset "
                                   f"with --config ({', '.join(config.PRESETS)})")
        del ckpt
    net, cfg, _, categories = evaluate.load(args.ckpt, args.config, list(overrides) + ["device=cpu"])
    net = net.float()
    launch.numeric_policy(cfg)
    image, size = export(net, cfg, categories, args.output, args.opset)
    # The file against the model it came from, on a real image where one is here, else on the traced input
    sample = sample_image(cfg)
    image, size, where = sample or (image, tuple(size.tolist()), "random test input")
    with torch.no_grad():
        want = net(image, [size])[0]
    got = evaluate.OnnxDetector(args.output)(image, [size])[0]
    # the tests' criterion: where near-equal scores order detections differently, >= 99% matched
    ids = {label: label for label in range(cfg.num_classes)}
    matched, n_ort, n_torch = evaluate.detection_agreement(evaluate.coco_records(got, ids),
                                                           evaluate.coco_records(want, ids))
    if n_ort == n_torch == 0:  # a trained detector finds nothing in noise: the check then shows only that it runs
        verdict = ": none to compare, so compare the two on your images with evaluate.py (README, Deploy)"
    else:
        verdict = ": the same" if matched >= 0.99 * max(n_ort, n_torch) else ": they differ (see README, Deploy)"
    print(f"export: {args.output}: {os.path.getsize(args.output) / 2 ** 20:.1f} MiB, opset {args.opset}, "
          f"{cfg.num_classes - 1} classes; on {where} ({image.shape[2]}x{image.shape[3]}) ONNX Runtime gives "
          f"{n_ort} detections, PyTorch {n_torch}, {matched} matched (same label, IoU > 0.99, score within "
          f"1e-3){verdict}")
    return args.output


if __name__ == "__main__":
    launch.run_cli(main)
