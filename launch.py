"""Process plumbing shared by train.py and evaluate.py: who this process is under torchrun, its device, the
process group, device synchronisation and peak memory, and the error wrapper that turns a user's mistake into one
paragraph and exit code 2.

    rank, world_size, local_rank = launch.env()          # 0, 1, 0 without torchrun
    device = launch.device(cfg.device, local_rank)       # or a ConfigError saying what to use instead
    launch.init_process_group(device, rank, world_size)  # gloo, nccl or cncl; nothing for one process
    launch.all_reduce(t); parts = launch.gather_objects(obj)  # the collectives the scripts use
    launch.numeric_policy(cfg)                           # FP32 as upstream, or TF32 when cfg.tf32
    ...
    launch.finish(world_size)
    with launch.output_dir(cfg.output_dir, rank): ...    # checked, made and locked for the run's life
    launch.build_once(lock, ready, build)                # a file made by one process of the machine, the rest wait
    launch.atomic_write(path, lambda f: f.write(data))   # a temporary file renamed into place

    if __name__ == "__main__":
        launch.run_cli(main)
"""
import collections
import contextlib
import datetime
import errno
import fcntl
import itertools
import os
import pickle
import shutil
import socket
import sys

import torch
import torch.distributed as dist

import config


def env():
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) for a plain python process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def device(name, local_rank=0):
    """torch.device for "cpu", "cuda" or "mlu", card local_rank, made current; a ConfigError when it is absent.
    Never falls back to another device: a run on the wrong device is worse than no run."""
    kind = name.split(":")[0]
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mlu":
        try:
            import torch_mlu  # noqa: F401  registers the "mlu" device and torch.mlu
        except ImportError:
            raise config.ConfigError("device=mlu needs torch_mlu (Cambricon's PyTorch image); "
                                     "use device=cpu or device=cuda on this machine") from None
    module = getattr(torch, kind, None)
    if module is None:
        raise config.ConfigError(f"device {name!r} is not one of {', '.join(config.CHOICES['device'])}")
    count = module.device_count() if module.is_available() else 0
    if local_rank >= count:
        raise config.ConfigError(f"device={kind}: card {local_rank} is not available here ({count} cards seen); "
                                 "use device=cpu, or fewer processes per node")
    module.set_device(local_rank)
    return torch.device(kind, local_rank)


