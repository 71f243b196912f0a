"""Tests of checkpoint.py: upstream's checkpoints (with or without "module."), ours, Detectron's pickles with
upstream's renaming, refusal of partial loads and of pickled code, and the training checkpoints (newest K kept,
a damaged newest one skipped)."""
import os
import pickle
import re

import numpy as np
import pytest
import torch

import checkpoint
import config
import model
from conftest import tiny_cfg


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
    init = other.roi_heads.box.predictor.cls_score.weight.clone()
    with pytest.raises(checkpoint.CheckpointError, match="cls_score.weight .file .5, 32., model .3, 32"):
        checkpoint.load_state(other, checkpoint.model_state(checkpoint.load(path)), path)  # evaluation: exact fit
    capsys.readouterr()
    checkpoint.load_weights(other, path)  # fine-tuning: another class count skips the predictor, saying so
    assert "has another class count: not loading its predictor" in capsys.readouterr().out
    assert torch.equal(other.backbone.body.layer4[0].conv2.weight, src.backbone.body.layer4[0].conv2.weight)
    assert torch.equal(other.roi_heads.box.predictor.cls_score.weight, init)
    with pytest.raises(checkpoint.CheckpointError, match="shape mismatch"):  # another backbone is still refused
        checkpoint.load_weights(model.build_model(tiny_cfg(num_classes=3, fpn_channels=8)), path)
    with pytest.raises(checkpoint.CheckpointError, match="not found.*R-101.pkl"):
        checkpoint.load_weights(other, str(tmp_path / "R-101.pkl"))


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
    """Blob names of Detectron's ImageNet ResNet (as upstream's c2_model_loading.py reads them), tiny shapes:
    conv biases, a classifier and
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


def test_training_checkpoints_keep_k_and_skip_a_damaged_newest(tmp_path, capsys):
    cfg = tiny_cfg()
    m = model.build_model(cfg)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    out = str(tmp_path)
    for it in (1, 2, 3):
        checkpoint.save_training(out, it, m, opt, cfg, keep=2)
    assert [os.path.basename(p) for p in checkpoint.training_checkpoints(out)] == ["model_0000003.pth",
                                                                                   "model_0000002.pth"]
    newest = os.path.join(out, "model_0000003.pth")
    with open(newest, "r+b") as f:  # truncated, as by a full disk
        f.truncate(os.path.getsize(newest) // 2)
    path, ckpt = checkpoint.latest_training(out)
    assert path.endswith("model_0000002.pth") and ckpt["iteration"] == 2
    printed = capsys.readouterr().out
    assert "--resume skips model_0000003.pth" in printed


# ---- files that are not checkpoints: each named with what it holds, for --ckpt, weights= and --resume

def not_checkpoints(tmp_path):
    """{name: (path, what the message must say)} of files a user may pass by mistake."""
    cfg = tiny_cfg()
    good = str(tmp_path / "good.pth")
    checkpoint.save(good, model.build_model(cfg), cfg)
    raw = open(good, "rb").read()
    files = {"empty.pth": (b"", "empty .0 bytes."), "notes.pth": (b"hello world\n", "a text file of 12 bytes"),
             "page.pth": (b"<!DOCTYPE html><html>Not Found</html>", "text file.*DOCTYPE html"),
             "cut.pth": (raw[: len(raw) // 3], "zip archive of .* truncated"),
             "plain.pth": (pickle.dumps({"a": 1}), "a Python pickle of"),
             "list.pth": (None, "holds a list, not"), "strings.pth": (None, r"holds a dict \(a, b\) whose values")}
    out = {}
    for name, (content, what) in files.items():
        path = str(tmp_path / name)
        if content is None:
            torch.save([1, 2] if name == "list.pth" else {"a": "x", "b": 2}, path)
        else:
            open(path, "wb").write(content)
        out[name] = (path, what)
    (tmp_path / "folder.pth").mkdir()
    out["folder.pth"] = (str(tmp_path / "folder.pth"), "is a folder, not a file")
    return out


def test_files_that_are_not_checkpoints_are_named_with_what_they_hold(tmp_path):
    net = model.build_model(tiny_cfg())
    for name, (path, what) in not_checkpoints(tmp_path).items():
        for load in (lambda: checkpoint.model_state(checkpoint.load(path), repr(path)),
                     lambda: checkpoint.load_weights(net, path)):
            with pytest.raises(checkpoint.CheckpointError) as e:
                load()
            assert repr(path) in str(e.value) and re.search(what, str(e.value)), (name, str(e.value))
            assert "\n" not in str(e.value)
    for content in (b"", b"hello\n", pickle.dumps([1], protocol=2)[:5]):  # a Detectron pickle, as weights=
        open(tmp_path / "R-50.pkl", "wb").write(content)
        with pytest.raises(checkpoint.CheckpointError, match="cannot read weights .*R-50.pkl"):
            checkpoint.load_weights(net, str(tmp_path / "R-50.pkl"))


def test_resume_skips_damaged_newest_and_refuses_when_none_loads(tmp_path, capsys):
    cfg = tiny_cfg()
    m = model.build_model(cfg)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    out = str(tmp_path)
    checkpoint.save_training(out, 2, m, opt, cfg, keep=2)
    for it, content in ((4, b""), (6, b"garbage\n"), (8, pickle.dumps({"a": 1}))):
        open(os.path.join(out, f"model_{it:07d}.pth"), "wb").write(content)
    os.mkdir(os.path.join(out, "model_0000010.pth"))  # a folder of a checkpoint's name: not a checkpoint
    path, ckpt = checkpoint.latest_training(out)
    assert path.endswith("model_0000002.pth") and ckpt["iteration"] == 2
    printed = capsys.readouterr().out
    assert [line.split(":")[1].split()[-1] for line in printed.splitlines()] == [
        "model_0000008.pth", "model_0000006.pth", "model_0000004.pth"], printed
    assert "the file is empty" in printed and "text file" in printed and "pickle" in printed
    # the resumed run's checkpoints are kept though damaged newer ones sort first
    checkpoint.save_training(out, 3, m, opt, cfg, keep=2)
    assert checkpoint.latest_training(out)[0].endswith("model_0000003.pth")
    assert os.path.exists(os.path.join(out, "model_0000002.pth"))
    for p in checkpoint.training_checkpoints(out):
        open(p, "wb").write(b"x")
    with pytest.raises(checkpoint.CheckpointError, match="none of the 5 training checkpoints in .* loads"):
        checkpoint.latest_training(out)
