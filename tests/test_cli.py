"The console script and the test harness, as a user runs them."
import json, os, subprocess, sys, shutil
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

def run(*args, **kw):
    return subprocess.run([str(BIN / "anymal"), *args], capture_output=True, text=True, timeout=300, **kw)

def test_info_full_json_is_valid():
    r = run("info", "--preset", "full", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["config"]["vision"]["width"] == 1024 and d["config"]["llm"]["hidden"] == 4096

def test_info_rejects_typo_with_key_name():
    r = run("info", "--set", "resampler.latnts=8", "--no-model")
    assert r.returncode == 1
    assert "resampler.latnts" in r.stderr and "latents" in r.stderr and "Traceback" not in r.stderr

def test_info_rejects_wrong_type():
    r = run("info", "--set", "train.steps=1.5", "--no-model")
    assert r.returncode == 1 and "train.steps" in r.stderr

def test_unknown_command():
    r = run("frobnicate")
    assert r.returncode == 2 and "unknown command" in r.stderr

def test_failing_notebook_cell_fails_nbdev_test(tmp_path):
    "The test command relies on nbdev-test failing when any cell raises."
    nb = json.loads((ROOT / "nbs" / "00_config.ipynb").read_text())
    nb["cells"].append({"cell_type": "code", "id": "f00dfeed", "metadata": {}, "execution_count": None,
                        "outputs": [], "source": "assert 1 == 2, 'deliberate failure'"})
    d = tmp_path / "nbs"; d.mkdir()
    (d / "broken.ipynb").write_text(json.dumps(nb))
    r = subprocess.run([str(BIN / "nbdev-test"), str(d)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode != 0 and "broken.ipynb" in (r.stdout + r.stderr)


def test_help_prints_no_bitsandbytes_message():
    "bitsandbytes' 'Failed to load CPU gemm_4bit_forward from kernels-community' is dropped (anymal.llm)."
    for args in (["--help"], ["train", "--help"], ["chat", "--help"]):
        r = run(*args)
        assert r.returncode == 0 and "usage: anymal" in r.stdout, r.stderr
        assert r.stderr == "", r.stderr
