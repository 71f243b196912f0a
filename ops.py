"""NMS and ROIAlign with torchvision's signatures and semantics, backed by our own kernels (ops_mlu.cpp).

    nms(boxes (N,4), scores (N,), iou_threshold, offset=0)          -> kept indices (M,) int64, by decreasing score
    batched_nms(boxes, scores, idxs (N,), iou_threshold, offset=0)  -> the same, NMS run per category
    roi_align(input (B,C,H,W), rois (K,5) rows (batch_idx,x1,y1,x2,y2) or a list of (Ki,4), output_size,
              spatial_scale=1.0, sampling_ratio=-1, aligned=False)  -> (K,C,ph,pw), differentiable w.r.t. input

Ties: equal scores keep the lower original index first (one stable sort by descending score), on every device
our kernels run on. offset=1 is maskrcnn-benchmark's legacy "+1" box convention (areas (x2-x1+1)(y2-y1+1),
intersections +1 too); a box is suppressed when IoU > iou_threshold (upstream's CPU kernel used >=, its CUDA
kernel >; we follow CUDA and torchvision).

The backend is chosen per device type and per op in one place, `_choose_backends`, which prints one line saying
which op runs where:
    cpu          native kernels of ops_mlu.cpp; if they cannot be built, torchvision's CPU kernels
    mlu          per op, the first that passes a one-time self-test against the CPU kernels (ops_mlu.py): our CNNL
                 kernels, then the torchvision kernels that torch_mlu registers; else a CPU round trip (warned).
                 Both MLU routes get inputs CNNL accepts (ops_mlu.py)
    cuda, other  torchvision's kernels (offset=1 NMS shifts x2, y2 by +1, which gives the legacy IoU exactly)
FRCNN_OPS=auto (default) | native (our kernels or fail) | torchvision (torchvision's kernels everywhere) |
cpu (non-CPU tensors make a CPU round trip through our kernels) overrides that choice.
Under torch.onnx.export (the TorchScript-based exporter, export.py) both ops become ONNX's standard
NonMaxSuppression and RoiAlign (opset >= 11; section "ONNX export" below), with the semantics above.

The extension is JIT-built on first use with torch.utils.cpp_extension into
$FRCNN_OPS_BUILD_DIR (default: torch's extension cache, ~/.cache/torch_extensions), in a folder whose name hashes
the source, the flags and the versions of torch (and of torch_mlu and CNNL for the MLU variant), so an edit or an
SDK upgrade rebuilds and a cached start only loads the .so.
"""
import contextlib
import hashlib
import importlib.util
import io
import logging
import os
import sys
import time
import warnings

import torch
from torch.autograd.function import once_differentiable

import launch
import ops_mlu

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ops_mlu.cpp")
_MODES = ("auto", "native", "torchvision", "cpu")
_ext = {"tried": False, "ok": False, "mlu": False, "error": "", "build_s": None, "path": None}
_OPS = ("nms", "roi_align")
_backends = {}  # device type -> {op: backend name}, filled by backend_name()


def _log(msg):
    print(f"ops: {msg}", file=sys.stderr, flush=True)


def _mode():
    mode = os.environ.get("FRCNN_OPS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"FRCNN_OPS={mode!r} is not one of {', '.join(_MODES)}")
    return mode


# ---- building
def _mlu_build_args():
    """(cflags, include dirs, ldflags) for the WITH_MLU variant, or None with the reason."""
    if importlib.util.find_spec("torch_mlu") is None:
        return None, "torch_mlu not installed"
    # torch_mlu's include_paths() guesses /usr/local/neuware_home when NEUWARE_HOME is unset
    # (torch_mlu/utils/cpp_extension.py); Cambricon's images install the SDK at /usr/local/neuware.
    if not os.environ.get("NEUWARE_HOME") and os.path.isdir("/usr/local/neuware"):
        os.environ["NEUWARE_HOME"] = "/usr/local/neuware"
    try:  # a broken SDK raises OSError/RuntimeError, not only ImportError
        import torch_mlu  # noqa: F401
        from torch_mlu.utils import cpp_extension as mlu_ext
        incs, libs = mlu_ext.include_paths(), mlu_ext.library_paths()
    except Exception as e:  # noqa: BLE001
        return None, f"torch_mlu unusable for building ({type(e).__name__}: {e})"
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 1):
        return None, "torch < 2.1 (pre-PrivateUse1 torch_mlu generations are not compiled for)"
    if not any(os.path.isfile(os.path.join(d, "cnnl.h")) for d in incs):
        return None, "cnnl.h not found in torch_mlu's include paths"
    ldflags = [f"-L{d}" for d in libs] + ["-ltorch_mlu", "-lcnnl", "-lcnrt"]  # our .so calls cnnl*/cnrt* itself
    return (["-DWITH_MLU"], incs, ldflags), ""


