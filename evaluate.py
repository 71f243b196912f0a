"""Inference and COCO evaluation of a checkpoint (upstream's .pth or ours), on a COCO split or on image files.

    # COCO box AP of the val split (upstream's checkpoint needs --config; ours carry theirs), one process or many
    python evaluate.py --ckpt e2e_faster_rcnn_R_101_FPN_1x.pth --config R-101-FPN data_root=datasets/coco \
        test_ims_per_batch=32 device=mlu
    torchrun --nproc_per_node 8 evaluate.py --ckpt output/r101/model_final.pth
    # detections on image files (files, folders or globs), drawn into vis/
    python evaluate.py --ckpt e2e_faster_rcnn_R_101_FPN_1x.pth --images photos/ --output dets.json --vis vis/
    python evaluate.py --ckpt output/demo/model_final.pth --images photos/raccoon-19*.jpg --vis vis/
    # a file written by export.py, run by ONNX Runtime on the CPU (its config and class names are inside)
    python evaluate.py --ckpt demo.onnx

Every config field is an override, as in train.py (key=value or --key value: device=cpu, score_thresh=0.5,
val_split=val2017, output_dir=...). The order is: the checkpoint, then its config (ours carry theirs; upstream's
take the --config preset, R-101-FPN by default) with the overrides, then the device, then the model.

A COCO split writes coco_results_{split}.json, metrics_{split}.json (with per-class AP) and pr_curves.png to
output_dir/eval_{checkpoint name}/ (beside a training's own results, never over them; output_dir= names the folder
itself) and prints the COCO table and the per-class one.
--images writes a JSON list, one record per detection: {"file_name", "bbox": [x, y, w, h] in the original image's
pixels with upstream's +1 width (w = x2 - x1 + 1), "score", "category_id"}, one image per forward unless
test_ims_per_batch is given: that reproduces upstream exactly (batching changes the padding, maskrcnn-benchmark
issue 633). --vis draws each file under its file_name (its path below the inputs' common folder, name and format
kept: photo.jpg and photo.png, or a/x.jpg and b/x.jpg, are two drawings). A file that cannot be read as an image
(empty, not an image, truncated) is skipped and named at the end, every readable one is done, and the exit code is
3 instead of 0; bad input otherwise is one paragraph and exit code 2.
"""
import collections
import colorsys
import contextlib
import dataclasses
import glob
import json
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # sleeping OpenMP waits on a busy CPU: see train.py

import numpy as np  # noqa: E402 (after OMP_WAIT_POLICY)
import torch  # noqa: E402 (after OMP_WAIT_POLICY)

import checkpoint
import config
import data
import launch
import logger
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
SKIPPED_EXIT = 3  # --images: every readable file done, some unreadable ones skipped (named on stderr)


def load(ckpt_path, preset=None, overrides=(), verbose=True):
    """(model on its device in eval mode, config, device, categories) of a checkpoint: the checkpoint, then its
    config (ours carry theirs; upstream's take `preset`, R-101-FPN by default) with the overrides, then the
    device, then the model. Refuses a checkpoint that does not fit the model exactly (checkpoint.load_state).
    categories: [{"id", "name"}] per label (1..K-1) from our checkpoint, COCO's for 81 classes, else numbers."""
    if str(ckpt_path).lower().endswith(".onnx"):  # an exported file (export.py), run by ONNX Runtime
        return load_onnx(ckpt_path, overrides, verbose)
    ckpt = checkpoint.load(ckpt_path)
    state = checkpoint.model_state(ckpt, repr(ckpt_path))  # a file that is no checkpoint is named before any work
    if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict):
        if preset and verbose:
            print(f"evaluate: {ckpt_path} carries its own config; --config {preset} ignored")
        cfg = config.get(config.from_dict(ckpt["config"]), overrides, verbose)
    else:
        cfg = config.get(preset or "R-101-FPN", overrides, verbose)
    device = launch.device(cfg.device, launch.env()[2])
    net = model.build_model(cfg)
    n = checkpoint.load_state(net, state, repr(ckpt_path))
    if verbose:
        print(f"evaluate: loaded {n} tensors from {ckpt_path}")
    categories = ckpt.get("categories") if isinstance(ckpt, dict) else None
    if not categories or len(categories) != cfg.num_classes - 1:
        categories = ([{"id": i, "name": n} for i, n in zip(COCO_IDS, COCO_NAMES)] if cfg.num_classes == 81 else
                      [{"id": i, "name": f"class {i}"} for i in range(1, cfg.num_classes)])
    return net.to(device).eval(), cfg, device, categories


