"""Faster R-CNN with a ResNet-50/101 + FPN backbone (Ren et al. 2015, "Faster R-CNN"; Lin et al. 2017, "Feature
Pyramid Networks"), as facebookresearch/maskrcnn-benchmark implements it at commit 57eec25 (master, 2019-11-21).
Every constant and quirk follows upstream; comments name the file under maskrcnn_benchmark/ it comes from.
Module names follow upstream's checkpoint keys, so upstream's state dict loads with no mapping table.

Shapes: N images per batch, (Hp, Wp) the padded batch size, (h, w) an image's unpadded resized size,
L = 5 FPN levels P2..P6, A = 3 anchors per location, G ground-truth boxes of an image, R proposals of an image,
K classes including background 0. Boxes are (x1, y1, x2, y2) in resized-image pixels with the legacy +1
convention (width = x2 - x1 + 1) everywhere.

Names: C2..C5 the ResNet stage outputs (res2..res5, upstream's layer1..layer4), P2..P6 the FPN levels;
anchors the fixed reference boxes of every location; logits the RPN's objectness before the sigmoid;
deltas the box coder's (dx, dy, dw, dh) against a reference box; proposals the RPN's decoded boxes after NMS;
rois proposals with their image index in column 0, (R, 5), as ROIAlign takes them; gt the ground-truth boxes;
labels 1..K-1 for classes, 0 background, -1 ignored; "sampled" the anchors or proposals a loss is taken over.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

import ops

# torch.compiler.is_compiling arrived in torch 2.3; Cambricon's torch_mlu 1.22 images run torch 2.1
_is_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling

BBOX_XFORM_CLIP = math.log(1000.0 / 16)  # upper clamp of decoded dw, dh (modeling/box_coder.py)


# ---- box utilities, legacy +1 convention (structures/boxlist_ops.py, structures/bounding_box.py)

def box_area(boxes):
    return (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)


def box_iou(a, b):
    """IoU matrix (len(a), len(b)) with +1 widths: boxes that touch at one pixel overlap by one pixel."""
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt + 1).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (box_area(a)[:, None] + box_area(b)[None, :] - inter)


def clip_bounds(image_sizes, like):
    """(N, 4) upper bounds (w - 1, h - 1, w - 1, h - 1) of image sizes [(h, w)], in like's dtype and device. The
    sizes are ints, or (2,) tensors in a trace for ONNX export (export.py), where they are an input of the graph."""
    if torch.jit.is_tracing():
        return torch.stack([s[[1, 0, 1, 0]] for s in image_sizes]).to(like.dtype) - 1
    return torch.tensor([[w - 1, h - 1] * 2 for h, w in image_sizes], dtype=like.dtype, device=like.device)


def clip_boxes(boxes, size):
    """Clamp x to [0, w-1] and y to [0, h-1]; size is (h, w). Nothing is removed (remove_empty=False).
    boxes (R, 4k): every class block at once."""
    if torch.jit.is_tracing():  # size is a (2,) tensor there: bounds as a tensor (eagerly, numbers need no copy)
        hi = clip_bounds([size], boxes)  # (1, 4)
        return boxes.view(boxes.shape[0], -1, 4).clamp(torch.zeros_like(hi), hi).view(boxes.shape)
    h, w = size
    # columns 0::2 are x1, x2 (of every class block), 1::2 are y1, y2; interleaving them restores the layout
    return torch.stack([boxes[:, 0::2].clamp(0, w - 1), boxes[:, 1::2].clamp(0, h - 1)], -1).reshape(boxes.shape)


def topk_count(x, k, dim=0):
    """min(k, x.shape[dim]): the k of a top-k. In a trace for export a size is a tensor and stays one, so the
    graph takes min(k, size) per image instead of the count of the traced image (torchvision's _topk_min)."""
    if torch.jit.is_tracing():
        return torch.clamp(torch._shape_as_tensor(x)[dim], max=k)
    return min(k, x.shape[dim])


def remove_small_boxes(boxes, min_size):
    """Indices of boxes at least min_size wide and high (+1 widths); min_size 0 keeps all (upstream's default)."""
    ws, hs = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
    return torch.nonzero((ws >= min_size) & (hs >= min_size)).squeeze(1)


class BoxCoder:
    """Encodes gt boxes as deltas (dx, dy, dw, dh) against reference boxes and decodes them back
    (modeling/box_coder.py)."""

    def __init__(self, weights):
        self.weights = weights

    def encode(self, gt, ref):
        wx, wy, ww, wh = self.weights
        pw, ph = ref[:, 2] - ref[:, 0] + 1, ref[:, 3] - ref[:, 1] + 1
        px, py = ref[:, 0] + 0.5 * pw, ref[:, 1] + 0.5 * ph
        gw, gh = gt[:, 2] - gt[:, 0] + 1, gt[:, 3] - gt[:, 1] + 1
        gx, gy = gt[:, 0] + 0.5 * gw, gt[:, 1] + 0.5 * gh
        return torch.stack([wx * (gx - px) / pw, wy * (gy - py) / ph,
                            ww * torch.log(gw / pw), wh * torch.log(gh / ph)], 1)

    def decode(self, deltas, ref):
        """deltas (R, 4k) against ref (R, 4) -> boxes (R, 4k); column block 4j..4j+3 is class j."""
        # In the wider dtype: under bf16 autocast the heads' deltas are bf16 (8-bit mantissa: 4-px steps at x = 1000)
        # and the anchors and proposals float32, which upstream's apex AMP (O1) promoted to as well. FP32: no-op.
        dtype = torch.promote_types(deltas.dtype, ref.dtype)
        deltas, ref = deltas.to(dtype), ref.to(dtype)
        wx, wy, ww, wh = self.weights
        pw, ph = ref[:, 2:3] - ref[:, 0:1] + 1, ref[:, 3:4] - ref[:, 1:2] + 1
        px, py = ref[:, 0:1] + 0.5 * pw, ref[:, 1:2] + 0.5 * ph
        dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
        dw = (deltas[:, 2::4] / ww).clamp(max=BBOX_XFORM_CLIP)  # upper clamp only, as upstream
        dh = (deltas[:, 3::4] / wh).clamp(max=BBOX_XFORM_CLIP)
        cx, cy = dx * pw + px, dy * ph + py
        w, h = torch.exp(dw) * pw, torch.exp(dh) * ph
        # x2 = cx + w/2 - 1: the legacy +1 convention's decode (box_coder.py's pred_boxes[:, 2::4])
        out = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w - 1, cy + 0.5 * h - 1], 2)  # (R, k, 4)
        return out.reshape(deltas.shape)


