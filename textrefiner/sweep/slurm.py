"""`textrefiner-sweep SPEC --executor slurm`: a sweep's runs as Slurm jobs, through submitit.

* Submission: the runs that are neither finished nor in the queue. Runs that wait for nothing go
  in job arrays (one per set of resources); a test run waits for its training run's job
  (`--dependency=afterok:<job>`, `--kill-on-invalid-dep=yes`: if that job fails, Slurm removes
  the test job). Every job id goes into OUT/.sweep/slurm_jobs.json (run key -> job id), so
  submitting again adds only what is missing, and a second submission at the same time waits for
  the first (a lock on that file).
* Each job runs `execute_run(run)` (textrefiner/sweep/worker.py), the code path of
  `textrefiner-train`, inside a submitit `Checkpointable`: on Slurm's warning signal before the
  time limit or a preemption (`--signal USR2@90`, submitit's handler), or after
  `scontrol requeue` (its SIGTERM stops the run at once), the job goes back in the queue and
  the run resumes from the last checkpoint in its folder (every epoch leaves one, on both
  engines), ending as it would uninterrupted. Neither is a failure: the job leaves as submitit
  expects of a requeued job (`_requeue`, `_stop`), and the run records no outcome.
* `--wait` first submits what is neither finished nor queued, as `sbatch --wait` does.
* A run with several tasks (GPUs per run > 1, or several nodes) runs the torchrun path of
  textrefiner/distributed.py: one task per GPU, ranks and rendezvous from Slurm's environment
  (`distributed_env`).
* Status (`--status`, `--wait`) reads the queue (`squeue`) and the run folders only, so it works
  without Slurm's accounting (no `sacct`).
"""
import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from ..errors import UserError
from .worker import STOPPED

try:
    import submitit
    from submitit.helpers import Checkpointable
except ImportError:  # the `slurm` extra is not installed: submit() says so
    submitit = None
    Checkpointable = object

# Resources per method of a training run: time limit (minutes), memory (GB), CPUs per task.
# PromptKD distils from a ViT-L/14 teacher (both CLIPs in memory, 20 epochs over the unlabelled
# training set); PromptSRC and CoCoOp train 20 / 10 epochs with a per-image text pass; zero-shot
# CLIP only evaluates.
METHOD_RESOURCES = {
    "ZeroshotCLIP": (60, 16, 4),
    "CoOp": (240, 32, 8),
    "MaPLe": (240, 32, 8),
    "CoCoOp": (480, 32, 8),
    "PromptSRC": (480, 48, 8),
    "PromptKD": (720, 64, 8),
}
TEST_TIME, TEST_MEMORY = 60, 32  # an evaluation (PromptKD's: the student alone): at most these
# A job warned of its time limit (USR2) is requeued at most this many times (submitit's count).
MAX_TIMEOUTS = 10

JOBS_FILE = os.path.join(".sweep", "slurm_jobs.json")
SUBMITIT_FOLDER = os.path.join(".sweep", "slurm")
QUEUED, RUNNING, FINISHED, FAILED, TODO = "queued", "running", "finished", "failed", "todo"


# ----------------------------------------------------------------------------------- options
def add_slurm_args(parser):
    """The options of `--executor slurm` (cli.py calls this)."""
    group = parser.add_argument_group("Slurm (--executor slurm)")
    group.add_argument("--partition", help="sbatch --partition")
    group.add_argument("--account", help="sbatch --account")
    group.add_argument("--qos", help="sbatch --qos")
    group.add_argument("--time", help="time limit of every job, minutes or [D-]HH:MM:SS "
                                      "(sbatch --time; default per method, see --dry-run)")
    group.add_argument("--no-gpu", action="store_true",
                       help="jobs ask for no GPU (a CPU-only cluster or partition)")
    group.add_argument("--nodes", type=int, default=1,
                       help="nodes of each training run (sbatch --nodes; > 1: distributed)")
    group.add_argument("--tasks-per-node", type=int,
                       help="processes per node of a training run (sbatch --ntasks-per-node; "
                            "default: its GPUs per node, at least 1)")
    group.add_argument("--cpus-per-task", type=int, help="sbatch --cpus-per-task "
                                                         "(default per method)")
    group.add_argument("--mem", help="memory per node, e.g. 64G or 500M (sbatch --mem; default "
                                     "per method)")
    group.add_argument("--constraint", help="sbatch --constraint")
    group.add_argument("--array-parallelism", type=int,
                       help="most tasks of one job array running at once (sbatch --array=...%%N)")
    group.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                       help="any other sbatch option, as #SBATCH --KEY=VALUE (repeatable), "
                            "e.g. --slurm mail-type=FAIL --slurm exclude=node7")
    group.add_argument("--poll", type=float, default=30.0,
                       help="seconds between two looks at the queue with --wait")
    return group


