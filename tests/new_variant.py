"""Start a variant: copy a parent script and its float64 reference under a new name, every rename done.

    python -m tests.new_variant dpo rdpo      # algos/rdpo.py, tests/references/rdpo.py, docs/algos/rdpo.md

Copies algos/<parent>.py, tests/references/<parent>.py and docs/algos/<parent>.md, replacing the parent's name:
`<parent>_loss` becomes `<name>_loss` everywhere (definition, call, LOSSES key, reference function), and the word
`<parent>` becomes `<name>` in the script above its plumbing banner (the header's run commands and docs pointer;
the plumbing below stays byte for byte dpo.py's), in the whole reference (docstring, RUN["script"]) and in the docs
page, which gets a TODO banner. exp_name needs no rename: it is the file's name. TODO(<name>) comments mark the loss
and algorithm_checks in the script; the rest of what to edit is printed as a numbered list, with the commands to pin
and test the variant. Refused, with exit status 2 and nothing written: a target that exists, an unknown parent, a
name that is not a Python identifier.
"""

import argparse
import keyword
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BANNER = "# Plumbing: every function below is the same, byte for byte"  # tests/test_template.py's, its start


def paths(root: Path, script: str) -> dict[str, Path]:
    return {"script": root / "algos" / f"{script}.py", "reference": root / "tests" / "references" / f"{script}.py",
            "docs": root / "docs" / "algos" / f"{script}.md"}


def parents(root: Path) -> list[str]:
    """Scripts that can be copied: those with a reference."""
    return sorted(p.stem for p in (root / "algos").glob("*.py") if paths(root, p.stem)["reference"].is_file())


def refusals(root: Path, parent: str, name: str) -> list[str]:
    """Why the copy cannot be made (empty: it can)."""
    problems = []
    for label, value in (("parent", parent), ("name", name)):
        if not value.isidentifier() or keyword.iskeyword(value):
            problems.append(f"the {label} {value!r} is not a Python identifier, or is a keyword (tests import "
                            f"`from algos.<name> import <name>_loss`): use letters, digits and underscores, e.g. r_dpo")
    if problems:
        return problems
    if parent not in parents(root):
        problems.append(f"unknown parent {parent!r}: no algos/{parent}.py with a tests/references/{parent}.py; "
                        f"choose one of {', '.join(parents(root))}")
    existing = [p for p in paths(root, name).values() if p.exists()]
    existing += sorted((root / "tests" / "golden").glob(f"{name}.*.json"))
    if existing:
        problems.append(f"{', '.join(str(p.relative_to(root)) for p in existing)} already exist(s): choose another "
                        f"name, or delete them first")
    return problems


def word(name: str) -> re.Pattern:
    """The name as a whole word: `dpo` in algos/dpo.py and `dpo --write`, not in step_dpo, rdpo, dpo_loss or a flag
    such as --rpo-alpha (the variant keeps its parent's flags)."""
    return re.compile(rf"(?<![A-Za-z0-9_-]){re.escape(name)}(?![A-Za-z0-9_-])")


def rename(text: str, parent: str, name: str, keep_tables: bool = False) -> str:
    """`<parent>_loss` and the word `<parent>` replaced, line by line; a comment aligned in a column (two spaces or
    more before `#`) stays in its column; with keep_tables, Markdown table rows keep the parent's name (its results)."""
    lines = []
    for line in text.splitlines(keepends=True):
        if keep_tables and line.lstrip().startswith("|"):
            lines.append(line)
            continue
        new = word(parent).sub(name, word(f"{parent}_loss").sub(f"{name}_loss", line))
        aligned, moved = re.search(r"\S( {2,})#", line), re.search(r"\S( {2,})#", new)
        if new != line and aligned and moved:
            spaces = max(2, len(moved.group(1)) + aligned.end() - moved.end())
            new = new[: moved.start(1)] + " " * spaces + new[moved.end(1):]
        lines.append(new)
    return "".join(lines)


def new_script(text: str, parent: str, name: str) -> str:
    """The parent's name replaced above the plumbing banner; `<parent>_loss` everywhere; TODO markers on the loss and
    on algorithm_checks (above the banner, so that tests/test_template.py passes with them)."""
    cut = text.index(BANNER) if BANNER in text else len(text)
    top = rename(text[:cut], parent, name)
    bottom = word(f"{parent}_loss").sub(f"{name}_loss", text[cut:])
    markers = {
        rf"^(def {name}_loss\b|{name}_loss\s*=)": f"# TODO({name}): the loss, and its docstring (shapes, the "
        f"equation);\n# new hyperparameters as arguments whose defaults equal the CLI's (fields of Args, above)",
        r"^def algorithm_checks\b": f"# TODO({name}): a (flag, valid, range) tuple for each new flag",
    }
    for pattern, marker in markers.items():
        top = re.sub(pattern, lambda m: f"{marker}\n{m.group(0)}", top, count=1, flags=re.M)
    return top + bottom