def _sdk_version(incs):
    """torch_mlu's version and a hash of cnnl.h (which holds CNNL's version macros): part of the build cache key."""
    mod = sys.modules.get("torch_mlu")
    parts = [str(getattr(mod, "__version__", None))]
    for d in incs:
        if os.path.isfile(os.path.join(d, "cnnl.h")):
            with open(os.path.join(d, "cnnl.h"), "rb") as f:
                parts.append(hashlib.sha1(f.read()).hexdigest())
    return parts


def _cpp_extension():
    """torch.utils.cpp_extension, imported without the "No CUDA runtime is found, using CUDA_HOME=..." line it
    writes at import where torch is a CUDA build and no GPU is present: a CPU run needs no CUDA, and the line reads
    like a fault (torch >= 2.2 logs it, older torch prints it)."""
    if "torch.utils.cpp_extension" not in sys.modules:
        log = logging.getLogger("torch.utils.cpp_extension")
        level, err = log.level, io.StringIO()
        log.setLevel(logging.ERROR)
        try:
            with contextlib.redirect_stderr(err):
                import torch.utils.cpp_extension  # noqa: F401
        finally:
            log.setLevel(level)
        sys.stderr.write("".join(ln for ln in err.getvalue().splitlines(True) if "No CUDA runtime" not in ln))
    return sys.modules["torch.utils.cpp_extension"]


def _build(cflags, incs, ldflags, tag):
    """Load the variant from the cache, building it first if needed (one process of the machine builds, the
    others wait for it); returns the .so path or raises."""
    cpp_extension = _cpp_extension()
    flags = ["-O3"] + (["-fopenmp"] if torch._C.has_openmp else []) + cflags  # at::parallel_for is OpenMP inline
    with open(_SRC, "rb") as f:
        sdk = _sdk_version(incs) if tag == "mlu" else []
        key = hashlib.sha1(f.read() + repr((flags, incs, ldflags, torch.__version__, sys.version, sdk)).encode())
    name = f"frcnn_ops_{tag}_{key.hexdigest()[:12]}"
    root = os.environ.get("FRCNN_OPS_BUILD_DIR") or cpp_extension.get_default_build_root()
    build_dir = os.path.join(root, name)
    so = os.path.join(build_dir, f"{name}.so")
    done = os.path.join(build_dir, "built.ok")  # written after a complete build, so a half-linked .so is never used

    def build():
        t0 = time.time()
        cpp_extension.load(name=name, sources=[_SRC], extra_cflags=flags, extra_include_paths=incs,
                           extra_ldflags=ldflags + (["-fopenmp"] if torch._C.has_openmp else []),
                           build_directory=build_dir, is_python_module=False,
                           verbose=os.environ.get("FRCNN_OPS_VERBOSE", "0") == "1")
        _ext["build_s"] = time.time() - t0
        launch.atomic_write(done, lambda f: f.write(f"{_ext['build_s']:.1f} s\n"), "w")
        _log(f"built {name} in {_ext['build_s']:.1f} s (cached in {build_dir})")
        return "built"  # cpp_extension.load has loaded it

    # a cached start only loads the .so, without cpp_extension and ninja
    if launch.build_once(os.path.join(build_dir, "build.lock"), lambda: "cached" if os.path.isfile(done) else None,
                         build) == "cached":
        torch.ops.load_library(so)
    return so


