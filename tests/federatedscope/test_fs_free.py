"""FS-free pieces of the FederatedScope host: rank tables, config translation, shim file handling.

These run without FederatedScope (the main venv) and with it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flexlora_plugin.core import ProfileError, sample_ranks
from tests.federatedscope._util import fs_installed, load_fs_free

pytestmark = pytest.mark.federatedscope

config = load_fs_free("config")
shim = load_fs_free("shim")

FLEX = {name: default for name, (default, _) in config.FIELDS.items()}
SHAPES = {
    "base_model.model.model.layers.0.self_attn.q_proj": (64, 64),
    "base_model.model.model.layers.0.self_attn.v_proj": (32, 64),
}


def test_rank_table_entries(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("1: 4\n2: r8\n3: {q_proj: 2, v_proj: 6}\ndefault: 16\n")
    table, default = config.load_rank_table(path, ["q_proj", "v_proj"])
    assert table == {1: {"q_proj": 4, "v_proj": 4}, 2: "r8", 3: {"q_proj": 2, "v_proj": 6}}
    sampler = config.to_core_config(
        FLEX, method="flexlora", lora_alpha=16, table=table, default=default, rank=8, targets=["q_proj", "v_proj"]
    ).sampler()
    assert set(sample_ranks(sampler, 3, 0, shapes=SHAPES).values()) == {2, 6}
    assert set(sample_ranks(sampler, 9, 0, shapes=SHAPES).values()) == {16}  # default
    assert set(sample_ranks(sampler, 2, 0, shapes=SHAPES).values()) == {8}


def test_rank_table_json_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "t.json"
    good.write_text('{"1": 4, "2": 8}')
    assert config.load_rank_table(good, ["q_proj"])[0] == {1: {"q_proj": 4}, 2: {"q_proj": 8}}
    for text, match in [
        ("0: 4\n", "start at 1"),
        ("a: 4\n", "integers"),
        ("1: 0\n", ">= 1"),
        ("1: nope\n", "nope"),
        ("[1, 2]\n", "mapping"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises((ValueError, ProfileError), match=match):
            config.load_rank_table(bad, ["q_proj"])
    with pytest.raises(FileNotFoundError, match="rank_table"):
        config.load_rank_table(tmp_path / "missing.yaml", ["q_proj"])


def test_homogeneous_profile_uses_adapter_rank() -> None:
    def sampler(profile):
        flex = {**FLEX, "profile": profile}
        return config.to_core_config(flex, method="flexlora", lora_alpha=16, rank=8, targets=["q_proj", "v_proj"]).sampler()

    assert set(sample_ranks(sampler(""), 5, 0, shapes=SHAPES).values()) == {8}
    assert sample_ranks(sampler("heavy_tail_strong"), 5, 0) == sample_ranks("heavy_tail_strong", 5, 0)


def test_to_core_config() -> None:
    core = config.to_core_config({**FLEX, "profile": "uniform", "seed": 3}, method="flexlora", lora_alpha=16)
    assert (core.method, core.profile, core.seed, core.lora_alpha, core.hetlora_max_rank) == (
        "flexlora",
        "uniform",
        3,
        16.0,
        None,
    )
    het = config.to_core_config({**FLEX, "hetlora_max_rank": 32, "hetlora_weighting": "norm"}, method="hetlora", lora_alpha=8)
    assert het.aggregate_kwargs()["max_rank"] == 32 and het.hetlora_weighting == "norm" and het.profile == "homo"
    with pytest.raises(ValueError, match="not served"):
        config.to_core_config(FLEX, method="fedavg", lora_alpha=16)
    with pytest.raises(ValueError, match="compute_dtype"):
        config.to_core_config({**FLEX, "compute_dtype": "float16"}, method="flexlora", lora_alpha=16)
    assert config.to_core_config({**FLEX, "server_device": "cuda:1"}, method="flexlora", lora_alpha=16).server_device == "cuda:1"
    with pytest.raises(ValueError, match="server_device: device must be"):
        config.to_core_config({**FLEX, "server_device": "gpu"}, method="flexlora", lora_alpha=16)


def test_every_field_has_a_description() -> None:
    assert all(isinstance(desc, str) and desc for _, desc in config.FIELDS.values())


def _fake_fs(tmp_path: Path) -> Path:
    fs_dir = tmp_path / "federatedscope"
    (fs_dir / "contrib" / "configs").mkdir(parents=True)
    (fs_dir / "contrib" / "configs" / "__init__.py").write_text("")
    return fs_dir


def test_shim_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fs_dir = _fake_fs(tmp_path)
    assert shim.status(fs_dir) == "absent"
    assert shim.main(["install", "--fs-dir", str(fs_dir)]) == 0
    path = shim.shim_path(fs_dir)
    assert shim.status(fs_dir) == "installed" and path.read_text() == shim.SHIM_SOURCE
    compile(shim.SHIM_SOURCE, str(path), "exec")
    assert "import flexlora_plugin.federatedscope" in shim.SHIM_SOURCE and "raise RuntimeError" in shim.SHIM_SOURCE
    assert shim.main(["install", "--fs-dir", str(fs_dir)]) == 0  # idempotent
    assert shim.main(["status", "--fs-dir", str(fs_dir)]) == 0
    assert "installed" in capsys.readouterr().out
    assert shim.main(["remove", "--fs-dir", str(fs_dir)]) == 0
    assert not path.exists() and shim.status(fs_dir) == "absent"
    assert shim.main(["remove", "--fs-dir", str(fs_dir)]) == 0
    assert "no shim" in capsys.readouterr().out


def test_shim_refuses_foreign_file_and_non_fs_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fs_dir = _fake_fs(tmp_path)
    shim.shim_path(fs_dir).write_text("print('mine')\n")
    assert shim.status(fs_dir) == "foreign"
    assert shim.main(["install", "--fs-dir", str(fs_dir)]) == 2
    assert shim.main(["remove", "--fs-dir", str(fs_dir)]) == 2
    assert shim.shim_path(fs_dir).read_text() == "print('mine')\n"
    assert shim.main(["install", "--fs-dir", str(tmp_path / "nope")]) == 2
    assert "not a FederatedScope package folder" in capsys.readouterr().err


def test_clear_errors_without_federatedscope(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where FS is absent the import fails with a clear message; where present, the check is simulated."""
    if fs_installed():
        import importlib.util as iu

        from flexlora_plugin.federatedscope import FSNotAvailableError, require_federatedscope

        real = iu.find_spec
        monkeypatch.setattr(iu, "find_spec", lambda name, *a: None if name == "federatedscope.llm" else real(name, *a))
        with pytest.raises(FSNotAvailableError, match="has no federatedscope.llm"):
            require_federatedscope()
        monkeypatch.setattr(iu, "find_spec", lambda name, *a: None if name.startswith("federatedscope") else real(name, *a))
        with pytest.raises(FSNotAvailableError, match="needs FederatedScope"):
            require_federatedscope()
        with pytest.raises(ModuleNotFoundError, match="not importable"):
            shim.fs_package_dir()
        return
    with pytest.raises(ImportError, match="needs FederatedScope"):
        import flexlora_plugin.federatedscope  # noqa: F401
    with pytest.raises(ModuleNotFoundError, match="not importable"):
        shim.fs_package_dir()


