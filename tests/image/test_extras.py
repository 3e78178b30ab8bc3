"""The extras say what each side really imports: every third-party module the agent's
code can import (module level or lazily, inside a function) is provided by
xdpml[agent]'s requirement closure, or by Debian (bcc); the same for the collector and
xdpml[collector]; and the agent's closure holds no scikit-learn, scipy, pyarrow,
onnxruntime or joblib. The closures are read from the installed metadata of this venv
(importlib.metadata), the imports from the source (ast), so neither is written here."""

from __future__ import annotations

import ast
import functools
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
OWN = {"xdpml"}
# pyproject.toml's package-dir: these packages live in top-level folders of their own
MAPPED = {"xdpml.agent": "agent", "xdpml.collector": "collector"}
# Not on PyPI: Debian's python3-bpfcc, installed by scripts/install.sh (agent only).
FROM_DEBIAN = {"bcc"}
# Imported only under `except ImportError` with a fallback (collector/models.py: a model
# fitted on a DataFrame gets one when pandas is there); never required.
OPTIONAL = {"pandas"}
COLLECTOR_ONLY = {"scikit-learn", "scipy", "pyarrow", "onnxruntime", "joblib"}


def module_file(name: str) -> Path | None:
    parts = name.split(".")
    for pkg, folder in MAPPED.items():
        if name == pkg or name.startswith(pkg + "."):
            parts = [folder, *name[len(pkg) + 1 :].split(".")] if name != pkg else [folder]
    base = ROOT.joinpath(*[p for p in parts if p])
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.exists():
            return p
    return None


def imports_of(path: Path) -> set[str]:
    """Absolute module names imported anywhere in the file (lazy imports included); for
    `from a.b import c` both a.b and a.b.c (c may be a submodule)."""
    out = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Import):
            out.update(a.name for a in n.names)
        elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
            out.add(n.module)
            out.update(f"{n.module}.{a.name}" for a in n.names)
    return out


def reachable(start: list[str], exclude: tuple[str, ...] = ()) -> tuple[set[str], set[str]]:
    """Own modules reachable from `start` (parents' __init__ included) and the top-level
    names of the third-party modules they import."""
    seen, third, todo = set(), set(), list(start)
    while todo:
        name = todo.pop()
        if name in seen or name.startswith(exclude):
            continue
        parts = name.split(".")
        if parts[0] not in OWN:
            if parts[0] not in sys.stdlib_module_names:
                third.add(parts[0])
            continue
        f = module_file(name)
        if f is None:
            continue  # `from pkg import function`: not a module
        seen.add(name)
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        todo.extend(imports_of(f))
    return seen, third


