"""The template every script follows (algos/dpo.py is the template; docs/conventions.md describes it):

- the plumbing under dpo.py's banner is byte-identical in every script that uses it, and nothing else sits there;
- a header, not a notebook: module docstrings of at most 15 lines;
- argument checks, output directories, checkpoints and resume, SIGTERM, data errors, truncation, dropout and
  mixture-of-experts models, each tried the way a user would meet it.
"""

import ast
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from algos.dpo import Args, check_args, load_splits, prepare_dataset
from tests.golden import REPO, RUN_ENV, run_script

BANNER = "# Plumbing: every function below is the same, byte for byte, in every script that uses it"
SCRIPTS = sorted(path.stem for path in (REPO / "algos").glob("*.py"))
MODEL = str(REPO / "benchmarks/arith/model")


def plumbing(script: str) -> dict[str, str]:
    """name -> source of each top-level function or class under the script's banner, in order."""
    source = (REPO / "algos" / f"{script}.py").read_text()
    assert BANNER in source, f"algos/{script}.py has no plumbing banner"
    start = source[: source.index(BANNER)].count("\n") + 1
    tree = ast.parse(source)
    return {node.name: ast.get_source_segment(source, node, padded=True) for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.lineno > start}


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "dpo"])
def test_plumbing_is_dpo_s_byte_for_byte(script):
    template, own = plumbing("dpo"), plumbing(script)
    strangers = [name for name in own if name not in template]
    assert not strangers, f"{script}: {strangers} sit under the banner but are not dpo.py's plumbing: move them above"
    differing = [name for name in own if own[name] != template[name]]
    assert not differing, f"{script}: {differing} differ from dpo.py's (diff the two files)"
    order = [name for name in template if name in own]
    assert list(own) == order, f"{script}: the plumbing is not in dpo.py's order"


@pytest.mark.parametrize("script", SCRIPTS)
def test_header_is_at_most_15_lines(script):
    docstring = ast.get_docstring(ast.parse((REPO / "algos" / f"{script}.py").read_text()), clean=False)
    assert len(docstring.strip().splitlines()) <= 15, f"{script}: the module docstring has more than 15 lines"
    assert f"docs/algos/{script}.md" in docstring and (REPO / "docs" / "algos" / f"{script}.md").is_file()
