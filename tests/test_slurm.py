"""`textrefiner-sweep --executor slurm`: the sbatch options it writes (no cluster needed), then a
real one-node Slurm (tests/slurm_cluster.py: munged, slurmctld and slurmd from a temporary
configuration, as root, accounting disabled): a sweep through Slurm gives the local accuracies,
a job requeued in the middle of training ends bit-identical to an uninterrupted run, a failing
run is reported with its log, `--status` reads the queue without accounting, and a run of two
tasks trains as one process."""
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from textrefiner.errors import UserError
from textrefiner.sweep import slurm
from textrefiner.sweep.plan import Run, run_finished

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from slurm_cluster import LocalSlurm, unavailable, wait_for  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 1200  # seconds a test waits for its jobs: generous, for a slow shared machine


def slurm_args(*argv):
    """textrefiner-sweep's arguments (SPEC first, or spec.yaml)."""
    from textrefiner.sweep.cli import build_parser
    argv = list(argv) if argv and not argv[0].startswith("-") else ["spec.yaml", *argv]
    return build_parser().parse_args(argv + ["--executor", "slurm"])


def a_run(trainer="CoOp", kind="train", gpus=1, key="k", after=None, argv=(), out="/tmp/x"):
    return Run(key, os.path.join(out, key), tuple(argv), after, trainer, kind, gpus)


# ------------------------------------------------------------------------ options, no cluster
@pytest.mark.parametrize("text, minutes", [("90", 90), ("1:30:00", 90), ("0:00:30", 1),
                                           ("2-00:00:00", 2880), ("1-12", 2160)])
def test_time_limits_read_as_slurm_writes_them(text, minutes):
    assert slurm.parse_time(text) == minutes


@pytest.mark.parametrize("text", ["1h", "", "0", "1:2:3:4"])
def test_a_time_limit_slurm_cannot_read_is_one_clear_error(text):
    with pytest.raises(UserError, match="--time"):
        slurm.parse_time(text)


def test_memory_sizes():
    assert [slurm.parse_mem(t) for t in ("64G", "64GB", "512M", "1T", "8")] == [64, 64, 0.5,
                                                                               1024, 8]
    with pytest.raises(UserError, match="--mem lots"):
        slurm.parse_mem("lots")


def test_per_method_defaults_promptkd_needs_more_than_coop_and_zero_shot_little():
    args = slurm_args()
    coop, kd, zs = (slurm.resources(a_run(t), args) for t in ("CoOp", "PromptKD", "ZeroshotCLIP"))
    assert kd.mem_gb > coop.mem_gb > zs.mem_gb and kd.time > coop.time > zs.time
    assert coop.gpus_per_node == 1 and coop.tasks_per_node == 1
    table = slurm.describe([a_run("CoOp"), a_run("CoOp", "test"), a_run("PromptKD")], args)
    assert "PromptKD train" in table and f"--mem={kd.mem_gb:g}GB" in table
    assert f"--time={kd.time}" in table and "CoOp test" in table


def test_every_option_becomes_its_sbatch_line(tmp_path):
    """The job script submitit writes from the options (the README's table)."""
    from submitit.slurm.slurm import _make_sbatch_string
    args = slurm_args("--partition", "gpu", "--account", "lab", "--qos", "high", "--time",
                      "12:00:00", "--gpus-per-run", "4", "--cpus-per-task", "6", "--mem", "80G",
                      "--constraint", "a100", "--array-parallelism", "3", "--slurm",
                      "mail-type=FAIL", "--slurm", "exclusive")
    res = slurm.resources(a_run(gpus=args.gpus_per_run), args)
    script = _make_sbatch_string("cmd", tmp_path, map_count=10,
                                 **slurm.executor_parameters(res, args))
    for line in ["--partition=gpu", "--account=lab", "--qos=high", "--time=720",
                 "--gpus-per-node=4", "--ntasks-per-node=4", "--cpus-per-task=6", "--mem=80GB",
                 "--constraint=a100", "--array=0-9%3", "--mail-type=FAIL", "--exclusive",
                 "--signal=USR2@90", "--nodes=1"]:
        assert f"#SBATCH {line}" in script.splitlines(), line
    # a test run evaluates on one GPU, one task
    test = slurm.resources(a_run(kind="test", gpus=4), args)
    assert (test.gpus_per_node, test.tasks_per_node) == (1, 1)


