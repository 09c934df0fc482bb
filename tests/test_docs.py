"""The README and docs/ cannot drift from the code: every `python -m mrem_dist...`, torchrun and
launch-script command in them composes into a valid configuration (Hydra + the typed schema +
`validate`, as the entry point would before loading anything), every Python snippet compiles and
names only what mrem_dist has, and every relative link points at a file."""

from __future__ import annotations

import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO
from mrem_dist.config import register_configs, unknown_keys, validate, validate_evaluate, validate_finetune

register_configs()
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
ENTRIES = {"mrem_dist": ("config", validate), "mrem_dist.evaluate": ("evaluate", validate_evaluate),
           "mrem_dist.finetune": ("finetune", validate_finetune)}


def _fences(page: Path, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", page.read_text(), flags=re.M | re.S)


def _commands(page: Path) -> list[list[str]]:
    out = []
    for block in _fences(page, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                tokens = shlex.split(part, comments=True)
                if tokens:
                    out.append(tokens)
    return out


def _entry_and_overrides(tokens: list[str]):
    """(entry module, Hydra overrides) of a command that starts mrem-dist, else None."""
    for i, t in enumerate(tokens):
        if t == "-m" and i + 1 < len(tokens) and tokens[i + 1].startswith("mrem_dist"):
            return tokens[i + 1], tokens[i + 2:]
        if re.fullmatch(r"launch/(torchrun\.sh|deepspeed\.sh|slurm(_tasks)?\.sbatch)", t):
            assert (REPO / t).is_file(), t
            return "mrem_dist", ["method=mrem_p", *tokens[i + 1:]]
    return None


def _doc_commands():
    for page in PAGES:
        for tokens in _commands(page):
            found = _entry_and_overrides(tokens)
            if found:
                yield pytest.param(page.name, *found, id=f"{page.name}:{' '.join(tokens)[:60]}")


@pytest.mark.parametrize("page,entry,args", list(_doc_commands()))
def test_every_documented_command_is_a_valid_configuration(tmp_path, page, entry, args):
    if entry == "mrem_dist.sweep":
        importlib.import_module(entry)
        return
    assert entry in ENTRIES, f"{page}: {entry} is not an entry point of mrem-dist"
    name, check = ENTRIES[entry]
    overrides = []
    for a in args:
        if a.startswith("-") or a == "job" or a.startswith(("hydra/", "hydra.")):
            continue  # -m (multirun), --cfg job, launcher choices: Hydra's own, not the schema's
        key, _, value = a.partition("=")
        overrides.append(f"{key}={value.split(',')[0]}" if "[" not in value else a)  # a sweep: its first value
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        dcfg = compose(name, overrides=[f"run_dir={tmp_path}", *overrides])
    cfg = OmegaConf.to_object(dcfg)
    assert unknown_keys(cfg) == []
    check(cfg)


def _mrem_names(tree: ast.AST) -> list[tuple[str, str]]:
    """(module, attribute) pairs a snippet uses: `from mrem_dist.x import y` and `mrem_dist.y`."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mrem_dist"):
            out += [(node.module, a.name) for a in node.names]
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "mrem_dist":
            out.append(("mrem_dist", node.attr))
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_snippets_compile_and_name_what_exists(page):
    for snippet in _fences(page, "python"):
        tree = ast.parse(snippet)
        for module, attr in _mrem_names(tree):
            assert hasattr(importlib.import_module(module), attr), f"{page.name}: {module}.{attr} does not exist"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_point_at_files(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" not in target:
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_the_readme_reads_in_five_minutes():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200
