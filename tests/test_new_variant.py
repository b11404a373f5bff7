"""python -m tests.new_variant (the scaffold) and the naming rules of python -m tests.golden, in seconds (no training).

The scaffold runs into a copy of the repository's layout under tmp_path (--root): every parent is copied, the
renames are checked (no parent's name left where it should have been replaced, RUN["script"] and LOSSES right, the
plumbing and the header still what tests/test_template.py wants), and so are the refusals. The golden tool refuses a
reference whose RUN["script"] or LOSSES keys do not match its script, before building anything.
"""

import ast
import re
import shutil
import types

import pytest

import tests.golden.__main__ as golden_cli
from tests.golden import GOLDEN_DIR, REPO, NamingError, check_names, defined_functions, load, reference_module
from tests.new_variant import BANNER, main, names_parent, parents

PARENTS = parents(REPO)


@pytest.fixture
def root(tmp_path):
    """A copy of what the scaffold reads: algos/, tests/references/, docs/algos/, and an empty tests/golden/."""
    for folder, pattern in (("algos", "*.py"), ("tests/references", "*.py"), ("docs/algos", "*.md")):
        (tmp_path / folder).mkdir(parents=True)
        for path in (REPO / folder).glob(pattern):
            shutil.copy(path, tmp_path / folder / path.name)
    (tmp_path / "tests" / "golden").mkdir()
    return tmp_path


def files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def words(text: str) -> list[str]:
    """Words as the scaffold sees them: a flag such as --rpo-alpha is one word (the variant keeps its parent's flags)."""
    return re.findall(r"[A-Za-z0-9_-]+", text)


def header(text: str) -> str:
    return ast.get_docstring(ast.parse(text), clean=False)


