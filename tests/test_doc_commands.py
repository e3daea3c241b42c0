"""Every fenced shell command in README.md and docs/ runs as written: its arguments parse, its files exist.

Each command is read as a shell would (continuation lines joined, comments and redirections
dropped) and checked against the program it names:

* our command lines (``flexlora_plugin.flower.run``, ``evaluate``, ``models``, the FS shim, the
  ``benchmarks/`` scripts): the documented arguments go through the program's own argparse parser;
* ``make T``: T is a Makefile target; ``python -m pytest P``: P exists; ``python -c CODE``: CODE compiles;
* ``flexlora-fs --cfg F key value ...``: F exists and the rest pairs up;
* Flower's ``flwr``, ``flower-superlink`` and ``flower-supernode``: ``--help`` runs (where flwr is installed).

And the environment rule: ``python``, ``flwr``, ``flower-*``, ``flexlora-fs`` and ``pytest`` may
appear bare only after the page has shown how to enter the environment (``. X/bin/activate``);
before that, commands name ``.venv/bin/python``. A program not handled here fails the test, so
a new kind of documented command needs a check.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "docs" / "tutorials").glob("*.md"))]
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
ACTIVATE = re.compile(r"^(\.|source)\s+\S*bin/activate\b")
NEEDS_ENV = ("python", "flwr", "flower-superlink", "flower-supernode", "flexlora-fs", "pytest")
BUILTINS = {
    "echo",
    "export",
    "mkdir",
    "cat",
    "kill",
    "for",
    "until",
    "done",
    "tac",
    "cd",
    "pip",
    "python3",
    "ls",
    "rm",
    "diff",
    ".venv/bin/pip",
    "printf",
}
SYSTEM_TOOLS = ("openssl", "ssh-keygen")  # the TLS recipe: present on the machine, openssl's subcommand exists
STOP_TOKENS = {">", ">>", "2>&1", "&", "|", "&&", ";", "2>", "1>"}


@dataclass(frozen=True)
class Command:
    page: str
    line: int
    argv: tuple[str, ...]
    activated: bool

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {' '.join(self.argv)}"


def _commands(page: Path) -> list[Command]:
    out: list[Command] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    in_block, lang, activated, heredoc = False, "", False, None
    pending, start = "", 0
    for no, raw in enumerate(lines, 1):
        fence = re.match(r"^\s*```(\w*)", raw)
        if fence:
            in_block, lang = (not in_block, fence.group(1)) if not in_block else (False, "")
            continue
        if not in_block or lang not in SHELL_LANGS:
            continue
        if heredoc is not None:
            heredoc = None if raw.strip() == heredoc else heredoc
            continue
        text = raw.strip()
        if not pending:
            start = no
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        text, pending = pending + text, ""
        if ACTIVATE.match(text):
            activated = True
            continue
        marker = re.search(r"<<\s*'?(\w+)'?", text)
        if marker:
            heredoc = marker.group(1)
        try:
            tokens = shlex.split(text, comments=True)
        except ValueError as err:
            raise AssertionError(f"{page.name}:{no}: cannot split {text!r}: {err}") from err
        argv = []
        for tok in tokens:
            if tok in STOP_TOKENS or tok.startswith(">") or tok.startswith("2>"):
                break
            argv.append(tok)
        while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):  # VAR=value prefixes
            argv.pop(0)
        if argv:
            out.append(Command(page.relative_to(REPO).as_posix(), start, tuple(argv), activated))
    return out


COMMANDS = [c for page in PAGES for c in _commands(page)]


def test_the_pages_have_commands():
    assert len(COMMANDS) > 40 and {c.page for c in COMMANDS} >= {"README.md", "docs/tutorials/flower.md"}


def _script(path: Path):
    name = f"doc_{path.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        sys.path.insert(0, str(path.parent))
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        finally:
            sys.path.remove(str(path.parent))
    return sys.modules[name]


def _parse_ok(parse, args, cmd) -> None:
    try:
        parse(list(args))
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise AssertionError(f"{cmd}: its arguments do not parse (exit {stop.code})") from stop


def _module_parser(module: str):
    if module == "flexlora_plugin.flower.run":
        pytest.importorskip("flwr", reason="the Flower runner needs flwr")
        from flexlora_plugin.tools.flower_run import build_parser
    elif module == "flexlora_plugin.evaluate":
        from flexlora_plugin.tools.evaluate import build_parser
    elif module == "flexlora_plugin.tools.models":
        from flexlora_plugin.tools.models import build_parser
    elif module == "flexlora_plugin.tools.tiny":
        from flexlora_plugin.tools.tiny import build_parser
    elif module == "flexlora_plugin.data":
        from flexlora_plugin.data import build_parser
    elif module == "flexlora_plugin.federatedscope.shim":
        pytest.importorskip("federatedscope", reason="the FS shim needs FederatedScope")
        from flexlora_plugin.federatedscope.shim import build_parser
    else:
        raise AssertionError(f"no check for python -m {module}: add one to {Path(__file__).name}")
    return build_parser().parse_args


def _check_python(cmd: Command, args: tuple[str, ...]) -> None:
    if args[:2] == ("-m", "venv"):
        return
    if args[:2] == ("-m", "pytest"):
        for path in (a for a in args[2:] if not a.startswith("-")):
            assert (REPO / path).exists(), f"{cmd}: {path} does not exist"
        return
    if args[0] == "-m":
        return _parse_ok(_module_parser(args[1]), args[2:], cmd)
    if args[0] == "-c":
        compile(args[1], str(cmd), "exec")
        return
    script = args[0]
    if script.endswith("/main.py") and "federatedscope" in script:  # FS's own main.py, found at run time
        cfg = args[args.index("--cfg") + 1].replace("/path/to/flexlora-plugin/", "")  # the placeholder of the repo's path
        assert (REPO / cfg).is_file(), cmd
        return
    parsers = {
        "benchmarks/reproduce.py": lambda m: m.build_parser().parse_args,
        "benchmarks/bench_client.py": lambda m: m.parse_args,
        "benchmarks/bench_aggregation.py": lambda m: m.parse_args,
        "benchmarks/profile_gpu.py": lambda m: m.parse_args,
        "benchmarks/bench_decode.py": lambda m: m.parse_args,
        "benchmarks/bench_wire.py": lambda m: m.build_parser().parse_args,
        "benchmarks/gpu_e2e.py": lambda m: m.build_parser().parse_args,
    }
    if script not in parsers:
        raise AssertionError(f"{cmd}: no check for the script {script}: add one to {Path(__file__).name}")
    if script == "benchmarks/bench_client.py":
        pytest.importorskip("flwr", reason="bench_client loads the Flower app's task module")
    _parse_ok(parsers[script](_script(REPO / script)), args[1:], cmd)


_HELP_SEEN: set[tuple[str, ...]] = set()


def _check_flower(cmd: Command, program: str, args: tuple[str, ...]) -> None:
    if importlib.util.find_spec("flwr") is None:
        pytest.skip("flwr is not installed")
    key = (program, *(args[:1] if program == "flwr" else ()))
    if key in _HELP_SEEN:
        return
    exe = shutil.which(program, path=str(Path(sys.executable).parent))
    assert exe, f"{cmd}: {program} is not installed beside {sys.executable}"
    proc = subprocess.run([exe, *key[1:], "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{cmd}: {' '.join(key)} --help failed: {proc.stderr[-500:]}"
    _HELP_SEEN.add(key)


SPAWNS = ("flwr", "flower-superlink", "flower-supernode", "openssl")  # checked by running the program's --help: slow


@pytest.mark.parametrize(
    "cmd", [pytest.param(c, marks=pytest.mark.slow) if c.argv[0] in SPAWNS else c for c in COMMANDS], ids=str
)
def test_documented_command(cmd: Command):
    program, *rest = cmd.argv
    args = tuple(rest)
    bare = program in NEEDS_ENV
    assert not bare or cmd.activated, (
        f"{cmd}: a bare {program!r} before the page says how to enter the environment; write .venv/bin/{program} "
        "or show '. .venv/bin/activate' first"
    )
    if program == "make":
        targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M))
        assert all(a in targets or "=" in a for a in args), f"{cmd}: not a Makefile target ({sorted(targets)})"
    elif program in ("python", ".venv/bin/python"):
        _check_python(cmd, args)
    elif program == "flexlora-fs":
        if args in (("--help",), ("-h",)):
            return
        cfg = args[args.index("--cfg") + 1]
        assert (REPO / cfg).is_file(), f"{cmd}: {cfg} does not exist"
        assert len(args[args.index("--cfg") + 2 :]) % 2 == 0, f"{cmd}: options must be key value pairs"
    elif program in ("flwr", "flower-superlink", "flower-supernode"):
        _check_flower(cmd, program, args)
    elif program in SYSTEM_TOOLS:
        if shutil.which(program) is None:
            pytest.skip(f"{program} is not installed here")
        if program == "openssl":
            proc = subprocess.run(["openssl", args[0], "-help"], capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, f"{cmd}: openssl {args[0]} -help failed: {proc.stderr[-300:]}"
    elif program not in BUILTINS:
        raise AssertionError(f"{cmd}: no check for {program!r}: add one to {Path(__file__).name}")
