"""The documentation (issue 30): the generated configuration reference lists every key of every command with its
type, default, range and help; README, docs, CONTRIBUTING.md, configs and the package cite no file outside the
repository and no machine's absolute path; README stays short and starts with install and a data example."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

import rlfr
from rlfr.cli import _COMMANDS, _config_class, main
from rlfr.config import valid_keys
from rlfr.recipes.data import ACTIONS

ROOT = Path(__file__).resolve().parent.parent


def _load_reference():
    spec = importlib.util.spec_from_file_location(
        "config_reference", ROOT / "scripts" / "config_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def page() -> str:
    return _load_reference().render()


def _split_row(line: str) -> list[str]:
    """A Markdown table row split at its cell pipes: not an escaped one, not one inside a code span."""
    cells, cell, code, prev = [], "", False, ""
    for ch in line:
        if ch == "`":
            code = not code
        if ch == "|" and not code and prev != "\\":
            cells.append(cell)
            cell = ""
        else:
            cell += ch
        prev = ch
    return [*cells, cell]


def _sections(page: str) -> dict[str, dict[str, list[str]]]:
    """'## rlfr CMD' -> {key: its table cells (type, default, range, help)}, read back from the Markdown."""
    out, current = {}, None
    for line in page.splitlines():
        if line.startswith("## rlfr "):
            current = out.setdefault(line.removeprefix("## rlfr "), {})
        elif current is not None and line.startswith(("| `", "| **`")):
            cells = [c.strip() for c in _split_row(line)[1:-1]]
            current[cells[0].strip("*`")] = cells[1:]
    return out


def _expected() -> dict[str, type]:
    """Every configurable command, read from the CLI itself (not from the generator)."""
    out = {name: _config_class(name) for name, entry in _COMMANDS.items() if entry[1] is not None}
    out |= {f"data {action}": cls for action, cls in ACTIONS.items()}
    return out


def test_config_reference_lists_every_key_of_every_command(page):
    sections, expected = _sections(page), _expected()
    assert set(sections) == set(expected), (
        f"commands missing from the reference: {set(expected) - set(sections)}"
    )
    for name, cls in expected.items():
        keys = valid_keys(cls)  # settings and sections, nested ones included
        missing = [k for k in keys if k not in sections[name]]
        assert not missing, f"rlfr {name}: keys missing from the configuration reference: {missing}"
        assert set(sections[name]) == set(keys), (
            f"rlfr {name}: keys that do not exist: {set(sections[name]) - set(keys)}"
        )
    assert len(sections["train"]) > 100  # the nested sections are really expanded


def test_config_reference_rows_carry_type_default_range_and_help(page):
    train, sft, demo = (_sections(page)[c] for c in ("train", "sft", "demo"))
    # TrainConfig.steps = field_(100, "RL steps", range="[1, inf)")
    assert train["steps"] == ["`int`", "`100`", "`[1, inf)`", "RL steps"]
    assert train["method"][0] == '`"rlfr" | "rlvr" | "entropy"`'
    assert train["method"][1] == "`rlfr`"
    assert train["seed"][2] == "`[0, 4294967295]`"
    assert train["flow"] == ["section", "", "", "flow field, rewards and online updates"]
    # a nested section's default comes from the command's own instance: SFT data reads the solution column
    assert sft["data.solution_field"][:2] == ["`str | None`", "`solution`"]
    assert train["data.solution_field"][1] == "`null`"
    assert demo["seed"][:3] == ["`int | None`", "`null`", "`[0, 4294967295]`"]
    # a field without a range has an empty range cell, and every setting has a help text
    assert train["out_dir"][2] == ""
    for name, rows in _sections(page).items():
        empty = [k for k, cells in rows.items() if not cells[-1]]
        assert not empty, f"rlfr {name}: keys without a help text: {empty}"


def test_mkdocs_builds_the_generated_reference():
    cfg = (ROOT / "mkdocs.yml").read_text()
    assert "scripts/config_reference.py" in cfg.split("hooks:")[1].split("\n")[1]
    assert "reference/config.md" in cfg and "reference/api.md" in cfg
    assert "mkdocs build --strict" in (ROOT / "scripts" / "test.sh").read_text()


# Paths that exist only beside the development checkout or on one machine.
DEV_PATH = re.compile(r"/work/|\.\./shared|/check/|/root/|/home/")
SCANNED = ("README.md", "CONTRIBUTING.md", "CHANGELOG.md", "CITATION.cff", "docs", "configs", "src")


def dev_paths(root: Path) -> list[str]:
    """'file:line: text' of every line under ``root``'s user-facing files that names a development path."""
    hits = []
    for name in SCANNED:
        base = root / name
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for path in files:
            if any(part == "__pycache__" or part.endswith(".egg-info") for part in path.parts):
                continue  # build outputs, not in the repository
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue  # images and other binary files
            for i, line in enumerate(text.splitlines(), 1):
                if DEV_PATH.search(line):
                    hits.append(f"{path.relative_to(root)}:{i}: {line.strip()[:120]}")
    return hits


