"""Train Faster R-CNN with maskrcnn-benchmark's recipe, on one process or many.

    python train.py --config demo                      # built-in demo: generated shapes, CPU, ~3-5 minutes
    python train.py --config R-101-FPN weights=R-101.pkl data_root=datasets/coco device=cuda
    torchrun --nproc_per_node 8 train.py --config R-101-FPN weights=R-101.pkl device=cuda
    torchrun --nnodes 2 --node_rank R --master_addr HOST --master_port 29500 --nproc_per_node 8 train.py ...
    # a rank that dies restarts the job from the last checkpoint (restarts need the c10d rendezvous):
    torchrun --max-restarts 3 --rdzv-backend c10d --rdzv-endpoint localhost:29500 --nproc_per_node 8 \
        train.py ... --resume

Any config field can be overridden as key=value or --key value (`--help` lists them). --resume continues from the
newest loadable checkpoint in output_dir: model, optimizer, iteration, sampler position and RNG. SIGTERM or
SIGINT (a scheduler's preemption, Ctrl-C) during training finishes the current iteration, writes a checkpoint and
the log there and exits with 128 + the signal's number; --resume then continues exactly. Before the first
iteration and after the last one (model_final.pth, the final evaluation, loss_curves.png) a signal stops the run
at once, with the same exit code and a line saying what is written and how to finish. The run ends with
model_final.pth (model, config, class names), log.txt, log.jsonl, loss_curves.png and the evaluation's results in
output_dir.
One pass: config, distributed setup, seed, model, optimizer, resume or initial weights, data, loop,
checkpoints, evaluation.
"""
import contextlib
import dataclasses
import os
import signal
import time

# torch's OpenMP threads wait for each other at every op. libgomp's default spins first, and when another process
# holds a core the spinning thread takes the time its peer needs (README, "A busy CPU", has the figures). libgomp
# reads it once, when torch loads, hence before `import torch`; a value in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402 (after OMP_WAIT_POLICY)
import torch.distributed as dist

import checkpoint
import config
import data
import evaluate
import launch
import logger
import model

def get_lr(it, cfg):
    """Learning rate of weights at iteration it (0-based): upstream's WarmupMultiStepLR, linear warmup from
    warmup_factor, x gamma at each step; base_lr is for 16 images and scales linearly with ims_per_batch;
    steps and warmup are for schedule_ref iterations and scale with max_iter."""
    lr = cfg.base_lr * cfg.ims_per_batch / 16
    scale = cfg.max_iter / cfg.schedule_ref
    warmup = round(cfg.warmup_iters * scale)
    if it < warmup:
        alpha = it / warmup
        lr *= cfg.warmup_factor * (1 - alpha) + alpha
    return lr * cfg.gamma ** sum(it >= round(s * scale) for s in cfg.steps)


def make_optimizer(net, cfg):
    """SGD with upstream's parameter groups: biases at bias_lr_factor x lr and without weight decay."""
    weights = [p for n, p in net.named_parameters() if p.requires_grad and "bias" not in n]
    biases = [p for n, p in net.named_parameters() if p.requires_grad and "bias" in n]
    groups = [dict(params=weights, lr_factor=1.0, weight_decay=cfg.weight_decay),
              dict(params=biases, lr_factor=cfg.bias_lr_factor, weight_decay=cfg.weight_decay_bias)]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=cfg.base_lr, momentum=cfg.momentum)


