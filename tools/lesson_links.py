"""Write, in each lesson, the table of the library code it calls and the `nbs/` notebook that builds each piece.

`python tools/lesson_links.py` (re)writes the cell after a lesson's first import cell; `--check` only says which
lessons' tables are missing or stale (tests/test_lesson_links.py runs it). The table comes from the lesson's own
`from anymal.<module> import ...` lines and each module's "File to edit" header.
"""
from __future__ import annotations
import ast, hashlib, json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARK = "**The library behind this lesson.**"

def imports(nb: dict) -> dict[str, list[str]]:
    "module -> names this notebook imports from `anymal.<module>`, in first-seen order."
    out: dict[str, list[str]] = {}
    for c in nb["cells"]:
        if c["cell_type"] != "code": continue
        src = "".join(c["source"])
        try: tree = ast.parse("\n".join(l for l in src.splitlines() if not l.lstrip().startswith(("%", "!"))))
        except SyntaxError: continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("anymal."):
                names = out.setdefault(node.module.split(".", 1)[1], [])
                names += [a.name for a in node.names if a.name not in names]
    return out

def notebook_of(module: str) -> str:
    "The `nbs/` notebook that exports `anymal/<module>.py` (its 'File to edit' header)."
    text = (ROOT / "anymal" / f"{module}.py").read_text()
    m = re.search(r"File to edit: \.\./nbs/([\w.-]+\.ipynb)", text)
    if not m: raise SystemExit(f"anymal/{module}.py names no notebook to edit")
    return m.group(1)

def table(nb: dict) -> str:
    found = sorted((notebook_of(m), m, names) for m, names in imports(nb).items())  # in reading order
    rows = [f"| `anymal.{m}` | [{f[:-6]}](../nbs/{f}) | {', '.join(f'`{n}`' for n in names)} |" for f, m, names in found]
    return "\n".join([f"{MARK} Every function this lesson calls is built, explained and tested in a notebook of `nbs/`",
                      "(the library's source); open it to see how a piece works inside.", "",
                      "| module | notebook | what this lesson uses |", "|---|---|---|", *rows])

def first_import_cell(nb: dict) -> int:
    for i, c in enumerate(nb["cells"]):
        if c["cell_type"] == "code" and "from anymal." in "".join(c["source"]): return i
    raise SystemExit("no `from anymal.` import in this lesson")

def update(path: Path, write: bool) -> bool:
    "Whether `path`'s table was missing or stale (rewritten when `write`)."
    nb = json.loads(path.read_text())
    want = table(nb)
    have = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "markdown" and "".join(c["source"]).startswith(MARK)]
    if have and "".join(nb["cells"][have[0]]["source"]) == want: return False
    if write:
        cell = dict(cell_type="markdown", id=hashlib.sha1(want.encode()).hexdigest()[:8], metadata={},
                    source=want.splitlines(keepends=True))
        if have: nb["cells"][have[0]]["source"] = cell["source"]
        else: nb["cells"].insert(first_import_cell(nb) + 1, cell)
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return True

def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = [p.name for p in sorted((ROOT / "lessons").glob("*.ipynb")) if update(p, write=not check)]
    if check and stale:
        print(f"lesson_links: stale tables in {', '.join(stale)}: run python tools/lesson_links.py", file=sys.stderr)
        return 1
    if not check: print(f"lesson_links: {len(stale)} lesson(s) rewritten")
    return 0

if __name__ == "__main__": sys.exit(main(sys.argv[1:]))
