"""``CLIPHingeConfig``: every hyper-parameter of the method, with validation.

The key names are the seed's (``configs/cifar100_split.json`` of the original code); the
implementation adds a few (model, prompt and speed keys). Defaults follow the published
starting points listed in docs/config.md (RAPF on CIFAR-100 B0 Inc10 for the
optimiser, hinge margin, threshold and replay budget; CoOp for the prompt length).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .config_checks import MAX_FEATURE_DIM, checked, is_class_name_template, problems

#: ``model_name`` of the built-in tiny CLIP (random weights; ``--preset smoke``), registered
#: with open_clip when ``model.backbone`` is imported.
TINY_MODEL = "cliphinge-tiny"


class ConfigError(ValueError):
    """A configuration value or key that the method cannot use."""


@dataclass
class CLIPHingeConfig:
    """All settings of the method. Build with keywords, ``from_json`` or ``from_dict``.

    Groups: stream layout (``init_class``, ``increment``, ``total_tasks``), stage 1
    (epochs, lr, prompts), Gaussian replay (and how the class Gaussians are stored:
    ``gaussian_storage``, ``gaussian_rank``), text/image hinge, image adapter, stage 2
    (per-task heads, LoRA, fusion), and implementation keys (backbone, caching, precision).
    See docs/config.md for what each key does.
    """

    # --- stream layout -------------------------------------------------------------------
    dataset: str = "cifar100"
    # None: read off the stream (CLIPHingeStrategy takes every experience as it comes; a run
    # of the package's stream builders needs them set, as the presets do)
    init_class: Optional[int] = checked(
        None, minimum=1, nullable="to read it off the stream", maximum=100_000
    )
    increment: Optional[int] = checked(
        None, minimum=1, nullable="to read it off the stream", maximum=100_000
    )
    total_tasks: Optional[int] = checked(
        None, minimum=1, nullable="to read it off the stream", maximum=10_000
    )
    class_order: Any = "icarl"
    # --- stage 1 optimisation ------------------------------------------------------------
    init_epochs: int = checked(15, minimum=0, maximum=10_000)
    epochs: int = checked(15, minimum=0, maximum=10_000)
    batch_size: int = checked(100, minimum=1, maximum=1 << 20)
    lr: float = checked(1e-3, positive=True)
    init_lr: float = checked(1e-3, positive=True)
    weight_decay: float = checked(0.0, minimum=0)
    lr_decay_epochs: List[int] = checked(
        [4, 10], minimum=1, expected="a list of epoch indices >= 1", maximum=10_000
    )
    lr_decay_factor: float = checked(0.1, between=(0, 1))
    seed: int = checked(
        1993, between=(0, 2**32 - 1), expected="in 0..2**32 - 1 (numpy's legacy seeds)"
    )
    # --- prompts ---------------------------------------------------------------------------
    # at most 73: CLIP's 77-token context holds the start and end tokens, the context, at
    # least one token of the class name and the full stop
    n_ctx: int = checked(4, minimum=1, maximum=73)
    ctx_init: str = "a photo of a"
    prompt_template: str = checked(
        "a good photo of a {}.",
        test=is_class_name_template,
        expected="a template with exactly one '{}' for the class name and no other field",
    )
    update_old_text_prompts: bool = False
    returning_class_prompts: str = checked("train", choices=("train", "freeze"))
    # --- Gaussian replay -------------------------------------------------------------------
    samples_per_old_class: int = checked(20, minimum=0)
    replay_classes_per_step: int = checked(0, minimum=0)
    rapf_shrink_cov: bool = False
    covariance_shrinkage: float = checked(0.0, between=(0, 1))
    covariance_jitter: float = checked(1e-4, minimum=0)
    # How each class keeps its sampling factor (ClassGaussians), per class at d = 512:
    # "full": float32 Cholesky factor L, d*d*4 bytes (1 MiB); draws mean + L z, exact.
    # "bf16": L in bfloat16, d*d*2 bytes (512 KiB); a chunk of L is upcast to float32 to
    #   draw: covariance L'L'^T, about 0.3% off (relative Frobenius error).
    # "lowrank": U [d, gaussian_rank] (top eigenvectors times sqrt eigenvalues) and the
    #   diagonal D = diag(cov) - diag(UU^T), d*(gaussian_rank+1)*4 bytes (130 KiB at 64);
    #   draws mean + U z1 + sqrt(D) z2: exact variances, correlations only within the top
    #   gaussian_rank directions (gaussian_rank = d keeps the full covariance).
    gaussian_storage: str = checked(
        "full",
        choices=("full", "bf16", "lowrank"),
        expected="'full' (float32 Cholesky factors, d*d*4 bytes a class), 'bf16' (the same in "
        "bfloat16, half the bytes) or 'lowrank' (rank gaussian_rank plus a diagonal, "
        "d*(gaussian_rank+1)*4 bytes)",
    )
    gaussian_rank: int = checked(64, minimum=1, maximum=MAX_FEATURE_DIM)
    # --- text-side hinge -------------------------------------------------------------------
    text_use_hinge_loss: bool = True
    text_hinge_margin: float = checked(0.1, minimum=0)
    text_hinge_weight: float = checked(1.0, minimum=0)
    # its range follows text_hard_pair_metric (config_checks' joint rules)
    text_hard_pair_threshold: float = 0.85
    text_hard_pair_metric: str = checked(
        "cosine",
        choices=("cosine", "euclidean"),
        expected="'cosine' (pairs above the threshold) or 'euclidean' (pairs of unit text "
        "features closer than the threshold)",
    )
    text_top_hard_pairs: Optional[int] = checked(
        10, minimum=0, nullable="for no cap", maximum=1_000_000
    )
    # besides: at least 1, and at most what fits in memory (config_checks' memory rules)
    hinge_samples_per_pair: int = checked(8, minimum=0)
    hinge_grad_to_old_text: bool = False
    # --- image-side hinge ------------------------------------------------------------------
    use_image_hinge_loss: bool = False
    image_hinge_margin: float = checked(0.1, minimum=0)
    image_hinge_weight: float = checked(1.0, minimum=0)
    image_hard_pair_threshold: float = checked(
        0.8, between=(-1, 1), expected="a cosine similarity in [-1, 1]"
    )
    image_top_hard_pairs: Optional[int] = checked(
        10, minimum=0, nullable="for no cap", maximum=1_000_000
    )
    # --- image adapter ---------------------------------------------------------------------
    use_image_adapter: bool = False
    # --- stage 2 ---------------------------------------------------------------------------
    second_stage_start_task: int = checked(1, minimum=0, maximum=10_000)
    second_stage_epochs: int = checked(5, minimum=0, maximum=10_000)
    second_stage_lr: float = checked(0.01, positive=True)
    second_stage_weight_decay: float = checked(0.0, minimum=0)
    second_stage_momentum: float = checked(0.9, between=(0, 1))
    second_stage_logit_scale: float = checked(20.0, positive=True)
    second_stage_fusion_weight: float = checked(0.3, minimum=0)
    use_lora_in_second_stage: bool = False
    lora_rank: int = checked(8, minimum=1, maximum=4096)
    lora_alpha: float = checked(16.0, positive=True)
    lora_layers: List[int] = checked(
        [10, 11], minimum=0, expected="a list of transformer block indices >= 0", maximum=1000
    )
    # --- backbone and implementation -------------------------------------------------------
    model_name: str = "ViT-B-16-quickgelu"
    pretrained: Optional[str] = checked(
        "openai",
        test=lambda tag: tag is None or tag.strip() != "",
        expected="an open_clip tag (openai), a weights file, or null for random weights",
    )
    allow_activation_mismatch: bool = False
    cache_features: bool = True
    feature_cache_dir: Optional[str] = None
    feature_cache_max_gb: float = checked(8.0, positive=True)
    resize_on_device: bool = False
    compile: bool = True
    # One captured graph per stage-1 step shape (compiled_step.CompiledStep): torch.compile
    # with fullgraph=True of the whole step (forward, losses, backward, Adam), one shape for
    # the run, CUDA graphs on CUDA. Off by default: the eager step's numbers are the
    # reference, and the CUDA path has not been measured yet. A task the captured step
    # cannot run trains eagerly (warned).
    compile_step: bool = False
    num_workers: int = checked(0, minimum=0, maximum=512)
    eval_batch_size: int = checked(256, minimum=1, maximum=1 << 20)
    precision: str = checked("fp32", choices=("fp32", "bf16"))

    # ------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def keys(cls) -> List[str]:
        """Names of every config key, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: Dict[str, Any], source: str = "config") -> "CLIPHingeConfig":
        """Build from a mapping; unknown keys raise ``ConfigError`` naming the closest key."""
        known = set(cls.keys())
        for key in values:
            if key not in known:
                raise ConfigError(unknown_key_message(key, source))
        converted = {k: _coerce(k, v, source) for k, v in values.items()}
        return cls(**converted)

    @classmethod
    def from_json(cls, path: str | Path) -> "CLIPHingeConfig":
        """Read a JSON object of config keys (missing keys keep their defaults).

        ``path`` is a file, or the name of a shipped preset (``cifar100_b0_inc10``; see
        ``list_presets``). A ``"reproduces"`` entry (what the file reproduces, in words) is
        not a config key: it is read by ``config_reproduces`` and skipped here.
        """
        path = resolve_config_path(path)
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"{path} is not UTF-8 text (byte {err.start}: "
                f"{err.object[err.start : err.start + 1]!r}); save it as UTF-8 "
                "JSON"
            ) from None
        except json.JSONDecodeError as err:
            raise ConfigError(
                f"{path} is not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}"
            ) from None
        except RecursionError:
            raise ConfigError(
                f"{path} is not a config: its JSON is nested too deep to read (a config is one "
                "object of config keys, a list at most inside it); pass a preset name or a "
                "JSON config file (cliphinge presets)"
            ) from None
        if not isinstance(values, dict):
            raise ConfigError(
                f"{path} must hold one JSON object of config keys, got {type(values).__name__}"
            )
        values.pop("reproduces", None)
        return cls.from_dict(values, source=str(path))

    def to_dict(self) -> Dict[str, Any]:
        """All keys and values (JSON-serialisable)."""
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialise to JSON text; also write it to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    def replace(self, **changes: Any) -> "CLIPHingeConfig":
        """A copy with ``changes`` applied (validated like any other config)."""
        return self.from_dict({**self.to_dict(), **changes})

    def with_overrides(self, assignments: Sequence[str]) -> "CLIPHingeConfig":
        """Apply ``key=value`` strings (values parsed as JSON, else taken as strings)."""
        changes: Dict[str, Any] = {}
        for item in assignments:
            if "=" not in item:
                raise ConfigError(f"--set expects key=value, got '{item}'")
            key, raw = item.split("=", 1)
            key = key.strip()
            if key not in self.keys():
                raise ConfigError(unknown_key_message(key, "--set"))
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            changes[key] = value
        return self.from_dict({**self.to_dict(), **changes}, source="--set")

    # ------------------------------------------------------------------------------------
    @property
    def n_classes(self) -> Optional[int]:
        """Number of classes the layout covers: ``init_class + increment * (total_tasks - 1)``
        (``None`` while a layout key is left to the stream)."""
        if None in (self.init_class, self.increment, self.total_tasks):
            return None
        return self.init_class + self.increment * (self.total_tasks - 1)

    @property
    def layout_is_set(self) -> bool:
        """Whether ``init_class``, ``increment`` and ``total_tasks`` are all set."""
        return self.n_classes is not None

    def require_layout(self, what: str) -> None:
        """Raise ``ConfigError`` naming the layout keys left to the stream, which ``what``
        (a stream builder) needs set."""
        unset = [k for k in ("init_class", "increment", "total_tasks") if getattr(self, k) is None]
        if unset:
            raise ConfigError(
                f"{what} needs the task layout but {', '.join(unset)} "
                f"{'is' if len(unset) == 1 else 'are'} unset; set "
                f"{' '.join(f'--set {k}=...' for k in unset)} or use a preset "
                "(cliphinge presets)"
            )

    def task_size(self, task: int) -> Optional[int]:
        """Number of classes of task ``task`` (0-based); ``None`` when left to the stream."""
        return self.init_class if task == 0 else self.increment

    def check_class_count(self, n_classes: int, what: str = "the stream") -> None:
        """Raise ``ConfigError`` unless the layout covers exactly ``n_classes`` classes (a
        layout left to the stream covers any)."""
        if self.layout_is_set and self.n_classes != n_classes:
            raise ConfigError(
                f"init_class + increment * (total_tasks - 1) = {self.init_class} + "
                f"{self.increment} * {self.total_tasks - 1} = {self.n_classes}, but {what} has "
                f"{n_classes} classes; change init_class, increment or total_tasks to add up"
            )

    def validate(self) -> None:
        """Type and range checks; raises ``ConfigError`` with the key and the allowed values
        (each key's rules are its field metadata: ``config_checks``)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), "config"))
        problem = next(problems(self), None)
        if problem is not None:
            raise ConfigError(problem)


_TYPES = {f.name: f.type for f in dataclasses.fields(CLIPHingeConfig)}


#: The shipped presets: one JSON file each, holding only what differs from the defaults.
PRESETS_DIR = Path(__file__).resolve().parent / "configs"


def list_presets() -> Dict[str, str]:
    """``{preset name: what it reproduces}`` for every shipped preset, sorted by name."""
    return {path.stem: config_reproduces(path) or "" for path in sorted(PRESETS_DIR.glob("*.json"))}


def resolve_config_path(name_or_path: str | Path) -> Path:
    """The file of a config: an existing path, else the shipped preset of that name.

    Raises:
        ConfigError: neither a file nor a preset; the message lists the presets.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = PRESETS_DIR / f"{path.name.removesuffix('.json')}.json"
    if path.parent == Path(".") and preset.is_file():
        return preset
    close = difflib.get_close_matches(str(name_or_path), list(list_presets()), n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ConfigError(
        f"config '{name_or_path}' is neither a file nor a shipped preset; "
        f"{hint}presets: {', '.join(list_presets())}"
    )


def config_reproduces(name_or_path: str | Path) -> Optional[str]:
    """The ``"reproduces"`` entry of a config file or preset (``None`` when it has none)."""
    try:
        values = json.loads(resolve_config_path(name_or_path).read_text(encoding="utf-8"))
    except (ValueError, OSError, RecursionError):  # the config itself reports a bad file
        return None
    note = values.get("reproduces") if isinstance(values, dict) else None
    return note if isinstance(note, str) else None


#: Keys a user may try for the data folder (``unknown_key_message`` names the options).
DATA_FOLDER_KEYS = ("data_root", "dataset_root", "data_dir", "dataset_dir", "image_folder", "root")


def unknown_key_message(key: str, source: str) -> str:
    """One line for an unknown key, naming the closest known key when there is one (or the
    command-line options, for a key that names the data folder)."""
    if key.lower().replace("-", "_") in DATA_FOLDER_KEYS:
        return (
            f"{source}: unknown config key '{key}'; the data folder is an option of the command, "
            "not a config key: --data-root PATH (your own images: --image-folder PATH, a "
            "folder of class subfolders)"
        )
    same_letters = [k for k in CLIPHingeConfig.keys() if k.lower() == key.lower()]
    close = same_letters or difflib.get_close_matches(key, CLIPHingeConfig.keys(), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "; see docs/config.md"
    return f"{source}: unknown config key '{key}'{hint}"


def _coerce(key: str, value: Any, source: str) -> Any:
    """Check ``value`` against the declared type of ``key``; ints are accepted for floats."""
    kind = _TYPES.get(key)
    bad = ConfigError(
        f"{source}: config key '{key}' expects {kind}, got {value!r} ({type(value).__name__})"
    )
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        value = float(value)
    elif kind == "str":
        if not isinstance(value, str):
            raise bad
    elif kind == "Optional[str]":
        if value is not None and not isinstance(value, str):
            raise bad
    elif kind == "Optional[int]":
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise bad
    elif kind == "List[int]":
        if not isinstance(value, (list, tuple)) or any(
            isinstance(v, bool) or not isinstance(v, int) for v in value
        ):
            raise bad
        value = list(value)
    return value
