"""tools/slurm_train.sh under a real scheduler: the one-node SLURM cluster that .ci/run starts on this machine
(slurmctld and slurmd on localhost). SIGTERM to the batch shell, as SLURM sends it before the time limit, must lead
to a checkpoint, a requeue, and a resumed start that ends with exactly the weights of an uninterrupted run. Skips,
saying why, where no scheduler answers."""
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

from conftest import HERE, TINY, train_cmd

SCRIPT = os.path.join(HERE, "tools", "slurm_train.sh")
COMMON = ["max_iter=20", "checkpoint_period=100", "vis_images=0"]  # the only checkpoint before the end: the stop's


def slurm_node():
    """None when sbatch has an idle node to run on, else why not."""
    if not shutil.which("sbatch"):
        return "no sbatch here (.ci/run installs and starts slurm-wlm as root)"
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 20 s: slurmctld is not running"
    if not re.search(r"\b(idle|mixed)\b", out.stdout):
        return f"no idle SLURM node: sinfo says {(out.stdout + out.stderr).strip()!r}"
    return None


def job_fields(job):
    """{field: value} of `scontrol show job` (sacct needs slurmdbd, which a one-machine cluster lacks)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=20).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


@pytest.mark.slow
def test_sigterm_requeues_and_the_resumed_job_ends_with_the_uninterrupted_weights(demo_root, tmp_path):
    reason = slurm_node()
    if reason:
        pytest.skip(reason)
    ref, out, log, ref_log = tmp_path / "ref", tmp_path / "slurm", tmp_path / "job.out", tmp_path / "ref.out"
    # One thread each: the reference trains beside the job on the other core, and the weights match bit for bit.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable, FRCNN_DIR=HERE, CONFIG="demo",
               OUTPUT_DIR=str(out), GPUS_PER_NODE="1")
    overrides = [f"data_root={demo_root}", *TINY, *COMMON]
    job = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=1", f"--chdir={tmp_path}", f"--output={log}",
                          SCRIPT, *overrides], env=env, capture_output=True, text=True, timeout=60)
    assert job.returncode == 0, job.stderr
    job, start, states = job.stdout.strip().split(";")[0], time.time(), []
    reference = subprocess.Popen(train_cmd(demo_root, ref, *COMMON), env=env, cwd=HERE, stdout=open(ref_log, "w"),
                                 stderr=subprocess.STDOUT)
    try:
        while not (out / "log.txt").exists() or "iter 2/" not in (out / "log.txt").read_text():
            assert time.time() - start < 120, f"job {job} not training after 120 s: {job_fields(job)}"
            time.sleep(0.2)
        # What SLURM does at --signal=B:TERM@N before the time limit: SIGTERM to the batch shell alone.
        subprocess.run(["scancel", "--batch", "--signal=TERM", job], check=True, timeout=20)
        fields = {}
        while fields.get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            assert time.time() - start < 170, f"job {job} not done after 170 s: {states}"
            fields = job_fields(job)
            state = (fields.get("JobState"), fields.get("Restarts"))
            if not states or states[-1][1:] != state:
                states.append((round(time.time() - start), *state))
            time.sleep(0.3)
        assert reference.wait(timeout=120) == 0, ref_log.read_text()[-3000:]
    finally:
        subprocess.run(["scancel", job], timeout=20)
        if reference.poll() is None:
            reference.kill()
    text = log.read_text()
    print(f"job {job}: (seconds, JobState, Restarts) {states}; ExitCode {fields.get('ExitCode')}")
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1" and fields["ExitCode"] == "0:0", text
    assert ("PENDING", "1") in [s[1:] for s in states]  # requeued, not restarted some other way
    stopped = re.findall(r"train: SIGTERM at iteration (\d+): checkpoint written", text)
    assert len(stopped) == 1 and 2 <= int(stopped[0]) < 20, text
    assert "train: 1 process(es) on cpu" in text and f"resumed from iteration {stopped[0]}" in text, text
    assert "rank 0's train.py 143, JobState=RUNNING" in text and f"requeueing job {job}" in text, text
    assert text.count(f"slurm_train.sh: job {job} start") == 2  # one log, appended to by the requeued start
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    versions = [r["versions"] for r in records if "versions" in r]
    assert versions == [{"python": platform.python_version(), "torch": torch.__version__}] * 2  # this interpreter
    final, expected = (torch.load(d / "model_final.pth", weights_only=True)["model"] for d in (out, ref))
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in expected)
