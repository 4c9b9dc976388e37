"""Several processes with torchrun (gloo on CPU, 2 processes): the results of one process.

The default config (3 tasks of 3, 1 and 1 classes: 90/30/30 training and 45/15/15 test
images, 1 epoch each, evaluation batches of 7 so the 13 training batches of task 0 are dealt
7/6 and a test experience of 15 ends in a batch of one image) runs once in one process and
once under the real command, ``python -m torch.distributed.run --standalone --nproc_per_node
2`` with this file as the workers' script (``worker``: the CLI of
``experiments/run_split_cifar.py`` plus a per-rank cache folder), killed on rank 0 after the
results of task 1 (``CLIPHINGE_KILL_AT``, as in ``test_kill_points.py``) and resumed with
``--resume`` under torchrun. Everything but the timings, the command line and the process
count must equal the one-process run, the learned tensors bit for bit (only the
frozen-encoder passes are split, by whole batches). The feature cache is per rank
(``feature_cache_dir`` chosen by ``RANK``, as on two machines with local disks): rank 0
alone writes it, so at the resume rank 0 finds the features of the tasks before the kill
and rank 1 none, and the ranks must decide together to recompute.

The split config (tasks of 3 and 2 classes, LoRA in stage 2, ``cache_features`` false,
minibatches of 59 so task 1's 60 images are a minibatch of 59 rows, dealt 30/29, and one of
1 row, dealt 1/0) trains on images: stage 1 encodes each minibatch a shard per rank and
gathers the features, stage 2 trains the head and the adapter on each rank's shard with the
gradients summed. Its learned tensors equal one process's within a float tolerance, no
longer bit for bit (summation order, the encoder's batch size), and each rank's encoder
calls are counted.

Every other run (the one-process references, the split run, the refusals) starts its ranks
as children of a forkserver that has imported the package once, with the variables torchrun
gives its workers (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``) and its agent's rule (when a rank fails, the others are
stopped): each costs its run, not the imports of every process (most of a torchrun launch,
about 16 s of CPU per process). The killed torchrun launch runs alongside them. Every run
writes its figures as empty files (``skip_figure_rendering``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from avalanche_cliphinge import distributed
from avalanche_cliphinge.app import checkpoint as ckpt
from avalanche_cliphinge.distributed import process_group, shared_errors
from avalanche_cliphinge.kill_points import KILL_ENV

from cli_helpers import ONE_EPOCH, ROOT

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
    *ONE_EPOCH,
    "--set",
    "eval_batch_size=7",
]
#: Training on images split by rows: stage 1 uncached, stage 2 with LoRA, 2 tasks.
SPLIT = [
    "--set",
    "total_tasks=2",
    "--set",
    "increment=2",
    "--set",
    "cache_features=false",
    "--set",
    "use_lora_in_second_stage=true",
    "--set",
    "lora_layers=[1]",
    "--set",
    "batch_size=59",
    "--set",
    "eval_batch_size=11",  # test sets of 45 and 30 images: a last evaluation batch of one
]
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
LAUNCH = ("command", "processes", "created", "git_commit", "git_commit_resumed")
#: Learned tensors of the split config against one process (float32, 1 epoch per stage).
RTOL, ATOL = 1e-4, 1e-7
#: Phases of the encoder calls counted (``count_encoded_images``).
PHASES = ("stage 1", "stage 2", "evaluation", "other")


# ---- the workers ----------------------------------------------------------------------------
def count_encoded_images():
    """Patch the classes so every image-encoder call records its images under its phase
    (inside a stage-1 step, inside stage 2, scoring an evaluation minibatch, other: feature
    passes); returns
    ``{phase: [images per call]}``, filled as the run goes."""
    from avalanche_cliphinge.model.cliphinge_model import CLIPHingeModel
    from avalanche_cliphinge.plugins.second_stage import SecondStagePlugin
    from avalanche_cliphinge.strategy import CLIPHingeStrategy

    calls = {phase: [] for phase in PHASES}
    phase = ["other"]

    def within(name, method):
        def wrapped(*args, **kwargs):
            phase.append(name)
            try:
                return method(*args, **kwargs)
            finally:
                phase.pop()

        return wrapped

    encode = CLIPHingeModel.run_image_encoder

    def counted(self, images):
        calls[phase[-1]].append(int(images.shape[0]))
        return encode(self, images)

    CLIPHingeModel.run_image_encoder = counted
    CLIPHingeStrategy._minibatch_features = within("stage 1", CLIPHingeStrategy._minibatch_features)
    SecondStagePlugin.after_training_exp = within("stage 2", SecondStagePlugin.after_training_exp)
    CLIPHingeStrategy._eval_scores = within("evaluation", CLIPHingeStrategy._eval_scores)
    return calls


def skip_figure_rendering() -> None:
    """Write each figure file empty and draw no figure (one black pixel for TensorBoard and
    the previews): rendering them is most of a smoke run's time, their content is no business
    of the ranks (``test_kill_points.py`` compares them); their names still show that one set
    of files is written."""
    from avalanche_cliphinge.app import run_reports as experiment
    from avalanche_cliphinge.app.figures import FORMATS
    from avalanche_cliphinge.atomic import write_bytes_atomic

    def empty_files(figure, stem, *args, **kwargs):
        paths = [Path(f"{stem}.{fmt}") for fmt in FORMATS]
        for path in paths:
            write_bytes_atomic(b"", path)
        return paths

    experiment.save_figure = empty_files
    experiment.render_pixels = lambda figure: np.zeros((1, 1, 3), np.uint8)


def run_cli(argv, counts_path=None) -> int:
    """The CLI of ``experiments/run_split_cifar.py`` on ``argv`` (``skip_figure_rendering``);
    with ``counts_path`` the encoder calls are counted (``count_encoded_images``) and written
    there as JSON."""
    from avalanche_cliphinge.app.cli import main

    skip_figure_rendering()
    calls = count_encoded_images() if counts_path else None
    try:
        return main(argv, prog="run_split_cifar.py")
    finally:
        if calls is not None:
            Path(counts_path).write_text(json.dumps(calls))
        sys.stdout.flush()
        sys.stderr.flush()


def worker(argv) -> int:
    """torchrun's script in these tests: the CLI, rank r adding ``feature_cache_dir=$CACHE<r>``
    when set."""
    cache = os.environ.get(f"CACHE{os.environ.get('RANK', '0')}")
    return run_cli([*argv, "--set", f"feature_cache_dir={cache}"] if cache else argv)


# ---- launches -------------------------------------------------------------------------------
class Torchrun:
    """The config (``ARGS`` + ``extra``) under the torchrun command, 2 processes, one thread,
    started in the background: rank r caching in ``caches[r]``, rank 0 killed at
    ``kill_at``; standard output and error go to ``<output_dir>.stdout`` and ``.stderr``.
    ``wait()`` returns ``(exit code, stdout, stderr)``."""

    def __init__(self, output_dir: Path, *extra: str, caches=(), kill_at=None):
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            __file__,
            *ARGS,
            "--output-dir",
            str(output_dir),
            *extra,
        ]
        env = {k: v for k, v in os.environ.items() if k not in (KILL_ENV, "CACHE0", "CACHE1")}
        env.update(OMP_NUM_THREADS="1")
        for rank, cache in enumerate(caches):
            env[f"CACHE{rank}"] = str(cache)
        if kill_at:
            env[KILL_ENV] = kill_at
        self.logs = [output_dir.with_suffix(f".{name}") for name in ("stdout", "stderr")]
        with open(self.logs[0], "w") as out, open(self.logs[1], "w") as err:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err)

    def wait(self):
        code = self.process.wait(timeout=300)
        return (code, *(path.read_text() for path in self.logs))


def _rank(rank: int, world: int, port: int, argv, counts, log_path: str) -> None:
    """A forkserver child: rank ``rank`` of ``world`` running the CLI with ``argv``, counting
    its encoder calls into ``counts/rank<rank>.json`` when ``counts`` is given."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.chdir(ROOT)
    os.environ["OMP_NUM_THREADS"] = "1"
    for name in (*TORCHRUN_VARIABLES, KILL_ENV):
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
    os._exit(run_cli(argv, counts and str(Path(counts) / f"rank{rank}.json")))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """``start(argvs, counts=None) -> ([exit code per rank], [log text per rank])``: one rank
    per command line as torchrun would start them (one: a plain process), each counting its
    encoder calls into the folder ``counts`` when given, children of a preloaded forkserver;
    when one ends with an error the others are stopped, as torchrun's agent does."""
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

    def start(argvs, counts=None):
        if counts is not None:
            counts.mkdir(parents=True, exist_ok=True)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        paths = [logs / f"{port}_rank{r}.log" for r in range(len(argvs))]
        procs = [
            context.Process(
                target=_rank, args=(r, len(argvs), port, argv, counts and str(counts), str(path))
            )
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


def rank_argv(output_dir: Path, *extra: str):
    return [*ARGS, "--output-dir", str(output_dir), *extra]


def cache_args(cache: Path):
    return ["--set", f"feature_cache_dir={cache}"]


@pytest.fixture(scope="module")
def launches(tmp_path_factory, ranks):
    """Every run of the module, the torchrun launch killed on rank 0 running alongside the
    forkserver's runs (their imports and its own overlap):

    - ``default``: the default config in one process (``one``) and under torchrun (``two``:
      killed on rank 0 after task 1's results, then resumed), the ranks' cache folders
      (``caches``, both empty at the start), the feature files of rank 0 at the kill
      (``cached_at_kill``), the tasks results.json held then (``completed``) and the
      launches' ``(exit code, stdout, stderr)`` (``killed``, ``resumed``);
    - ``split``: the split config in one process (``one``) and in 2 ranks (``two``), with
      their encoder calls (``counts``: one process's, then rank 0's and rank 1's).
    """
    base = tmp_path_factory.mktemp("distributed")
    caches = [base / "cache_rank0", base / "cache_rank1"]
    killing = Torchrun(base / "two", caches=caches, kill_at="results:1")
    codes, logs = ranks([rank_argv(base / "one")])
    assert codes == [0], logs[0][-3000:]
    for name, world in (("split_one", 1), ("split_two", 2)):
        argv = rank_argv(base / name, *SPLIT)
        codes, logs = ranks([argv] * world, counts=base / f"counts_{name}")
        assert codes == [0] * world, "\n".join(log[-3000:] for log in logs)
    killed = killing.wait()
    completed = json.loads((base / "two" / "results.json").read_text())["completed_tasks"]
    cached_at_kill = sorted(p.name for p in caches[0].glob("*.pt"))
    resumed = Torchrun(base / "two", "--resume", caches=caches).wait()
    assert resumed[0] == 0, resumed[1][-3000:] + resumed[2][-3000:]
    counts = [base / "counts_split_one" / "rank0.json"]
    counts += [base / "counts_split_two" / f"rank{r}.json" for r in range(2)]
    return {
        "default": {
            "one": base / "one",
            "two": base / "two",
            "caches": caches,
            "cached_at_kill": cached_at_kill,
            "completed": completed,
            "killed": killed,
            "resumed": resumed,
        },
        "split": {
            "one": base / "split_one",
            "two": base / "split_two",
            "counts": [json.loads(path.read_text()) for path in counts],
        },
    }


@pytest.fixture(scope="module")
def runs(launches):
    """The default config's runs (``launches``)."""
    return launches["default"]


@pytest.fixture(scope="module")
def split_runs(launches):
    """The split config's runs (``launches``)."""
    return launches["split"]


# ---- comparing ------------------------------------------------------------------------------
def config_of(config: dict) -> dict:
    """A run's config without ``feature_cache_dir`` (each rank's own, a launch detail)."""
    return {k: v for k, v in config.items() if k != "feature_cache_dir"}


def results_of(folder: Path):
    """``(results.json less the timings, its protocol less the launch and the cache folder)``;
    the protocol's config is the run's ``config.json`` (checked)."""
    results = json.loads((folder / "results.json").read_text())
    protocol = {k: v for k, v in results.pop("protocol").items() if k not in LAUNCH}
    assert protocol["config"] == json.loads((folder / "config.json").read_text())
    protocol["config"] = config_of(protocol["config"])
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


def final_model(folder: Path) -> dict:
    """``final_model.pt`` of a run, its config without ``feature_cache_dir``."""
    saved = torch.load(folder / "final_model.pt", map_location="cpu", weights_only=True)
    saved["config"] = config_of(saved["config"])
    return saved


def assert_same_run(folder: Path, reference: Path) -> None:
    """``folder`` (torchrun) holds the one-process run ``reference``'s files and numbers."""
    got, want = results_of(folder), results_of(reference)
    assert got[0]["finished"] is True
    assert got == want
    for name in ("csv/eval_results.csv", "csv/training_results.csv"):
        assert (folder / name).read_bytes() == (reference / name).read_bytes(), name
    load = lambda path: torch.load(path, map_location="cpu", weights_only=True)  # noqa: E731
    assert_equal_tensors(final_model(folder), final_model(reference))
    names = [p.name for _, p in ckpt.list_checkpoints(folder / "checkpoints")]
    assert names == [p.name for _, p in ckpt.list_checkpoints(reference / "checkpoints")]
    for name in names:
        a, b = (load(f / "checkpoints" / name) for f in (folder, reference))
        assert_equal_tensors(a["model"], b["model"], name)
        assert a["clock"] == b["clock"] and a["evaluator"] == b["evaluator"], name


def file_names(folder: Path):
    """Every file under ``folder``, TensorBoard's (named by time and PID, one more per
    resume) by folder only."""
    names = (p.relative_to(folder).as_posix() for p in folder.rglob("*"))
    return sorted({n.split(".out.tfevents.")[0] for n in names})


# ---- the cases ------------------------------------------------------------------------------
def test_torchrun_killed_and_resumed_writes_the_one_process_results_bit_for_bit(runs):
    (killed, _, killed_err), (_, resumed, _) = runs["killed"], runs["resumed"]
    assert killed != 0 and runs["completed"] == 2  # rank 0 died after task 1's results
    assert "Signal 9 (SIGKILL) received by PID" in killed_err, killed_err[-3000:]
    # rank 1, if it saw rank 0 go before torchrun stopped it, said so in one line
    assert "Connection closed by peer" not in killed_err, killed_err[-3000:]
    assert resumed.count("resuming from exp_000.pt") == 1  # rank 0 alone says it
    assert_same_run(runs["two"], runs["one"])
    assert json.loads((runs["two"] / "results.json").read_text())["protocol"]["processes"] == 2


def test_one_set_of_files_and_one_report(runs):
    # rank 1 writes nothing: no second log line, report, or stray temporary file
    assert file_names(runs["two"]) == file_names(runs["one"])
    _, resumed, _ = runs["resumed"]
    assert resumed.count("Summary (%)") == 1
    assert resumed.count("task 2: accuracy on seen classes") == 1


def test_a_rank_without_the_cached_features_makes_every_rank_recompute(runs):
    # at the resume rank 0 held task 0's and 1's training features and the test features,
    # rank 1 none: they agreed to recompute, and rank 0 alone wrote
    assert len(runs["cached_at_kill"]) == 5  # train features of 2 tasks, test of 3
    assert len(list(runs["caches"][0].glob("*.pt"))) == 6  # and task 2's after the resume
    assert not runs["caches"][1].exists() or not any(runs["caches"][1].iterdir())


def test_a_folder_check_of_rank_0_stops_every_rank_with_one_error(runs, ranks):
    argv = rank_argv(runs["one"])  # a finished run, no --overwrite
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
    out = tmp_path / "out"
    codes, logs = ranks(
        [
            rank_argv(out, *cache_args(runs["caches"][0])),
            rank_argv(out, *cache_args(not_a_folder)),
        ]
    )
    assert codes == [2, 2]
    assert "error:" not in logs[0]
    assert f"error: feature_cache_dir {not_a_folder} is a file" in logs[1]
    assert not out.exists()  # stopped before the folder


def assert_close_tensors(a, b, where: str = "") -> None:
    """``a`` and ``b`` (nested dicts and lists of tensors and values) equal, floating-point
    tensors within ``RTOL``/``ATOL``, the rest exactly."""
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=where)
        else:
            assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_close_tensors(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_close_tensors(x, y, f"{where}[{index}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=RTOL, abs=ATOL), where
    else:
        assert a == b, where


def test_training_on_images_split_by_rows_equals_one_process_to_float_tolerance(split_runs):
    one, two = split_runs["one"], split_runs["two"]
    got, want = results_of(two), results_of(one)
    assert got[0]["finished"] is True
    assert_close_tensors(got, want, "results.json")
    load = lambda path: torch.load(path, map_location="cpu", weights_only=True)  # noqa: E731
    final = final_model(two)
    assert_close_tensors(final, final_model(one), "final_model.pt")
    lora = final["learned"]["lora"]
    assert sorted(lora) == ["task1"]
    assert all(t.abs().max() > 0 for name, t in lora["task1"].items() if "lora_B" in name)
    names = [p.name for _, p in ckpt.list_checkpoints(two / "checkpoints")]
    assert names == [p.name for _, p in ckpt.list_checkpoints(one / "checkpoints")]
    for name in names:
        a, b = (load(f / "checkpoints" / name) for f in (two, one))
        assert_close_tensors(a["model"], b["model"], name)


def test_each_rank_encodes_its_rows_of_every_training_and_evaluation_minibatch(split_runs):
    one, *ranks_ = split_runs["counts"]
    biggest = {"stage 1": 59, "stage 2": 59, "evaluation": 11}  # batch_size, eval_batch_size
    for phase in ("stage 1", "stage 2", "evaluation"):
        assert max(one[phase]) == biggest[phase] and 1 in one[phase], (phase, one[phase])
        for rank, mine in enumerate(ranks_):
            shards = [len(range(n)[distributed.shard_rows(n, rank, 2)]) for n in one[phase]]
            assert mine[phase] == [k for k in shards if k], (phase, rank)  # 1 row: 1/0
        assert sum(ranks_[0][phase]) + sum(ranks_[1][phase]) == sum(one[phase]), phase
    # dataset passes: split by batch
    assert (
        sum(ranks_[0]["other"]) < sum(one["other"]) <= sum(map(sum, (r["other"] for r in ranks_)))
    )


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
    assert distributed.shard_rows(5) == slice(0, 5)
    rows = torch.arange(5.0)
    assert distributed.gather_rows(rows, 5) is rows
    model.weight.grad = torch.ones(2, 2)
    loss = torch.tensor(3.0)
    assert distributed.all_reduce_gradients(model.parameters(), loss) == [loss]
    assert torch.equal(model.weight.grad, torch.ones(2, 2)) and model.bias.grad is None
    with pytest.raises(ValueError) as err:
        distributed.on_main(lambda: int("x"))
    assert not distributed.is_echo(err.value)


@pytest.mark.parametrize("n, world", [(7, 3), (1, 2), (0, 2), (59, 2), (4, 4)])
def test_the_shards_of_a_minibatch_are_its_rows_in_rank_order(n, world):
    shards = [range(n)[distributed.shard_rows(n, r, world)] for r in range(world)]
    assert [i for shard in shards for i in shard] == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert [len(s) for s in shards] == sorted((len(s) for s in shards), reverse=True)


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
    from avalanche_cliphinge.app.compare_cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--benchmark", "smoke", "--quiet"]) == 2
    assert "cliphinge compare runs in one process" in capsys.readouterr().err


#: Two processes of a gloo group: rank 0 is killed after a first collective, rank 1 then
#: waits for rank 0's verdict (``on_main``) and prints what ``peer_lost`` makes of its error.
KILLED_PEER = """
import os, signal, sys
from avalanche_cliphinge import distributed
distributed.init_from_env("cpu", 1.0)
distributed.broadcast_object("both alive")
if distributed.rank() == 0:
    os.kill(os.getpid(), signal.SIGKILL)
try:
    distributed.on_main(lambda: "rank 0 is dead: never sent")
except RuntimeError as err:
    print(distributed.peer_lost(err))
    print(str(err).replace(chr(10), " "))
"""


def test_the_error_of_a_killed_peer_names_the_rank_that_ended(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
        env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", KILLED_PEER],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    (_, _), (out, err) = (proc.communicate(timeout=120) for proc in procs)
    assert procs[0].returncode == -9 and procs[1].returncode == 0, err
    translated, raw = out.splitlines()
    assert "Connection closed by peer" in raw or "Connection reset by peer" in raw, raw
    assert translated in (
        f"rank 0 of the run's 2 torchrun processes ended (connection {how} by peer, seen by "
        "rank 1); every process stops"
        for how in ("closed", "reset")
    ), out


def test_a_killed_peer_is_one_error_line_with_what_to_do(monkeypatch, capsys, tmp_path):
    from avalanche_cliphinge.app import cli

    gloo = (
        "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection "
        "closed by peer [127.0.0.1]:31936. This is typically caused by a remote worker "
        "crashing. Check the logs of the remote worker before reporting an error. GLHF!"
    )

    def collective_after_rank_0_died(*args, **kwargs):
        raise RuntimeError(gloo)

    def a_bug(*args, **kwargs):
        raise RuntimeError("x")

    # rank 1 of 2 whose collective finds rank 0 gone (the real error: the test above)
    monkeypatch.setattr(cli, "_run", collective_after_rank_0_died)
    for module in (process_group, shared_errors):  # where is_main and peer_lost look
        monkeypatch.setattr(module, "is_initialized", lambda: True)
        monkeypatch.setattr(module, "rank", lambda: 1)
        monkeypatch.setattr(module, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "shutdown", lambda: None)
    out = tmp_path / "out"
    assert cli.main([*ARGS, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: rank 0 of the run's 2 torchrun processes ended (connection closed by peer, "
        "seen by rank 1); every process stops: once its cause is fixed (torchrun's report "
        "names its exit code or signal), continue with the same command plus --resume "
        f"(output folder {out})"
    ]
    monkeypatch.setattr(cli, "_run", a_bug)
    with pytest.raises(RuntimeError, match="^x$"):  # any other RuntimeError: a bug, traceback
        cli.main([*ARGS, "--output-dir", str(out)])


if __name__ == "__main__":  # torchrun's script (``worker``), no interpreter teardown
    os._exit(worker(sys.argv[1:]))