BELOW_LOW, BETWEEN = -1, -2


def match(iou, high, low, allow_low_quality):
    """iou (G, P) -> matched gt index per prediction (P,), or BELOW_LOW (-1) / BETWEEN (-2) (modeling/matcher.py)."""
    if iou.numel() == 0:
        raise ValueError(f"matcher got an empty IoU matrix of shape {tuple(iou.shape)}: no ground truth or no boxes")
    vals, matches = iou.max(0)
    originals = matches.clone()
    matches[vals < low] = BELOW_LOW
    matches[(vals >= low) & (vals < high)] = BETWEEN
    if allow_low_quality:
        # Every prediction attaining some gt's best IoU (ties included, even IoU 0) gets back its own argmax gt.
        # A mask and torch.where instead of upstream's nonzero: the same assignment without a host round trip.
        best = iou.max(1).values
        matches = torch.where((iou == best[:, None]).any(0), originals, matches)
    return matches


def sample_pos_neg(labels, batch_size, positive_fraction):
    """Ascending indices of at most batch_size*fraction random positives (label >= 1) and of random negatives
    (== 0) to fill up (modeling/balanced_positive_negative_sampler.py). A stable sort by class lists the positives,
    then the negatives, each in index order as nonzero would, so one host read (the two counts) replaces two
    nonzero; the same randperm draws as upstream's."""
    cls = torch.where(labels >= 1, 0, torch.where(labels == 0, 1, 2))
    order = cls.sort(stable=True).indices
    total_pos, total_neg = torch.stack([(cls == 0).sum(), (cls == 1).sum()]).tolist()
    pos, neg = order[:total_pos], order[total_pos:total_pos + total_neg]
    num_pos = min(total_pos, int(batch_size * positive_fraction))
    num_neg = min(total_neg, batch_size - num_pos)
    pos = pos[torch.randperm(total_pos, device=pos.device)[:num_pos]]
    neg = neg[torch.randperm(total_neg, device=neg.device)[:num_neg]]
    return pos.sort().values, neg.sort().values


def smooth_l1(x, beta):
    ax = x.abs()
    return torch.where(ax < beta, 0.5 * ax ** 2 / beta, ax - 0.5 * beta).sum()


# ---- backbone

class FrozenBatchNorm2d(nn.Module):
    """y = x * weight / sqrt(running_var) + (bias - running_mean * scale), layers/batch_norm.py. No epsilon:
    torchvision's later eps=1e-5 default would scale every BN by 1/sqrt(1+1e-5) and change this checkpoint's
    detections. Four buffers, nothing trainable. In the backbone it is folded into the preceding conv (conv_norm)."""

    def __init__(self, n):
        super().__init__()
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def scale_shift(self):
        scale = self.weight * self.running_var.rsqrt()
        return scale, self.bias - self.running_mean * scale

    def fold(self, conv_weight):
        """(conv_weight * scale, shift): the preceding conv with this norm folded in. Where no gradient flows to the
        conv (inference, frozen stages) the pair is kept until one of its five tensors changes in place or moves:
        the same arithmetic, four small kernels fewer per conv per forward. Tensors made under inference_mode keep
        no version counter: those are folded anew each time."""
        tensors = (conv_weight, self.weight, self.bias, self.running_mean, self.running_var)
        if (torch.is_grad_enabled() and conv_weight.requires_grad) or _is_compiling() or \
                any(t.is_inference() for t in tensors):
            return self._fold(conv_weight)
        key = tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)
        if getattr(self, "_folded_key", None) != key:
            self._folded, self._folded_key = self._fold(conv_weight), key
        return self._folded

    def _fold(self, conv_weight):
        scale, shift = self.scale_shift()
        return conv_weight * scale.view(-1, 1, 1, 1), shift

    def forward(self, x):
        scale, shift = self.scale_shift()
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)


