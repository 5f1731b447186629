"""The layout's rules (CONTRIBUTING.md): stages do not import each other, maths modules stay pure, and one
module owns each file format. Read from the source with ``ast``, so a violation names the file and line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "rlfr"
STAGES = ("sft", "flow_pretrain", "train", "evaluate", "inspect_flow", "convert_flow", "export")
COMPOSERS = ("demo", "compare")
MATHS = (
    "flow/shaping.py",
    "rl/advantages.py",
    "rl/losses.py",
    "flow/matching.py",
    "flow/deviation.py",
    "flow/field.py",
)


def _modules() -> dict[str, ast.Module]:
    return {str(p.relative_to(SRC)): ast.parse(p.read_text(), str(p)) for p in sorted(SRC.rglob("*.py"))}


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


MODULES = _modules()


def test_the_tree_is_the_pipeline():
    packages = sorted(p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").is_file())
    assert packages == ["data", "eval", "flow", "integrations", "policy", "recipes", "reward", "rl",
                        "runtime"]  # fmt: skip
    loose = sorted(p.name for p in SRC.glob("*.py"))
    assert loose == ["__init__.py", "cli.py", "config.py", "errors.py", "schema.py"]


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
    others = {"state.json": ("data/examples.py",)}.get(literal, ())
    users = [f"{path}:{line}" for path, tree in MODULES.items() for line, s in _strings(tree)
             if literal in s and path not in others]  # fmt: skip
    assert users and all(u.startswith(owner + ":") for u in users), users
