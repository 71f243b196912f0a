"""Configuration: one dataclass whose defaults are maskrcnn-benchmark's e2e_faster_rcnn_R_101_FPN_1x as it
ran (maskrcnn_benchmark/config/defaults.py merged with configs/e2e_faster_rcnn_R_101_FPN_1x.yaml), presets,
and the command-line grammar every script shares.

    cfg = config.get("R-50-FPN", ["max_iter=1000", "--base_lr", "0.01"])

Every field's trailing comment gives its unit and whether it counts per image, per level or per batch
(upstream's FPN_POST_NMS_TOP_N_TRAIN trap came from that ambiguity); `--help` lists them. Overrides are
type-checked against the default's type and choice fields against their choices, printed, and an unknown key
is refused with the closest valid names.
"""
import argparse
import ast
import dataclasses
import difflib
import inspect
import math
import re
from dataclasses import dataclass


class UserError(Exception):
    """A mistake the user can fix (config, data, checkpoint, device): the scripts print its message with exit
    code 2 and no traceback (launch.run_cli). Subclasses say where it came from."""


class ConfigError(UserError, ValueError):
    """Bad user input in the configuration: the message says what to change."""


@dataclass
class Config:
    # ---- backbone: ResNet with Bottleneck blocks (STRIDE_IN_1X1, MSRA style) + FPN
    stage_blocks: tuple = (3, 4, 23, 3)  # bottleneck blocks in res2..res5 (R-101; R-50 is 3,4,6,3)
    stem_channels: int = 64  # output channels of the 7x7 stem conv
    width_per_group: int = 64  # bottleneck width of res2, doubled per stage (64,128,256,512)
    norm: str = "frozen_bn"  # "frozen_bn" (upstream: fixed affine, no eps) or "gn" (GroupNorm 32, trainable)
    freeze_at: int = 2  # stages with requires_grad False: 0 none, 1 stem, 2 stem + layer1
    fpn_channels: int = 256  # FPN width (BACKBONE_OUT_CHANNELS)
    num_classes: int = 81  # box-head classes including background 0: the json's categories + 1 (COCO: 80 + 1)

    # ---- anchors and RPN
    anchor_sizes: tuple = (32, 64, 128, 256, 512)  # anchor side in resized-image pixels, one per level P2..P6
    anchor_strides: tuple = (4, 8, 16, 32, 64)  # feature stride in pixels of P2..P6
    aspect_ratios: tuple = (0.5, 1.0, 2.0)  # anchor h/w ratios, in this order (row a of cell_anchors)
    straddle_thresh: int = 0  # pixels an anchor may cross the image border and still get a label
    rpn_fg_iou: float = 0.7  # IoU at or above which an anchor is positive
    rpn_bg_iou: float = 0.3  # IoU below which an anchor is negative
    rpn_batch_per_image: int = 256  # anchors sampled per image for the RPN loss
    rpn_positive_fraction: float = 0.5  # max fraction of positives among those anchors
    rpn_pre_nms_top_n_train: int = 2000  # proposals kept per level per image before NMS, training
    rpn_pre_nms_top_n_test: int = 1000  # the same at test
    rpn_post_nms_top_n_train: int = 2000  # proposals kept per level per image after NMS, training
    rpn_post_nms_top_n_test: int = 1000  # the same at test
    fpn_post_nms_top_n_train: int = 2000  # proposals kept over all levels: per *batch on one device* if
    #   fpn_post_nms_per_batch (upstream quirk, use 1000 x images per device), else per image
    fpn_post_nms_top_n_test: int = 1000  # proposals kept over all levels per image, test
    fpn_post_nms_per_batch: bool = True  # upstream default: the training top-n spans the device's batch
    scale_fpn_post_nms_train: bool = True  # with fpn_post_nms_per_batch, train.py scales fpn_post_nms_top_n_train
    #   by images per device / 2 (upstream tuned 2000 for 2 per device; maskrcnn-benchmark issue 672)
    rpn_nms_thresh: float = 0.7  # IoU threshold of the RPN's per-level NMS
    rpn_min_size: int = 0  # proposals narrower than this many pixels are removed (0: none)

    # ---- RoI box head
    roi_fg_iou: float = 0.5  # IoU at or above which a proposal is foreground
    roi_bg_iou: float = 0.5  # IoU below which a proposal is background (equal: no ignore band)
    roi_batch_per_image: int = 512  # proposals sampled per image for the box-head loss
    roi_positive_fraction: float = 0.25  # max fraction of foreground among those proposals
    bbox_reg_weights: tuple = (10.0, 10.0, 5.0, 5.0)  # box coder weights (wx, wy, ww, wh) of the box head
    pooler_resolution: int = 7  # RoIAlign output side in feature pixels
    pooler_sampling_ratio: int = 2  # RoIAlign samples per bin side (legacy aligned=False)
    mlp_dim: int = 1024  # width of fc6 and fc7
    score_thresh: float = 0.05  # detections need a class probability strictly above this
    nms_thresh: float = 0.5  # per-class NMS IoU threshold at test
    detections_per_img: int = 100  # detections kept per image over all classes

    # ---- input (data.py); sizes are pixels of the resized image
    min_size_train: tuple = (800,)  # short-side choices, one drawn per training image
    max_size_train: int = 1333  # long-side cap, training
    min_size_test: int = 800  # short side at test
    max_size_test: int = 1333  # long-side cap at test
    pixel_mean: tuple = (102.9801, 115.9465, 122.7717)  # B, G, R means on the 0..255 scale
    size_divisibility: int = 32  # batches are zero-padded to a multiple of this (pixels)
    flip_prob: float = 0.5  # horizontal-flip probability per training image
    crop_size: int = 0  # random crop side in pixels before resizing, training (0: off; MLU recipe 300)
    fixed_size: int = 0  # resize to fixed_size x fixed_size instead of the short/long rule (0: off)
    brightness: float = 0.0  # colour-jitter strength, training: factor drawn in [1 - b, 1 + b] (upstream: 0, off)
    contrast: float = 0.0  # the same for contrast
    saturation: float = 0.0  # the same for saturation
    hue: float = 0.0  # hue shift drawn in [-hue, hue], a fraction of the colour circle (at most 0.5)

    # ---- data
    data_root: str = "datasets/coco"  # COCO layout: annotations/instances_{split}.json and {split}/
    demo_data: str = ""  # a folder where demo.py writes its generated shapes when they are absent, used when
    #   data_root is that folder (the demo preset: its own data_root)
    train_split: str = "train2017"  # training split: annotations/instances_{split}.json and {split}/
    val_split: str = "val2017"  # split evaluated during and after training, and by evaluate.py
    train_ann: str = ""  # the training split's COCO json, when not in data_root's layout ("" = that layout)
    train_images: str = ""  # the folder its file_name paths are relative to ("" = data_root/train_split)
    val_ann: str = ""  # the same for the validation split
    val_images: str = ""  # the same for the validation split
    num_workers: int = 4  # data-loader worker processes per device
    aspect_grouping: bool = True  # batches of one aspect group only (h/w < 1 and h/w >= 1), as upstream

    # ---- solver (train.py)
    ims_per_batch: int = 16  # images per iteration over all devices (global batch)
    base_lr: float = 0.02  # learning rate at 16 images per iteration; scaled linearly with ims_per_batch
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # L2 weight decay of weights; biases get weight_decay_bias
    weight_decay_bias: float = 0.0  # weight decay on biases (upstream: none)
    bias_lr_factor: float = 2.0  # biases train at base_lr x this
    gamma: float = 0.1  # lr factor at each step
    max_iter: int = 90000  # iterations (each of ims_per_batch images)
    schedule_ref: int = 90000  # the max_iter that steps and warmup_iters are written for; both are
    #   scaled by max_iter / schedule_ref, so shortening max_iter shortens the whole schedule
    steps: tuple = (60000, 80000)  # lr steps in iterations of a schedule_ref-long run
    warmup_iters: int = 500  # linear warmup length in iterations of a schedule_ref-long run
    warmup_factor: float = 1.0 / 3  # lr multiplier at iteration 0
    checkpoint_period: int = 2500  # iterations between checkpoints
    keep_checkpoints: int = 3  # newest checkpoints kept in output_dir
    eval_period: int = 0  # iterations between evaluations (0: only at the end)
    log_period: int = 20  # iterations between log lines
    amp: str = ""  # "" (FP32, upstream), "bf16" or "fp16" autocast: convolutions and matmuls in 16 bits, losses,
    #   softmax and box decoding in float32 (README, Speed); bf16 is the fast path on accelerators
    tf32: bool = False  # TF32 tensor cores for FP32 convolutions and matmuls on CUDA/MLU (launch.numeric_policy, train
    #   and evaluation alike): faster, 10-bit mantissa products; off as upstream ran (V100s have no TF32)
    channels_last: bool = True  # backbone in NHWC memory order: faster oneDNN (CPU) and tensor-core (bf16, TF32)
    #   convolutions; the values differ from NCHW's in the last bits (other kernels)
    compile_backbone: str = ""  # torch.compile the backbone in this mode: "default", "reduce-overhead" (CUDA graphs,
    #   fixed-size batches) or "max-autotune"; "" off. Fused kernels: last-bit differences, minutes to compile
    seed: int = 0  # base random seed (each rank adds its rank)
    weights: str = "R-101.pkl"  # initial weights: Detectron's ImageNet pickle (R-101.pkl, R-50.pkl), or a
    #   detector checkpoint to fine-tune (upstream's .pth or ours; another class count skips the predictor);
    #   "" = from scratch, refused when layers are frozen (freeze_at > 0 or norm=frozen_bn)
    output_dir: str = "output"  # checkpoints, logs and results

    # ---- test
    test_ims_per_batch: int = 8  # images per forward at test, over all devices (upstream: 8 on 8 GPUs)
    vis_images: int = 0  # evaluation draws the detections on this many first images into output_dir/vis
    vis_score: float = 0.5  # drawings show detections scoring at least this
    device: str = "cuda"  # cpu, cuda or mlu (each process takes card LOCAL_RANK)


