"""Python configs: _base_ inheritance, _delete_, --cfg-options typing, schema errors naming key and file."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pce.engine import ConfigError, config_to_dict, dump_config, format_config, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.py"))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """child.py -> _base_/mid.py -> _base_/models/root.py (+ _base_/runtime.py)."""
    write(tmp_path / "_base_/models/root.py", """
        import math  # modules and private names are not config keys
        _private = 3
        task = "classification"
        model = dict(backbone="pce_fmnist", num_classes=10,
                     backbone_overrides=dict(stem_channels=16, top_k=1), head=dict(dropout=0.1))
        optimizer = dict(type="sgd", lr=0.1, momentum=0.9)
    """)
    write(tmp_path / "_base_/runtime.py", """
        runtime = dict(seed=7, log_interval=5)
    """)
    write(tmp_path / "_base_/mid.py", """
        _base_ = "./models/root.py"
        model = dict(num_classes=20, backbone_overrides=dict(num_experts=8))
        optimizer = dict(lr=0.05)
        schedule = dict(epochs=4)
    """)
    return write(tmp_path / "child.py", """
        _base_ = ["_base_/mid.py", "_base_/runtime.py"]
        optimizer = dict(weight_decay=0.0)
        runtime = dict(log_interval=2)
    """)


def test_multilevel_inheritance(tree: Path):
    cfg = load_config(tree)
    assert cfg.task == "classification"
    assert cfg.model.backbone == "pce_fmnist"                         # root
    assert cfg.model.num_classes == 20                                # mid overrides root
    assert dict(cfg.model.backbone_overrides) == {"stem_channels": 16, "top_k": 1, "num_experts": 8}  # merged
    assert cfg.optimizer.lr == 0.05 and cfg.optimizer.momentum == 0.9 and cfg.optimizer.weight_decay == 0.0
    assert cfg.schedule.epochs == 4
    assert cfg.runtime.seed == 7 and cfg.runtime.log_interval == 2   # second base, then child
    assert cfg.optimizer.grad_clip == 0.0                             # schema default
    assert cfg.runtime.work_dir == "work_dirs/child"
    assert "math" not in cfg and "_private" not in cfg
    assert cfg.is_frozen()


def test_delete_replaces_base_dict(tree: Path, tmp_path: Path):
    child = write(tmp_path / "del.py", """
        _base_ = ["_base_/mid.py"]
        model = dict(backbone_overrides=dict(_delete_=True, num_experts=2))
    """)
    cfg = load_config(child)
    assert dict(cfg.model.backbone_overrides) == {"num_experts": 2}
    assert cfg.model.num_classes == 20  # only the marked dict is replaced
    # _delete_ on a schema section: keys the child does not give fall back to the schema defaults
    child2 = write(tmp_path / "del2.py", """
        _base_ = ["_base_/mid.py"]
        optimizer = dict(_delete_=True, type="adamw")
    """)
    cfg2 = load_config(child2)
    assert cfg2.optimizer.type == "adamw" and cfg2.optimizer.lr == 0.1 and cfg2.optimizer.momentum == 0.9


def test_override_typing(tree: Path):
    cfg = load_config(tree, ["optimizer.lr=0.01", "schedule.epochs=3", "eval.topk=(1, 3)", "runtime.work_dir=/tmp/x",
                             "runtime.deterministic=True", "optimizer.grad_clip=1", "model.backbone_overrides.top_k=2",
                             "model.head.spp_levels=[1, 2]", "model.backbone=pce_tiny", "data.root=data/a b"])
    assert cfg.optimizer.lr == 0.01 and isinstance(cfg.optimizer.lr, float)
    assert cfg.schedule.epochs == 3 and isinstance(cfg.schedule.epochs, int)
    assert cfg.eval.topk == (1, 3)
    assert cfg.runtime.work_dir == "/tmp/x"
    assert cfg.runtime.deterministic is True
    assert cfg.optimizer.grad_clip == 1.0 and isinstance(cfg.optimizer.grad_clip, float)  # int -> float
    assert cfg.model.backbone_overrides.top_k == 2
    assert cfg.model.head.spp_levels == [1, 2]
    assert cfg.model.backbone == "pce_tiny" and cfg.data.root == "data/a b"
    # yacs merge_from_list style and typed tuples / mappings
    assert parse_overrides(["optimizer.lr", "0.5"]) == [("optimizer.lr", 0.5)]
    assert parse_overrides({"runtime.work_dir": "123"}) == [("runtime.work_dir", "123")]
    assert load_config(tree, [("runtime.work_dir", "123")]).runtime.work_dir == "123"


def test_override_list_index(tmp_path: Path):
    cfg_path = write(tmp_path / "p.py", """
        schedule = dict(epochs=5)
        phases = [dict(name="a", epochs=2, router_override="uniform"), dict(name="b", epochs=-1)]
    """)
    cfg = load_config(cfg_path, ["phases.0.epochs=1", "phases.1.lr_mult=0.5"])
    assert [p["epochs"] for p in cfg.phases] == [1, -1]
    assert cfg.phases[1]["lr_mult"] == 0.5 and cfg.phases[1]["keys_trainable"] is None
    with pytest.raises(ConfigError, match="index 5 out of range"):
        load_config(cfg_path, ["phases.5.epochs=1"])
    assert cfg.phases[1]["upcycle"] is False and load_config(cfg_path, ["phases.1.upcycle=True"]).phases[1]["upcycle"]
    with pytest.raises(ConfigError, match=r"'phases.1.upcycle' .* expects bool"):
        load_config(cfg_path, ["phases.1.upcycle='yes'"])
    with pytest.raises(ConfigError, match=r"'phases.0.router_override' .* must be one of"):
        load_config(cfg_path, ["phases.0.router_override='sharde'"])


def test_unknown_key_names_key_and_file(tree: Path, tmp_path: Path):
    bad = write(tmp_path / "bad.py", """
        _base_ = ["child.py"]
        optimizer = dict(lrr=0.1)
    """)
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert "optimizer.lrr" in str(e.value) and str(bad) in str(e.value)
    # set in a base file: the base file is named
    bad_base = write(tmp_path / "_base_/bad_base.py", "runtime = dict(sede=1)\n")
    child = write(tmp_path / "c2.py", '_base_ = ["_base_/bad_base.py"]\n')
    with pytest.raises(ConfigError) as e:
        load_config(child)
    assert "runtime.sede" in str(e.value) and str(bad_base.resolve()) in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(tree, ["optimizer.momentom=0.5"])
    assert "optimizer.momentom" in str(e.value) and "--cfg-options" in str(e.value)
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        load_config(tree, ["modle.backbone=x"])


def test_wrong_type_names_key_and_file(tree: Path, tmp_path: Path):
    bad = write(tmp_path / "bad_type.py", """
        _base_ = ["child.py"]
        schedule = dict(epochs="ten")
    """)
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    msg = str(e.value)
    assert "schedule.epochs" in msg and str(bad) in msg and "int" in msg and "'ten'" in msg
    with pytest.raises(ConfigError, match=r"optimizer\.lr.*--cfg-options"):
        load_config(tree, ["optimizer.lr=fast"])
    with pytest.raises(ConfigError, match="runtime.deterministic"):
        load_config(tree, ["runtime.deterministic=1"])
    with pytest.raises(ConfigError, match=r"'optimizer' .* is a section"):
        load_config(tree, ["optimizer=3"])
    with pytest.raises(ConfigError, match=r"optimizer\.type.*must be one of"):
        load_config(tree, ["optimizer.type=rmsprop"])


def test_phase_validation(tmp_path: Path):
    p = write(tmp_path / "ph.py", """
        schedule = dict(epochs=4)
        phases = [dict(name="a", epochs=1, router_override="uniform"), dict(name="b", epochs=2)]
    """)
    with pytest.raises(ConfigError, match=r"add up to 3, but schedule.epochs is 4"):
        load_config(p)
    assert [ph["name"] for ph in load_config(p, ["schedule.epochs=3"]).phases] == ["a", "b"]
    with pytest.raises(ConfigError, match=r"phases.0.keys_trainabel"):
        load_config(p, ["schedule.epochs=3", "phases.0={'keys_trainabel': True}"])
    with pytest.raises(ConfigError, match=r"phases.0.router_override.*must be one of"):
        load_config(p, ["schedule.epochs=3", "phases.0.router_override=random"])


def test_circular_base(tmp_path: Path):
    write(tmp_path / "a.py", '_base_ = ["b.py"]\n')
    write(tmp_path / "b.py", '_base_ = ["a.py"]\n')
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.py")
    with pytest.raises(ConfigError, match="_base_ file not found"):
        load_config(write(tmp_path / "m.py", '_base_ = ["nope.py"]\n'))


@pytest.mark.parametrize("suffix", [".py", ".yaml"])
def test_dump_reload_roundtrip(tree: Path, tmp_path: Path, suffix: str):
    cfg = load_config(REPO / "configs/demo_cls_digits.py", ["optimizer.lr=0.02"])
    out = dump_config(cfg, tmp_path / f"dumped{suffix}")
    again = load_config(out)
    assert config_to_dict(again) == config_to_dict(cfg)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path: Path):
    cfg = load_config(path)
    assert cfg.task in ("classification", "detection", "segmentation")
    assert config_to_dict(load_config(path, [("runtime.work_dir", "x")]))["runtime"]["work_dir"] == "x"
    assert format_config(cfg).startswith("#")
