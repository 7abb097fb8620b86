"""The Modal App (modal_jobs/app.py) and the notebook API (anymal.cloud), without a network or a Modal account."""
import importlib.util, inspect, json, os, subprocess, sys, time, tomllib
from pathlib import Path

import pytest

from anymal import cloud
from anymal.config import override, tiny, to_json

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def appmod():
    spec = importlib.util.spec_from_file_location("anymal_modal_app_test", ROOT / "modal_jobs" / "app.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _inner(obj):
    from modal._utils.async_utils import synchronizer
    return synchronizer._translate_in(obj)


def image_commands(img) -> list[str]:
    "The Dockerfile commands of every layer of a (lazy) modal.Image, base first."
    cmds, todo = [], [_inner(img)]
    while todo:
        layer = todo.pop()
        cv = inspect.getclosurevars(layer._load).nonlocals
        if cv.get("dockerfile_function"): cmds = cv["dockerfile_function"]("2025.06").commands + cmds
        todo += list((cv.get("base_images") or {}).values()) + ([cv["base_image"]] if "base_image" in cv else [])
    return cmds


def test_app_defines_the_documented_functions(appmod):
    assert appmod.app.name == "anymal"
    fns = {n: getattr(appmod, n) for n in ("train", "prepare_data", "evaluate")}
    mounts = {"/vol/runs": "anymal-runs", "/vol/data": "anymal-data", "/vol/hf": "anymal-hf-cache"}
    want = {"train": ([("A100-80GB", 1)], 86400, 3), "prepare_data": ([], 86400, 3), "evaluate": ([("L40S", 1)], 6 * 3600, 2)}
    for name, fn in fns.items():
        info = fn.info()
        assert (info.gpus, info.timeout, info.max_retries) == want[name], name
        assert {k: v.name for k, v in info.volumes.items()} == mounts, name
        assert sorted(info.secrets) == ["modal.Secret.from_name('huggingface')", "modal.Secret.from_name('wandb')"], name
    import modal
    assert isinstance(appmod.main, modal.app.LocalEntrypoint)


def test_gpu_is_configurable_per_call(appmod):
    for gpu, n, typ in (("H100", 8, "H100"), ("A100-80GB", 2, "A100-80GB")):
        opts = _inner(appmod.train.with_options(gpu=cloud.gpu_spec(gpu, n)))._options
        assert (opts.resources.gpu_config.gpu_type, opts.resources.gpu_config.count) == (typ, n)
    with pytest.raises(ValueError, match="unknown GPU"): cloud.gpu_spec("RTX9090")
    with pytest.raises(ValueError, match="1..8"): cloud.gpu_spec("H100", 16)


def test_image_installs_the_pinned_dependencies_and_the_source(appmod):
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pip = [c for c in image_commands(appmod.image) if "pip install" in c and "torch" in c]
    assert len(pip) == 1 and all(d in pip[0].split() for d in deps), pip
    assert "anymal" in _inner(appmod.image)._added_python_source_set
    assert "ENV HF_HOME=/vol/hf" in image_commands(appmod.image)


def test_image_has_a_c_compiler_for_triton(appmod):
    "train.mode=fast (Liger-Kernel) and train.compile run Triton, which compiles a C launcher at first use."
    cmds = image_commands(appmod.image)
    assert "RUN apt-get install -y build-essential" in cmds and "RUN apt-get install -y default-jre-headless" in cmds
    pip = next(i for i, c in enumerate(cmds) if "pip install" in c and "torch" in c)
    assert cmds.index("RUN apt-get install -y build-essential") < pip  # a system layer, before the Python packages


def test_a_t4_is_refused_before_anything_is_sent(monkeypatch):
    "No bf16 on a T4: the full preset (bf16 LLM) and train.mode=fast are refused by name, before the token check."
    from anymal.config import ConfigError, full
    monkeypatch.setattr(cloud, "require_modal_token", lambda: pytest.fail("got as far as the Modal token"))
    with pytest.raises(ConfigError, match=r"llm.dtype='bfloat16', but the T4 \(Modal\) has no bf16"):
        cloud.submit(full(), gpu="T4")
    with pytest.raises(ConfigError, match=r"train.mode='fast' needs bf16, which the T4 \(Modal\) does not have"):
        cloud.submit(override(full(), ["llm.dtype=float16", "train.mode=fast"]), gpu="T4")
    assert cloud.check_gpu(override(full(), ["llm.dtype=float16"]), "T4").name == "fp16"
    assert cloud.check_gpu(full(), "A100-80GB:2").name == "bf16"


def _no_token_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    env.update(HOME=str(tmp_path), MODAL_CONFIG_PATH=str(tmp_path / "none.toml"))
    return env


def test_submit_without_credentials_is_one_clear_error(tmp_path):
    code = ("from anymal.cloud import submit\nfrom anymal.config import tiny\n"
            "try: submit(tiny())\nexcept RuntimeError as e: print('ERR', e)\n")
    t = time.time()
    r = subprocess.run([sys.executable, "-c", code], env=_no_token_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ERR no Modal token found: run `modal token new`" in r.stdout and "MODAL_TOKEN_ID" in r.stdout
    assert time.time() - t < 60  # nothing was tried on the network


def test_download_without_credentials_is_one_clear_error(tmp_path):
    code = "from anymal.cloud import download\ntry: download('s1', 'x')\nexcept RuntimeError as e: print('ERR', e)\n"
    r = subprocess.run([sys.executable, "-c", code], env=_no_token_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert "ERR no Modal token found" in r.stdout, r.stderr


def test_job_paths_land_on_the_volumes(tmp_path, monkeypatch):
    monkeypatch.setenv("ANYMAL_VOLUMES", str(tmp_path))
    cfg, name = cloud.job_config(override(tiny(), ["train.out_dir=runs/exp/s1", "train.init_from=runs/s0/final"]))
    assert name == "exp/s1" and cfg.train.out_dir == str(tmp_path / "runs/exp/s1")
    assert cfg.data.root == str(tmp_path / "data/world") and cfg.train.init_from == str(tmp_path / "runs/s0/final")
    assert cloud.job_config(override(tiny(), ["data.root=/abs/data"]))[0].data.root == "/abs/data"


def test_cost_estimate_and_table():
    e = cloud.estimate_cost(7.2e6, 1000, "H100", 2, scaling=0.9)
    assert abs(e["hours"] - 7.2e6 / (1000 * 2 * 0.9) / 3600) < 1e-9
    assert abs(e["usd"] - e["hours"] * 3600 * 2 * cloud.GPU_PRICE_PER_S["H100"]) < 1e-9
    with pytest.raises(ValueError): cloud.estimate_cost(1e6, 0, "H100")
    t = cloud.cost_table({"stage 1 (LCS-558K, 1 epoch)": {"A100-80GB": 5000}}, setups=(("A100-80GB", 1), ("H100", 1)))
    row = [l for l in t.splitlines() if l.startswith("| stage 1")][0]
    hours = cloud.FULL_RUNS["stage 1 (LCS-558K, 1 epoch)"] / 5000 / 3600
    assert f"{hours:.1f} h" in row and "not measured" in row and cloud.PRICES_DATE in t


# ---- the train body, locally, on the tiny preset (needs anymal.trainer.train, the trainer's recipe) ----

def small_tiny(out_dir: str):
    return override(tiny(), ["standins.enabled=false", "data.world_images=64", "data.world_val_images=16", "train.steps=4", "train.save_every=2",
                             "train.eval_every=2", "train.eval_batches=1", "train.batch_size=8", "train.log_every=1",
                             "train.warmup=1", f"train.out_dir={out_dir}"])


@pytest.fixture
def volumes(tmp_path, monkeypatch):
    "A temporary volume root holding the tiny world where a Modal job looks for it."
    from anymal.world import world_main
    monkeypatch.setenv("ANYMAL_VOLUMES", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    (tmp_path / "c.json").write_text(to_json(small_tiny("runs/x")))
    assert world_main(["--out", str(tmp_path / "data/world"), "--config", str(tmp_path / "c.json")]) == 0
    return tmp_path


@pytest.mark.filterwarnings("ignore:The train function is executing locally", "ignore:The evaluate function is executing locally")
def test_train_function_body_runs_locally_and_resumes(volumes, appmod):
    cfg = small_tiny("runs/t1")
    t = time.time()
    out = appmod.train.local(to_json(cfg), "t1")  # the Modal function's own body; volume commits are no-ops locally
    first = time.time() - t
    run = volumes / "runs/t1"
    assert out == str(run / "final") and (run / "final/meta.json").exists()
    assert (run / "checkpoints/latest").read_text().strip() == "step-00000004"
    assert json.loads((run / "job_config.json").read_text())["train"]["out_dir"] == str(run)
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines() if json.loads(l)["split"] == "train"]
    assert steps == [1, 2, 3, 4]
    # Modal restarts the call (preemption, retry): it resumes from checkpoints/latest instead of training again
    assert appmod.train.local(to_json(cfg), "t1") == out
    again = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines() if json.loads(l)["split"] == "train"]
    assert again == steps
    # and the evaluate function's body scores that checkpoint, writing beside it on the volume
    # (pretraining is off here, so the tokenizer is named: load_for_inference does not fall back to <data.root>/tokenizer)
    tok = volumes / "data/world/tokenizer"
    assert appmod.evaluate.local("t1", f"--split test --limit 8 --batch-size 8 --set llm.tokenizer={tok}") == 0
    summary = json.loads((run / "final/eval/test.json").read_text())
    assert summary["vqa"]["none"]["n"] == 8 and 0 <= summary["vqa"]["none"]["overall"] <= 100
    print(f"tiny train body: {first:.1f} s")


def test_train_job_reports_each_checkpoint(volumes):
    seen = []
    cloud.train_job(to_json(small_tiny("runs/t2")), "t2", on_checkpoint=seen.append, every=0.05)
    assert seen and seen[-1] == volumes / "runs/t2/checkpoints/step-00000004"
    assert all(p.parent == volumes / "runs/t2/checkpoints" for p in seen)


@pytest.mark.filterwarnings("ignore:The prepare_data function is executing locally")
def test_prepare_data_body_runs_locally_into_the_data_volume(tmp_path, monkeypatch):
    import io, zipfile
    from PIL import Image
    monkeypatch.setenv("ANYMAL_VOLUMES", str(tmp_path / "vol"))
    spec = importlib.util.spec_from_file_location("anymal_modal_app_prep", ROOT / "modal_jobs" / "app.py")
    app = importlib.util.module_from_spec(spec); spec.loader.exec_module(app)
    recs = [{"id": str(i), "image": f"{i:012d}.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                                       {"from": "gpt", "value": "A square."}]} for i in range(3)]
    (tmp_path / "llava.json").write_text(json.dumps(recs))
    b = io.BytesIO(); Image.new("RGB", (4, 4)).save(b, "JPEG")
    with zipfile.ZipFile(tmp_path / "train2017.zip", "w") as z:
        for r in recs: z.writestr(f"train2017/{r['image']}", b.getvalue())
    args = f"--val 1 --url llava_instruct={(tmp_path / 'llava.json').as_uri()} --url coco_train2017={(tmp_path / 'train2017.zip').as_uri()}"
    assert app.prepare_data.local("llava", args) == 0
    data = tmp_path / "vol/data"
    assert len(json.loads((data / "llava/llava_instruct_train.json").read_text())) == 2
    assert json.loads((data / "manifests/llava.json").read_text())["counts"]["val"] == 1


def test_train_job_on_two_processes_runs_torchrun(volumes):
    "`n_gpus > 1` runs the same trainer under torchrun (here 2 CPU processes, gloo), resumable, with checkpoints reported."
    seen = []
    out = cloud.train_job(to_json(small_tiny("runs/t3")), "t3", n_gpus=2, on_checkpoint=seen.append, every=0.1)
    run = volumes / "runs/t3"
    assert out == str(run / "final") and (run / "final/meta.json").exists()
    assert seen and seen[-1] == run / "checkpoints/step-00000004"
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["split"] == "train"] == [1, 2, 3, 4]


# ---- the chat page as a web endpoint (modal_jobs/app.py::web, body anymal.serve.serve_job) ----

def test_web_endpoint_requires_auth_and_caps_its_bill(appmod):
    "Modal's proxy auth in front by default; one container at most, on one GPU, a bounded number of requests in it."
    info = appmod.web.info()
    assert info.web_info is not None and info.web_info.unauthenticated is False  # requires_proxy_auth=True
    assert info.concurrency_info.max_inputs == appmod.SERVE_MAX_INPUTS == 8
    assert info.gpus == [("L40S", 1)] and info.timeout == appmod.SERVE_TIMEOUT
    sent = inspect.getclosurevars(_inner(appmod.web)._load).nonlocals  # what deploying sends to Modal
    assert sent["webhook_config"].requires_proxy_auth is True
    assert (sent["autoscaler_settings"].max_containers, sent["autoscaler_settings"].scaledown_window) == (1, 300)
    assert {k: (v.name, v.read_only) for k, v in info.volumes.items()} == {
        "/vol/runs": ("anymal-runs", True), "/vol/hf": ("anymal-hf-cache", False)}  # checkpoints: read only
    assert not any("huggingface" in s or "wandb" in s for s in info.secrets), info.secrets  # no tokens it does not need


def test_web_endpoint_opens_only_when_asked(monkeypatch):
    monkeypatch.setenv("ANYMAL_SERVE_PUBLIC", "1")
    spec = importlib.util.spec_from_file_location("anymal_modal_app_public", ROOT / "modal_jobs" / "app.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.web.info().web_info.unauthenticated is True
    assert mod.web.info().concurrency_info.max_inputs == 8  # the caps stay


@pytest.mark.filterwarnings("ignore:The web function is executing locally")
def test_web_function_body_serves_the_page_locally(tmp_path, monkeypatch, appmod):
    "The endpoint's own body, run locally on a tiny checkpoint in a temporary runs volume: the page, and an answer."
    from starlette.testclient import TestClient
    from anymal.checkpoint import save_checkpoint
    from anymal.model import AnyMAL
    from parts import tiny_parts
    cfg, tok = tiny_parts(tmp_path, ["data.world_images=8", "data.world_val_images=4"])
    cfg = override(cfg, ["train.stage=2"])
    save_checkpoint(tmp_path / "vol/runs/demo/s2/final", AnyMAL.build(cfg, tok, stage=2), cfg, step=3, stage=2)
    monkeypatch.setenv("ANYMAL_VOLUMES", str(tmp_path / "vol"))
    monkeypatch.setenv("ANYMAL_SERVE_MODEL", "demo/s2")
    asgi = appmod.web.local()
    with TestClient(asgi) as client:
        page = client.get("/config").json()
        assert page["title"] == "anymal: ask it about images" and page["max_file_size"] == 10 * 2**20
        assert "demo/s2" in json.dumps(page) and "step 3" in json.dumps(page)  # the run it was told to serve
        assert client.post("/gradio_api/upload", files={"files": ("x.png", b"\0" * (10 * 2**20 + 1))}).status_code == 413
    # and a question through Gradio's client, as modal_jobs/README.md calls the endpoint (here without Modal's proxy,
    # so the two headers reach the app unchecked), served by uvicorn on a loopback port
    import socket, threading, uvicorn
    from gradio_client import Client, handle_file
    from anymal.infer import Assistant
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(asgi, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t0, client = time.time(), None
    try:
        for _ in range(100):
            if server.started: break
            time.sleep(0.1)
        img = sorted((tmp_path / "world/images/test").glob("*.png"))[0]
        client = Client(f"http://127.0.0.1:{port}/", headers={"Modal-Key": "wk-test", "Modal-Secret": "ws-test"},
                        verbose=False, analytics_enabled=False, download_files=False)
        chat, _, looked, status = client.predict("What color is the circle?", [handle_file(str(img))], True, 0.0, 1.0,
                                                 8, "the answer's latents", api_name="/ask")
    finally:
        if client is not None: client.close()
        server.should_exit = server.force_exit = True  # without waiting for the client's heartbeat stream to end
        thread.join(timeout=30)
    want = Assistant.from_checkpoint(tmp_path / "vol/runs/demo/s2", device="cpu").ask(
        [img], "What color is the circle?\n" + cfg.data.vqa_prompt, max_new_tokens=8)
    assert [(m["role"], m["content"][0]["text"]) for m in chat] == [
        ("user", "What color is the circle? [1 image]"), ("assistant", want)], (chat, want)
    assert status.startswith("Answered in") and len(looked) == 1
    print(f"the endpoint answered through gradio_client in {time.time() - t0:.1f} s")


@pytest.mark.filterwarnings("ignore:The train function is executing locally")
def test_a_preempted_train_call_resumes_from_the_checkpoint_it_left(volumes, appmod):
    """Modal pre-empts with SIGINT, then runs the call again: the first saves its step (and reports it, so the volume is
    committed), the second resumes from it, and the run logs what an uninterrupted one logs."""
    import signal, threading
    from anymal.checkpoint import latest_checkpoint
    from anymal.runlog import read_metrics
    from anymal.trainer import Interrupted
    extra = ["train.steps=20", "train.save_every=100", "train.eval_every=5"]
    def cfg(name): return override(small_tiny(f"runs/{name}"), extra)
    run, seen = volumes / "runs/p1", []
    def preempt():  # once a step is logged, as Modal would
        while not read_metrics(run): time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=preempt, daemon=True).start()
    with pytest.raises(Interrupted, match="stopped by SIGINT at step") as e:
        cloud.train_job(to_json(cfg("p1")), "p1", on_checkpoint=seen.append, every=60)
    ck = latest_checkpoint(run)
    assert seen == [ck] and str(ck) in str(e.value) and not (run / "final").exists()
    assert appmod.train.local(to_json(cfg("p1")), "p1") == str(run / "final")  # the call again: it resumes
    appmod.train.local(to_json(cfg("p2")), "p2")  # never stopped
    timing = ("time", "tokens_per_s")
    def records(r): return [{k: v for k, v in x.items() if k not in timing} for x in read_metrics(r)]
    assert records(run) == records(volumes / "runs/p2") and read_metrics(run)[-1]["step"] == 20