def make_norm(kind, channels):
    if kind == "frozen_bn":
        return FrozenBatchNorm2d(channels)
    if kind == "gn":  # not upstream: a trainable norm for the from-scratch demo
        return nn.GroupNorm(math.gcd(32, channels), channels)
    raise ValueError(f"config field 'norm' must be 'frozen_bn' or 'gn', got {kind!r}")


def conv_norm(x, conv, norm):
    """norm(conv(x)). A FrozenBN is folded into the conv on the fly: conv(x, W * scale) + shift is the same
    affine map (equal within float32 rounding), one kernel instead of two passes over the activation, and the
    state dict keeps upstream's separate conv and bn entries. Autograd flows to W, so training uses it too."""
    if isinstance(norm, FrozenBatchNorm2d):
        w, shift = norm.fold(conv.weight)
        return F.conv2d(x, w, shift, conv.stride, conv.padding, conv.dilation, conv.groups)
    return norm(conv(x))


class Bottleneck(nn.Module):
    """1x1 (stride here: STRIDE_IN_1X1, MSRA) -> 3x3 -> 1x1, each with a norm, plus shortcut, ReLU
    (modeling/backbone/resnet.py, Bottleneck).
    (N, cin, H, W) -> (N, cout, H/stride, W/stride)."""

    def __init__(self, cin, mid, cout, stride, norm):
        super().__init__()
        if cin != cout:  # projection shortcut in every stage's first block, layer1 included; registered first
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), make_norm(norm, cout))
        else:
            self.downsample = None
        self.conv1 = nn.Conv2d(cin, mid, 1, stride, bias=False)
        self.bn1 = make_norm(norm, mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, 1, 1, bias=False)
        self.bn2 = make_norm(norm, mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = make_norm(norm, cout)

    def forward(self, x):
        identity = x if self.downsample is None else conv_norm(x, self.downsample[0], self.downsample[1])
        out = F.relu_(conv_norm(x, self.conv1, self.bn1))
        out = F.relu_(conv_norm(out, self.conv2, self.bn2))
        out = conv_norm(out, self.conv3, self.bn3)
        return F.relu_(out + identity)


class Stem(nn.Module):
    def __init__(self, cout, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(3, cout, 7, 2, 3, bias=False)
        self.bn1 = make_norm(norm, cout)

    def forward(self, x):
        return F.max_pool2d(F.relu_(conv_norm(x, self.conv1, self.bn1)), 3, 2, 1)


class ResNet(nn.Module):
    """(N, 3, Hp, Wp) -> [C2, C3, C4, C5] with strides 4, 8, 16, 32 and channels 4w, 8w, 16w, 32w (w = width)."""

    def __init__(self, stage_blocks, stem_channels, width, norm, freeze_at):
        super().__init__()
        self.stem = Stem(stem_channels, norm)
        cin, self.out_channels = stem_channels, []
        for i, blocks in enumerate(stage_blocks):
            mid, cout = width * 2 ** i, width * 4 * 2 ** i
            stride = 1 if i == 0 else 2
            layer = nn.Sequential(*[Bottleneck(cin if b == 0 else cout, mid, cout, stride if b == 0 else 1, norm)
                                    for b in range(blocks)])
            self.add_module(f"layer{i + 1}", layer)
            cin = cout
            self.out_channels.append(cout)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)  # master's init; ImageNet weights overwrite it
        # FREEZE_CONV_BODY_AT: stage 0 = stem, stage 1 = layer1 (resnet.py, _freeze_backbone)
        for stage in [self.stem, self.layer1][:freeze_at]:
            for p in stage.parameters():
                p.requires_grad_(False)

    def forward(self, x):
        x = self.stem(x)
        outs = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            outs.append(x)
        return outs


class FPN(nn.Module):
    """[C2..C5] -> [P2, P3, P4, P5, P6], all with `channels` channels (modeling/backbone/fpn.py). fpn_inner_k /
    fpn_layer_k act on C_{k+1} / P_{k+1}; P6 is P5 subsampled by 2 (upstream's max-pool with kernel 1)."""

    def __init__(self, in_channels, channels):
        super().__init__()
        for k, cin in enumerate(in_channels, 1):
            self.add_module(f"fpn_inner{k}", nn.Conv2d(cin, channels, 1))
            self.add_module(f"fpn_layer{k}", nn.Conv2d(channels, channels, 3, 1, 1))
        for m in self.children():
            # Caffe2 XavierFill (modeling/make_layers.py, conv_with_kaiming_uniform)
            nn.init.kaiming_uniform_(m.weight, a=1)
            nn.init.zeros_(m.bias)
        self.n = len(in_channels)

    def forward(self, feats):
        inner = getattr(self, f"fpn_inner{self.n}")(feats[-1])
        outs = [getattr(self, f"fpn_layer{self.n}")(inner)]
        for k in range(self.n - 1, 0, -1):
            top_down = F.interpolate(inner, scale_factor=2, mode="nearest")
            inner = getattr(self, f"fpn_inner{k}")(feats[k - 1]) + top_down
            outs.insert(0, getattr(self, f"fpn_layer{k}")(inner))
        outs.append(outs[-1][:, :, ::2, ::2])  # P6 = max_pool2d(P5, 1, 2)
        return outs


# ---- RPN

def cell_anchors(stride, size, ratios):
    """(A, 4) anchors of one location at the origin: Detectron's legacy generator (modeling/rpn/anchor_generator.py,
    generate_anchors). Python's round is
    half-to-even like numpy's, which the table depends on (s = 32, r = 0.5: round(22.5) = 22)."""
    c = (stride - 1) / 2.0
    rows = []
    for r in ratios:
        ws = round(math.sqrt(stride * stride / r))
        hs = round(ws * r)
        w, h = ws * size / stride, hs * size / stride
        rows.append([c - 0.5 * (w - 1), c - 0.5 * (h - 1), c + 0.5 * (w - 1), c + 0.5 * (h - 1)])
    return torch.tensor(rows, dtype=torch.float32)


class BufferList(nn.Module):
    """Buffers named 0, 1, ... so the keys read rpn.anchor_generator.cell_anchors.{i} as upstream's."""

    def __init__(self, tensors):
        super().__init__()
        for i, t in enumerate(tensors):
            self.register_buffer(str(i), t)

    def __iter__(self):
        return iter(self._buffers.values())


class AnchorGenerator(nn.Module):
    """Feature-map sizes -> per level (Hf*Wf*A, 4) anchors in (y, x, a) order (rpn/anchor_generator.py)."""

    def __init__(self, sizes, strides, ratios):
        super().__init__()
        self.strides = strides
        self.cell_anchors = BufferList([cell_anchors(s, a, ratios) for s, a in zip(strides, sizes)])

    def forward(self, feature_sizes):
        out = []
        for (hf, wf), s, base in zip(feature_sizes, self.strides, self.cell_anchors):
            ys = torch.arange(hf, device=base.device, dtype=torch.float32) * s
            xs = torch.arange(wf, device=base.device, dtype=torch.float32) * s
            y, x = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack([x, y, x, y], -1).reshape(-1, 1, 4)  # (Hf*Wf, 1, 4)
            out.append((shifts + base[None]).reshape(-1, 4))
        return out


class RPNHead(nn.Module):
    """Per level (N, C, H, W) -> objectness logits (N, A, H, W) and deltas (N, 4A, H, W); shared by levels."""

    def __init__(self, channels, num_anchors):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)
        self.cls_logits = nn.Conv2d(channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(channels, num_anchors * 4, 1)
        for m in self.children():
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)

    def forward(self, feats):
        logits, deltas = [], []
        for f in feats:
            t = F.relu(self.conv(f))
            logits.append(self.cls_logits(t))
            deltas.append(self.bbox_pred(t))
        return logits, deltas


