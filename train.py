"""Train Faster R-CNN with maskrcnn-benchmark's recipe, on one process or many.

    python train.py --config demo                      # built-in demo: generated shapes, CPU, ~3-5 minutes
    python train.py --config R-101-FPN weights=R-101.pkl data_root=datasets/coco device=cuda
    torchrun --nproc_per_node 8 train.py --config R-101-FPN weights=R-101.pkl device=cuda
    torchrun --nnodes 2 --node_rank R --master_addr HOST --master_port 29500 --nproc_per_node 8 train.py ...
    # a rank that dies restarts the job from the last checkpoint (restarts need the c10d rendezvous):
    torchrun --max-restarts 3 --rdzv-backend c10d --rdzv-endpoint localhost:29500 --nproc_per_node 8 train.py ... --resume

Any config field can be overridden as key=value or --key value (see config.py). --resume continues from the
newest loadable checkpoint in output_dir: model, optimizer, iteration, sampler position and RNG.
One pass: config, distributed setup, seed, data, model, optimizer, resume, loop, checkpoints, evaluation.
"""
import datetime
import json
import os
import platform
import time

import torch
import torch.distributed as dist

import checkpoint
import config
import data
import evaluate
import launch
import model as model_lib


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


def make_optimizer(model, cfg):
    """SGD with upstream's parameter groups: biases at bias_lr_factor x lr and without weight decay."""
    weights = [p for n, p in model.named_parameters() if p.requires_grad and "bias" not in n]
    biases = [p for n, p in model.named_parameters() if p.requires_grad and "bias" in n]
    groups = [dict(params=weights, lr_factor=1.0, weight_decay=cfg.weight_decay),
              dict(params=biases, lr_factor=cfg.bias_lr_factor, weight_decay=cfg.weight_decay_bias)]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=cfg.base_lr, momentum=cfg.momentum)


def reduce_losses(losses, world_size):
    """Average each loss over ranks, for logging only."""
    values = torch.stack([v.detach().float() for v in losses.values()])
    if world_size > 1:
        dist.all_reduce(values)
        values /= world_size
    return dict(zip(losses, values.tolist()))


