"""Tests of config.py: overrides are type-checked and printed, unknown keys get the closest names, choice fields
are checked at parse time, both command-line grammars work, and --help lists every field."""
import dataclasses
import re

import pytest

import config


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


@pytest.mark.parametrize("field, value", [("norm", "bn"), ("amp", "fp8"), ("device", "tpu")])
def test_choice_fields_are_checked_when_parsed(field, value):
    with pytest.raises(config.ConfigError, match=f"'{field}' is '{value}'; choose one of") as err:
        config.get("R-101-FPN", [f"{field}={value}"], verbose=False)
    assert all(repr(c) in str(err.value) for c in config.CHOICES[field])
    assert config.get("R-101-FPN", ["device=cuda:1"], verbose=False).device == "cuda:1"


def test_both_grammars_and_dashes():
    p = config.parser("doc")
    p.add_argument("--ckpt")
    args, overrides = config.parse(p, ["--ckpt", "x.pth", "--score-thresh", "0.5", "nms_thresh=0.4",
                                       "--pooler_sampling_ratio", "-1", "--base_lr=0.01", "--config", "demo"])
    assert (args.ckpt, args.config) == ("x.pth", "demo")
    cfg = config.get(args.config, overrides, verbose=False)
    assert (cfg.score_thresh, cfg.nms_thresh, cfg.pooler_sampling_ratio, cfg.base_lr) == (0.5, 0.4, -1, 0.01)
    with pytest.raises(config.ConfigError, match="write key=value or --key value"):
        config.get("demo", ["score_thresh"], verbose=False)


def test_help_lists_every_field_with_default_and_comment():
    text = config.field_help()
    for f in dataclasses.fields(config.Config):
        line = next((ln for ln in text.splitlines() if ln.startswith(f"  {f.name} = ")), None)
        assert line is not None, f.name
        comment = text.splitlines()[text.splitlines().index(line) + 1].strip()
        assert comment, f"{f.name} has no comment"
    assert "  fpn_post_nms_top_n_train = 2000\n" in text and "per *batch on one device*" in text


@pytest.mark.parametrize("override, message", [
    ("base_lr=-0.02", "'base_lr' is -0.02; it must be positive"),
    ("ims_per_batch=0", "'ims_per_batch' is 0; it must be a positive integer"),
    ("test_ims_per_batch=0", "'test_ims_per_batch' is 0"),
    ("max_iter=0", "'max_iter' is 0"),
    ("checkpoint_period=0", "'checkpoint_period' is 0"),
    ("min_size_train=(800,0)", "'min_size_train' is (800, 0)"),
    ("num_classes=1", "'num_classes' is 1; it must be at least 2"),
    ("nms_thresh=1.5", "'nms_thresh' is 1.5; it must be between 0 and 1"),
    ("hue=0.7", "'hue' is 0.7"),
    ("rpn_bg_iou=0.8", "rpn_bg_iou must not exceed rpn_fg_iou"),
    ("anchor_sizes=(32,64)", "one size per anchor_strides level"),
])
def test_numeric_fields_are_range_checked_when_parsed(override, message):
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.get("R-101-FPN", [override], verbose=False)


def test_every_preset_is_valid():
    for name in config.PRESETS:
        config.validate(config.PRESETS[name])
