"""anymal.plots: attention maps, curves and accuracy figures render to PNG files (headless, Agg)."""
import json
import math
import subprocess
import sys
import warnings

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

matplotlib.use("Agg")
from anymal.plots import (accuracy_table, attention_maps, plot_accuracy, plot_accuracy_curve,  # noqa: E402
                          plot_attention, plot_curves, plot_main, read_metrics)


def _png(path, min_bytes=5000):
    "The PNG's size in pixels, after checking it exists and is not trivial."
    assert path.exists() and path.stat().st_size > min_bytes, path
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def _attn(layers=2, heads=4, L=6, grid=7, cls=True, extra=0, seed=0):
    "Softmax attention where latent i peaks at patch (i, i): (layers, heads, L, cls + grid^2 + extra)."
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(layers, heads, L, int(cls) + grid * grid + extra)) * 0.1
    for i in range(L):
        logits[:, :, i, int(cls) + i * grid + i] += 6
    a = np.exp(logits)
    return a / a.sum(-1, keepdims=True)


def test_attention_maps_fold_and_select():
    a = _attn()
    maps, share = attention_maps(a, grid=7, has_cls=True)
    assert maps.shape == (6, 7, 7) and share.shape == (6,)
    for i in range(6):
        assert np.unravel_index(maps[i].argmax(), (7, 7)) == (i, i)
    np.testing.assert_allclose(share, a[-1].mean(0)[:, 1:].sum(-1))
    m0, _ = attention_maps(a, grid=7, has_cls=True, layer=0, head=2)
    np.testing.assert_allclose(m0.reshape(6, -1), a[0, 2, :, 1:])
    # (L, P) and a batch of one, also as a torch tensor
    np.testing.assert_allclose(attention_maps(a[-1].mean(0), grid=7, has_cls=True)[0], maps)
    np.testing.assert_allclose(attention_maps(torch.tensor(a[None]), grid=7, has_cls=True)[0], maps, rtol=1e-6)
    # keys after the patches (Flamingo's latents) lower the share on the image
    _, sh = attention_maps(_attn(extra=6), grid=7, has_cls=True)
    assert (sh < 1).all()
    with pytest.raises(ValueError, match="has_cls=True"):
        attention_maps(a, grid=7)
    with pytest.raises(ValueError, match="fewer than"):
        attention_maps(a, grid=8, has_cls=True)
    with pytest.raises(ValueError, match="batch of 2"):
        attention_maps(np.stack([a, a]), grid=7, has_cls=True)
    with pytest.raises(ValueError, match="got shape"):
        attention_maps(np.zeros(5), grid=2)


def test_plot_attention_png(tmp_path):
    img = Image.new("RGB", (112, 112), "white")
    img.paste((200, 30, 30), (16, 16, 48, 48))
    fig = plot_attention(img, _attn(), grid=7, has_cls=True, cols=4, save=tmp_path / "attn.png")
    assert len([ax for ax in fig.axes if ax.images]) == 7       # the image + 6 latents
    w, h = _png(tmp_path / "attn.png")
    assert w > 300 and h > 150 and w > h                        # 4 columns, 2 rows
    fig = plot_attention(np.asarray(img), _attn(), grid=7, latents=[0, 5], has_cls=True, save=tmp_path / "two.png")
    assert [ax.get_title() for ax in fig.axes if ax.images][1:] == ["latent 0", "latent 5"]
    _png(tmp_path / "two.png", 2000)
    with pytest.raises(IndexError, match=r"latents \[9\] out of range"):
        plot_attention(img, _attn(), grid=7, latents=[9], has_cls=True)


def _write_run(folder, lr, steps=50, truncate=False, extra=True):
    folder.mkdir(parents=True)
    rows = []
    for s in range(1, steps + 1):
        r = dict(step=s, split="train", loss=3 * math.exp(-s / 20) + 1, lr=lr * min(1, s / 5), tokens_per_s=1000.0, time=0.1 * s)
        if extra: r["grad_norm"] = 0.5
        rows.append(r)
        if s % 10 == 0:
            rows.append(dict(step=s, split="val", loss=3 * math.exp(-s / 20) + 1.2, lr=lr, tokens_per_s=0.0, time=0.1 * s))
    text = "\n".join(json.dumps(r) for r in rows) + "\n"
    (folder / "metrics.jsonl").write_text(text + ('{"step": 51, "split": "train", "lo' if truncate else ""))
    return folder


