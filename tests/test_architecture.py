"""The layout's rules (CONTRIBUTING.md): the layers, lowest first, with imports that only go down and no
import cycle; stages do not import each other, maths modules stay pure, one module owns each file format,
and an import inside a function says why it is there. Read from the source with ``ast`` (module-level and
function-level imports alike), so a violation names the file and line."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "rlfr"

# The layers of the package, lowest first: a module imports rlfr code from its own layer or a lower one, never
# from a higher one. Names in one layer are peers. The pipeline reads bottom-up: data -> policy -> flow ->
# reward -> rl -> eval, with runtime (the machinery of a run) under rl and the commands on top.
LAYERS = (
    ("errors",),
    ("stats", "group_stats", "capabilities", "config", "config_files"),
    ("schema", "commands"),
    ("data",),
    ("policy",),
    ("flow",),
    ("reward",),
    ("runtime",),
    ("rl",),
    ("eval",),
    ("recipes",),
    ("cli", "integrations"),
)
STAGES = (
    "sft",
    "flow_pretrain",
    "train",
    "evaluate",
    "inspect_flow",
    "convert_flow",
    "export",
    "data",
    "select",
)
COMPOSERS = ("demo", "compare")
MATHS = (
    "flow/shaping.py",
    "rl/advantages.py",
    "rl/losses.py",
    "flow/matching.py",
    "flow/deviation.py",
    "flow/field.py",
)


# ---------------------------------------------------------------------------------------- the checker
def module_name(path: str) -> str:
    """'policy/lora.py' -> 'rlfr.policy.lora'; 'policy/__init__.py' -> 'rlfr.policy'; '__init__.py' -> 'rlfr'."""
    parts = ["rlfr", *path.removesuffix(".py").split("/")]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def rlfr_imports(tree: ast.Module, name: str, is_package: bool, modules: set[str]) -> list[tuple[int, str]]:
    """(line, module) of every import of rlfr code in ``tree`` (module ``name``), module-level or inside a
    function: ``from rlfr.a import b`` is module ``rlfr.a.b`` when that is a module, else ``rlfr.a``; relative
    imports are resolved against ``name``."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "rlfr"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            if base.split(".")[0] == "rlfr":
                targets = {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
                out += [(node.lineno, t) for t in sorted(targets)]
    return out


def layer_of(module: str, layers) -> int | None:
    """Index in ``layers`` of the top-level part of ``module`` (-1 for the package ``rlfr`` itself)."""
    parts = module.split(".")
    if len(parts) == 1:
        return -1
    return next((i for i, names in enumerate(layers) if parts[1] in names), None)


def find_cycle(graph: dict[str, set[str]], members: set[str]) -> list[str]:
    """One cycle through the smallest member of a strongly connected set: [a, b, ..., a]."""
    start = min(members)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for nxt in sorted(graph[path[-1]] & members):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                paths.append([*path, nxt])
    return [start, start]


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components that hold a cycle (two or more modules, or a self-import)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = {stack.pop()}
            while v not in comp:
                comp.add(stack.pop())
            if len(comp) > 1 or v in graph[v]:
                found.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def check_layers(sources: dict[str, str], layers=LAYERS) -> list[str]:
    """Every import of rlfr code (module-level or in a function) that goes up the ``layers``, names an unknown
    module or closes an import cycle, in ``sources`` ({path under src/rlfr: source}): one message each."""
    names = {path: module_name(path) for path in sources}
    modules = set(names.values())
    graph: dict[str, set[str]] = {m: set() for m in modules}
    problems = []
    for path, source in sorted(sources.items()):
        name = names[path]
        own = layer_of(name, layers)
        if own is None:
            problems.append(f"{path}: {name.split('.')[1]!r} is in no layer; add it to LAYERS")
            continue
        for line, target in rlfr_imports(
            ast.parse(source, path), name, path.endswith("__init__.py"), modules
        ):
            if target not in modules:
                problems.append(f"{path}:{line} imports {target}, which is no module of rlfr")
                continue
            graph[name].add(target)
            up = layer_of(target, layers)
            if up is not None and up > own:
                problems.append(f"{path}:{line} imports {target}: layer {layers[up]} is above {layers[own]}")
    for comp in strongly_connected(graph):
        problems.append("import cycle: " + " -> ".join(find_cycle(graph, comp)))
    return problems


def function_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The import statements inside a function (run when it is called, not when the module is imported)."""
    out = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            out += [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return sorted({id(n): n for n in out}.values(), key=lambda n: n.lineno)  # nested functions: once


def unexplained_imports(source: str, path: str) -> list[str]:
    """Imports inside functions that import rlfr code (which belongs at module level, where the layer and
    cycle checks see the module's real dependencies) or carry no ``# lazy: <reason>`` comment (on the
    statement's lines or the line above)."""
    lines = source.splitlines()
    problems = []
    for node in function_imports(ast.parse(source, path)):
        mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or "."]
        above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
        text = "\n".join([above if above.startswith("#") else "", *lines[node.lineno - 1 : node.end_lineno]])
        if (isinstance(node, ast.ImportFrom) and node.level) or any(m.split(".")[0] == "rlfr" for m in mods):
            problems.append(f"{path}:{node.lineno} imports rlfr code ({mods}) inside a function")
        elif not re.search(r"# lazy: \S", text):
            problems.append(
                f"{path}:{node.lineno} imports {mods} inside a function without '# lazy: <reason>'"
            )
    return problems


SOURCES = {str(p.relative_to(SRC)): p.read_text() for p in sorted(SRC.rglob("*.py"))}
MODULES = {path: ast.parse(text, path) for path, text in SOURCES.items()}


def _imports(tree: ast.Module) -> list[tuple[int, str, list[str]]]:
    """(line, module, imported names) of every ``rlfr`` import, also those inside functions."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rlfr"):
            out.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.startswith("rlfr")]
    return out


def _strings(tree: ast.Module) -> list[tuple[int, str]]:
    """String constants that are not docstrings."""
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docs.add(id(body[0].value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]  # fmt: skip


def test_the_tree_is_the_pipeline():
    packages = sorted(p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").is_file())
    assert packages == ["data", "eval", "flow", "integrations", "policy", "recipes", "reward", "rl",
                        "runtime"]  # fmt: skip
    loose = sorted(p.name for p in SRC.glob("*.py"))
    assert loose == [
        "__init__.py",
        "capabilities.py",
        "cli.py",
        "commands.py",
        "config.py",
        "config_files.py",
        "errors.py",
        "group_stats.py",
        "schema.py",
        "stats.py",
    ]


@pytest.mark.parametrize("name", STAGES)
def test_a_stage_imports_no_other_recipe(name):
    bad = [
        (line, mod)
        for line, mod, _ in _imports(MODULES[f"recipes/{name}.py"])
        if mod.startswith("rlfr.recipes")
    ]
    assert not bad, f"recipes/{name}.py imports another recipe at {bad}"


@pytest.mark.parametrize("name", COMPOSERS)
def test_composers_use_only_the_stages_run_functions(name):
    for line, mod, names in _imports(MODULES[f"recipes/{name}.py"]):
        if mod.startswith("rlfr.recipes"):
            assert all(n.startswith("run_") for n in names), (
                f"recipes/{name}.py:{line} imports {names} from {mod}"
            )


def test_nothing_imports_an_integration():
    # an integration imports its framework (TRL, ...) on import: the rest of rlfr must run without it
    for path, tree in MODULES.items():
        if not path.startswith("integrations/"):
            bad = [(line, mod) for line, mod, _ in _imports(tree) if mod.startswith("rlfr.integrations")]
            assert not bad, f"{path} imports an integration: {bad}"


def test_nothing_outside_recipes_imports_a_recipe():
    for path, tree in MODULES.items():
        if path.startswith("recipes/") or path == "cli.py":
            continue
        bad = [(line, mod) for line, mod, _ in _imports(tree) if mod.startswith("rlfr.recipes")]
        assert not bad, f"{path} imports a recipe: {bad}"


@pytest.mark.parametrize("path", MATHS)
def test_maths_modules_are_pure(path):
    allowed = ("rlfr.flow.matching",) if path.startswith("flow/") else ()
    bad = [(line, mod) for line, mod, _ in _imports(MODULES[path]) if mod not in allowed]
    assert not bad, f"{path} imports {bad}: maths take tensors and scalars, not rlfr objects"


@pytest.mark.parametrize("literal,owner", [("latents.json", "flow/store.py"), ("state.json", "runtime/checkpoint.py"),
                                           ("metrics.jsonl", "runtime/metrics.py")])  # fmt: skip
def test_one_module_owns_each_file_format(literal, owner):
    # the same name in another format: a dataset saved by the datasets library has its own state.json
    others = {"state.json": ("data/tables.py",)}.get(literal, ())
    users = [f"{path}:{line}" for path, tree in MODULES.items() for line, s in _strings(tree)
             if literal in s and path not in others]  # fmt: skip
    assert users and all(u.startswith(owner + ":") for u in users), users


# ------------------------------------------------------------------------------------ layers and cycles
def test_imports_go_down_the_layers_without_cycles():
    problems = check_layers(SOURCES)
    assert not problems, "\n".join(problems)


def test_every_module_is_in_a_layer_and_contributing_lists_the_layers():
    tops = {module_name(path).split(".")[1] for path in SOURCES if path != "__init__.py"}
    assert tops == {name for layer in LAYERS for name in layer}
    # CONTRIBUTING.md states the order once, in the form "`errors` < `stats`, `capabilities`, `config` < ..."
    doc = (SRC.parent.parent / "CONTRIBUTING.md").read_text()
    stated = " < ".join(", ".join(f"`{n}`" for n in layer) for layer in LAYERS)
    assert stated in doc, f"CONTRIBUTING.md should state the layers as: {stated}"


def test_the_layer_check_finds_upward_imports_and_cycles():
    """The checker on a small tree: an upward import inside a function, a cycle within a layer, a cycle across
    layers (reported as a cycle and as the upward import that closes it), an unknown module, a package outside
    every layer; the clean tree passes."""
    layers = (("errors",), ("data",), ("policy",), ("rl",))
    clean = {
        "__init__.py": "",
        "errors.py": "",
        "data/__init__.py": "from rlfr.data.a import x\n",
        "data/a.py": "import json\nfrom rlfr.errors import E\nx = 1\n",
        "policy/__init__.py": "",
        "policy/b.py": "from rlfr.data import a\nfrom . import c\n",  # a module of rlfr.data; relative
        "policy/c.py": "from rlfr import errors\n",
        "rl/__init__.py": "",
        "rl/d.py": "from rlfr.policy.b import f\n\n\ndef g():\n    from rlfr.data.a import x\n",
    }
    assert check_layers(clean, layers) == []
    hidden = clean | {"data/a.py": "x = 1\n\n\ndef f():\n    import rlfr.rl\n"}
    assert check_layers(hidden, layers) == ["data/a.py:5 imports rlfr.rl: layer ('rl',) is above ('data',)"]
    same_layer = clean | {"policy/c.py": "def h():\n    from rlfr.policy.b import y\n"}
    assert check_layers(same_layer, layers) == [
        "import cycle: rlfr.policy.b -> rlfr.policy.c -> rlfr.policy.b"
    ]
    # data.a -> rl.d -> data.a (inside g: function-level imports count) and data.a -> rl.d -> policy.b -> data.a;
    # the message names the shortest cycle through the first module
    across = clean | {"data/a.py": "from rlfr.rl.d import g\n"}
    assert check_layers(across, layers) == [
        "data/a.py:1 imports rlfr.rl.d: layer ('rl',) is above ('data',)",
        "import cycle: rlfr.data.a -> rlfr.rl.d -> rlfr.data.a",
    ]
    assert check_layers(clean | {"rl/d.py": "from rlfr.flow import z\n", "eval/x.py": ""}, layers) == [
        "eval/x.py: 'eval' is in no layer; add it to LAYERS",
        "rl/d.py:1 imports rlfr.flow, which is no module of rlfr",
    ]


def test_imports_inside_functions_say_why():
    """An import inside a function is for an optional dependency or a slow import that only some paths need,
    and says so in a ``# lazy: <reason>`` comment; rlfr code is imported at module level (where the layer
    and cycle checks above see it as a dependency of the module)."""
    problems = [p for path, text in SOURCES.items() for p in unexplained_imports(text, path)]
    assert not problems, "\n".join(problems)
    source = (
        "import os\n\n\ndef f():\n    import vllm  # lazy: optional\n    import pandas\n"
        "    from rlfr.flow import store  # lazy: no excuse\n    from . import x\n"
        "    # lazy: only here\n    from torch.distributed import fsdp\n"
    )
    assert unexplained_imports(source, "m.py") == [
        "m.py:6 imports ['pandas'] inside a function without '# lazy: <reason>'",
        "m.py:7 imports rlfr code (['rlfr.flow']) inside a function",
        "m.py:8 imports rlfr code (['.']) inside a function",
    ]


def test_rlfr_help_imports_no_recipe():
    """``rlfr --help``, ``rlfr eval --help`` and ``--show-config`` import no recipe (and so neither torch nor
    transformers): a command's settings live in its config class (``rlfr.schema``, ``rlfr.commands``)."""
    code = (
        "import sys\nfrom rlfr.cli import main\n"
        "def loaded():\n    return sorted(m for m in sys.modules if m.startswith('rlfr.recipes.') or m == 'torch')\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\nprint(loaded())\n"
    )

    def loaded(*argv):
        out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
        return out.stdout.strip().splitlines()[-1]

    assert loaded("--help") == "[]"
    assert loaded("eval", "--help") == "[]"  # before the configs moved out of the recipes: evaluate and torch
    assert loaded("train", "--show-config") == "[]"


def test_loading_a_config_imports_no_torch():
    """A config (``rlfr.schema``) loads and is checked, capabilities included, without importing torch."""
    code = (
        "import sys\nfrom rlfr.config import load_config\nfrom rlfr.schema import TrainConfig\n"
        "load_config(TrainConfig, overrides=['rollout.engine=vllm', 'report_to=[tensorboard]'])\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"]