def _first_line(e):
    """The line of a build error worth showing: the compiler's first 'error:', else a shell's 'not found'."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    for pattern in ("error:", "not found", "No such file"):
        hits = [ln for ln in lines if pattern in ln]
        if hits:
            return hits[0][:160]
    return lines[0][:160]


def load_extension():
    """Build (first call only) and load ops_mlu.cpp. Returns True when torch.ops.frcnn_ops is usable; a failed
    build never raises here: it is reported in one line and remembered (extension_info()['error'])."""
    if _ext["tried"]:
        return _ext["ok"]
    _ext["tried"] = True
    # Two builds of one TORCH_LIBRARY namespace cannot share a process, so exactly one variant gets loaded.
    mlu_args, why_not = _mlu_build_args()
    if mlu_args is not None:
        try:
            _ext["path"], _ext["ok"], _ext["mlu"] = _build(*mlu_args, "mlu"), True, True
            return True
        except Exception as e:  # noqa: BLE001  (ninja RuntimeError, ImportError, OSError, EnvironmentError)
            _log(f"MLU kernels did not build ({_first_line(e)}); building the CPU-only variant "
                 "(FRCNN_OPS_VERBOSE=1 shows the compiler output)")
    elif why_not != "torch_mlu not installed":
        _log(f"MLU kernels not built: {why_not}")
    try:
        _ext["path"], _ext["ok"] = _build([], [], [], "cpu"), True
    except Exception as e:  # noqa: BLE001
        _ext["error"] = _first_line(e)
    return _ext["ok"]


def extension_info():
    """What load_extension() did: ok, mlu (variant with MLU kernels), error, build_s (None when cached), path."""
    load_extension()
    return dict(_ext)


# ---- backend choice
def _tv_has_kernel(op, key):
    try:
        import torchvision  # noqa: F401  (defines the torchvision:: schemas that torch_mlu implements)
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
    except Exception:  # noqa: BLE001
        return False


def _mlu_backends():
    """The backends that could serve MLU tensors, in order of preference: our CNNL kernels, torch_mlu's."""
    found = ["native-mlu"] if load_extension() and _ext["mlu"] else []
    if _tv_has_kernel("torchvision::nms", "PrivateUse1") and _tv_has_kernel("torchvision::roi_align", "PrivateUse1"):
        found.append("torchvision")
    return found


def _mlu_kernel(backend, op):
    """The CNNL-backed kernel of `backend` for `op`, called by ops_mlu.mlu_nms / mlu_roi_align."""
    if backend == "native-mlu":
        if op == "nms":
            return lambda b, s, t: torch.ops.frcnn_ops.nms(b, s, t, 0.0, None)
        return lambda x, r, size, scale, ratio, al: _RoIAlign.apply(x, r, scale, size[0], size[1], ratio, al)
    import torchvision
    return (lambda b, s, t: torch.ops.torchvision.nms(b, s, t)) if op == "nms" else torchvision.ops.roi_align


def _choose_mlu(mode):
    """Per op, the first MLU backend whose kernel passes the self-test (ops_mlu.py); else the CPU round trip."""
    chosen, notes, found = {}, [], _mlu_backends()
    if mode == "native" and found[:1] != ["native-mlu"]:
        raise RuntimeError(f"FRCNN_OPS=native but our MLU kernels are not built ({_ext['error'] or 'see above'})")
    references = {"nms": lambda *a: _nms(backend_name("cpu", "nms"), *a),  # the CPU kernels
                  "roi_align": lambda *a: _roi_align(backend_name("cpu", "roi_align"), *a)}
    for op, self_test, route in (("nms", ops_mlu.self_test_nms, ops_mlu.mlu_nms),
                                 ("roi_align", ops_mlu.self_test_roi_align, ops_mlu.mlu_roi_align)):
        for backend in found[:1] if mode == "native" else found:
            err = self_test(lambda *a: route(*a, kernel=_mlu_kernel(backend, op)), references[op], "mlu")
            if not err:
                chosen[op] = backend
                break
            notes.append(f"{op}: {backend} failed the self-test ({err})")
        if op not in chosen and mode == "native":
            raise RuntimeError(f"FRCNN_OPS=native but {notes[-1]}")
        chosen.setdefault(op, "cpu-roundtrip")
    if not found:
        notes.append("our MLU kernels are not built and torch_mlu registers no torchvision kernels")
    if "cpu-roundtrip" in chosen.values():
        warnings.warn("ops: " + "; ".join(notes) + ": those ops make a slow CPU round trip on MLU tensors")
    return chosen, "; ".join(notes) or "self-tests passed"


