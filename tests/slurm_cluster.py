"""A one-node Slurm cluster on this machine for the tests: munged, slurmctld and slurmd started as
root from a temporary folder (configuration, key, sockets, pid files, state and logs all inside
it), and stopped by the pids they wrote. Nothing outside the folder is written: munged gets its
own key, socket, pid and seed files (in a folder of its own under /tmp, removed at the end, as
the socket's path must be short); Slurm its own ports and spool.

    reason = unavailable()            # None, or why the tests must skip
    with LocalSlurm(folder) as env:   # env: os.environ plus SLURM_CONF
        subprocess.run(["sbatch", ...], env=env)
"""
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "srun", "scancel", "sinfo", "munge")


def unavailable():
    """Why a local cluster cannot start here (None when it can)."""
    missing = [name for name in DAEMONS + CLIENTS if shutil.which(name) is None
               and not os.path.exists(f"/usr/sbin/{name}")]
    if missing:
        return (f"Slurm is not installed (no {', '.join(missing)}): apt-get install slurm-wlm "
                "munge")
    if os.geteuid() != 0:
        return "starting slurmctld, slurmd and munged needs root"
    return None


def _daemon(name):
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_port():
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def wait_for(check, what, timeout=120.0, every=0.25):
    """Poll `check()` until it returns something true (returned); on timeout, an error naming
    `what`. Generous timeouts: a busy machine is slow, never wrong."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


SLURM_CONF = """\
ClusterName=local
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
KillWait=1
MinJobAge=600
{node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    """The cluster's daemons, started in `folder` on enter and stopped on exit."""

    def __init__(self, folder):
        self.folder = os.path.abspath(str(folder))
        self.started = []  # (name, pid file) of the daemons this object started
        self.conf = os.path.join(self.folder, "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf)

    def __enter__(self):
        # a SIGTERM (a CI time limit, kill) becomes an interrupt, so that `with` and pytest's
        # teardown run and the daemons stop instead of outliving the process
        self.previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
        try:
            self.start()
        except BaseException:
            self.__exit__()
            raise
        return self.env

    def __exit__(self, *exc):
        try:
            self.stop()
        finally:
            signal.signal(signal.SIGTERM, self.previous_sigterm)

    # --------------------------------------------------------------------- start
    def start(self):
        os.makedirs(self.folder, exist_ok=True)
        # munged's socket: a short path (a socket's is at most 107 bytes) whose folders all
        # others may search, as munged demands
        self.munge_dir = munge_dir = tempfile.mkdtemp(prefix="textrefiner-munge-")
        for sub, mode in ((munge_dir, 0o755), (os.path.join(self.folder, "state"), 0o700),
                          (os.path.join(self.folder, "spool"), 0o755)):
            os.makedirs(sub, exist_ok=True)
            os.chmod(sub, mode)
        key = os.path.join(munge_dir, "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o600)
        socket_path = os.path.join(munge_dir, "munge.socket")
        self._run_daemon("munged", os.path.join(munge_dir, "munged.pid"),
                         [_daemon("munged"), f"--socket={socket_path}", f"--key-file={key}",
                          f"--pid-file={munge_dir}/munged.pid",
                          f"--seed-file={munge_dir}/munged.seed",
                          f"--log-file={munge_dir}/munged.log"],
                         os.path.join(munge_dir, "munged.log"))
        with open(self.conf, "w") as f:
            f.write(SLURM_CONF.format(host=socket.gethostname().split(".")[0],
                                      node=self._node_line(), folder=self.folder,
                                      munge_socket=socket_path, ctld_port=_free_port(),
                                      slurmd_port=_free_port()))
        self._run_daemon("slurmctld", os.path.join(self.folder, "slurmctld.pid"),
                         [_daemon("slurmctld"), "-f", self.conf],
                         os.path.join(self.folder, "slurmctld.log"))
        self._run_daemon("slurmd", os.path.join(self.folder, "slurmd.pid"),
                         [_daemon("slurmd"), "-f", self.conf],
                         os.path.join(self.folder, "slurmd.log"))
        wait_for(self._node_idle, "the node to be idle in sinfo (see "
                 f"{self.folder}/slurmctld.log and slurmd.log)")

    def _node_line(self):
        """This machine as slurmd sees it (`slurmd -C`: name, CPUs, sockets, cores, threads,
        memory), so the node's configuration never exceeds what it has."""
        result = subprocess.run([_daemon("slurmd"), "-C"], capture_output=True, text=True,
                                timeout=120, check=True)
        return next(line for line in result.stdout.splitlines() if line.startswith("NodeName="))

    def _run_daemon(self, name, pid_file, command, log):
        """Start a daemon that forks into the background; wait for its pid file."""
        result = subprocess.run(command, env=self.env, capture_output=True, text=True,
                                timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{name} did not start: {result.stderr.strip()} "
                               f"{_tail(log)}")
        pid = wait_for(lambda: _read_pid(pid_file), f"{name}'s pid file {pid_file}")
        self.started.append((name, pid_file, pid))

    def _node_idle(self):
        result = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True,
                                text=True, timeout=60)
        return result.returncode == 0 and result.stdout.strip() == "idle"

    def _queue_empty(self):
        result = subprocess.run(["squeue", "-h"], env=self.env, capture_output=True, text=True,
                                timeout=60)
        return result.returncode != 0 or not result.stdout.strip()

    # --------------------------------------------------------------------- stop
    def stop(self):
        """Stop the daemons this object started, newest first, each by the pid it wrote."""
        if self.started and os.path.exists(self.conf):
            # jobs still running end first (their steps belong to slurmd)
            subprocess.run(["scancel", "--full", "--user", str(os.getuid())], env=self.env,
                           capture_output=True, timeout=60)
            try:
                wait_for(self._queue_empty, "the cancelled jobs to leave the queue", timeout=60)
            except TimeoutError:
                pass  # stopping slurmd ends what is left
        while self.started:
            name, pid_file, pid = self.started.pop()
            _terminate(pid, name)
        if getattr(self, "munge_dir", None):
            shutil.copytree(self.munge_dir, os.path.join(self.folder, "munge"),
                            ignore=shutil.ignore_patterns("*.socket*", "*.key"),
                            dirs_exist_ok=True)  # its log stays with the others
            shutil.rmtree(self.munge_dir, ignore_errors=True)
            self.munge_dir = None


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _read_pid(path):
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:  # a zombie has exited
            return f.read().split(") ")[-1][:1] != "Z"
    except FileNotFoundError:
        return False


def _terminate(pid, name, timeout=60.0):
    """SIGTERM, then SIGKILL if `pid` is still there after `timeout` seconds."""
    if not _alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    try:
        wait_for(lambda: not _alive(pid), f"{name} (pid {pid}) to stop", timeout=timeout)
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not _alive(pid), f"{name} (pid {pid}) to die", timeout=30)


def _tail(path, lines=5):
    try:
        with open(path, errors="replace") as f:
            return "; ".join(f.read().strip().splitlines()[-lines:])
    except OSError:
        return ""