@pytest.mark.parametrize("parent", PARENTS)
def test_scaffold_renames_everything(parent, root, capsys):
    name = f"x{parent}"  # holds the parent's name: only whole words may be replaced
    assert main([parent, name, "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"python -m tests.golden {name} --write" in out and f"python -m pytest -q tests --script {name}" in out
    old, new = (root / "algos" / f"{parent}.py").read_text(), (root / "algos" / f"{name}.py").read_text()
    reference_text = (root / "tests" / "references" / f"{name}.py").read_text()

    # the plumbing below the banner is the parent's, byte for byte, and holds no marker
    assert new[new.index(BANNER):] == old[old.index(BANNER):]
    top = new[: new.index(BANNER)]
    assert top.count(f"TODO({name})") >= 2 and "def algorithm_checks" in top
    # the header: at most 15 lines, this script's run commands and docs page, no word naming the parent
    docstring = header(new)
    assert len(docstring.strip().splitlines()) <= 15 and f"docs/algos/{name}.md" in docstring
    assert f"algos/{name}.py" in docstring
    assert not [line for line in docstring.splitlines() if names_parent(line, parent, name)]
    # the loss is renamed everywhere; the word `parent` is gone above the banner and from the reference
    assert f"{name}_loss" in defined_functions(root / "algos" / f"{name}.py")
    for text in (new, reference_text):
        assert f"{parent}_loss" not in words(text), f"{parent}_loss is left"
    for text in (top, reference_text):
        assert parent not in words(text), f"the word {parent} is left"
    ast.parse(new), ast.parse(reference_text)

    # the reference names its script: RUN["script"], the LOSSES keys (the golden tool's rules), the same equations
    reference, original = reference_module(name, root), reference_module(parent, root)
    check_names(name, reference, root)
    assert reference.RUN["script"] == f"algos/{name}.py" and reference.RUN["args"] == original.RUN["args"]
    assert list(reference.LOSSES) == [k.replace(f"{parent}_loss", f"{name}_loss") for k in original.LOSSES]
    for key, spec in reference.LOSSES.items():
        case = spec["cases"][0]
        copied = spec["reference"](**case["inputs"], **case.get("hyperparameters", {}))
        before = original.LOSSES[key.replace(f"{name}_loss", f"{parent}_loss")]["reference"]
        assert copied == before(**case["inputs"], **case.get("hyperparameters", {}))

    # the docs page: this script's, with the TODO banner under its title
    docs = (root / "docs" / "algos" / f"{name}.md").read_text()
    title, _, rest = docs.partition("\n")
    assert f"algos/{name}.py" in title and rest.lstrip().startswith(f"> **TODO({name})**")


def test_scaffold_of_dpo_into_xdpo_reads_as_intended(root):
    assert main(["dpo", "xdpo", "--root", str(root)]) == 0
    script = (root / "algos" / "xdpo.py").read_text()
    assert "    python algos/xdpo.py                                                       # the bundled task" in script
    assert "def xdpo_loss(" in script and "= xdpo_loss(" in script
    assert "exp_name: str = os.path.basename(__file__)" in script, "exp_name is the file's name: nothing to rename"
    reference = (root / "tests" / "references" / "xdpo.py").read_text()
    assert '"script": "algos/xdpo.py"' in reference and '"xdpo_loss": {' in reference and "def xdpo_loss(" in reference
    assert "python -m tests.golden xdpo --write" in reference
    docs = (root / "docs" / "algos" / "xdpo.md").read_text()
    assert "| dpo.py |" in docs, "the results tables stay labelled with the script they were measured on"


@pytest.mark.parametrize("argv, message", [
    (["dpo", "ipo"], "algos/ipo.py, tests/references/ipo.py, docs/algos/ipo.md already exist(s)"),
    (["nope", "xdpo"], "unknown parent 'nope'"),
    (["dpo", "my-dpo"], "the name 'my-dpo' is not a Python identifier"),
    (["dpo", "1dpo"], "the name '1dpo' is not a Python identifier"),
    (["dpo", "class"], "the name 'class' is not a Python identifier, or is a keyword"),
    (["../algos/dpo", "xdpo"], "the parent '../algos/dpo' is not a Python identifier"),
])
def test_refusals_write_nothing(argv, message, root, capsys):
    before = files(root)
    assert main([*argv, "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Nothing written." in err
    assert files(root) == before


def test_a_second_scaffold_or_a_stale_golden_is_refused(root, capsys):
    assert main(["dpo", "xdpo", "--root", str(root)]) == 0
    before = files(root)
    assert main(["ipo", "xdpo", "--root", str(root)]) == 2 and files(root) == before
    (root / "tests" / "golden" / "xdpo.run.json").write_text("{}")
    before = files(root)
    assert main(["dpo", "xdpo", "--root", str(root)]) == 2 and files(root) == before
    assert "tests/golden/xdpo.run.json already exist(s)" in capsys.readouterr().err


def test_golden_rules_refuse_a_reference_that_pins_another_script(root):
    assert main(["dpo", "xdpo", "--root", str(root)]) == 0
    path = root / "tests" / "references" / "xdpo.py"
    scaffolded = path.read_text()

    path.write_text(scaffolded.replace('"script": "algos/xdpo.py"', '"script": "algos/dpo.py"'))
    with pytest.raises(NamingError, match=r"RUN\['script'\] is 'algos/dpo.py': it must be 'algos/xdpo.py'"):
        check_names("xdpo", reference_module("xdpo", root), root)

    path.write_text(scaffolded.replace('"xdpo_loss": {', '"dpo_loss": {'))  # a key left unrenamed
    with pytest.raises(NamingError, match=r"LOSSES\['dpo_loss'\]: algos/xdpo.py defines no function 'dpo_loss'.*"
                                          r"e\.g\. xdpo_loss"):
        check_names("xdpo", reference_module("xdpo", root), root)

    path.write_text(scaffolded.replace('"xdpo_loss": {', '"loss": {'))
    with pytest.raises(NamingError, match=r"LOSSES\['loss'\]: algos/xdpo.py defines no function 'loss'"):
        check_names("xdpo", reference_module("xdpo", root), root)

    (root / "algos" / "xdpo.py").unlink()
    with pytest.raises(NamingError, match="no algos/xdpo.py for tests/references/xdpo.py"):
        check_names("xdpo", reference_module("xdpo", root), root)
    with pytest.raises(NamingError, match="no tests/references/qdpo.py"):
        reference_module("qdpo", root)


def test_golden_tool_refuses_before_building_anything(monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("built in spite of the naming error")

    real = reference_module("ipo")
    copied = types.SimpleNamespace(LOSSES=real.LOSSES, RUN={**real.RUN, "script": "algos/dpo.py"})
    monkeypatch.setattr(golden_cli, "reference_module", lambda script: copied)
    monkeypatch.setattr(golden_cli, "build_loss_goldens", never)
    monkeypatch.setattr(golden_cli, "build_run_golden", never)
    assert golden_cli.main(["ipo", "--write"]) == 2
    err = capsys.readouterr().err
    assert "RUN['script'] is 'algos/dpo.py': it must be 'algos/ipo.py'" in err and "Nothing built or written." in err
    monkeypatch.undo()
    assert golden_cli.main(["no_such_script"]) == 2
    err = capsys.readouterr().err
    assert "no tests/references/no_such_script.py: start a variant with `python -m tests.new_variant" in err


def test_golden_tool_prints_a_summary_and_catches_a_script_that_differs(monkeypatch, capsys):
    assert golden_cli.main(["ipo", "--only", "loss"]) == 0
    out = capsys.readouterr().out
    assert "ipo.ipo_loss: " in out and "hand-computed values matched on" in out
    assert "gradients checked numerically" in out
    assert "tests/golden/ipo.ipo_loss.json: unchanged" in out and "All checks passed" in out
    assert "{" not in out, "the JSON is for --verbose"

    real = golden_cli.script_function

    def doubled(script, function):  # a script whose loss is twice its reference's
        f = real(script, function)
        return lambda **kw: (lambda out: (2 * out[0], *out[1:]))(f(**kw))

    monkeypatch.setattr(golden_cli, "script_function", doubled)
    assert golden_cli.main(["ipo", "--only", "loss"]) == 1
    out = capsys.readouterr().out
    assert "algos/ipo.py:ipo_loss DIFFERS" in out
    assert "FAILED: the script does not compute what its reference does" in out
    assert "All checks passed" not in out


def test_golden_tool_says_what_changed():
    loss = load(GOLDEN_DIR / "ipo.ipo_loss.json")
    case = loss["cases"][1]
    case["expected"]["losses"][0] += 1e-3
    loss["cases"].append({**case, "name": "extra"})
    changed = golden_cli.what_changed("ipo.ipo_loss.json", loss, GOLDEN_DIR / "ipo.ipo_loss.json")
    assert changed == f"CHANGED: cases changed: {case['name']}; cases added: extra"
    run = load(GOLDEN_DIR / "ipo.run.json")
    run["metrics"][-1]["train/loss"] *= 1 + 1e-7
    assert golden_cli.what_changed("ipo.run.json", run, GOLDEN_DIR / "ipo.run.json").startswith("differs only within")
    run["metrics"][-1]["train/loss"] *= 1.01
    assert golden_cli.what_changed("ipo.run.json", run, GOLDEN_DIR / "ipo.run.json").startswith(
        "CHANGED: 1 values beyond the tolerance, e.g. step")
