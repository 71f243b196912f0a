"""The training log, written by rank 0: one console line per log_period with each loss smoothed as upstream's
MetricLogger shows it (median over the last 20 iterations, and the average since the run started), the console
copied to output_dir/log.txt, the same record as a JSON line in log.jsonl together with every iteration's losses
and lr since the previous line ("per_iter"), TensorBoard event files when tensorboard is installed
(`tensorboard --logdir output/`); and the run's figures, drawn with matplotlib: loss_curves.png at the end of a run,
and pr_curves.png for each evaluation (evaluate.py).

    log = TrainLog(cfg, rank, world_size, start_iter)
    log.begin(device, resumed)           # the first console line; config and versions as the first JSON line
    log.add(losses, lr)                  # every iteration: the loss dict, kept on the device (no sync)
    log.write(it, lr, time, data, mem, skipped)   # every log_period: reduce over ranks, print, write
    log.eval(it, metrics)                # an evaluation's numbers
    log.plot()                           # loss_curves.png (its path, or None before any logged iteration)
    log.close()                          # the PNG if not drawn yet; log.txt and TensorBoard closed

A resumed run (start_iter > 0) first rewrites log.jsonl without the records of iterations after its checkpoint that
a killed run logged, so the log keeps one record per iteration; lines it cannot read are kept as they are.
A full disk: a write of log.jsonl or the PNG is one paragraph naming the folder (config.UserError); log.txt stops
with a note and the console goes on.
"""
import collections
import dataclasses
import datetime
import json
import os
import platform
import sys

import numpy as np
import torch

import config
import launch

WINDOW = 20  # iterations in the median, as upstream's MetricLogger (maskrcnn_benchmark/utils/metric_logger.py)


class _Tee:
    """Writes to the console and to a file; a file that cannot be written (a full disk) is dropped with one note,
    and the console goes on."""

    def __init__(self, stream, f):
        self.stream, self.f = stream, f

    def _file(self, op, *args):
        try:
            if self.f is not None:
                getattr(self.f, op)(*args)
        except OSError as e:
            name, self.f = self.f.name, None
            self.stream.write(f"\nlogger: {name} stops here: cannot write in {os.path.dirname(name) or '.'} "
                              f"({e.strerror or e}); the console goes on\n")

    def write(self, text):
        self.stream.write(text)
        self._file("write", text)

    def flush(self):
        self.stream.flush()
        self._file("flush")

    def close(self):
        self._file("close")

    def __getattr__(self, name):
        return getattr(self.stream, name)