class RPN(nn.Module):
    """Features [P2..P6] -> proposals per image [(R, 4)], plus the two RPN losses in training (modeling/rpn/rpn.py,
    inference.py, loss.py). Counts that differ between training and test come as (train, test) pairs."""

    def __init__(self, channels, anchor_sizes, anchor_strides, aspect_ratios, pre_nms_top_n, post_nms_top_n,
                 fpn_post_nms_top_n, fpn_post_nms_per_batch, nms_thresh, min_size, fg_iou, bg_iou, batch_per_image,
                 positive_fraction, straddle_thresh):
        super().__init__()
        self.anchor_generator = AnchorGenerator(anchor_sizes, anchor_strides, aspect_ratios)
        self.head = RPNHead(channels, len(aspect_ratios))
        self.coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.pre_nms_top_n, self.post_nms_top_n = pre_nms_top_n, post_nms_top_n
        self.fpn_post_nms_top_n, self.fpn_post_nms_per_batch = fpn_post_nms_top_n, fpn_post_nms_per_batch
        self.nms_thresh, self.min_size, self.straddle_thresh = nms_thresh, min_size, straddle_thresh
        self.fg_iou, self.bg_iou = fg_iou, bg_iou
        self.batch_per_image, self.positive_fraction = batch_per_image, positive_fraction

    def forward(self, feats, image_sizes, targets=None):
        logits, deltas = self.head(feats)
        anchors = self.anchor_generator([f.shape[-2:] for f in feats])
        n = feats[0].shape[0]
        # flatten to (N, Hf*Wf*A) and (N, Hf*Wf*A, 4) in the anchors' (y, x, a) order (rpn/utils.py,
        # permute_and_flatten)
        logits = [o.permute(0, 2, 3, 1).reshape(n, -1) for o in logits]
        deltas = [d.reshape(n, -1, 4, *d.shape[-2:]).permute(0, 3, 4, 1, 2).reshape(n, -1, 4) for d in deltas]
        with torch.no_grad():
            proposals = self.select_proposals(anchors, logits, deltas, image_sizes)
        if not self.training:
            return proposals, {}
        return proposals, self.loss(torch.cat(anchors), torch.cat(logits, 1), torch.cat(deltas, 1),
                                    image_sizes, targets)

    def select_proposals(self, anchors, logits, deltas, image_sizes):
        """Per level per image: top-k, decode, clip, NMS 0.7, keep post_nms_top_n; then across levels
        (rpn/inference.py, RPNPostProcessor and select_over_all_levels). Returns boxes per image [(R, 4)].
        Top-k, decode and clip take all images of a level at once, and NMS all levels of an image at once
        (ops.batched_nms with the level as category): upstream's per-level per-image values, fewer calls."""
        phase = 0 if self.training else 1
        pre_n, post_n = self.pre_nms_top_n[phase], self.post_nms_top_n[phase]
        n = len(image_sizes)
        boxes, scores, levels = [], [], []
        for lvl, (anc, logit, delta) in enumerate(zip(anchors, logits, deltas)):
            obj, idx = logit.sigmoid().topk(topk_count(logit, pre_n, 1), dim=1, sorted=True)  # (N, k)
            k = idx.shape[1]
            b = self.coder.decode(delta.gather(1, idx[..., None].expand(n, k, 4)).reshape(-1, 4), anc[idx.flatten()])
            boxes.append(b.view(n, k, 4))
            scores.append(obj)
            levels.append(torch.full((k,), lvl, device=obj.device))
        boxes, scores, levels = torch.cat(boxes, 1), torch.cat(scores, 1), torch.cat(levels)  # (N, C, 4), (N, C), (C,)
        # clip_boxes for every image at once: x to [0, w-1], y to [0, h-1]
        hi = clip_bounds(image_sizes, boxes)
        boxes = boxes.clamp(torch.zeros_like(hi[:, None]), hi[:, None])
        out_boxes, out_scores = [], []
        for b, s in zip(boxes, scores):
            lv = levels
            if self.min_size > 0:
                keep = remove_small_boxes(b, self.min_size)
                b, s, lv = b[keep], s[keep], lv[keep]
            keep = ops.batched_nms(b, s, lv, self.nms_thresh, offset=1)  # by score (ties: lower index first)
            # level by level, by score within, as upstream's cat: a sort by (level, position), keys all distinct so
            # that any sort gives this order. ONNX's NonMaxSuppression returns it already (ops.batched_nms): no
            # TopK over all kept boxes in an exported graph (TensorRT's TopK caps k).
            rank = torch.arange(keep.shape[0], device=keep.device)
            if not torch.onnx.is_in_onnx_export():
                keep = keep[(lv[keep] * b.shape[0] + rank).sort().indices]
            if post_n < pre_n:  # each level's top post_n: the rank within the level from where each level starts
                lk = lv[keep]
                starts = (lk[None] < torch.arange(len(anchors), device=lk.device)[:, None]).sum(1)  # (L,)
                keep = keep[rank - starts[lk] < post_n]
            out_boxes.append(b[keep])
            out_scores.append(s[keep])
        boxes, scores = out_boxes, out_scores
        top_n = self.fpn_post_nms_top_n[phase]
        if self.training and self.fpn_post_nms_per_batch:
            # Upstream quirk (rpn/inference.py, FPN_POST_NMS_PER_BATCH, default True): the training top-n spans
            # the whole per-device batch; each image gets back its share in its original order.
            all_scores = torch.cat(scores)
            chosen = all_scores.topk(min(top_n, all_scores.numel()), sorted=True)[1].sort().values  # ascending
            starts = torch.tensor([0] + [len(s) for s in scores], device=chosen.device).cumsum(0)
            cuts = torch.searchsorted(chosen, starts).tolist()  # image i's are chosen[cuts[i]:cuts[i + 1]]
            return list(torch.cat(boxes)[chosen].split([b - a for a, b in zip(cuts, cuts[1:])]))
        return [b[s.topk(topk_count(s, top_n), sorted=True)[1]] for b, s in zip(boxes, scores)]

    def loss(self, anchors, logits, deltas, image_sizes, targets):
        """anchors (P, 4), logits (N, P), deltas (N, P, 4) -> loss_objectness, loss_rpn_box_reg (rpn/loss.py)."""
        t = self.straddle_thresh
        labels, reg_targets = [], []
        for (h, w), tgt in zip(image_sizes, targets):
            gt = tgt["boxes"]
            m = match(box_iou(gt, anchors), self.fg_iou, self.bg_iou, allow_low_quality=True)
            lab = (m >= 0).to(torch.float32)
            # visibility after matching, as upstream (rpn/loss.py, prepare_targets): straddling anchors took part
            # in the low-quality rule and are only now ignored
            visible = (anchors[:, 0] >= -t) & (anchors[:, 1] >= -t) & (anchors[:, 2] < w + t) & (anchors[:, 3] < h + t)
            lab[~visible] = -1
            lab[m == BETWEEN] = -1
            labels.append(lab)
            reg_targets.append(self.coder.encode(gt[m.clamp(min=0)], anchors))
        # Indices into the (N*P) flattened anchors of all images, ascending: the rows a (N, P) mask would pick
        p = len(anchors)
        pos, sampled = [], []
        for i, lab in enumerate(labels):
            pos_i, neg_i = sample_pos_neg(lab, self.batch_per_image, self.positive_fraction)
            pos.append(pos_i + i * p)
            sampled.append(torch.cat([pos_i, neg_i]).sort().values + i * p)
        pos, sampled = torch.cat(pos), torch.cat(sampled)
        labels, reg_targets = torch.cat(labels), torch.cat(reg_targets)  # (N*P,), (N*P, 4)
        num = torch.full((), max(len(sampled), 1), device=deltas.device)  # a device tensor, as upstream's count
        box_loss = smooth_l1(deltas.reshape(-1, 4)[pos] - reg_targets[pos], beta=1.0 / 9) / num
        sampled_logits = logits.reshape(-1)[sampled]
        # Upstream (rpn/loss.py) takes the mean over the sampled anchors, NaN when none is sampled: an image so thin
        # after resizing (2000x20 -> 1333x13) that every anchor straddles its border. A sum over nothing is 0, and
        # it keeps the head in the graph (DDP expects every parameter's gradient). Any other batch: the mean.
        obj_loss = F.binary_cross_entropy_with_logits(sampled_logits, labels[sampled],
                                                      reduction="mean" if sampled_logits.numel() else "sum")
        return {"loss_objectness": obj_loss, "loss_rpn_box_reg": box_loss}


