"""The MLU code paths, run on a CPU machine under the stand-in torch_mlu (fake_torch_mlu.py): the "mlu" device is
PyTorch's PrivateUse1 backend over host memory, CNNL is emulated to its documented contract (fake_cnnl.h), and
torch_mlu's torchvision kernels are emulated to the same contract. Every test runs in a subprocess that finds the
stand-in through a temporary `torch_mlu.py` shim on PYTHONPATH, so the pytest process itself never gets a "mlu"
device, and our MLU kernels (a separate build of ops_mlu.cpp) never meet the CPU-only build in one process.

What this proves and what only hardware can: README, "Cambricon MLU". References here are the CPU kernels, which
test_ops.py compares with torchvision.
"""
import glob
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import demo
import fake_torch_mlu

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["min_size_train=(96,)", "max_size_train=128", "min_size_test=96", "max_size_test=128", "ims_per_batch=2",
        "test_ims_per_batch=2", "log_period=1", "num_workers=0", "rpn_pre_nms_top_n_train=200",
        "rpn_post_nms_top_n_train=100", "fpn_post_nms_top_n_train=100", "roi_batch_per_image=32"]


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    """A folder holding torch_mlu.py; the stand-in device is built (once, cached) before any test uses it."""
    folder = str(tmp_path_factory.mktemp("torch_mlu_shim"))
    fake_torch_mlu.write_shim(folder)
    proc = subprocess.run([sys.executable, "-c", "import torch_mlu"], cwd=HERE, env=env_for(folder),
                          capture_output=True, text=True, timeout=600)
    if proc.returncode:
        reason = "the stand-in MLU did not build: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
        if os.environ.get("CI"):  # CI must run these tests, never skip them
            pytest.fail(reason)
        pytest.skip(reason)
    return folder