def proposal_cap(cfg, world_size, verbose):
    """Upstream's FPN_POST_NMS_TOP_N_TRAIN (2000) spans a device's batch and was tuned for 2 images per device;
    scale it to the images per device (1000 per image, the fix of maskrcnn-benchmark issue 672, where 8 images
    per GPU lost 4 AP), unless scale_fpn_post_nms_train is off."""
    per_device = cfg.ims_per_batch // world_size
    if not (cfg.fpn_post_nms_per_batch and cfg.scale_fpn_post_nms_train) or per_device == 2:
        return cfg
    n = max(1, cfg.fpn_post_nms_top_n_train * per_device // 2)
    if verbose:
        print(f"train: fpn_post_nms_top_n_train {cfg.fpn_post_nms_top_n_train} -> {n} for {per_device} images per "
              f"device (upstream's value spans a device's batch of 2; scale_fpn_post_nms_train=false keeps it)")
    return dataclasses.replace(cfg, fpn_post_nms_top_n_train=n)


def make_scaler(cfg, device):
    """fp16's GradScaler, else None. torch.amp.GradScaler(device) is torch 2.3+; each device module's own before."""
    if cfg.amp != "fp16":
        return None
    return torch.amp.GradScaler(device.type) if hasattr(torch.amp, "GradScaler") else \
        getattr(torch, device.type).amp.GradScaler()


def init_weights(net, cfg, resume, rank):
    """(start iteration, checkpoint state or None): the newest checkpoint in output_dir with --resume (one past
    max_iter is said), else cfg.weights; a config that freezes layers refuses to start from random weights."""
    path, state = checkpoint.latest_training(cfg.output_dir) if resume else (None, None)
    if path:
        checkpoint.load_state(net, checkpoint.model_state(state), repr(path))
        if state["iteration"] > cfg.max_iter and rank == 0:
            print(f"train: the newest checkpoint in {cfg.output_dir} is at iteration {state['iteration']}, past "
                  f"max_iter={cfg.max_iter}: nothing to do. Raise max_iter to train on; evaluate it with python "
                  f"evaluate.py --ckpt {path}", flush=True)
        return state["iteration"], state
    if resume and rank == 0:
        print(f"train: --resume found no checkpoint in {cfg.output_dir}: starting from iteration 0")
    if cfg.weights:
        checkpoint.load_weights(net, cfg.weights, verbose=rank == 0)
    elif cfg.freeze_at > 0 or cfg.norm == "frozen_bn":
        raise config.ConfigError(
            f"weights= is empty, but freeze_at={cfg.freeze_at} and norm={cfg.norm} would keep random layers frozen "
            f"and every norm at identity: the run would learn nothing useful. Give ImageNet weights "
            f"(weights=R-101.pkl or R-50.pkl, {checkpoint.IMAGENET_URL}), a detector to fine-tune "
            f"(weights=e2e_faster_rcnn_R_101_FPN_1x.pth or one of ours), or train from scratch with trainable "
            f"norms: weights= freeze_at=0 norm=gn (as the demo preset does)")
    return 0, None


class Interrupted(BaseException):
    """A signal outside the training loop, raised where the program is (a BaseException, as KeyboardInterrupt, so
    no `except Exception` of the evaluation swallows it)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


class Preemption:
    """SIGTERM and SIGINT, held from the start of a run to its end. Inside the training loop (deferred) a signal
    sets a flag that the loop reads after each iteration (every rank agrees through one all-reduce); outside it,
    before the first iteration and after the last, it raises Interrupted at once. A signal more than REPEAT
    seconds after the first acts at once, through the previous handlers (Ctrl-C twice); one sooner is the same
    notice twice: a scheduler that signals every process of a job (SLURM) reaches a rank both directly and through
    torchrun, which passes its own on. As a context manager: Interrupted becomes the stage's line on rank 0 (what
    is written and how to go on) and exit code 128 + the signal's number; the previous handlers come back."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    REPEAT = 1.0  # seconds

    def __init__(self, rank=0):
        self.rank, self.signum, self.at, self.deferred, self.told = rank, 0, 0.0, False, False
        self.pid = os.getpid()  # a DataLoader worker forked from us inherits the handler: it only notes the signal
        self.during("startup", "nothing was trained; run the same command again")
        self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        self.restore()
        if isinstance(error, Interrupted):
            self.tell(kind, error, tb)
            raise SystemExit(128 + error.signum) from None

    def handle(self, signum, frame):
        if not self.signum:
            self.signum, self.at = signum, time.monotonic()
            if not self.deferred and os.getpid() == self.pid:
                raise Interrupted(signum)
        elif time.monotonic() - self.at > self.REPEAT:
            self.restore()
            signal.raise_signal(signum)  # to the previous handler: the default ends the process

    def during(self, stage, advice):
        """What the run does now and what to do if a signal stops it there."""
        self.stage, self.advice = stage, advice

    def defer(self, on, device=None, world_size=1):
        """Signals wait for the loop (on), or act at once (off: a signal that came since the last read acts now)."""
        self.deferred = on
        signum = 0 if on else self.requested(device, world_size)  # on another rank only: stop with it too
        if signum:
            raise Interrupted(signum)

    def tell(self, kind, error, tb):
        """An exit callback: the line for an Interrupted (once, rank 0): the signal, the stage, what is written and
        what to do. Pushed on the run's ExitStack after the log, so the line is in log.txt too."""
        if isinstance(error, Interrupted) and self.rank == 0 and not self.told:
            self.told = True
            print(f"train: {signal.Signals(error.signum).name} during {self.stage}: stopped; {self.advice}",
                  flush=True)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def requested(self, device, world_size):
        if world_size == 1:
            return self.signum
        return int(launch.all_reduce(torch.tensor([self.signum], device=device), op=dist.ReduceOp.MAX).item())