# ---- an exported file (export.py): written there, read here
ONNX_CONFIG, ONNX_CATEGORIES = "frcnn_config", "frcnn_categories"  # its metadata keys


class OnnxDetector(torch.nn.Module):
    """An exported graph run by ONNX Runtime on the CPU, called as the model is in eval mode: (images (N, 3, Hp, Wp),
    image_sizes [(h, w)]) -> per image {"boxes", "scores", "labels"}. The graph takes one image: a batch runs image
    by image, each with the batch's padding as the model sees it. threads: ONNX Runtime's intra-op threads (0: its
    default, one per core)."""

    def __init__(self, path, threads=0):
        super().__init__()
        import onnxruntime
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3  # its warnings about unused initializers and shape merges are not the user's
        try:
            self.session = onnxruntime.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001  (onnxruntime's own exception types: not a model, bad graph)
            raise config.UserError(f"ONNX Runtime cannot read {path!r}: {str(e).splitlines()[0][:300]}") from None
        self.metadata = self.session.get_modelmeta().custom_metadata_map

    def forward(self, images, image_sizes):
        out = []
        for image, (h, w) in zip(images, image_sizes):
            boxes, scores, labels = self.session.run(None, {"image": image[None].float().numpy(),
                                                            "image_size": np.array([h, w], dtype=np.int64)})
            out.append({"boxes": torch.from_numpy(boxes), "scores": torch.from_numpy(scores),
                        "labels": torch.from_numpy(labels)})
        return out


def load_onnx(path, overrides=(), verbose=True):
    """load() of an exported file: (OnnxDetector, its config with the overrides, the CPU, its categories). Overrides
    change the host's side only (data, batch, output); what the graph holds (score_thresh, ...) is fixed at export."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise config.UserError(f"{path} is an ONNX file: running it needs onnxruntime (pip install -r "
                               f"requirements-onnx.txt)") from None
    if not os.path.isfile(path):
        raise config.UserError(f"ONNX file {path!r} does not exist")
    net = OnnxDetector(path)
    if ONNX_CONFIG not in net.metadata or ONNX_CATEGORIES not in net.metadata:
        raise config.UserError(f"{path} has no '{ONNX_CONFIG}' and '{ONNX_CATEGORIES}' in its metadata: not a file "
                               f"written by export.py, which evaluate.py needs for the preprocessing and class names")
    cfg = config.get(config.from_dict(json.loads(net.metadata[ONNX_CONFIG])), overrides, verbose)
    if verbose:
        print(f"evaluate: {path} runs in ONNX Runtime on the CPU")
    return net.eval(), dataclasses.replace(cfg, device="cpu", amp=""), torch.device("cpu"), \
        json.loads(net.metadata[ONNX_CATEGORIES])


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
        for images, sizes, targets, indices in loader:
            bad = {i: t["unreadable"] for i, t in zip(indices, targets) if "unreadable" in t}  # ImageFiles only
            mine.update((i, {"unreadable": why}) for i, why in bad.items())
            out = []
            if len(bad) < len(indices):  # an image that failed to decode is a stand-in: its detections are dropped
                with launch.autocast(device, amp):
                    out = net(images.to(device), sizes)
            for i, (rh, rw), det in zip(indices, sizes, out):
                if i in bad:
                    continue
                det = {k: v.cpu() for k, v in det.items()}
                ow, oh = ds.sizes[i]
                det["boxes"] = det["boxes"].to(torch.float32) * torch.tensor([ow / rw, oh / rh, ow / rw, oh / rh])
                mine[i] = det
            bar.update(len(indices))
    net.train(was_training)
    parts = launch.gather_objects(pack(mine))
    return {i: det for part in parts for i, det in unpack(part).items()} if parts else None


def pack(dets):
    """{index: det} as a few flat numpy arrays ("index" (n,), "count" (n,), and each det key concatenated), what a
    rank sends to rank 0: 8M detections of 80,000 images pickle as ~230 MiB of raw bytes, not 240,000 tensors.
    The files that could not be read (ImageFiles' {"unreadable": why}) travel beside them as {index: why}."""
    order = sorted(i for i, d in dets.items() if "unreadable" not in d)
    keys = sorted(dets[order[0]]) if order else []
    out = {"index": np.array(order, dtype=np.int64), "count": np.array([len(dets[i]["scores"]) for i in order],
                                                                       dtype=np.int64),
           "unreadable": {i: d["unreadable"] for i, d in dets.items() if "unreadable" in d}}
    for k in keys:
        v = torch.cat([dets[i][k] for i in order])
        out[k] = (v.float() if v.dtype == torch.bfloat16 else v).numpy()  # amp=bf16's scores: numpy has no bf16
    return out


def unpack(packed):
    """pack's {index: det} again, each det's tensors views of the packed arrays."""
    split = np.cumsum(packed["count"])[:-1]
    cols = {k: np.split(v, split) for k, v in packed.items() if k not in ("index", "count", "unreadable")}
    dets = {int(i): {k: torch.from_numpy(v[n]) for k, v in cols.items()} for n, i in enumerate(packed["index"])}
    dets.update((i, {"unreadable": why}) for i, why in packed["unreadable"].items())
    return dets


def coco_records(det, label_to_cat_id):
    """Detections of one image as COCO result records (without the image key): [x, y, w, h] with w = x2 - x1 + 1
    (legacy +1, upstream's BoxList.convert("xywh")), category_id the dataset's real id."""
    b = det["boxes"]
    xywh = torch.cat([b[:, :2], b[:, 2:] - b[:, :2] + 1], 1)
    return [{"category_id": label_to_cat_id[int(l)], "bbox": [float(v) for v in box], "score": float(s)}
            for box, s, l in zip(xywh, det["scores"], det["labels"])]


def coco_array(dets, image_ids, label_to_cat_id):
    """Detections {index: det} of the images image_ids[index] as one (N, 7) float64 array [image_id, x, y, w, h,
    score, category_id], images in index order: coco_records' numbers exactly (the same float32 +1 width, then
    float64), in the form every evaluator's loadRes takes without a Python dict per detection (80,000 images x 100
    detections: 430 MiB, not the ~6 GiB of coco_records' dicts)."""
    order = sorted(dets)
    if not order:
        return np.zeros((0, 7))
    b = torch.cat([dets[i]["boxes"] for i in order])
    lut = torch.zeros(max(label_to_cat_id) + 1, dtype=torch.float64)
    lut[list(label_to_cat_id)] = torch.tensor(list(label_to_cat_id.values()), dtype=torch.float64)
    ids = torch.tensor([image_ids[i] for i in order], dtype=torch.float64)
    return torch.cat([ids.repeat_interleave(torch.tensor([len(dets[i]["scores"]) for i in order]))[:, None],
                      b[:, :2].double(), (b[:, 2:] - b[:, :2] + 1).double(),
                      torch.cat([dets[i]["scores"] for i in order]).double()[:, None],
                      lut[torch.cat([dets[i]["labels"] for i in order])][:, None]], 1).numpy()


def dump_results(results, f, chunk=100_000):
    """Writes result records, or coco_array's rows as the same records, to the text file f: json.dump's very text
    of coco_records' list, built a chunk of rows at a time, so 8M detections never exist as dicts at once."""
    if not isinstance(results, np.ndarray):
        return json.dump(results, f)
    f.write("[")
    for start in range(0, len(results), chunk):
        rows = results[start:start + chunk].tolist()
        f.write(", " * (start > 0) + json.dumps([{"image_id": int(i), "category_id": int(c), "bbox": [x, y, w, h],
                                                 "score": s} for i, x, y, w, h, s, c in rows])[1:-1])
    f.write("]")


def class_colour(label):
    """A fixed, well-spread colour per class (hues a golden-ratio step apart)."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.8, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw(path, det, names, out_path, min_score):
    """The image file with its detections scoring at least min_score, each a box in its class's colour under a
    "name 0.87" label, lines and text sized to the image: one style for the demo, evaluation and image files."""
    from PIL import Image, ImageDraw, ImageFont
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
        # inside the image: a box at the right or bottom edge moves its label in, so its score is never cut off
        tx = max(0, min(x1, img.width - 1 - tw - 2 * pad))
        ty = max(0, min(ty, img.height - 1 - th - 2 * pad))
        pen.rectangle([tx, ty, tx + tw + 2 * pad, ty + th + 2 * pad], fill=colour)
        pen.text((tx + pad, ty + pad), text, font=font, fill="black" if sum(colour) > 380 else "white")
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    fmt = Image.registered_extensions().get(os.path.splitext(out_path)[1].lower(), "JPEG")  # the input's own format
    launch.atomic_write(out_path, lambda f: img.save(f, format=fmt, **({"quality": 90} if fmt == "JPEG" else {})))


def coco_evaluator(plain_ids=True):
    """(name, COCO, COCOeval) of the fastest installed evaluator that gives pycocotools' numbers: hotcoco
    (test_evaluate.py), else faster-coco-eval, else pycocotools itself, which alone reads a json whose ids are not
    all non-negative integers (plain_ids False: string category ids, say)."""
    if plain_ids:
        try:
            import hotcoco
            return "hotcoco", hotcoco.COCO, hotcoco.COCOeval
        except ImportError:
            pass
        try:
            from faster_coco_eval import COCO, COCOeval_faster
            return "faster-coco-eval", COCO, COCOeval_faster
        except ImportError:
            pass
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    return "pycocotools", COCO, COCOeval


STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def coco_eval(ann_file, results, evaluator=None):
    """(stats, per_class, pr) of result records (or coco_array's array) against ann_file; summarize() prints the
    COCO table.
    stats: the twelve COCOeval bbox numbers. per_class: [{"id", "name", "AP", "AP50", "AP75", "gt_boxes"}] per
    category in category id order (COCOeval's K axis): the mean of COCOeval's eval["precision"] entries > -1 at area
    all and 100 detections, over IoU .50:.95, at .5 and at .75 (detectron2's per-category AP, -1 instead of its NaN
    for a category without ground truth); gt_boxes counts its non-crowd boxes. pr: {"iou": (T,), "recall": (R,),
    "precision": (T, R, K) those precisions, -1 for a category without ground truth}."""
    name, COCO, COCOeval = evaluator or coco_evaluator()
    gt = COCO(ann_file)
    cat_ids = sorted(gt.getCatIds())
    if name == "hotcoco":  # its own counts: loadAnns makes a dict per box (0.9 s for 70,000 boxes)
        counts = {c["id"]: c["ann_count"] - c["crowd_count"] for c in gt.stats()["per_category"]}
    else:
        counts = collections.Counter(a["category_id"] for a in gt.anns.values() if not a.get("iscrowd", 0))
    gt_boxes = [counts.get(c, 0) for c in cat_ids]
    if len(results):
        e = COCOeval(gt, gt.loadRes(results), "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
        p = e.params
        assert list(p.catIds) == cat_ids, (p.catIds, cat_ids)
        stats = dict(zip(STAT_NAMES, map(float, list(e.stats)[:12])))
        iou, recall = np.asarray(p.iouThrs, dtype=float), np.asarray(p.recThrs, dtype=float)
        precision = np.asarray(e.eval["precision"])[:, :, :, list(p.areaRngLbl).index("all"),
                                                    list(p.maxDets).index(100)]  # (T, R, K)
    else:  # loadRes cannot take an empty list: precision 0 wherever there is something to find
        stats = dict.fromkeys(STAT_NAMES, 0.0)
        iou, recall = np.linspace(0.5, 0.95, 10), np.linspace(0, 1, 101)  # pycocotools' Params
        precision = np.where(np.array(gt_boxes) > 0, 0.0, -1.0)[None, None].repeat(10, 0).repeat(101, 1)

    def mean(x):
        x = x[x > -1]
        return float(x.mean()) if x.size else -1.0
    t50, t75 = int(np.argmin(abs(iou - 0.5))), int(np.argmin(abs(iou - 0.75)))
    names = {c["id"]: c["name"] for c in gt.loadCats(cat_ids)}
    per_class = [{"id": c, "name": names[c], "AP": mean(precision[:, :, k]), "AP50": mean(precision[t50, :, k]),
                  "AP75": mean(precision[t75, :, k]), "gt_boxes": n} for k, (c, n) in enumerate(zip(cat_ids, gt_boxes))]
    return stats, per_class, {"iou": iou, "recall": recall, "precision": precision}


def coco_stats(ann_file, results, evaluator=None):
    """The twelve COCOeval bbox numbers (summarize() prints the table) of result records against ann_file."""
    return coco_eval(ann_file, results, evaluator)[0]


def per_class_table(per_class, max_width=120):
    """The per-class numbers as console lines, in per_class's order (category id), read down each column: as many
    columns side by side as fit in max_width characters (one for up to 10 classes); "-" where a class has no
    ground truth."""
    width = max(5, min(24, max((len(c["name"]) for c in per_class), default=0)))
    head = f"{'class':<{width}} {'AP':>5} {'AP50':>5} {'AP75':>5} {'gt':>6}"

    def cell(c):
        aps = " ".join(f"{c[k]:5.3f}" if c[k] >= 0 else f"{'-':>5}" for k in ("AP", "AP50", "AP75"))
        return f"{c['name'][:width]:<{width}} {aps} {c['gt_boxes']:>6}"
    cols = 1 if len(per_class) <= 10 else max(1, (max_width + 3) // (len(head) + 3))
    rows = -(-len(per_class) // cols)
    cols = -(-len(per_class) // rows)
    lines = [" | ".join([head] * cols)]
    for r in range(rows):
        lines.append(" | ".join(cell(per_class[i]) for i in range(r, len(per_class), rows)))
    return "\n".join(lines)


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
    gathered on rank 0 by dataset index. Rank 0 prints the COCO table, the per-class table and AP/AP50, writes
    coco_results_{split}.json, metrics_{split}.json (with "per_class"), pr_curves.png and the drawings of the first
    cfg.vis_images images (vis/) to cfg.output_dir and returns the metrics (others: None)."""
    split, out = cfg.val_split, cfg.output_dir
    loader = data.make_test_loader(cfg, split, rank, world_size)
    data.check_classes(loader.dataset, cfg)
    dets = predict(net, loader, device, rank, cfg.amp)
    if rank != 0:
        return None
    ds = loader.dataset
    assert len(dets) == len(ds), f"evaluation gathered {len(dets)} of {len(ds)} images"
    # an array unless an id is not a plain integer (string ids: records, for pycocotools alone)
    results = (coco_array(dets, ds.ids, ds.label_to_cat_id) if ds.plain_ids else
               [{"image_id": ds.ids[i], **r} for i in sorted(dets) for r in coco_records(dets[i], ds.label_to_cat_id)])
    os.makedirs(out, exist_ok=True)
    launch.atomic_write(os.path.join(out, f"coco_results_{split}.json"), lambda f: dump_results(results, f), "w")
    evaluator = coco_evaluator(ds.plain_ids)
    stats, per_class, pr = coco_eval(ds.ann_file, results, evaluator)
    metrics = {"split": split, "images": len(ds), "detections": len(results), "evaluator": evaluator[0], **stats,
               "per_class": per_class}
    write_json(os.path.join(out, f"metrics_{split}.json"), metrics, indent=1)
    print(f"evaluate: per-class AP of {split} by category id (IoU .50:.95, area all, 100 detections; gt: non-crowd "
          f"boxes)\n{per_class_table(per_class)}")
    logger.plot_pr_curves(per_class, pr, os.path.join(out, "pr_curves.png"),
                   f"precision-recall on {split} ({len(ds)} images, {len(results)} detections, {evaluator[0]})")
    for i in range(min(cfg.vis_images, len(ds))):
        draw(ds.path(i), dets[i], ds.names, os.path.join(out, "vis", vis_name(ds, i)), cfg.vis_score)
    if cfg.vis_images:
        print(f"evaluate: drawings of the first {min(cfg.vis_images, len(ds))} images (score >= {cfg.vis_score}) "
              f"-> {os.path.join(out, 'vis')}")
    print(f"evaluate: {split}: AP {stats['AP']:.4f}  AP50 {stats['AP50']:.4f}  ({len(ds)} images, "
          f"{len(results)} detections, {evaluator[0]}) -> {out}")
    return metrics


def write_json(path, obj, **kw):
    """json.dump through a temporary file and rename: a full disk leaves no partial file (launch.atomic_write)."""
    launch.atomic_write(path, lambda f: json.dump(obj, f, **kw), "w")


def vis_name(ds, i):
    """A COCO split's drawing of image i: its file_name under the image folder, sub-folders kept (two
    'x.jpg' of different folders are two drawings); one that reaches outside the folder takes the image id."""
    rel = os.path.normpath(os.path.relpath(ds.path(i), ds.image_dir))
    return f"image_{ds.ids[i]}{os.path.splitext(rel)[1]}" if rel.startswith(os.pardir) else rel


def image_paths(specs):
    """(sorted image paths, the folder their file_name is relative to) of files, folders and globs: what --images
    takes, quoted or expanded by the shell."""
    paths = []
    for spec in specs:
        if os.path.isdir(spec):
            paths += [os.path.join(spec, f) for f in os.listdir(spec) if f.lower().endswith(IMAGE_EXTS)]
        elif os.path.isfile(spec):
            paths.append(spec)
        else:
            found = [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
            if not found:
                raise config.UserError(f"--images {spec!r} names no image file (a file, a folder holding "
                                       f"{', '.join(IMAGE_EXTS)} files, or a glob)")
            paths += found
    paths = sorted(set(os.path.normpath(p) for p in paths))
    if not paths:
        raise config.UserError(f"--images {' '.join(specs)} holds no {', '.join(IMAGE_EXTS)} file")
    return paths, os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])


def run_images(args, net, cfg, device, categories, rank, world_size):
    """Detections on the --images files into the --output json (the checkpoint's category ids), drawn into --vis
    (its class names) when given, each at its json file_name in its own name and format, so no two inputs share a
    drawing. A file that cannot be read is skipped and named at the end; returns how many were (main then exits
    with SKIPPED_EXIT). Folders it makes are removed again if it fails before writing there."""
    paths, base = image_paths(args.images)
    if os.path.isdir(args.output):
        raise config.UserError(f"--output {args.output} is a folder; name the json file to write (--output "
                               f"{os.path.join(args.output, 'dets.json')})")
    inputs = {os.path.realpath(p) for p in paths}
    for target in [args.output] + [os.path.join(args.vis, os.path.relpath(p, base)) for p in paths if args.vis]:
        if os.path.realpath(target) in inputs:  # --vis naming the images' own folder would draw over the photos
            raise config.UserError(f"writing {target} would overwrite an input image: choose another "
                                   f"{'--output' if target == args.output else '--vis folder'}")
    made = []
    for folder in [os.path.dirname(os.path.abspath(args.output))] + ([os.path.abspath(args.vis)] if args.vis else []):
        while not os.path.lexists(folder) and folder not in made:
            made, folder = made + [folder], os.path.dirname(folder)
    ds = data.ImageFiles(paths, cfg)  # reads each header: a file that is no image is set aside now
    skipped, done = dict(ds.unreadable), []
    try:
        for folder in sorted(made, key=len):  # before any inference: a bad path fails now, not after an hour
            os.makedirs(folder, exist_ok=True)
        dets = predict(net, data.make_test_loader(cfg, rank=rank, world_size=world_size, dataset=ds), device, rank,
                       cfg.amp) if ds.paths else {}
        if rank != 0:
            return 0
        skipped.update((ds.paths[i], d["unreadable"]) for i, d in dets.items() if "unreadable" in d)
        done = sorted(i for i, d in dets.items() if "unreadable" not in d)
        if not done:
            raise data.UnreadableImage(f"--images: none of the {len(paths)} files can be read as an image: "
                                       + skipped_list(skipped, base))
        label_to_cat_id = {label: c["id"] for label, c in enumerate(categories, 1)}
        results = [{"file_name": os.path.relpath(ds.paths[i], base), **r}
                   for i in done for r in coco_records(dets[i], label_to_cat_id)]
        write_json(args.output, results)  # first: the detections are the result, the drawings a view of it
        for i in done if args.vis else ():
            draw(ds.paths[i], dets[i], ["__background__"] + [c["name"] for c in categories],
                 os.path.join(args.vis, os.path.relpath(ds.paths[i], base)), cfg.vis_score)
    except BaseException as e:
        for folder in sorted(made, key=len, reverse=True):
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only where nothing was written
        if isinstance(e, OSError) and not isinstance(e, config.UserError) and e.filename in made:
            raise config.UserError(f"cannot create the output folder {e.filename!r}: {e.strerror}") from None
        raise
    print(f"evaluate: {len(results)} detections on {len(done)} images -> {args.output}"
          + (f"; drawn (score >= {cfg.vis_score}) into {args.vis}" if args.vis else ""))
    if skipped:
        print(f"evaluate: warning: {len(skipped)} of {len(paths)} files skipped, unreadable as images (exit code "
              f"{SKIPPED_EXIT}): {skipped_list(skipped, base)}", file=sys.stderr, flush=True)
    return len(skipped)


def skipped_list(unreadable, base, limit=20):
    """'a.jpg (the file is empty), ...' of {path: reason}, relative to base, at most limit named."""
    items = [f"{os.path.relpath(p, base)} ({why})" for p, why in sorted(unreadable.items())]
    return "; ".join(items[:limit]) + (f"; and {len(items) - limit} more" if len(items) > limit else "")


def main(argv=None):
    p = config.parser(__doc__)
    p.add_argument("--ckpt", required=True, help="upstream's .pth or one of ours")
    p.add_argument("--images", nargs="+", help="image files to run on instead of a COCO split: files, folders or "
                   "globs")
    p.add_argument("--output", default="dets.json", help="--images: the detections json (default dets.json)")
    p.add_argument("--vis", default="", help="--images: folder for the drawn images")
    args, overrides = config.parse(p, argv)
    if args.images:  # key=value after --images is an override, unless a file of that name exists
        overrides = [a for a in args.images if "=" in a and not os.path.exists(a)] + overrides
        args.images = [a for a in args.images if "=" not in a or os.path.exists(a)]
    rank, world_size, _ = launch.env()
    net, cfg, device, categories = load(args.ckpt, args.config, overrides, verbose=rank == 0)
    given = config.keys(overrides)
    if args.images and "test_ims_per_batch" not in given:  # one image per forward unless asked: upstream's numbers
        cfg = dataclasses.replace(cfg, test_ims_per_batch=1)
    if not args.images and "output_dir" not in given:  # beside a training's own results, never over them
        cfg = dataclasses.replace(cfg, output_dir=os.path.join(
            cfg.output_dir, "eval_" + os.path.splitext(os.path.basename(args.ckpt))[0]))
    launch.numeric_policy(cfg)  # FP32 as upstream ran it; TF32 only with tf32=true
    if cfg.test_ims_per_batch % world_size:
        raise config.ConfigError(f"test_ims_per_batch={cfg.test_ims_per_batch} is not divisible by {world_size} "
                                 f"processes: use a multiple of {world_size}")
    launch.init_process_group(device, rank, world_size)
    if args.images:
        result = run_images(args, net, cfg, device, categories, rank, world_size)
    else:
        with launch.output_dir(cfg.output_dir, rank):
            result = evaluate_coco(net, cfg, device, rank, world_size)
    launch.finish(world_size)
    if args.images and result:
        sys.exit(SKIPPED_EXIT)
    return result


if __name__ == "__main__":
    launch.run_cli(main)
