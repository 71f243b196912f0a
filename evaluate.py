"""Inference and evaluation.

    # detections on a folder of images (upstream's checkpoint or ours), optionally drawn
    python evaluate.py --ckpt e2e_faster_rcnn_R_101_FPN_1x.pth --images photos/ --output dets.json --vis vis/
    # COCO box AP of a split (upstream's checkpoint needs --config; ours carry theirs), one process or many
    python evaluate.py --ckpt e2e_faster_rcnn_R_101_FPN_1x.pth --data-root datasets/coco --split val2017 \
        --ims-per-batch 32 --device mlu
    torchrun --nproc_per_node 8 evaluate.py --ckpt output/model_0090000.pth --device cuda

The output is a JSON list, one record per detection: {"file_name", "bbox": [x, y, w, h] in the original
image's pixels with upstream's +1 width (w = x2 - x1 + 1), "score", "category_id" (the real COCO id)}.
Preprocessing is upstream's test transform (data.py); one image per forward by default, which is what
reproduces upstream exactly (batching changes the padding, spec pitfall 5).
"""
import argparse
import datetime
import json
import os

import torch
import torch.distributed as dist
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


def resolve_device(name, local_rank=0):
    """torch.device for "cpu", "cuda" or "mlu" (card local_rank), or a ConfigError saying what to do."""
    name = name.split(":")[0]
    if name not in ("cpu", "cuda", "mlu"):
        raise config.ConfigError(f"device {name!r} is not one of cpu, cuda, mlu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mlu":
        try:
            import torch_mlu  # noqa: F401  registers the "mlu" device and torch.mlu
        except ImportError:
            raise config.ConfigError("device mlu needs torch_mlu (Cambricon's PyTorch image); "
                                     "use device cpu or cuda on this machine") from None
    module = getattr(torch, name)
    count = module.device_count() if module.is_available() else 0
    if local_rank >= count:
        raise config.ConfigError(f"device {name} card {local_rank} is not available here ({count} cards seen): "
                                 "use device cpu, or fewer processes per node")
    module.set_device(local_rank)
    return torch.device(name, local_rank)


def init_distributed(device, rank, world_size):
    """The process group from torchrun's environment, with the backend that matches the device."""
    # Each torchrun restart keeps its keys under its own prefix: a restarted group must not read the addresses
    # the previous (dead) round published in the same store.
    timeout = datetime.timedelta(minutes=30)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True",
                          timeout=timeout)
    store = dist.PrefixStore(f"frcnn_restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    backend = {"cpu": "gloo", "cuda": "nccl", "mlu": "cncl"}[device.type]
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


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


def coco_evaluator():
    """(name, COCO, COCOeval) of the fastest installed evaluator that gives pycocotools' numbers: hotcoco
    (bit-identical in test_evaluate.py), else faster-coco-eval (equal to ~1e-16), else pycocotools itself."""
    try:
        import hotcoco
        return "hotcoco", hotcoco.COCO, hotcoco.COCOeval
    except ImportError:
        pass
    try:
        from faster_coco_eval import COCO, COCOeval_faster
        return "faster-coco-eval", COCO, COCOeval_faster
    except ImportError:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
        return "pycocotools", COCO, COCOeval


STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def coco_stats(ann_file, results, evaluator=None):
    """The twelve COCOeval bbox numbers (summarize() prints the table) of result records against ann_file."""
    _, COCO, COCOeval = evaluator or coco_evaluator()
    gt = COCO(ann_file)
    if not results:  # loadRes cannot take an empty list
        return dict.fromkeys(STAT_NAMES, 0.0)
    e = COCOeval(gt, gt.loadRes(results), "bbox")
    e.evaluate()
    e.accumulate()
    e.summarize()
    return dict(zip(STAT_NAMES, map(float, list(e.stats)[:12])))


def evaluate_coco(net, cfg, device, rank=0, world_size=1, split=None, output_dir=None):
    """COCO box evaluation as upstream's inference(): every image of the split once, sharded over ranks and
    gathered on rank 0 by dataset index. Rank 0 prints the COCO table and AP/AP50, writes
    coco_results_{split}.json and metrics_{split}.json to output_dir and returns the metrics (others: None)."""
    from tqdm import tqdm
    split = split or cfg.val_split
    loader = data.make_test_loader(cfg, split, rank, world_size)
    ds = loader.dataset
    was_training = net.training
    net.eval()
    mine = {}
    batches = ((images, sizes, indices) for images, sizes, _, indices in loader)
    total = sum(len(b) for b in loader.batch_sampler)
    for index, size, det in tqdm(predict(net, batches, device), total=total, desc=f"eval {split}",
                                 disable=rank != 0, leave=False):
        w, h = ds.sizes[index]  # back to the json's size, as upstream's prepare_for_coco_detection
        mine[index] = [{"image_id": ds.ids[index], **r} for r in coco_records(det, size, (h, w), ds.label_to_cat_id)]
    net.train(was_training)
    parts = [mine]
    if world_size > 1:
        parts = [None] * world_size if rank == 0 else None
        dist.gather_object(mine, parts, dst=0)
    if rank != 0:
        return None
    merged = {i: recs for part in parts for i, recs in part.items()}
    assert len(merged) == len(ds), f"evaluation gathered {len(merged)} of {len(ds)} images"
    results = [r for i in sorted(merged) for r in merged[i]]
    out = output_dir or cfg.output_dir
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"coco_results_{split}.json"), "w") as f:
        json.dump(results, f)
    evaluator = coco_evaluator()
    stats = coco_stats(os.path.join(cfg.data_root, "annotations", f"instances_{split}.json"), results, evaluator)
    metrics = {"split": split, "images": len(ds), "detections": len(results), "evaluator": evaluator[0], **stats}
    with open(os.path.join(out, f"metrics_{split}.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    print(f"evaluate: {split}: AP {stats['AP']:.4f}  AP50 {stats['AP50']:.4f}  ({len(ds)} images, "
          f"{len(results)} detections, {evaluator[0]}) -> {out}")
    return metrics


def visualize_split(net, cfg, device, out_dir, count=8, split=None):
    """Draw net's detections (score >= 0.5) on the first count images of a split into out_dir."""
    ds = data.make_test_loader(cfg, split).dataset
    os.makedirs(out_dir, exist_ok=True)
    paths = [ds.path(i) for i in range(min(count, len(ds)))]
    names = dict(zip(ds.label_to_cat_id.values(), ds.names[1:]))
    was_training = net.training
    net.eval()
    for (path, orig), size, det in predict(net, folder_batches(paths, cfg), device):
        records = [r for r in coco_records(det, size, orig, ds.label_to_cat_id) if r["score"] >= 0.5]
        draw(path, records, names, os.path.join(out_dir, os.path.basename(path)))
    net.train(was_training)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="upstream .pth or one of ours")
    p.add_argument("--config", default=None, help=f"preset for checkpoints without a config: {', '.join(config.PRESETS)}")
    p.add_argument("--images", help="folder of images to run on (instead of a COCO split)")
    p.add_argument("--data-root", default=None, help="COCO layout root (default: the config's data_root)")
    p.add_argument("--split", default=None, help="split to evaluate (default: the config's val_split)")
    p.add_argument("--output-dir", default=None, help="where the COCO results and metrics go")
    p.add_argument("--output", default="dets.json", help="results json")
    p.add_argument("--vis", default="", help="folder for drawn images")
    p.add_argument("--device", default=None, help="cpu, cuda or mlu (default: the config's, cpu if unavailable)")
    p.add_argument("--ims-per-batch", type=int, default=None,
                   help="images per forward over all processes (default: 1 for --images, test_ims_per_batch for COCO)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = p.parse_args(argv)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.device is None:
        cfg_device = config.get(args.config or "R-101-FPN", verbose=False).device
        ok = cfg_device == "cpu" or (cfg_device.startswith("cuda") and torch.cuda.is_available())
        args.device = cfg_device if ok else "cpu"
    device = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", 0)))
    # Upstream ran plain FP32; TF32 convolutions and matmuls (Ampere and later) would change its detections
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    overrides = list(args.overrides) + [f"device={device.type}"]
    if args.data_root:
        overrides.append(f"data_root={args.data_root}")
    if args.images:
        args.ims_per_batch = args.ims_per_batch or 1
        net, cfg = load_model(args.ckpt, args.config, overrides, device)
        return run_folder(args, net, cfg, device)
    if args.ims_per_batch:
        overrides.append(f"test_ims_per_batch={args.ims_per_batch}")
    net, cfg = load_model(args.ckpt, args.config, overrides, device)
    if cfg.test_ims_per_batch % world_size:
        raise config.ConfigError(f"--ims-per-batch {cfg.test_ims_per_batch} is not divisible by {world_size} "
                                 f"processes: use a multiple of {world_size}")
    if world_size > 1:
        init_distributed(device, rank, world_size)
    metrics = evaluate_coco(net, cfg, device, rank, world_size, args.split, args.output_dir or cfg.output_dir)
    if world_size > 1:
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    config.run_cli(main)
