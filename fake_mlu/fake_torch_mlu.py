"""A stand-in for Cambricon's torch_mlu, so the project's MLU code paths run on a CPU-only CI machine.

It is never imported as `torch_mlu` by accident: the tests write a one-line `torch_mlu.py` shim into a temporary
folder and put that folder on sys.path / PYTHONPATH; a user's real torch_mlu is untouched. What `import torch_mlu`
then does mirrors torch_mlu/__init__.py (torch_mlu 1.22):
  - the "mlu" device: PyTorch's PrivateUse1 backend renamed to "mlu", host memory behind it, every op without a
    kernel run on the CPU by a boxed fallback (fake_torch_mlu.cpp, JIT-built once and cached);
  - `torch.mlu`: is_available, device_count, current_device, set_device, synchronize, memory counters, RNG seeding,
    amp (autocast and GradScaler);
  - torchvision::nms / roi_align / _roi_align_backward kernels for the device, as torch_mlu registers them
    (codegen/mlu_functions.yaml "vision:"), holding to the CNNL contract those kernels call into (below);
  - `torch_mlu.utils.cpp_extension.include_paths()` / `library_paths()` pointing at an emulated CNNL (fake_cnnl.h
    behind cnnl.h, and empty libtorch_mlu/libcnnl/libcnrt), so ops.py builds and self-tests ops_mlu.cpp's MLU
    section against it.

The CNNL contract emulated, from Cambricon's mlu-ops docs (mlu_op.h: mluOpNms, mluOpRoiAlignForward_v2,
mluOpRoiAlignBackward_v2, which forward to CNNL 1:1): NMS drops a box at IoU >= threshold and drops every box whose
score is <= the confidence threshold (0 as torch_mlu sets it), requires x1 < x2 and y1 < y2, returns indices by
decreasing score; ROIAlign takes NHWC features and RoIs with x1, y1 >= 0, x2 > x1, y2 > y1 and a sampling ratio >= 0.
A contract violation raises here (on hardware its result is undefined), so tests see every call that breaks it.
What this proves and what only hardware can: README, "Cambricon MLU".
"""
import atexit
import hashlib
import os
import subprocess
import sys
import types

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
__version__ = "0.0.0+fake"  # torch_mlu's own looks like "1.22.2-torch2.1.0"
_state = {"root": None}


def _build_root():
    root = os.environ.get("FAKE_MLU_BUILD_DIR") or os.path.join(
        os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.expanduser("~/.cache/torch_extensions"), "fake_mlu")
    key = hashlib.sha1()
    for name in ("fake_torch_mlu.cpp", "fake_cnnl.h"):
        with open(os.path.join(HERE, name), "rb") as f:
            key.update(f.read())
    key.update(repr((torch.__version__, sys.version)).encode())
    return os.path.join(root, key.hexdigest()[:12])


def _load_device():
    """Build (once per machine, under launch.build_once's lock; cached) and load the PrivateUse1 device; lay out the
    emulated SDK beside it."""
    import launch  # the repository's, on PYTHONPATH beside this folder
    root = _build_root()
    so = os.path.join(root, "fake_torch_mlu_device.so")
    done = os.path.join(root, "built.ok")

    def build():
        from torch.utils import cpp_extension
        cpp_extension.load(name="fake_torch_mlu_device", sources=[os.path.join(HERE, "fake_torch_mlu.cpp")],
                           extra_cflags=["-O1"], build_directory=root, is_python_module=False,
                           verbose=os.environ.get("FRCNN_OPS_VERBOSE", "0") == "1")
        _lay_out_sdk(root)
        launch.atomic_write(done, lambda f: f.write("ok\n"), "w")
        return "built"

    launch.build_once(os.path.join(root, "build.lock"), lambda: "cached" if os.path.isfile(done) else None, build)
    torch.ops.load_library(so)
    _state["root"] = root


def write_sdk_headers(folder):
    """torch_mlu's header names, each holding the emulated SDK (fake_cnnl.h), under folder."""
    for rel in ("cnnl.h", "aten/cnnl/cnnlHandle.h", "framework/core/MLUStream.h", "framework/core/mlu_guard.h"):
        path = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(f'#pragma once\n#include "{os.path.join(HERE, "fake_cnnl.h")}"\n')


