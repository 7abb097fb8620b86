"""The house rules that a notebook cannot check about itself: reading order and one module per notebook."""
import json, re
from pathlib import Path

NBS = Path(__file__).resolve().parent.parent / "nbs"
IMPORT = re.compile(r"^\s*(?:from\s+anymal\.(\w+)|import\s+anymal\.(\w+))", re.M)


def _notebooks(folder: Path = NBS) -> list[tuple[str, str, str]]:
    "(notebook name, module it exports, its code) for every numbered notebook, in file order."
    out = []
    for p in sorted(folder.glob("[0-9]*.ipynb")):
        cells = json.loads(p.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        m = re.search(r"^#\|\s*default_exp\s+(\S+)", code, re.M)
        out.append((p.name, m.group(1) if m else "", code))
    return out


def test_each_notebook_exports_one_module_of_its_own():
    nbs = _notebooks()
    assert nbs and all(mod for _, mod, _ in nbs), [n for n, mod, _ in nbs if not mod]
    mods = [mod for _, mod, _ in nbs]
    assert len(mods) == len(set(mods)), mods
    assert all(re.match(r"\d\d[a-z]?_", n) for n, _, _ in nbs), "notebooks are numbered NN_name.ipynb (or NNb_name)"
    mains = [n[:2] for n, _, _ in nbs if n[2] == "_"]
    assert mains == [f"{i:02d}" for i in range(len(mains))], "numbers run 00, 01, ... without gaps"
    # a lettered notebook (03b_audio) is inserted after the one of its number, as lessons/ has 4b after 4
    assert all(n[:2] in mains for n, _, _ in nbs), "a lettered notebook follows a numbered one"


def late_imports(folder: Path = NBS) -> list[str]:
    "Each import of a module that a later notebook exports (an unknown module is an error)."
    nbs = _notebooks(folder)
    where = {mod: i for i, (_, mod, _) in enumerate(nbs)}
    late = []
    for i, (name, mod, code) in enumerate(nbs):
        for a, b in IMPORT.findall(code):
            used = a or b
            assert used in where, f"{name} imports anymal.{used}, which no notebook exports"
            if used != mod and where[used] > i: late.append(f"{name} imports anymal.{used} ({nbs[where[used]][0]})")
    return late


def test_notebooks_import_only_what_earlier_notebooks_export():
    late = late_imports()
    assert not late, "a notebook imports a module exported by a later notebook:\n" + "\n".join(late)


def test_the_order_check_catches_a_late_import(tmp_path):
    "The check above finds a notebook that imports from a later one."
    for name, body in [("00_a.ipynb", "#| default_exp a\nfrom anymal.b import x"), ("01_b.ipynb", "#| default_exp b")]:
        nb = {"cells": [{"cell_type": "code", "source": [body], "metadata": {}, "outputs": []}]}
        (tmp_path / name).write_text(json.dumps(nb))
    assert late_imports(tmp_path) == ["00_a.ipynb imports anymal.b (01_b.ipynb)"]


def test_readme_layout_lists_the_modules_in_reading_order():
    readme = (NBS.parent / "README.md").read_text()
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\s*\d+[a-z]?\.\s+`(\w+)`", section, re.M)
    assert listed == [mod for _, mod, _ in _notebooks()], listed
    exported = sorted(p.stem for p in (NBS.parent / "anymal").glob("*.py") if not p.stem.startswith("_"))
    assert sorted(listed) == exported


def _code_tokens(path: Path):
    "The tokens of a module that are code (not strings or comments), outside the `__all__` list nbdev writes."
    import io, tokenize
    toks = list(tokenize.generate_tokens(io.StringIO(path.read_text()).readline))
    skip_until = 0
    for i, t in enumerate(toks):
        if t.type == tokenize.NAME and t.string == "__all__" and t.start[1] == 0:
            skip_until = next(u.end[0] for u in toks[i:] if u.type == tokenize.NEWLINE)
        if t.start[0] <= skip_until: continue
        if t.type in (tokenize.OP, tokenize.NAME, tokenize.NUMBER): yield t


def test_library_lines_a_reader_can_take_in():
    "One statement per line (no `;` chains) and no code past 120 characters in anymal/ (long strings and docstrings aside)."
    semis, wide = [], []
    for p in sorted((NBS.parent / "anymal").glob("[a-z]*.py")):
        for t in _code_tokens(p):
            if t.string == ";": semis.append(f"{p.name}:{t.start[0]}")
            if t.end[1] > 120: wide.append(f"{p.name}:{t.start[0]}")
    assert not semis, f"statements chained with ';' (one per line, please): {semis[:10]}"
    assert not sorted(set(wide)), f"code past column 120: {sorted(set(wide))[:10]}"