def init_process_group(device, rank, world_size):
    """The process group from torchrun's environment, with the backend that matches the device; nothing when
    world_size is 1."""
    if world_size == 1:
        return
    # Each torchrun restart keeps its keys under its own prefix: a restarted group must not read the addresses
    # the previous (dead) round published in the same store.
    timeout = datetime.timedelta(minutes=30)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True",
                          timeout=timeout)
    store = dist.PrefixStore(f"frcnn_restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    backend = {"cpu": "gloo", "cuda": "nccl", "mlu": "cncl"}[device.type]
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    global _store
    _store = store


# Before torch 2.2, a finished gloo collective whose tensors only its worker thread still holds frees them there,
# which takes the GIL, while the process group's destructor keeps the GIL and joins that thread: a process that
# ends right after a collective could hang for ever (pytorch/pytorch#56297, fixed by #154976). So the tensors of
# the last few all-reduces stay referenced from Python, and objects travel through the store, not through gloo.
_store = None
_held = collections.deque(maxlen=8)
_exchange = itertools.count()


def all_reduce(tensor, op=dist.ReduceOp.SUM):
    """dist.all_reduce in place; returns the tensor."""
    dist.all_reduce(tensor, op=op)
    _held.append(tensor)
    return tensor


STORE_VALUE = 4 << 20  # bytes per store value: the libuv TCPStore (torch 2.4+) refuses one over 8 MiB


def gather_objects(obj, dst=0):
    """[obj of rank 0, obj of rank 1, ...] on rank dst (None on the others), pickled through torchrun's store in
    pieces of STORE_VALUE bytes (rank dst waits for each rank's piece count, set last): any picklable object;
    tensors should be on the CPU. [obj] when no process group was made (one process)."""
    if not dist.is_initialized():
        return [obj]
    rank, world_size = dist.get_rank(), dist.get_world_size()
    key = f"gather{next(_exchange)}/"
    if rank != dst:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        pieces = range(0, len(data), STORE_VALUE)
        for n, start in enumerate(pieces):
            _store.set(f"{key}{rank}/{n}", data[start:start + STORE_VALUE])
        _store.set(f"{key}{rank}", str(len(pieces)))
        return None
    parts = []
    for r in range(world_size):
        if r == dst:
            parts.append(obj)
            continue
        names = [f"{key}{r}/{n}" for n in range(int(_store.get(f"{key}{r}")))]
        parts.append(pickle.loads(b"".join(_store.get(k) for k in names)))
        for k in names + [f"{key}{r}"]:
            _store.delete_key(k)
    return parts


def finish(world_size):
    if world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def numeric_policy(cfg):
    """FP32 math as upstream ran it (its V100s had no TF32), or TF32 tensor cores when cfg.tf32: convolutions and
    matmuls on CUDA (cuDNN, cuBLAS) and MLU (CNNL), set the same way for training, the evaluation inside it and
    evaluate.py. PyTorch's own default is mixed (cuDNN TF32 on, matmul off). Mixed precision is cfg.amp, apart."""
    torch.backends.cudnn.allow_tf32 = cfg.tf32  # the legacy flags only: mixing in the fp32_precision API raises
    torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    torch.set_float32_matmul_precision("high" if cfg.tf32 else "highest")
    mlu = getattr(torch.backends, "mlu", None)  # torch_mlu's flags, where it is installed
    if mlu is not None and hasattr(mlu, "matmul"):
        mlu.matmul.allow_tf32 = cfg.tf32
    if hasattr(torch.backends, "cnnl"):
        torch.backends.cnnl.allow_tf32 = cfg.tf32


def autocast(device, amp):
    """torch.autocast for config field amp ("" off, "bf16", "fp16"), the same in training and evaluation."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def synchronize(device):
    """Wait for the device's queued work (timing)."""
    if device.type in ("cuda", "mlu"):
        getattr(torch, device.type).synchronize(device)


def peak_memory_mb(device):
    """Peak memory of this process in MiB: allocated on an accelerator, the resident set on the CPU."""
    if device.type in ("cuda", "mlu"):
        return getattr(torch, device.type).max_memory_allocated(device) / 2**20
    import resource  # CPU: the process's peak resident set, in KiB on Linux

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_once(lock_path, ready, build):
    """ready() when it finds the thing built (anything but None); else, under an exclusive lock on lock_path
    (flock: the kernel releases it when its holder dies, so a killed build never blocks the next), ready() again,
    since the process we waited for may have built it, and else build(). So one process of a machine builds (a
    native extension, a json index, the demo data) while the others wait, then find it. OSError if lock_path's
    folder cannot be made or written."""
    found = ready()
    if found is not None:
        return found
    os.makedirs(os.path.dirname(lock_path) or ".", exist_ok=True)
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = ready()
        return found if found is not None else build()


class OutputError(config.UserError, OSError):
    """An output file that cannot be written for a reason the user fixes (a full disk or quota, a read-only or
    unwritable folder); .errno and .strerror are the OSError's, the message names the file and its folder."""

    def __str__(self):  # the message, not OSError's "[Errno 28] ..." form that setting .errno brings
        return self.args[0]


_USERS_TO_FIX = {errno.ENOSPC: "free space there", errno.EDQUOT: "free space there or raise the quota",
                 errno.EFBIG: "free space there or write to another file system", errno.EROFS: "choose another folder",
                 errno.EACCES: "make it writable or choose another folder", errno.EPERM: "choose another folder"}


def atomic_write(path, write, mode="wb"):
    """write(f) into a temporary file beside path, then fsync and rename it to path: readers see the old file or
    the whole new one, never a part. On failure the temporary file is removed and the error raised; a full disk or
    quota (ENOSPC, EDQUOT, EFBIG) or an unwritable folder as an OutputError (a config.UserError) naming the folder."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        # torch.save's zip writer raises a RuntimeError whose context is the OSError (a full disk as it closes)
        cause = e if isinstance(e, OSError) else e.__context__ if isinstance(e, RuntimeError) else None
        if isinstance(e, OutputError) or not isinstance(cause, OSError) or cause.errno not in _USERS_TO_FIX:
            raise
        folder = os.path.dirname(os.path.abspath(path))
        error = OutputError(f"cannot write {os.path.basename(path)} in {folder}: {cause.strerror} (errno "
                            f"{cause.errno}); no partial file was left: {_USERS_TO_FIX[cause.errno]}, then run again")
        error.errno, error.strerror, error.filename = cause.errno, cause.strerror, path
        raise error from None


def makedirs(path):
    """os.makedirs(path, exist_ok=True) that returns the folders it made, deepest first (for remove_made); on
    failure it removes those it made, then raises."""
    missing, p = [], os.path.abspath(path)
    while not os.path.lexists(p):
        missing.append(p)
        p = os.path.dirname(p)
    try:
        os.makedirs(path, exist_ok=True)
    except BaseException:
        remove_made(missing)
        raise
    return missing


def remove_made(folders):
    """Remove the folders makedirs made, deepest first, each only while empty (whatever was put in them stays)."""
    for folder in folders:
        with contextlib.suppress(OSError):
            os.rmdir(folder)


@contextlib.contextmanager
def output_dir(path, rank=0):
    """The run's output folder, held for the run's life by rank 0 (the process that writes there): made if absent,
    refused in one paragraph when it cannot be (a file, a read-only parent, a name too long), and locked (flock on
    path/.lock: the kernel frees it when its holder dies, so kill -9 leaves no stale lock and --resume works), so
    that a second run into the same folder stops at once, naming the holder. The lock file goes when the run ends.
    A run that fails before writing anything there removes every folder it made (the parents too)."""
    if rank != 0:
        yield
        return
    made, lock_path = [], os.path.join(path, ".lock")
    try:
        made = makedirs(path)
        lock, holder = _take(lock_path)
    except OSError as e:
        remove_made(made)
        if os.path.isfile(path) or isinstance(e, (FileExistsError, NotADirectoryError)):
            what = "is a file, not a folder: choose another output_dir=, or move the file"
        else:
            what = f"cannot be made or written ({e.strerror or e}): choose another output_dir=, or make it writable"
        raise config.ConfigError(f"output_dir={path} {what}") from None
    if lock is None:
        raise config.ConfigError(f"output_dir={path} is in use by another run ({holder}): two runs in one folder "
                                 f"would mix their checkpoints and logs. Wait for it to end, or choose another "
                                 f"output_dir=") from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}, since {datetime.datetime.now():%Y-%m-%d %H:%M:%S}\n")
    lock.flush()
    try:
        yield
    except BaseException:
        if made and os.listdir(path) == [".lock"]:  # failed before writing anything
            shutil.rmtree(path, ignore_errors=True)
            remove_made(made[1:])
        raise
    finally:
        with contextlib.suppress(OSError):
            os.remove(lock_path)  # still held: a run that opened it since finds it gone (_take) and retries
        lock.close()


def _take(lock_path):
    """(the lock file, opened and flocked by us, None) or (None, who holds it) when another live process does. A
    file that its holder removed between our open and our flock is not the lock any more: open again."""
    while True:
        lock = open(lock_path, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or "a process that has not said who it is"
            lock.close()
            return None, holder
        try:
            if os.path.samestat(os.fstat(lock.fileno()), os.stat(lock_path)):
                return lock, None
        except FileNotFoundError:
            pass
        lock.close()


def user_message(e):
    """The message of a user error; one raised in a DataLoader worker comes back wrapped by torch with the
    worker's traceback (torch/_utils.py, ExceptionWrapper): keep only the original message."""
    msg = str(e)
    if "Original Traceback" in msg:
        for name in (f"{type(e).__module__}.{type(e).__qualname__}", type(e).__qualname__):
            i = msg.rfind(f"\n{name}: ")
            if i >= 0:
                return msg[i + len(name) + 3:].strip()
    return msg


def run_cli(main):
    """Run a script's main; a mistake that is the user's to fix (config.UserError: config, data, checkpoint,
    device; a non-finite loss) ends in one paragraph on stderr and exit code 2, in every process that meets it,
    while an internal bug keeps its traceback."""
    try:
        main()
    except (config.UserError, FloatingPointError) as e:
        print(f"error: {user_message(e)}", file=sys.stderr, flush=True)
        sys.exit(2)