def train_step(ddp, optimizer, scaler, images, image_sizes, targets, it, cfg):
    """One SGD step; stops on a non-finite loss before it touches the weights."""
    with launch.autocast(images.device, cfg.amp):
        losses = ddp(images, image_sizes, targets)
    loss = sum(losses.values())
    if not torch.isfinite(loss):  # stop before the bad step touches the weights or a checkpoint
        terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
        raise FloatingPointError(f"non-finite loss at iteration {it + 1}: {terms}. The newest checkpoint in "
                                 f"{cfg.output_dir} is the last good state; lower base_lr or check the data")
    optimizer.zero_grad(set_to_none=True)
    if scaler:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return losses


def save_checkpoint(it, net, optimizer, scaler, loader, cfg, rank):
    """Every rank's RNG state gathered, then rank 0 writes model_{it}.pth. Non-finite weights are never saved."""
    bad = [n for n, p in net.named_parameters() if not torch.isfinite(p).all()]
    if bad:  # a step with a finite loss can still overflow the weights: never checkpoint those
        raise FloatingPointError(f"non-finite weights after iteration {it} ({', '.join(bad[:4])}"
                                 f"{' ...' if len(bad) > 4 else ''}); nothing saved: the newest checkpoint in "
                                 f"{cfg.output_dir} is the last good state; lower base_lr or check the data")
    rng = launch.gather_objects(torch.get_rng_state())
    if rank == 0:  # every rank's RNG state, so each resumes its own random stream
        extra = {"scaler": scaler.state_dict()} if scaler else {}
        checkpoint.save_training(cfg.output_dir, it, net, optimizer, cfg, keep=cfg.keep_checkpoints,
                                 sampler=loader.state(it), rng=rng, categories=data.categories(loader.dataset), **extra)


