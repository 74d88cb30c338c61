"""The cluster launchers: scripts/train.sh (torchrun on one node, or as one node of many) and
scripts/slurm/train.sbatch (one srun task per node, rendezvous from the allocation).

The fast tests run the scripts' own resolution logic in simulated environments (Slurm's
variables, a fake `scontrol` or `srun` on PATH). The slow ones train for real on this machine:
two "nodes" held to the same job run as one node, a SIGTERM sent to the launcher that must
end in a checkpoint, and a user error in the workers that must end in its one line and exit
code 2.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtrain.models.tiny import corpus
from tests.conftest import TINY
from tests.torchrun import ENV, free_port

ROOT = Path(__file__).resolve().parent.parent
TRAIN_SH = ROOT / "scripts" / "train.sh"
SBATCH = ROOT / "scripts" / "slurm" / "train.sbatch"
BASH = shutil.which("bash")
# What the scripts read from the environment: cleared so the machine's own values do not leak in.
LAUNCH_VARS = (
    "NNODES NODE_RANK MASTER_ADDR MASTER_PORT NPROC_PER_NODE DRY_RUN PYTHON LOG_DIR "
    "MTRAIN_ROOT SRUN_ARGS ASCEND_RT_VISIBLE_DEVICES CUDA_VISIBLE_DEVICES"
).split()
SLURM_JOB = {
    "SLURM_JOB_NODELIST": "node[03-05]",
    "SLURM_NNODES": "3",
    "SLURM_NODEID": "2",
    "SLURM_JOB_ID": "123456",
}


def run(script: Path, *args: str, path: str | None = None, **env: str):
    base = {
        k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")
    }
    if path is not None:
        base["PATH"] = path
    return subprocess.run(
        [BASH, str(script), *args], capture_output=True, text=True, env={**base, **env}, timeout=60
    )


def executable(path: Path, body: str) -> Path:
    path.write_text(f"#!{BASH}\n{body}")
    path.chmod(0o755)
    return path


# --- scripts/train.sh ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["train"], {}, "stage must be pt, sft, dpo or rm, not 'train'"),
        ([], {}, "stage must be pt, sft, dpo or rm"),
        (["--dry-run", "sft"], {"NPROC_PER_NODE": "0"}, "must be at least 1"),
        (
            ["sft"],
            {"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h", "NPROC_PER_NODE": "1"},
            "below NNODES=2",
        ),
        (["sft"], {"NNODES": "2", "NPROC_PER_NODE": "8"}, "needs MASTER_ADDR"),
        (
            ["sft"],
            {"MASTER_PORT": "http", "NPROC_PER_NODE": "1"},
            "MASTER_PORT=http is not a number",
        ),
    ],
    ids=["unknown-stage", "no-stage", "no-processes", "rank-out-of-range", "no-master", "port"],
)
def test_train_sh_refuses_in_one_line_with_exit_code_2(args, env, message):
    proc = run(TRAIN_SH, *args, **env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and message in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"ASCEND_RT_VISIBLE_DEVICES": "0,1,2,3"}, 4),
        ({"CUDA_VISIBLE_DEVICES": "0,1"}, 2),
        ({"NPROC_PER_NODE": "3", "ASCEND_RT_VISIBLE_DEVICES": "0,1,2,3"}, 3),
    ],
    ids=["npu-visible-devices", "cuda-visible-devices", "explicit-wins"],
)
def test_nproc_per_node_counts_the_visible_devices(env, expected):
    proc = run(TRAIN_SH, "--print-nproc", **env)
    assert proc.returncode == 0 and proc.stdout == f"{expected}\n", proc.stderr


@pytest.mark.skipif(
    shutil.which("npu-smi") is not None or shutil.which("nvidia-smi") is not None,
    reason="a machine with accelerators counts them",
)
def test_nproc_per_node_is_1_with_a_note_without_accelerators():
    proc = run(TRAIN_SH, "--print-nproc", PYTHON=sys.executable)
    assert proc.returncode == 0 and proc.stdout == "1\n"
    assert "set NPROC_PER_NODE for CPU runs" in proc.stderr


TRICKY = [
    "+model=qwen3_tiny",
    "data.path=/data/my corpus/a b.jsonl",
    "log.tag='quoted value'",
    'lora.target="linear_qkv"',
    "x=it's $HOME `id` \\n *",
]


@pytest.mark.parametrize("how", ["--dry-run", "DRY_RUN=1"])
def test_dry_run_prints_the_torchrun_command_with_the_overrides_unchanged(how):
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "23456"}
    env["NPROC_PER_NODE"] = "8"
    args = ["--dry-run", "sft", *TRICKY] if how == "--dry-run" else ["sft", *TRICKY]
    proc = run(TRAIN_SH, *args, **env, **({"DRY_RUN": "1"} if how == "DRY_RUN=1" else {}))
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout) == [
        "python",
        *("-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", "1"),
        *("--nproc_per_node", "8", "--master_addr", "10.0.0.7", "--master_port", "23456"),
        *("-m", "mtrain.sft", *TRICKY),
    ]
    assert "nnodes=2 node_rank=1 nproc_per_node=8 master=10.0.0.7:23456" in proc.stderr


def test_one_node_defaults_to_a_local_rendezvous():
    proc = run(TRAIN_SH, "--dry-run", "pt", "x=1", NPROC_PER_NODE="2", PYTHON="python3")
    assert shlex.split(proc.stdout) == [
        "python3",
        *("-m", "torch.distributed.run", "--nnodes", "1", "--node_rank", "0"),
        *("--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", "29500"),
        *("-m", "mtrain.pt", "x=1"),
    ]


# --- scripts/slurm/train.sbatch ----------------------------------------------------------------


def rendezvous(stdout: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in stdout.split())


@pytest.mark.parametrize(
    "nodelist, master",
    [
        ("node[03-05]", "node03"),
        ("a,b", "a"),
        ("gpu-17", "gpu-17"),
        ("node[7,9-10],login1", "node7"),
        ("n[01-02]-ib,m1", "n01-ib"),
    ],
)
def test_rendezvous_from_slurm_variables_without_scontrol(tmp_path, nodelist, master):
    # PATH holds nothing at all: the fallback parser is plain bash.
    proc = run(
        SBATCH,
        "--print-rendezvous",
        path=str(tmp_path),
        **{**SLURM_JOB, "SLURM_JOB_NODELIST": nodelist},
    )
    assert proc.returncode == 0, proc.stderr
    assert rendezvous(proc.stdout) == {
        "NNODES": "3",
        "NODE_RANK": "2",
        "MASTER_ADDR": master,
        "MASTER_PORT": str(20000 + 123456 % 10000),
    }


def test_rendezvous_takes_the_first_host_scontrol_lists(tmp_path):
    calls = tmp_path / "calls"
    executable(tmp_path / "scontrol", f'echo "$*" >> {calls}\nprintf "alpha-7\\nbeta-3\\n"\n')
    env = {**SLURM_JOB, "SLURM_JOB_NODELIST": "rack2-[7,3]", "SLURM_NODEID": "1"}
    proc = run(SBATCH, "--print-rendezvous", path=str(tmp_path), **env)
    assert rendezvous(proc.stdout)["MASTER_ADDR"] == "alpha-7"
    assert rendezvous(proc.stdout)["NODE_RANK"] == "1"
    assert calls.read_text() == "show hostnames rack2-[7,3]\n"


def test_rendezvous_falls_back_to_the_job_num_nodes_and_procid(tmp_path):
    env = {"SLURM_JOB_NODELIST": "a,b", "SLURM_JOB_NUM_NODES": "2", "SLURM_PROCID": "1"}
    proc = run(SBATCH, "--print-rendezvous", path=str(tmp_path), **env, SLURM_JOB_ID="7")
    assert rendezvous(proc.stdout) == {
        "NNODES": "2",
        "NODE_RANK": "1",
        "MASTER_ADDR": "a",
        "MASTER_PORT": "20007",
    }


def test_sbatch_outside_a_job_refuses_in_one_line(tmp_path):
    proc = run(SBATCH, "--print-rendezvous", path=str(tmp_path))
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
    assert "not inside a Slurm job" in proc.stderr


def test_sbatch_script_parses_and_its_directives_precede_the_first_command():
    for script in (SBATCH, TRAIN_SH):
        assert subprocess.run([BASH, "-n", str(script)]).returncode == 0
        assert os.access(script, os.X_OK), f"{script} is not executable"
    lines = SBATCH.read_text().splitlines()
    first_command = next(
        i for i, line in enumerate(lines) if line.strip() and not line.startswith("#")
    )
    directives = [line.split()[1] for line in lines if line.startswith("#SBATCH")]
    assert all(line.startswith("#") for line in lines[:first_command])  # sbatch stops there
    for option in ("--nodes=2", "--ntasks-per-node=1", "--exclusive", "--requeue"):
        assert option in directives
    assert "--output=logs/%x-%j.out" in directives
    assert any(d.startswith("--signal=") and "TERM@" in d for d in directives)


def test_batch_script_starts_one_task_per_node_that_runs_train_sh(tmp_path):
    """The batch step calls srun (faked: it records its arguments); each node's task, run with
    that node's Slurm variables, becomes scripts/train.sh with the rendezvous and the overrides."""
    recorded = tmp_path / "srun_args"
    executable(tmp_path / "srun", f'printf "%s\\n" "$@" > {recorded}\n')
    path = f"{tmp_path}{os.pathsep}{os.environ['PATH']}"
    env = {
        **SLURM_JOB,
        "SLURM_NODEID": "0",
        "NPROC_PER_NODE": "8",
        "LOG_DIR": str(tmp_path / "logs"),
    }
    proc = run(SBATCH, "sft", *TRICKY, path=path, **env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "logs").is_dir()
    argv = recorded.read_text().splitlines()
    task = argv.index("bash")
    options, command = argv[:task], argv[task + 1 :]
    assert {"--nodes=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1"} <= set(options)
    assert f"--output={tmp_path / 'logs'}/%x-%j-node%n.log" in options
    assert command == [str(SBATCH), "--node-task", "sft", *TRICKY]
    # The job's own log shows the command node 0 runs.
    assert "--node_rank 0" in proc.stdout and "--master_addr node03" in proc.stdout

    node2 = run(
        Path(command[0]), *command[1:], path=path, **SLURM_JOB, NPROC_PER_NODE="8", DRY_RUN="1"
    )
    assert node2.returncode == 0, node2.stderr
    assert shlex.split(node2.stdout)[3:] == [
        *("--nnodes", "3", "--node_rank", "2", "--nproc_per_node", "8"),
        *("--master_addr", "node03", "--master_port", "23456", "-m", "mtrain.sft", *TRICKY),
    ]


