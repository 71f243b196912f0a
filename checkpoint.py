"""Weights in and out: upstream maskrcnn-benchmark checkpoints (.pth, maskrcnn_benchmark/utils/checkpoint.py),
Detectron's ImageNet pickles (R-50.pkl, R-101.pkl; utils/c2_model_loading.py) and our own checkpoints.

    load_weights(net, "R-101.pkl")              # Detectron ImageNet backbone; 312 tensors for R-101
    load_weights(net, "e2e_faster_rcnn_R_101_FPN_1x.pth")   # upstream's or ours; a partial load is refused,
                                                  # but another class count skips the predictor, saying so
    save(path, net, cfg, optimizer=..., iteration=...)       # one dict, written atomically
    ckpt = load(path)                             # {"model", "config"?, "categories"?, ...}

Loading never runs code from the file: torch.load(weights_only=True), and a restricted unpickler for pickles.
"""
import importlib
import os
import pickle
import re
import warnings

import numpy as np
import torch

import config
import launch

PREDICTOR_KEYS = ("roi_heads.box.predictor.cls_score.", "roi_heads.box.predictor.bbox_pred.")
IMAGENET_URL = "https://dl.fbaipublicfiles.com/detectron/ImageNetPretrained/MSRA/R-101.pkl (or R-50.pkl)"
DETECTOR_URL = "https://download.pytorch.org/models/maskrcnn/e2e_faster_rcnn_R_101_FPN_1x.pth (or R_50_FPN)"


class CheckpointError(config.UserError, RuntimeError):
    """A weights file that cannot be used as asked: the message names the file and the offending keys."""


def load(path, what="checkpoint"):
    """The checkpoint dict of a .pth file, without running code from it (weights_only). Anything that is not one
    (a folder, an empty or text file, a truncated zip, a pickle of other objects) is a CheckpointError that names
    the file and says what it is."""
    _check_file(path, what)
    try:
        with warnings.catch_warnings():  # torch warns about a pickle protocol before failing on it: the error says
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises EOFError, KeyError, RuntimeError, UnpicklingError ... for a bad file
        found = re.search(r"Unsupported (class|global)[^\n]*|[^\n]*GLOBAL[^\n]*", str(e))  # torch 2.1 | later
        if isinstance(e, pickle.UnpicklingError) and found:
            raise CheckpointError(f"refusing to load {what} {path!r}: it holds objects other than tensors and plain "
                                  f"containers ({found.group(0).split(' was not')[0].strip()[:200]})") from None
        zip_reader = f" ({str(e).split('.')[0][:160]})" if isinstance(e, RuntimeError) else ""  # says where
        raise CheckpointError(f"cannot read {what} {path!r}: {_sniff(path)}{zip_reader}") from None


def _check_file(path, what):
    """A CheckpointError unless path is a file that can be opened; a folder's .pth/.pkl files are named."""
    if os.path.isdir(path):
        inside = sorted(n for n in os.listdir(path) if n.endswith((".pth", ".pkl")))
        hint = f"; it holds {_names(inside, 4)}" if inside else ""
        raise CheckpointError(f"{what} {path!r} is a folder, not a file: name the file itself{hint}")
    if not os.path.exists(path):
        raise CheckpointError(f"{what} {path!r} does not exist")
    try:
        open(path, "rb").close()
    except OSError as e:
        raise CheckpointError(f"cannot open {what} {path!r}: {e.strerror or e}") from None


