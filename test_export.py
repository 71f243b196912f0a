"""Tests of export.py and of an exported file run by ONNX Runtime (evaluate.OnnxDetector): its detections against
eager PyTorch's (random weights: the demo's network and R-50-FPN) at sizes other than the traced one and on an image
without detections, the NonMaxSuppression and RoiAlign nodes against our native kernels, the graph's operators and
dynamic sizes, evaluate.py on an exported file, and bad input. Both opsets offered: 11 and the default."""
import json
import os

import pytest
import torch

import checkpoint
import config
import evaluate
import export
import launch
import model
import ops
from conftest import run, script, tiny_cfg, unwritable

onnx = pytest.importorskip("onnx", reason="pip install -r requirements-onnx.txt (.ci/run installs it)")
onnxruntime = pytest.importorskip("onnxruntime", reason="pip install -r requirements-onnx.txt")
OPSETS = [11, export.DEFAULT_OPSET]


def random_net(cfg, seed=0, cls_std=0.05):
    """A randomly initialised model whose scores spread over (0, 1): a dominant background bias keeps a blank
    image without detections (its features are all zero), random class weights give others some."""
    torch.manual_seed(seed)
    net = model.build_model(cfg).eval()
    with torch.no_grad():
        p = net.roi_heads.box.predictor
        p.cls_score.weight.normal_(0, cls_std)
        p.cls_score.bias.normal_(0, 1)
        p.cls_score.bias[0] = 6
        net.rpn.head.cls_logits.bias.normal_(0, 1)
    return net


def inputs(seed, hw, pad=(3, 5)):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, *hw, generator=gen) * 50, (hw[0] - pad[0], hw[1] - pad[1])


def assert_same_detections(want, got):
    """Same count and labels, boxes and scores within rtol 1e-3 / atol 1e-5 (torchvision's test_onnx.py); where
    ties make the order differ, >= 99% matched (same label, IoU > 0.99, score within 1e-3)."""
    if len(got["labels"]) == len(want["labels"]) and torch.equal(got["labels"], want["labels"]) and \
            torch.allclose(got["boxes"], want["boxes"], rtol=1e-3, atol=1e-5) and \
            torch.allclose(got["scores"], want["scores"], rtol=1e-3, atol=1e-5):
        return
    label_ids = {i: i for i in range(1000)}
    a, b = evaluate.coco_records(want, label_ids), evaluate.coco_records(got, label_ids)
    matched, na, nb = evaluate.detection_agreement(a, b)
    assert matched >= 0.99 * max(na, nb), (matched, na, nb)


def export_and_compare(net, cfg, path, opset, traced_hw, other_hw):
    """Export at traced_hw; ONNX Runtime against eager on the traced size, another size and a blank image."""
    export.export(net, cfg, [{"id": i, "name": f"c{i}"} for i in range(1, cfg.num_classes)], path, opset,
                  hw=traced_hw)
    runner = evaluate.OnnxDetector(path)
    counts = []
    for image, size in (inputs(1, traced_hw), inputs(2, other_hw), (torch.zeros(1, 3, *traced_hw), traced_hw)):
        with torch.no_grad():
            want = net(image, [size])[0]
        got = runner(image, [size])[0]
        assert_same_detections(want, got)
        counts.append(len(want["labels"]))
    assert counts[0] > 0 and counts[1] > 0 and counts[2] == 0, counts  # the blank image: none
    return onnx.load(path)


@pytest.mark.parametrize("opset", OPSETS)
def test_demo_network_exports_and_agrees_with_eager(tmp_path, opset):
    cfg = config.get("demo", ["min_size_test=96", "max_size_test=128"], verbose=False)
    graph = export_and_compare(random_net(cfg), cfg, str(tmp_path / "demo.onnx"), opset, (96, 128), (160, 96))
    nodes = list(graph.graph.node)
    assert not [n for n in nodes if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                        for a in n.attribute)]  # no If or Loop: one straight graph
    assert {n.domain for n in nodes} <= {"", "ai.onnx"}  # standard operators only: no custom domain
    kinds = {n.op_type for n in nodes}
    assert {"NonMaxSuppression", "RoiAlign", "TopK"} <= kinds
    roi_align = [n for n in nodes if n.op_type == "RoiAlign"]
    assert len(roi_align) == 4  # P2..P5
    modes = {a.s.decode() for n in roi_align for a in n.attribute if a.name == "coordinate_transformation_mode"}
    assert modes == (set() if opset < 16 else {"output_half_pixel"})  # upstream's aligned=False either way
    image = graph.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in image[:2]] == [1, 3] and image[2].dim_param and image[3].dim_param  # dynamic h, w
    meta = {p.key: p.value for p in graph.metadata_props}
    assert config.from_dict(json.loads(meta[evaluate.ONNX_CONFIG])) == cfg
    assert [c["name"] for c in json.loads(meta[evaluate.ONNX_CATEGORIES])] == ["c1", "c2", "c3"]


