"""``cliphinge``: the package's command, also ``python -m avalanche_cliphinge``.

Subcommands: ``run`` (a whole run of any preset or config, on the stream its ``dataset``
names), ``compare`` (beside Avalanche's strategies and zero-shot CLIP), ``presets`` (the
shipped configs and what they reproduce), ``evaluate`` (a saved model's accuracy on a
protocol's test stream), ``predict`` (top classes of images with a saved model),
``aggregate`` (mean ± std over finished runs).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

from . import process

USAGE = """usage: cliphinge COMMAND [options]

commands:
  run       train and evaluate on a stream: a shipped preset or a config file
            (cliphinge run --preset smoke runs offline in under a minute)
  compare   CLIPHingeStrategy beside Avalanche's strategies and zero-shot CLIP
  presets   list the shipped presets and what they reproduce
  evaluate  a saved model's accuracy on a protocol's whole test stream (and per task)
  predict   top classes of images with a saved model (a run's final_model.pt)
  aggregate mean ± std over finished runs (seeds), one row per (config, method)

cliphinge COMMAND --help shows the options of a command."""


def presets_main(argv: List[str]) -> int:
    """Print every shipped preset, marked with the option that takes it, and what it runs or
    reproduces: ``--preset`` ones first, then the ``--config`` ones."""
    from ..config import list_presets
    from .run_options import RUN_PRESET_NOTES

    argparse.ArgumentParser(
        prog="cliphinge presets",
        description="The shipped presets: cliphinge run --preset NAME (a setting of the run, "
        "over any config) and --config NAME (a protocol).",
    ).parse_args(argv)
    for option, presets in (("--preset", RUN_PRESET_NOTES), ("--config", list_presets())):
        for name, note in presets.items():
            print(f"{name} ({option} {name})\n    {note}")
    return 0


#: The files ``predict`` takes from a folder (by extension, any case); a file named on the
#: command line may be in any format PIL reads.
FOLDER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _bomb_message(path: str) -> str:
    """One line for an image PIL refuses as a decompression bomb: its size and the limit."""
    from PIL import Image

    limit = 2 * Image.MAX_IMAGE_PIXELS  # PIL warns above MAX_IMAGE_PIXELS, refuses above twice
    guard, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:  # the header only: opening decodes nothing
        with Image.open(path) as image:
            width, height = image.size
    finally:
        Image.MAX_IMAGE_PIXELS = guard
    return (
        f"image {path} is {width} x {height} = {width * height} pixels, over the limit of "
        f"{limit} pixels (PIL's guard against decompression bombs); pass a smaller image "
        "(scale it down first)"
    )


def image_paths(items: List[str]) -> List[str]:
    """The images ``predict`` reads, in order: a file as given (any format); a folder as
    every file in it and in its subfolders with an extension of ``FOLDER_IMAGE_SUFFIXES`` (any
    case), sorted by path, leaving out hidden files and folders (names starting with ``.``).

    Raises:
        SavedModelError: a folder without any such file.
    """
    from ..model.saving import SavedModelError

    paths: List[str] = []
    for item in items:
        folder = Path(item)
        if not folder.is_dir():
            paths.append(item)
            continue
        found = sorted(
            path
            for path in folder.rglob("*")
            if path.suffix.lower() in FOLDER_IMAGE_SUFFIXES
            and not any(part.startswith(".") for part in path.relative_to(folder).parts)
            and path.is_file()
        )
        if not found:
            raise SavedModelError(
                f"folder {item} holds no image file (in it or its subfolders: "
                f"{' '.join(FOLDER_IMAGE_SUFFIXES)}); pass image files or a folder of them"
            )
        paths += [str(path) for path in found]
    return paths


def predict_main(argv: List[str]) -> int:
    """Print the top classes of each image with a saved model."""
    parser = argparse.ArgumentParser(
        prog="cliphinge predict", description="Top classes of images with a saved model."
    )
    parser.add_argument(
        "--model", required=True, help="a saved model: final_model.pt in a run's output folder"
    )
    parser.add_argument(
        "images",
        nargs="+",
        help="image files (any format PIL reads) or folders: a folder gives every "
        f"{'/'.join(s[1:] for s in FOLDER_IMAGE_SUFFIXES)} file in it and in its subfolders "
        "(hidden ones left out), sorted by path; one line per image",
    )
    parser.add_argument("--top", type=int, default=5, help="classes per image (default 5)")
    parser.add_argument(
        "--pretrained",
        default=None,
        help="the frozen CLIP weights on this machine (a tag or a file with "
        "the SHA-256 recorded at training) when not where training "
        "found them",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default: cpu)")
    args = parser.parse_args(argv)
    from .evaluate import missing_model

    if missing_model(args.model):
        return 2
    from PIL import Image, UnidentifiedImageError

    from ..model.backbone import BackboneError
    from ..model.cliphinge_model import CLIPHingeModel
    from ..model.saving import SavedModelError
    from ..streams import StreamInputError, to_rgb8

    if args.top < 1:
        parser.error("--top must be >= 1")
    try:
        paths = image_paths(args.images)
        model = CLIPHingeModel.load(args.model, device=args.device, pretrained=args.pretrained)
        images = []
        for path in paths:
            try:
                with Image.open(path) as image:
                    images.append(to_rgb8(image))  # 16-bit and float images scaled, not clipped
            except Image.DecompressionBombError:
                raise SavedModelError(_bomb_message(path)) from None
            except StreamInputError as err:
                raise SavedModelError(f"cannot use image {path}: {err}") from None
            except (OSError, UnidentifiedImageError) as err:
                raise SavedModelError(
                    f"cannot read image {path} ({type(err).__name__}); pass "
                    "JPEG, PNG or another format PIL reads"
                ) from None
        prediction = model.predict(images, k=args.top)
    except (SavedModelError, BackboneError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path, names, scores in zip(paths, prediction.names, prediction.scores.tolist()):
        ranked = ", ".join(f"{name} ({score:.2f})" for name, score in zip(names, scores))
        print(f"{path}: {ranked}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Dispatch ``cliphinge COMMAND ...``; returns the exit code.

    Standard output closed by its reader (``cliphinge presets | head -1``) ends the command
    quietly: 0 where it only prints (help, ``presets``); otherwise one ``error:`` line and 2,
    as the command stopped before its end.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            return _dispatch(argv)
        finally:
            sys.stdout.flush()  # what is still buffered fails here, not at exit
    except BrokenPipeError:
        _stdout_to_devnull()
        if not argv:
            return 2  # the usage, as without the pipe
        if argv[0] == "presets" or {"-h", "--help"} & set(argv):
            return 0
        print(
            f"error: the output of cliphinge {argv[0]} was closed by the program reading it "
            "(a pipe); the command stopped: run it again with its output to a file (a run "
            "continues with --resume)",
            file=sys.stderr,
        )
        return 2


def entry() -> int:
    """The ``cliphinge`` console script and ``python -m avalanche_cliphinge``: ``main`` in a
    process of its own, which a successful command ends without the interpreter's teardown
    (``process``)."""
    process.claim()
    return process.finish(main())


def _stdout_to_devnull() -> None:
    """Point standard output at the null device, so that flushing it at exit cannot fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError):  # no file descriptor (a test's capture)
        pass


def _dispatch(argv: List[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        from .cli import main as run_main

        return run_main(rest, prog="cliphinge run")
    if command == "compare":
        from .compare_cli import main as compare_main

        return compare_main(rest, prog="cliphinge compare")
    if command == "presets":
        return presets_main(rest)
    if command == "predict":
        return predict_main(rest)
    if command == "evaluate":
        from .evaluate import main as evaluate_main

        return evaluate_main(rest)
    if command == "aggregate":
        from .aggregate import main as aggregate_main

        return aggregate_main(rest)
    print(
        f"error: unknown command '{command}'; choose run, compare, presets, evaluate, predict "
        "or aggregate (cliphinge --help)",
        file=sys.stderr,
    )
    return 2
