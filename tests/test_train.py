"""The trainer's contract (anymal.trainer, anymal.checkpoint, anymal.runlog), on the toy model of tests/toy.py:
exact resume, two CPU processes under torchrun, NaN stop, refusal of mismatched checkpoints, atomic saves,
gradient accumulation, the LR schedule, metrics.jsonl and W&B."""
import math, os, signal, subprocess, sys, time, warnings
from pathlib import Path
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ddp_toy_run import toy_cfg, train_toy  # noqa: E402
from anymal.checkpoint import (CheckpointMismatch, latest_checkpoint, load_for_inference, load_train_state,  # noqa: E402
                               load_trainable, read_meta, trainable_state_dict)
from anymal.config import tiny, override  # noqa: E402
from toy import ToySeqs, ToyVLM  # noqa: E402
from anymal.trainer import (PRECISIONS, Interrupted, NonFiniteError, StopSignals, fit, lr_factor,  # noqa: E402
                            precision_for, training_precision)
from anymal.config import ConfigError, full  # noqa: E402
from anymal.runlog import read_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    "Tiny shapes on a shared 2-core machine: one thread is far faster than two contending ones."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Crash(Exception): pass


def crash_at(step):
    def on_step(s, m):
        if s == step: raise Crash(f"crash after step {s}")
    return on_step


def curve(out): return [(r["step"], r["split"], r["loss"]) for r in read_metrics(out)]


@pytest.mark.parametrize("group", [False, True], ids=["shuffled", "grouped-by-length"])
def test_resume_is_exact(tmp_path, group):
    "Crash mid-epoch, resume, crash at an epoch boundary, resume: the same losses, bit for bit, as no crash."
    sets = ["resampler.dropout=0.2", "train.steps=30", "train.batch_size=4", "train.grad_accum=2", "train.save_every=8",
            "train.eval_every=10", f"train.group_by_length={str(group).lower()}"]  # 96 samples / 4 = 24 micro-batches = 12 steps per epoch
    _, ma = train_toy(tmp_path / "a", *sets, n=96)
    b = tmp_path / "b"
    with pytest.raises(Crash): train_toy(b, *sets, n=96, on_step=crash_at(13))
    p = load_train_state(b)["progress"]
    assert (p["step"], p["epoch"], p["batches"]) == (8, 0, 16)
    with pytest.raises(Crash): train_toy(b, *sets, n=96, resume=True, on_step=crash_at(27))
    p = load_train_state(b)["progress"]
    assert (p["step"], p["epoch"], p["batches"]) == (24, 1, 24)  # the end of epoch 1 exactly
    _, mb = train_toy(b, *sets, n=96, resume=True)
    ca, cb = curve(tmp_path / "a"), curve(b)
    assert len(ca) == 30 + 3 and ca == cb  # identical floats at every step, train and val
    sa, sb = trainable_state_dict(ma), trainable_state_dict(mb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    oa, ob = load_train_state(tmp_path / "a")["optimizer"]["state"], load_train_state(b)["optimizer"]["state"]
    assert all(torch.equal(oa[i]["exp_avg_sq"], ob[i]["exp_avg_sq"]) for i in oa)
    assert read_metrics(b)[-1]["tokens"] == read_metrics(tmp_path / "a")[-1]["tokens"] == 30 * 8 * 12


# ---- precision: bf16, or fp16 with a gradient scaler on GPUs without bf16 ------------------------------------------

@pytest.mark.parametrize("device,bf16,mode,dtype,want", [
    ("cuda", True, "fast", "bfloat16", "bf16"),       # A100, L4, H100: bf16, every mode
    ("cuda", True, "small", "bfloat16", "bf16"),
    ("cuda", False, "small", "float16", "fp16"),      # T4, V100: fp16 and a gradient scaler
    ("cuda", False, "standard", "float32", "fp16"),
    ("cpu", True, "standard", "float32", "fp32"),     # a CPU: fp32 unless train.cpu_bf16 (below)
    ("cpu", False, "fast", "bfloat16", "fp32"),
])
def test_precision_for_each_card(device, bf16, mode, dtype, want):
    p = precision_for(device, bf16, mode, dtype)
    assert p.name == want and p.scaler == (want == "fp16") and p == PRECISIONS[want]


@pytest.mark.parametrize("mode,dtype,match", [
    ("fast", "float16", "train.mode='fast' needs bf16, which the Tesla T4 does not have"),
    ("fast", "bfloat16", "train.mode='fast' needs bf16, which the Tesla T4 does not have"),
    ("small", "bfloat16", r"llm.dtype='bfloat16', but the Tesla T4 has no bf16: --set llm.dtype=float16"),
])
def test_precision_refusals_name_the_card(mode, dtype, match):
    with pytest.raises(ConfigError, match=match):
        precision_for("cuda", False, mode, dtype, card="Tesla T4")


def test_training_precision_on_this_cpu(monkeypatch):
    import anymal.trainer as tr
    cfg = toy_cfg("x", "train.cpu_bf16=true")
    for native in (True, False):
        monkeypatch.setattr(tr, "cpu_has_bf16", lambda: native)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            assert training_precision(cfg, "cpu").name == ("bf16" if native else "fp32")
        assert any("no native bf16" in str(x.message) for x in w) == (not native)
    assert training_precision(full(), "cpu").name == "fp32"  # full's bf16 LLM dtype is a GPU matter


def _fp16_scale_hook(state, overflow_at):
    "A gradient hook that makes the gradients of the steps in `overflow_at` infinite (an fp16 overflow)."
    return lambda g: g * float("inf") if state["next"] in overflow_at else g


def _tracking(state, crash=None):
    def on_step(s, m):
        state["next"] = s + 1
        if s == crash: raise Crash(f"crash after step {s}")
    return on_step


FP16 = ["resampler.dropout=0.2", "train.steps=14", "train.save_every=5", "train.eval_every=7"]


def _fp16_records(out):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(out)]


