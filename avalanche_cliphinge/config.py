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
import math
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

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
    init_class: Optional[int] = None
    increment: Optional[int] = None
    total_tasks: Optional[int] = None
    class_order: Any = "icarl"
    # --- stage 1 optimisation ------------------------------------------------------------
    init_epochs: int = 15
    epochs: int = 15
    batch_size: int = 100
    lr: float = 1e-3
    init_lr: float = 1e-3
    weight_decay: float = 0.0
    lr_decay_epochs: List[int] = field(default_factory=lambda: [4, 10])
    lr_decay_factor: float = 0.1
    seed: int = 1993
    # --- prompts ---------------------------------------------------------------------------
    n_ctx: int = 4
    ctx_init: str = "a photo of a"
    prompt_template: str = "a good photo of a {}."
    update_old_text_prompts: bool = False
    returning_class_prompts: str = "train"
    # --- Gaussian replay -------------------------------------------------------------------
    samples_per_old_class: int = 20
    replay_classes_per_step: int = 0
    rapf_shrink_cov: bool = False
    covariance_shrinkage: float = 0.0
    covariance_jitter: float = 1e-4
    # How each class keeps its sampling factor (ClassGaussians), per class at d = 512:
    # "full": float32 Cholesky factor L, d*d*4 bytes (1 MiB); draws mean + L z, exact.
    # "bf16": L in bfloat16, d*d*2 bytes (512 KiB); a chunk of L is upcast to float32 to
    #   draw: covariance L'L'^T, about 0.3% off (relative Frobenius error).
    # "lowrank": U [d, gaussian_rank] (top eigenvectors times sqrt eigenvalues) and the
    #   diagonal D = diag(cov) - diag(UU^T), d*(gaussian_rank+1)*4 bytes (130 KiB at 64);
    #   draws mean + U z1 + sqrt(D) z2: exact variances, correlations only within the top
    #   gaussian_rank directions (gaussian_rank = d keeps the full covariance).
    gaussian_storage: str = "full"
    gaussian_rank: int = 64
    # --- text-side hinge -------------------------------------------------------------------
    text_use_hinge_loss: bool = True
    text_hinge_margin: float = 0.1
    text_hinge_weight: float = 1.0
    text_hard_pair_threshold: float = 0.85
    text_hard_pair_metric: str = "cosine"
    text_top_hard_pairs: Optional[int] = 10
    hinge_samples_per_pair: int = 8
    hinge_grad_to_old_text: bool = False
    # --- image-side hinge ------------------------------------------------------------------
    use_image_hinge_loss: bool = False
    image_hinge_margin: float = 0.1
    image_hinge_weight: float = 1.0
    image_hard_pair_threshold: float = 0.8
    image_top_hard_pairs: Optional[int] = 10
    # --- image adapter ---------------------------------------------------------------------
    use_image_adapter: bool = False
    # --- stage 2 ---------------------------------------------------------------------------
    second_stage_start_task: int = 1
    second_stage_epochs: int = 5
    second_stage_lr: float = 0.01
    second_stage_weight_decay: float = 0.0
    second_stage_momentum: float = 0.9
    second_stage_logit_scale: float = 20.0
    second_stage_fusion_weight: float = 0.3
    use_lora_in_second_stage: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_layers: List[int] = field(default_factory=lambda: [10, 11])
    # --- backbone and implementation -------------------------------------------------------
    model_name: str = "ViT-B-16-quickgelu"
    pretrained: Optional[str] = "openai"
    allow_activation_mismatch: bool = False
    cache_features: bool = True
    feature_cache_dir: Optional[str] = None
    feature_cache_max_gb: float = 8.0
    resize_on_device: bool = False
    compile: bool = True
    # One captured graph per stage-1 step (compiled_step.CompiledStep): torch.compile with
    # fullgraph=True of the whole step (forward, losses, backward, Adam), CUDA graphs on
    # CUDA. Off by default: the eager step's numbers are the reference, and the CUDA path
    # has not been measured yet. A task the captured step cannot run trains eagerly (warned).
    compile_step: bool = False
    num_workers: int = 0
    eval_batch_size: int = 256
    precision: str = "fp32"

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
        """Type and range checks; raises ``ConfigError`` with the key and the allowed values."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), "config"))
        for key in ["init_class", "increment", "total_tasks"]:
            value = getattr(self, key)
            _require(
                key, value is None or value >= 1, ">= 1, or null to read it off the stream", value
            )
        positive_int = ["batch_size", "n_ctx", "eval_batch_size", "lora_rank", "gaussian_rank"]
        for key in positive_int:
            _require(key, getattr(self, key) >= 1, ">= 1", getattr(self, key))
        non_negative = [
            "init_epochs",
            "epochs",
            "samples_per_old_class",
            "replay_classes_per_step",
            "hinge_samples_per_pair",
            "second_stage_epochs",
            "second_stage_start_task",
            "num_workers",
            "weight_decay",
            "second_stage_weight_decay",
            "text_hinge_weight",
            "image_hinge_weight",
            "second_stage_fusion_weight",
            "covariance_jitter",
            "text_hinge_margin",
            "image_hinge_margin",
        ]
        for key in non_negative:
            _require(key, getattr(self, key) >= 0, ">= 0", getattr(self, key))
        for key in [
            "lr",
            "init_lr",
            "second_stage_lr",
            "second_stage_logit_scale",
            "lora_alpha",
            "feature_cache_max_gb",
        ]:
            value = getattr(self, key)
            _require(key, value > 0 and math.isfinite(value), "> 0 and finite", value)
        for key in ["lr_decay_factor", "second_stage_momentum"]:
            value = getattr(self, key)
            _require(key, 0 <= value <= 1, "in [0, 1]", value)
        _require(
            "covariance_shrinkage",
            0 <= self.covariance_shrinkage <= 1,
            "in [0, 1]",
            self.covariance_shrinkage,
        )
        for key in ["text_top_hard_pairs", "image_top_hard_pairs"]:
            value = getattr(self, key)
            _require(key, value is None or value >= 0, ">= 0, or null for no cap", value)
        _require(
            "text_hard_pair_metric",
            self.text_hard_pair_metric in ("cosine", "euclidean"),
            "'cosine' (pairs above the threshold) or 'euclidean' (pairs of unit text "
            "features closer than the threshold)",
            self.text_hard_pair_metric,
        )
        if self.text_hard_pair_metric == "euclidean":
            _require(
                "text_hard_pair_threshold",
                0 <= self.text_hard_pair_threshold <= 2,
                "a distance between unit vectors in [0, 2] with text_hard_pair_metric 'euclidean'",
                self.text_hard_pair_threshold,
            )
        else:
            _require(
                "text_hard_pair_threshold",
                -1 <= self.text_hard_pair_threshold <= 1,
                "a cosine similarity in [-1, 1]",
                self.text_hard_pair_threshold,
            )
        _require(
            "image_hard_pair_threshold",
            -1 <= self.image_hard_pair_threshold <= 1,
            "a cosine similarity in [-1, 1]",
            self.image_hard_pair_threshold,
        )
        if self.replay_classes_per_step > 0:
            _require(
                "samples_per_old_class",
                self.samples_per_old_class >= 1,
                ">= 1 when replay_classes_per_step > 0 (features per replayed class and step)",
                self.samples_per_old_class,
            )
        _require(
            "gaussian_storage",
            self.gaussian_storage in ("full", "bf16", "lowrank"),
            "'full' (float32 Cholesky factors, d*d*4 bytes a class), 'bf16' (the same in "
            "bfloat16, half the bytes) or 'lowrank' (rank gaussian_rank plus a diagonal, "
            "d*(gaussian_rank+1)*4 bytes)",
            self.gaussian_storage,
        )
        _require(
            "returning_class_prompts",
            self.returning_class_prompts in ("train", "freeze"),
            "'train' or 'freeze'",
            self.returning_class_prompts,
        )
        _require(
            "precision", self.precision in ("fp32", "bf16"), "'fp32' or 'bf16'", self.precision
        )
        _require(
            "lr_decay_epochs",
            all(e >= 1 for e in self.lr_decay_epochs),
            "a list of epoch indices >= 1",
            self.lr_decay_epochs,
        )
        _require(
            "lora_layers",
            all(i >= 0 for i in self.lora_layers),
            "a list of transformer block indices >= 0",
            self.lora_layers,
        )
        _require(
            "prompt_template",
            _template_fields(self.prompt_template) == [("", "", None)],
            "a template with exactly one '{}' for the class name and no other field",
            self.prompt_template,
        )
        _require(
            "pretrained",
            self.pretrained is None or self.pretrained.strip() != "",
            "an open_clip tag (openai), a weights file, or null for random weights",
            self.pretrained,
        )
        self._check_upper_bounds()
        if isinstance(self.class_order, str):
            _require(
                "class_order",
                self.class_order in ("icarl", "rapf", "pycil", "natural")
                or random_order_seed(self.class_order) is not None,
                "'icarl', 'rapf', 'pycil', 'natural', 'random:<seed>' or a list of class ids",
                self.class_order,
            )
        elif not (
            isinstance(self.class_order, list)
            and all(isinstance(c, int) and not isinstance(c, bool) for c in self.class_order)
        ):
            raise ConfigError(
                "class_order must be 'icarl', 'rapf', 'pycil', 'natural', 'random:<seed>' or a "
                f"list of integer class ids, got {self.class_order!r}"
            )

    def _check_upper_bounds(self) -> None:
        """Upper bounds the run can honour: float32 range, the text encoder's context,
        replay and hinge tensors within ``MEMORY_BUDGET_BYTES``, seeds that every generator
        (numpy's legacy one included) accepts, sane epoch and worker counts."""
        for key, kind in _TYPES.items():
            value = getattr(self, key)
            if kind == "float":
                _require(
                    key,
                    math.isfinite(value) and abs(value) <= FLOAT32_MAX,
                    f"finite and within float32's range (|x| <= {FLOAT32_MAX:.4g})",
                    value,
                )
        for key, most in INT_BOUNDS.items():
            value = getattr(self, key)
            values = value if isinstance(value, list) else [value]
            _require(key, all(v is None or v <= most for v in values), f"at most {most}", value)
        _require(
            "seed", 0 <= self.seed < 2**32, "in 0..2**32 - 1 (numpy's legacy seeds)", self.seed
        )
        _require(
            "hinge_samples_per_pair",
            self.hinge_samples_per_pair >= 1,
            ">= 1",
            self.hinge_samples_per_pair,
        )
        # a layout left to the stream is sized as CIFAR-100 for these estimates
        n_classes = self.n_classes if self.layout_is_set else 100
        per_sample = n_classes * MAX_FEATURE_DIM * 4
        most = MEMORY_BUDGET_BYTES // per_sample
        _require(
            "samples_per_old_class",
            self.samples_per_old_class <= most,
            f"at most {most} (replayed {MAX_FEATURE_DIM}-d float32 features of "
            f"{n_classes} classes within {MEMORY_BUDGET_BYTES >> 30} GiB)",
            self.samples_per_old_class,
        )
        # a task's pairs are (new, old): at most n**2 / 4, when half the classes are new
        most_pairs = max(1, n_classes * n_classes // 4)
        caps = [
            most_pairs if cap is None else cap  # None: no cap
            for cap in (self.text_top_hard_pairs, self.image_top_hard_pairs)
        ]
        pairs = max(1, min(max(caps), most_pairs))
        most = MEMORY_BUDGET_BYTES // (pairs * MAX_FEATURE_DIM * 4)
        _require(
            "hinge_samples_per_pair",
            self.hinge_samples_per_pair <= most,
            f"at most {most} (hinge samples of {pairs} pairs, {MAX_FEATURE_DIM}-d float32, "
            f"within {MEMORY_BUDGET_BYTES >> 30} GiB)",
            self.hinge_samples_per_pair,
        )


#: Largest finite float32: every float key must fit (the model computes in float32).
FLOAT32_MAX = 3.4028234663852886e38
#: Memory estimate bounds: replayed and hinge features are at most this many bytes, counted
#: with CLIP's widest image feature (ViT-H/14: 1024).
MEMORY_BUDGET_BYTES = 8 << 30
MAX_FEATURE_DIM = 1024
#: Upper bounds of the integer keys. n_ctx: CLIP's 77-token context holds the start and end
#: tokens, the context, at least one token of the class name and the full stop.
INT_BOUNDS = {
    "init_class": 100_000,
    "increment": 100_000,
    "total_tasks": 10_000,
    "init_epochs": 10_000,
    "epochs": 10_000,
    "second_stage_epochs": 10_000,
    "batch_size": 1 << 20,
    "eval_batch_size": 1 << 20,
    "n_ctx": 73,
    "text_top_hard_pairs": 1_000_000,
    "image_top_hard_pairs": 1_000_000,
    "second_stage_start_task": 10_000,
    "lora_rank": 4096,
    "num_workers": 512,
    "gaussian_rank": MAX_FEATURE_DIM,
    "lr_decay_epochs": 10_000,
    "lora_layers": 1000,
}


def _template_fields(template: str):
    """``(literal, field name, format spec, conversion)`` minus the literal, per field of a
    ``str.format`` template; ``[("?", "?", "?")]`` for a template ``format`` cannot parse."""
    try:
        return [
            (name, spec, conv)
            for _, name, spec, conv in string.Formatter().parse(template)
            if name is not None
        ]
    except ValueError:
        return [("?", "?", "?")]


_TYPES = {f.name: f.type for f in dataclasses.fields(CLIPHingeConfig)}


#: The shipped presets: one JSON file each, holding only what differs from the defaults.
PRESETS_DIR = Path(__file__).resolve().parent / "configs"


def list_presets() -> Dict[str, str]:
    """``{preset name: what it reproduces}`` for every shipped preset, sorted by name."""
    return {path.stem: config_reproduces(path) or "" for path in sorted(PRESETS_DIR.glob("*.json"))}


def random_order_seed(class_order: Any) -> Optional[int]:
    """The seed of a ``"random:<seed>"`` class order (0 <= seed < 2**32), else ``None``."""
    if not isinstance(class_order, str) or not class_order.startswith("random:"):
        return None
    digits = class_order[len("random:") :]
    if not digits.isascii() or not digits.isdigit() or int(digits) >= 2**32:
        return None
    return int(digits)


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


def _require(key: str, ok: bool, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' must be {expected}, got {value!r}")


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