def _lay_out_sdk(root):
    """include/ with the headers and lib/ with empty libtorch_mlu, libcnnl and libcnrt for ops.py's link line."""
    write_sdk_headers(os.path.join(root, "include"))
    lib = os.path.join(root, "lib")
    os.makedirs(lib, exist_ok=True)
    empty = os.path.join(lib, "empty.c")
    open(empty, "w").close()
    for name in ("torch_mlu", "cnnl", "cnrt"):
        subprocess.run([os.environ.get("CC", "cc"), "-shared", "-o", os.path.join(lib, f"lib{name}.so"), empty],
                       check=True)


# ------------------------------------------------------------------------------------------------- torch.mlu
def _stats(reset_peak=False):
    now, peak, count = torch.ops.fake_mlu.memory_stats(reset_peak)
    return now, peak, count


def _make_mlu_module():
    m = types.ModuleType("torch.mlu")
    m.is_available = lambda: _stats()[2] > 0
    m.device_count = lambda: _stats()[2]
    m.current_device = _current
    m.set_device = _set_device
    m.device = _DeviceContext
    m.synchronize = lambda device=None: None
    m.is_bf16_supported = lambda: False  # MLU370: bf16 is MLU5xx only (torch_mlu/mlu/__init__.py)
    m.memory_allocated = lambda device=None: _stats()[0]
    m.max_memory_allocated = lambda device=None: _stats()[1]
    m.reset_peak_memory_stats = lambda device=None: _stats(True) and None
    m.memory_reserved = m.memory_allocated
    m.max_memory_reserved = m.max_memory_allocated
    m.empty_cache = lambda: None
    m.memory_stats = lambda device=None: {"allocated_bytes.all.current": _stats()[0],
                                         "allocated_bytes.all.peak": _stats()[1]}
    m.manual_seed = m.manual_seed_all = lambda seed: None  # ops draw from the CPU generator in the fallback
    m.seed = m.seed_all = lambda: None
    m.get_rng_state = lambda device=None: torch.get_rng_state()
    m.set_rng_state = lambda state, device=None: None
    m.get_amp_supported_dtype = lambda: [torch.float16, torch.bfloat16, torch.float32]
    m.is_autocast_enabled = lambda: torch.ops.fake_mlu.autocast_enabled()
    m.set_autocast_enabled = lambda enabled: torch.ops.fake_mlu.autocast_enabled(bool(enabled)) and None
    m.get_autocast_dtype = lambda: _DTYPES[torch.ops.fake_mlu.autocast_dtype()]
    m.set_autocast_dtype = lambda dtype: torch.ops.fake_mlu.autocast_dtype(_DTYPES.index(dtype)) and None
    m._is_in_bad_fork = lambda: False
    m.is_initialized = lambda: True
    m._lazy_init = lambda: None
    amp = types.ModuleType("torch.mlu.amp")
    amp.autocast = lambda enabled=True, dtype=torch.float16, cache_enabled=True: torch.autocast(
        "mlu", dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)
    amp.GradScaler = _grad_scaler
    m.amp = amp
    return m


# c10::ScalarType numbering (c10/core/ScalarType.h), as far as autocast needs it
_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32,
           torch.float64, torch.complex32, torch.complex64, torch.complex128, torch.bool, torch.qint8, torch.quint8,
           torch.qint32, torch.bfloat16]
_current_device = [0]


def _current():
    return _current_device[0]


def _set_device(device):
    index = torch.device("mlu", device).index if isinstance(device, int) else torch.device(device).index or 0
    if not 0 <= index < _stats()[2]:
        raise RuntimeError(f"fake mlu: no card {index} ({_stats()[2]} cards)")
    _current_device[0] = index
    torch.ops.fake_mlu.set_device(index)  # the C++ guard keeps its own current device per thread


class _DeviceContext:
    """torch.mlu.device(d): a context manager that makes d current (torch.load restores mlu tensors in one)."""

    def __init__(self, device):
        self.index = torch.device(device).index if not isinstance(device, int) else device

    def __enter__(self):
        self.prev = _current()
        if self.index is not None:
            _set_device(self.index)

    def __exit__(self, *exc):
        _set_device(self.prev)