def test_several_nodes_share_the_gpus_one_task_per_gpu():
    res = slurm.resources(a_run(gpus=16), slurm_args("--nodes", "2"))
    assert (res.nodes, res.gpus_per_node, res.tasks_per_node) == (2, 8, 8)
    with pytest.raises(UserError, match="--gpus-per-run 3 on --nodes 2"):
        slurm.resources(a_run(gpus=3), slurm_args("--nodes", "2"))
    cpu = slurm.resources(a_run(gpus=1), slurm_args("--no-gpu", "--tasks-per-node", "2"))
    assert (cpu.gpus_per_node, cpu.tasks_per_node) == (0, 2)


def test_ranks_and_rendezvous_come_from_slurms_environment(monkeypatch):
    calls = []

    def hostnames(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 0, "node3\nnode4\n", "")

    monkeypatch.setattr(slurm.subprocess, "run", hostnames)
    env = slurm.distributed_env({"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
                                 "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node[3-4]",
                                 "SLURM_JOB_ID": "1234"})
    assert env == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "node3", "MASTER_PORT": str(15000 + 1234)}
    assert calls == [["scontrol", "show", "hostnames", "node[3-4]"]]
    assert slurm.distributed_env({"SLURM_NTASKS": "1"}) == {}


def test_the_dry_run_prints_each_kind_of_jobs_sbatch_options(capsys):
    from textrefiner.sweep.cli import main
    assert main(["paper-table1", "--out", "unused", "--dry-run", "--executor", "slurm",
                 "--partition", "gpu", "--time", "2:00:00"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"PromptKD train +--time=120 --mem=64GB .*--gpus-per-node=1 "
                     r"--partition=gpu", text)
    assert re.search(r"CoOp train +--time=120 --mem=32GB", text)
    assert re.search(r"ZeroshotCLIP test +--time=120 --mem=16GB", text)


def test_without_squeue_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match="no squeue here"):
        slurm.queue()