def _choose_backends(dev):
    """The one place that decides which kernels serve a device type. Returns ({op: backend}, reason)."""
    mode = _mode()
    if mode == "torchvision":
        return dict.fromkeys(_OPS, "torchvision"), "forced by FRCNN_OPS=torchvision"
    if dev == "cpu" or mode == "cpu":
        if load_extension():
            return dict.fromkeys(_OPS, "native" if dev == "cpu" else "cpu-roundtrip"), "ops_mlu.cpp CPU kernels" + (
                "" if dev == "cpu" else ", forced CPU round trip by FRCNN_OPS=cpu")
        if mode == "native":
            raise RuntimeError(f"FRCNN_OPS=native but ops_mlu.cpp did not build: {_ext['error']}")
        return dict.fromkeys(_OPS, "torchvision" if dev == "cpu" else "cpu-roundtrip"), \
            f"ops_mlu.cpp did not build ({_ext['error']}); torchvision's CPU kernels instead"
    if dev == "mlu":
        return _choose_mlu(mode)
    if mode == "native":
        raise RuntimeError(f"FRCNN_OPS=native but ops_mlu.cpp has no kernels for device type {dev!r}")
    return dict.fromkeys(_OPS, "torchvision"), "torchvision's kernels"


def backend_name(device, op=None):
    """Backend serving `op` ('nms' or 'roi_align') on `device`: 'native', 'native-mlu', 'torchvision' or
    'cpu-roundtrip'; without op, that name when both ops agree, else 'nms=X,roi_align=Y'. The first call per device
    type decides and prints one line."""
    dev = torch.device(device).type
    if dev not in _backends:
        chosen, reason = _choose_backends(dev)
        _backends[dev] = chosen
        where = chosen["nms"] if len(set(chosen.values())) == 1 else ", ".join(f"{k} {v}" for k, v in chosen.items())
        _log(f"{dev} -> {where} ({reason})")
    chosen = _backends[dev]
    if op is not None:
        return chosen[op]
    return chosen["nms"] if len(set(chosen.values())) == 1 else ",".join(f"{k}={v}" for k, v in chosen.items())


def reset_backends():
    """Forget the per-device choices (tests change FRCNN_OPS); the loaded extension stays."""
    _backends.clear()


# ---- NMS
def _shift_legacy(boxes, offset):
    # x2 + 1, y2 + 1 turns torchvision's IoU into the legacy +1 IoU (areas and intersections both gain +1).
    return boxes if not offset else torch.cat([boxes[:, :2], boxes[:, 2:] + offset], dim=1)


def _native_nms(boxes, scores, iou_threshold, offset, labels=None):
    if boxes.dtype not in (torch.float32, torch.float64):  # half/bf16 boxes: compute in float32
        boxes = boxes.float()
    return torch.ops.frcnn_ops.nms(boxes, scores.to(boxes.dtype), float(iou_threshold), float(offset), labels)


def nms(boxes, scores, iou_threshold, offset=0):
    """Kept indices (int64) of `boxes` (N,4) x1y1x2y2 after NMS, by decreasing score (ties: lower index first)."""
    if torch.onnx.is_in_onnx_export():
        return _onnx_batched_nms(boxes, scores, torch.zeros_like(scores, dtype=torch.int64), iou_threshold, offset)
    return _nms(backend_name(boxes.device, "nms"), boxes, scores, iou_threshold, offset)


def _nms(backend, boxes, scores, iou_threshold, offset):
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if backend == "native":
        return _native_nms(boxes, scores, iou_threshold, offset)
    if backend == "cpu-roundtrip":
        return _nms(backend_name("cpu", "nms"), boxes.cpu(), scores.cpu(), iou_threshold, offset).to(boxes.device)
    if boxes.device.type == "mlu":  # our CNNL kernels or torch_mlu's: CNNL-safe inputs (ops_mlu.py)
        return ops_mlu.mlu_nms(boxes, scores, iou_threshold, offset, kernel=_mlu_kernel(backend, "nms"))
    import torchvision
    return torchvision.ops.nms(_shift_legacy(boxes, offset), scores.to(boxes.dtype), iou_threshold)


def batched_nms(boxes, scores, idxs, iou_threshold, offset=0):
    """NMS independently per category idxs (N,); kept indices (int64) by decreasing score. In an ONNX export they
    come category by category (ascending), by decreasing score within each: callers order them by a key of their
    own (model.py sorts by level or by index), which both orders give alike."""
    if torch.onnx.is_in_onnx_export():
        return _onnx_batched_nms(boxes, scores, idxs, iou_threshold, offset)
    return _batched_nms(backend_name(boxes.device, "nms"), boxes, scores, idxs, iou_threshold, offset)