def save_checkpoint(it, model, optimizer, scaler, loader, cfg, rank, world_size):
    """Every rank's RNG state gathered, then rank 0 writes model_{it}.pth. Non-finite weights are never saved."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:  # a step with a finite loss can still overflow the weights: never checkpoint those
        raise FloatingPointError(f"non-finite weights after iteration {it} ({', '.join(bad[:4])}"
                                 f"{' ...' if len(bad) > 4 else ''}); nothing saved: the newest checkpoint in "
                                 f"{cfg.output_dir} is the last good state; lower base_lr or check the data")
    rng = [torch.get_rng_state()]  # every rank's, so each resumes its own random stream
    if world_size > 1:
        rng = [None] * world_size
        dist.all_gather_object(rng, torch.get_rng_state())
    if rank == 0:
        extra = {"scaler": scaler.state_dict()} if scaler else {}
        checkpoint.save_training(cfg.output_dir, it, model, optimizer, cfg, keep=cfg.keep_checkpoints,
                                 sampler=loader.state(it), rng=rng, **extra)


def write_log(cfg, rank, record):
    """One JSON line in output_dir/log.jsonl (rank 0 only)."""
    if rank == 0:
        with open(os.path.join(cfg.output_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def main(argv=None):
    p = config.parser(__doc__)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    args, overrides = config.parse(p, argv)
    rank, world_size, local_rank = launch.env()
    cfg = config.get(args.config or "R-101-FPN", overrides, verbose=rank == 0)
    device = launch.device(cfg.device, local_rank)
    if cfg.ims_per_batch % world_size:
        raise config.ConfigError(f"ims_per_batch={cfg.ims_per_batch} is not divisible by {world_size} processes: "
                                 f"set ims_per_batch to a multiple of {world_size}")
    launch.init_process_group(device, rank, world_size)
    torch.manual_seed(cfg.seed + rank)
    os.makedirs(cfg.output_dir, exist_ok=True)
    # ---- model, optimizer, resume
    model = model_lib.build_model(cfg).to(device)
    optimizer = make_optimizer(model, cfg)
    autocast = dict(fp16=torch.float16, bf16=torch.bfloat16).get(cfg.amp)
    scaler = None
    if cfg.amp == "fp16":  # torch.amp.GradScaler(device) is torch 2.3+; cuda's own before that
        scaler = torch.amp.GradScaler(device.type) if hasattr(torch.amp, "GradScaler") else torch.cuda.amp.GradScaler()
    start_iter, sampler_state = 0, None
    resumed, state = checkpoint.latest_training(cfg.output_dir) if args.resume else (None, None)
    if resumed:
        checkpoint.load_state(model, checkpoint.model_state(state), repr(resumed))
        optimizer.load_state_dict(state["optimizer"])
        start_iter, sampler_state = state["iteration"], state.get("sampler")
        if scaler and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
    elif args.resume and rank == 0:
        print(f"train: --resume found no checkpoint in {cfg.output_dir}: starting from iteration 0")
    if not resumed and cfg.weights:
        checkpoint.load_detectron_pickle(model, cfg.weights)
    # ---- data
    loader = data.make_train_loader(cfg, rank, world_size, start_iter, sampler_state)
    batches = iter(loader)  # creating the iterator draws from the global RNG: do it before restoring it
    if resumed:
        torch.set_rng_state(state["rng"][rank % len(state["rng"])])
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    if rank == 0:
        print(f"train: {world_size} process(es) on {device}, {cfg.ims_per_batch} images per iteration, "
              f"lr {cfg.base_lr} x {cfg.ims_per_batch}/16 = {cfg.base_lr * cfg.ims_per_batch / 16:g} (linear "
              f"scaling), iterations {start_iter} -> {cfg.max_iter}" + (f", resumed from {resumed}" if resumed else ""))
    write_log(cfg, rank, {"config": config.to_dict(cfg), "resumed_from": resumed, "world_size": world_size,
                          "versions": {"python": platform.python_version(), "torch": torch.__version__}})
    # ---- the loop
    model.train()
    end = time.time()
    data_time = iter_time = 0.0
    skipped = 0  # unreadable images passed over by this rank's loader (data.py warns once per file)
    for it, (images, image_sizes, targets, _) in zip(range(start_iter, cfg.max_iter), batches):
        skipped += sum(len(t.get("skipped", ())) for t in targets)
        images = images.to(device, non_blocking=True)
        targets = [{k: t[k].to(device, non_blocking=True) for k in ("boxes", "labels")} for t in targets]
        data_time += time.time() - end
        lr = get_lr(it, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_factor"]
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
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
        iter_time += time.time() - end
        end = time.time()
        done = it + 1
        if done % cfg.log_period == 0 or done == cfg.max_iter:
            values = reduce_losses(losses, world_size)
            n = cfg.log_period if done % cfg.log_period == 0 else done % cfg.log_period or cfg.log_period
            record = {"iter": done, "lr": lr, **values, "loss": sum(values.values()), "time": iter_time / n,
                      "data_time": data_time / n, "memory_mb": launch.peak_memory_mb(device), "skipped_images": skipped}
            eta = datetime.timedelta(seconds=int(record["time"] * (cfg.max_iter - done)))
            if rank == 0:
                print(f"iter {done}/{cfg.max_iter}  lr {lr:.5f}  " + "  ".join(f"{k} {v:.4f}" for k, v in values.items())
                      + f"  loss {record['loss']:.4f}  time {record['time']:.3f}s  data {record['data_time']:.3f}s"
                      f"  mem {record['memory_mb']:.0f}MB  eta {eta}" + (f"  skipped {skipped}" if skipped else ""),
                      flush=True)
            write_log(cfg, rank, record)
            data_time = iter_time = 0.0
        if done % cfg.checkpoint_period == 0 or done == cfg.max_iter:
            save_checkpoint(done, model, optimizer, scaler, loader, cfg, rank, world_size)
        if cfg.eval_period and done % cfg.eval_period == 0 and done != cfg.max_iter:
            write_log(cfg, rank, {"iter": done, "eval": evaluate.evaluate_coco(model, cfg, device, rank, world_size)})
            model.train()
    metrics = evaluate.evaluate_coco(model, cfg, device, rank, world_size)
    write_log(cfg, rank, {"iter": cfg.max_iter, "eval": metrics})
    if rank == 0:
        print(f"train: done; checkpoints, log.jsonl and the evaluation's results are in {cfg.output_dir}")
    launch.finish(world_size)
    return metrics


if __name__ == "__main__":
    launch.run_cli(main)
