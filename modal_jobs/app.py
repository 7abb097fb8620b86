"""anymal on Modal: one App with data preparation, training (1..8 GPUs) and evaluation.

The job bodies live in `anymal.cloud` (tested without Modal); this file only says where they run.
Command lines (after `modal setup` and the two secrets, see modal_jobs/README.md):

    modal run modal_jobs/app.py::prepare_data --dataset all
    modal run modal_jobs/app.py::train --config full --sets "train.stage=1 train.wandb_project=anymal"
    modal run --detach modal_jobs/app.py --config my.json --gpu H100 --n-gpus 8 --run-name s2
    modal run modal_jobs/app.py::evaluate --run-name s2 --args "--split val2014 --caption-split val2017 --control none blank --captions"
    modal volume get anymal-runs s2/final runs/s2
    ANYMAL_SERVE_MODEL=s2 modal deploy modal_jobs/app.py    # the chat page (`web`), behind Modal's proxy auth

From Python: `anymal.cloud.submit(cfg, gpu="H100", n_gpus=8)`.
"""
import os
from pathlib import Path

import modal

from anymal import cloud
from anymal.config import to_json

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"  # the one list of pinned dependencies; read when the image is built

image = (
    modal.Image.debian_slim(python_version="3.11")
    .apt_install("default-jre-headless")  # Java for pycocoevalcap's PTB tokenizer (caption metrics)
    .apt_install("build-essential")  # a C compiler: Triton (train.mode=fast, train.compile) builds its launcher
    .pip_install_from_pyproject(str(PYPROJECT), optional_dependencies=["gpu"])  # + Liger-Kernel for train.mode=fast
    .env({"HF_HOME": f"{cloud.MOUNT_ROOT}/hf", "ANYMAL_CACHE": f"{cloud.MOUNT_ROOT}/runs/.anymal-cache",  # weights; tiny pretrained parts
          "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    .add_local_python_source("anymal")  # last: mounted at container start, so code edits need no rebuild
)

volumes = {name: modal.Volume.from_name(vol, create_if_missing=True) for name, vol in cloud.VOLUMES.items()}
VOLUME_MOUNTS = {f"{cloud.MOUNT_ROOT}/{name}": vol for name, vol in volumes.items()}
secrets = [modal.Secret.from_name("huggingface"), modal.Secret.from_name("wandb")]

DAY = 24 * 3600  # Modal's longest timeout; retries start a fresh 24 h and the trainer resumes
TRAIN_TIMEOUT, TRAIN_RETRIES = DAY, 3   # a stage that needs more than 4 days is split into several calls
PREPARE_TIMEOUT, EVAL_TIMEOUT = DAY, 6 * 3600
EVAL_GPU = "L40S"  # NF4 8B inference needs ~8 GB: a 48 GB card at 78% of the A100-80GB price

# The chat page (`anymal serve`) as a web endpoint. Which run it serves and whether it is open are read when the app is
# deployed (`ANYMAL_SERVE_MODEL=s2 modal deploy modal_jobs/app.py`); the run name travels to the container as a secret.
SERVE_MODEL = os.environ.get("ANYMAL_SERVE_MODEL", "full/stage2")  # a run (or checkpoint) on the runs volume
SERVE_PUBLIC = os.environ.get("ANYMAL_SERVE_PUBLIC", "") == "1"  # only when asked: no Modal proxy auth in front
SERVE_GPU = EVAL_GPU
SERVE_MAX_INPUTS = 8  # requests one container holds at once; the page answers one at a time, the rest wait in its queue
SERVE_MAX_CONTAINERS = 1  # one GPU at most, however many call: a leaked URL cannot multiply the bill
SERVE_IDLE = 300  # seconds a container stays up after the last request (billed), then it stops
SERVE_TIMEOUT = 3600  # the longest one request (a page's connection) may last

app = modal.App(cloud.APP_NAME, image=image)


def committer(vol, every: float = 0.0):
    "A callback that commits `vol` (at most every `every` s); a no-op when the body runs locally (tests, .local())."
    def commit(*_):
        if not modal.is_local(): vol.commit()
    return cloud.throttle(commit, every) if every else commit


@app.function(gpu=cloud.DEFAULT_GPU, volumes=VOLUME_MOUNTS, secrets=secrets, timeout=TRAIN_TIMEOUT,
              retries=modal.Retries(max_retries=TRAIN_RETRIES, initial_delay=30.0), cpu=8.0, memory=64 * 1024)
def train(config: str = "full", run_name: str = "", n_gpus: int = 1, sets: str = "") -> str:
    "Train (or resume) one stage; the config is a preset name, JSON text or a JSON file on a volume."
    out = cloud.train_job(config, run_name, n_gpus, sets, on_checkpoint=committer(volumes["runs"]))
    committer(volumes["runs"])()
    return out


@app.function(volumes=VOLUME_MOUNTS, secrets=secrets, timeout=PREPARE_TIMEOUT,
              retries=modal.Retries(max_retries=3, initial_delay=60.0), cpu=8.0, memory=16 * 1024)
def prepare_data(dataset: str = "all", args: str = "") -> int:
    "`anymal prepare DATASET` into the anymal-data volume, or `weights` into the HF cache (resumable; committed every 5 min)."
    rc = cloud.prepare_job(dataset, args, on_save=committer(volumes["data"], every=300))
    committer(volumes["data"])(); committer(volumes["hf"])()
    return rc


@app.function(gpu=EVAL_GPU, volumes=VOLUME_MOUNTS, secrets=secrets, timeout=EVAL_TIMEOUT,
              retries=modal.Retries(max_retries=2, initial_delay=30.0), cpu=8.0, memory=32 * 1024)
def evaluate(run_name: str, args: str = "--split val2014 --caption-split val2017") -> int:
    "`anymal eval ARGS` on a run's checkpoint (default: VQAv2 val2014); results go to `<checkpoint>/eval/` on the runs volume."
    rc = cloud.evaluate_job(run_name, args)
    committer(volumes["runs"])()
    return rc


@app.function(gpu=SERVE_GPU, timeout=SERVE_TIMEOUT, max_containers=SERVE_MAX_CONTAINERS, scaledown_window=SERVE_IDLE,
              volumes={f"{cloud.MOUNT_ROOT}/runs": volumes["runs"].read_only(), f"{cloud.MOUNT_ROOT}/hf": volumes["hf"]},
              secrets=[modal.Secret.from_dict({"ANYMAL_SERVE_MODEL": SERVE_MODEL})], cpu=4.0, memory=32 * 1024)
@modal.concurrent(max_inputs=SERVE_MAX_INPUTS)
@modal.asgi_app(requires_proxy_auth=not SERVE_PUBLIC)
def web():
    "The chat page of `anymal serve` for run ANYMAL_SERVE_MODEL (runs volume, read only); Modal proxy auth unless public."
    from anymal.serve import serve_job
    return serve_job(os.environ.get("ANYMAL_SERVE_MODEL", SERVE_MODEL))


@app.local_entrypoint()
def main(config: str = "full", sets: str = "", run_name: str = "", gpu: str = cloud.DEFAULT_GPU, n_gpus: int = 1):
    "Train with a local config file (or preset) on any GPUs: `modal run [--detach] modal_jobs/app.py --config my.json --gpu H100 --n-gpus 8`."
    is_file = not config.lstrip().startswith("{") and Path(config).is_file()
    cfg = cloud.load_config(Path(config).read_text() if is_file else config, sets)
    spec = cloud.gpu_spec(gpu, n_gpus)
    cloud.check_gpu(cfg, spec)  # a config that cannot train on this GPU (a T4: fp16 only) stops here
    _, name = cloud.job_config(cfg, run_name)
    n = int(spec.split(":")[1]) if ":" in spec else 1
    print(f"anymal: training run {name!r} on {spec}; checkpoints in volume {cloud.VOLUMES['runs']}:/{name}")
    if url := cloud.wandb_url(cfg.train.wandb_project): print(f"anymal: W&B project {url}")
    print(train.with_options(gpu=spec).remote(to_json(cfg), name, n))