def _batched_nms(backend, boxes, scores, idxs, iou_threshold, offset):
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if backend == "native":
        # Our kernel keeps a kept-list per category, so no coordinate offset (and no float rounding of the
        # offset boxes, which torchvision's trick has at large coordinates) is needed: exactly per-category NMS.
        labels = torch.unique(idxs, return_inverse=True)[1]
        return _native_nms(boxes, scores, iou_threshold, offset, labels)
    if backend == "cpu-roundtrip":
        return _batched_nms(backend_name("cpu", "nms"), boxes.cpu(), scores.cpu(), idxs.cpu(), iou_threshold,
                            offset).to(boxes.device)
    # Other kernels: torchvision's coordinate-offset trick, one NMS where categories can never overlap. The gap
    # uses the full extent (torchvision uses only max + 1, which lets negative boxes of two categories touch).
    lo, hi = boxes.min(), boxes.max()
    shifted = boxes + (idxs.to(boxes) * (hi - lo + 1 + offset))[:, None]
    return _nms(backend, shifted, scores, iou_threshold, offset)


# ---- ROIAlign
class _RoIAlign(torch.autograd.Function):
    """Our forward and backward kernels; gradient w.r.t. input only (as torchvision: rois get none)."""

    @staticmethod
    def forward(ctx, input, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned):
        ctx.save_for_backward(rois)
        ctx.args = (spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned)
        ctx.input_shape = input.shape
        return torch.ops.frcnn_ops.roi_align_forward(input, rois, spatial_scale, pooled_h, pooled_w,
                                                     sampling_ratio, aligned)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (rois,) = ctx.saved_tensors
        scale, ph, pw, ratio, aligned = ctx.args
        b, c, h, w = ctx.input_shape
        grad_input = torch.ops.frcnn_ops.roi_align_backward(grad, rois, scale, ph, pw, b, c, h, w, ratio, aligned)
        return grad_input, None, None, None, None, None, None


def boxes_to_rois(boxes):
    """List of per-image (Ki,4) boxes -> (sum Ki, 5) rois with the image index in column 0."""
    idx = torch.cat([torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)])  # full_like: traced sizes stay dynamic
    return torch.cat([idx, torch.cat(list(boxes))], dim=1)


def roi_align(input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False):
    """(K,C,ph,pw) features of rois (K,5) = (batch_idx, x1,y1,x2,y2) in image coordinates, from input (B,C,H,W)
    at `spatial_scale`; sampling_ratio <= 0 is adaptive (ceil(roi_size / output_size) samples per bin)."""
    if torch.onnx.is_in_onnx_export():
        ph, pw = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        rois = boxes_to_rois(rois) if isinstance(rois, (list, tuple)) else rois
        return _OnnxRoIAlign.apply(input, rois[:, 1:].to(input.dtype), rois[:, 0].to(torch.int64), float(spatial_scale),
                                   int(ph), int(pw), int(sampling_ratio), bool(aligned))
    return _roi_align(backend_name(input.device, "roi_align"), input, rois, output_size, spatial_scale,
                      sampling_ratio, aligned)


def _roi_align(backend, input, rois, output_size, spatial_scale, sampling_ratio, aligned):
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if isinstance(rois, (list, tuple)):
        rois = boxes_to_rois(rois)
    if backend == "cpu-roundtrip":  # autograd follows .cpu() and .to() back to the device
        return _roi_align(backend_name("cpu", "roi_align"), input.cpu(), rois.cpu(), (ph, pw), spatial_scale,
                          sampling_ratio, aligned).to(input.device)
    if input.device.type == "mlu":  # our CNNL kernels or torch_mlu's: CNNL-safe inputs (ops_mlu.py)
        return ops_mlu.mlu_roi_align(input, rois, (ph, pw), spatial_scale, sampling_ratio, aligned,
                                     kernel=_mlu_kernel(backend, "roi_align"))
    # half/bf16: accumulate in float32, as upstream's AMP float_function did (and rois never rounded to bf16)
    x = input if input.dtype in (torch.float32, torch.float64) else input.float()
    if backend == "torchvision":
        import torchvision
        return torchvision.ops.roi_align(x, rois.to(x.dtype), (ph, pw), spatial_scale, sampling_ratio,
                                         aligned).to(input.dtype)
    out = _RoIAlign.apply(x, rois.to(x.dtype), float(spatial_scale), int(ph), int(pw), int(sampling_ratio),
                          bool(aligned))
    return out.to(input.dtype)