def parse_time(text) -> int:
    """Minutes of a Slurm time limit: "90", "1:30:00", "2-00:00:00", "2-12"."""
    value = str(text).strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value)
    if not match or (match.group(1) is None and match.group(3) is not None
                     and match.group(4) is None):
        raise UserError(f"--time {text}: give minutes (90) or [D-]HH:MM:SS (1:30:00, "
                        "2-00:00:00).")
    days, first, second, third = (int(g) if g else 0 for g in match.groups())
    if match.group(1) is None and match.group(3) is None:
        minutes = first  # "90"
    else:
        minutes = days * 1440 + first * 60 + second + (third > 0)  # hours[:minutes[:seconds]]
    if minutes <= 0:
        raise UserError(f"--time {text}: the time limit must be at least one minute.")
    return minutes


def parse_mem(text) -> float:
    """GB of a memory size: "64G", "64GB", "500M", "1T", or a number of GB."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([MGT]?)B?\s*", str(text), re.IGNORECASE)
    if not match:
        raise UserError(f"--mem {text}: give a size such as 64G or 500M.")
    scale = {"M": 1 / 1024, "G": 1, "T": 1024, "": 1}[match.group(2).upper()]
    return float(match.group(1)) * scale


def parse_extra(items) -> dict:
    """--slurm KEY=VALUE pairs as sbatch options ({"mail-type": "FAIL"}); KEY alone: a flag."""
    extra = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not key:
            raise UserError(f"--slurm {item}: give KEY=VALUE, e.g. --slurm mail-type=FAIL.")
        extra[key] = value if sep else True
    return extra


# ----------------------------------------------------------------------------------- resources
@dataclass(frozen=True)
class Resources:
    """What one job asks Slurm for."""

    time: int
    mem_gb: float
    cpus_per_task: int
    gpus_per_node: int = 0
    nodes: int = 1
    tasks_per_node: int = 1
    extra: tuple = ()  # sorted (key, value) pairs: any other #SBATCH line

    def sbatch(self) -> dict:
        """The sbatch options (long names) this job gets, as submitit writes them."""
        options = {"time": self.time, "mem": _mem_text(self.mem_gb),
                   "cpus-per-task": self.cpus_per_task, "nodes": self.nodes,
                   "ntasks-per-node": self.tasks_per_node}
        if self.gpus_per_node:
            options["gpus-per-node"] = self.gpus_per_node
        options.update(dict(self.extra))
        return options


def _mem_text(mem_gb: float) -> str:
    return f"{int(mem_gb)}GB" if mem_gb == int(mem_gb) else f"{int(mem_gb * 1024)}MB"


def resources(run, args) -> Resources:
    """The run's resources: the method's defaults (a test run: at most an evaluation's), then
    the options."""
    time_min, mem, cpus = METHOD_RESOURCES.get(run.trainer, METHOD_RESOURCES["CoOp"])
    if run.kind == "test":
        time_min, mem = min(time_min, TEST_TIME), min(mem, TEST_MEMORY)
    gpus = _gpus(run, args)
    nodes = max(1, getattr(args, "nodes", 1) or 1) if run.kind == "train" else 1
    if gpus % nodes:
        raise UserError(f"--gpus-per-run {gpus} on --nodes {nodes}: give a number of GPUs that "
                        "the nodes share evenly (one process per GPU).")
    per_node = gpus // nodes
    tasks = getattr(args, "tasks_per_node", None) if run.kind == "train" else None
    tasks = tasks or max(1, per_node)
    extra = {"partition": args.partition, "account": args.account, "qos": args.qos,
             "constraint": args.constraint}
    extra = {key: value for key, value in extra.items() if value}
    extra.update(parse_extra(args.slurm or []))
    return Resources(time=parse_time(args.time) if args.time else time_min,
                     mem_gb=parse_mem(args.mem) if args.mem else mem,
                     cpus_per_task=args.cpus_per_task or cpus,
                     gpus_per_node=per_node, nodes=nodes, tasks_per_node=tasks,
                     extra=tuple(sorted(extra.items())))


def _gpus(run, args) -> int:
    """GPUs of the run's job: the plan's (--gpus-per-run), none with --no-gpu; a test run
    evaluates on one at most."""
    gpus = 0 if getattr(args, "no_gpu", False) else run.gpus
    return min(gpus, 1) if run.kind == "test" else gpus


def executor_parameters(res: Resources, args) -> dict:
    """submitit's SlurmExecutor parameters for `res`."""
    params = dict(time=res.time, mem=_mem_text(res.mem_gb), cpus_per_task=res.cpus_per_task,
                  nodes=res.nodes, ntasks_per_node=res.tasks_per_node, job_name="textrefiner")
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if getattr(args, "array_parallelism", None):
        params["array_parallelism"] = args.array_parallelism
    known = {"partition", "account", "qos", "constraint"}
    extra = dict(res.extra)
    params.update({key: extra.pop(key) for key in list(extra) if key in known})
    if extra:
        params["additional_parameters"] = extra
    return params


def describe(runs, args) -> str:
    """The dry run's table: what each kind of job asks for."""
    rows, seen = [], set()
    for run in runs:
        res = resources(run, args)
        label = f"{run.trainer} {run.kind}"
        if (label, res) in seen:
            continue
        seen.add((label, res))
        options = " ".join(f"--{key}={value}" if value is not True else f"--{key}"
                           for key, value in res.sbatch().items())
        rows.append(f"  {label:<20} {options}")
    return "Slurm jobs (sbatch options per kind of run):\n" + "\n".join(rows)


# ----------------------------------------------------------------------------------- the job
class SlurmRun(Checkpointable):
    """The function a job runs: one run of the sweep. A submitit Checkpointable: on its signal
    submitit requeues the job, which calls this again with the same run; textrefiner-train then
    resumes from the run folder's last checkpoint."""

    def __call__(self, run):
        _handle_signals()
        os.environ.update(distributed_env(os.environ))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if int(os.environ.get("RANK", "0")) > 0:
            from ..train import main  # the other ranks: the same training; rank 0 keeps the books
            code = main(list(run.argv))
        else:
            from .worker import execute_run
            # the ranks are Slurm's tasks: this one trains in-process (not through torchrun)
            code = execute_run(dataclasses.replace(run, gpus=1) if world > 1 else run)
        if code in STOPPED:  # stopped, not failed: no error for submitit to record
            sys.exit(code)
        if code != 0:  # the job fails, so that Slurm drops the runs that wait for it
            raise RuntimeError(f"{run.key} failed (exit code {code}); see "
                               f"{os.path.join(run.output_dir, 'sweep.log')}")
        return code


def _handle_signals():
    """SIGTERM stops the run (`_stop`); submitit's handler of its requeue signal (USR2) is wrapped
    so that its exit leaves the run as requeued (`_requeue`), never as failed."""
    signal.signal(signal.SIGTERM, _stop)
    requeue_signal = _requeue_signal()
    submitit_handler = signal.getsignal(requeue_signal)
    if callable(submitit_handler):
        signal.signal(requeue_signal, functools.partial(_requeue, submitit_handler))


def _requeue_signal():
    """The signal submitit requeues on: USR2, or $SUBMITIT_PREEMPT_SIGNAL."""
    try:
        from submitit.core.job_environment import JobEnvironment
        return JobEnvironment._usr_sig()
    except (ImportError, AttributeError):
        return signal.SIGUSR2


def _stop(signum, frame):
    """SIGTERM (scontrol requeue, scancel, a preemption, the time limit's end) stops the run at
    once, as by default; its checkpoints are in its folder (written atomically), so it loses at
    most the current epoch. submitit ignores SIGTERM so that its USR2 handler (Slurm's warning
    before the time limit, `--signal`) can requeue the job; that handler is `_requeue`'s."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not break the way out
    raise SystemExit(128 + signum)


def _requeue(submitit_handler, signum, frame):
    """submitit's handler checkpoints, runs `scontrol requeue` and exits (sys.exit(-1)); that exit
    goes on as `Requeued`, which the run lets through (no outcome) up to submitit, as submitit
    expects. The SIGTERM that Slurm sends the requeued job meanwhile is ignored: the job is
    already on its way out (and SIGKILL follows after KillWait)."""
    from .worker import Requeued
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        submitit_handler(signum, frame)  # returns on ranks > 0: they go on until stopped
    except SystemExit as exc:
        raise Requeued(exc.code) from None
    except BaseException:  # not requeued (e.g. too many time-outs): the run fails, as a run
        signal.signal(signal.SIGTERM, _stop)
        raise
    signal.signal(signal.SIGTERM, _stop)


def distributed_env(environ) -> dict:
    """torchrun's variables from Slurm's for a job of several tasks (srun): RANK, WORLD_SIZE,
    LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR (the job's first host), MASTER_PORT (from the job
    id). Empty for one task."""
    world = int(environ.get("SLURM_NTASKS", "1"))
    if world <= 1:
        return {}
    nodes = environ["SLURM_JOB_NODELIST"]
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True,
                           text=True, check=True).stdout.split()
    job = int(environ.get("SLURM_JOB_ID", "0"))
    return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": str(world),
            "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
            "LOCAL_WORLD_SIZE": str(world // int(environ.get("SLURM_JOB_NUM_NODES", "1"))),
            "MASTER_ADDR": hosts[0] if hosts else "127.0.0.1",
            "MASTER_PORT": str(15000 + job % 40000)}


# ----------------------------------------------------------------------------------- records
def sweep_out(runs) -> str:
    """The sweep's OUT: a run's folder is OUT/<its key>."""
    run = runs[0]
    return run.output_dir[:-len(run.key)].rstrip(os.sep) if runs else os.getcwd()


@contextlib.contextmanager
def _locked_jobs(out):
    """The run key -> job id record, locked against a second submission at the same time."""
    path = os.path.join(out, JOBS_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        jobs = read_jobs(out)
        try:
            yield jobs
        finally:  # also what was submitted before an error: never submitted twice
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(jobs, f, indent=1, sort_keys=True)
            os.replace(tmp, path)


def read_jobs(out) -> dict:
    try:
        with open(os.path.join(out, JOBS_FILE)) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def queue(env=None) -> dict:
    """Job id -> (Slurm state, reason) of this user's jobs in the queue, one line per array task
    (`squeue -r`): no accounting needed."""
    try:
        result = subprocess.run(["squeue", "-h", "-r", "-u", str(os.getuid()), "-o",
                                 "%i|%T|%r"], capture_output=True, text=True, env=env)
    except FileNotFoundError:
        raise UserError("--executor slurm: no squeue here; run it on a Slurm login node.") \
            from None
    if result.returncode != 0:
        raise UserError(f"squeue failed: {result.stderr.strip() or result.stdout.strip()} "
                        "(is this a Slurm login node, with SLURM_CONF set if needed?)")
    jobs = {}
    for line in result.stdout.splitlines():
        job, state, reason = (line.split("|") + ["", ""])[:3]
        jobs[job.strip()] = (state.strip(), reason.strip())
    return jobs


@dataclass
class RunState:
    state: str                # queued, running, finished, failed, todo
    job: str = ""             # Slurm job id ("123" or "123_4")
    error: str = ""
    log: str = ""


def _status_file(run) -> dict:
    try:
        with open(os.path.join(run.output_dir, "sweep_status.json")) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return {}


def job_log(out, job) -> str:
    """submitit's stderr file of a job (where a job killed before its run wrote anything logs)."""
    return os.path.join(out, SUBMITIT_FOLDER, f"{job}_0_log.err")


def run_states(runs, out, squeued=None) -> dict:
    """Run key -> RunState, from the queue and the run folders."""
    from .plan import run_finished
    jobs, squeued = read_jobs(out), queue() if squeued is None else squeued
    states = {}
    for run in runs:
        job = jobs.get(run.key, "")
        slurm_state, reason = squeued.get(job, ("", ""))
        if slurm_state and "DependencyNeverSatisfied" not in reason:
            running = slurm_state in ("RUNNING", "COMPLETING")
            states[run.key] = RunState(RUNNING if running else QUEUED, job)
        elif run_finished(run):
            states[run.key] = RunState(FINISHED, job)
        elif slurm_state:  # waits for a training run that failed
            states[run.key] = RunState(FAILED, job, f"its training run {run.after} failed",
                                       job_log(out, job))
        else:
            status = _status_file(run)
            if status.get("state") == "failed":
                states[run.key] = RunState(FAILED, job, status.get("error", ""),
                                           status.get("log", ""))
            elif job:
                after = states.get(run.after) if run.after else None
                error = (f"its training run {run.after} failed" if after and after.state ==
                         FAILED else f"job {job} ended without finishing the run")
                states[run.key] = RunState(FAILED, job, error, job_log(out, job))
            else:
                states[run.key] = RunState(TODO)
    return states


# ----------------------------------------------------------------------------------- submit
def submit(runs, args, hint=True):
    """Submit every run that is neither finished nor queued/running; print the job ids (and,
    with `hint`, how to follow them)."""
    if submitit is None:
        raise UserError("--executor slurm needs submitit: pip install 'textrefiner[slurm]'.")
    out = sweep_out(runs)
    folder = os.path.join(out, SUBMITIT_FOLDER)
    with _locked_jobs(out) as jobs:
        squeued = queue()
        states = run_states(runs, out, squeued)
        todo = [run for run in runs if states[run.key].state in (TODO, FAILED)]
        for run in todo:
            _forget_failure(run)
        # a job left waiting for a failed run's job (a cluster that keeps such jobs) goes
        stale = [jobs[run.key] for run in todo if jobs.get(run.key) in squeued]
        if stale:
            subprocess.run(["scancel", *stale], check=True)
        done = sum(state.state == FINISHED for state in states.values())
        active = sum(state.state in (QUEUED, RUNNING) for state in states.values())
        print(f"{len(runs)} runs: {done} finished, {active} queued or running, "
              f"{len(todo)} to submit")
        function = SlurmRun()
        for group, dependency in _groups(todo, jobs, squeued, args):
            executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=MAX_TIMEOUTS)
            params = executor_parameters(resources(group[0], args), args)
            if dependency:
                params.setdefault("additional_parameters", {}).update(
                    {"dependency": f"afterok:{dependency}", "kill-on-invalid-dep": "yes"})
            executor.update_parameters(**params)
            submitted = executor.map_array(function, group)
            for run, job in zip(group, submitted):
                jobs[run.key] = job.job_id
                print(f"  job {job.job_id}: {run.key}")
    if hint:
        print(f"Follow it with: textrefiner-sweep {_spec_arg(args, out)} --executor slurm "
              "--status (or --wait)")
    return 0


