"""`anymal export` and loading back: the adapter loads with plain peft (and merges), `AnyMAL.from_pretrained` gives the
checkpoint's outputs, the model card's front matter, the Llama 3 licence terms for a Llama 3 base found in the HF cache,
pushing through a stand-in for the Hub API, and the commands in fresh processes. Nothing here touches the network."""
import json, os, shutil, subprocess, sys
from pathlib import Path
import pytest
import torch
import yaml

from anymal.config import override
from anymal.model import AnyMAL
from anymal.checkpoint import save_checkpoint, load_for_inference
from anymal.infer import Assistant
from parts import hub_cache_snapshot, run_cli, tiny_parts

REPO = Path(__file__).resolve().parents[1]
LLAMA3 = "meta-llama/Meta-Llama-3-8B-Instruct"
KEYS = {"base_model", "library_name", "license", "tags", "datasets", "pipeline_tag"}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A stage-2 checkpoint whose LoRA is not zero (a random tiny LLM and CLIP saved to files, as the tiny pretraining
    would), with a stage-1 checkpoint it started from and an `anymal eval` summary beside it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("export")
    cfg, tok = tiny_parts(root, ["data.world_images=8", "data.world_val_images=4"])
    s1 = save_checkpoint(root / "s1" / "final", AnyMAL.build(cfg, tok, stage=1), override(cfg, ["train.stage=1"]),
                         step=5, stage=1)
    cfg = override(cfg, ["train.stage=2", f"train.init_from={root / 's1'}"])
    model = AnyMAL.build(cfg, tok, stage=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name: p.normal_(0, 0.05)
    ckpt = save_checkpoint(root / "run" / "final", model, cfg, step=12, stage=2)
    (ckpt / "eval").mkdir()
    summary = dict(layout="shapes world", vqa={"none": dict(overall=61.25, perQuestionType={"color": 50.0}, n=80),
                                               "blank": dict(overall=22.5, perQuestionType={"color": 10.0}, n=80)})
    (ckpt / "eval" / "test.json").write_text(json.dumps(summary))
    from anymal.export import export
    out = export(root / "run", root / "exports" / "anymal-tiny", merge=True)
    ref = load_for_inference(ckpt).model
    img = sorted((root / "world" / "images" / "test").glob("*.png"))[0]
    yield dict(root=root, cfg=cfg, tok=tok, ckpt=ckpt, s1=s1, out=out, ref=ref, img=img)
    torch.set_num_threads(n)


def _logits(llm, ids):
    with torch.no_grad(): return llm(ids).logits


def test_adapter_loads_with_plain_peft_and_merges(made):
    from transformers import AutoModelForCausalLM
    from peft import PeftModel
    out, root = made["out"], made["root"]
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(root / "llm") and conf["r"] == made["cfg"].lora.r
    ids = torch.randint(0, made["cfg"].llm.vocab_size, (3, 17), generator=torch.Generator().manual_seed(0))
    want = _logits(made["ref"].llm, ids)  # the checkpoint's LoRA model, as anymal loads it
    attn = dict(attn_implementation=made["cfg"].llm.attn)  # the attention kernel anymal runs (bit-equal logits)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "llm", **attn), out)  # peft only
    assert torch.equal(_logits(plain, ids), want)
    merged = plain.merge_and_unload()
    torch.testing.assert_close(_logits(merged, ids), want, rtol=0, atol=1e-5)  # fp32 noise of W + BA
    written = AutoModelForCausalLM.from_pretrained(out / "merged", **attn)  # what --merge wrote
    torch.testing.assert_close(_logits(written, ids), want, rtol=0, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(root / "llm", **attn)
    assert (_logits(base, ids) - want).abs().max() > 1e-3  # the adapter changes the logits: the checks above bite


def test_from_pretrained_round_trip_is_identical(made, tmp_path):
    import anymal
    moved = tmp_path / "elsewhere"
    shutil.copytree(made["out"], moved)  # the folder is self-contained: base and CLIP come from inside it
    back = anymal.AnyMAL.from_pretrained(moved)
    assert back.cfg.llm.path == str(moved / "base") and back.cfg.vision.pretrained.startswith(str(moved))
    ref, tok, img = made["ref"], made["tok"], made["img"]
    a = Assistant(ref, tok)
    b = a.encode([dict(role="user", content="<image>\nWhat color is the circle?")], [img], 8)
    x = dict(input_ids=b["input_ids"][None], pixels=b["pixels"], n_images=torch.tensor([1]))
    with torch.no_grad(): assert torch.equal(back(**x).logits, ref(**x).logits)
    qs = ["What color is the circle?", "How many shapes are there?", "Describe the image.", "Is there a square?"]
    got = anymal.Assistant.from_pretrained(moved, device="cpu").answer_batch([[img]] * 4, qs, max_new_tokens=12)
    assert got == a.answer_batch([[img]] * 4, qs, max_new_tokens=12)
    assert all(torch.equal(v, back.trainable_state_dict()[k]) for k, v in ref.trainable_state_dict().items())


def test_a_qlora_checkpoint_round_trips(made, tmp_path):
    "The full preset's form: LoRA on an NF4-quantized base (bitsandbytes' Linear4bit, here on the CPU)."
    import anymal
    from anymal.export import export
    cfg = override(made["cfg"], ["llm.quant=nf4", "llm.dtype=bfloat16", "train.init_from="])
    model = AnyMAL.build(cfg, made["tok"], stage=2)
    assert type(model.llm.get_base_model().model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name: p.normal_(0, 0.05)
    ckpt = save_checkpoint(tmp_path / "q" / "final", model, cfg, step=3, stage=2)
    back = anymal.AnyMAL.from_pretrained(export(ckpt, tmp_path / "q-export"))
    ids = torch.randint(0, cfg.llm.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(): assert torch.equal(back(ids).logits, load_for_inference(ckpt).model(ids).logits)


def test_newer_format_and_non_exports_are_refused(made, tmp_path):
    import anymal
    from anymal.export import EXPORT_FORMAT, export
    newer = tmp_path / "newer"
    shutil.copytree(made["out"], newer)
    info = json.loads((newer / "config.json").read_text())
    (newer / "config.json").write_text(json.dumps(dict(info, anymal_export_format=EXPORT_FORMAT + 1)))
    with pytest.raises(ValueError, match="written by a newer anymal .* upgrade anymal"): anymal.AnyMAL.from_pretrained(newer)
    with pytest.raises(ValueError, match="is not an anymal export"): anymal.AnyMAL.from_pretrained(made["root"] / "world")
    (tmp_path / "mine").mkdir(); (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to replace"): export(made["ckpt"], tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_model_card_of_a_tiny_export(made):
    card = (made["out"] / "README.md").read_text()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    # the stand-in base and the shapes world have no hub ids, which the Hub would refuse: described in the text instead
    assert set(front) == KEYS - {"base_model", "datasets"}
    assert front["library_name"] == "peft" and front["pipeline_tag"] == "image-text-to-text" and "anymal" in front["tags"]
    assert "VQA accuracy (official VQAv2 metric, %)" in card and "| 61.2 |" in card and "| 22.5 |" in card
    assert "a blank image" in card and "**12 steps**" in card and "stage 1: **5 steps**" in card
    assert "shapes world" in card and "## Limitations" in card and "Llama" not in card
    assert "| bridge | a Perceiver Resampler (2 layers, 16 latents) + LayerNorm + Linear 128 -> 128, in `bridge.safetensors`" in card
    assert "perceiver-resampler" in front["tags"]
    assert not (made["out"] / "NOTICE").exists()


def test_a_llama3_base_is_referenced_and_its_licence_terms_carried(made, tmp_path, monkeypatch):
    "A base named by its hub id, in the HF cache as `hf download` leaves it: referenced, not copied; Llama 3's terms."
    import huggingface_hub
    import anymal
    from anymal.export import export, name_note, read_export
    src = tmp_path / "meta-files"
    shutil.copytree(made["root"] / "llm", src)
    (src / "LICENSE").write_text("META LLAMA 3 COMMUNITY LICENSE AGREEMENT (stand-in text)")
    (src / "USE_POLICY.md").write_text("Meta Llama 3 Acceptable Use Policy (stand-in text)")
    cache = tmp_path / "hf-cache"
    hub_cache_snapshot(src, LLAMA3, cache)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    out = export(made["ckpt"], tmp_path / "llama-export", sets=[f"llm.path={LLAMA3}"],
                 datasets=["liuhaotian/LLaVA-Instruct-150K"], name="anymal-shapes")
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert KEYS <= set(front), front
    assert (front["base_model"], front["license"], front["library_name"]) == (LLAMA3, "llama3", "peft")
    assert front["datasets"] == ["liuhaotian/LLaVA-Instruct-150K"] and "llama-3" in front["tags"]
    assert card.split("---\n", 2)[2].lstrip().startswith("# Llama 3 anymal-shapes\n\n**Built with Meta Llama 3**")
    notice = "Meta Llama 3 is licensed under the Meta Llama 3 Community License, Copyright © Meta Platforms, Inc."
    assert notice in (out / "NOTICE").read_text() and notice in card
    assert (out / "LICENSE").read_text() == (src / "LICENSE").read_text() and (out / "USE_POLICY.md").is_file()
    assert not (out / "base").exists()  # referenced by its id, not copied
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == LLAMA3
    info = read_export(out)
    assert info["notes"] == [] and name_note(info, "me/Llama-3-anymal-shapes") is None
    assert "begin with \"Llama 3\"" in name_note(info, "me/anymal-shapes")
    # loaded back through the cache: the same model as the checkpoint
    back = anymal.AnyMAL.from_pretrained(out, cache_dir=str(cache))
    assert Path(back.cfg.llm.path).parent.name == "snapshots"
    ids = torch.randint(0, made["cfg"].llm.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(back(ids).logits, made["ref"](ids).logits)


class StandInHub:
    "Stands in for `huggingface_hub.HfApi`: records the token, `create_repo` and `upload_folder` (with the files)."
    made = []

    def __init__(self, token=None):
        self.token, self.calls = token, []
        StandInHub.made.append(self)

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, **kw):
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        self.calls.append(("upload_folder", repo_id, dict(kw, files=files)))


def test_push_calls_the_hub_api_with_the_files(made, tmp_path, monkeypatch, capsys):
    import anymal.export as E
    monkeypatch.setattr(E, "HfApi", StandInHub)
    monkeypatch.setenv("HF_TOKEN", "hf_stand_in")
    StandInHub.made.clear()
    assert E.export_main([str(made["root"] / "run"), "--out", str(tmp_path / "pushed"), "--push", "me/anymal-tiny",
                          "--private"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["pushed"] == "https://huggingface.co/me/anymal-tiny"
    (api,) = StandInHub.made
    assert api.token == "hf_stand_in"
    assert [c[:2] for c in api.calls] == [("create_repo", "me/anymal-tiny"), ("upload_folder", "me/anymal-tiny")]
    assert api.calls[0][2] == dict(repo_type="model", private=True, exist_ok=True)
    files = set(api.calls[1][2]["files"])
    assert {"README.md", "config.json", "bridge.safetensors", "adapter_config.json", "adapter_model.safetensors",
            "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "base/config.json",
            "clip/open_clip_model.safetensors"} <= files, files
    assert files == set(res["files"]) and "hf download me/anymal-tiny" in (tmp_path / "pushed" / "README.md").read_text()


def test_push_without_a_token_is_one_line_before_any_work(made, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["HF_HOME"] = str(tmp_path / "hf-home")  # no token file there
    r = run_cli("export", made["root"] / "run", "--out", tmp_path / "x", "--push", "me/x", env=env)
    assert r.returncode == 1 and not (tmp_path / "x").exists()
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("anymal export: error:") and "HF_TOKEN" in lines[-1] and "hf auth login" in lines[-1]
    assert "Traceback" not in r.stderr


def test_export_and_chat_model_commands(made, tmp_path):
    out = tmp_path / "cli"
    r = run_cli("export", made["root"] / "run", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["out"] == str(out) and (out / "adapter_model.safetensors").is_file()
    q = "What color is the circle?"
    r = run_cli("chat", "--model", out, "--image", made["img"], "--prompt", q, "--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == Assistant(made["ref"], made["tok"]).ask([made["img"]], q, max_new_tokens=12)
    assert "step 12" in r.stderr
    r = run_cli("chat", "--model", tmp_path / "nothing-here", "--prompt", "hi")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("anymal chat: error: no anymal export")


def test_import_anymal_stays_light():
    "`import anymal` and `anymal --help` import no torch; `anymal.AnyMAL` is the model class with from_pretrained."
    code = ("import sys, io, contextlib, anymal; from anymal.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()): main(['--help'])\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "from anymal.model import AnyMAL\n"
            "assert anymal.AnyMAL is AnyMAL and callable(anymal.AnyMAL.from_pretrained)\n"
            "assert callable(anymal.Assistant.from_pretrained)\n"
            "try: anymal.nothing\nexcept AttributeError: print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