def main(argv=None):
    p = config.parser(__doc__)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    args, overrides = config.parse(p, argv)
    rank, world_size, local_rank = launch.env()
    cfg = config.get(args.config or "R-101-FPN", overrides, verbose=rank == 0)
    if cfg.ims_per_batch % world_size:
        raise config.ConfigError(f"ims_per_batch={cfg.ims_per_batch} is not divisible by {world_size} processes: "
                                 f"set ims_per_batch to a multiple of {world_size}")
    cfg = proposal_cap(cfg, world_size, verbose=rank == 0)
    device = launch.device(cfg.device, local_rank)
    with contextlib.ExitStack() as held:  # left in reverse order, whatever ends the run
        stop = held.enter_context(Preemption(rank))  # outside the loop a signal stops at once (see there)
        held.enter_context(launch.output_dir(cfg.output_dir, rank))  # made, checked and locked, before any work
        launch.init_process_group(device, rank, world_size)
        launch.numeric_policy(cfg)  # FP32 as upstream ran it; TF32 only with tf32=true
        torch.manual_seed(cfg.seed + rank)
        # ---- model, optimizer, resume or initial weights, data
        net = model.build_model(cfg).to(device)
        optimizer = make_optimizer(net, cfg)
        scaler = make_scaler(cfg, device)
        start_iter, state = init_weights(net, cfg, args.resume, rank)
        if start_iter > cfg.max_iter:  # a finished run resumed with a shorter schedule: nothing to train or to write
            launch.finish(world_size)
            return None
        if state:
            optimizer.load_state_dict(state["optimizer"])
            if scaler and "scaler" in state:
                scaler.load_state_dict(state["scaler"])
        loader = data.make_train_loader(cfg, rank, world_size, start_iter, state and state.get("sampler"))
        data.check_classes(loader.dataset, cfg)
        batches = iter(loader)  # creating the iterator draws from the global RNG: do it before restoring it
        if state:
            torch.set_rng_state(state["rng"][rank % len(state["rng"])])
        ddp = torch.nn.parallel.DistributedDataParallel(net) if world_size > 1 else net
        log = logger.TrainLog(cfg, rank, world_size, start_iter)
        held.callback(log.close)
        held.push(stop.tell)  # before log.close: the line goes to log.txt too
        log.begin(device, resumed=state is not None)
        # ---- the loop
        net.train()
        end, data_time, iter_time, done, logged = time.time(), 0.0, 0.0, start_iter, start_iter
        skipped = 0  # unreadable images this rank's loader passed over (data.py warns once per file)
        stop.defer(True)
        for it, (images, image_sizes, targets, _) in zip(range(start_iter, cfg.max_iter), batches):
            skipped += sum(len(t.get("skipped", ())) for t in targets)
            images = images.to(device, non_blocking=True)
            targets = [{k: t[k].to(device, non_blocking=True) for k in ("boxes", "labels")} for t in targets]
            data_time += time.time() - end
            lr = get_lr(it, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_factor"]
            log.add(train_step(ddp, optimizer, scaler, images, image_sizes, targets, it, cfg), lr)
            iter_time += time.time() - end
            done = it + 1
            signum = stop.requested(device, world_size)
            save = done % cfg.checkpoint_period == 0 or done == cfg.max_iter or signum
            if done % cfg.log_period == 0 or save:  # a checkpoint's iterations are in the log: a resume leaves no gap
                n = done - logged  # iterations since the last line
                log.write(done, lr, iter_time / n, data_time / n, launch.peak_memory_mb(device), skipped)
                data_time, iter_time, logged = 0.0, 0.0, done
            if save:
                save_checkpoint(done, net, optimizer, scaler, loader, cfg, rank)
            if signum:
                if rank == 0:
                    print(f"train: {signal.Signals(signum).name} at iteration {done}: checkpoint written to "
                          f"{cfg.output_dir}; continue with --resume", flush=True)
                raise SystemExit(128 + signum)
            if cfg.eval_period and done % cfg.eval_period == 0 and done != cfg.max_iter:
                log.eval(done, evaluate.evaluate_coco(net, cfg, device, rank, world_size))
                net.train()
            end = time.time()  # an evaluation's time is not an iteration's
        # ---- the end: a signal now stops at once (the training checkpoint is written)
        final = os.path.join(cfg.output_dir, "model_final.pth")
        stop.during("the writing of model_final.pth", f"training is complete and "
                    f"{os.path.join(cfg.output_dir, f'model_{cfg.max_iter:07d}.pth')} is written; the same command "
                    f"with --resume writes model_final.pth and evaluates")
        stop.defer(False, device, world_size)
        if rank == 0:  # before the evaluation, which a signal or a full disk may stop
            checkpoint.save(final, net, cfg, categories=data.categories(loader.dataset))
        stop.during("the final evaluation", f"training is complete and {final} is written; evaluate it with "
                    f"python evaluate.py --ckpt {final}")
        metrics = evaluate.evaluate_coco(net, cfg, device, rank, world_size)
        log.eval(cfg.max_iter, metrics)
        stop.during("the drawing of loss_curves.png", f"{final} and the evaluation's results are written; only "
                    f"the figure is missing (logger.plot_losses draws it from log.jsonl)")
        png = log.plot()
        if rank == 0:
            written = ["model_final.pth", "log.txt", "log.jsonl"] + (["loss_curves.png"] if png else [])
            print(f"train: done; {', '.join(written)} and the evaluation's results are in {cfg.output_dir}")
    launch.finish(world_size)
    return metrics


if __name__ == "__main__":
    launch.run_cli(main)
