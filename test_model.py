"""Tests of model.py, checkpoint.py and evaluate.py's folder inference: hand-worked values from
../shared/spec/maskrcnn_benchmark.md, torchvision as an independent reference (with the +1 accounted for),
tiny configs and small images."""
import json
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder
from torchvision.ops.misc import FrozenBatchNorm2d as TVFrozenBN

import checkpoint
import config
import model
import ops

ROOT = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(ROOT, "..", "shared")
needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared (fixtures, coco_tiny) is absent")
PLUS1 = torch.tensor([0.0, 0.0, 1.0, 1.0])  # +1 boxes -> torchvision's half-open convention


def tiny_cfg(**kw):
    """The real key layout at toy widths; frozen_bn by default to cover upstream's path."""
    base = dict(stage_blocks=(1, 1, 1, 1), stem_channels=8, width_per_group=4, fpn_channels=16, mlp_dim=32,
                num_classes=5, anchor_sizes=(16, 32, 64, 128, 256), rpn_pre_nms_top_n_train=200,
                rpn_post_nms_top_n_train=100, fpn_post_nms_top_n_train=150, rpn_pre_nms_top_n_test=100,
                rpn_post_nms_top_n_test=50, fpn_post_nms_top_n_test=60, rpn_batch_per_image=64,
                roi_batch_per_image=32, device="cpu")
    base.update(kw)
    return config.Config(**base)


def random_boxes(n, size=200, gen=None):
    xy = torch.rand(n, 2, generator=gen) * size
    wh = torch.rand(n, 2, generator=gen) * size / 2 + 1
    return torch.cat([xy, xy + wh], 1)


# ---- layout


@needs_shared
@pytest.mark.parametrize("preset", ["R-101-FPN", "R-50-FPN"])
def test_state_dict_keys_and_shapes_equal_fixture(preset):
    with torch.device("meta"):
        m = model.build_model(config.get(preset, verbose=False))
    fixture = json.load(open(os.path.join(SHARED, "fixtures", f"keys_{preset}.json")))["keys"]
    sd = m.state_dict()
    assert list(sd) == [k["key"] for k in fixture]  # order too: upstream's module tree
    assert {k: list(v.shape) for k, v in sd.items()} == {k["key"]: k["shape"] for k in fixture}
    if preset == "R-101-FPN":  # spec section 2 and 4.3
        assert sum(p.numel() for p in m.parameters()) == 60_643_940
        assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 60_421_540
        assert sum(1 for p in m.parameters() if p.requires_grad) == 123


def test_anchors_equal_spec_table():
    table = [  # spec 3.4, rows r = 0.5, 1, 2
        [[-22, -10, 25, 13], [-14, -14, 17, 17], [-10, -22, 13, 25]],
        [[-40, -20, 47, 27], [-28, -28, 35, 35], [-20, -44, 27, 51]],
        [[-84, -40, 99, 55], [-56, -56, 71, 71], [-36, -80, 51, 95]],
        [[-164, -72, 195, 103], [-112, -112, 143, 143], [-76, -168, 107, 199]],
        [[-332, -152, 395, 215], [-224, -224, 287, 287], [-148, -328, 211, 391]],
    ]
    gen = model.AnchorGenerator((32, 64, 128, 256, 512), (4, 8, 16, 32, 64), (0.5, 1.0, 2.0))
    for got, want in zip(gen.cell_anchors, table):
        assert got.dtype == torch.float32 and got.tolist() == want
    # grid: (y, x, a) order, shifts of the stride, from the padded feature size
    grids = gen([(2, 3)] * 5)
    p3 = grids[1]
    assert p3.shape == (2 * 3 * 3, 4)
    y, x, a = 1, 2, 0
    assert p3[(y * 3 + x) * 3 + a].tolist() == [-40 + 16, -20 + 8, 47 + 16, 27 + 8]


# ---- box utilities