def test_batch_script_refuses_a_bad_stage_before_starting_any_node(tmp_path):
    recorded = tmp_path / "srun_args"
    executable(tmp_path / "srun", f"touch {recorded}\n")
    path = f"{tmp_path}{os.pathsep}{os.environ['PATH']}"
    proc = run(SBATCH, "finetune", path=path, **SLURM_JOB, NPROC_PER_NODE="8")
    assert proc.returncode == 2 and "stage must be pt, sft, dpo or rm" in proc.stderr
    assert not recorded.exists()


# --- real jobs on this machine ------------------------------------------------------------------


@pytest.fixture(scope="module")
def pt_job(tiny_hf, tmp_path_factory):
    """`pt_job(name, **changes)` -> overrides of a tiny TP=2 pretraining run on CPU that saves to
    <root>/<name> and logs its losses to <root>/<name>.jsonl; and the root."""
    root = tmp_path_factory.mktemp("launch")
    hf = tiny_hf(TINY)
    with open(root / "corpus.jsonl", "w") as f:
        for line in corpus(300, seed=3):
            f.write(json.dumps({"text": line}) + "\n")

    def overrides(name: str, **changes) -> list[str]:
        args = {
            "+model": "qwen3_tiny",
            "model.hf_dir": hf,
            "data.path": root / "corpus.jsonl",
            "data.cache_dir": root / "cache",
            "save": root / name,
            "log.metrics_file": root / f"{name}.jsonl",
            "train.iters": 3,
            "train.seq_length": 32,
            "train.global_batch_size": 4,
            "train.micro_batch_size": 2,
            "train.precision": "fp32",
            "train.lr": 1e-3,
            "parallel.tp": 2,
            "parallel.pp": 1,
            "device": "cpu",
            "log.interval": 1,
            **changes,
        }
        return [f"{k}={v}" for k, v in args.items()]

    return overrides, root


