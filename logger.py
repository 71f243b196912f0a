"""The training log, written by rank 0: one console line per log_period with each loss smoothed as upstream's
MetricLogger shows it (median over the last 20 iterations, and the average since the run started), the console
copied to output_dir/log.txt, the same record as a JSON line in log.jsonl, TensorBoard event files when tensorboard
is installed (`tensorboard --logdir output/`), and a PNG of the loss curves (loss_curves.png) at the end of a run.

    log = TrainLog(cfg, rank, world_size, start_iter)
    log.begin(device, resumed)           # the first console line; config and versions as the first JSON line
    log.add(losses)                      # every iteration: the loss dict, kept on the device (no sync)
    log.write(it, lr, time, data, mem, skipped)   # every log_period: reduce over ranks, print, write
    log.eval(it, metrics)                # an evaluation's numbers
    log.close()                          # the PNG; log.txt and TensorBoard closed
"""
import collections
import dataclasses
import datetime
import json
import os
import platform
import sys

import torch

import launch

WINDOW = 20  # iterations in the median, as upstream's MetricLogger (maskrcnn_benchmark/utils/metric_logger.py)


class _Tee:
    """Writes to the console and to a file."""

    def __init__(self, stream, f):
        self.stream, self.f = stream, f

    def write(self, text):
        self.stream.write(text)
        self.f.write(text)

    def flush(self):
        self.stream.flush()
        self.f.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