def test_no_development_paths_in_user_facing_files():
    hits = dev_paths(ROOT)
    assert not hits, "paths outside the repository:\n" + "\n".join(hits[:20])


def test_the_path_scan_finds_a_planted_path(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("fine\nsee ../shared/CONVENTIONS.md\n")
    (tmp_path / "docs" / "b.json").write_text(json.dumps({"model": "/work/runs/x"}))
    (tmp_path / "docs" / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    (tmp_path / "README.md").write_text("runs/demo is relative\n")
    assert dev_paths(tmp_path) == [
        "docs/a.md:2: see ../shared/CONVENTIONS.md",
        'docs/b.json:1: {"model": "/work/runs/x"}',
    ]


def _readme_commands() -> list[str]:
    """The ``rlfr ...`` commands of README's pipeline block, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## The pipeline")[1].split("```bash")[1].split("```")[0]
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip().startswith("rlfr ")]


def test_readme_pipeline_commands_use_real_keys(capsys):
    """Each of README's four commands resolves with ``--show-config`` (every key exists, every value has its type)."""
    commands = _readme_commands()
    assert [c.split()[1] for c in commands] == ["sft", "flow-pretrain", "train", "eval"]
    for command in commands:
        assert main([*shlex.split(command)[1:], "--show-config"]) == 0, (command, capsys.readouterr().err)
        assert "data" in yaml.safe_load(capsys.readouterr().out)


def test_version_citation_and_licence_agree():
    """One version everywhere (``rlfr --version``, pyproject, CITATION.cff, the changelog's newest entry), the paper
    as the preferred citation, Apache-2.0 as an SPDX expression with its licence file."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert project["version"] == rlfr.__version__ == cff["version"]
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(r"^## (\S+)", changelog, re.M)[1] == rlfr.__version__
    assert (
        cff["cff-version"] == "1.2.0"
        and cff["preferred-citation"]["url"] == "https://arxiv.org/abs/2510.10201"
    )
    assert cff["preferred-citation"]["title"].startswith("RLFR: Extending Reinforcement Learning for LLMs")
    assert project["license"] == cff["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert (
        "Apache License" in (ROOT / "LICENSE").read_text()
        and "Apache-2.0" in (ROOT / "README.md").read_text()
    )


def test_readme_is_short_and_starts_with_install_and_data():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines (at most 200; move details to docs/)"
    head = "\n".join(lines[:100])
    assert "bash scripts/setup.sh" in head and "pip install" in head and "git+" in head
    row = next(line for line in lines[:100] if line.startswith('{"problem"'))
    assert {"problem", "answer", "solution"} <= set(json.loads(row))
    assert "bash scripts/demo.sh" in head and "bash scripts/test.sh" in head