def start(env: dict[str, str], overrides: list[str], log: Path) -> subprocess.Popen:
    """scripts/train.sh pt in its own process group (torchrun and its workers), output to `log`."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [BASH, str(TRAIN_SH), "pt", *overrides],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **ENV, "PYTHON": sys.executable, **env},
            start_new_session=True,
        )


def finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[int]:
    """Wait for every process; once one fails or time runs out, kill them all (with workers)."""
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return [p.returncode for p in procs]


def losses(metrics: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]


@pytest.mark.slow
def test_two_nodes_train_like_one_node_with_tp_across_them(pt_job):
    overrides, root = pt_job
    master = {"NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    logs = [root / "node0.log", root / "node1.log", root / "one_node.log"]
    nodes = [
        start({**master, "NODE_RANK": str(r), "NPROC_PER_NODE": "1"}, overrides("two"), log)
        for r, log in zip((0, 1), logs)
    ]
    assert finish(nodes) == [0, 0], [log.read_text()[-3000:] for log in logs[:2]]
    one = start({"NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())}, overrides("one"), logs[2])
    assert finish([one]) == [0], logs[2].read_text()[-3000:]

    assert "nnodes=2 node_rank=1 nproc_per_node=1" in logs[1].read_text()
    shards = sorted(p.parent.name for p in (root / "two").glob("iter_0000003/*/*.pt"))
    assert shards == ["mp_rank_00", "mp_rank_01"]
    two_nodes, one_node = losses(root / "two.jsonl"), losses(root / "one.jsonl")
    diffs = [abs(a - b) for a, b in zip(two_nodes, one_node)]
    assert len(two_nodes) == 3 and len(diffs) == 3 and max(diffs) <= 1e-6, (two_nodes, one_node)


@pytest.mark.slow
def test_sigterm_to_the_launcher_reaches_the_workers_which_save_a_checkpoint(pt_job):
    """What Slurm (srun's task, --signal) and Kubernetes signal is the launched process: train.sh
    must have become torchrun (exec; torchrun runs in that python), which passes SIGTERM on to
    mtrain's workers."""
    overrides, root = pt_job
    log, metrics = root / "sigterm.log", root / "sigterm.jsonl"
    job = start(
        {"NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())},
        overrides("sigterm", **{"train.iters": 100_000}),
        log,
    )
    deadline = time.monotonic() + 120
    while job.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert job.poll() is None, log.read_text()[-3000:]
    assert b"mtrain.launch" in Path(f"/proc/{job.pid}/cmdline").read_bytes()
    job.send_signal(signal.SIGTERM)
    finish([job], timeout=120)  # torchrun itself exits 1 after passing a signal on

    iteration = int((root / "sigterm" / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= iteration < 100_000, log.read_text()[-3000:]
    saved = sorted(p.name for p in (root / "sigterm" / f"iter_{iteration:07d}").iterdir())
    assert saved == ["mp_rank_00", "mp_rank_01"]
    assert "SIGTERM received" in log.read_text()


def launch_pt(overrides: list[str], nproc: int, tmp_path: Path, **env: str):
    """scripts/train.sh pt on `nproc` CPU processes, to the end, with TMPDIR=tmp_path."""
    launch = {"NPROC_PER_NODE": str(nproc), "MASTER_PORT": str(free_port())}
    return subprocess.run(
        [BASH, str(TRAIN_SH), "pt", *overrides],
        capture_output=True,
        text=True,
        timeout=240,
        env={
            **os.environ,
            **ENV,
            "PYTHON": sys.executable,
            "TMPDIR": str(tmp_path),
            **launch,
            **env,
        },
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "nproc, changes, message",
    [
        (1, {"train.seq_length": 100_000}, "train.seq_length=100000 exceeds"),
        (4, {"train.seq_length": 100_000}, "train.seq_length=100000 exceeds"),
        (4, {"data.path": "/nonexistent/corpus.jsonl"}, "/nonexistent/corpus.jsonl: no such file"),
    ],
    ids=["1proc-bad-value", "4proc-bad-value", "4proc-missing-data"],
)
def test_a_user_error_in_the_workers_is_one_line_and_exit_code_2(
    pt_job, tmp_path, nproc, changes, message
):
    """Every worker refuses (or waits for the one that does and then crashes); the launcher shows
    the first refusal once, none of torchrun's report."""
    overrides, _ = pt_job
    layout = {"parallel.tp": 1, "train.micro_batch_size": 1}
    proc = launch_pt(overrides("user_error", **layout, **changes), nproc, tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    assert "ChildFailedError" not in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[0].startswith("train.sh: mtrain.pt: ")
    assert not list(tmp_path.glob("mtrain-launch.*"))  # the launcher's error file is gone


@pytest.mark.slow
def test_any_other_worker_failure_keeps_torchruns_report_and_exit_code(pt_job, tmp_path):
    """A worker that dies without a user error (here rank 1, at start-up) is torchrun's to report."""
    overrides, _ = pt_job
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        'import os\nif os.environ.get("RANK") == "1":\n    os._exit(3)\n'
    )
    pythonpath = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    proc = launch_pt(overrides("crash"), 2, tmp_path, PYTHONPATH=pythonpath)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "ChildFailedError" in proc.stderr and "exitcode  : 3" in proc.stderr
    assert "error: " not in proc.stderr
    assert not list(tmp_path.glob("mtrain-launch.*"))
