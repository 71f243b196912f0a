"""Inference and evaluation.

    # detections on a folder of images (upstream's checkpoint or ours), optionally drawn
    python evaluate.py --ckpt e2e_faster_rcnn_R_101_FPN_1x.pth --images photos/ --output dets.json --vis vis/

The output is a JSON list, one record per detection: {"file_name", "bbox": [x, y, w, h] in the original
image's pixels with upstream's +1 width (w = x2 - x1 + 1), "score", "category_id" (the real COCO id)}.
Preprocessing is upstream's test transform (data.py); one image per forward by default, which is what
reproduces upstream exactly (batching changes the padding, spec pitfall 5).
"""
import argparse
import json
import os

import torch
from PIL import Image

import checkpoint
import config
import data
import model

# COCO's 80 category ids (1..90 with gaps) and names, in the json's order: label l (1..80) is index l - 1
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
COCO_NAMES = ("person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign "
              "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella "
              "handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard "
              "surfboard tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange "
              "broccoli carrot hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop "
              "mouse remote keyboard cell_phone microwave oven toaster sink refrigerator book clock vase scissors "
              "teddy_bear hair_drier toothbrush").split()
COCO_NAMES = [n.replace("_", " ") for n in COCO_NAMES]
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def resolve_device(name):
    if name.startswith("mlu"):
        import torch_mlu  # noqa: F401  (registers the mlu device)
        if not torch.mlu.is_available():
            raise SystemExit(f"--device {name}: torch_mlu is installed but no MLU is available")
    elif name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available here; use --device cpu")
    return torch.device(name)


def load_model(ckpt_path, preset=None, overrides=(), device="cpu"):
    """Model and config from a checkpoint: ours carries its config; upstream's takes the preset (R-101-FPN by
    default). Refuses a checkpoint that does not fit the model exactly (checkpoint.load_state)."""
    ckpt = checkpoint.load(ckpt_path)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict):
        if preset:
            print(f"evaluate: {ckpt_path} carries its own config; --config {preset} ignored")
        cfg = config.get(config.from_dict(ckpt["config"]), overrides)
    else:
        cfg = config.get(preset or "R-101-FPN", overrides)
    net = model.build_model(cfg)
    n = checkpoint.load_state(net, checkpoint.model_state(ckpt), repr(ckpt_path))
    print(f"evaluate: loaded {n} tensors from {ckpt_path}")
    return net.to(device).eval(), cfg


@torch.inference_mode()
def predict(net, batches, device):
    """batches yield (images (N,3,Hp,Wp), image_sizes [(h, w)], keys [any]); yields (key, resized (h, w),
    detections {"boxes", "scores", "labels"} on the CPU in resized-image pixels)."""
    for images, sizes, keys in batches:
        for key, size, det in zip(keys, sizes, net(images.to(device), sizes)):
            yield key, size, {k: v.cpu() for k, v in det.items()}


def coco_records(det, resized_size, orig_size, label_to_cat_id):
    """Detections of one image as COCO result records (without the image key), written as upstream's
    prepare_for_coco_detection: boxes rescaled from the resized to the original size with per-axis ratios
    (no +1 there), then [x, y, w, h] with w = x2 - x1 + 1 (legacy +1), category_id the dataset's real id."""
    (rh, rw), (oh, ow) = resized_size, orig_size
    boxes = det["boxes"].to(torch.float32) * torch.tensor([ow / rw, oh / rh, ow / rw, oh / rh])
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2] + 1], 1)
    return [{"category_id": label_to_cat_id[int(l)], "bbox": [float(v) for v in b], "score": float(s)}
            for b, s, l in zip(xywh, det["scores"], det["labels"])]


