"""The Flower App's run config, typed and checked: :class:`Settings`.

Both sides use it: the ServerApp and ClientApp read their ``Context.run_config`` with
:meth:`Settings.from_context`, and ``python -m flexlora_plugin.flower.run`` checks the same
config (``flower_app/pyproject.toml`` defaults + the command line) before it builds a model or
starts a SuperLink, so a bad option fails in a second with one line, not in a Flower traceback.
No flwr import here.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from flexlora_plugin.core import FlexLoRAConfig, parse_device, resolve_dtype
from flexlora_plugin.core import package_versions as core_versions
from flexlora_plugin.data import default_data

__all__ = [
    "APP_DIR",
    "DEFAULT_DATA",
    "EXPERIMENT_KEYS",
    "PLACEMENT_KEYS",
    "Settings",
    "SettingsError",
    "app_config",
    "package_versions",
]


def _env_path(name: str, default: Path) -> Path:
    value = os.environ.get(name, "")
    return Path(value).expanduser().resolve() if value else default


def source_checkout() -> Path | None:
    """The folder flexlora-plugin was installed from in editable mode (``pip install -e``), else None.

    Read from the installer's record (PEP 610 ``direct_url.json``), not from where this file sits:
    a wheel install has no source checkout, and nothing here guesses one.
    """
    for dist in importlib.metadata.distributions(name="flexlora-plugin"):  # a build's egg-info has no record: skip it
        try:
            info = json.loads(dist.read_text("direct_url.json") or "{}")
        except json.JSONDecodeError:
            continue
        url = urllib.parse.urlparse(str(info.get("url", "")))
        if (info.get("dir_info") or {}).get("editable") and url.scheme == "file":
            return Path(urllib.parse.unquote(url.path))
    return None


# The Flower App folder: $FLEXLORA_APP_DIR, else flower_app/ of the checkout an editable install
# came from (a wheel install has none: run_simulation(app_dir=...) or FLEXLORA_APP_DIR then).
# The data: $FLEXLORA_DATA, else the sample shipped in the package (flexlora_plugin.data.default_data).
_CHECKOUT = source_checkout()
APP_DIR = _env_path("FLEXLORA_APP_DIR", (_CHECKOUT or Path.cwd()) / "flower_app")
DEFAULT_DATA = default_data().resolve()


EXPERIMENT_KEYS = (
    "strategy",
    "profile",
    "seed",
    "num-server-rounds",
    "clients-per-round",
    "model-path",
    "data-path",
    "lora-alpha",
    "target-modules",
    "local-steps",
    "batch-size",
    "lr",
    "max-length",
    "max-train-examples",
    "dtype",
    "proximal-mu",
    "drop-after-failures",
    "wire-dtype",
    "eval-data",
    "eval-max-per-task",
    "eval-max-new-tokens",
)
"""Run-config keys that define the experiment: recorded with every run and restored on resume
(``python -m flexlora_plugin.flower.run`` refuses a different value unless ``--override`` names it)."""
PLACEMENT_KEYS = (
    "min-nodes",
    "output-dir",
    "resume",
    "allow-legacy-state",
    "resume-override",
    "torch-threads",
    "device",
    "gradient-checkpointing",
    "export-rank",
    "server-device",
    "query-timeout",
    "round-timeout",
    "eval-every",
    "eval-batch-size",
    "dump-dir",
)
"""Run-config keys of where and how a run executes: recorded too, free to change on resume."""


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages a run's numbers depend on, flwr included (recorded with every run)."""
    return core_versions("flwr")