class TrainLog:
    def __init__(self, cfg, rank, world_size, start_iter):
        self.cfg, self.rank, self.world_size, self.start_iter = cfg, rank, world_size, start_iter
        self.window = collections.deque(maxlen=WINDOW)  # per-iteration loss vectors, on the device
        self.total, self.count, self.names = None, 0, None
        self.stdout, self.tb = None, None
        if rank != 0:
            return
        self.txt = open(os.path.join(cfg.output_dir, "log.txt"), "a")
        self.stdout, sys.stdout = sys.stdout, _Tee(sys.stdout, self.txt)
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional, like hotcoco
            self.tb = SummaryWriter(os.path.join(cfg.output_dir, "tensorboard"), purge_step=start_iter)
        except ImportError:
            pass

    def begin(self, device, resumed):
        """The run's first console line, and its config and versions as the first JSON line."""
        cfg = self.cfg
        if self.rank == 0:
            print(f"train: {self.world_size} process(es) on {device}, {cfg.ims_per_batch} images per iteration, lr "
                  f"{cfg.base_lr} x {cfg.ims_per_batch}/16 = {cfg.base_lr * cfg.ims_per_batch / 16:g} (linear "
                  f"scaling), iterations {self.start_iter} -> {cfg.max_iter}"
                  + (f", resumed from iteration {self.start_iter}" if resumed else ""), flush=True)
        self.record({"config": dataclasses.asdict(cfg), "resumed_from": self.start_iter if resumed else None,
                     "world_size": self.world_size,
                     "versions": {"python": platform.python_version(), "torch": torch.__version__}})

    def record(self, record):
        if self.rank == 0:
            with open(os.path.join(self.cfg.output_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def add(self, losses):
        values = torch.stack([v.detach().float() for v in losses.values()])
        self.names = list(losses)
        self.window.append(values)
        self.total = values if self.total is None else self.total + values
        self.count += 1

    def write(self, it, lr, iter_time, data_time, memory_mb, skipped):
        """One log line: each loss's median over the window and its average since the start, averaged over
        ranks; iteration and data times in seconds (evaluations excluded); skipped images summed over ranks."""
        stats = torch.cat([torch.stack(list(self.window)), self.total[None] / self.count])  # (w + 1, terms)
        extra = torch.tensor([float(skipped)], device=stats.device)
        if self.world_size > 1:
            flat = launch.all_reduce(torch.cat([stats.flatten() / self.world_size, extra]))
            stats, extra = flat[:-1].view_as(stats), flat[-1:]
        stats = stats.cpu()
        medians, averages = stats[:-1].median(0).values, stats[-1]
        loss_median = stats[:-1].sum(1).median().item()
        record = {"iter": it, "lr": lr, **{n: m.item() for n, m in zip(self.names, medians)},
                  **{f"{n}_avg": a.item() for n, a in zip(self.names, averages)}, "loss": loss_median,
                  "loss_avg": averages.sum().item(), "time": iter_time, "data_time": data_time,
                  "memory_mb": memory_mb, "skipped_images": int(extra.item())}
        if self.rank != 0:
            return record
        eta = datetime.timedelta(seconds=int(iter_time * (self.cfg.max_iter - it)))
        terms = "  ".join(f"{n} {record[n]:.4f} ({record[n + '_avg']:.4f})" for n in ["loss"] + self.names)
        print(f"iter {it}/{self.cfg.max_iter}  lr {lr:.5f}  {terms}  time {iter_time:.3f}s  data {data_time:.3f}s"
              f"  mem {memory_mb:.0f}MB  eta {eta}" + (f"  skipped {record['skipped_images']}" if skipped else ""),
              flush=True)
        self.record(record)
        if self.tb:
            for key in ["loss", "lr", "time", "data_time"] + self.names:
                self.tb.add_scalar(f"train/{key}", record[key], it)
        return record

    def eval(self, it, metrics):
        self.record({"iter": it, "eval": metrics})
        if self.tb and metrics:
            for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
                self.tb.add_scalar(f"eval/{key}", metrics[key], it)

    def close(self):
        if self.rank != 0 or self.stdout is None:
            return
        try:
            plot_losses(os.path.join(self.cfg.output_dir, "log.jsonl"),
                        os.path.join(self.cfg.output_dir, "loss_curves.png"))
        finally:
            sys.stdout = self.stdout
            self.stdout = None
            self.txt.close()
            if self.tb:
                self.tb.close()


COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def plot_losses(jsonl, png, size=(1000, 500)):
    """The smoothed losses of every log line in jsonl (all runs in the folder, resumed ones included) against
    the iteration, drawn with PIL (no plotting library needed)."""
    from PIL import Image, ImageDraw, ImageFont
    rows = {}
    with open(jsonl) as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                rows[r["iter"]] = r  # a resumed run's lines replace the ones it repeats
    if len(rows) < 2:
        return
    its = sorted(rows)
    keys = ["loss"] + [k for k in rows[its[0]] if k.startswith("loss_") and not k.endswith("_avg")]
    top = max(max(rows[i][k] for i in its) for k in keys) or 1.0
    try:
        font = ImageFont.load_default(size=14)
    except (TypeError, OSError):
        font = ImageFont.load_default()
    w, h, left, right, bottom = size[0], size[1], 60, 190, 40  # the legend sits in the right margin
    x0, x1, y0, y1 = left, w - right, 30, h - bottom
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.text((x0, 6), f"training losses, median of {WINDOW} iterations", fill="black", font=font)
    d.rectangle([x0, y0, x1, y1], outline="black")
    for t in range(5):
        y = y1 - t * (y1 - y0) / 4
        d.line([(x0 - 4, y), (x0, y)], fill="black")
        d.text((4, y - 8), f"{top * t / 4:.3g}", fill="black", font=font)
    d.text((x0, y1 + 8), f"iteration {its[0]}", fill="black", font=font)
    d.text((x1 - 110, y1 + 8), f"iteration {its[-1]}", fill="black", font=font)

    def xy(i, v):
        return x0 + (i - its[0]) / max(its[-1] - its[0], 1) * (x1 - x0), y1 - v / top * (y1 - y0)
    for k, key in enumerate(keys):
        colour = COLOURS[k % len(COLOURS)]
        d.line([xy(i, rows[i][key]) for i in its], fill=colour, width=2)
        d.line([(x1 + 12, y0 + 10 + 20 * k), (x1 + 32, y0 + 10 + 20 * k)], fill=colour, width=3)
        d.text((x1 + 38, y0 + 2 + 20 * k), key, fill="black", font=font)
    img.save(png)