def _sniff(path):
    """What a file that is not a checkpoint holds, from its size and first bytes, for a message."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(64)
    if not size:
        return "the file is empty (0 bytes)"
    if head.startswith(b"PK\x03\x04"):  # torch.save's format since torch 1.6
        return (f"a zip archive of {size} bytes that is truncated (an interrupted copy or download?), damaged or "
                f"not torch.save's")
    if head.startswith(b"\x80"):
        return f"a Python pickle of {size} bytes that is truncated or not a checkpoint"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if text.strip() and all(c.isprintable() or c.isspace() for c in text):
        return (f"a text file of {size} bytes, starting {text.split(chr(10))[0][:40]!r} (an error page or a "
                f"Git LFS pointer instead of the file?)")
    return f"{size} bytes in no format torch.load reads (starting {head[:8].hex(' ')})"


def model_state(ckpt, source="the checkpoint"):
    """The state dict inside an upstream or own checkpoint ({"model": ...}) or a bare state dict, with
    DistributedDataParallel's "module." prefix removed when every key carries it (as upstream's
    utils/model_serialization.py, strip_prefix_if_present). source names the file in the error."""
    sd = ckpt["model"] if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) else ckpt
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        if isinstance(sd, dict) and sd:
            held = f"a dict ({_names(map(str, sd), 4)}) whose values are not all tensors"
        else:
            held = f"{'an empty' if isinstance(sd, (dict, list, tuple)) and not sd else 'a'} {type(sd).__name__}"
        raise CheckpointError(f"{source} is not a checkpoint: it holds {held}, not {{'model': {{name: tensor}}}} "
                              f"or {{name: tensor}}")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _names(keys, limit=8):
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _describe(net):
    """(blocks per ResNet stage, class count) of a model.FasterRCNN, for messages."""
    body = net.backbone.body
    blocks = tuple(len(getattr(body, f"layer{i}")) for i in range(1, 5))
    return blocks, net.roi_heads.box.predictor.cls_score.out_features


def load_state(net, sd, source, skip_predictor=False, verbose=True):
    """Load sd into net by exact name. Missing, unexpected and shape-mismatched keys are reported by name and
    refused, so the model never runs half-loaded. skip_predictor leaves cls_score and bbox_pred at their
    initialisation (fine-tuning with another class count) and says so."""
    own = net.state_dict()
    if skip_predictor:
        skipped = sorted(k for k in own if k.startswith(PREDICTOR_KEYS))
        sd = {k: v for k, v in sd.items() if not k.startswith(PREDICTOR_KEYS)}
        if verbose:
            print(f"checkpoint: {source} has another class count: not loading its predictor "
                  f"({', '.join(skipped)}), which keeps its initialisation for {_describe(net)[1]} classes")
    missing = [k for k in own if k not in sd and not (skip_predictor and k.startswith(PREDICTOR_KEYS))]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k} (file {tuple(v.shape)}, model {tuple(own[k].shape)})"
                  for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or mismatched:
        blocks, classes = _describe(net)
        lines = [f"{source} does not fit this model ({blocks} blocks, {classes} classes):"]
        if missing:
            lines.append(f"  missing {len(missing)}: {_names(missing)}")
        if unexpected:
            lines.append(f"  unexpected {len(unexpected)}: {_names(unexpected)}")
        if mismatched:
            lines.append(f"  shape mismatch {len(mismatched)}: {_names(mismatched)}")
        if any(k.startswith(PREDICTOR_KEYS) for k in mismatched) and not skip_predictor:
            lines.append("  (another class count: to fine-tune, pass the file to train.py as weights=, which skips "
                         "the predictor; to evaluate, set num_classes to the checkpoint's)")
        raise CheckpointError("\n".join(lines))
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)
    return len(sd)


def load_weights(net, path, verbose=True):
    """Initial weights for training: a Detectron ImageNet pickle (.pkl), or a detector checkpoint (upstream's
    .pth, with or without "module.", or one of ours), whose class-dependent predictor is skipped, saying so,
    when its class count differs from the model's (fine-tuning). Everything else must fit exactly."""
    if not os.path.lexists(path):
        raise CheckpointError(f"weights {path!r} not found. ImageNet backbones: {IMAGENET_URL}; the released "
                              f"detectors: {DETECTOR_URL}")
    _check_file(path, "weights")
    if path.endswith(".pkl"):
        return load_detectron_pickle(net, path, verbose)
    sd = model_state(load(path, "weights"), f"weights {path!r}")
    own = net.state_dict()
    skip = any(k.startswith(PREDICTOR_KEYS) and k in own and v.shape != own[k].shape for k, v in sd.items())
    n = load_state(net, sd, repr(path), skip_predictor=skip, verbose=verbose)
    if verbose:
        print(f"checkpoint: loaded {n} tensors from {path}")
    return n


def save(path, net, cfg, **extra):
    """One dict: the unwrapped model's state, the resolved config and whatever resuming needs (optimizer,
    iteration, ...). Written to a temporary file and renamed, so a crash never leaves a half-written file; a
    failed write (a full disk) removes the temporary file and raises a CheckpointError naming the file."""
    net = getattr(net, "module", net)  # DistributedDataParallel
    ckpt = {"model": net.state_dict(), "config": config.to_dict(cfg), **extra}
    _atomic_write(path, lambda f: torch.save(ckpt, f))