# ---- RoI box head

def map_levels(boxes, k_min=2, k_max=5):
    """LevelMapper (modeling/poolers.py): +1 area, canonical size 224 at level 4, eps 1e-6 -> level index
    0..k_max-k_min."""
    s = box_area(boxes).sqrt()
    k = torch.floor(4 + torch.log2(s / 224 + 1e-6))
    return (k.clamp(k_min, k_max) - k_min).to(torch.int64)


class Pooler(nn.Module):
    """Legacy ROIAlign (aligned=False, sampling ratio 2) from the level each box maps to.
    features [P2..P5], boxes per image [(R_i, 4)] -> (sum R_i, C, res, res)."""

    def __init__(self, resolution, strides, sampling_ratio):
        super().__init__()
        self.resolution, self.scales, self.sampling_ratio = resolution, [1.0 / s for s in strides], sampling_ratio
        self.k_min, self.k_max = round(math.log2(strides[0])), round(math.log2(strides[-1]))

    def forward(self, feats, boxes):
        rois = ops.boxes_to_rois(boxes)  # (R, 5)
        levels = map_levels(rois[:, 1:], self.k_min, self.k_max)
        # Each level's rois in index order, from one stable sort and one host read of the counts (a trace reads
        # none: _traced). A level outside 0..L-1 (a NaN box size) goes last and keeps zero features.
        n = len(feats)
        levels = torch.where((levels >= 0) & (levels < n), levels, n)
        if torch.jit.is_tracing():
            return self._traced(feats, rois, levels)
        counts = torch.zeros(n + 1, dtype=torch.int64, device=levels.device).scatter_add_(0, levels,
                                                                                      torch.ones_like(levels))
        per_level = levels.sort(stable=True).indices.split(counts.tolist())
        c, r = feats[0].shape[1], self.resolution
        out = feats[0].new_zeros((rois.shape[0], c, r, r))
        for f, scale, idx in zip(feats, self.scales, per_level):
            if idx.numel():
                out[idx] = ops.roi_align(f.contiguous(), rois[idx], (r, r), scale, self.sampling_ratio, aligned=False)
        return out

    def _traced(self, feats, rois, levels):
        """forward's result in a trace for ONNX export (export.py): a trace would freeze the counts per level, and
        `out[idx] = ...` becomes a ScatterND whose update shape the tracer fixes when a level held one RoI. Instead
        one nonzero per level, the levels' outputs concatenated (zeros for a level outside 0..L-1) and put back in
        RoI order by the inverse permutation: no count is read, any count (0 included) works."""
        n, c, r = len(feats), feats[0].shape[1], self.resolution
        per_level = [torch.nonzero(levels == lvl).squeeze(1) for lvl in range(n + 1)]
        pooled = [ops.roi_align(f.contiguous(), rois[idx], (r, r), scale, self.sampling_ratio, aligned=False)
                  for f, scale, idx in zip(feats, self.scales, per_level)]
        pooled.append(feats[0].new_zeros((per_level[n].shape[0], c, r, r)))
        return torch.cat(pooled)[torch.cat(per_level).argsort()]