def test_the_cluster_tests_say_why_they_skip(monkeypatch):
    import slurm_cluster
    monkeypatch.setattr(slurm_cluster.shutil, "which", lambda name: None)
    monkeypatch.setattr(slurm_cluster.os.path, "exists", lambda path: False)
    assert "apt-get install slurm-wlm munge" in unavailable()
    monkeypatch.setattr(slurm_cluster.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(slurm_cluster.os, "geteuid", lambda: 1000)
    assert unavailable() == "starting slurmctld, slurmd and munged needs root"


@pytest.fixture
def job_signals():
    """The job's signal handlers (SlurmRun installs its own), put back after the test."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR2)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_a_job_requeued_by_submitit_leaves_as_submitit_expects(demo, tmp_path, monkeypatch,
                                                               job_signals):
    """submitit's USR2 handler requeues the job and exits (sys.exit(-1)) wherever the run stands:
    that exit reaches submitit (no exception for it to record), the run records no outcome (so
    --status shows it queued), and the requeued job resumes and finishes. A SIGTERM (scontrol
    requeue) leaves the same way, with 143; a run that fails still raises."""
    from textrefiner.sweep import worker
    spec = write_spec(tmp_path / "spec.yaml", demo, epochs=2)
    train = plan(spec, tmp_path / "out")[2]
    calls = []

    def submitit_handler(signum, frame):  # what submitit's does, less `scontrol requeue`
        calls.append(signum)
        sys.exit(-1)

    signal.signal(signal.SIGUSR2, submitit_handler)
    monkeypatch.setenv("TEXTREFINER_PAUSE_AT", "epoch=1")
    # the signal arrives while the run holds after epoch 1
    monkeypatch.setattr("textrefiner.faults.signal.pause",
                        lambda: os.kill(os.getpid(), signal.SIGUSR2))
    with pytest.raises(SystemExit) as left:
        slurm.SlurmRun()(train)
    assert isinstance(left.value, worker.Requeued) and left.value.code == -1
    assert calls == [signal.SIGUSR2]
    assert not os.path.exists(train.status_file)  # no outcome: queued, not failed
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # Slurm's SIGTERM follows
    states = slurm.run_states([train], str(tmp_path / "out"), {})
    assert states[train.key].state == slurm.TODO  # not failed (on Slurm: its job is queued)
    # scontrol requeue: SIGTERM while the run holds
    monkeypatch.setattr("textrefiner.faults.signal.pause",
                        lambda: os.kill(os.getpid(), signal.SIGTERM))
    monkeypatch.setenv("TEXTREFINER_PAUSE_AT", "epoch=2,batch=1")
    with pytest.raises(SystemExit) as left:
        slurm.SlurmRun()(train)
    assert not isinstance(left.value, worker.Requeued) and left.value.code == 143
    assert not os.path.exists(train.status_file)
    monkeypatch.delenv("TEXTREFINER_PAUSE_AT")
    assert slurm.SlurmRun()(train) == 0  # the requeued job: resumes from epoch 1, finishes
    log = open(os.path.join(train.output_dir, "log.txt")).read()
    assert len(re.findall(r"Resumed from epoch 1\b", log)) == 2 and run_finished(train)
    bad = plan(spec, tmp_path / "bad")[2]
    bad = Run(bad.key, bad.output_dir, bad.argv + ("OPTIM.NO_SUCH_KEY", "1"), None, "CoOp",
              "train", 1)
    with pytest.raises(RuntimeError, match="failed"):
        slurm.SlurmRun()(bad)
    assert json.load(open(bad.status_file))["state"] == "failed"


# ------------------------------------------------------------------------ the cluster
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A one-node Slurm for this module's tests; SLURM_CONF set while they run."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as env, pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", env["SLURM_CONF"])
        yield env


SPEC = """\
protocol: base2new
datasets: [synthetic_shapes]
methods:
  - {{method: ZeroshotCLIP, seeds: [1]}}
  - CoOp+TR
seeds: [1]
config: demo_tiny
engine: {engine}
root: {root}
overrides: {{MODEL.BACKBONE.PATH: {clip}, OPTIM.MAX_EPOCH: {epochs}}}
"""


def write_spec(path, demo, epochs=10, engine="standalone"):
    path.write_text(SPEC.format(root=demo["root"], clip=demo["clip"], epochs=epochs,
                                engine=engine))
    return str(path)


def plan(spec, out):
    from textrefiner.sweep.spec import expand, load_spec
    return expand(load_spec(spec), str(out))


# One CPU per job, no GPU, little memory: the local node has the machine's CPUs and 4000 MB.
CPU_JOBS = ["--executor", "slurm", "--no-gpu", "--cpus-per-task", "1", "--mem", "500M",
            "--time", "30", "--poll", "1"]


def cpu_args(spec, out, *more):
    return slurm_args(spec, "--out", str(out), *CPU_JOBS[2:], *more)


def accuracies(run):
    with open(os.path.join(run.output_dir, "log.txt")) as f:
        return re.findall(r"\* accuracy: ([\d.]+)%", f.read())


def job_info(job, env):
    return subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True,
                          env=env).stdout


def one_seed_demo(path):
    """The shipped demo sweep with one seed: its 6 runs (zero-shot on base and new classes, CoOp
    and CoOp + TR each a training run and its test run) take every path its 14 take."""
    from importlib import resources
    text = resources.files("textrefiner.sweep").joinpath("specs", "demo.yaml").read_text()
    assert "seeds: [1, 2, 3]\n" in text
    path.write_text(text.replace("seeds: [1, 2, 3]\n", "seeds: [1]\n"))
    return str(path)


@pytest.mark.slow
def test_demo_sweep_through_slurm_gives_the_local_accuracies(cluster, tmp_path, capsys):
    """The demo sweep through `textrefiner-sweep --executor slurm` and through the local
    executor (one seed: 6 runs; the plan of the shipped 14 is checked dry)."""
    from textrefiner.sweep.cli import main
    assert main(["demo", "--out", str(tmp_path / "plan"), "--dry-run"] + CPU_JOBS) == 0
    printed = capsys.readouterr().out
    assert "14 runs in all: 0 finished, 14 to do" in printed
    assert "CoOp train" in printed and "--cpus-per-task=1" in printed
    spec = one_seed_demo(tmp_path / "demo.yaml")
    out = tmp_path / "slurm"
    sweep = [str(spec), "--out", str(out)]
    assert main(sweep + CPU_JOBS) == 0
    printed = capsys.readouterr().out
    runs = plan(str(spec), out)
    n = len(runs)
    assert n == 6
    jobs = slurm.read_jobs(str(out))
    assert sorted(jobs) == sorted(r.key for r in runs)
    for run in runs:
        assert f"job {jobs[run.key]}: {run.key}" in printed
    # the runs that wait for nothing: one array; a test run after its training run's job
    trains = [r for r in runs if r.kind == "train"]
    assert len({jobs[r.key].split("_")[0] for r in runs if r.after is None}) == 1
    for run in runs:
        if run.after:
            assert f"afterok:{jobs[run.after]}" in job_info(jobs[run.key], cluster)
    # submitting again while they wait or run adds nothing
    assert main(sweep + CPU_JOBS) == 0
    assert "0 to submit" in capsys.readouterr().out and slurm.read_jobs(str(out)) == jobs
    slurm.follow(runs, str(out), poll=1, timeout=TIMEOUT)  # the test's own time limit
    capsys.readouterr()
    assert main(sweep + CPU_JOBS + ["--wait"]) == 0
    waited = capsys.readouterr()
    assert f"[sweep] {n}/{n} finished, 0 running, 0 queued, 0 failed" in waited.err
    assert (out / "report" / "results.md").is_file()
    assert all(run_finished(run) for run in runs) and trains
    # the same sweep through the local executor
    local = tmp_path / "local"
    assert main([str(spec), "--out", str(local)]) == 0
    capsys.readouterr()
    assert [accuracies(r) for r in runs] == [accuracies(r) for r in plan(str(spec), local)]
    assert all(accuracies(r) for r in runs)
    assert (out / "report" / "results.md").read_text() == \
        (local / "report" / "results.md").read_text().replace(str(local), str(out))
    # finished: nothing to submit, and --status says so (squeue only: there is no accounting)
    assert subprocess.run(["sacct"], capture_output=True, env=cluster).returncode != 0
    assert main(sweep + CPU_JOBS) == 0
    assert f"{n} finished, 0 queued or running, 0 to submit" in capsys.readouterr().out
    assert main(sweep + CPU_JOBS + ["--status"]) == 0
    assert f"finished {n} running 0 queued 0 failed 0 todo 0 of {n}" in capsys.readouterr().out


def test_wait_submits_what_is_neither_finished_nor_queued_then_waits(cluster, demo, tmp_path,
                                                                      capsys):
    """`--wait` on a sweep never submitted: as `sbatch --wait`, it submits, then follows."""
    from textrefiner.sweep.cli import main
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(root=demo["root"], clip=demo["clip"], epochs=1,
                                engine="standalone").replace("  - CoOp+TR\n", ""))
    out = tmp_path / "out"
    runs = plan(str(spec), out)
    assert main([str(spec), "--out", str(out), *CPU_JOBS, "--wait"]) == 0
    printed = capsys.readouterr()
    assert f"{len(runs)} runs: 0 finished, 0 queued or running, {len(runs)} to submit" \
        in printed.out
    assert f"[sweep] {len(runs)}/{len(runs)} finished, 0 running, 0 queued, 0 failed" \
        in printed.err
    assert sorted(slurm.read_jobs(str(out))) == sorted(r.key for r in runs)
    assert all(run_finished(run) for run in runs) and (out / "report" / "results.md").is_file()


def test_status_shows_queued_and_running_runs_from_squeue(cluster, demo, tmp_path, capsys):
    spec = write_spec(tmp_path / "spec.yaml", demo)
    out = tmp_path / "out"
    runs = plan(spec, out)[2:]  # CoOp+TR: training, then its test
    hold = subprocess.run(["sbatch", "--parsable", "--hold", "--wrap", "true"], env=cluster,
                          capture_output=True, text=True, check=True).stdout.strip()
    try:  # both runs wait for a held job: queued, with a job id each
        slurm.submit(runs, cpu_args(spec, out, "--slurm", f"dependency=afterok:{hold}"))
        capsys.readouterr()
        assert slurm.status(runs, cpu_args(spec, out)) == 0
        text = capsys.readouterr().out
        assert "finished 0 running 0 queued 2 failed 0 todo 0 of 2" in text
        jobs = slurm.read_jobs(str(out))
        assert re.search(rf"queued +job {jobs[runs[0].key]} +{re.escape(runs[0].key)}", text)
    finally:
        subprocess.run(["scancel", hold] + list(slurm.read_jobs(str(out)).values()),
                       env=cluster)
    wait_for(lambda: not (set(slurm.read_jobs(str(out)).values()) & set(slurm.queue())),
             "the cancelled jobs to leave the queue")
    capsys.readouterr()
    assert slurm.status(runs, cpu_args(spec, out)) == 1  # cancelled: failed, with the rerun line
    text = capsys.readouterr().out
    assert "failed 2" in text and f"rerun: {runs[0].command()}" in text


def test_a_failing_run_is_reported_with_its_log_and_its_test_run_dropped(cluster, demo, tmp_path,
                                                                          capsys):
    spec = write_spec(tmp_path / "spec.yaml", demo)
    out = tmp_path / "out"
    runs = plan(spec, out)[2:]
    bad = Run(runs[0].key, runs[0].output_dir, runs[0].argv + ("OPTIM.NO_SUCH_KEY", "1"),
              None, runs[0].trainer, runs[0].kind, runs[0].gpus)
    runs = [bad, runs[1]]
    slurm.submit(runs, cpu_args(spec, out))
    states = slurm.follow(runs, str(out), poll=1, timeout=TIMEOUT)
    assert [states[r.key].state for r in runs] == ["failed", "failed"]
    text = capsys.readouterr()
    text = text.out + text.err
    status = json.loads(open(os.path.join(bad.output_dir, "sweep_status.json")).read())
    assert status["state"] == "failed" and "NO_SUCH_KEY" in status["error"]
    assert f"FAILED {bad.key}" in text and "NO_SUCH_KEY" in text
    assert bad.log in text and f"rerun: {bad.command()}" in text
    assert f"{runs[1].key}: its training run" in text  # Slurm dropped the test run


@pytest.mark.parametrize("engine", ["standalone", pytest.param("dassl", marks=pytest.mark.skipif(
    importlib.util.find_spec("dassl") is None, reason="Dassl.pytorch is not installed"))])
@pytest.mark.parametrize("how", ["signal", "requeue"])
def test_a_job_interrupted_in_the_middle_of_training_ends_bit_identical(cluster, demo, tmp_path,
                                                                        monkeypatch, how, engine,
                                                                        epochs=4):
    """The job holds after epoch 1 and its checkpoint (TEXTREFINER_PAUSE_AT, which the job's
    environment inherits from the submission), then gets Slurm's warning signal (USR2, as
    `--signal` sends it before the time limit or a preemption: submitit requeues the job) or is
    requeued by `scontrol requeue` (SIGTERM, then SIGKILL after KillWait). It comes back, resumes
    from its last checkpoint (after the hold's point, so it does not hold again), and ends with
    the weights and optimiser state of a run never interrupted, on a fast machine as on a slow
    one. On both engines: each leaves a checkpoint after every epoch (Dassl's own
    TRAIN.CHECKPOINT_FREQ is 0), and the finished run leaves the files of its codebase."""
    spec = write_spec(tmp_path / "spec.yaml", demo, epochs=epochs, engine=engine)
    out = tmp_path / "slurm"
    train = plan(spec, out)[2]
    monkeypatch.setenv("TEXTREFINER_PAUSE_AT", "epoch=1")
    # the job sums with one thread, as this process (conftest) does for the run compared below
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    slurm.submit([train], cpu_args(spec, out))
    monkeypatch.delenv("TEXTREFINER_PAUSE_AT")
    assert torch.get_num_threads() == 1
    job = slurm.read_jobs(str(out))[train.key]

    def holds():
        return os.path.isfile(train.log) and "TEXTREFINER_PAUSE_AT=epoch=1: process" in open(
            train.log).read()
    wait_for(holds, "the job to hold after epoch 1 (its sweep.log)", timeout=TIMEOUT)
    saved = os.listdir(os.path.join(train.output_dir, "prompt_learner"))
    assert "model.pth.tar-1" in saved and "model.pth.tar-2" not in saved, saved
    command = (["scancel", "--signal", "USR2", job] if how == "signal"
               else ["scontrol", "requeue", job])
    subprocess.run(command, env=cluster, check=True)
    # Slurm holds a requeued job back for a while (its begin time): let it start now, once the
    # interrupted incarnation's processes are gone (started beside them, the new one was
    # terminated with them now and then)
    wait_for(lambda: re.search(r"JobState=PENDING Reason=BeginTime.*Restarts=1",
                               job_info(job, cluster), re.S), "the job's requeue",
             timeout=TIMEOUT)
    wait_for(lambda: subprocess.run(["pgrep", "-f", rf"slurmstepd: \[{job}\."]).returncode == 1,
             "the interrupted job's steps to end", timeout=TIMEOUT)
    # requeued, not failed: no outcome recorded, in the queue for --status (queued, or running
    # once its begin time has passed), no error for submitit
    assert not os.path.exists(train.status_file)
    assert slurm.run_states([train], str(out))[train.key].state in (slurm.QUEUED, slurm.RUNNING)
    assert "triggered an exception" not in open(slurm.job_log(str(out), job)).read()
    start_now = subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"],
                               env=cluster, capture_output=True, text=True)
    # refused only when its begin time passed first (a slow machine) and it left PENDING
    assert start_now.returncode == 0 or "JobState=PENDING" not in job_info(job, cluster), \
        start_now.stderr
    states = slurm.follow([train], str(out), poll=1, timeout=TIMEOUT)
    assert states[train.key].state == "finished"
    log = open(os.path.join(train.output_dir, "log.txt")).read()
    resumed = re.findall(r"Resumed (?:from epoch |\S+ from \S+ \(epoch = )(\d+)", log)
    assert len(resumed) == 1 and 1 <= int(resumed[0]) < epochs, \
        f"the job did not stop in the middle of training: resumed from {resumed}"
    from textrefiner.train import main
    alone = plan(spec, tmp_path / "alone")[2]
    assert main(list(alone.argv)) == 0
    a, b = (torch.load(os.path.join(r.output_dir, "prompt_learner", f"model.pth.tar-{epochs}"),
                       weights_only=False) for r in (alone, train))
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for slot, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value),
                               torch.as_tensor(b["optimizer"]["state"][slot][name])), name
    assert accuracies(alone) == accuracies(train)
    assert "triggered an exception" not in open(slurm.job_log(str(out), job)).read()
    assert sorted(os.listdir(os.path.join(train.output_dir, "prompt_learner"))) == \
        sorted(os.listdir(os.path.join(alone.output_dir, "prompt_learner"))) == \
        ["checkpoint", f"model.pth.tar-{epochs}"]


def test_two_tasks_train_as_one_process(cluster, demo, tmp_path):
    """A job of 2 tasks on the node (2 ranks, gloo): the torchrun path with ranks from Slurm."""
    from test_distributed import assert_same_run, coop_args
    from textrefiner.train import main
    one = tmp_path / "one"
    assert main(coop_args(demo, one, 8)) == 0
    many = tmp_path / "many"
    run = Run("many", str(many), tuple(coop_args(demo, many, 4)), None, "CoOp", "train", 1)
    args = cpu_args("spec", tmp_path, "--tasks-per-node", "2", "--mem", "1G")
    slurm.submit([run], args)
    states = slurm.follow([run], str(tmp_path), poll=1, timeout=TIMEOUT)
    assert states[run.key].state == "finished"
    assert_same_run(one, many, epoch=2)
    assert (many / "log.txt").read_text().count("* accuracy:") == 1  # rank 0 writes