def _atomic_write(path, write):
    try:
        launch.atomic_write(path, write)
    except (OSError, RuntimeError) as e:
        # torch.save's zip writer turns an OSError (a full disk: ENOSPC, EFBIG) into a RuntimeError as it closes
        error = e if isinstance(e, OSError) else e.__context__
        if not isinstance(error, OSError):
            raise
        raise CheckpointError(f"cannot write {path} in output_dir {os.path.dirname(path) or '.'}: "
                              f"{error.strerror or error} (errno {error.errno}); the partial file was removed and "
                              f"the earlier checkpoints are intact: free space, then continue with --resume") from None


# ---- training checkpoints: output_dir/model_{iteration:07d}.pth, newest K kept

def training_checkpoints(out_dir):
    """Paths of the training checkpoints in out_dir, newest (highest iteration) first."""
    if not os.path.isdir(out_dir):
        return []
    names = [n for n in os.listdir(out_dir) if n.startswith("model_") and n.endswith(".pth") and n[6:-4].isdigit()
             and os.path.isfile(os.path.join(out_dir, n))]  # a folder of that name is not ours to load or delete
    return [os.path.join(out_dir, n) for n in sorted(names, key=lambda n: int(n[6:-4]), reverse=True)]


def save_training(out_dir, iteration, net, optimizer, cfg, keep=3, **extra):
    """Write model_{iteration}.pth (model, config, optimizer, iteration, extra), point last_checkpoint at it (as
    upstream's Checkpointer does; --resume itself lists the folder) and delete all but the newest keep."""
    path = os.path.join(out_dir, f"model_{iteration:07d}.pth")
    save(path, net, cfg, optimizer=optimizer.state_dict(), iteration=iteration, **extra)
    _atomic_write(os.path.join(out_dir, "last_checkpoint"), lambda f: f.write(os.path.basename(path).encode()))
    # only those up to this iteration: a damaged newer file (skipped by --resume) must not crowd out the new ones
    older = [p for p in training_checkpoints(out_dir) if int(os.path.basename(p)[6:-4]) <= iteration]
    for old in older[max(keep, 1):]:
        os.remove(old)
    return path


def latest_training(out_dir):
    """(path, checkpoint dict) of the newest checkpoint in out_dir that loads completely, or (None, None) when there
    is none. A damaged one (truncated, or not a checkpoint at all) is named and skipped, never loaded half; when
    none of them loads, a CheckpointError: starting again from iteration 0 would go on beside them in silence."""
    paths = training_checkpoints(out_dir)
    for path in paths:
        try:
            ckpt = load(path)
            model_state(ckpt, repr(path))
            if not isinstance(ckpt, dict) or not {"model", "optimizer", "iteration", "config"} <= set(ckpt):
                raise CheckpointError(f"{path!r} is not a training checkpoint (no optimizer, iteration or config)")
            return path, ckpt
        except CheckpointError as e:
            print(f"checkpoint: --resume skips {os.path.basename(path)}: {e}", flush=True)
    if paths:
        raise CheckpointError(f"--resume: none of the {len(paths)} training checkpoints in {out_dir} loads (each "
                              f"is named above), so there is nothing to continue from. Move them away (or choose "
                              f"another output_dir=) to start again from iteration 0")
    return None, None


# ---- Detectron / Caffe2 ImageNet pickles (maskrcnn_benchmark/utils/c2_model_loading.py)

def _numpy_global(module, name):
    # numpy 2 moved numpy.core to numpy._core; pickles from either era name either
    mod = module.replace("numpy.core", "numpy._core") if hasattr(np, "_core") else module
    return getattr(importlib.import_module(mod), name)


_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
            ("_codecs", "encode")}  # how protocol-2 pickles written by Python 3 spell bytes; pure data