def test_fp16_gradient_scaler_trains_skips_overflows_and_resumes_exactly(tmp_path):
    "fp16 autocast + GradScaler on the CPU: an overflow skips its step and halves the scale; resume restores the scale."
    sa = {"next": 1}
    _, ma = train_toy(tmp_path / "a", *FP16, precision=PRECISIONS["fp16"], on_step=_tracking(sa),
                      hook=_fp16_scale_hook(sa, {3, 4}))
    ra = _fp16_records(tmp_path / "a")
    train = [r for r in ra if r["split"] == "train"]
    assert [r["loss_scale"] for r in train] == [65536.0] * 3 + [32768.0] + [16384.0] * 10
    assert [r["skipped_steps"] for r in train] == [0, 0, 1, 1] + [0] * 10
    assert train[2]["lr"] == train[3]["lr"] == train[4]["lr"]  # no scheduler step for a skipped step
    assert train[-1]["loss"] < train[0]["loss"] - 0.3           # it learns in fp16
    train_toy(tmp_path / "fp32", *FP16, "train.steps=2")       # the same first two steps in fp32
    ref32 = [r for r in read_metrics(tmp_path / "fp32") if r["split"] == "train"]
    for r16, r32 in zip(train[:2], ref32):  # gradients unscaled before clipping and the norm: fp32's, to fp16 rounding
        assert r16["grad_norm"] == pytest.approx(r32["grad_norm"], rel=2e-2) and r16["loss"] == pytest.approx(r32["loss"], abs=2e-2)
    st = load_train_state(tmp_path / "a")
    assert st["precision"] == "fp16" and st["scaler"]["scale"] == 16384.0 and st["scaler"]["_growth_tracker"] == 10
    # crash after step 8, resume from the step-5 checkpoint: the same records and weights, scale included
    b, sb = tmp_path / "b", {"next": 1}
    with pytest.raises(Crash):
        train_toy(b, *FP16, precision=PRECISIONS["fp16"], on_step=_tracking(sb, crash=8), hook=_fp16_scale_hook(sb, {3, 4}))
    assert load_train_state(b)["scaler"]["scale"] == 16384.0
    sb = {"next": 1}  # the resumed process never reaches steps 3-4 again
    _, mb = train_toy(b, *FP16, resume=True, precision=PRECISIONS["fp16"], on_step=_tracking(sb),
                      hook=_fp16_scale_hook(sb, {3, 4}))
    assert _fp16_records(b) == ra
    wa, wb = trainable_state_dict(ma), trainable_state_dict(mb)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_fp16_overflow_with_the_scale_down_to_one_stops(tmp_path):
    "Gradients that overflow at every scale are a real divergence: skipped steps until the scale is 1, then a stop."
    cfg = toy_cfg(tmp_path, "train.steps=30")
    torch.manual_seed(0)
    model = ToyVLM.from_config(cfg)
    before = trainable_state_dict(model)
    model.bridge.latents.register_hook(lambda g: g * float("inf"))
    with pytest.raises(NonFiniteError, match=r"at step 17 with finite losses and the fp16 loss scale down to 1.0"):
        fit(cfg, model, ToySeqs(64), progress=False, precision=PRECISIONS["fp16"])  # 65536 = 2**16: 16 halvings
    assert all(torch.equal(v, trainable_state_dict(model)[k]) for k, v in before.items())  # every step was skipped


