"""``cliphinge run``: the command line of a whole run (also ``experiments/run_split_cifar.py``
and ``run_imagenet_r.py``); its options and presets are in ``run_options``."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shlex
import sys
import time
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import List, Optional

# Only light modules here: --help, a bad request and a missing config file are answered
# without importing torch, open_clip or Avalanche (seconds); a run imports them as it starts.
from . import process
from .datasets import dataset_entry, fit_config_to_data
from ..config import CLIPHingeConfig, ConfigError
from ..errors import BackboneError, CheckpointError, DistributedError, RunError
from .run_lock import LockFileError, RunLockedError, hold
from .run_options import build_parser, resolve_config, smoke_stream

#: ``time.perf_counter()`` when this module was imported: ``process_seconds`` counts from it
#: where the system does not say when the process started.
_IMPORTED = time.perf_counter()

#: Failures of the request (config, data, folder, checkpoint, numerics): one ``error:`` line
#: and exit code 2. Anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (
    ConfigError,
    BackboneError,
    RunError,
    CheckpointError,
    RunLockedError,
    LockFileError,
    FileNotFoundError,
    NotADirectoryError,
    PermissionError,
    ValueError,
    FloatingPointError,
    DistributedError,
)
#: Errors of the disk or the folder (full, over quota, read-only, gone): one ``error:`` line
#: naming the file, also when they come as a plain ``OSError``.
DISK_ERRNOS = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free space within your quota",
    errno.EFBIG: "free space or raise the file size limit (ulimit -f)",
    errno.EROFS: "make the file system writable",
    errno.EACCES: "make the folder writable",
    errno.EPERM: "make the folder writable",
    errno.EIO: "check the disk",
}


def rerun_command(prog: Optional[str], argv: Optional[List[str]]) -> str:
    """The command line that runs this run again, quoted for a POSIX shell.

    ``cliphinge run ...`` (``python -m avalanche_cliphinge run ...`` when started so), or
    ``python <script> ...`` for an experiment script (``prog`` ending in ``.py``);
    ``argv`` ``None``: the process's own arguments.
    """
    words = [str(word) for word in (sys.argv[1:] if argv is None else argv)]
    launched = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    if prog and prog.endswith(".py"):
        script = str(launched) if launched.name == prog else f"experiments/{prog}"
        head = ["python", script]
    elif launched.name == "__main__.py" and launched.parent.name == "avalanche_cliphinge":
        head = ["python", "-m", "avalanche_cliphinge", "run"]
    else:
        head = ["cliphinge", "run"]
    return shlex.join(head + words)


class _RandomWeightsNotice(logging.Filter):
    """Drops open_clip's warning about random weights: with pretrained=None they were asked for."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=file or sys.stderr)


def _one_line(err: BaseException) -> str:
    """The error's message, at most two lines (the rest is in ``--debug``'s traceback).

    An error raised in a DataLoader worker arrives wrapped in the worker's traceback; its
    own message is the traceback's last line.
    """
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()] or [type(err).__name__]
    if lines[0].startswith("Caught ") and "worker" in lines[0] and len(lines) > 1:
        lines = [lines[-1].split(": ", 1)[-1]]
    return "\n".join(lines[:2])


def _disk_error(err: OSError, output_dir: Path) -> str:
    """One line for a disk or folder error: the file, the reason, what to do."""
    where = err.filename or output_dir
    return (
        f"cannot write {where} ({err.strerror or err}); {DISK_ERRNOS[err.errno]}, then "
        f"continue with --resume (the files written so far in {output_dir} are intact)"
    )