class TrainLog:
    def __init__(self, cfg, rank, world_size, start_iter):
        self.cfg, self.rank, self.world_size, self.start_iter = cfg, rank, world_size, start_iter
        self.window = collections.deque(maxlen=WINDOW)  # per-iteration loss vectors averaged over ranks, on the CPU
        self.pending, self.lrs = [], []  # the iterations since the last log line: loss vectors (device) and lrs
        self.total, self.count, self.names = None, 0, None
        self.stdout, self.tb, self.plotted = None, None, False
        if rank != 0:
            return
        self.jsonl = os.path.join(cfg.output_dir, "log.jsonl")
        self._guard(self._prepare)
        self.stdout, sys.stdout = sys.stdout, _Tee(sys.stdout, open(os.path.join(cfg.output_dir, "log.txt"), "a"))
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

    def _prepare(self):
        """A killed run's last line may be cut short: keep this run's lines off it. On resume, drop the records of
        iterations after start_iter (losses, evaluations, and the starts of runs resumed from later checkpoints)."""
        try:
            with open(self.jsonl, "rb") as f:
                lines = f.read().splitlines(keepends=True)
        except FileNotFoundError:
            return
        if self.start_iter:
            lines = [ln for ln in lines if not _after(ln, self.start_iter)]
        if lines and not lines[-1].endswith(b"\n"):
            lines[-1] += b"\n"
        launch.atomic_write(self.jsonl, lambda f: f.writelines(lines))

    def _guard(self, write, what="log.jsonl"):
        """write(); an OSError (a full disk) becomes one paragraph naming the folder."""
        try:
            return write()
        except config.UserError:
            raise
        except OSError as e:
            raise config.UserError(f"cannot write {what} in output_dir {self.cfg.output_dir}: {e.strerror or e} "
                                   f"(errno {e.errno}); the checkpoints written are intact: free space, then "
                                   f"continue with --resume") from None

    def record(self, record):
        if self.rank == 0:
            line = json.dumps(record) + "\n"

            def append():
                with open(self.jsonl, "a") as f:
                    f.write(line)
            self._guard(append)

    def add(self, losses, lr):
        values = torch.stack([v.detach().float() for v in losses.values()])
        self.names = list(losses)
        self.pending.append(values)
        self.lrs.append(lr)
        self.total = values if self.total is None else self.total + values
        self.count += 1

    def write(self, it, lr, iter_time, data_time, memory_mb, skipped):
        """One log line: each loss's median over the window and its average since the start, averaged over
        ranks; iteration and data times in seconds (evaluations excluded); skipped images summed over ranks;
        "per_iter": each iteration's losses (averaged over ranks) and lr since the previous line, 6 digits."""
        stats = torch.cat([torch.stack(self.pending), self.total[None] / self.count])  # (n + 1, terms)
        extra = torch.tensor([float(skipped)], device=stats.device)
        if self.world_size > 1:  # the one collective of a log line carries the iterations' values too
            flat = launch.all_reduce(torch.cat([stats.flatten() / self.world_size, extra]))
            stats, extra = flat[:-1].view_as(stats), flat[-1:]
        stats = stats.cpu()
        rows, averages = stats[:-1], stats[-1]
        self.window.extend(rows)
        window = torch.stack(list(self.window))  # (<= WINDOW, terms)
        medians, loss_median = window.median(0).values, window.sum(1).median().item()
        per_iter = {n: [float(f"{v:.6g}") for v in column] for n, column in zip(self.names, rows.t().tolist())}
        per_iter["lr"] = [float(f"{v:.6g}") for v in self.lrs]
        self.pending, self.lrs = [], []
        record = {"iter": it, "lr": lr, **{n: m.item() for n, m in zip(self.names, medians)},
                  **{f"{n}_avg": a.item() for n, a in zip(self.names, averages)}, "loss": loss_median,
                  "loss_avg": averages.sum().item(), "time": iter_time, "data_time": data_time,
                  "memory_mb": memory_mb, "skipped_images": int(extra.item()), "per_iter": per_iter}
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

    def plot(self):
        """loss_curves.png from log.jsonl (rank 0): its path, or None when no iteration is logged."""
        self.plotted = True
        if self.rank != 0:
            return None
        png = os.path.join(self.cfg.output_dir, "loss_curves.png")
        return png if self._guard(lambda: plot_losses(self.jsonl, png), "loss_curves.png") else None

    def close(self):
        """The PNG, unless plot() ran: a run that stops on an error or a signal still draws what it logged, and a
        full disk then only says so, leaving the run's own error to be told. log.txt and TensorBoard closed."""
        if self.rank != 0 or self.stdout is None:
            return
        try:
            if not self.plotted:
                try:
                    self.plot()
                except config.UserError as e:
                    print(f"logger: {e}", file=sys.stderr, flush=True)
        finally:
            tee, sys.stdout = sys.stdout, self.stdout
            self.stdout = None
            tee.close()
            if self.tb:
                self.tb.close()


def _after(line, it):
    """True for a log.jsonl line (bytes) that records iteration > it: losses, an evaluation, or a run's start."""
    try:
        r = json.loads(line)
    except ValueError:
        return False
    if not isinstance(r, dict):
        return False
    start = r.get("resumed_from") if "config" in r else r.get("iter")
    return isinstance(start, (int, float)) and start > it


def rolling_median(values, window=WINDOW, chunk=10000):
    """(N,) float64: at each position the median of the last `window` values (fewer at the start), the lower one
    of an even count as torch.median takes it, so it equals the log line's median where the log's window is full.
    Windows are sorted `chunk` at a time, so memory stays at chunk x window values."""
    x = torch.as_tensor(values, dtype=torch.float64)
    head = [x[:i + 1].median() for i in range(min(window - 1, len(x)))]
    tail = [x[i:i + chunk + window - 1].unfold(0, window, 1).median(1).values
            for i in range(0, len(x) - window + 1, chunk)]
    return torch.cat(([torch.stack(head)] if head else []) + tail).numpy() if len(x) else x.numpy()