def folder_batches(paths, cfg, ims_per_batch=1):
    """Upstream's test preprocessing for image files: (batch, image_sizes, [(path, original (h, w))])."""
    for start in range(0, len(paths), ims_per_batch):
        tensors, keys = [], []
        for path in paths[start:start + ims_per_batch]:
            try:
                img = data.load_image(path)
            except OSError as e:
                raise SystemExit(f"cannot read image {path}: {e}") from None
            w, h = data.resize_size(*img.size, cfg.min_size_test, cfg.max_size_test)
            tensors.append(data.to_model_tensor(img.resize((w, h), Image.BILINEAR), cfg.pixel_mean))
            keys.append((path, (img.size[1], img.size[0])))
        batch, sizes = data.pad_batch(tensors, cfg.size_divisibility)
        yield batch, sizes, keys


def draw(path, records, names, out_path):
    """The image with its boxes, class names and scores."""
    import numpy as np
    from torchvision.utils import draw_bounding_boxes
    img = torch.from_numpy(np.array(data.load_image(path))).permute(2, 0, 1)
    boxes = torch.tensor([[x, y, x + w - 1, y + h - 1] for x, y, w, h in (r["bbox"] for r in records)],
                         dtype=torch.float32).reshape(-1, 4)
    labels = [f"{names.get(r['category_id'], r['category_id'])} {r['score']:.2f}" for r in records]
    if len(records):
        img = draw_bounding_boxes(img, boxes, labels, colors="red", width=2)
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(out_path)


def run_folder(args, net, cfg, device):
    if not os.path.isdir(args.images):
        raise SystemExit(f"--images {args.images!r} is not a directory")
    paths = sorted(os.path.join(args.images, f) for f in os.listdir(args.images) if f.lower().endswith(IMAGE_EXTS))
    if not paths:
        raise SystemExit(f"--images {args.images!r} holds no image files ({', '.join(IMAGE_EXTS)})")
    if cfg.num_classes == len(COCO_IDS) + 1:
        label_to_cat_id = {i + 1: c for i, c in enumerate(COCO_IDS)}
        names = dict(zip(COCO_IDS, COCO_NAMES))
    else:  # not a COCO model: the contiguous label is the category id
        label_to_cat_id = {i: i for i in range(1, cfg.num_classes)}
        names = {}
    from tqdm import tqdm
    results = []
    if args.vis:
        os.makedirs(args.vis, exist_ok=True)
    batches = folder_batches(paths, cfg, args.ims_per_batch)
    for (path, orig), size, det in tqdm(predict(net, batches, device), total=len(paths), desc="images"):
        records = coco_records(det, size, orig, label_to_cat_id)
        rel = os.path.relpath(path, args.images)
        results += [{"file_name": rel, **r} for r in records]
        if args.vis:
            draw(path, records, names, os.path.join(args.vis, os.path.splitext(rel)[0] + ".jpg"))
    with open(args.output, "w") as f:
        json.dump(results, f)
    print(f"evaluate: {len(results)} detections on {len(paths)} images -> {args.output}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="upstream .pth or one of ours")
    p.add_argument("--config", default=None, help=f"preset for checkpoints without a config: {', '.join(config.PRESETS)}")
    p.add_argument("--images", help="folder of images to run on")
    p.add_argument("--output", default="dets.json", help="results json")
    p.add_argument("--vis", default="", help="folder for drawn images")
    p.add_argument("--device", default=None, help="cpu, cuda or mlu (default: the config's, cpu if unavailable)")
    p.add_argument("--ims-per-batch", type=int, default=1, help="images per forward")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = p.parse_args(argv)
    if args.device is None:
        cfg_device = config.get(args.config or "R-101-FPN", verbose=False).device
        ok = cfg_device == "cpu" or (cfg_device.startswith("cuda") and torch.cuda.is_available())
        args.device = cfg_device if ok else "cpu"
    device = resolve_device(args.device)
    # Upstream ran plain FP32; TF32 convolutions and matmuls (Ampere and later) would change its detections
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    net, cfg = load_model(args.ckpt, args.config, args.overrides, device)
    if args.images:
        run_folder(args, net, cfg, device)
    else:
        raise SystemExit("nothing to do: pass --images DIR")


if __name__ == "__main__":
    main()