class FeatureExtractor(nn.Module):
    """FPN2MLPFeatureExtractor (roi_heads/box_head/roi_box_feature_extractors.py): pool from P2..P5 (P6 never),
    flatten channel-major, fc6 + ReLU, fc7 + ReLU -> (R, mlp_dim)."""

    def __init__(self, channels, resolution, strides, sampling_ratio, mlp_dim):
        super().__init__()
        self.pooler = Pooler(resolution, strides, sampling_ratio)
        self.fc6 = nn.Linear(channels * resolution * resolution, mlp_dim)
        self.fc7 = nn.Linear(mlp_dim, mlp_dim)
        for fc in (self.fc6, self.fc7):
            nn.init.kaiming_uniform_(fc.weight, a=1)  # modeling/make_layers.py, make_fc
            nn.init.zeros_(fc.bias)

    def forward(self, feats, boxes):
        x = self.pooler(feats, boxes).flatten(1)
        return F.relu(self.fc7(F.relu(self.fc6(x))))


class Predictor(nn.Module):
    """FPNPredictor (roi_heads/box_head/roi_box_predictors.py): (R, mlp_dim) -> class logits (R, K) and
    class-specific deltas (R, 4K)."""

    def __init__(self, dim, num_classes):
        super().__init__()
        self.cls_score = nn.Linear(dim, num_classes)
        self.bbox_pred = nn.Linear(dim, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x):
        return self.cls_score(x), self.bbox_pred(x)