def _grad_scaler(*args, **kwargs):
    """torch.mlu.amp.GradScaler: torch.amp.GradScaler("mlu") from torch 2.3; before that torch_mlu ships its own
    (torch_mlu/mlu/amp/grad_scaler.py), as torch.cuda.amp.GradScaler refuses non-CUDA tensors."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("mlu", *args, **kwargs)
    from torch.cuda.amp import GradScaler

    class MluGradScaler(GradScaler):
        def __init__(self, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
                     enabled=True):
            super().__init__(init_scale, growth_factor, backoff_factor, growth_interval, enabled=False)
            self._enabled = enabled  # the parent disabled itself for want of CUDA; set up what it skipped
            self._init_scale, self._scale, self._growth_factor = init_scale, None, growth_factor
            self._backoff_factor, self._growth_interval = backoff_factor, growth_interval
            self._init_growth_tracker, self._growth_tracker = 0, None
            from collections import defaultdict
            from torch.cuda.amp.grad_scaler import _refresh_per_optimizer_state
            self._per_optimizer_states = defaultdict(_refresh_per_optimizer_state)

        def scale(self, outputs):
            if not self._enabled:
                return outputs
            assert isinstance(outputs, torch.Tensor), "fake torch.mlu.amp.GradScaler scales one loss tensor"
            if self._scale is None:
                self._lazy_init_scale_growth_tracker(outputs.device)
            return outputs * self._scale.to(outputs.device)

        def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if not allow_fp16 and any(g.dtype == torch.float16 for g in grads):
                raise ValueError("Attempting to unscale FP16 gradients.")
            for g in grads:  # torch 2.1 has this op for CUDA only: the same arithmetic, op by op
                found_inf.copy_(torch.maximum(found_inf, (~torch.isfinite(g)).any().float()))
                g.mul_(inv_scale)
            return {found_inf.device: found_inf}

    if not _libs_amp:  # nor has it a CPU kernel for the scale update: the same rule as aten's CUDA one
        lib = torch.library.Library("aten", "IMPL")
        lib.impl("_amp_update_scale_", _amp_update_scale, "PrivateUse1")
        _libs_amp.append(lib)
    return MluGradScaler(*args, **kwargs)


_libs_amp = []


def _amp_update_scale(scale, growth_tracker, found_inf, growth_factor, backoff_factor, growth_interval):
    if found_inf.item() > 0:
        scale.mul_(backoff_factor)
        growth_tracker.zero_()
    else:
        growth_tracker.add_(1)
        if growth_tracker.item() == growth_interval:
            scale.mul_(growth_factor)
            growth_tracker.zero_()
    return scale


# ------------------------------------------------------------------------------- torchvision kernels on "mlu"
def _cpu(t):
    return t.cpu() if isinstance(t, torch.Tensor) else t


def _check_roi_contract(rois, sampling_ratio, spatial_scale=None):
    r = rois.cpu()
    bad = ~((r[:, 1] >= 0) & (r[:, 2] >= 0) & (r[:, 3] > r[:, 1]) & (r[:, 4] > r[:, 2]))
    if bad.any():
        raise RuntimeError(f"CNNL_STATUS_BAD_PARAM (emulated): RoIs need x1, y1 >= 0, x2 > x1, y2 > y1; "
                           f"{int(bad.sum())} of {len(r)} do not, e.g. {r[bad][0].tolist()}")
    if sampling_ratio < 0:
        raise RuntimeError(f"CNNL_STATUS_BAD_PARAM (emulated): sampling_ratio {sampling_ratio} < 0")
    if spatial_scale is not None and not 0 < spatial_scale <= 1:
        raise RuntimeError(f"CNNL_STATUS_BAD_PARAM (emulated): spatial_scale {spatial_scale} outside (0, 1]")


def cnnl_nms(boxes, scores, iou_threshold):
    """NMS with CNNL's documented rules, on CPU tensors: float32 IoU, drop at IoU >= threshold, drop score <= 0,
    valid boxes only; kept indices (int64) by decreasing score."""
    import torchvision
    b, s = boxes.float(), scores.float()
    bad = ~((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1]))
    if bad.any():
        raise RuntimeError(f"CNNL_STATUS_BAD_PARAM (emulated): NMS boxes need x1 < x2 and y1 < y2; "
                           f"{int(bad.sum())} of {len(b)} do not")
    t = torch.tensor(float(iou_threshold), dtype=torch.float32)
    below = torch.nextafter(t, torch.tensor(float("-inf"))).item()  # IoU >= t  <=>  IoU > the float below t
    live = (s > 0).nonzero().squeeze(1)
    return live[torchvision.ops.nms(b[live], s[live], below)]


def _tv_nms(boxes, scores, iou_threshold):
    b = boxes.cpu()
    if os.environ.get("FAKE_MLU_BROKEN") == "nms":  # a wrong kernel for the self-test to catch: (x, y, w, h) boxes
        b = torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], 1)
    return cnnl_nms(b, scores.cpu(), iou_threshold).to(boxes.device)


def _tv_roi_align(input, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned):
    _check_roi_contract(rois, sampling_ratio)
    out = torch.ops.torchvision.roi_align(input.cpu(), rois.cpu(), spatial_scale, pooled_h, pooled_w,
                                          sampling_ratio, aligned)
    return out.to(input.device).contiguous(memory_format=torch.channels_last)  # torch_mlu returns NHWC


def _tv_roi_align_backward(grad, rois, spatial_scale, pooled_h, pooled_w, batch, channels, height, width,
                           sampling_ratio, aligned):
    _check_roi_contract(rois, sampling_ratio, spatial_scale)
    out = torch.ops.torchvision._roi_align_backward(grad.cpu(), rois.cpu(), spatial_scale, pooled_h, pooled_w,
                                                    batch, channels, height, width, sampling_ratio, aligned)
    return out.to(grad.device)


def _autocast_dtype():
    return torch.get_autocast_dtype("mlu") if hasattr(torch, "get_autocast_dtype") else torch.mlu.get_autocast_dtype()


def _autocast(op, to_float=False):
    """An AutocastPrivateUse1 kernel: float tensors cast to the autocast dtype (or to float32 for torchvision's ops,
    whose output is cast back to the input's dtype, as torch_mlu/csrc/aten/autocast_mode.cpp does)."""
    def wrapper(*args, **kwargs):
        dtype = torch.float32 if to_float else _autocast_dtype()
        keys = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastPrivateUse1)
        with torch._C._ExcludeDispatchKeyGuard(keys):
            out = op(*[a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args],
                     **kwargs)
        return out.to(args[0].dtype) if to_float and out.is_floating_point() else out
    return wrapper


