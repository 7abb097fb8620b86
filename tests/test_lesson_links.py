"Each lesson lists the library code it calls and the nbs/ notebook that builds it (tools/lesson_links.py)."
import importlib.util, json, subprocess, sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("lesson_links", REPO / "tools" / "lesson_links.py")
links = importlib.util.module_from_spec(spec)
spec.loader.exec_module(links)


def test_every_lesson_table_is_current():
    r = subprocess.run([sys.executable, str(REPO / "tools" / "lesson_links.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_a_new_import_makes_the_table_stale_and_the_tool_adds_it(tmp_path):
    src = REPO / "lessons" / "05_stage1_alignment.ipynb"
    nb = json.loads(src.read_text())
    assert not links.update(src, write=False)  # current as committed
    i = links.first_import_cell(nb)
    nb["cells"][i]["source"] = "".join(nb["cells"][i]["source"]) + "\nfrom anymal.cache import cache_root"
    p = tmp_path / src.name
    p.write_text(json.dumps(nb))
    assert links.update(p, write=True)  # stale: rewritten
    assert not links.update(p, write=False)  # and current after
    cells = [c for c in json.loads(p.read_text())["cells"] if "".join(c["source"]).startswith(links.MARK)]
    assert len(cells) == 1  # rewritten in place, not added twice
    row = next(l for l in "".join(cells[0]["source"]).splitlines() if "anymal.cache" in l)
    assert "[14_cache](../nbs/14_cache.ipynb)" in row and "`cache_root`" in row


def test_every_linked_notebook_exists():
    for lesson in sorted((REPO / "lessons").glob("*.ipynb")):
        for module in links.imports(json.loads(lesson.read_text())):
            assert (REPO / "nbs" / links.notebook_of(module)).exists(), (lesson.name, module)
