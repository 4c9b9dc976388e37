"""Several processes with torchrun (gloo on CPU, 2 processes): the same files as one process.

One smoke config with odd experience sizes (3 tasks of 3, 1 and 1 classes: 90/30/30 training
and 45/15/15 test images) and evaluation batches of 7 (a test experience of 15 ends in a
batch of one image; the 13 training batches of task 0 are dealt 7/6 to the two ranks). It
runs once in one process and once under ``python -m torch.distributed.run --standalone
--nproc_per_node 2``, both with one thread; everything but the timings, the command line and
the process count must be equal, the learned tensors bit for bit.

The feature cache is per rank (``feature_cache_dir`` chosen by ``RANK``, as on two machines
with local disks): the one-process run fills rank 0's folder, so under torchrun rank 0 finds
every file and rank 1 none, and the ranks must decide together to recompute. The kill test
stops rank 0 (``CLIPHINGE_KILL_AT``, see ``test_kill_points.py``) after the results of task
1 and resumes, both ranks then finding every feature. A LoRA run (stage 2 and the later
evaluations on images, repeated on every rank) must equal one process too.

Only that run goes through torchrun itself. The others (the one-process reference, the kill
and the resume, the refusals) start their ranks as children of a forkserver that has
imported the package once, with the variables torchrun gives its workers (``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and
its agent's rule (when a rank fails, the others are stopped): each costs its run, not the
imports of every process.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from avalanche_cliphinge import distributed
from avalanche_cliphinge.app import checkpoint as ckpt
from avalanche_cliphinge.atomic import KILL_ENV

from cli_helpers import ROOT, SCRIPTS

pytestmark = pytest.mark.slow

ARGS = [
    "--preset",
    "smoke",
    "--quiet",
    "--threads",
    "1",
    "--dist-timeout",
    "3",
    "--set",
    "init_class=3",
    "--set",
    "increment=1",
    "--set",
    "total_tasks=3",
    "--set",
    "init_epochs=1",
    "--set",
    "epochs=1",
    "--set",
    "second_stage_epochs=1",
    "--set",
    "eval_batch_size=7",
]
#: Under torchrun each rank adds its own cache folder (``$CACHE0`` or ``$CACHE1``).
PER_RANK_CACHE = (
    'if [ "$RANK" = 0 ]; then d=$CACHE0; else d=$CACHE1; fi; '
    'exec "$0" "$@" --set "feature_cache_dir=$d"'
)
#: What torchrun tells its workers.
TORCHRUN_VARIABLES = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
)
#: results.json keys that measure time or how the run was launched.
VARYING = ("train_seconds", "wall_seconds")
LAUNCH = ("command", "processes")


# ---- launches -------------------------------------------------------------------------------
def launch(command, **env):
    """Run ``command`` with one thread and ``env`` added: the finished process."""
    environment = {k: v for k, v in os.environ.items() if k != KILL_ENV}
    environment.update(OMP_NUM_THREADS="1", **env)
    return subprocess.run(
        command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300
    )


def cache_args(cache: Path):
    return ["--set", f"feature_cache_dir={cache}"]


def torchrun(output_dir: Path, caches, *extra: str):
    """The config under torchrun, 2 processes, rank r caching in ``caches[r]``."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "--no-python",
        "sh",
        "-c",
        PER_RANK_CACHE,
        sys.executable,
        str(SCRIPTS / "run_split_cifar.py"),
        *ARGS,
        "--output-dir",
        str(output_dir),
        *extra,
    ]
    return launch(command, CACHE0=str(caches[0]), CACHE1=str(caches[1]))


def _rank(rank: int, world: int, port: int, argv, kill_at, log_path: str) -> None:
    """A forkserver child: rank ``rank`` of ``world`` running the CLI with ``argv``."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.chdir(ROOT)
    os.environ["OMP_NUM_THREADS"] = "1"
    for name in TORCHRUN_VARIABLES:
        os.environ.pop(name, None)
    if world > 1:
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
        )
    if kill_at:
        os.environ[KILL_ENV] = kill_at
    from avalanche_cliphinge.app.cli import main

    code = main(argv, prog="run_split_cifar.py")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """``start(argvs, kill_at=None) -> ([exit code per rank], [log text per rank])``: one
    rank per command line as torchrun would start them (one: a plain process), children of
    a preloaded forkserver; when one ends with an error the others are stopped, as torchrun's
    agent does."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(
        [
            "avalanche_cliphinge.app.cli",
            "avalanche_cliphinge.app.experiment",
            "avalanche_cliphinge.benchmarks",
            "tensorboard",
        ]
    )
    logs = tmp_path_factory.mktemp("rank_logs")

    def start(argvs, kill_at=None):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        paths = [logs / f"{port}_rank{r}.log" for r in range(len(argvs))]
        procs = [
            context.Process(target=_rank, args=(r, len(argvs), port, argv, kill_at, str(path)))
            for r, (argv, path) in enumerate(zip(argvs, paths))
        ]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + 300
        while any(p.exitcode is None for p in procs) and time.monotonic() < deadline:
            if any(p.exitcode not in (None, 0) for p in procs):
                time.sleep(2)  # the others' own error, then SIGTERM
                for proc in procs:
                    if proc.exitcode is None:
                        proc.terminate()
            time.sleep(0.2)
        for proc in procs:
            proc.join(10)
        assert all(p.exitcode is not None for p in procs), "timed out"
        return [p.exitcode for p in procs], [path.read_text() for path in paths]

    return start