_libs = []


def _register_torchvision_kernels():
    import torchvision  # noqa: F401  (defines the torchvision:: schemas)
    lib = torch.library.Library("torchvision", "IMPL")
    lib.impl("nms", _tv_nms, "PrivateUse1")
    lib.impl("roi_align", _tv_roi_align, "PrivateUse1")
    lib.impl("_roi_align_backward", _tv_roi_align_backward, "PrivateUse1")
    lib.impl("nms", _autocast(torch.ops.torchvision.nms, to_float=True), "AutocastPrivateUse1")
    lib.impl("roi_align", _autocast(torch.ops.torchvision.roi_align, to_float=True), "AutocastPrivateUse1")
    _libs.append(lib)


def _register_autocast_rules():
    """float16 for the matrix ops under torch.autocast("mlu"), where this torch's CPU kernels (which run them here)
    take float16; torch 2.1's CPU has no float16 matmul, so there autocast changes no dtype."""
    try:
        torch.mm(torch.ones(1, 1, dtype=torch.float16), torch.ones(1, 1, dtype=torch.float16))
        torch.conv2d(torch.ones(1, 1, 1, 1, dtype=torch.float16), torch.ones(1, 1, 1, 1, dtype=torch.float16))
    except RuntimeError:
        return
    lib = torch.library.Library("aten", "IMPL")
    for name in ("conv2d", "linear", "mm", "addmm", "matmul"):
        lib.impl(name, _autocast(getattr(torch.ops.aten, name).default), "AutocastPrivateUse1")
    _libs.append(lib)  # a Library deregisters its kernels when collected


def _register_group_norm():
    """GroupNorm on channels_last input fails inside the boxed CPU fallback ("view size is not compatible"); these
    kernels hand the CPU kernel NCHW-contiguous copies instead."""
    def on_cpu(op):
        def kernel(*args):
            dev = next(a.device for a in args if isinstance(a, torch.Tensor))
            out = op(*[a.cpu().contiguous() if isinstance(a, torch.Tensor) else a for a in args])
            return tuple(o.to(dev) if isinstance(o, torch.Tensor) else o for o in out)
        return kernel
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("native_group_norm", on_cpu(torch.ops.aten.native_group_norm.default), "PrivateUse1")
    lib.impl("native_group_norm_backward", on_cpu(torch.ops.aten.native_group_norm_backward.default), "PrivateUse1")
    _libs.append(lib)


def _register_indexing():
    """torch 2.1's boxed CPU fallback leaves `Tensor?[]` arguments on the device, so x[idx] with device indices
    fails there; these kernels move the indices too. Registered only where the fallback needs them."""
    try:
        torch.zeros(2, device="mlu")[torch.zeros(1, dtype=torch.long, device="mlu")]
        return
    except RuntimeError:
        pass

    def host(indices):
        return [i.cpu() if i is not None else None for i in indices]

    def index(self, indices):
        return torch.ops.aten.index.Tensor(self.cpu(), host(indices)).to(self.device)

    def index_put_impl(self, indices, values, accumulate=False, unsafe=False):
        out = torch.ops.aten.index_put.default(self.cpu(), host(indices), values.cpu(), accumulate)
        return self.copy_(out)

    lib = torch.library.Library("aten", "IMPL")
    lib.impl("index.Tensor", index, "PrivateUse1")
    lib.impl("_index_put_impl_", index_put_impl, "PrivateUse1")
    _libs.append(lib)