def _export_rank(value: Any) -> str:
    """``export-rank`` as text: ``"max"``, ``"exact"`` or digits (an int 0, its former spelling of exact, is ``"exact"``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return "exact" if value == 0 else str(value)
    return str(value).strip()


class SettingsError(ValueError):
    """A run-config value the run cannot use; the message names the key and what to use instead."""


def app_config(app_dir: Path = APP_DIR) -> dict[str, Any]:
    """The App's run-config defaults: ``[tool.flwr.app.config]`` of ``flower_app/pyproject.toml``.

    Raises
    ------
    SettingsError
        No App there: the package was installed from a wheel (set ``FLEXLORA_APP_DIR``).
    """
    path = app_dir / "pyproject.toml"
    if not path.is_file():
        raise SettingsError(
            f"no Flower App at {app_dir} ({path.name} is missing): install flexlora-plugin from a clone with "
            "`pip install -e .`, or set FLEXLORA_APP_DIR to a flower_app folder (a copy of the repository's)"
        )
    return dict(tomllib.loads(path.read_text(encoding="utf-8"))["tool"]["flwr"]["app"]["config"])


@dataclass(frozen=True)
class Settings:
    """The run config (``[tool.flwr.app.config]`` of ``pyproject.toml``), typed."""

    strategy: str
    profile: str
    seed: int
    num_server_rounds: int
    clients_per_round: int
    min_nodes: int
    model_path: Path
    data_path: Path
    lora_alpha: float
    target_modules: tuple[str, ...]
    local_steps: int
    batch_size: int
    lr: float
    max_length: int
    max_train_examples: int
    output_dir: Path
    resume: bool
    torch_threads: int
    query_timeout: float
    round_timeout: float
    dump_dir: Path | None
    eval_data: Path | None = None
    eval_every: int = 1
    eval_max_per_task: int = 0
    eval_max_new_tokens: int = 32
    eval_batch_size: int = 8
    device: str = "cpu"
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    proximal_mu: float = 0.0
    export_rank: str = "max"  # "max" | "exact" | a positive int, as text
    drop_after_failures: int = 0
    allow_legacy_state: bool = False
    resume_override: tuple[str, ...] = ()  # experiment settings a resumed run may change
    wire_dtype: str = "auto"
    server_device: str = "cpu"

    @classmethod
    def from_context(cls, run_config: Mapping[str, Any], run_id: int) -> Settings:
        """Read and validate the run config; "" paths get their documented defaults.

        Raises
        ------
        SettingsError
            On a missing or ill-typed key, or a value out of range, naming the key.
        """
        try:
            return cls._from_context(dict(run_config), run_id)
        except KeyError as err:
            raise SettingsError(f"run config has no key {err.args[0]!r} (the keys of flower_app/pyproject.toml)") from err
        except (TypeError, ValueError) as err:
            if isinstance(err, SettingsError):
                raise
            raise SettingsError(f"run config: {err}") from err

    @classmethod
    def _from_context(cls, rc: dict[str, Any], run_id: int) -> Settings:
        out = Path(str(rc["output-dir"])) if rc["output-dir"] else Path.cwd() / "runs" / f"flower-{run_id}"
        return cls(
            strategy=str(rc["strategy"]),
            profile=str(rc["profile"]),
            seed=int(rc["seed"]),
            num_server_rounds=int(rc["num-server-rounds"]),
            clients_per_round=int(rc["clients-per-round"]),
            min_nodes=int(rc["min-nodes"]),
            model_path=Path(str(rc["model-path"])) if rc["model-path"] else out / "tiny-llama",
            data_path=Path(str(rc["data-path"])) if rc["data-path"] else DEFAULT_DATA,
            lora_alpha=float(rc["lora-alpha"]),
            target_modules=tuple(t.strip() for t in str(rc["target-modules"]).split(",") if t.strip()),
            local_steps=int(rc["local-steps"]),
            batch_size=int(rc["batch-size"]),
            lr=float(rc["lr"]),
            max_length=int(rc["max-length"]),
            max_train_examples=int(rc["max-train-examples"]),
            output_dir=out,
            resume=bool(rc["resume"]),
            torch_threads=int(rc["torch-threads"]),
            query_timeout=float(rc["query-timeout"]),
            round_timeout=float(rc["round-timeout"]),
            dump_dir=Path(str(rc["dump-dir"])) if rc["dump-dir"] else None,
            eval_data=Path(str(rc["eval-data"])) if rc.get("eval-data") else None,
            eval_every=int(rc.get("eval-every", 1)),
            eval_max_per_task=int(rc.get("eval-max-per-task", 0)),
            eval_max_new_tokens=int(rc.get("eval-max-new-tokens", 32)),
            eval_batch_size=int(rc.get("eval-batch-size", 8)),
            device=str(rc.get("device", "cpu")),
            dtype=str(rc.get("dtype", "float32")),
            gradient_checkpointing=bool(rc.get("gradient-checkpointing", False)),
            proximal_mu=float(rc.get("proximal-mu", 0.0)),
            export_rank=_export_rank(rc.get("export-rank", "max")),
            drop_after_failures=int(rc.get("drop-after-failures", 0)),
            allow_legacy_state=bool(rc.get("allow-legacy-state", False)),
            resume_override=tuple(k.strip() for k in str(rc.get("resume-override", "")).split(",") if k.strip()),
            wire_dtype=str(rc.get("wire-dtype", "auto")),
            server_device=str(rc.get("server-device", "cpu")),
        )

    def __post_init__(self) -> None:
        try:
            resolve_dtype(self.dtype)  # bad names fail here, on the server, before any client starts
            parse_device(self.device)
        except ValueError as err:
            raise SettingsError(str(err)) from err
        if not (self.proximal_mu >= 0.0):
            raise SettingsError(f"proximal-mu must be >= 0, got {self.proximal_mu!r}")
        if self.num_server_rounds < 1:
            raise SettingsError(f"num-server-rounds must be >= 1, got {self.num_server_rounds}")
        for key, value, low in (
            ("clients-per-round", self.clients_per_round, 0),
            ("min-nodes", self.min_nodes, 0),
            ("local-steps", self.local_steps, 0),
            ("batch-size", self.batch_size, 1),
            ("max-length", self.max_length, 1),
            ("eval-every", self.eval_every, 1),
            ("drop-after-failures", self.drop_after_failures, 0),
        ):
            if value < low:
                raise SettingsError(f"{key} must be >= {low}, got {value}")
        if self.export_rank not in ("max", "exact") and not (self.export_rank.isdigit() and int(self.export_rank) > 0):
            raise SettingsError(f"export-rank must be 'max', 'exact' or a positive int, got {self.export_rank!r}")
        if not self.target_modules:
            raise SettingsError("target-modules is empty; e.g. 'q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj'")
        self.flexlora_config()  # an unknown profile, a bad rank table, fedavg with mixed ranks

    def record(self, run_config: Mapping[str, Any]) -> dict[str, Any]:
        """The run's resolved configuration as recorded (``metrics.json``, the server state): every key, paths resolved."""
        out = {k: v for k, v in run_config.items() if isinstance(v, (str, int, float, bool))}
        out.update({"model-path": str(self.model_path), "data-path": str(self.data_path), "output-dir": str(self.output_dir)})
        return out

    @property
    def export_ranks(self) -> str | int:
        """What the final adapter is exported at: ``"max"`` (the largest client rank), ``"exact"``, or a rank."""
        return int(self.export_rank) if self.export_rank.isdigit() else self.export_rank

    def check_paths(self, partitions: int = 1) -> None:
        """Fail when a folder or file the run reads is missing: data (partitions ``0..N-1``), model, eval data.

        ``model-path`` "" is fine: the tiny model is built under ``output-dir``.
        """
        from flexlora_plugin.data import client_file, missing_clients

        if not self.data_path.is_dir():
            raise SettingsError(
                f"data-path {self.data_path} is not a folder (Natural Instructions clients: "
                f"local_training_<i>.json; the default is {DEFAULT_DATA})"
            )
        missing = missing_clients(self.data_path, partitions)
        if missing:
            raise SettingsError(
                f"data-path {self.data_path} has no training file for partition(s) {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''} (e.g. {client_file(self.data_path, missing[0]).name}); "
                f"use fewer nodes or partitions"
            )
        if self.model_path != self.output_dir / "tiny-llama" and not (self.model_path / "config.json").is_file():
            raise SettingsError(
                f"model-path {self.model_path} is not a transformers model folder (no config.json); "
                "build SmolLM2 with python -m flexlora_plugin.tools.models, "
                "or leave model-path empty for the tiny model"
            )
        if self.eval_data is not None and not self.eval_data.is_file():
            raise SettingsError(f"eval-data {self.eval_data} does not exist (e.g. {DEFAULT_DATA / 'heldout_test.json'})")

    def flexlora_config(self) -> FlexLoRAConfig:
        """The core config: ``strategy`` is the method; a JSON ``profile`` is a rank table."""
        table = None
        if self.profile.lstrip().startswith("{"):
            try:
                raw = json.loads(self.profile)
            except json.JSONDecodeError as err:
                raise SettingsError(f"profile looks like a JSON rank table but is not JSON: {err}") from err
            if not isinstance(raw, dict):
                raise SettingsError(
                    f"a JSON profile must be an object {{partition: rank | type | {{module: rank}}}}, got {raw!r}"
                )
            table = raw  # read by the core (parse_rank_table), as in every host
        try:
            return FlexLoRAConfig(
                method=self.strategy,  # type: ignore[arg-type]
                profile="homo" if table is not None else self.profile,
                rank_table=table,
                seed=self.seed,
                lora_alpha=self.lora_alpha,
                target_modules=self.target_modules,
                drop_after_failures=self.drop_after_failures,
                allow_legacy_state=self.allow_legacy_state,
                wire_dtype=self.wire_dtype,
                server_device=self.server_device,
            )
        except ValueError as err:
            raise SettingsError(str(err).removeprefix("FlexLoRAConfig.profile: ")) from err
