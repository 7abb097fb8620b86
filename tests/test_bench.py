"""The benchmark and the training modes (anymal.bench, anymal.bench_rows, anymal.modes) at the tiny preset on the CPU:
the command line and its JSON, equal losses across recipes, each mode and lever changing what it claims, through the
real Trainer, and resuming refused across optimizer kinds."""
import json, subprocess, sys
from pathlib import Path
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from ddp_toy_run import train_toy  # noqa: E402
from anymal.bench import bench, bench_config, goals  # noqa: E402
from anymal.checkpoint import CheckpointMismatch  # noqa: E402
from anymal.config import ConfigError, override, tiny  # noqa: E402
from anymal.model import AnyMAL  # noqa: E402
from anymal.modes import checkpointed_layers, apply_mode, check_patched_libraries, MODES  # noqa: E402
from anymal.llm import build_llm  # noqa: E402
from anymal.bench_rows import BenchData, workload  # noqa: E402
from anymal.data import collate  # noqa: E402
from anymal.trainer import Trainer, fit  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROW_FIELDS = {"stage", "recipe", "batch", "status", "step_s", "step_s_all", "tokens_per_step", "tokens_per_s",
              "tokens_per_s_runs", "spread", "repeats", "peak_alloc_gib", "peak_reserved_gib", "static_gib",
              "mfu_measured", "mfu_spec", "model_tflops", "loss0", "loss_last", "loss_k", "check_steps",
              "ckpt_layers", "optimizer", "applied", "commit", "versions", "device", "lengths", "pack", "attn"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_command_line_json_and_table(tmp_path):
    "`python -m anymal.bench --preset tiny`: JSON lines (env, rows, summary) and a table; losses equal at step 0."
    out, tab = tmp_path / "rows.jsonl", tmp_path / "table.md"
    r = subprocess.run([sys.executable, "-m", "anymal.bench", "--preset", "tiny", "--stage", "1,2", "--steps", "2",
                        "--warmup", "1", "--out", str(out), "--table", str(tab)],
                       cwd=REPO, capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert recs == [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    env, rows, summary = recs[0], recs[1:-1], recs[-1]
    assert env["kind"] == "env" and env["device"] and env["matmul_tflops"] > 0 and env["preset"] == "tiny"
    assert [(x["stage"], x["recipe"]) for x in rows] == [(1, "standard"), (1, "small"), (1, "fast"),
                                                       (2, "standard"), (2, "small"), (2, "fast")]
    for x in rows:
        assert x["status"] == "ok" and ROW_FIELDS <= set(x), set(ROW_FIELDS) - set(x)
        assert x["peak_alloc_gib"] is None and x["peak_reserved_gib"] is None  # no memory numbers on a CPU
        assert x["tokens_per_s"] > 0 and len(x["step_s_all"]) == 1 + 3 * 2 and x["mfu_measured"] > 0
        assert x["mfu_spec"] is None and len(x["tokens_per_s_runs"]) == 3 and x["spread"] >= 0  # no spec for a CPU
        assert x["commit"] == env["commit"] and x["versions"]["torch"] == torch.__version__ and x["device"] == env["device"]
        assert x["tokens_per_step"] == 4 * tiny().data.max_len
    for x in rows:
        if x["recipe"] != "standard":
            assert x["vs"] == "standard (batch 4)" and x["loss_match"] is True, x
            assert abs(x["loss0"] - next(s["loss0"] for s in rows if s["stage"] == x["stage"] and s["recipe"] == "standard")) < 0.01
    assert summary["kind"] == "summary" and len(summary["goals"]) == 6 and summary["commit"] == env["commit"]
    assert len(env["commit"]) >= 40 and env["commit_source"] == "git"  # the worktree's HEAD (+dirty when edited)
    assert all(g["met"] is None for g in summary["goals"] if "GiB" in g["goal"])  # memory goals: not on a CPU
    text = tab.read_text()
    assert "| stage | recipe |" in text and "stage 2 fast: tokens/s >= 2x standard's best" in text


def test_real_lengths_command_line(tmp_path):
    "`anymal bench --preset tiny --lengths real`: every recipe padded and packed on the real data's lengths, both stages."
    out = tmp_path / "real.jsonl"
    r = subprocess.run([sys.executable, "-m", "anymal.cli", "bench", "--preset", "tiny", "--lengths", "real", "--stage",
                        "1,2", "--batches", "4", "--steps", "1", "--warmup", "1", "--check-steps", "2", "--fp32",
                        "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    env, rows, summary = recs[0], recs[1:-1], recs[-1]
    assert env["lengths"] == "real" and env["repeats"] == 3 and env["seq"] == 1024
    for s in (1, 2):  # no `anymal prepare` output here: the documented stand-in, and the record says so
        src = env[f"lengths_stage{s}"]
        assert src["kind"] == "stand-in" and "STANDIN" in src["detail"] and src["max"] <= 1024
    assert env["lengths_stage2"]["mean_tokens"] > 2 * env["lengths_stage1"]["mean_tokens"]
    names = [(x["stage"], x["recipe"]) for x in rows]
    for s in (1, 2):
        for m in ("standard", "small", "fast"):
            assert (s, f"{m}, padded") in names and (s, f"{m}, packed") in names
    assert (1, "standard, no fp32 upcast, padded") in names and (2, "standard, no fp32 upcast, padded") not in names
    assert {x["attn"] for x in rows} == {"eager"}  # the tiny preset's attention: no varlen row on a CPU unless asked
    for x in rows:
        assert x["status"] == "ok" and x["lengths"] == "real" and x["commit"] == env["commit"], x
        assert len(x["tokens_per_s_runs"]) == 3 and x["mfu_spec"] is None and x["mfu_measured"] > 0
        if x["recipe"] != "standard, padded":
            assert x["after_steps_match"] is True, (x["recipe"], x["dloss_k"], x["dgrad"])
        if x["pack"]:
            twin = next(y for y in rows if y["stage"] == x["stage"] and y["recipe"] == x["base"])
            assert x["tokens_per_step"] == twin["tokens_per_step"] and x["loss_match"] is True
            assert not twin["pack"] and x["vs"].startswith(twin["recipe"])
    gains = summary["packing"]
    assert {(g["stage"], g["recipe"]) for g in gains} == {(x["stage"], x["recipe"]) for x in rows if x["pack"]}
    assert "packing, stage 2 fast, packed (real lengths, batch 4)" in r.stdout


def test_cli_dispatch_and_bad_arguments(capsys):
    from anymal.cli import main
    assert main(["bench", "--preset", "tiny", "--stage", "3"]) == 1
    assert "--stage='3'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--mode='turbo'"):
        from anymal.bench import bench_main
        bench_main(["--preset", "tiny", "--mode", "turbo"])


@pytest.fixture(scope="module")
def lever_rows():
    "Every lever row of stage 2 at the tiny preset (one timed step each)."
    return bench(bench_config(tiny()), stages=[2], modes=["small", "fast"], batches=[4], steps=1, warmup=1,
                 levers=True, emit=lambda r: None)


def test_levers_change_what_they_claim(lever_rows):
    rows = {r["recipe"]: r for r in lever_rows}
    layers = tiny().llm.layers
    assert rows["standard"]["ckpt_layers"] == layers and rows["standard"]["optimizer"] == "AdamW"
    assert rows["standard + no ckpt"]["ckpt_layers"] == 0
    assert rows["standard + ckpt 1/2 of layers"]["ckpt_layers"] == layers // 2
    assert rows["standard + AdamW8bit"]["optimizer"] == "AdamW8bit"
    assert rows["standard + paged AdamW8bit"]["optimizer"] == "AdamW8bit"  # paged needs CUDA: the plain 8-bit kind
    assert rows["standard + fused AdamW"]["applied"]["optim"] == "adamw_fused"
    assert list(rows["standard + LoRA dropout 0"]["applied"]["lora_dropout"]) == [7 * layers, 0.0]
    assert rows["small + ckpt offload"]["ckpt_layers"] == layers and rows["small + ckpt offload"]["base"] == "small"
    pad, pack = rows["standard, varied lengths, padded"], rows["standard + packing, varied lengths"]
    assert pack["tokens_per_step"] == pad["tokens_per_step"] and pack["loss_match"] is True  # same samples, fewer rows
    no_liger = "none (Liger-Kernel's Triton kernels need a CUDA device)"  # fast asks for them; a CPU cannot run them
    assert rows["fast"]["applied"]["kernels"] == no_liger and rows["fast without Liger kernels"]["applied"].get("kernels") is None
    for name, r in rows.items():
        if "compile" in name: assert r["status"] == "skipped: torch.compile is measured on GPUs only"
        else: assert r["status"] == "ok", (name, r["status"])
        if r["status"] == "ok" and r["form"] != "bf16" and r["recipe"] not in ("standard", "standard, varied lengths, padded"):
            assert r["loss_match"] is True, (name, r.get("dloss0"))


def test_lever_rows_leave_modes_alone(lever_rows):
    "A lever row trains with its own settings (apply_mode(settings=...)); nothing is registered in MODES."
    assert set(MODES) == {"standard", "small", "fast"} and any(r["lever"] for r in lever_rows)


def test_patched_libraries():
    "fuse_lora and dequantize_frozen rely on peft's and bitsandbytes' internals: this fails, naming the patch to re-check, when they change."
    check_patched_libraries(build_llm(override(tiny(), ["lora.dropout=0.0"]), stage=2))


def test_goals_from_rows():
    row = lambda name, tps, mem=None, batch=4, stage=2: dict(kind="row", stage=stage, recipe=name, batch=batch,
                                                            status="ok", tokens_per_s=tps, peak_alloc_gib=mem)
    g = goals([row("standard", 100.0, 20.0), row("standard", 110.0, 30.0, 8), row("small", 101.0, 9.5),
               row("fast", 150.0, 40.0), row("fast", 230.0, 70.0, 8)])
    assert [(x["value"], x["met"]) for x in g] == [(9.5, True), (1.01, True), (2.091, True)]
    g = goals([row("standard", 100.0, 20.0, stage=1), row("small", 99.0, 8.5, stage=1)])
    assert [(x["value"], x["met"]) for x in g] == [(8.5, False), (0.99, False), (None, None)]


def tiny_anymal(mode, **sets):
    cfg = override(tiny(), [f"train.mode={mode}", "lora.dropout=0.05", "llm.grad_ckpt=true", "train.batch_size=2",
                            "data.num_workers=0", *[f"{k}={v}" for k, v in sets.items()]])
    torch.manual_seed(0)
    return cfg, AnyMAL.build(cfg, stage=2, image_token_id=5, pad_id=0, eos_id=2)


@pytest.mark.parametrize("mode", ["standard", "small", "fast"])
def test_trainer_applies_mode(mode, tmp_path):
    "The real Trainer applies train.mode: checkpointing, loss chunk, LoRA dropout, optimizer (and nothing in standard)."
    cfg, m = tiny_anymal(mode, **{"train.out_dir": tmp_path})
    ds = BenchData(workload(cfg), 4)
    t = Trainer(cfg, m, ds, collate_fn=lambda s: collate(s, pad_id=0))
    dropouts = {type(d).__name__ for mod in m.llm.modules() if isinstance(getattr(mod, "lora_dropout", None), nn.ModuleDict)
                for d in mod.lora_dropout.values()}
    every = list(range(cfg.llm.layers))  # the tiny LLaMA's layers, all checkpointed
    want = {"standard": (every, 1024, {"Dropout"}, "AdamW", False),
            "small": (every, 512, {"Identity"}, "AdamW8bit", False),
            "fast": ([], 1024, {"Identity"}, "AdamW", True)}[mode]
    got = (checkpointed_layers(m.llm), m.loss_chunk, dropouts, type(t.opt).__name__, bool(t.opt.defaults.get("fused")))
    assert got == want
    rows = []  # no chunk of logits larger than the loss chunk, forward and backward
    h = m.lm_head.register_forward_hook(lambda mod, i, o: rows.append(o.shape[0]))
    t.batches = t.micro_batches(); step = t.train_step(); h.remove()
    assert torch.isfinite(torch.tensor(step["loss"])) and max(rows) <= m.loss_chunk


def test_small_mode_fit_resumes_and_refuses_other_kind(tmp_path):
    "8-bit optimizer state survives a checkpoint; resuming it in another mode is refused with a clear message."
    train_toy(tmp_path, "train.steps=4", "train.mode=small")
    train_toy(tmp_path, "train.steps=6", "train.mode=small", resume=True)
    with pytest.raises(CheckpointMismatch, match=r"\['adamw8bit'\], train.mode='standard' uses \['adamw'\]"):
        train_toy(tmp_path, "train.steps=8", resume=True)


def test_unknown_mode_is_refused(tmp_path):
    cfg, m = tiny_anymal("standard", **{"train.out_dir": tmp_path})
    with pytest.raises(ConfigError, match="train.mode='turbo'"):
        apply_mode(m, override(cfg, ["train.mode=turbo"]))