# ---------------------------------------------------------------------------------------------------- exit
def _drain_autograd_thread():
    """At exit, while the interpreter is still whole (atexit runs before Py_FinalizeEx marks it finalizing), pass
    one tiny backward through torch's autograd thread of every card (pt_autograd_<card>). Such a thread may drop the
    last reference of a GraphTask after backward() returned: on success, having signalled the caller (engine.cpp,
    thread_main), and when a node on another thread raised while its own still ran (GraphTask::set_exception
    completes the future at once). What the GraphTask holds then dies on that thread, and some of it is Python: the
    raised exception (python_error, torch/csrc/Exceptions.h) and, where backward() stashes it (torch 2.14, not 2.1),
    the contextvars context in the thread-local state every GraphTask copies (torch/autograd/graph.py,
    _engine_run_backward). Their destructors take the GIL (torch/csrc/PyInterpreter.cpp, decref); once finalizing
    has begun, take_gil ends the thread with pthread_exit inside that noexcept destructor: "terminate called without
    an active exception" after the right output. A thread takes one task at a time, so when the tiny backward on its
    card returns, every earlier GraphTask it held is gone; it is run through the C++ engine directly, so its own
    GraphTask holds no Python object. test_mlu.py::test_mlu_exit_waits_for_the_mlu_autograd_thread forces the race."""
    for card in range(_stats()[2]):  # FAKE_MLU_DEVICES=0: no card, so no such thread either
        mlu = torch.device("mlu", card)
        y, grad = torch.zeros((), device=mlu, requires_grad=True) * 2, torch.ones((), device=mlu)
        torch.autograd.Variable._execution_engine.run_backward((y,), (grad,), False, False, (), True, True)


# -------------------------------------------------------------------------------------------------- install
def install():
    """What `import torch_mlu` does; idempotent. For tests, the environment narrows what the fake offers:
    FAKE_MLU_TORCHVISION_KERNELS=0  no torchvision kernels for the device (a torch_mlu without its "vision" ops)
    FAKE_MLU_SDK=0                  no cnnl.h in include_paths() (ops.py then builds no MLU kernels)
    FAKE_MLU_BROKEN=nms             the device's torchvision NMS reads boxes as (x, y, w, h): a wrong kernel"""
    if hasattr(torch, "mlu"):
        return sys.modules[__name__]
    _load_device()
    torch.utils.rename_privateuse1_backend("mlu")
    torch.ops.fake_mlu.register_hooks()
    torch._register_device_module("mlu", _make_mlu_module())
    torch.utils.generate_methods_for_privateuse1_backend(for_tensor=True, for_module=True, for_storage=True)
    _register_autocast_rules()
    _register_group_norm()
    _register_indexing()
    if os.environ.get("FAKE_MLU_TORCHVISION_KERNELS", "1") != "0":
        _register_torchvision_kernels()
    atexit.register(_drain_autograd_thread)
    utils = types.ModuleType("torch_mlu.utils")
    ext = types.ModuleType("torch_mlu.utils.cpp_extension")
    from torch.utils import cpp_extension as torch_ext
    sdk = os.environ.get("FAKE_MLU_SDK", "1") != "0"
    ext.include_paths = lambda: torch_ext.include_paths() + ([os.path.join(_state["root"], "include")] if sdk else [])
    ext.library_paths = lambda: torch_ext.library_paths() + [os.path.join(_state["root"], "lib")]
    utils.cpp_extension = ext
    sys.modules["torch_mlu.utils"] = utils
    sys.modules["torch_mlu.utils.cpp_extension"] = ext
    return sys.modules[__name__]


def write_shim(folder):
    """Write `torch_mlu.py` into folder; put the folder and this repository on sys.path / PYTHONPATH."""
    path = os.path.join(folder, "torch_mlu.py")
    with open(path, "w") as f:
        f.write("import fake_torch_mlu as _fake\n_fake.install()\nutils = _fake.sys.modules['torch_mlu.utils']\n"
                "__version__ = _fake.__version__\n")
    return path
