"""Inference and COCO evaluation of a checkpoint (upstream's .pth or ours), on a COCO split or on image files.

    # COCO box AP of the val split (upstream's checkpoint needs --config; ours carry theirs), one process or many
    python evaluate.py --ckpt e2e_faster_rcnn_R_101_FPN_1x.pth --config R-101-FPN data_root=datasets/coco \
        test_ims_per_batch=32 device=mlu
    torchrun --nproc_per_node 8 evaluate.py --ckpt output/r101/model_final.pth
    # detections on image files (a file, a folder or a glob), drawn into vis/
    python evaluate.py --ckpt e2e_faster_rcnn_R_101_FPN_1x.pth --images photos/ --output dets.json --vis vis/

Every config field is an override, as in train.py (key=value or --key value: device=cpu, score_thresh=0.5,
val_split=val2017, output_dir=...). The order is: the checkpoint, then its config (ours carry theirs; upstream's
take the --config preset, R-101-FPN by default) with the overrides, then the device, then the model.

A COCO split writes coco_results_{split}.json and metrics_{split}.json to output_dir and prints the COCO table.
--images writes a JSON list, one record per detection: {"file_name", "bbox": [x, y, w, h] in the original image's
pixels with upstream's +1 width (w = x2 - x1 + 1), "score", "category_id"}, one image per forward unless
test_ims_per_batch is given: that reproduces upstream exactly (batching changes the padding, maskrcnn-benchmark
issue 633).
"""
import colorsys
import glob
import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # sleeping OpenMP waits on a busy CPU: see train.py

import torch  # noqa: E402 (after OMP_WAIT_POLICY)

import checkpoint
import config
import data
import launch
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


def load(ckpt_path, preset=None, overrides=(), verbose=True):
    """(model on its device in eval mode, config, device, categories) of a checkpoint: the checkpoint, then its
    config (ours carry theirs; upstream's take `preset`, R-101-FPN by default) with the overrides, then the
    device, then the model. Refuses a checkpoint that does not fit the model exactly (checkpoint.load_state).
    categories: [{"id", "name"}] per label (1..K-1) from our checkpoint, COCO's for 81 classes, else numbers."""
    ckpt = checkpoint.load(ckpt_path)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict):
        if preset and verbose:
            print(f"evaluate: {ckpt_path} carries its own config; --config {preset} ignored")
        cfg = config.get(config.from_dict(ckpt["config"]), overrides, verbose)
    else:
        cfg = config.get(preset or "R-101-FPN", overrides, verbose)
    device = launch.device(cfg.device, launch.env()[2])
    net = model.build_model(cfg)
    n = checkpoint.load_state(net, checkpoint.model_state(ckpt), repr(ckpt_path))
    if verbose:
        print(f"evaluate: loaded {n} tensors from {ckpt_path}")
    categories = ckpt.get("categories") if isinstance(ckpt, dict) else None
    if not categories or len(categories) != cfg.num_classes - 1:
        categories = ([{"id": i, "name": n} for i, n in zip(COCO_IDS, COCO_NAMES)] if cfg.num_classes == 81 else
                      [{"id": i, "name": f"class {i}"} for i in range(1, cfg.num_classes)])
    return net.to(device).eval(), cfg, device, categories


def predict(net, loader, device, rank=0, amp=""):
    """Detections on every image of loader.dataset, each rank running its shard, gathered on rank 0 by dataset
    index: {index: {"boxes" (D, 4) float32 xyxy, "scores" (D,), "labels" (D,) 1..K-1}} on the CPU (None on other
    ranks). Boxes are in the original image's pixels (the json's size for a COCO split), rescaled per axis from the
    resized input without +1, as upstream's prepare_for_coco_detection (BoxList.resize). amp: config's amp."""
    from tqdm import tqdm
    ds, was_training = loader.dataset, net.training
    net.eval()
    mine = {}
    with torch.inference_mode(), tqdm(total=sum(len(b) for b in loader.batch_sampler), desc="images",
                                      disable=rank != 0, leave=False) as bar:
        for images, sizes, _, indices in loader:
            with launch.autocast(device, amp):
                out = net(images.to(device), sizes)
            for i, (rh, rw), det in zip(indices, sizes, out):
                det = {k: v.cpu() for k, v in det.items()}
                ow, oh = ds.sizes[i]
                det["boxes"] = det["boxes"].to(torch.float32) * torch.tensor([ow / rw, oh / rh, ow / rw, oh / rh])
                mine[i] = det
            bar.update(len(indices))
    net.train(was_training)
    parts = launch.gather_objects(mine)
    return {i: det for part in parts for i, det in part.items()} if parts else None