def _groups(todo, jobs, squeued, args):
    """(runs, dependency job id) in submission order: the runs that wait for nothing (or for a
    finished run), grouped by resources into arrays; then each run that waits for a run being
    submitted, queued or running, alone, after that run's job."""
    submitting = {run.key for run in todo}

    def waits(run):
        return run.after and (run.after in submitting or jobs.get(run.after) in squeued)

    arrays = {}
    for run in todo:
        if not waits(run):
            arrays.setdefault(resources(run, args), []).append(run)
    for group in arrays.values():
        yield group, ""
    for run in todo:  # in plan order: a run's dependency has its job id by now
        if waits(run):
            yield [run], jobs[run.after]


def _forget_failure(run):
    """A failed run is submitted again: its old outcome must not read as the new one's."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(run.output_dir, "sweep_status.json"))


def _spec_arg(args, out) -> str:
    return f"{shlex.quote(str(getattr(args, 'spec', 'SPEC')))} --out {shlex.quote(out)}"


# ----------------------------------------------------------------------------------- status
def status(runs, args) -> int:
    """Print where every run stands; 1 when a run failed."""
    out = sweep_out(runs)
    states = run_states(runs, out)
    counts = {name: sum(s.state == name for s in states.values())
              for name in (FINISHED, RUNNING, QUEUED, FAILED, TODO)}
    print(" ".join(f"{name} {count}" for name, count in counts.items()) + f" of {len(runs)}")
    for run in runs:
        state = states[run.key]
        job = f"job {state.job}" if state.job else "not submitted"
        print(f"  {state.state:<9} {job:<16} {run.key}")
    _print_failures(runs, states)
    return 1 if counts[FAILED] else 0


def _print_failures(runs, states):
    failed = [run for run in runs if states[run.key].state == FAILED]
    if not failed:
        return
    print(f"\n{len(failed)} failed:")
    for run in failed:
        state = states[run.key]
        print(f"  {run.key}\n    error: {state.error or 'see the log'}\n    log: {state.log}"
              f"\n    rerun: {run.command()}")
    print("Submit the sweep again to rerun the failed runs.")


def wait(runs, args) -> int:
    """Follow the sweep to its end, then write the report as a local sweep does; 1 when a run
    failed."""
    out = sweep_out(runs)
    states = follow(runs, out, getattr(args, "poll", 30.0))
    _write_report(out, args)
    return 0 if all(s.state == FINISHED for s in states.values()) else 1


def follow(runs, out, poll=30.0, stream=None, timeout=None) -> dict:
    """Show the sweep's progress line until no run is queued or running, then the summary of a
    local sweep (failed runs with their error, log and rerun command). Returns the states.
    `timeout` (seconds; None: none): a TimeoutError after it."""
    from .progress import Progress
    progress = Progress(runs, stream=stream)
    deadline = None if timeout is None else time.monotonic() + timeout
    seen_running = set()
    while True:
        states = run_states(runs, out)
        for key, state in states.items():  # the time estimate: runs seen from start to end
            if state.state == RUNNING and key not in seen_running:
                seen_running.add(key)
                progress.started_run(key)
            elif state.state in (FINISHED, FAILED) and key in seen_running:
                seen_running.discard(key)
                progress.ended_run(key, state.state == FINISHED)
        shown, reasons = progress_states(states)
        progress.update(shown, slots=max(1, sum(s.state == RUNNING for s in states.values())))
        if not any(s.state in (QUEUED, RUNNING) for s in states.values()):
            progress.finish(shown, reasons)
            return states
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"the sweep's jobs still run after {timeout:.0f} s")
        time.sleep(max(0.2, float(poll)))


def progress_states(states) -> tuple:
    """(key -> the progress line's state, key -> reason) for textrefiner.sweep.progress: a run
    whose training run failed is "blocked"; one never submitted is "blocked" too, with why."""
    shown, reasons = {}, {}
    for key, state in states.items():
        shown[key] = state.state
        if state.state == FAILED and state.error.startswith("its training run"):
            shown[key] = "blocked"
        elif state.state == TODO:
            shown[key] = "blocked"
            state.error = "not submitted: submit the sweep (--executor slurm) first"
        if state.error:
            reasons[key] = (f"{state.error} (Slurm's log of job {state.job}: {state.log})"
                            if state.job and state.log and not state.log.endswith("sweep.log")
                            else state.error)
    return shown, reasons


def _write_report(out, args):
    from .report import write_report
    from .spec import load_spec
    write_report(out, load_spec(args.spec))