@pytest.mark.slow  # not a subprocess, but a minute on 2 cores: R-50-FPN's trace and its 167 MB file
def test_random_r50_fpn_exports_and_agrees_with_eager(tmp_path):
    cfg = config.get("R-50-FPN", ["device=cpu", "min_size_test=128", "max_size_test=160"], verbose=False)
    export_and_compare(random_net(cfg, cls_std=0.002), cfg, str(tmp_path / "r50.onnx"), export.DEFAULT_OPSET,
                       (128, 160), (192, 96))


def test_frozen_bn_tiny_network_at_opset_11(tmp_path):
    cfg = tiny_cfg(min_size_test=64, max_size_test=96)
    export_and_compare(random_net(cfg), cfg, str(tmp_path / "tiny.onnx"), 11, (64, 96), (96, 64))


# ---- the two nodes alone, against the native kernels


class RoIAlignNet(torch.nn.Module):
    def forward(self, x, rois):
        return ops.roi_align(x, rois, (7, 7), 0.25, 2, aligned=False)


class NMSNet(torch.nn.Module):
    def forward(self, boxes, scores, cats):
        return ops.batched_nms(boxes, scores, cats, 0.5, offset=1)


def to_onnx(module, args, path, opset, names):
    kwargs = {"dynamo": False} if "dynamo" in torch.onnx.export.__code__.co_varnames else {}
    torch.onnx.export(module, args, path, opset_version=opset, input_names=names, output_names=["out"],
                      dynamic_axes={n: {0: "n"} for n in names[1 if names[0] == "x" else 0:]}, **kwargs)
    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("opset", OPSETS)
def test_roi_align_node_equals_native(tmp_path, opset):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 24, 32, generator=gen)
    sess = to_onnx(RoIAlignNet(), (x, torch.tensor([[0.0, 1, 1, 20, 20]])), str(tmp_path / "r.onnx"), opset,
                   ["x", "rois"])
    xy = torch.rand(40, 2, generator=gen) * 120 - 4  # sub-pixel, partly outside the 96x128 image
    wh = torch.rand(40, 2, generator=gen) * 60
    wh[:8] *= 0.01  # smaller than a pixel: the legacy ROIAlign widens them to 1
    rois = torch.cat([torch.randint(0, 2, (40, 1), generator=gen).float(), xy, xy + wh], 1)
    for r in (rois, rois[:0]):  # and no RoI at all
        want = ops.roi_align(x, r, (7, 7), 0.25, 2, aligned=False)
        got = torch.from_numpy(sess.run(None, {"x": x.numpy(), "rois": r.numpy()})[0])
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class PoolerNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.pooler = model.Pooler(7, (4, 8, 16, 32), 2)

    def forward(self, p2, p3, p4, p5, boxes):
        return self.pooler([p2, p3, p4, p5], [boxes])


def square_boxes(sides, gen):
    """Squares of these sides at random places in a 512x512 image: the level of each is fixed by its size (224 px
    maps to P4, half that to P3, ...: upstream's LevelMapper)."""
    xy = torch.rand(len(sides), 2, generator=gen) * 40
    side = torch.tensor(sides, dtype=torch.float32)[:, None].expand(-1, 2)
    return torch.cat([xy, xy + side - 1], 1)