def test_read_metrics_tolerates_truncated_last_line(tmp_path):
    run = _write_run(tmp_path / "a", 1e-3, truncate=True)
    with pytest.warns(UserWarning, match="truncated last line"):
        rows = read_metrics(run)
    assert len(rows) == 55 and rows[-1]["step"] == 50
    assert read_metrics(_write_run(tmp_path / "b", 1e-3) / "metrics.jsonl") == rows
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "metrics.jsonl").write_text('{"step": 1}\n[1, 2]\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: expected a JSON object"):
        read_metrics(tmp_path / "c")


def test_plot_curves_png_several_runs(tmp_path):
    a = _write_run(tmp_path / "run_a", 1e-3, truncate=True)
    b = _write_run(tmp_path / "run_b", 3e-4, extra=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig = plot_curves([a, b / "metrics.jsonl"], save=tmp_path / "curves.png")
    loss_ax, lr_ax = fig.axes
    assert [l.get_label() for l in loss_ax.lines] == ["run_a train", "run_a val", "run_b train", "run_b val"]
    assert list(loss_ax.lines[1].get_xdata()) == [10, 20, 30, 40, 50]
    assert lr_ax.get_yscale() == "log" and max(lr_ax.lines[0].get_ydata()) == pytest.approx(1e-3)
    w, h = _png(tmp_path / "curves.png")
    assert w > 2 * h
    fig = plot_curves(b, keys=("loss",), labels=["mine"])
    assert fig.axes[0].lines[0].get_label() == "mine train"
    with pytest.raises(KeyError, match=r"no run has \['accuracy'\]"):
        plot_curves(b, keys=("loss", "accuracy"))


RES = {"image": {"overall": 62.25, "perQuestionType": {"how many": 40.0, "what color is the": 70.5},
                 "perAnswerType": {"number": 40.0, "other": 70.5},
                 "counts": {"overall": 20, "perQuestionType": {"how many": 8, "what color is the": 12}}},
       "blank": {"overall": 30.0, "perQuestionType": {"how many": 30.0, "what color is the": 30.0},
                 "perAnswerType": {"number": 30.0, "other": 30.0}}}


def test_accuracy_table_and_figures(tmp_path):
    md = accuracy_table(RES)
    assert md.splitlines() == ["| Question type | n | image | blank |", "|---|---:|---:|---:|",
                               "| how many | 8 | 40.00 | 30.00 |", "| what color is the | 12 | 70.50 | 30.00 |",
                               "| **overall** | 20 | **62.25** | **30.00** |"]
    one = accuracy_table(dict(RES["image"], control="none"), by="perAnswerType", digits=1)
    assert one.splitlines()[0] == "| Answer type | n | none |" and "| number |  | 40.0 |" in one
    with pytest.raises(TypeError, match="VQA result dict"):
        accuracy_table({"a": 1})
    fig = plot_accuracy(RES, save=tmp_path / "acc.png")
    assert len(fig.axes[0].patches) == 6
    _png(tmp_path / "acc.png")
    fig = plot_accuracy_curve([(200, RES["image"]), (100, RES["blank"])], save=tmp_path / "curve.png")
    assert list(fig.axes[0].lines[0].get_xdata()) == [100, 200]
    _png(tmp_path / "curve.png")


def test_plot_main_cli(tmp_path):
    run = _write_run(tmp_path / "run", 1e-3)
    (tmp_path / "image_metrics.json").write_text(json.dumps(RES["image"]))
    assert plot_main([str(run), "--vqa", str(tmp_path / "image_metrics.json")]) == 0
    _png(run / "curves.png")
    _png(run / "curves_vqa.png")
    out = tmp_path / "elsewhere.png"  # and as a process, headless, with --keys and --out
    code = "import sys; from anymal.plots import plot_main; sys.exit(plot_main(sys.argv[1:]))"
    p = subprocess.run([sys.executable, "-c", code, str(run), "--keys", "loss", "tokens_per_s", "--out", str(out)],
                       capture_output=True, text=True, env={"MPLBACKEND": "Agg", "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    assert f"wrote {out}" in p.stdout
    _png(out)