def coco_records(det, label_to_cat_id):
    """Detections of one image as COCO result records (without the image key): [x, y, w, h] with w = x2 - x1 + 1
    (legacy +1, upstream's BoxList.convert("xywh")), category_id the dataset's real id."""
    b = det["boxes"]
    xywh = torch.cat([b[:, :2], b[:, 2:] - b[:, :2] + 1], 1)
    return [{"category_id": label_to_cat_id[int(l)], "bbox": [float(v) for v in box], "score": float(s)}
            for box, s, l in zip(xywh, det["scores"], det["labels"])]


def class_colour(label):
    """A fixed, well-spread colour per class (hues a golden-ratio step apart)."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.8, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw(path, det, names, out_path, min_score):
    """The image file with its detections scoring at least min_score, each a box in its class's colour under a
    "name 0.87" label, lines and text sized to the image: one style for the demo, evaluation and image files."""
    from PIL import ImageDraw, ImageFont
    img = data.load_image(path)
    side = max(img.size)
    line, pad = max(2, round(side / 300)), max(1, round(side / 600))
    try:
        font = ImageFont.load_default(size=max(11, round(side / 45)))  # scalable: Pillow 10.1+ with FreeType
    except (TypeError, OSError):
        font = ImageFont.load_default()
    pen = ImageDraw.Draw(img)
    keep = det["scores"] >= min_score
    for (x1, y1, x2, y2), label, score in zip(det["boxes"][keep].tolist(), det["labels"][keep].tolist(),
                                              det["scores"][keep].tolist()):
        colour = class_colour(label)
        pen.rectangle([x1, y1, max(x1, x2), max(y1, y2)], outline=colour, width=line)  # legacy boxes can be < 1 px
        text = f"{names[label]} {score:.2f}"
        _, _, tw, th = pen.textbbox((0, 0), text, font=font)
        ty = y1 - th - 2 * pad if y1 - th - 2 * pad >= 0 else y1  # above the box, or inside it at the top edge
        pen.rectangle([x1, ty, x1 + tw + 2 * pad, ty + th + 2 * pad], fill=colour)
        pen.text((x1 + pad, ty + pad), text, font=font, fill="black" if sum(colour) > 380 else "white")
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    img.save(out_path, quality=90)


def coco_evaluator():
    """(name, COCO, COCOeval) of the fastest installed evaluator that gives pycocotools' numbers: hotcoco
    (test_evaluate.py), else faster-coco-eval, else pycocotools itself."""
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


def detection_agreement(a, b, iou=0.99, score_tol=1e-3):
    """How far two runs' detections agree (the CPU against an accelerator, one commit against another):
    (matched, len(a), len(b)) for two lists of detection records ({"file_name" or "image_id", "bbox" [x, y, w, h],
    "score", "category_id"}, as coco_records and --images write them): a pair matches with the same image and label,
    IoU > iou (or the same four numbers to 0.01 px: a degenerate box, whose w or h the rescaling without +1 can make
    negative, has no IoU) and scores within score_tol; greedily by a's score, the best IoU first, each detection
    used once."""
    import torchvision

    def group(records):
        out = {}
        for r in records:
            out.setdefault((r.get("file_name", r.get("image_id")), r["category_id"]), []).append(r)
        return out

    def xyxy(records):
        return torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in records)], dtype=torch.float64)

    groups_b, matched = group(b), 0
    for key, ra in group(a).items():
        rb = groups_b.get(key, [])
        if not rb:
            continue
        ious = torchvision.ops.box_iou(xyxy(ra), xyxy(rb))
        same = (xyxy(ra)[:, None] - xyxy(rb)[None]).abs().amax(2) <= 0.01
        sa, sb = (torch.tensor([r["score"] for r in rs], dtype=torch.float64) for rs in (ra, rb))
        ok = ((ious > iou) | same) & ((sa[:, None] - sb[None]).abs() <= score_tol)
        used = torch.zeros(len(rb), dtype=torch.bool)
        for i in sa.argsort(descending=True).tolist():
            cand = torch.nonzero(ok[i] & ~used).squeeze(1)
            if len(cand):
                used[cand[ious[i, cand].argmax()]] = True
                matched += 1
    return matched, len(a), len(b)


def evaluate_coco(net, cfg, device, rank=0, world_size=1):
    """COCO box evaluation of cfg.val_split as upstream's inference(): every image once, sharded over ranks and
    gathered on rank 0 by dataset index. Rank 0 prints the COCO table and AP/AP50, writes coco_results_{split}.json,
    metrics_{split}.json and the drawings of the first cfg.vis_images images (vis/) to cfg.output_dir and returns
    the metrics (others: None)."""
    split, out = cfg.val_split, cfg.output_dir
    loader = data.make_test_loader(cfg, split, rank, world_size)
    data.check_classes(loader.dataset, cfg)
    dets = predict(net, loader, device, rank, cfg.amp)
    if rank != 0:
        return None
    ds = loader.dataset
    assert len(dets) == len(ds), f"evaluation gathered {len(dets)} of {len(ds)} images"
    results = [{"image_id": ds.ids[i], **r} for i in sorted(dets) for r in coco_records(dets[i], ds.label_to_cat_id)]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"coco_results_{split}.json"), "w") as f:
        json.dump(results, f)
    evaluator = coco_evaluator()
    stats = coco_stats(ds.ann_file, results, evaluator)
    metrics = {"split": split, "images": len(ds), "detections": len(results), "evaluator": evaluator[0], **stats}
    with open(os.path.join(out, f"metrics_{split}.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    for i in range(min(cfg.vis_images, len(ds))):
        draw(ds.path(i), dets[i], ds.names, os.path.join(out, "vis", os.path.basename(ds.path(i))), cfg.vis_score)
    if cfg.vis_images:
        print(f"evaluate: drawings of the first {min(cfg.vis_images, len(ds))} images (score >= {cfg.vis_score}) "
              f"-> {os.path.join(out, 'vis')}")
    print(f"evaluate: {split}: AP {stats['AP']:.4f}  AP50 {stats['AP50']:.4f}  ({len(ds)} images, "
          f"{len(results)} detections, {evaluator[0]}) -> {out}")
    return metrics


def image_paths(spec):
    """(sorted image paths, the folder their file_name is relative to) of a file, a folder or a glob."""
    if os.path.isdir(spec):
        paths = sorted(os.path.join(spec, f) for f in os.listdir(spec) if f.lower().endswith(IMAGE_EXTS))
        base = spec
    elif os.path.isfile(spec):
        paths, base = [spec], os.path.dirname(spec)
    else:
        paths = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        base = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
    if not paths:
        raise config.UserError(f"--images {spec!r} names no image file (a file, a folder holding "
                               f"{', '.join(IMAGE_EXTS)} files, or a glob)")
    return paths, base


def run_images(args, net, cfg, device, categories, rank, world_size):
    """Detections on the --images files into the --output json (the checkpoint's category ids), drawn into --vis
    (its class names) when given."""
    paths, base = image_paths(args.images)
    for folder in [os.path.dirname(os.path.abspath(args.output))] + ([args.vis] if args.vis else []):
        try:  # before any inference: a bad path fails now, not after an hour
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise config.UserError(f"cannot create the output folder {folder!r}: {e.strerror}") from None
    label_to_cat_id = {label: c["id"] for label, c in enumerate(categories, 1)}
    names = ["__background__"] + [c["name"] for c in categories]
    loader = data.make_test_loader(cfg, rank=rank, world_size=world_size, dataset=data.ImageFiles(paths, cfg))
    dets = predict(net, loader, device, rank, cfg.amp)
    if rank != 0:
        return
    results = []
    for i in sorted(dets):
        rel = os.path.relpath(paths[i], base)
        results += [{"file_name": rel, **r} for r in coco_records(dets[i], label_to_cat_id)]
        if args.vis:
            draw(paths[i], dets[i], names, os.path.join(args.vis, os.path.splitext(rel)[0] + ".jpg"), cfg.vis_score)
    with open(args.output, "w") as f:
        json.dump(results, f)
    print(f"evaluate: {len(results)} detections on {len(paths)} images -> {args.output}")


def main(argv=None):
    p = config.parser(__doc__)
    p.add_argument("--ckpt", required=True, help="upstream's .pth or one of ours")
    p.add_argument("--images", help="image files to run on instead of a COCO split: a file, a folder or a glob")
    p.add_argument("--output", default="dets.json", help="--images: the detections json (default dets.json)")
    p.add_argument("--vis", default="", help="--images: folder for the drawn images")
    args, overrides = config.parse(p, argv)
    rank, world_size, _ = launch.env()
    if args.images:  # one image per forward unless asked: upstream's exact numbers
        overrides = ["test_ims_per_batch=1"] + overrides
    net, cfg, device, categories = load(args.ckpt, args.config, overrides, verbose=rank == 0)
    launch.numeric_policy(cfg)  # FP32 as upstream ran it; TF32 only with tf32=true
    if cfg.test_ims_per_batch % world_size:
        raise config.ConfigError(f"test_ims_per_batch={cfg.test_ims_per_batch} is not divisible by {world_size} "
                                 f"processes: use a multiple of {world_size}")
    launch.init_process_group(device, rank, world_size)
    if args.images:
        result = run_images(args, net, cfg, device, categories, rank, world_size)
    else:
        result = evaluate_coco(net, cfg, device, rank, world_size)
    launch.finish(world_size)
    return result


if __name__ == "__main__":
    launch.run_cli(main)