class BoxHead(nn.Module):
    """Proposals per image -> box losses (training) or detections per image (eval) (roi_heads/box_head/)."""

    def __init__(self, channels, resolution, strides, sampling_ratio, mlp_dim, num_classes, reg_weights, fg_iou,
                 bg_iou, batch_per_image, positive_fraction, score_thresh, nms_thresh, detections_per_img):
        super().__init__()
        self.feature_extractor = FeatureExtractor(channels, resolution, strides, sampling_ratio, mlp_dim)
        self.predictor = Predictor(mlp_dim, num_classes)
        self.coder = BoxCoder(reg_weights)
        self.fg_iou, self.bg_iou = fg_iou, bg_iou
        self.batch_per_image, self.positive_fraction = batch_per_image, positive_fraction
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img

    def forward(self, feats, proposals, image_sizes, targets=None):
        if self.training:
            proposals, labels, reg_targets = self.sample(proposals, targets)
        logits, deltas = self.predictor(self.feature_extractor(feats, proposals))
        if self.training:
            return self.loss(logits, deltas, labels, reg_targets)
        return self.postprocess(logits, deltas, proposals, image_sizes)

    def sample(self, proposals, targets):
        """Append the gt to each image's proposals (rpn/inference.py, add_gt_proposals), match (box_head/loss.py),
        sample batch_per_image at positive_fraction (balanced_positive_negative_sampler.py)."""
        out_boxes, out_labels, out_targets = [], [], []
        for props, tgt in zip(proposals, targets):
            gt, gt_labels = tgt["boxes"], tgt["labels"]
            props = torch.cat([props, gt.to(props.dtype)])
            m = match(box_iou(gt, props), self.fg_iou, self.bg_iou, allow_low_quality=False)
            labels = gt_labels[m.clamp(min=0)].clone()
            labels[m == BELOW_LOW] = 0
            labels[m == BETWEEN] = -1
            pos, neg = sample_pos_neg(labels, self.batch_per_image, self.positive_fraction)
            keep = torch.cat([pos, neg]).sort().values  # sampled rois keep their original order
            out_boxes.append(props[keep])
            out_labels.append(labels[keep])
            out_targets.append(self.coder.encode(gt[m[keep].clamp(min=0)], props[keep]))
        return out_boxes, torch.cat(out_labels), torch.cat(out_targets)

    def loss(self, logits, deltas, labels, reg_targets):
        """Cross-entropy mean over sampled rois; smooth-L1 (beta 1) of the gt class's deltas summed over
        positives, divided by all sampled rois (roi_heads/box_head/loss.py)."""
        pos = torch.nonzero(labels > 0).squeeze(1)
        cols = 4 * labels[pos, None] + torch.arange(4, device=labels.device)  # (P, 4)
        box_loss = smooth_l1(deltas[pos[:, None], cols] - reg_targets[pos], beta=1.0) / max(labels.numel(), 1)
        # Upstream's mean over the sampled rois (box_head/loss.py) is NaN over none; each image's own gt is always
        # sampled as a positive (IoU 1), so only a batch without gt could get there: a sum over nothing is 0.
        cls_loss = F.cross_entropy(logits, labels, reduction="mean" if labels.numel() else "sum")
        return {"loss_classifier": cls_loss, "loss_box_reg": box_loss}

    def postprocess(self, logits, deltas, proposals, image_sizes):
        """Softmax, decode every class, clip, per class score > thresh and NMS, cap per image
        (roi_heads/box_head/inference.py, PostProcessor)."""
        k = logits.shape[1]
        probs, deltas = [F.softmax(logits, -1)], [deltas]
        if len(proposals) > 1:  # (one image: no split, whose sizes a trace for export would freeze)
            counts = [len(p) for p in proposals]
            probs, deltas = probs[0].split(counts), deltas[0].split(counts)
        results = []
        for prob, delta, props, size in zip(probs, deltas, proposals, image_sizes):
            boxes = clip_boxes(self.coder.decode(delta, props), size).view(-1, k, 4)
            # candidates in (class, proposal) order, background skipped; strict '>' as upstream
            cls, idx = torch.nonzero(prob[:, 1:].t() > self.score_thresh, as_tuple=True)
            cls = cls + 1
            b, s = boxes[idx, cls], prob[idx, cls]
            # Class-wise NMS in one batched call: classes never suppress each other, same set as a loop. Sorting
            # the kept indices restores upstream's order (by class, then proposal index).
            keep = ops.batched_nms(b, s, cls, self.nms_thresh, offset=1).sort().values
            b, s, cls = b[keep], s[keep], cls[keep]
            if self.detections_per_img > 0 and (torch.jit.is_tracing() or len(s) > self.detections_per_img):
                # the cap-th largest score as threshold (upstream's kthvalue), ties kept: may leave slightly more than
                # the cap, as upstream. topk on the device: no copy to the host and back. In a trace, fewer than
                # the cap make the smallest the threshold, which keeps all ([-1:]: none gives none).
                thresh = s.topk(topk_count(s, self.detections_per_img), sorted=True).values[-1:]
                keep = torch.nonzero(s >= thresh).squeeze(1)
                b, s, cls = b[keep], s[keep], cls[keep]
            results.append({"boxes": b, "scores": s, "labels": cls})
        return results