def test_box_coder_round_trip_and_torchvision_reference():
    g = torch.Generator().manual_seed(0)
    ref, gt = random_boxes(50, gen=g), random_boxes(50, gen=g)
    for weights in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
        coder = model.BoxCoder(weights)
        deltas = coder.encode(gt, ref)
        torch.testing.assert_close(coder.decode(deltas, ref), gt, atol=1e-3, rtol=0)
        tv = TVBoxCoder(weights, math.log(1000.0 / 16))
        torch.testing.assert_close(deltas, tv.encode_single(gt + PLUS1, ref + PLUS1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(coder.decode(deltas, ref),
                                   tv.decode_single(deltas, ref + PLUS1) - PLUS1, atol=1e-3, rtol=0)
    # class-specific columns decode block by block
    coder = model.BoxCoder((10.0, 10.0, 5.0, 5.0))
    two = torch.cat([coder.encode(gt, ref), coder.encode(ref, ref)], 1)
    torch.testing.assert_close(coder.decode(two, ref), torch.cat([gt, ref], 1), atol=1e-3, rtol=0)


def test_decode_clamps_dw_dh_from_above_only():
    coder = model.BoxCoder((1.0, 1.0, 1.0, 1.0))
    ref = torch.tensor([[0.0, 0.0, 9.0, 19.0]])  # w 10, h 20
    out = coder.decode(torch.tensor([[0.0, 0.0, 10.0, -3.0]]), ref)[0]
    assert out[2] - out[0] + 1 == pytest.approx(10 * 1000 / 16, rel=1e-5)  # exp(log(1000/16)) * 10
    assert out[3] - out[1] + 1 == pytest.approx(20 * math.exp(-3), rel=1e-5)  # no lower clamp
    assert (out[0] + out[2]) / 2 == pytest.approx(4.5)  # centre kept


def test_iou_clip_with_plus_one():
    a = torch.tensor([[0.0, 0.0, 9.0, 9.0]])
    b = torch.tensor([[5.0, 5.0, 14.0, 14.0], [9.0, 9.0, 18.0, 18.0], [10.0, 0.0, 19.0, 9.0]])
    assert model.box_iou(a, b)[0].tolist() == pytest.approx([25 / 175, 1 / 199, 0.0])  # touching = 1 px
    g = torch.Generator().manual_seed(1)
    x, y = random_boxes(20, gen=g), random_boxes(30, gen=g)
    torch.testing.assert_close(model.box_iou(x, y), torchvision.ops.box_iou(x + PLUS1, y + PLUS1))
    clipped = model.clip_boxes(torch.tensor([[-5.0, -3.0, 700.0, 500.0, 3.0, 4.0, 5.0, 6.0]]), (480, 640))
    assert clipped.tolist() == [[0.0, 0.0, 639.0, 479.0, 3.0, 4.0, 5.0, 6.0]]
    assert model.remove_small_boxes(torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 5.0]]), 2).tolist() == [0]


def test_nms_with_plus_one():
    # IoU 2/6 with +1 widths, 0 without: suppressed at 0.3 only in the legacy convention
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 2.0, 1.0]])
    scores = torch.tensor([0.9, 0.8])
    assert ops.nms(boxes, scores, 0.3, offset=1).tolist() == [0]
    assert ops.nms(boxes, scores, 0.3, offset=0).tolist() == [0, 1]
    # random boxes against a greedy reference built on model.box_iou, suppressing at IoU > thresh
    g = torch.Generator().manual_seed(2)
    boxes, scores = random_boxes(200, gen=g), torch.rand(200, generator=g)
    iou = model.box_iou(boxes, boxes)
    order, keep = scores.argsort(descending=True).tolist(), []
    suppressed = torch.zeros(200, dtype=torch.bool)
    for i in order:
        if not suppressed[i]:
            keep.append(i)
            suppressed |= iou[i] > 0.5
    assert ops.nms(boxes, scores, 0.5, offset=1).tolist() == keep


# ---- matcher, sampler, level mapper, FrozenBN