def all_modules(package: str) -> list[str]:
    """Module names of a top-level folder: agent/ is xdpml.agent, collector/ xdpml.collector."""
    return [
        ".".join(("xdpml", *p.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
        for p in (ROOT / package).rglob("*.py")
    ]


def closure(extra: str) -> set[str]:
    """Distributions that `pip install xdpml[extra]` brings, from the installed metadata."""
    out, todo = set(), [("xdpml", {extra})]
    while todo:
        dist, extras = todo.pop()
        for line in md.requires(dist) or []:
            req = Requirement(line)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
                continue
            name = canonicalize_name(req.name)
            if name == "xdpml":
                todo.append(("xdpml", set(req.extras)))
                continue
            if (name, frozenset(req.extras)) not in out:
                out.add((name, frozenset(req.extras)))
                todo.append((name, set(req.extras)))
    return {n for n, _ in out}


@functools.cache
def distributions_of_modules() -> dict[str, list[str]]:
    return md.packages_distributions()


def providers(top: str) -> set[str]:
    return {canonicalize_name(d) for d in distributions_of_modules().get(top, [])}


def agent_side() -> tuple[set[str], set[str]]:
    # Everything of agent/ and the CLI; not the collector's subcommand nor the demo,
    # which runs both sides (xdpml[demo]).
    return reachable(
        all_modules("agent") + ["xdpml.cli", "xdpml.obs.telemetry", "xdpml.obs.logs"],
        # `xdpml model compile` reads scikit-learn models: a training-side tool,
        # run where xdpml[collector] is installed (its error says so elsewhere)
        exclude=("xdpml.collector", "xdpml.cli.collector", "xdpml.cli.demo", "xdpml.models.cli_commands"),
    )


def collector_side() -> tuple[set[str], set[str]]:
    # the collector package and its subcommand (xdpml collector)
    # (the CLI package's own __init__ wires the agent's commands too: not the collector's)
    return reachable(
        all_modules("collector") + ["xdpml.cli.collector", "xdpml.obs.telemetry", "xdpml.obs.logs"],
        # xdpml.models.kernel: the model slots of a running agent's datapath (agent side),
        # reached only through the CLI package's __init__ (`xdpml model load|swap`)
        exclude=(
            "xdpml.agent",
            "xdpml.datapath",
            "xdpml.kube",
            "xdpml.cli.demo",
            "xdpml.enforce",
            "xdpml.models.kernel",
        ),
    )


def test_the_agent_never_imports_the_collector():
    mods, _ = reachable(all_modules("agent"))
    assert not {m for m in mods if m.startswith("xdpml.collector")}


def test_agent_imports_are_in_the_agent_extra():
    mods, third = agent_side()
    assert "xdpml.datapath.loader" in mods and "xdpml.kube.agentconfig" in mods  # the walk saw the lazy imports
    assert {"bcc", "pyroute2", "kubernetes", "yaml", "grpc", "numpy", "opentelemetry"} <= third
    have = closure("agent")
    missing = {t: sorted(providers(t)) for t in third - FROM_DEBIAN if not providers(t) & have}
    assert missing == {}


def test_agent_extra_has_none_of_the_collector_libraries():
    have = closure("agent")
    assert have & COLLECTOR_ONLY == set()
    _, third = agent_side()
    assert {t for t in third if providers(t) & COLLECTOR_ONLY} == set()


def test_collector_imports_are_in_the_collector_extra():
    mods, third = collector_side()
    assert "xdpml.collector.sinks" in mods and "xdpml.wire.codec" in mods  # what it shares with the agent
    assert {"sklearn", "joblib", "pyarrow", "onnxruntime", "grpc_health", "grpc_reflection"} <= third
    have = closure("collector")
    missing = {t: sorted(providers(t)) for t in third - OPTIONAL if not providers(t) & have}
    assert missing == {}
    # and nothing of the agent's own libraries comes with it
    assert not third & (FROM_DEBIAN | {"pyroute2", "kubernetes"})
    assert not have & {"pyroute2", "kubernetes"}


def test_base_dependencies_are_what_both_sides_import():
    _, agent = agent_side()
    _, coll = collector_side()
    both = agent & coll
    base = {canonicalize_name(Requirement(r).name) for r in md.requires("xdpml") if "extra ==" not in r}
    tops = distributions_of_modules()
    for top in both:  # what both import comes with either install
        assert providers(top) & base, top
    for dist in base:  # and the base holds nothing only one side imports
        provided = {t for t, ds in tops.items() if dist in {canonicalize_name(d) for d in ds}}
        assert provided & both, dist


def test_optional_import_is_guarded():
    tree = ast.parse((ROOT / "collector" / "models.py").read_text())
    guarded = [
        t
        for t in ast.walk(tree)
        if isinstance(t, ast.Try)
        and any(isinstance(n, ast.Import) and n.names[0].name == "pandas" for n in t.body)
        and any(isinstance(h.type, ast.Name) and h.type.id == "ImportError" for h in t.handlers)
    ]
    assert guarded


def test_install_script_installs_each_image_its_extra():
    def dry(*args: str) -> dict[str, str]:
        r = subprocess.run(
            ["bash", str(ROOT / "scripts" / "install.sh"), *args, "--dry-run"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 0, r.stderr
        return dict(line.split(": ", 1) for line in r.stdout.splitlines())

    agent = dry("--image", "agent")
    assert agent["pip"] == "[agent]"
    assert {"python3-bpfcc", "python3-pyroute2", "iproute2"} <= set(agent["apt"].split())
    assert "--system-site-packages" in agent["venv"]  # Debian's bcc is seen through it
    coll = dry("--image", "collector")
    assert coll["pip"] == "[collector]"
    assert set(coll["apt"].split()) == {"python3-venv", "ca-certificates"}
    assert "--system-site-packages" not in coll["venv"]
    assert dry("--test")["pip"] == "-e [test]"
    assert dry()["pip"] == "-e [agent,collector]"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh"), "--image"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "install.sh: --image needs a target: agent or collector"


def test_cli_names_the_extra_a_missing_module_belongs_to():
    """xdpml.cli.EXTRA_OF_MODULE (the one-line error for `xdpml collector` in the agent
    image and the like) holds exactly the modules only one side's extra provides."""
    from xdpml.cli import EXTRA_OF_MODULE

    _, agent = agent_side()
    _, coll = collector_side()
    expected = {top: "agent" for top in agent - coll} | {top: "collector" for top in coll - agent - OPTIONAL}
    assert expected == EXTRA_OF_MODULE


def test_a_missing_extra_is_one_line(monkeypatch, capsys):
    import builtins

    from xdpml import cli

    real = builtins.__import__

    def no_grpc_health(name, *args, **kw):
        if name.split(".")[0] == "grpc_health":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *args, **kw)

    for m in [m for m in sys.modules if m.startswith(("xdpml.collector", "xdpml.cli.collector", "grpc_health"))]:
        monkeypatch.delitem(sys.modules, m)
    monkeypatch.setattr(builtins, "__import__", no_grpc_health)
    assert cli.main(["collector", "--listen", "127.0.0.1:0"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "xdpml collector: this install has no grpc_health.v1: the collector needs it "
        "(pip install 'xdpml[collector]'; in containers, the collector image)"
    ]