def default_threads() -> int:
    """torch CPU threads for a run: the cores this process may use, at most 8; 1 with 2 cores
    or fewer, where a second thread fights the data loading and the OS (measured: the smoke
    run's training took 45 s with the default threads on a busy 2-core machine, 2.4 s with
    one, same results). Under torchrun the cores are shared out among the machine's
    processes."""
    from .. import distributed

    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    return 1 if cores <= 2 else max(1, min(cores // distributed.local_world_size(), 8))


def _under_torchrun() -> bool:
    """Whether torchrun may have started this process as one of several (``WORLD_SIZE`` set
    and not 1), read without importing torch (``distributed.launched`` checks it fully)."""
    return os.environ.get("WORLD_SIZE", "").strip() not in ("", "1")


def process_seconds() -> float:
    """Seconds since this process started: the interpreter's start-up and every import
    included, as a stopwatch started with the command would show.

    On Linux the kernel's start time of the process (``/proc/self/stat``, in clock ticks of
    1/100 s since boot) against ``CLOCK_BOOTTIME``; elsewhere, or when that cannot be read,
    the time since this module was imported (which leaves out the interpreter's start-up).
    """
    try:
        with open("/proc/self/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
        seconds = time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, IndexError, ValueError, AttributeError):
        seconds = -1.0
    return seconds if seconds >= 0 else time.perf_counter() - _IMPORTED


def main(
    argv: Optional[List[str]] = None,
    description: str = "Run CLIPHingeStrategy on a class-incremental stream.",
    default_config: str = "cifar100_b0_inc10",
    dataset: Optional[str] = None,
    prog: Optional[str] = None,
) -> int:
    """Parse, build the stream of the config's ``dataset`` with the model's transforms, run,
    print the report.

    ``dataset`` pins the dataset (the experiment scripts: a config of another dataset is
    refused, naming ``cliphinge run``); ``None`` runs whichever the config names. Cheap
    checks (config, data layout, output folder) come before anything slow. Returns the exit
    code: 0, 2 with one ``error:`` line for a request that cannot run, 130 on Ctrl-C.
    """
    parser = build_parser(description, default_config, prog)
    args = parser.parse_args(argv)
    args.command = rerun_command(prog, argv)  # recorded in results.json
    if not _under_torchrun():
        # The config (file, preset, --set) before any slow import: a bad key or value is
        # answered at once. Under torchrun every rank checks it in _run, together.
        try:
            fit_config_to_data(args, resolve_config(args))  # an image folder: read, not opened
        except ConfigError as err:
            if args.debug:
                raise
            print(f"error: {_one_line(err)}", file=sys.stderr)
            return 2
    with process.heavy_imports():  # what a run imports (torch, Avalanche, open_clip), at once
        import torch

        from .. import distributed
        from ..benchmarks import common  # noqa: F401
        from . import experiment  # noqa: F401

    torch.set_num_threads(args.threads or default_threads())
    default_name = (
        Path(args.image_folder).expanduser().resolve().name
        if args.image_folder
        else "smoke"
        if args.preset == "smoke"
        else Path(args.config).stem
    )
    output_dir = Path(args.output_dir or Path("runs") / default_name)
    try:
        # under torchrun: join the processes, each on cuda:LOCAL_RANK (or the CPU)
        args.device = distributed.init_from_env(args.device, args.dist_timeout)
    except DistributedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        if args.seeds:
            for seed in args.seeds:
                one = argparse.Namespace(**{**vars(args), "seed": seed, "seeds": None})
                code = _run_and_report(one, argv, output_dir / f"seed_{seed}", dataset)
                if code:
                    return code
            return 0
        return _run_and_report(args, argv, output_dir, dataset)
    finally:
        distributed.shutdown()


def _run_and_report(
    args: argparse.Namespace, argv: Optional[List[str]], output_dir: Path, dataset: Optional[str]
) -> int:
    """One run into ``output_dir``: the summary, or one ``error:`` line; the exit code."""
    from .. import distributed
    from .run_reports import print_summary

    notice = _RandomWeightsNotice()
    logging.getLogger().addFilter(notice)
    main = distributed.is_main()  # under torchrun rank 0 reports, the others are quiet
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            if not main:
                warnings.simplefilter("ignore")
            results = _run(args, argv, output_dir, dataset)
    except (*EXPECTED_ERRORS, OSError) as err:
        disk = isinstance(err, OSError) and err.errno in DISK_ERRNOS
        if args.debug or not (disk or isinstance(err, EXPECTED_ERRORS)):
            raise
        if not distributed.is_echo(err):  # the rank it happened on says it, once
            print(
                f"error: {_disk_error(err, output_dir) if disk else _one_line(err)}",
                file=sys.stderr,
            )
        return 2
    except RuntimeError as err:
        lost = distributed.peer_lost(err)  # torchrun: another process was killed or crashed
        if lost is None or args.debug:
            raise
        print(
            f"error: {lost}: once its cause is fixed (torchrun's report names its exit code "
            f"or signal), continue with the same command plus --resume (output folder "
            f"{output_dir})",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        if main:
            print(
                f"interrupted; continue with the same command plus --resume (output "
                f"folder {output_dir})",
                file=sys.stderr,
            )
        return 130
    finally:
        logging.getLogger().removeFilter(notice)
    if not main:
        return 0
    print_summary(results)
    print(
        f"results: {output_dir / 'results.txt'} | TensorBoard: tensorboard --logdir "
        f"{output_dir / 'tb'} | this process: {process_seconds():.1f} s"
    )
    return 0


def _run(
    args: argparse.Namespace, argv: Optional[List[str]], output_dir: Path, dataset: Optional[str]
):
    import torch

    from .. import distributed
    from .experiment import run_experiment
    from .run_folder import check_output_dir, prepare_output_dir
    from .run_record import config_record

    # every rank checks the request (torchrun); a failure on any rank stops them all
    config, stream_factory = distributed.agree(lambda: _checked_request(args, dataset))
    with ExitStack() as held:

        def take_folder() -> None:
            # The folder is locked from the first look at it to the end of the run (by rank
            # 0 under torchrun: its verdict stops every rank alike).
            held.enter_context(hold(prepare_output_dir(output_dir)))
            check_output_dir(output_dir, resume=args.resume, overwrite=args.overwrite)

        distributed.on_main(take_folder)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        backbone, named_benchmark = _load_backbone_and_stream(args, config, device, stream_factory)
        protocol = {
            "stream": named_benchmark.protocol.get("name", config.dataset),
            "command": args.command,
            **config_record(args.config, config, args.preset),
        }
        results = run_experiment(
            config,
            named_benchmark,
            output_dir,
            backbone=backbone,
            device=device,
            resume=args.resume,
            overwrite=args.overwrite,
            force=args.force,
            wandb=args.wandb,
            interactive=False if args.quiet else "progress" if args.progress_only else True,
            protocol=protocol,
        )
    return results


def _checked_request(args: argparse.Namespace, dataset: Optional[str]):
    """The request's config, its dataset and data checked: ``(config, stream factory)``
    (no factory for ``--preset smoke``)."""
    from ..model.backbone import check_device
    from .run_checks import check_run_paths, check_wandb

    if args.device is not None:  # before anything slow
        check_device(args.device)
    config = fit_config_to_data(args, resolve_config(args))
    stream_factory = None
    if config.dataset != "synthetic":
        if dataset is not None and config.dataset != dataset:
            options = shlex.join(shlex.split(args.command)[2:])
            raise ConfigError(
                f"this script runs dataset '{dataset}', but the request's dataset is "
                f"'{config.dataset}'; run it with: cliphinge run {options}"
            )
        check_data, stream_factory = dataset_entry(config)
        config.require_layout(f"the {config.dataset} stream builder")
        check_data(args, config)
    check_run_paths(config)
    if args.wandb:
        check_wandb()
    return config, stream_factory


def _load_backbone_and_stream(
    args: argparse.Namespace, config: CLIPHingeConfig, device: str, stream_factory
):
    """The frozen CLIP and the stream named_benchmark built with its transforms.

    Under torchrun each machine's first process loads first (it downloads what is missing),
    the others then from its copy; a failure on any rank stops every rank.
    """
    from .. import distributed
    from ..benchmarks.common import skip_unreadable_images
    from ..model.backbone import load_clip
    from ..seeding import seed_everything

    def load():
        # Random weights (pretrained=None) come from the global RNG: seed it first, so a
        # resumed run gets the same frozen CLIP as the run it continues.
        seed_everything(config.seed)
        backbone = load_clip(
            config.model_name,
            config.pretrained,
            device=device,
            allow_activation_mismatch=config.allow_activation_mismatch,
        )
        with skip_unreadable_images(args.skip_bad_images):
            if stream_factory is None:
                return backbone, smoke_stream(config)
            return backbone, stream_factory(args, config, backbone)

    first = distributed.local_rank() == 0
    loaded = distributed.agree(lambda: load() if first else None)
    return distributed.agree(lambda: loaded if first else load())