# ---- ONNX export
# The forward passes run our kernels (the tracer needs real values); `symbolic` writes the ONNX node. Only standard
# operators, so ONNX Runtime, TensorRT and MagicMind run the graph without plugins.
ONNX_MIN_OPSET = 11  # NonMaxSuppression and RoiAlign are opset 10; Range and TopK with largest=0 (argsort) 11


class _OnnxNMS(torch.autograd.Function):
    """NonMaxSuppression of boxes (1, N, 4) with scores (1, C, N), one class per category (-1 where a box is not
    of it) -> selected (M, 3) rows (0, category, box index), category by category, by decreasing score within."""

    @staticmethod
    def forward(ctx, boxes, scores, iou_threshold):
        rows = []
        for c, s in enumerate(scores[0]):
            idx = torch.nonzero(s > -0.5).squeeze(1)
            keep = idx[_nms(backend_name(boxes.device, "nms"), boxes[0, idx], s[idx], iou_threshold, 0)]
            rows.append(torch.stack([torch.zeros_like(keep), torch.full_like(keep, c), keep], 1))
        return torch.cat(rows) if rows else torch.zeros((0, 3), dtype=torch.int64)

    @staticmethod
    def symbolic(g, boxes, scores, iou_threshold):
        const = lambda v, dtype: g.op("Constant", value_t=torch.tensor([v], dtype=dtype))  # noqa: E731
        # Every box a category has, as torchvision's symbolic (torchvision/ops/_register_onnx_ops.py); a box is
        # suppressed when IoU > iou_threshold, and -1 (not of the category) is below the score threshold.
        return g.op("NonMaxSuppression", boxes, scores, const(sys.maxsize, torch.int64),
                    const(iou_threshold, torch.float32), const(-0.5, torch.float32))


def _onnx_batched_nms(boxes, scores, idxs, iou_threshold, offset):
    """batched_nms as one NonMaxSuppression with the categories as its classes: exact per-category NMS, no
    coordinate shift (whose rounding at large coordinates could move a tie at the threshold)."""
    # ONNX computes IoU with widths x2 - x1: x2 + 1, y2 + 1 gives the legacy +1 IoU. Its corner format takes
    # (y1, x1, y2, x2) or any diagonal pair, so x1y1x2y2 goes in as it is.
    boxes = _shift_legacy(boxes.float(), offset)
    # The category count from the data, one past the largest (a 0 appended: an empty input has none)
    num = torch.cat([idxs.to(torch.int64), idxs.new_zeros(1, dtype=torch.int64)]).max() + 1
    per_cat = idxs.to(torch.int64)[None] == torch.arange(num, device=idxs.device)[:, None]  # (C, N)
    s = torch.where(per_cat, scores.float()[None], torch.full_like(scores.float()[None], -1.0))
    return _OnnxNMS.apply(boxes[None], s[None], float(iou_threshold))[:, 2]


class _OnnxRoIAlign(torch.autograd.Function):
    """RoiAlign of input (B, C, H, W), boxes (K, 4), batch indices (K,) with our roi_align's semantics: aligned=False
    is upstream's legacy ROIAlign (no half-pixel shift, RoIs at least 1x1), RoiAlign-10's only mode and RoiAlign-16's
    "output_half_pixel"; the default "half_pixel" is aligned=True."""

    @staticmethod
    def forward(ctx, input, boxes, batch_idx, spatial_scale, ph, pw, sampling_ratio, aligned):
        rois = torch.cat([batch_idx[:, None].to(boxes.dtype), boxes], 1)
        return _roi_align(backend_name(input.device, "roi_align"), input, rois, (ph, pw), spatial_scale,
                          sampling_ratio, aligned)

    @staticmethod
    def symbolic(g, input, boxes, batch_idx, spatial_scale, ph, pw, sampling_ratio, aligned):
        extra = {}
        if g.opset >= 16:
            extra["coordinate_transformation_mode_s"] = "half_pixel" if aligned else "output_half_pixel"
        elif aligned:
            raise RuntimeError(f"roi_align(aligned=True) needs ONNX opset 16 or newer, not {g.opset}")
        return g.op("RoiAlign", input, boxes, batch_idx, spatial_scale_f=spatial_scale, output_height_i=ph,
                    output_width_i=pw, sampling_ratio_i=max(sampling_ratio, 0), mode_s="avg", **extra)