@pytest.mark.parametrize("opset", OPSETS)
def test_pooler_graph_takes_any_count_per_level(tmp_path, opset):
    # Traced with exactly one RoI on P3, then run with none and with three there (and none on P5): the graph must
    # read no count from the traced input (a ScatterND whose update shape the tracer froze at one RoI failed on
    # real photos: "cannot reshape {0,256,7,7} to {256,7,7}").
    gen = torch.Generator().manual_seed(0)
    feats = [torch.randn(1, 8, 512 // s, 512 // s, generator=gen) for s in (4, 8, 16, 32)]
    traced = square_boxes([40, 50, 112, 224, 448], gen)
    sess = to_onnx(PoolerNet().eval(), (*feats, traced), str(tmp_path / "p.onnx"), opset,
                   ["p2", "p3", "p4", "p5", "boxes"])
    assert "ScatterND" not in {n.op_type for n in onnx.load(str(tmp_path / "p.onnx")).graph.node}
    net = PoolerNet().eval()
    for sides in ([40, 224, 50], [112, 40, 120, 224, 100, 448], [60], [], [40, 112, 224]):
        boxes = square_boxes(sides, gen)
        if len(sides) == 3 and sides[1] == 112:
            boxes[1, 2] = float("nan")  # no level: zero features, as in eager
        want = net(*feats, boxes)
        feed = {name: f.numpy() for name, f in zip(("p2", "p3", "p4", "p5"), feats)}
        got = torch.from_numpy(sess.run(None, {**feed, "boxes": boxes.numpy()})[0])
        assert got.shape == want.shape, sides
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opset", OPSETS)
def test_nms_node_equals_native(tmp_path, opset):
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=gen) * 100
    boxes = torch.cat([xy, xy + torch.rand(300, 2, generator=gen) * 40 + 1], 1).round()  # whole pixels: many ties
    scores = (torch.rand(300, generator=gen) * 10).round() / 10  # tied scores
    # two boxes exactly at the threshold with the legacy +1 widths (10x10 and 10x5: IoU 50/100 = 0.5): both kept
    boxes[:2] = torch.tensor([[0.0, 0, 9, 9], [0, 0, 9, 4]])
    scores[:2] = torch.tensor([2.0, 1.5])
    cats = torch.randint(1, 4, (300,), generator=gen)
    cats[:2] = 0
    sess = to_onnx(NMSNet(), (boxes, scores, cats), str(tmp_path / "n.onnx"), opset, ["boxes", "scores", "cats"])
    for b, s, c in ((boxes, scores, cats), (boxes[:0], scores[:0], cats[:0])):
        want = ops.batched_nms(b, s, c, 0.5, offset=1)
        got = torch.from_numpy(sess.run(None, {"boxes": b.numpy(), "scores": s.numpy(), "cats": c.numpy()})[0])
        # ONNX: category by category; each category's indices as the native kernel orders them (score, then index)
        assert got.tolist() == want[c[want].sort(stable=True).indices].tolist()
    assert {0, 1} <= set(sess.run(None, {"boxes": boxes.numpy(), "scores": scores.numpy(),
                                         "cats": cats.numpy()})[0].tolist())


# ---- the scripts


def demo_checkpoint(tmp_path, seed=0, *overrides):
    cfg = config.get("demo", ["min_size_test=96", "max_size_test=128", "device=cpu", *overrides], verbose=False)
    path = str(tmp_path / "demo.pth")
    checkpoint.save(path, random_net(cfg, seed), cfg)
    return path


@pytest.mark.slow  # R-50-FPN's trace and its 167 MB file, twice
@pytest.mark.parametrize("opset", OPSETS)
def test_upstream_layout_checkpoint_through_both_commands(tmp_path, capsys, opset):
    # Upstream's released .pth cannot be downloaded here: random R-50-FPN weights saved in its layout (DDP's
    # "module." prefix, optimizer/scheduler/iteration beside "model", no config) go through the README's commands,
    # `export.py --ckpt X.pth --config R-50-FPN` then `evaluate.py --ckpt m.onnx --images DIR --config R-50-FPN`,
    # against evaluate.py on the .pth itself.
    from PIL import Image
    sizes = ["min_size_test=128", "max_size_test=160"]
    net = random_net(config.get("R-50-FPN", ["device=cpu"] + sizes, verbose=False), cls_std=0.002)
    pth, onnx_path, images = str(tmp_path / "upstream.pth"), str(tmp_path / "m.onnx"), tmp_path / "photos"
    torch.save({"model": {f"module.{k}": v for k, v in net.state_dict().items()}, "optimizer": {}, "scheduler": {},
                "iteration": 90000}, pth)
    images.mkdir()
    gen = torch.Generator().manual_seed(3)
    for name, (h, w) in (("a.jpg", (120, 150)), ("b.png", (200, 90)), ("c.jpg", (128, 160))):
        pixels = (torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(images / name, quality=95)
    assert export.main(["--ckpt", pth, "--config", "R-50-FPN", "--output", onnx_path, "--opset", str(opset),
                        *sizes]) == onnx_path
    assert "the same" in capsys.readouterr().out
    dets = {}
    for name, ckpt in (("pth", pth), ("onnx", onnx_path)):
        dets[name] = str(tmp_path / f"{name}.json")
        evaluate.main(["--ckpt", ckpt, "--images", str(images), "--output", dets[name], "--config", "R-50-FPN",
                       "device=cpu", *sizes])
    want, got = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("pth", "onnx"))
    assert len({d["file_name"] for d in want}) == 3, len(want)
    matched, na, nb = evaluate.detection_agreement(want, got)
    assert matched >= 0.99 * max(na, nb), (matched, na, nb)


def test_export_check_says_when_it_had_nothing_to_compare(tmp_path, capsys):
    # A trained detector finds nothing in the random test input: "the same" would be a check of nothing
    cfg = config.get("demo", ["min_size_test=96", "max_size_test=128", "device=cpu"], verbose=False)
    net = random_net(cfg)
    with torch.no_grad():
        net.roi_heads.box.predictor.cls_score.bias[0] = 50  # background everywhere
    path, out = str(tmp_path / "demo.pth"), str(tmp_path / "demo.onnx")
    checkpoint.save(path, net, cfg)
    export.main(["--ckpt", path, "--output", out])
    printed = capsys.readouterr().out
    assert "gives 0 detections, PyTorch 0" in printed and "none to compare" in printed and "the same" not in printed


@pytest.mark.slow
def test_export_then_evaluate_matches_pytorch(tmp_path, demo_root):
    ckpt, onnx_path = demo_checkpoint(tmp_path, 0, f"data_root={demo_root}"), str(tmp_path / "out" / "demo.onnx")
    res = run(script("export.py", "--ckpt", ckpt, "--output", onnx_path, "--opset", "11"))
    # the check runs on the first image of the checkpoint's val split, which is here
    first = os.path.join(demo_root, "val2017", sorted(os.listdir(os.path.join(demo_root, "val2017")))[0])
    assert res.returncode == 0 and f"on {first} (" in res.stdout and "the same" in res.stdout, res.stdout + res.stderr
    results = {}
    for name, path in (("pth", ckpt), ("onnx", onnx_path)):
        out = str(tmp_path / f"eval_{name}")
        res = run(script("evaluate.py", "--ckpt", path, f"data_root={demo_root}", f"output_dir={out}"))
        assert res.returncode == 0, res.stderr
        results[name] = json.load(open(os.path.join(out, "metrics_val2017.json")))
        results[name]["records"] = json.load(open(os.path.join(out, "coco_results_val2017.json")))
    pth, onx = results["pth"], results["onnx"]
    assert pth["detections"] > 0 and abs(pth["AP"] - onx["AP"]) <= 0.001
    matched, na, nb = evaluate.detection_agreement(pth["records"], onx["records"])
    assert matched >= 0.99 * max(na, nb), (matched, na, nb)


# ---- bad input: one paragraph, exit 2, nothing left behind


def user_error(capsys, main, argv):
    with pytest.raises(SystemExit) as end:
        launch.run_cli(lambda: main(argv))
    err = capsys.readouterr().err
    assert end.value.code == 2 and "Traceback" not in err, err
    return err


def test_bad_export_arguments_are_one_paragraph(tmp_path, capsys, monkeypatch):
    ckpt, out = demo_checkpoint(tmp_path), str(tmp_path / "m.onnx")
    err = user_error(capsys, export.main, ["--ckpt", ckpt, "--output", out, "--opset", "10"])
    assert "--opset 10: this export needs opset 11 or newer" in err
    err = user_error(capsys, export.main, ["--ckpt", ckpt, "--output", str(tmp_path)])
    assert f"--output {tmp_path} is a folder" in err
    locked = tmp_path / "locked"
    locked.mkdir()
    with unwritable(locked):
        err = user_error(capsys, export.main, ["--ckpt", ckpt, "--output", str(locked / "m.onnx")])
    assert "cannot write in" in err
    bare = str(tmp_path / "bare.pth")
    torch.save({"model": torch.load(ckpt, weights_only=True)["model"]}, bare)  # upstream-style: no config
    err = user_error(capsys, export.main, ["--ckpt", bare, "--output", out])
    assert "carries no config" in err and "--config" in err
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # as if not installed
    err = user_error(capsys, export.main, ["--ckpt", ckpt, "--output", out])
    assert "pip install -r requirements-onnx.txt" in err
    assert sorted(os.listdir(tmp_path)) == ["bare.pth", "demo.pth", "locked"]  # nothing written


def test_evaluate_refuses_an_onnx_file_not_ours(tmp_path, capsys, monkeypatch):
    foreign = str(tmp_path / "foreign.onnx")
    kwargs = {"dynamo": False} if "dynamo" in torch.onnx.export.__code__.co_varnames else {}
    torch.onnx.export(torch.nn.ReLU(), (torch.ones(2),), foreign, **kwargs)
    err = user_error(capsys, evaluate.main, ["--ckpt", foreign, "--images", str(tmp_path)])
    assert "not a file written by export.py" in err
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    err = user_error(capsys, evaluate.main, ["--ckpt", str(garbage), "--images", str(tmp_path)])
    assert "ONNX Runtime cannot read" in err
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # as if not installed
    err = user_error(capsys, evaluate.main, ["--ckpt", foreign, "--images", str(tmp_path)])
    assert "running it needs onnxruntime (pip install -r requirements-onnx.txt)" in err