def test_input_paths_fall_back_to_the_yaml_folder_and_bases_are_absolute(tmp_path: Path, monkeypatch) -> None:
    yaml_dir = tmp_path / "configs"
    (yaml_dir / "tables").mkdir(parents=True)
    (yaml_dir / "tables" / "t.yaml").write_text("default: 4\n")
    run_dir = tmp_path / "run"
    (run_dir / "here.yaml").parent.mkdir()
    (run_dir / "here.yaml").write_text("default: 4\n")
    monkeypatch.chdir(run_dir)
    assert config.resolve_input_path("tables/t.yaml", yaml_dir) == str(yaml_dir / "tables" / "t.yaml")
    assert config.resolve_input_path("here.yaml", yaml_dir) is None  # the current directory comes first, as in FS
    assert config.resolve_input_path("missing.yaml", yaml_dir) is None  # nowhere: left for the error naming it
    assert config.resolve_input_path(str(yaml_dir / "tables" / "t.yaml"), yaml_dir) is None  # absolute: unchanged
    assert config.yaml_dir(["main.py", "--cfg", "../configs/x.yaml"]) == yaml_dir
    assert config.yaml_dir(["main.py", "--cfg=../configs/x.yaml"]) == yaml_dir and config.yaml_dir(["main.py"]) is None
    with config.using_cfg_file(str(yaml_dir / "x.yaml")):
        assert config.yaml_dir() == yaml_dir
    assert config.base_model_name("here.yaml") == str(run_dir / "here.yaml")
    assert config.base_model_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_flexlora_fs_without_federatedscope_is_one_line_and_exit_2(capsys):
    """In the Flower environment (FederatedScope cannot be installed there) the console script says so, no traceback."""
    import importlib.util

    from flexlora_plugin._cli import flexlora_fs

    if importlib.util.find_spec("federatedscope") is not None:
        pytest.skip("FederatedScope is installed here")
    assert flexlora_fs() == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flexlora-fs: flexlora_plugin.federatedscope needs FederatedScope") and "\n" not in err
