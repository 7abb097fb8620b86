"""Author a notebook as a jupytext 'percent' script and write it as .ipynb: `python tools/py2nb.py src.py nbs/NN_name.ipynb`.

Authoring aid only: the .ipynb in nbs/ or lessons/ is the source of truth; run `nbdev-clean` afterwards.
"""
import hashlib, os, sys
import jupytext

def main(src: str, dst: str):
    nb = jupytext.read(src, fmt="py:percent")
    nb.metadata = {"kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}}
    # Stable ids: a cell whose source is unchanged keeps the id it had in `dst`; a new or edited cell gets one from its
    # source alone, so inserting a cell does not renumber the cells after it (and parallel edits merge cleanly).
    old = {}
    if os.path.exists(dst):
        for c in jupytext.read(dst).cells: old.setdefault(c.source, []).append(c.get("id"))
    used = set()
    for c in nb.cells:
        ids = [i for i in old.get(c.source, []) if i and i not in used]
        cid = ids[0] if ids else hashlib.sha1(c.source.encode()).hexdigest()[:8]
        n = 0
        while cid in used: n += 1; cid = hashlib.sha1(f"{n}:{c.source}".encode()).hexdigest()[:8]
        c.id = cid; used.add(cid)
        c.metadata = {k: v for k, v in c.metadata.items() if k in ("tags",)}
        if c.cell_type == "code" and c.source.lstrip().startswith("#| hide"):
            c.metadata["jupyter"] = {"source_hidden": True}  # solutions and edge-case tests open collapsed
    jupytext.write(nb, dst, fmt="ipynb")

if __name__ == "__main__":
    main(*sys.argv[1:3])