CHOICES = {"norm": ("frozen_bn", "gn"), "amp": ("", "bf16", "fp16"), "device": ("cpu", "cuda", "mlu"),
           "compile_backbone": ("", "default", "reduce-overhead", "max-autotune")}


PRESETS = {
    "R-101-FPN": Config(),
    "R-50-FPN": Config(stage_blocks=(3, 4, 6, 3), weights="R-50.pkl"),
    # The built-in demo: a small trainable-norm network on generated shapes, minutes on a laptop CPU.
    "demo": Config(
        stage_blocks=(1, 1, 1, 1), stem_channels=16, width_per_group=16, norm="gn", freeze_at=0, weights="",
        fpn_channels=32, mlp_dim=256, num_classes=4,
        anchor_sizes=(16, 32, 64, 128, 256), rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=150, fpn_post_nms_top_n_train=300,
        fpn_post_nms_per_batch=False, fpn_post_nms_top_n_test=150, rpn_batch_per_image=128,
        roi_batch_per_image=128, min_size_train=(224, 256, 288), max_size_train=400, min_size_test=256,
        max_size_test=400, data_root="datasets/demo", demo_data="datasets/demo", num_workers=0, ims_per_batch=4,
        # lr 0.08 x 4/16 = 0.02: a from-scratch GN net takes 4x upstream's per-image lr; AP50 ~0.96 at 700 iterations
        base_lr=0.08, max_iter=700, schedule_ref=700, steps=(500, 630), warmup_iters=50, checkpoint_period=200,
        log_period=50,
        test_ims_per_batch=4, vis_images=8, device="cpu", output_dir="output/demo",
    ),
}


