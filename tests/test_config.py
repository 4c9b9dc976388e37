"""CLIPHingeConfig: keys, JSON round trip, and the errors a researcher in a hurry sees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from avalanche_cliphinge import CLIPHingeConfig, ConfigError

REPO = Path(__file__).resolve().parents[1]

#: the seed's key names (its configs/cifar100_split.json), every one of which must exist.
SEED_KEYS = """dataset init_class increment total_tasks init_epochs epochs batch_size lr init_lr
weight_decay seed text_use_hinge_loss text_hinge_margin text_hinge_weight
text_hard_pair_threshold text_top_hard_pairs use_image_hinge_loss image_hinge_margin
image_hinge_weight image_hard_pair_threshold image_top_hard_pairs update_old_text_prompts
samples_per_old_class use_image_adapter second_stage_epochs second_stage_lr
second_stage_weight_decay second_stage_momentum second_stage_logit_scale
second_stage_fusion_weight use_lora_in_second_stage lora_rank lora_alpha lora_layers""".split()
#: ... plus the implementation keys the section names.
IMPLEMENTATION_KEYS = [
    "model_name",
    "pretrained",
    "n_ctx",
    "ctx_init",
    "class_order",
    "prompt_template",
    "num_workers",
    "precision",
]


def test_defaults_are_valid_and_serialisable():
    config = CLIPHingeConfig()
    config.validate()
    values = json.loads(config.to_json())
    assert set(values) == set(CLIPHingeConfig.keys())
    assert CLIPHingeConfig.from_dict(values) == config


def test_every_design_key_exists():
    keys = CLIPHingeConfig.keys()
    assert len(SEED_KEYS) == 34
    missing = [k for k in SEED_KEYS + IMPLEMENTATION_KEYS if k not in keys]
    assert missing == []
    assert len(keys) == len(set(keys))


def test_json_round_trip(tmp_path):
    config = CLIPHingeConfig(
        init_class=20,
        increment=20,
        total_tasks=5,
        lr=3e-4,
        text_hinge_margin=0.25,
        lora_layers=[0, 3],
        class_order=[2, 0, 1],
        pretrained=None,
        ctx_init="",
        use_image_adapter=True,
    )
    path = tmp_path / "run.json"
    text = config.to_json(path)
    assert path.read_text() == text
    loaded = CLIPHingeConfig.from_json(path)
    assert loaded == config
    assert loaded.lora_layers == [0, 3] and loaded.pretrained is None
    assert loaded.to_dict() == config.to_dict()


def test_json_keeps_defaults_for_missing_keys(tmp_path):
    path = tmp_path / "partial.json"
    path.write_text(json.dumps({"epochs": 3, "lr": 1}))
    config = CLIPHingeConfig.from_json(path)
    assert config.epochs == 3
    assert config.lr == 1.0 and isinstance(config.lr, float)  # ints are accepted for floats
    assert config.init_epochs == CLIPHingeConfig().init_epochs


@pytest.mark.parametrize(
    "content,match", [("{not json", "not valid JSON"), ("[1, 2]", "one JSON object")]
)
def test_bad_json_files_raise_config_error(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=match):
        CLIPHingeConfig.from_json(path)


def test_missing_json_file_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.json"):
        CLIPHingeConfig.from_json(tmp_path / "nowhere.json")


def test_unknown_key_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'text_hinge_margin'"):
        CLIPHingeConfig.from_dict({"text_hinge_margn": 0.2})
    path = tmp_path / "typo.json"
    path.write_text(json.dumps({"samples_per_old_clas": 5}))
    with pytest.raises(ConfigError, match="typo.json.*did you mean 'samples_per_old_class'"):
        CLIPHingeConfig.from_json(path)
    with pytest.raises(ConfigError, match="did you mean 'lora_rank'"):
        CLIPHingeConfig().with_overrides(["lora_rnk=4"])
    with pytest.raises(ConfigError, match="unknown config key 'zzzzzz'"):
        CLIPHingeConfig.from_dict({"zzzzzz": 1})


@pytest.mark.parametrize(
    "key,value",
    [
        ("epochs", "5"),
        ("update_old_text_prompts", 1),
        ("epochs", True),
        ("epochs", 5.0),
        ("lr", "0.1"),
        ("lora_layers", [1.5]),
        ("lora_layers", 3),
        ("ctx_init", 4),
        ("pretrained", 7),
    ],
)
def test_wrong_type_names_the_key(key, value):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        CLIPHingeConfig(**{key: value})
    with pytest.raises(ConfigError, match=f"'{key}'"):
        CLIPHingeConfig.from_dict({key: value})


@pytest.mark.parametrize(
    "key,value",
    [
        ("lr", 0),
        ("init_lr", -1e-3),
        ("second_stage_lr", 0.0),
        ("text_hard_pair_threshold", 1.5),
        ("image_hard_pair_threshold", -1.01),
        ("precision", "fp16"),
        ("init_class", 0),
        ("batch_size", 0),
        ("epochs", -1),
        ("samples_per_old_class", -5),
        ("second_stage_momentum", 1.5),
        ("covariance_shrinkage", 2.0),
        ("lora_layers", [-1]),
        ("prompt_template", "a photo of a cat"),
        ("class_order", "random"),
        ("class_order", [0, "1"]),
    ],
)
def test_out_of_range_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        CLIPHingeConfig(**{key: value})


def test_edge_values_inside_the_ranges_are_accepted():
    config = CLIPHingeConfig(
        text_hard_pair_threshold=1.0,
        image_hard_pair_threshold=-1.0,
        epochs=0,
        second_stage_epochs=0,
        samples_per_old_class=0,
        precision="bf16",
        class_order="pycil",
        pretrained=None,
    )
    assert config.text_hard_pair_threshold == 1.0 and config.precision == "bf16"


def test_check_class_count_message():
    config = CLIPHingeConfig(init_class=10, increment=10, total_tasks=10)
    assert config.n_classes == 100
    config.check_class_count(100)
    with pytest.raises(ConfigError) as info:
        config.check_class_count(90, "CIFAR-90")
    message = str(info.value)
    assert "10 + 10 * 9 = 100" in message
    assert "CIFAR-90 has 90 classes" in message
    assert "init_class" in message and "total_tasks" in message
    b50 = CLIPHingeConfig(init_class=50, increment=5, total_tasks=11)
    assert b50.n_classes == 100 and [b50.task_size(t) for t in (0, 1, 10)] == [50, 5, 5]


def test_with_overrides_parses_json_values_or_keeps_strings():
    base = CLIPHingeConfig()
    config = base.with_overrides(
        [
            "epochs=3",
            "lora_layers=[1]",
            "ctx_init=a photo",
            "pretrained=null",
            "use_image_adapter=true",
            "lr=0.5",
        ]
    )
    assert config.epochs == 3 and config.lora_layers == [1] and config.ctx_init == "a photo"
    assert config.pretrained is None and config.use_image_adapter is True and config.lr == 0.5
    assert base.epochs == CLIPHingeConfig().epochs and base.lora_layers == [10, 11]  # untouched
    with pytest.raises(ConfigError, match="key=value"):
        base.with_overrides(["epochs"])
    with pytest.raises(ConfigError, match="'epochs'"):
        base.with_overrides(["epochs=three"])
    with pytest.raises(ConfigError, match="'lr'"):
        base.with_overrides(["lr=0"])


def test_replace_validates():
    config = CLIPHingeConfig().replace(epochs=2)
    assert config.epochs == 2
    with pytest.raises(ConfigError, match="'epochs'"):
        CLIPHingeConfig().replace(epochs="2")


def test_cifar100_experiment_config_is_b0_inc10_in_10_tasks():
    path = REPO / "avalanche_cliphinge" / "configs" / "cifar100_b0_inc10.json"
    assert path.is_file(), f"{path} is missing (the CIFAR-100 reproduction config)"
    raw = json.loads(path.read_text())
    assert set(raw) - {"reproduces"} <= set(CLIPHingeConfig.keys())
    config = CLIPHingeConfig.from_json("cifar100_b0_inc10")
    assert "cifar100" in config.dataset.lower().replace("-", "").replace("_", "")
    assert (config.init_class, config.increment, config.total_tasks) == (10, 10, 10)
    assert config.n_classes == 100