def test_matcher_thresholds_low_quality_rule_and_ties():
    iou = torch.tensor([[0.9, 0.1, 0.2, 0.28, 0.0, 0.5],
                        [0.1, 0.25, 0.25, 0.25, 0.0, 0.0]])
    assert model.match(iou.clone(), 0.7, 0.3, False).tolist() == [0, -1, -1, -1, -1, -2]
    # gt 1's best IoU 0.25 is attained by predictions 1, 2 and 3 (a tie): each gets its *own* argmax gt back,
    # so prediction 3 (argmax gt 0 at 0.28) goes to gt 0, below the low threshold, as upstream
    assert model.match(iou.clone(), 0.7, 0.3, True).tolist() == [0, 1, 1, 0, -1, -2]
    with pytest.raises(ValueError, match="empty"):
        model.match(torch.zeros(0, 5), 0.7, 0.3, True)


def test_sampler_counts():
    torch.manual_seed(0)
    labels = torch.cat([torch.ones(10), torch.zeros(1000), -torch.ones(50)])
    pos, neg = model.sample_pos_neg(labels, 256, 0.5)
    assert (pos.sum(), neg.sum()) == (10, 246) and not (pos | neg)[-50:].any()
    labels = torch.cat([torch.full((300,), 3), torch.zeros(1000)]).long()
    pos, neg = model.sample_pos_neg(labels, 512, 0.25)
    assert (pos.sum(), neg.sum()) == (128, 384) and (labels[pos] == 3).all() and (labels[neg] == 0).all()
    pos, neg = model.sample_pos_neg(torch.cat([torch.ones(200), torch.zeros(20)]), 256, 0.5)
    assert (pos.sum(), neg.sum()) == (128, 20)


def test_level_mapper_edges():
    sides = torch.tensor([1.0, 111, 112, 223, 224, 447, 448, 5000])
    boxes = torch.stack([torch.zeros(8), torch.zeros(8), sides - 1, sides - 1], 1)  # +1 side = L
    assert model.map_levels(boxes).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_frozen_bn_has_no_epsilon_and_folds_into_conv():
    torch.manual_seed(0)
    bn = model.FrozenBatchNorm2d(6)
    bn.weight.uniform_(0.5, 2)
    bn.bias.normal_()
    bn.running_mean.normal_()
    bn.running_var.uniform_(1e-4, 1e-3)  # small variances make an epsilon visible
    x = torch.randn(2, 6, 5, 5)
    want = (x - bn.running_mean.view(1, -1, 1, 1)) / bn.running_var.sqrt().view(1, -1, 1, 1) \
        * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(bn(x), want, rtol=1e-5, atol=1e-4)
    tv = TVFrozenBN(6, eps=0.0)
    tv.load_state_dict(bn.state_dict())
    torch.testing.assert_close(bn(x), tv(x), rtol=1e-5, atol=1e-4)
    tv_eps = TVFrozenBN(6, eps=1e-5)
    tv_eps.load_state_dict(bn.state_dict())
    assert (bn(x) - tv_eps(x)).abs().max() > 1e-2
    conv = torch.nn.Conv2d(6, 4, 3, 2, 1, bias=False)
    bn4 = model.FrozenBatchNorm2d(4)
    bn4.load_state_dict({k: v[:4] for k, v in bn.state_dict().items()})
    torch.testing.assert_close(model.conv_norm(x, conv, bn4), bn4(conv(x)), rtol=1e-4, atol=1e-3)


def test_folded_backbone_matches_unfolded(monkeypatch):
    """FrozenBN folded into the convs (model.conv_norm) against separate conv and BN ops, on random BN stats."""
    torch.manual_seed(0)
    m = model.build_model(tiny_cfg(stage_blocks=(2, 1, 1, 1))).eval()
    for mod in m.modules():
        if isinstance(mod, model.FrozenBatchNorm2d):
            mod.weight.uniform_(0.5, 1.5)
            mod.bias.normal_(0, 0.1)
            mod.running_mean.normal_(0, 0.1)
            mod.running_var.uniform_(0.5, 2)
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        folded = m.backbone(x)
        monkeypatch.setattr(model, "conv_norm", lambda x, conv, norm: norm(conv(x)))
        unfolded = m.backbone(x)
    for a, b in zip(folded, unfolded):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


# ---- forward and backward