def new_reference(text: str, parent: str, name: str) -> str:
    text = rename(text, parent, name)
    text = re.sub(r"^LOSSES = ", lambda m: f"# TODO({name}): the equation above, the reference function, its gradient; "
                  f"the cases: keep the random ones,\n# replace the hand-computed ones (`hand`) by values of your loss "
                  f"worked out on paper\n{m.group(0)}", text, count=1, flags=re.M)
    text = re.sub(r"^RUN = ", lambda m: f"# TODO({name}): your new flags in args and torchrun_args, so that the run "
                  f"golden exercises them\n{m.group(0)}", text, count=1, flags=re.M)
    return text


def new_docs(text: str, parent: str, name: str) -> str:
    text = rename(text, parent, name, keep_tables=True)
    banner = (f"> **TODO({name})**: copied from [{parent}.md]({parent}.md) by `python -m tests.new_variant {parent} "
              f"{name}`,\n> with the script's name replaced; everything else below still describes {parent}.py. "
              f"Rewrite it: the idea and the paper,\n> the loss, the new flags, how each default was chosen (a small "
              f"sweep on the bundled task, its table here;\n> a default not swept is marked as such), and this "
              f"script's own results (the tables below are {parent}.py's).\n")
    first, _, rest = text.partition("\n")
    return f"{first}\n\n{banner}{rest}" if first.startswith("# ") else banner + "\n" + text


def names_parent(line: str, parent: str, name: str) -> bool:
    """Whether a line holds the word `<parent>` or a `<parent>_*` name that is not one of the new name's."""
    return any((w == parent or w.startswith(f"{parent}_")) and not (w == name or w.startswith(f"{name}_"))
               for w in re.findall(r"[A-Za-z0-9_]+", line))


def leftovers(text: str, parent: str, name: str, label: str, limit: int = 8) -> list[str]:
    """Lines of a new file that still name the parent, or a parent_* function (to check by eye)."""
    lines = [f"{label}:{i}: {line.strip()[:100]}" for i, line in enumerate(text.splitlines(), 1)
             if names_parent(line, parent, name)]
    return lines[:limit] + ([f"{label}: ... {len(lines) - limit} more"] if len(lines) > limit else [])


def next_steps(parent: str, name: str) -> str:
    return f"""
Next, edit (each file runs and passes the tests as copied; TODO({name}) marks where to start):
 1. algos/{name}.py, {name}_loss: the body, and its docstring (input shapes, the equation it implements).
 2. algos/{name}.py, the header (module docstring, <= 15 lines): the first line, the paper line (authors, title, arXiv
    id), the loss line, the data columns.
 3. algos/{name}.py, Args: a field per new hyperparameter after {parent}.py's own, with a docstring under it; reuse a
    sibling's flag name only with the same meaning; the loss function's defaults equal the CLI defaults; pass the new
    flags in compute_loss's call of {name}_loss.
 4. algos/{name}.py, algorithm_checks: a (flag, valid, range) tuple per new flag, e.g.
    ("gamma", args.gamma >= 0, ">= 0").
 5. tests/references/{name}.py: the equation in its docstring, the literal float64 reference {name}_loss with its
    gradient by hand, hand-computed cases (`hand`), RUN args with the new flags. Optional: tests/test_{name}.py
    (see tests/test_{parent}.py).
 6. docs/algos/{name}.md (copied from {parent}.md, TODO banner at the top): idea, paper, loss, flags, deviations,
    defaults (a small sweep on the bundled task, or marked unswept), results.
 7. Register it: a row in README.md's algorithms table and in docs/README.md's index; a KNOBS entry in
    benchmarks/bench_algos.py ("{name}": ("<flag_name>", [low, default, high])).
Then:
    python -m tests.golden {name}            # checks the reference and the script, says what would be written
    python -m tests.golden {name} --write    # pins tests/golden/{name}.*.json
    python -m pytest -q tests --script {name}   # its tests only: loss goldens, run, resume, torchrun, template"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.new_variant", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parent", help="the script to copy, e.g. dpo")
    parser.add_argument("name", help="the new script's name, a Python identifier, e.g. rdpo")
    parser.add_argument("--root", type=Path, default=REPO, help="the repository to work in (default: this one)")
    options = parser.parse_args(argv)
    root, parent, name = options.root.resolve(), options.parent, options.name

    problems = refusals(root, parent, name)
    if problems:
        print("error: " + "\nerror: ".join(problems) + "\nNothing written.", file=sys.stderr)
        return 2
    source, target = paths(root, parent), paths(root, name)
    texts = {"script": new_script(source["script"].read_text(), parent, name),
             "reference": new_reference(source["reference"].read_text(), parent, name)}
    if source["docs"].is_file():
        texts["docs"] = new_docs(source["docs"].read_text(), parent, name)
    for kind, text in texts.items():
        target[kind].write_text(text)
        print(f"wrote {target[kind].relative_to(root)} (from {source[kind].relative_to(root)})")
    left = [line for kind in ("script", "reference") for line in
            leftovers(texts[kind], parent, name, str(target[kind].relative_to(root)))]
    if left:
        print(f"Still naming {parent} (intended? e.g. a helper function kept from {parent}.py):")
        print("\n".join(f"    {line}" for line in left))
    print(next_steps(parent, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