def rank_argv(output_dir: Path, cache: Path, *extra: str):
    return [*ARGS, "--output-dir", str(output_dir), *cache_args(cache), *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ranks):
    """The output folders of the one-process (``one``) and the torchrun run (``two``), the
    ranks' cache folders (``caches``) and the torchrun run's standard output."""
    base = tmp_path_factory.mktemp("distributed")
    caches = [base / "cache_rank0", base / "cache_rank1"]
    codes, logs = ranks([rank_argv(base / "one", caches[0])])
    assert codes == [0], logs[0][-3000:]
    two = torchrun(base / "two", caches)
    assert two.returncode == 0, two.stderr[-3000:]
    return {
        "one": base / "one",
        "two": base / "two",
        "caches": caches,
        "stdout": two.stdout,
        "base": base,
    }


# ---- comparing ------------------------------------------------------------------------------
def results_of(folder: Path):
    results = json.loads((folder / "results.json").read_text())
    protocol = {k: v for k, v in results.pop("protocol").items() if k not in LAUNCH}
    return {k: v for k, v in results.items() if k not in VARYING}, protocol


def assert_equal_tensors(a, b, where: str = "") -> None:
    """``a`` and ``b`` (nested dicts and lists of tensors and values) equal, bit for bit."""
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        bits = [t.contiguous().reshape(-1).view(torch.uint8) for t in (a, b)]
        assert torch.equal(*bits), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal_tensors(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_equal_tensors(x, y, f"{where}[{index}]")
    else:
        assert a == b, where


def assert_same_run(folder: Path, reference: Path) -> None:
    """``folder`` (torchrun) holds the one-process run ``reference``'s files and numbers."""
    got, want = results_of(folder), results_of(reference)
    assert got[0]["finished"] is True
    assert got == want
    for name in ("config.json", "csv/eval_results.csv", "csv/training_results.csv"):
        assert (folder / name).read_bytes() == (reference / name).read_bytes(), name
    load = lambda path: torch.load(path, map_location="cpu", weights_only=True)  # noqa: E731
    assert_equal_tensors(load(folder / "final_model.pt"), load(reference / "final_model.pt"))
    names = [p.name for _, p in ckpt.list_checkpoints(folder / "checkpoints")]
    assert names == [p.name for _, p in ckpt.list_checkpoints(reference / "checkpoints")]
    for name in names:
        a, b = (load(f / "checkpoints" / name) for f in (folder, reference))
        assert_equal_tensors(a["model"], b["model"], name)
        assert a["clock"] == b["clock"] and a["evaluator"] == b["evaluator"], name


def file_names(folder: Path):
    """Every file under ``folder``, TensorBoard's (named by time and PID) by folder only."""
    names = (p.relative_to(folder).as_posix() for p in folder.rglob("*"))
    return sorted(n.split(".out.tfevents.")[0] for n in names)


# ---- the cases ------------------------------------------------------------------------------
def test_torchrun_writes_the_one_process_results_and_model_bit_for_bit(runs):
    assert_same_run(runs["two"], runs["one"])
    assert json.loads((runs["two"] / "results.json").read_text())["protocol"]["processes"] == 2


def test_one_set_of_files_and_one_report(runs):
    # rank 1 writes nothing: no second log line, report, or stray temporary file
    assert file_names(runs["two"]) == file_names(runs["one"])
    assert runs["stdout"].count("Summary (%)") == 1
    assert runs["stdout"].count("task 2: accuracy on seen classes") == 1


def test_a_rank_without_the_cached_features_makes_every_rank_recompute(runs):
    # rank 0's folder was full, rank 1's empty: they agreed to recompute, rank 0 alone wrote
    assert len(list(runs["caches"][0].glob("*.pt"))) == 6  # train and test features, 3 tasks
    assert not runs["caches"][1].exists() or not any(runs["caches"][1].iterdir())


def test_a_folder_check_of_rank_0_stops_every_rank_with_one_error(runs, ranks):
    argv = rank_argv(runs["one"], runs["caches"][0])  # a finished run, no --overwrite
    codes, logs = ranks([argv, argv])
    assert codes == [2, 2]
    assert [ln for ln in logs[0].splitlines() if ln.startswith("error:")] == [
        f"error: {runs['one']} already holds a finished run (results.json); pass --overwrite "
        "to run again or choose another --output-dir"
    ]
    assert "error:" not in logs[1]


def test_a_failure_on_rank_1_alone_stops_every_rank_and_rank_1_says_why(runs, ranks, tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    codes, logs = ranks(
        [rank_argv(tmp_path / "out", runs["caches"][0]), rank_argv(tmp_path / "out", not_a_folder)]
    )
    assert codes == [2, 2]
    assert "error:" not in logs[0]
    assert f"error: feature_cache_dir {not_a_folder} is a file" in logs[1]
    assert not (tmp_path / "out").exists()  # stopped before the folder


def test_kill_rank_0_then_resume_with_two_ranks_equals_the_one_process_run(runs, ranks):
    folder = runs["base"] / "killed"
    caches = [runs["caches"][0], runs["base"] / "cache_copy"]
    shutil.copytree(caches[0], caches[1])  # every rank finds every feature
    codes, logs = ranks([rank_argv(folder, cache) for cache in caches], kill_at="results:1")
    assert codes[0] == -signal.SIGKILL, logs[0][-3000:]
    assert codes[1] != 0
    assert json.loads((folder / "results.json").read_text())["completed_tasks"] == 2
    codes, logs = ranks([rank_argv(folder, cache, "--resume") for cache in caches])
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "resuming from exp_000.pt" in logs[0] and "resuming" not in logs[1]
    assert_same_run(folder, runs["one"])


def test_lora_runs_repeated_on_every_rank_and_equals_one_process(ranks, tmp_path):
    # stage 2 trains the adapters on images on every rank, evaluation then encodes images
    # on every rank too; the second run finds every cached feature in the shared folder
    lora = ["--set", "use_lora_in_second_stage=true", "--set", "lora_layers=[1]"]
    argv = [rank_argv(tmp_path / name, tmp_path / "cache", *lora) for name in ("one", "two")]
    for argvs in ([argv[0]], [argv[1], argv[1]]):
        codes, logs = ranks(argvs)
        assert codes == [0] * len(argvs), logs[0][-3000:]
    assert_same_run(tmp_path / "two", tmp_path / "one")
    saved = torch.load(tmp_path / "two" / "final_model.pt", weights_only=True)
    assert sorted(saved["learned"]["lora"]) == ["task1", "task2"]


def test_the_helpers_do_nothing_in_one_process():
    batches = [[0, 1, 2], [3, 4, 5], [6]]
    assert not distributed.is_initialized() and distributed.world_size() == 1
    assert distributed.deal_batches(batches) == batches
    parts = [torch.arange(3.0), torch.arange(3.0, 6.0), torch.tensor([6.0])]
    assert torch.equal(distributed.gather_batches(parts, [3, 3, 1], "cpu"), torch.arange(7.0))
    assert distributed.on_main(lambda: 5) == 5 and distributed.agree(lambda: 6) == 6
    assert distributed.all_true(True) and not distributed.all_true(False)
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    model = torch.nn.Linear(2, 2)
    before = [t.clone() for t in model.state_dict().values()]
    distributed.sync_learned_state(model)
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))
    with pytest.raises(ValueError) as err:
        distributed.on_main(lambda: int("x"))
    assert not distributed.is_echo(err.value)


@pytest.mark.parametrize(
    "extra, env, message",
    [
        (["--device", "cuda:1"], {"LOCAL_RANK": "0"}, "every process takes cuda:LOCAL_RANK"),
        ([], {}, "cannot join the process group"),
    ],
    ids=["cuda-index", "no-rendezvous"],
)
def test_a_bad_launch_is_one_error_line(extra, env, message, monkeypatch, capsys, tmp_path):
    from avalanche_cliphinge.app.cli import main

    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if extra and not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert main([*ARGS, "--output-dir", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not distributed.is_initialized() and not (tmp_path / "out").exists()


def test_dist_timeout_must_be_positive(capsys):
    from avalanche_cliphinge.app.cli import main

    with pytest.raises(SystemExit):
        main(["--preset", "smoke", "--dist-timeout", "0"])
    assert "'0' is not a positive number of minutes" in capsys.readouterr().err


def test_compare_refuses_torchrun(monkeypatch, capsys):
    from avalanche_cliphinge.app.comparison import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--benchmark", "smoke", "--quiet"]) == 2
    assert "cliphinge compare runs in one process" in capsys.readouterr().err