def _parse_value(name, text, default):
    """Parse `text` into the type of `default`; raise ConfigError naming the field otherwise."""
    kind = type(default)
    try:
        if kind is bool:
            low = text.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return low in ("true", "1", "yes")
        if kind is tuple:
            value = ast.literal_eval(text if text.strip().startswith("(") else f"({text},)")
            value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
            inner = type(default[0]) if default else None
            if inner is float:
                value = tuple(float(v) for v in value)
            elif inner is not None and not all(isinstance(v, inner) for v in value):
                raise ValueError
            return value
        if kind is float:
            return float(text)
        if kind is int:
            return int(text)
        return str(text)
    except (ValueError, SyntaxError):
        raise ConfigError(f"config field '{name}' expects {kind.__name__} like {default!r}, got {text!r}") from None


def _pairs(overrides):
    """Turn ["a=1", "--b", "2", "--c=3"] into [("a", "1"), ("b", "2"), ("c", "3")]."""
    pairs, items = [], list(overrides)
    while items:
        item = items.pop(0)
        key = item[2:] if item.startswith("--") else item
        if "=" in key:
            key, value = key.split("=", 1)
        elif item.startswith("--") and items:
            value = items.pop(0)
        else:
            raise ConfigError(f"cannot read config override {item!r}: write key=value or --key value")
        pairs.append((key.replace("-", "_"), value))
    return pairs