def test_torchrun_two_processes_match_one(tmp_path):
    "2 CPU processes x batch 2 x accum 2 (gloo, no_sync) == 1 process x batch 8: same losses, tokens, weights."
    _, m1 = train_toy(tmp_path / "one")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(REPO / "tests" / "ddp_toy_run.py"), str(tmp_path / "two"), "train.batch_size=2",
                        "train.grad_accum=2"], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert time.time() - t0 < 90
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [(x["step"], x["split"]) for x in one] == [(x["step"], x["split"]) for x in two]  # rank 0 logs, once
    for x, y in zip(one, two):
        assert math.isclose(x["loss"], y["loss"], rel_tol=1e-5), (x, y)
        assert x["tokens"] == y["tokens"] and x["lr"] == y["lr"]  # tokens summed over both ranks
    m2 = ToyVLM.from_config(toy_cfg(tmp_path / "two"))
    load_trainable(m2, tmp_path / "two" / "final")
    s1, s2 = trainable_state_dict(m1), trainable_state_dict(m2)
    assert all(torch.allclose(s1[k], s2[k], atol=1e-5) for k in s1)
    assert len(load_train_state(tmp_path / "two")["rng"]) == 2  # each rank's generators


def test_nan_stops_with_clear_message_and_keeps_last_checkpoint(tmp_path):
    seen = {}
    def snapshot(step, m):
        if step == 8: seen["sd"] = trainable_state_dict(model_ref[0])
    model_ref = []
    cfg = toy_cfg(tmp_path)
    torch.manual_seed(0)
    model = ToyVLM.from_config(cfg, nan_after=9); model_ref.append(model)
    with pytest.raises(NonFiniteError, match=r"non-finite train loss at step 10 \(rank 0: micro-batch 1/1 loss nan \(sample_ids \["):
        fit(cfg, model, ToySeqs(64), progress=False, on_step=snapshot)
    assert latest_checkpoint(tmp_path).name == "step-00000008"
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-00000004", "step-00000008"]  # nothing for step 10, no temporary leftovers
    assert not (tmp_path / "final").exists()
    fresh = ToyVLM.from_config(cfg)
    load_trainable(fresh, tmp_path, cfg)
    assert all(torch.equal(v, trainable_state_dict(fresh)[k]) for k, v in seen["sd"].items())
    assert max(r["step"] for r in read_metrics(tmp_path)) == 9


def test_nonfinite_gradient_stops(tmp_path):
    "Finite losses, infinite gradients (an overflow, say): stopped before the optimizer step, weights untouched."
    cfg = toy_cfg(tmp_path)
    torch.manual_seed(0)
    model = ToyVLM.from_config(cfg)
    before = trainable_state_dict(model)
    model.bridge.latents.register_hook(lambda g: g * float("inf"))
    with pytest.raises(NonFiniteError, match=r"non-finite gradient norm \(inf\) at step 1 with finite losses"):
        fit(cfg, model, ToySeqs(64), progress=False)
    assert all(torch.equal(v, trainable_state_dict(model)[k]) for k, v in before.items())
    assert latest_checkpoint(tmp_path) is None and not (tmp_path / "final").exists()