def targets_for(sizes):
    g = torch.Generator().manual_seed(3)
    out = []
    for h, w in sizes:
        b = random_boxes(4, size=min(h, w) - 60, gen=g)
        out.append({"boxes": b, "labels": torch.randint(1, 5, (4,), generator=g)})
    return out


@pytest.mark.parametrize("norm", ["frozen_bn", "gn"])
def test_tiny_forward_backward_train_and_eval(norm):
    torch.manual_seed(0)
    cfg = tiny_cfg(norm=norm, freeze_at=2 if norm == "frozen_bn" else 0)
    m = model.build_model(cfg)
    images = torch.randn(2, 3, 128, 160)
    sizes = [(128, 150), (110, 160)]
    m.train()
    losses = m(images, sizes, targets_for(sizes))
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_classifier"].item() == pytest.approx(math.log(5), rel=0.1)  # near-uniform at init
    sum(losses.values()).backward()
    for name, p in m.named_parameters():
        frozen = norm == "frozen_bn" and (".stem." in name or ".layer1." in name)
        assert p.requires_grad != frozen, name
        if not frozen and "predictor" not in name:
            assert p.grad is not None, name
    m.eval()
    with torch.no_grad():
        out = m(images, sizes)
    assert len(out) == 2
    for det, (h, w) in zip(out, sizes):
        assert det["boxes"].shape[1] == 4 and len(det["boxes"]) == len(det["scores"]) == len(det["labels"])
        assert det["labels"].dtype == torch.int64
        assert ((det["labels"] >= 1) & (det["labels"] <= 4)).all()
        assert (det["boxes"][:, 0::2] <= w - 1).all() and (det["boxes"][:, 1::2] <= h - 1).all()
        assert (det["boxes"] >= 0).all() and (det["scores"] > cfg.score_thresh).all()
        assert len(det["scores"]) <= cfg.detections_per_img


def test_training_proposals_are_selected_per_batch():
    torch.manual_seed(0)
    cfg = tiny_cfg(fpn_post_nms_top_n_train=70)
    m = model.build_model(cfg).train()
    feats = m.backbone(torch.randn(2, 3, 128, 128))
    props, _ = m.rpn(feats, [(128, 128), (128, 128)], targets_for([(128, 128)] * 2))
    assert sum(len(b) for b, _ in props) == 70  # upstream quirk: the top-n spans the batch (spec 3.7)
    m.rpn.cfg = tiny_cfg(fpn_post_nms_top_n_train=70, fpn_post_nms_per_batch=False)
    props, _ = m.rpn(feats, [(128, 128), (128, 128)], targets_for([(128, 128)] * 2))
    assert [len(b) for b, _ in props] == [70, 70]


def test_training_refuses_an_image_without_boxes():
    m = model.build_model(tiny_cfg()).train()
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    with pytest.raises(ValueError, match="image 0"):
        m(torch.randn(1, 3, 64, 64), [(64, 64)], targets)


# ---- checkpoints


def test_upstream_checkpoint_with_module_prefix_loads(tmp_path, capsys):
    torch.manual_seed(0)
    src = model.build_model(tiny_cfg())
    path = str(tmp_path / "upstream.pth")
    torch.save({"model": {"module." + k: v for k, v in src.state_dict().items()}, "iteration": 90000}, path)
    dst = model.build_model(tiny_cfg())
    checkpoint.load_weights(dst, path)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    torch.save(src.state_dict(), path)  # a bare state dict
    checkpoint.load_weights(model.build_model(tiny_cfg()), path)
    # a partial or wrong-shaped file is refused by name
    sd = dict(src.state_dict())
    sd.pop("rpn.head.conv.bias")
    sd["extra.weight"] = torch.zeros(1)
    torch.save({"model": sd}, path)
    with pytest.raises(checkpoint.CheckpointError, match=r"missing 1: rpn.head.conv.bias(.|\n)*unexpected 1: extra"):
        checkpoint.load_weights(model.build_model(tiny_cfg()), path)
    torch.save(src.state_dict(), path)
    other = model.build_model(tiny_cfg(num_classes=3))
    with pytest.raises(checkpoint.CheckpointError, match="cls_score.weight .file .5, 32., model .3, 32"):
        checkpoint.load_weights(other, path)
    checkpoint.load_weights(other, path, skip_predictor=True)
    assert "not loading the class-dependent predictor" in capsys.readouterr().out
    assert torch.equal(other.backbone.body.layer4[0].conv2.weight, src.backbone.body.layer4[0].conv2.weight)