def keys(overrides):
    """The config fields that command-line overrides set."""
    return {key for key, _ in _pairs(overrides)}


def get(preset="R-101-FPN", overrides=(), verbose=True):
    """The preset's Config with command-line overrides applied (and printed when verbose)."""
    if isinstance(preset, Config):
        cfg = preset
    elif preset in PRESETS:
        cfg = PRESETS[preset]
    else:
        raise ConfigError(f"unknown config preset {preset!r}; choose one of {', '.join(PRESETS)}")
    names = {f.name: f for f in dataclasses.fields(Config)}
    changes = {}
    for key, text in _pairs(overrides):
        if key not in names:
            close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint} (all keys: python train.py --help)")
        changes[key] = _parse_value(key, text, getattr(cfg, key))
    if verbose:
        for key, value in changes.items():
            print(f"config: {key} = {value!r} (preset: {getattr(cfg, key)!r})")
    cfg = dataclasses.replace(cfg, **changes)
    validate(cfg)
    return cfg


# The range of every numeric field with a meaning to check: (low, high, what), low/high None for open ends;
# tuple fields are checked element by element. Relations between fields are checked in validate().
_POSITIVE = (1, None, "a positive integer")
RANGES = {
    **dict.fromkeys(("stem_channels", "width_per_group", "fpn_channels", "rpn_batch_per_image", "mlp_dim",
                     "rpn_pre_nms_top_n_train", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_train",
                     "rpn_post_nms_top_n_test", "fpn_post_nms_top_n_train", "fpn_post_nms_top_n_test",
                     "roi_batch_per_image", "pooler_resolution", "min_size_train", "max_size_train", "min_size_test",
                     "max_size_test", "ims_per_batch", "test_ims_per_batch", "max_iter", "schedule_ref",
                     "checkpoint_period", "keep_checkpoints", "log_period", "stage_blocks", "anchor_sizes",
                     "anchor_strides"), _POSITIVE),
    **dict.fromkeys(("rpn_fg_iou", "rpn_bg_iou", "rpn_positive_fraction", "roi_fg_iou", "roi_bg_iou",
                     "roi_positive_fraction", "score_thresh", "nms_thresh", "rpn_nms_thresh", "flip_prob",
                     "vis_score", "warmup_factor", "gamma", "momentum"), (0, 1, "between 0 and 1")),
    **dict.fromkeys(("straddle_thresh", "rpn_min_size", "size_divisibility", "crop_size", "fixed_size",
                     "num_workers", "warmup_iters", "eval_period", "detections_per_img", "vis_images", "steps",
                     "weight_decay", "weight_decay_bias", "bias_lr_factor", "brightness", "contrast", "saturation"),
                    (0, None, "0 or more")),
    "num_classes": (2, None, "at least 2 (background and one class)"),
    "base_lr": (1e-12, None, "positive"),
    "aspect_ratios": (1e-6, None, "positive"), "bbox_reg_weights": (1e-6, None, "positive"),
    "hue": (0, 0.5, "between 0 and 0.5"),
    "pooler_sampling_ratio": (-1, None, "-1 or more (0 or less: adaptive)"),
    "freeze_at": (0, 2, "0, 1 or 2"),
}