def test_mismatched_checkpoint_is_refused(tmp_path):
    train_toy(tmp_path, "train.steps=4")
    big = ["resampler.latents=8"]
    with pytest.raises(CheckpointMismatch) as e: train_toy(tmp_path, *big, resume=True)
    msg = str(e.value)
    assert "resampler.latents: checkpoint 4, model 8" in msg and "bridge.latents: shape checkpoint (4, 64), model (8, 64)" in msg
    m = ToyVLM.from_config(toy_cfg(tmp_path, *big)); before = trainable_state_dict(m)
    with pytest.raises(CheckpointMismatch, match="bridge.latents: shape checkpoint"):
        load_trainable(m, tmp_path / "final")
    assert all(torch.equal(v, trainable_state_dict(m)[k]) for k, v in before.items())  # untouched
    with pytest.raises(CheckpointMismatch, match="resampler.latents: checkpoint 4, model 8"):
        load_for_inference(tmp_path, build_fn=lambda cfg: ToyVLM.from_config(override(cfg, big)), sets=big)
    m = ToyVLM.from_config(toy_cfg(tmp_path)); m.head.requires_grad_(True)
    with pytest.raises(CheckpointMismatch, match="head.weight: trained in the model, not in the checkpoint"):
        load_trainable(m, tmp_path)


def test_crash_while_saving_leaves_previous_checkpoint(tmp_path, monkeypatch):
    "torch.save fails in the middle of the step-8 checkpoint: step 4 stays `latest` and loadable; resume is exact."
    real_save = torch.save
    def disk_full(*a, **k): raise OSError("No space left on device (simulated)")
    def break_disk(step, m):
        if step == 4: monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="simulated"): train_toy(tmp_path / "b", on_step=break_disk)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["latest", "step-00000004"]
    assert latest_checkpoint(tmp_path / "b").name == "step-00000004"
    assert load_train_state(tmp_path / "b")["progress"]["step"] == 4
    load_trainable(ToyVLM.from_config(toy_cfg(tmp_path)), tmp_path / "b")
    train_toy(tmp_path / "b", resume=True)
    train_toy(tmp_path / "a")
    assert curve(tmp_path / "a") == curve(tmp_path / "b")


def test_grad_accumulation_equals_bigger_batch(tmp_path):
    _, m8 = train_toy(tmp_path / "b8", "train.batch_size=8")
    _, m4 = train_toy(tmp_path / "b4x2", "train.batch_size=4", "train.grad_accum=2")
    c8, c4 = read_metrics(tmp_path / "b8"), read_metrics(tmp_path / "b4x2")
    assert [r["step"] for r in c8] == [r["step"] for r in c4]
    for x, y in zip(c8, c4): assert math.isclose(x["loss"], y["loss"], rel_tol=1e-5) and x["tokens"] == y["tokens"]
    s8, s4 = trainable_state_dict(m8), trainable_state_dict(m4)
    assert all(torch.allclose(s8[k], s4[k], atol=1e-6) for k in s8)
    assert not torch.equal(s8["bridge.latents"], trainable_state_dict(ToyVLM.from_config(toy_cfg(tmp_path)))["bridge.latents"])