def test_own_checkpoint_round_trip(tmp_path):
    cfg = tiny_cfg(base_lr=0.005)
    m = model.build_model(cfg)
    path = str(tmp_path / "ours.pth")
    checkpoint.save(path, m, cfg, iteration=7, optimizer={"state": {}})
    ckpt = checkpoint.load(path)
    assert ckpt["iteration"] == 7 and config.from_dict(ckpt["config"]) == cfg
    assert not os.path.exists(path + ".tmp")
    m2 = model.build_model(config.from_dict(ckpt["config"]))
    checkpoint.load_state(m2, checkpoint.model_state(ckpt), path)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


def detectron_blobs(stage_blocks, stem, width, gen):
    """Blob names of Detectron's ImageNet ResNet (spec 4.4), tiny shapes: conv biases, a classifier and
    momentum blobs included, as the real file may hold them."""
    def arr(*shape):
        return gen.standard_normal(shape).astype(np.float32)
    blobs = {"conv1_w": arr(stem, 3, 7, 7), "conv1_b": arr(stem), "res_conv1_bn_s": arr(stem),
             "res_conv1_bn_b": arr(stem), "pred_w": arr(10, 8), "pred_b": arr(10), "conv1_w_momentum": arr(stem)}
    cin = stem
    for s, n in enumerate(stage_blocks):
        mid, out = width * 2 ** s, width * 4 * 2 ** s
        for i in range(n):
            p = f"res{s + 2}_{i}_"
            shapes = {"branch2a": (mid, cin if i == 0 else out, 1, 1), "branch2b": (mid, mid, 3, 3),
                      "branch2c": (out, mid, 1, 1)}
            if i == 0:
                shapes["branch1"] = (out, cin, 1, 1)
            for br, shape in shapes.items():
                blobs.update({p + br + "_w": arr(*shape), p + br + "_b": arr(shape[0]),
                              p + br + "_bn_s": arr(shape[0]), p + br + "_bn_b": arr(shape[0])})
        cin = out
    return blobs


def test_detectron_pickle_round_trip_loads_312_for_r101(tmp_path):
    cfg = tiny_cfg(stage_blocks=(3, 4, 23, 3))  # R-101's names at toy widths
    blobs = detectron_blobs(cfg.stage_blocks, cfg.stem_channels, cfg.width_per_group, np.random.default_rng(0))
    path = str(tmp_path / "R-101.pkl")
    with open(path, "wb") as f:
        pickle.dump({"blobs": blobs}, f, protocol=2)  # Detectron's files are Python-2 pickles
    m = model.build_model(cfg)
    fpn_before = m.backbone.fpn.fpn_inner1.weight.clone()
    assert checkpoint.load_detectron_pickle(m, path) == 312
    body = m.backbone.body
    assert np.array_equal(body.stem.conv1.weight.detach().numpy(), blobs["conv1_w"])
    assert np.array_equal(body.stem.bn1.weight.detach().numpy(), blobs["res_conv1_bn_s"])
    assert np.array_equal(body.layer3[22].conv2.weight.detach().numpy(), blobs["res4_22_branch2b_w"])
    assert np.array_equal(body.layer1[0].downsample[1].bias.detach().numpy(), blobs["res2_0_branch1_bn_b"])
    assert np.array_equal(body.layer4[2].bn3.bias.detach().numpy(), blobs["res5_2_branch2c_bn_b"])
    assert (body.layer2[1].bn1.running_var == 1).all() and (body.layer2[1].bn1.running_mean == 0).all()
    assert torch.equal(m.backbone.fpn.fpn_inner1.weight, fpn_before)
    # R-50's pickle into R-101 fails with a clear error, not upstream's silent suffix mix-up
    with open(path, "wb") as f:
        pickle.dump(detectron_blobs((3, 4, 6, 3), 8, 8, np.random.default_rng(0)), f, protocol=2)
    with pytest.raises(checkpoint.CheckpointError, match="shape"):
        checkpoint.load_detectron_pickle(m, path)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_with_payload_is_refused(tmp_path):
    path = str(tmp_path / "evil.pkl")
    with open(path, "wb") as f:
        pickle.dump({"blobs": {"conv1_w": np.zeros((1,), np.float32), "x": Payload()}}, f, protocol=2)
    with pytest.raises(checkpoint.CheckpointError, match=r"evil.pkl.*global '(posix|os|nt)\.system' is not allowed"):
        checkpoint.read_pickle(path)
    pth = str(tmp_path / "evil.pth")
    torch.save({"model": {"a": torch.zeros(1)}, "x": Payload()}, pth)
    with pytest.raises(checkpoint.CheckpointError, match="refusing to load"):
        checkpoint.load(pth)