def validate(cfg):
    """Refuse a value outside a choice field's choices or a numeric field's range, naming the field and what is
    valid: a bad value fails at parse time, not as a hang or a torch traceback an hour later."""
    for name, choices in CHOICES.items():
        value = getattr(cfg, name)
        if (value.split(":")[0] if name == "device" else value) not in choices:
            raise ConfigError(f"config field {name!r} is {value!r}; choose one of "
                              + ", ".join(repr(c) for c in choices))
    for f in dataclasses.fields(cfg):  # nan and inf pass every comparison below, or fail it in silence
        value = getattr(cfg, f.name)
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, tuple) else [value])):
            raise ConfigError(f"config field {f.name!r} is {value!r}; it must be a finite number")
    for name, (low, high, what) in RANGES.items():
        value = getattr(cfg, name)
        for v in value if isinstance(value, tuple) else (value,):
            if (low is not None and v < low) or (high is not None and v > high):
                raise ConfigError(f"config field {name!r} is {value!r}; it must be {what}")
    for a, b in (("rpn_bg_iou", "rpn_fg_iou"), ("roi_bg_iou", "roi_fg_iou")):
        if getattr(cfg, a) > getattr(cfg, b):
            raise ConfigError(f"config fields {a}={getattr(cfg, a)} and {b}={getattr(cfg, b)}: {a} must not exceed {b}")
    if len(cfg.anchor_sizes) != len(cfg.anchor_strides) or len(cfg.stage_blocks) != 4:
        raise ConfigError(f"anchor_sizes {cfg.anchor_sizes} needs one size per anchor_strides level "
                          f"{cfg.anchor_strides}, and stage_blocks {cfg.stage_blocks} four stages")


def field_help():
    """Every field with its default and its trailing comment (continuation comments joined), for --help."""
    lines, src = [], inspect.getsource(Config)
    for m in re.finditer(r"^    (\w+): \w+ = (.+?)(?:  # (.*))?$((?:\n    #   .*$)*)", src, re.M):
        text = " ".join([m.group(3) or ""] + [ln.strip()[1:].strip() for ln in m.group(4).splitlines() if ln.strip()])
        lines.append(f"  {m.group(1)} = {m.group(2)}\n      {text.strip()}")
    return "config fields (key=value or --key value; defaults are the R-101-FPN preset):\n" + "\n".join(lines)


def parser(doc):
    """An argparse parser with --config and a --help that lists every config field; scripts add their own flags
    and read the rest as overrides with parse()."""
    p = argparse.ArgumentParser(description=doc, epilog=field_help(), allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help=f"preset: {', '.join(PRESETS)} (default R-101-FPN)")
    return p


def parse(p, argv=None):
    """(script flags, config overrides): whatever p does not know is a key=value or --key value override."""
    return p.parse_known_args(argv)


def to_dict(cfg):
    return dataclasses.asdict(cfg)


def from_dict(d):
    """Rebuild a Config saved with a checkpoint; tuples come back as tuples, unknown keys are refused."""
    names = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"saved config has keys this version does not know: {unknown}")
    base = Config()
    return dataclasses.replace(base, **{k: tuple(v) if isinstance(getattr(base, k), tuple) else v
                                        for k, v in d.items()})