def test_lr_schedule_shape(tmp_path):
    f = [lr_factor(s, 10, 100, 0.1) for s in range(100)]
    assert f[0] == 0.1 and f[9] == 1.0 and f[10] == 1.0 and math.isclose(f[-1], 0.1)
    assert all(a < b for a, b in zip(f[:9], f[1:10])) and all(a >= b for a, b in zip(f[10:], f[11:]))
    assert math.isclose(f[10 + 89 // 2], 0.55, abs_tol=0.01)
    assert lr_factor(5, 0, 10, 0.0) < 1.0 and lr_factor(0, 0, 10, 0.0) == 1.0  # no warm-up
    train_toy(tmp_path)  # lr 3e-2, lora_lr 1e-2, warmup 3, 12 steps, min_lr_ratio 0.1
    for r in read_metrics(tmp_path, "train"):
        k = lr_factor(r["step"] - 1, 3, 12, 0.1)
        assert math.isclose(r["lr_groups"]["bridge"], 3e-2 * k) and math.isclose(r["lr_groups"]["lora"], 1e-2 * k)
        assert r["lr"] == r["lr_groups"]["bridge"]


def test_metrics_records(tmp_path):
    train_toy(tmp_path)
    tr, va = read_metrics(tmp_path, "train"), read_metrics(tmp_path, "val")
    assert [r["step"] for r in tr] == list(range(1, 13)) and [r["step"] for r in va] == [6, 12]
    for r in tr + va:
        assert {"step", "split", "loss", "lr", "lr_groups", "tokens_per_s", "tokens", "time", "epoch"} <= set(r)
        assert r["tokens_per_s"] > 0 and math.isfinite(r["loss"])
    assert [r["tokens"] for r in tr] == [8 * 12 * s for s in range(1, 13)]  # attention_mask tokens: 12 of 16
    assert tr[-1]["epoch"] == 1.5 and va[0]["batches"] == 4  # 64 samples / 8 per step; all 32 val samples
    assert tr[0]["time"] <= tr[-1]["time"]


def test_fresh_run_refuses_existing_checkpoints(tmp_path):
    train_toy(tmp_path, "train.steps=4")
    with pytest.raises(FileExistsError, match="pass resume=True"): train_toy(tmp_path, "train.steps=4")
    final, _ = train_toy(tmp_path, "train.steps=4", resume=True)  # already done: nothing to train
    assert final == tmp_path / "final"


def test_load_for_inference(tmp_path):
    final, m = train_toy(tmp_path)
    inf = load_for_inference(final, build_fn=ToyVLM.from_config)
    assert not inf.model.training and inf.cfg.train.steps == 12 and read_meta(final)["step"] == 12
    assert all(torch.equal(v, trainable_state_dict(inf.model)[k]) for k, v in trainable_state_dict(m).items())
    assert sorted(p.name for p in final.iterdir()) == ["meta.json", "trainable.safetensors"]
    load_for_inference(tmp_path, build_fn=ToyVLM.from_config)  # a run directory means its final/


def test_init_from_loads_bridge_without_lora(tmp_path):
    "Stage 2 starts from a stage-1 checkpoint that has the bridge but no LoRA tensors."
    cfg = toy_cfg(tmp_path / "s1", "train.steps=3")
    torch.manual_seed(0); m1 = ToyVLM.from_config(cfg); m1.mix.lora_A.requires_grad_(False); m1.mix.lora_B.requires_grad_(False)
    s1 = fit(cfg, m1, ToySeqs(64), progress=False)
    assert set(read_meta(s1)["arch"]["tensors"]) == {"bridge.latents", "bridge.proj.weight", "bridge.proj.bias"}
    cfg2 = toy_cfg(tmp_path / "s2", "train.steps=1", "train.lr=0.0", f"train.init_from={s1}")
    torch.manual_seed(1); m2 = ToyVLM.from_config(cfg2)
    fit(cfg2, m2, ToySeqs(64), progress=False)
    assert torch.equal(m2.bridge.latents, m1.bridge.latents)  # loaded (and lr 0 kept it)


def test_wandb_offline_and_failure(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False); monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train_toy(tmp_path / "off", "train.steps=2", "train.wandb_project=anymal-test")
    assert list((tmp_path / "off" / "wandb").glob("offline-run-*")) and len(read_metrics(tmp_path / "off", "train")) == 2
    import wandb
    def no_wandb(*a, **k): raise RuntimeError("cannot reach W&B")
    monkeypatch.setattr(wandb, "init", no_wandb)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        train_toy(tmp_path / "fail", "train.steps=2", "train.wandb_project=anymal-test")
    assert any("W&B did not start (RuntimeError: cannot reach W&B)" in str(x.message) for x in w)
    assert len(read_metrics(tmp_path / "fail", "train")) == 2


def test_fit_trains_tiny_anymal(tmp_path):
    "The real tiny AnyMAL: stage 1, reload for inference, stage 2 from the stage-1 checkpoint (bridge, no LoRA)."
    from anymal.model import AnyMAL
    ids = dict(image_token_id=5, pad_id=0, eos_id=2)
    torch.manual_seed(0)
    cfg = override(tiny(), [f"train.out_dir={tmp_path / 's1'}", "train.steps=2", "train.batch_size=2", "train.grad_accum=2",
                            "train.eval_every=2", "train.eval_batches=1"])
    m1 = AnyMAL.build(cfg, stage=1, **ids)
    L = m1.num_tokens

    class Pairs(torch.utils.data.Dataset):
        def __len__(self): return 8
        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            x = torch.cat([torch.full((L,), ids["image_token_id"]), torch.randint(10, 500, (8,), generator=g)])
            return dict(input_ids=x, attention_mask=torch.ones_like(x), labels=torch.cat([torch.full((L,), -100), x[L:]]),
                        n_images=torch.tensor(1), pixels=torch.randn(1, 3, 64, 64, generator=g), sample_ids=torch.tensor(i))

    def collate(xs):
        b = torch.utils.data.default_collate([{k: v for k, v in x.items() if k != "pixels"} for x in xs])
        return dict(b, pixels=torch.cat([x["pixels"] for x in xs]))  # images flat, in order

    final = fit(cfg, m1, Pairs(), Pairs(), collate_fn=collate, progress=False)
    assert [(r["step"], r["split"]) for r in read_metrics(tmp_path / "s1")] == [(2, "train"), (2, "val")]
    tensors = read_meta(final)["arch"]["tensors"]
    assert tensors and all(k.startswith("bridge.") for k in tensors)
    inf = load_for_inference(final, build_fn=lambda c: AnyMAL.build(c, stage=1, **ids))
    assert all(torch.equal(v, inf.model.trainable_state_dict()[k]) for k, v in m1.trainable_state_dict().items())
    cfg2 = override(cfg, [f"train.out_dir={tmp_path / 's2'}", f"train.init_from={final}", "train.stage=2", "train.steps=1",
                          "train.lr=0.0"])
    m2 = AnyMAL.build(cfg2, stage=2, **ids)
    fit(cfg2, m2, Pairs(), collate_fn=collate, progress=False)
    assert all(torch.equal(v, m2.trainable_state_dict()[k]) for k, v in m1.trainable_state_dict().items())  # lr 0
    t2 = read_meta(tmp_path / "s2" / "final")["arch"]["tensors"]
    assert any("lora_" in k for k in t2) and read_metrics(tmp_path / "s2")[-1]["lr_groups"].keys() == {"bridge", "lora"}


# ---- stopping on a signal (anymal.trainer.StopSignals) and pruning old checkpoints (train.keep_last) ----

TIMING = ("time", "tokens_per_s")  # the only fields of a metrics record that may differ between equal runs


def records(out): return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(out)]


def send_at(step, sig):
    "An on_step that sends this process `sig` after `step`, as Ctrl-C (SIGINT) or a scheduler (SIGTERM) would."
    def on_step(s, m):
        if s == step: os.kill(os.getpid(), sig)
    return on_step


@pytest.mark.parametrize("sig,step", [(signal.SIGINT, 6), (signal.SIGTERM, 8)], ids=["sigint-between-saves", "sigterm-at-a-save"])
def test_signal_saves_the_step_and_resume_matches(tmp_path, sig, step):
    "A signal stops the run at the end of the step with a checkpoint of it; resumed, every record is the uninterrupted one."
    sets = ["resampler.dropout=0.2", "train.log_every=4", "train.keep_last=0"]  # log window open at step 6; saves at 4, 8
    train_toy(tmp_path / "a", *sets)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as e: train_toy(tmp_path / "b", *sets, on_step=send_at(step, sig))
    name = signal.Signals(sig).name
    ck = tmp_path / "b" / "checkpoints" / f"step-{step:08d}"
    assert str(e.value) == f"stopped by {name} at step {step}; checkpoint {ck}; continue with --resume"
    assert e.value.exit_code == 128 + sig and isinstance(e.value, KeyboardInterrupt)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers given back
    assert latest_checkpoint(tmp_path / "b") == ck and load_train_state(ck)["progress"]["step"] == step
    assert sorted(p.name for p in ck.parent.iterdir()) == ["latest", "step-00000004", ck.name]  # step 8: saved once
    assert not (tmp_path / "b" / "final").exists()
    assert read_metrics(tmp_path / "b", "train")[-1]["step"] == (4 if step == 6 else 8)  # steps 5-6: in the checkpoint
    train_toy(tmp_path / "b", *sets, resume=True)
    assert records(tmp_path / "a") == records(tmp_path / "b")
    assert len(read_metrics(tmp_path / "b", "train")) == 3  # steps 4, 8, 12: the window of steps 5-8 was carried over


def test_a_repeated_signal_is_one_request_a_later_one_stops_at_once():
    with StopSignals() as st:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # at once: a group's Ctrl-C, or torchrun passing on what its workers got
        assert st.signum == signal.SIGTERM
    with StopSignals(repeat_s=0) as st:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(Interrupted, match="stopped at once by a second SIGINT") as e: os.kill(os.getpid(), signal.SIGINT)
        assert e.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_keep_last_prunes_old_checkpoints_and_resume_still_works(tmp_path):
    "save_every=1, keep_last=2: two step checkpoints (+ final) at any time, and a crash in between resumes exactly."
    sets = ["train.save_every=1", "train.keep_last=2"]
    with pytest.raises(Crash): train_toy(tmp_path / "b", *sets, on_step=crash_at(7))
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["latest", "step-00000006", "step-00000007"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # keep_last changes what is kept, not the run: no "changed train config" warning
        train_toy(tmp_path / "b", "train.save_every=1", "train.keep_last=3", resume=True)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["latest", "step-00000010", "step-00000011",
                                                                                   "step-00000012"]
    assert (tmp_path / "b" / "final" / "meta.json").exists()
    train_toy(tmp_path / "a", "train.save_every=1", "train.keep_last=0")  # 0: keep all
    assert len(list((tmp_path / "a" / "checkpoints").glob("step-*"))) == 12
    assert records(tmp_path / "a") == records(tmp_path / "b")
    from anymal.config import ConfigError
    with pytest.raises(ConfigError, match=r"train.keep_last=-1: must be >= 0 \(0: keep every checkpoint\)"):
        toy_cfg(tmp_path, "train.keep_last=-1")


def test_torchrun_ranks_agree_to_stop(tmp_path):
    "Only rank 1 is signalled (after step 5): both ranks stop after step 5 with one checkpoint; resumed, they finish."
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "ddp_toy_run.py"), str(tmp_path / "two"), "train.batch_size=4"]
    r = subprocess.run(cmd, env=dict(env, TOY_SIGNAL="1:5"), capture_output=True, text=True, timeout=180)
    assert r.returncode != 0, r.stderr[-3000:]
    ck = tmp_path / "two" / "checkpoints" / "step-00000005"
    for rank in (0, 1): assert f"rank {rank}: stopped by SIGTERM at step 5; checkpoint {ck}" in r.stderr, r.stderr[-3000:]
    assert latest_checkpoint(tmp_path / "two") == ck and len(load_train_state(ck)["rng"]) == 2
    assert max(x["step"] for x in read_metrics(tmp_path / "two")) == 5
    r = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    train_toy(tmp_path / "one")  # one process, batch 8 = two of 4
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [(x["step"], x["split"]) for x in one] == [(x["step"], x["split"]) for x in two]
    for x, y in zip(one, two): assert math.isclose(x["loss"], y["loss"], rel_tol=1e-5) and x["tokens"] == y["tokens"]