class RoIHeads(nn.Module):
    """Holds the box head only so that its keys read roi_heads.box.* as upstream's (whose RoI heads also hold
    mask and keypoint heads)."""

    def __init__(self, box):
        super().__init__()
        self.box = box

    def forward(self, feats, proposals, image_sizes, targets=None):
        return self.box(feats, proposals, image_sizes, targets)


class FasterRCNN(nn.Module):
    """model(images (N, 3, Hp, Wp) BGR-255 minus mean, zero-padded to 32; image_sizes [(h, w)]; targets
    [{"boxes": (G, 4) float32 +1 xyxy in resized pixels, "labels": (G,) int64 1..K-1}] in training).
    Training: {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}.
    Eval: per image {"boxes" (D, 4) in resized-input pixels, "scores" (D,), "labels" (D,) int64 1..K-1}.
    `backbone` is Sequential(body, fpn) and the box head sits in RoIHeads only to give upstream's key prefixes
    (backbone.body.*, backbone.fpn.*, roi_heads.box.*), so its checkpoints load by name."""

    def __init__(self, backbone, rpn, roi_heads, channels_last=True):
        super().__init__()
        self.backbone, self.rpn, self.roi_heads = backbone, rpn, roi_heads
        self.channels_last = channels_last

    def forward(self, images, image_sizes, targets=None):
        if not torch.jit.is_tracing():  # traced for export, they stay (2,) tensors: an input of the graph
            image_sizes = [tuple(int(v) for v in s) for s in image_sizes]
        if self.training:
            if targets is None:
                raise ValueError("FasterRCNN in training mode needs targets")
            for i, t in enumerate(targets):
                if len(t["boxes"]) == 0:  # upstream raises too (modeling/matcher.py): data.py drops such images
                    raise ValueError(f"image {i} of the batch has no ground-truth boxes")
        # channels_last: oneDNN/cuDNN convolutions run in NHWC without reordering in and out each layer
        feats = self.backbone(images.contiguous(memory_format=torch.channels_last) if self.channels_last else images)
        proposals, rpn_losses = self.rpn(feats, image_sizes, targets)
        out = self.roi_heads(feats[:4], proposals, image_sizes, targets)
        if self.training:
            return {**rpn_losses, **out}
        return out


def build_model(cfg):
    """The model of a config.Config; the one place that reads the config's model fields."""
    body = ResNet(cfg.stage_blocks, cfg.stem_channels, cfg.width_per_group, cfg.norm, cfg.freeze_at)
    backbone = nn.Sequential()
    backbone.add_module("body", body)
    backbone.add_module("fpn", FPN(body.out_channels, cfg.fpn_channels))
    rpn = RPN(cfg.fpn_channels, cfg.anchor_sizes, cfg.anchor_strides, cfg.aspect_ratios,
              pre_nms_top_n=(cfg.rpn_pre_nms_top_n_train, cfg.rpn_pre_nms_top_n_test),
              post_nms_top_n=(cfg.rpn_post_nms_top_n_train, cfg.rpn_post_nms_top_n_test),
              fpn_post_nms_top_n=(cfg.fpn_post_nms_top_n_train, cfg.fpn_post_nms_top_n_test),
              fpn_post_nms_per_batch=cfg.fpn_post_nms_per_batch, nms_thresh=cfg.rpn_nms_thresh,
              min_size=cfg.rpn_min_size, fg_iou=cfg.rpn_fg_iou, bg_iou=cfg.rpn_bg_iou,
              batch_per_image=cfg.rpn_batch_per_image, positive_fraction=cfg.rpn_positive_fraction,
              straddle_thresh=cfg.straddle_thresh)
    box = BoxHead(cfg.fpn_channels, cfg.pooler_resolution, cfg.anchor_strides[:4], cfg.pooler_sampling_ratio,
                  cfg.mlp_dim, cfg.num_classes, cfg.bbox_reg_weights, fg_iou=cfg.roi_fg_iou, bg_iou=cfg.roi_bg_iou,
                  batch_per_image=cfg.roi_batch_per_image, positive_fraction=cfg.roi_positive_fraction,
                  score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh,
                  detections_per_img=cfg.detections_per_img)
    if cfg.compile_backbone:  # in place: the state dict keeps its keys (no _orig_mod. prefix)
        backbone.compile(mode=cfg.compile_backbone)
    return FasterRCNN(backbone, rpn, RoIHeads(box), channels_last=cfg.channels_last)
