"""Tests of the benchmark tools: their imports form no circle and take in no test module, bench.py runs from any
folder, and `bench.py gpu --dry-run --hw` runs every step at that image size (each step's output file says so)."""
import ast
import json
import os
import subprocess
import sys

import pytest

TOOLS = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.join(TOOLS, "bench.py")


def tool_imports():
    """{tools/ module name: the top-level names of the modules it imports, anywhere in the file}, tests left out."""
    out = {}
    for name in sorted(os.listdir(TOOLS)):
        if not name.endswith(".py") or name.startswith("test_"):
            continue
        with open(os.path.join(TOOLS, name)) as f:
            tree = ast.parse(f.read(), name)
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
        out[name[:-3]] = names
    return out


def test_tools_import_no_circle_no_bench_and_no_test_module():
    imports = tool_imports()
    assert {"bench", "bench_common", "bench_accel", "bench_memory"} <= set(imports)
    for name, names in imports.items():
        assert "bench" not in names, f"{name}.py imports bench.py, the command line"
        assert not {n for n in names if n.startswith("test_") or n == "conftest"}, f"{name}.py imports a test module"
    assert not imports["bench_common"] & set(imports), "bench_common.py imports another tool"
    edges = {name: names & set(imports) for name, names in imports.items()}

    def reach(start):
        seen, todo = set(), list(edges[start])
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo += edges[n]
        return seen
    assert not [name for name in imports if name in reach(name)], edges


def bench(*args, cwd, timeout, env=None):
    return subprocess.run([sys.executable, BENCH, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow
def test_model_help_and_a_tiny_ops_run_from_another_folder(tmp_path):
    proc = bench("model", "--help", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0 and "--hw" in proc.stdout and "--device" in proc.stdout, proc.stderr[-3000:]
    proc = bench("ops", "--repeats", 1, "--hw", "96,128", "--nms-boxes", 300, "--rois", "16,8", cwd=tmp_path,
                 timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "image 96x128" in proc.stdout and "DIFFERENT" not in proc.stdout
    # feature maps of a 96 x 128 image at strides 4 and 32, by hand
    assert "roi_align bwd train P2 24x32, 16 RoIs" in proc.stdout and "roi_align fwd test P5 3x4, 8 RoIs" in proc.stdout
    proc = bench("ops", "--hw", "100,128", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--hw: '100,128' is not two positive multiples of 32" in proc.stderr


@pytest.mark.slow
def test_gpu_refuses_data_it_cannot_read_before_any_step(tmp_path):
    absent = tmp_path / "absent"
    proc = bench("gpu", "--dry-run", "--data", absent, "--out", tmp_path / "out", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"--data {absent} has no annotations/instances_train2017.json, train2017, val2017" in proc.stderr
    assert "--skip trainloop,fidelity" in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_gpu_dry_run_runs_every_step_at_the_size_of_hw(demo_root, tmp_path):
    """The whole device check on the CPU at 96x128 on the demo data, the pytest step left out and the grid cut to
    one model and one precision; its temporary checkpoints go to tmp_path (TMPDIR)."""
    out = tmp_path / "out"
    proc = bench("gpu", "--device", "cpu", "--dry-run", "--hw", "96,128", "--data", demo_root, "--out", out,
                 "--skip", "pytest", "--models", "R-50-FPN", "--precisions", "fp32", cwd=tmp_path, timeout=900,
                 env={**os.environ, "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = ("grid", "trainloop", "syncs", "fidelity", "profile", "extras")
    for step in steps:
        assert f"bench gpu: {step}: exit 0" in proc.stdout, (step, proc.stdout[-3000:])
    assert "pytest:" not in proc.stdout and "image size: 96x128 in every step" in proc.stdout
    load = lambda name: json.loads((out / name).read_text())  # noqa: E731

    grid = load("grid.json")
    assert grid["image_hw"] == [96, 128]
    assert {(r["model"], r["what"], r["precision"]) for r in grid["rows"]} == {
        ("R-50-FPN", "training", "fp32"), ("R-50-FPN", "inference", "fp32")}
    syncs = load("syncs.json")
    assert syncs["image_hw"] == [96, 128] and len(syncs["cases"]) == 3
    extras = load("extras.json")
    assert extras["image_hw"] == [96, 128]
    assert [k for k in extras["records"] if k.startswith("channels_last")] == [
        "channels_last off/on R-50-FPN inference b1 fp32", "channels_last off/on R-50-FPN training b2 fp32"]
    profile = [line for line in (out / "profile.txt").read_text().splitlines() if line.startswith("== ")]
    assert len(profile) == 3 and all(" 96x128: " in line for line in profile), profile

    # the real images' resize sizes as train.py logged its config and as the fidelity checkpoints carry theirs
    loop = load("trainloop.json")
    assert loop["returncode"] == 0 and loop["img_s"] > 0, loop.get("stderr_tail")
    assert loop["sizes"] == {"min_size_train": [96], "max_size_train": 128, "min_size_test": 96, "max_size_test": 128}
    fidelity = load("fidelity.json")["runs"]
    assert set(fidelity) == {"demo fp32", "R-50-FPN fp32"}
    for run in fidelity.values():
        assert (run["min_size_test"], run["max_size_test"]) == (96, 128)
        assert run["share"] == 1.0 and run["cpu_detections"] > 0  # the CPU against itself: every detection matched


@pytest.mark.slow
def test_eval_runs_each_evaluator_in_its_process_and_gathers_from_ranks(tmp_path):
    small = ["--images", "40", "--classes", "5", "--repeats", "1"]
    out = subprocess.run([sys.executable, BENCH, "eval", *small, "--runs", "hotcoco:array,pycocotools:records"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()
            if line.startswith(("hotcoco:", "pycocotools:"))}  # progress lines first, then the table's
    assert set(rows) == {"hotcoco:array", "pycocotools:records"}
    assert rows["hotcoco:array"][-1] == rows["pycocotools:records"][-1] == "identical", out.stdout
    assert "40 images" in out.stdout and "4,000 detections" in out.stdout
    out = subprocess.run([sys.executable, BENCH, "eval", "--images", "6000", "--classes", "5", "--repeats", "1",
                          "--gather", "2"], cwd=tmp_path,  # each rank over the store's 8 MiB per value
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith(("dict:", "packed:"))]
    assert [r[0] for r in rows] == ["dict:", "packed:"] and all(r[2] == "600,000" for r in rows), out.stdout


@pytest.mark.slow
def test_export_times_both_files_and_says_where_onnx_runtime_spends(tmp_path):
    pytest.importorskip("onnxruntime", reason="pip install -r requirements-onnx.txt (.ci/run installs it)")
    proc = bench("export", "--repeats", 1, "--hw", "128,160", cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "image 128x160" in out and "ours, ONNX Runtime" in out and "torchvision, ONNX Runtime" in out, out
    profile = next(line for line in out.splitlines() if line.startswith("ONNX Runtime, one profiled run"))
    assert "Conv " in profile and "RoiAlign" in profile and "GFLOP/s" in profile, profile
    assert "GFLOP (convolution" in out and "x of our eager time" in out, out
    assert os.listdir(tmp_path) == []  # the files and the profile are removed