def test_a_signal_to_the_launcher_reaches_the_processes(tmp_path):
    "SIGTERM to the process that started torchrun (all a cloud may signal): passed on, the ranks save and stop, so does it."
    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                str(REPO / "tests" / "ddp_toy_run.py"), str(out), "train.batch_size=4", "train.steps=100000",
                "train.save_every=100000", "train.eval_every=0"]
    code = ("import sys\nfrom anymal.trainer import Interrupted, run_passing_signals\n"
            f"try: run_passing_signals({torchrun!r}, {str(out)!r})\n"
            "except Interrupted as e:\n    print(e, file=sys.stderr)\n    sys.exit(e.exit_code)\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    p = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not read_metrics(out) and p.poll() is None and time.time() < deadline: time.sleep(0.05)
        assert read_metrics(out), "the run never logged a step"
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None: p.kill()
    ck = latest_checkpoint(out)
    assert p.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1] == (f"stopped by SIGTERM, passed on to the training process (its exit code: 1); "
                                            f"checkpoint {ck}; continue with --resume"), err[-3000:]
    step = load_train_state(ck)["progress"]["step"]
    assert len(load_train_state(ck)["rng"]) == 2 and max(x["step"] for x in read_metrics(out)) == step < 100000


# ---- packed batches (train.pack_tokens) through the real trainer ----