# ---- folder inference, end to end


@needs_shared
def test_folder_inference_command(tmp_path):
    src = os.path.join(SHARED, "datasets", "coco_tiny", "val2017")
    images = tmp_path / "images"
    images.mkdir()
    names = sorted(os.listdir(src))[:3]
    for n in names:
        os.symlink(os.path.join(src, n), images / n)
    torch.manual_seed(0)
    cfg = tiny_cfg(num_classes=81, min_size_test=160, max_size_test=256)
    ckpt = str(tmp_path / "random.pth")
    checkpoint.save(ckpt, model.build_model(cfg), cfg)
    out, vis = str(tmp_path / "dets.json"), str(tmp_path / "vis")
    # random weights score about 1/81 per class: lower the threshold so that records are written
    cmd = [sys.executable, os.path.join(ROOT, "evaluate.py"), "--ckpt", ckpt, "--images", str(images), "--output",
           out, "--device", "cpu", "--vis", vis, "score_thresh=0.005"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    dets = json.load(open(out))
    assert dets and {d["file_name"] for d in dets} <= set(names)
    import evaluate
    from PIL import Image
    for d in dets:
        w, h = Image.open(images / d["file_name"]).size
        x, y, bw, bh = d["bbox"]
        assert d["category_id"] in evaluate.COCO_IDS and 0.005 < d["score"] <= 1
        assert x >= 0 and y >= 0 and bw >= 1 and bh >= 1
        assert x + bw - 1 <= w - 1 + 1e-3 and y + bh - 1 <= h - 1 + 1e-3  # clipped in resized pixels, rescaled
    assert sorted(os.listdir(vis)) == sorted(names)


def test_coco_records_rescale_per_axis_with_plus_one():
    import evaluate
    det = {"boxes": torch.tensor([[10.0, 20.0, 109.0, 59.0]]), "scores": torch.tensor([0.5]),
           "labels": torch.tensor([12])}
    rec = evaluate.coco_records(det, (400, 500), (800, 2000), {12: 13})[0]  # x ratio 4, y ratio 2
    assert rec["bbox"] == pytest.approx([40.0, 40.0, 436 - 40 + 1, 118 - 40 + 1]) and rec["category_id"] == 13


# ---- config overrides


def test_config_overrides_type_check_and_closest_names(capsys):
    cfg = config.get("R-50-FPN", ["base_lr=0.01", "--max_iter", "100", "stage_blocks=(1,1,1,1)", "amp=bf16"])
    assert (cfg.base_lr, cfg.max_iter, cfg.stage_blocks, cfg.amp) == (0.01, 100, (1, 1, 1, 1), "bf16")
    assert "max_iter = 100" in capsys.readouterr().out
    with pytest.raises(config.ConfigError, match="'max_iter' expects int"):
        config.get("R-101-FPN", ["max_iter=1.5"])
    with pytest.raises(config.ConfigError, match="did you mean base_lr"):
        config.get("R-101-FPN", ["base_lrr=0.1"])
    with pytest.raises(config.ConfigError, match="unknown config preset"):
        config.get("R-152")
    assert config.from_dict(config.to_dict(cfg)) == cfg