class _Refused(pickle.UnpicklingError):
    """A global the restricted unpickler does not admit."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits numpy arrays, numpy dtypes/scalars and plain containers; any other global is refused."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _numpy_global(module, name) if module.startswith("numpy") else getattr(
                importlib.import_module(module), name)
        raise _Refused(f"global '{module}.{name}' is not allowed")


def read_pickle(path):
    """{blob name: numpy array} of a Detectron pickle (Python-2 latin1; "blobs" sub-dict when present),
    "_momentum" blobs dropped."""
    try:
        with open(path, "rb") as f:
            data = _RestrictedUnpickler(f, encoding="latin1").load()
    except _Refused as e:
        raise CheckpointError(f"refusing to load {path!r}: it is not a plain pickle of arrays ({e})") from None
    except Exception as e:  # pickle raises EOFError, UnpicklingError, KeyError, ValueError ... for a bad file
        raise CheckpointError(f"cannot read weights {path!r}: {_sniff(path)}") from None
    if isinstance(data, dict) and isinstance(data.get("blobs"), dict):
        data = data["blobs"]
    if not isinstance(data, dict):
        raise CheckpointError(f"{path!r} holds a {type(data).__name__}, expected a dict of blobs")
    return {k: v for k, v in data.items() if "_momentum" not in k}


def rename_caffe2(name):
    """Upstream's Caffe2 -> PyTorch name rules, in upstream's order (c2_model_loading.py,
    _rename_basic_resnet_weights and _rename_fpn_weights; mask/keypoint/GN rules left out)."""
    s = {"pred_w": "fc1000_w", "pred_b": "fc1000_b"}.get(name, name)  # whole names only (X-101's classifier)
    s = s.replace("_", ".").replace(".w", ".weight").replace(".bn", "_bn").replace(".b", ".bias")
    s = s.replace("_bn.s", "_bn.scale").replace(".biasranch", ".branch")  # repairs the ".b" rule
    s = s.replace("bbox.pred", "bbox_pred").replace("cls.score", "cls_score").replace("res.conv1_", "conv1_")
    s = s.replace(".biasbox", ".bbox").replace("conv.rpn", "rpn.conv").replace("rpn.bbox.pred", "rpn.bbox_pred")
    s = s.replace("rpn.cls.logits", "rpn.cls_logits").replace("_bn.scale", "_bn.weight").replace("conv1_bn.", "bn1.")
    for n in range(2, 6):
        s = s.replace(f"res{n}.", f"layer{n - 1}.")
    for i, c in (("a", 1), ("b", 2), ("c", 3)):
        s = s.replace(f".branch2{i}.", f".conv{c}.").replace(f".branch2{i}_bn.", f".bn{c}.")
    s = s.replace(".branch1.", ".downsample.0.").replace(".branch1_bn.", ".downsample.1.")
    # FPN blobs of Detectron detection models; upstream matches only each stage's last block index, which is
    # the only one such files contain
    for k in (1, 2, 3):
        if s.startswith(f"fpn.inner.layer{k}.") and ".sum.lateral" in s:
            s = f"fpn_inner{k}" + s[s.index(".sum.lateral") + len(".sum.lateral"):]
    if s.startswith("fpn.inner.layer4.") and ".sum." in s:
        s = "fpn_inner4" + s[s.index(".sum") + len(".sum"):]
    if s.startswith("fpn.layer") and ".sum." in s:
        s = f"fpn_layer{s[len('fpn.layer')]}" + s[s.index(".sum") + len(".sum"):]
    s = s.replace("rpn.conv.fpn2", "rpn.conv").replace("rpn.bbox_pred.fpn2", "rpn.bbox_pred")
    s = s.replace("rpn.cls_logits.fpn2", "rpn.cls_logits")
    return s.replace("rpn.", "rpn.head.")


def load_detectron_pickle(net, path, verbose=True):
    """Load Detectron ImageNet weights with upstream's renaming and suffix matching (for each model key the
    longest loaded name it ends with). Returns the number of model tensors loaded (312 for R-101); everything
    else (running stats, FPN, RPN, box head) keeps its initialisation, as upstream."""
    blobs = {rename_caffe2(k): v for k, v in read_pickle(path).items()}
    own = net.state_dict()
    loaded, used = 0, set()
    with torch.no_grad():
        for key in sorted(own):
            matches = [k for k in blobs if key.endswith(k)]
            if not matches:
                continue
            name = max(matches, key=len)
            value = torch.as_tensor(np.asarray(blobs[name], dtype=np.float32))
            if value.shape != own[key].shape:
                raise CheckpointError(f"{path!r}: blob for {name!r} has shape {tuple(value.shape)}, model key "
                                      f"{key!r} wants {tuple(own[key].shape)} (another depth?)")
            own[key].copy_(value)
            loaded += 1
            used.add(name)
    unused = sorted(set(blobs) - used)
    if verbose:
        print(f"checkpoint: loaded {loaded} tensors from {path}; unused blobs: {_names(unused, 6) or 'none'}")
    if loaded == 0:
        raise CheckpointError(f"{path!r}: no blob matched a model key; is it a Detectron ImageNet pickle?")
    return loaded