def test_packing_trains_like_padding_and_sees_every_sample_once_per_epoch(tmp_path):
    "train.pack_tokens: the trainer runs on packed rows, every sample comes once per epoch, and the losses are the padded run's."
    from anymal.model import AnyMAL
    from anymal.data import train_collator
    ids = dict(image_token_id=5, pad_id=0, eos_id=2)

    class Varied(torch.utils.data.Dataset):  # 12 samples of 30-95 tokens, images in every other one
        def __len__(self): return 12
        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            n_img = i % 2
            x = torch.cat([torch.tensor([1]), torch.full((16 * n_img,), 5), torch.randint(10, 500, (13 + 5 * i,), generator=g)])
            y = x.clone()
            y[:len(x) - 6] = -100
            return dict(input_ids=x, labels=y, n_images=n_img, image_keys=[], sample_id=i,
                        pixels=torch.randn(n_img, 3, 64, 64, generator=g) if n_img else None)

    losses, seen = {}, {}
    for pack in (0, 160):
        out = tmp_path / f"pack{pack}"
        cfg = override(tiny(), [f"train.out_dir={out}", "train.steps=6", "train.batch_size=4", "train.grad_accum=1",
                                f"train.pack_tokens={pack}", "train.eval_batches=0", "train.log_every=1",
                                "train.cpu_bf16=false", "train.warmup=1"])
        torch.manual_seed(0)
        m = AnyMAL.build(cfg, stage=2, **ids)
        coll, batches = train_collator(cfg, 0), []
        def record(samples, coll=coll, batches=batches):
            b = coll(samples)
            batches.append(b)
            return b
        fit(cfg, m, Varied(), collate_fn=record, progress=False)
        losses[pack] = [r["loss"] for r in read_metrics(out, "train")]
        seen[pack] = [b["sample_ids"] for b in batches]
        if pack:
            assert all("position_ids" in b and len(b["input_ids"]) < 4 for b in batches)  # 4 samples in fewer rows
            assert all(b["input_ids"].shape[1] <= 160 for b in batches)
    per_epoch = 3  # 12 samples, batches of 4
    for pack, ids_ in seen.items():
        assert len(ids_) == 6
        for e in range(2): assert sorted(i for b in ids_[e * per_epoch:(e + 1) * per_epoch] for i in b) == list(range(12))
    assert [sorted(b) for b in seen[160]] == [sorted(b) for b in seen[0]]  # the same samples in each step
    assert len(losses[160]) == 6 and all(math.isfinite(x) for x in losses[160])
    assert all(abs(a - b) < 1e-5 * abs(b) for a, b in zip(losses[160], losses[0])), (losses[160], losses[0])