def env_for(shim_dir, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FRCNN_OPS", "FAKE_MLU"))}
    path = os.pathsep.join([shim_dir, HERE, os.path.join(HERE, "fake_mlu")])
    # faulthandler: a crash of the stand-in process (a signal, an abort at exit) shows its Python stacks
    return dict(env, PYTHONPATH=path, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", **extra)


def run(shim_dir, code, args=(), timeout=600, **extra):
    """Run a script (or `code` = a file with args) under the stand-in; returns (stdout, the 'ops:' lines)."""
    cmd = [sys.executable] + (["-c", textwrap.dedent(code)] if not code.endswith(".py") else [code]) + list(args)
    proc = subprocess.run(cmd, cwd=HERE, env=env_for(shim_dir, **extra), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, [ln for ln in proc.stderr.splitlines() if ln.startswith("ops: mlu")]


def test_stand_in_never_shadows_a_real_torch_mlu():
    # Only the shim folder makes `import torch_mlu` find the stand-in; the repository holds no torch_mlu module.
    assert not glob.glob(os.path.join(HERE, "torch_mlu*"))


def test_mlu_stand_in_device_and_torch_mlu_api(shim):
    out, _ = run(shim, """
        import io, torch, torch_mlu
        assert torch.mlu.is_available() and torch.mlu.device_count() == 1
        torch.mlu.set_device(0)
        assert torch.mlu.current_device() == 0 and torch.device("mlu").type == "mlu"
        before = torch.mlu.memory_allocated()
        x = torch.arange(12.0).reshape(3, 4).to("mlu")
        assert x.is_mlu and x.device == torch.device("mlu", 0)
        assert torch.mlu.memory_allocated() >= before + 48 and torch.mlu.max_memory_allocated() >= 48
        assert torch.equal((x.t() @ x).cpu(), torch.arange(12.0).reshape(3, 4).t() @ torch.arange(12.0).reshape(3, 4))
        y = torch.empty(2, 3, 4, 5, device="mlu", memory_format=torch.channels_last)
        assert y.stride() == (60, 1, 15, 3)
        dev = () if hasattr(torch, "accelerator") else ("mlu",)  # before torch.accelerator: name the device
        assert torch.ones(3).pin_memory(*dev).is_pinned(*dev)
        buf = io.BytesIO(); torch.save({"w": x}, buf); buf.seek(0)
        assert torch.load(buf)["w"].device.type == "mlu"
        # amp: autocast("mlu") and a GradScaler that scales, unscales and steps on mlu tensors
        w = torch.ones(2, 2, device="mlu", requires_grad=True)
        opt = torch.optim.SGD([w], lr=0.1)
        scaler = torch.mlu.amp.GradScaler(init_scale=1024.0)  # torch.amp.GradScaler("mlu") from torch 2.3
        with torch.autocast("mlu", dtype=torch.float16):
            loss = (w @ w).float().sum()
        scaler.scale(loss).backward()
        scaler.step(opt); scaler.update()
        assert scaler.get_scale() == 1024.0 and torch.allclose(w.detach().cpu(), torch.full((2, 2), 0.6))
        print("ok")
    """)
    assert out.strip().endswith("ok")


CHECK_OPS = """
    import torch, torch_mlu, ops
    torch.manual_seed(0)
    for offset in (0, 1):
        for t in (0.3, 0.5, 0.6, 0.7):
            xy = torch.rand(400, 2) * 300
            boxes = torch.cat([xy, xy + torch.rand(400, 2) * 80], 1).mul(16).round().div(16)  # exact when shifted
            boxes[:5, 2] = boxes[:5, 0] - 2                      # degenerate
            scores = torch.randint(0, 8, (400,)).float() / 8      # ties, an eighth exactly 0
            # a pair with float32 IoU exactly float32(t) (kept for 0.7, dropped for 0.3): A = [0,0,16,16], B inside
            w = {0.3: 4.800000190734863, 0.5: 8.0, 0.6: 9.59999942779541, 0.7: 11.199999809265137}[t] - offset
            boxes = torch.cat([boxes, torch.tensor([[500.0, 0, 516 - offset, 16 - offset], [500, 0, 516 - offset, w]])])
            scores = torch.cat([scores, torch.tensor([0.9, 0.8])])
            want = ops.nms(boxes, scores, t, offset)
            assert torch.equal(ops.nms(boxes.mlu(), scores.mlu(), t, offset).cpu(), want), (t, offset)
            # per category: on the MLU routes by torchvision's coordinate-offset trick (without the fractional pair,
            # whose IoU the shifted coordinates would round)
            b, s, idxs = boxes[:400], scores[:400], torch.randint(0, 3, (400,))
            assert torch.equal(ops.batched_nms(b.mlu(), s.mlu(), idxs.mlu(), t, offset).cpu(),
                               ops.batched_nms(b, s, idxs, t, offset))
    for scale, ratio in ((0.25, 2), (1 / 16, -1)):
        x = torch.randn(2, 64, 24, 32)
        xy = torch.rand(20, 2) * 90
        rois = torch.cat([torch.randint(0, 2, (20, 1)).float(), xy, xy + torch.rand(20, 2) * 60], 1)
        rois[:3, 3] = rois[:3, 1]                              # zero width, as clipped proposals give
        a, b = x.clone().requires_grad_(), x.mlu().requires_grad_()
        want, got = ops.roi_align(a, rois, 7, scale, ratio), ops.roi_align(b, rois.mlu(), 7, scale, ratio)
        assert (got.cpu() - want).abs().max() < 1e-5
        g = torch.randn(want.shape)
        want.backward(g); got.backward(g.mlu())
        assert (b.grad.cpu() - a.grad).abs().max() < 1e-5
    print("backends", ops.backend_name("mlu", "nms"), ops.backend_name("mlu", "roi_align"))
"""


def test_mlu_our_cnnl_kernels_pass_self_test_and_match_cpu(shim):
    out, lines = run(shim, CHECK_OPS + """
    assert ops.extension_info()["mlu"]  # the WITH_MLU build, against the emulated SDK
    # the allocation helper: outputs and input gradients in channels_last, as the NHWC descriptors need
    x, rois = torch.randn(2, 16, 12, 12).mlu(), torch.tensor([[1, 0, 0, 20, 20.0]]).mlu()
    y = torch.ops.frcnn_ops.roi_align_forward(x, rois, 0.5, 7, 7, 2, False)
    gi = torch.ops.frcnn_ops.roi_align_backward(y, rois, 0.5, 7, 7, 2, 16, 12, 12, 2, False)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.stride(1) == 1
    assert gi.is_contiguous(memory_format=torch.channels_last) and gi.stride(1) == 1
    """)
    assert "backends native-mlu native-mlu" in out
    assert lines == ["ops: mlu -> native-mlu (self-tests passed)"]


def test_mlu_torchvision_route_gets_inputs_cnnl_accepts(shim):
    # torch_mlu's own torchvision kernels call the same CNNL: zero scores, degenerate boxes and RoIs, the IoU rule
    # and sampling -1 must be handled on this route too.
    out, lines = run(shim, CHECK_OPS, FRCNN_OPS="torchvision")
    assert "backends torchvision torchvision" in out and len(lines) == 1 and "forced" in lines[0]


def test_mlu_wrong_kernel_fails_self_test_and_falls_back_with_one_line(shim):
    # No SDK (so no kernels of ours) and a wrong torchvision NMS on the device: NMS falls back to the CPU round
    # trip, ROIAlign keeps torch_mlu's kernel, and one line says which op runs where.
    out, lines = run(shim, CHECK_OPS, FAKE_MLU_SDK="0", FAKE_MLU_BROKEN="nms")
    assert "backends cpu-roundtrip torchvision" in out
    assert len(lines) == 1 and lines[0].startswith("ops: mlu -> nms cpu-roundtrip, roi_align torchvision (nms: "
                                                   "torchvision failed the self-test (nms (threshold"), lines


def test_mlu_without_kernels_makes_cpu_round_trip(shim):
    out, lines = run(shim, CHECK_OPS, FAKE_MLU_SDK="0", FAKE_MLU_TORCHVISION_KERNELS="0")
    assert "backends cpu-roundtrip cpu-roundtrip" in out
    assert len(lines) == 1 and "registers no torchvision kernels" in lines[0]


EXIT_WHILE_MLU_THREAD_HOLDS_PYTHON = """
    import contextvars, sys, threading, time
    import torch, torch_mlu
    card = torch.device("mlu", int(sys.argv[1]))  # not the current card (0) when it is 1
    started, go, dying = threading.Event(), threading.Event(), threading.Event()

    class SlowToDie:
        # its names bound here: the module's globals may be gone when it dies
        def __del__(self, dying=dying, clock=time.monotonic, sleep=time.sleep):
            dying.set()
            end = clock() + 0.5
            while clock() < end:
                sleep(0.002)  # each wake-up takes the GIL again, which ends the thread once Python is finalizing

    class OnMlu(torch.autograd.Function):  # its backward runs on torch's autograd thread for the card
        forward = staticmethod(lambda ctx, x: x * 1)

        @staticmethod
        def backward(ctx, grad):
            started.set()
            go.wait(30)
            return grad

    class FailOnCpu(torch.autograd.Function):  # its backward runs on the thread that called backward()
        forward = staticmethod(lambda ctx, x: x * 1)

        @staticmethod
        def backward(ctx, grad):
            started.wait(30)
            raise RuntimeError("planned", held[0])

    held = [SlowToDie()]
    var = contextvars.ContextVar("held")
    var.set(held[0])  # in the context that backward() stashes in the GraphTask's thread-local state (torch 2.14)
    fail = FailOnCpu.apply(torch.ones(2, requires_grad=True)).sum()  # made first, so the engine reaches it last
    loss = OnMlu.apply(torch.ones(2, device=card, requires_grad=True)).sum().cpu() + fail
    try:
        loss.backward()
    except RuntimeError as e:
        assert e.args[0] == "planned", e
    var.set(None)
    held.clear()
    go.set()  # now only the GraphTask holds SlowToDie, and only the mlu thread holds the GraphTask
    assert dying.wait(30), "the mlu autograd thread did not drop the last GraphTask"
    print("ok")  # and exit while that thread is inside SlowToDie.__del__
"""


@pytest.mark.parametrize("cards,card", [(1, 0), (2, 1)])
def test_mlu_exit_waits_for_the_mlu_autograd_thread(shim, cards, card):
    # What made a test_mlu subprocess abort after printing the right answer, now forced to happen every time:
    # torch's autograd thread for an mlu card (pt_autograd_<card>) drops the last reference of a GraphTask after
    # backward() has returned. Here a CPU node raises while the mlu node still runs, so backward() returns first
    # (engine.cpp, GraphTask::set_exception completes the future), and what the GraphTask holds dies on the mlu
    # thread: the raised exception (python_error, torch/csrc/Exceptions.h) and, on torch 2.14, the stashed contextvars
    # context (torch/autograd/graph.py, _engine_run_backward). Their destructors take the GIL; once Python is
    # finalizing, taking it ends the thread with pthread_exit inside a noexcept destructor: "terminate called without
    # an active exception", exit -6, on both torches. The stand-in's atexit drain (_drain_autograd_thread) waits for
    # the thread of every card before Python finalizes; without it this test fails every time, and with a drain of
    # the current card only, on card 1.
    out, _ = run(shim, EXIT_WHILE_MLU_THREAD_HOLDS_PYTHON, [str(card)], FAKE_MLU_DEVICES=str(cards))
    assert out.strip() == "ok"


def test_mlu_with_mlu_section_compiles_against_cnnl_1_and_2(tmp_path):
    # Syntax only, so it needs no device: ops_mlu.cpp's MLU section against the declarations of both CNNL API
    # generations (CNNL 1.2x: _v5 setter, _v3 workspace; CNNL 2.0: per-attribute setter, _v4 workspace).
    from torch.utils import cpp_extension
    fake_torch_mlu.write_sdk_headers(str(tmp_path))
    # the C++ standard torch.utils.cpp_extension builds this torch's extensions with
    std = "c++20" if "-std=c++20" in open(cpp_extension.__file__).read() else "c++17"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = [f"-std={std}", "-fsyntax-only", "-DWITH_MLU", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{tmp_path}"]
    flags += [f"-I{p}" for p in cpp_extension.include_paths()]
    procs = {major: subprocess.Popen([os.environ.get("CXX", "c++"), *flags, f"-DFAKE_CNNL_MAJOR={major}",
                                      os.path.join(HERE, "ops_mlu.cpp")], stderr=subprocess.PIPE, text=True)
             for major in (1, 2)}
    for major, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"CNNL {major}.x:\n{err[-3000:]}"


# ---- train.py and evaluate.py
@pytest.fixture(scope="module")
def trained(shim, tmp_path_factory):
    """A 2-iteration demo training with device=mlu: (data root, output dir, stdout, ops lines)."""
    root = str(tmp_path_factory.mktemp("mlu_demo"))
    demo.make_demo_dataset(root, num_train=4, num_val=2)
    out_dir = os.path.join(root, "output")
    args = ["--config", "demo", "device=mlu", "max_iter=2", f"data_root={root}", f"output_dir={out_dir}"] + TINY
    out, lines = run(shim, "train.py", args)
    return root, out_dir, out, lines


def records(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_mlu_train_two_iterations(trained):
    root, out_dir, out, lines = trained
    assert lines == ["ops: mlu -> native-mlu (self-tests passed)"]
    its = [r for r in records(out_dir) if "memory_mb" in r]
    assert [r["iter"] for r in its] == [1, 2] and all(r["loss"] > 0 for r in its)
    assert all(r["memory_mb"] > 0 for r in its)  # torch.mlu.max_memory_allocated of the stand-in, counted
    assert "mlu" in out and os.path.isfile(os.path.join(out_dir, "model_0000002.pth"))


def test_mlu_resume(trained, shim):
    root, out_dir, _, _ = trained
    args = ["--config", "demo", "device=mlu", "max_iter=3", f"data_root={root}", f"output_dir={out_dir}",
            "--resume"] + TINY
    out, _ = run(shim, "train.py", args)
    assert "resumed from iteration 2" in out
    assert [r["iter"] for r in records(out_dir) if "memory_mb" in r] == [1, 2, 3]


def test_mlu_evaluate(trained, shim):
    root, out_dir, _, _ = trained
    ckpt = os.path.join(out_dir, "model_0000002.pth")
    out, lines = run(shim, "evaluate.py", ["--ckpt", ckpt, "--device", "mlu", "--data-root", root,
                                           "--output-dir", os.path.join(root, "eval")] + TINY[:4])
    assert lines == ["ops: mlu -> native-mlu (self-tests passed)"]
    assert "AP" in out and glob.glob(os.path.join(root, "eval", "*.json"))
