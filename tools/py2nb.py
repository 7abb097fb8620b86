"""Author a notebook as a jupytext 'percent' script and write it as .ipynb: `python tools/py2nb.py src.py nbs/NN_name.ipynb`.

Authoring aid only: the .ipynb in nbs/ or lessons/ is the source of truth; run `nbdev-clean` afterwards.
"""
import hashlib, sys
import jupytext

def main(src: str, dst: str):
    nb = jupytext.read(src, fmt="py:percent")
    nb.metadata = {"kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}}
    for i, c in enumerate(nb.cells):
        c.id = hashlib.sha1(f"{i}:{c.source}".encode()).hexdigest()[:8]  # stable ids: regenerating changes nothing
        c.metadata = {k: v for k, v in c.metadata.items() if k in ("tags",)}
        if c.cell_type == "code" and c.source.lstrip().startswith("#| hide"):
            c.metadata["jupyter"] = {"source_hidden": True}  # solutions and edge-case tests open collapsed
    jupytext.write(nb, dst, fmt="ipynb")

if __name__ == "__main__":
    main(*sys.argv[1:3])