def loss_series(jsonl):
    """What loss_curves.png draws, from a log.jsonl that may hold several runs of one folder: a run starting at
    iteration s (0 when fresh, else the resumed checkpoint's) replaces every iteration and evaluation after s that
    earlier runs logged. {"iter": (N,) int, one per iteration with logged losses; "raw": {"loss" (the sum), each
    term: (N,) each iteration's value, averaged over ranks}; "smoothed": the same keys, rolling_median of raw over
    "window" iterations: WINDOW as the log's median, or N / 300 on a long run (a thick line of 90k points of a
    20-iteration median is a band, not a line); "lr": (N,); "evals": [(iteration, its metrics)] in order}."""
    points, evals = {}, {}
    with open(jsonl, "rb") as f:  # bytes: a line of garbage is skipped, whatever its encoding
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:  # the last line of a run killed while writing it, or not text
                continue
            if not isinstance(r, dict) or not isinstance(r.get("iter", 0), int):
                continue
            try:
                if "config" in r:
                    start = r.get("resumed_from") or 0
                    points = {i: p for i, p in points.items() if i <= start}
                    evals = {i: m for i, m in evals.items() if i <= start}
                elif "per_iter" in r:
                    per, n = r["per_iter"], len(r["per_iter"]["lr"])
                    for k in range(n):
                        points[r["iter"] - n + 1 + k] = {key: float(v[k]) for key, v in per.items()}
                elif isinstance(r.get("eval"), dict) and r["eval"]:
                    evals[r["iter"]] = r["eval"]
            except (KeyError, TypeError, ValueError, IndexError, AttributeError):  # a line that is not our record
                continue
    terms = [k for k in points[max(points)] if k != "lr"] if points else []  # the newest record's terms
    its = [i for i in sorted(points) if all(t in points[i] for t in terms + ["lr"])]
    raw = {t: np.array([points[i][t] for i in its], dtype=np.float64) for t in terms}
    raw = {"loss": sum(raw.values()) if terms else np.zeros(0), **raw}
    window = max(WINDOW, len(its) // 300)
    return {"iter": np.array(its, dtype=np.int64), "raw": raw, "window": window,
            "smoothed": {t: rolling_median(v, window) for t, v in raw.items()},
            "lr": np.array([points[i]["lr"] for i in its], dtype=np.float64), "evals": sorted(evals.items())}


def plot_losses(jsonl, png):
    """loss_curves.png of loss_series(jsonl), 1500 x 800 pixels for 4 terms: a panel per term and one for their
    sum (lr on its right axis), each iteration as a thin light line and the smoothed median as a thick one on a log
    scale; dotted lines where an evaluation ran, and a last panel of the evaluations' AP, AP50 and AP75. Drawn on
    matplotlib's Agg canvas, so the user's backend and pyplot state are left alone. True when drawn (a single
    iteration as a dot); False, and nothing written, before any iteration is logged."""
    s = loss_series(jsonl)
    if not len(s["iter"]):
        return False
    dot = "o" if len(s["iter"]) == 1 else None  # max_iter=1: a line through one point would not show
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    rows = (len(s["raw"]) + 3) // 3  # the terms, their sum and the evaluations, 3 panels a row
    fig = Figure(figsize=(15, 4 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 3, sharex=True).flatten()
    its, eval_its = s["iter"], [i for i, _ in s["evals"]]
    for k, (ax, term) in enumerate(zip(axes, s["raw"])):
        colour = "black" if term == "loss" else f"C{k - 1}"
        ax.plot(its, s["raw"][term], color=colour, lw=0.6, alpha=0.35)
        ax.plot(its, s["smoothed"][term], color=colour, lw=2, marker=dot)
        ax.set_yscale("log", nonpositive="mask")  # a loss can be exactly 0 (no positive anchor): not drawn
        positive = s["raw"][term][s["raw"][term] > 0]
        if positive.size:  # an iteration far below every median would stretch the log scale: it leaves the frame
            ax.set_ylim(bottom=max(positive.min(), s["smoothed"][term].min() / 5) / 1.2)
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title("loss (sum of the terms)" if term == "loss" else term)
        ax.grid(True, which="major", alpha=0.3)
        for i in eval_its:
            ax.axvline(i, color="0.5", ls=":", lw=1)
    total = axes[0]
    lr_ax = total.twinx()
    lr_ax.plot(its, s["lr"], color="C4", lw=1.2, ls="--", marker=dot)
    lr_ax.set_ylim(0, s["lr"].max() * 1.1 or 1)
    lr_ax.yaxis.set_major_formatter(plain)
    lr_ax.set_ylabel("learning rate", color="C4")
    key = [Line2D([], [], color="0.3", lw=0.6, alpha=0.6), Line2D([], [], color="0.3", lw=2),
           Line2D([], [], color="C4", lw=1.2, ls="--"), Line2D([], [], color="0.5", ls=":", lw=1)]
    fig.legend(key, ["each iteration (averaged over ranks)", f"median of the last {s['window']}",
                     "learning rate (right axis of the sum)", "evaluation"], loc="outside upper center", ncols=4)
    ev = axes[-1]
    if s["evals"]:
        for key in ("AP", "AP50", "AP75"):
            values = [m[key] for _, m in s["evals"]]
            ev.plot(eval_its, values, marker="o", label=f"{key} (last {values[-1]:.3f})")
        ev.set_ylim(0, 1)
        ev.legend(loc="upper left", fontsize=9)
        ev.set_title(f"evaluation on {s['evals'][-1][1].get('split', 'val')}")
    else:
        ev.text(0.5, 0.5, "no evaluation logged yet", ha="center", va="center", transform=ev.transAxes)
        ev.set_title("evaluation")
    ev.grid(True, alpha=0.3)
    ev.tick_params(labelbottom=True)
    for ax in axes[len(s["raw"]):-1]:
        ax.set_visible(False)
    fig.supxlabel("iteration")
    launch.atomic_write(png, lambda f: fig.savefig(f, format="png"))
    return True


def plot_pr_curves(per_class, pr, png, title, few=5):
    """pr_curves.png, 1500 x 600 pixels: precision against recall (COCOeval's interpolated precision at its 101
    recall steps, area all, 100 detections) at IoU 0.5 and at 0.75, for all classes together (the mean over the
    classes with ground truth, whose area is AP50 or AP75) and for each class when there are at most 2 * few, else
    the few best (solid) and the few worst (dashed) by that IoU's AP. Drawn on matplotlib's Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(15, 6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    recall = pr["recall"]
    valid = [k for k, c in enumerate(per_class) if c["gt_boxes"] > 0]
    for ax, thresh, key in zip(fig.subplots(1, 2, sharey=True), (0.5, 0.75), ("AP50", "AP75")):
        p = pr["precision"][int(np.argmin(abs(pr["iou"] - thresh)))]  # (R, K)
        if valid:
            ax.plot(recall, p[:, valid].mean(1), color="black", lw=3,
                    label=f"all {len(valid)} classes ({p[:, valid].mean():.3f})")
        ranked = sorted(valid, key=lambda k: -per_class[k][key])
        if len(ranked) <= 2 * few:  # a class keeps its colour in both panels
            shown = [(k, "-", f"C{k % 10}") for k in ranked]
            note = f"{key}, every class"
        else:
            shown = [(k, "-" if j < few else "--", f"C{j}") for j, k in enumerate(ranked[:few] + ranked[-few:])]
            note = f"{key}; solid: the {few} best,\ndashed: the {few} worst"
        for k, style, colour in shown:
            ax.plot(recall, p[:, k], ls=style, lw=1.5, color=colour,
                    label=f"{per_class[k]['name']} ({per_class[k][key]:.3f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.01, 1.01)  # a class without a true positive lies on precision 0: off the frame's edge
        ax.set_xlabel("recall")
        ax.grid(True, alpha=0.3)
        ax.set_title(f"IoU {thresh:g}")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=9, title=note, title_fontsize=9)
    fig.axes[0].set_ylabel("precision")
    fig.suptitle(title)
    launch.atomic_write(png, lambda f: fig.savefig(f, format="png"))
