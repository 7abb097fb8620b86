"""One demo run of experiments/gpu_sweep.sh: the tiny LLaMA's pretraining on the GPU (`pretrain_llm(device=...)`, patched in
here; the library pretrains on the CPU), stages on the GPU (the trainer picks CUDA), evaluation on the CPU.
Usage: python experiments/gpu_sweep_run.py OUT [anymal demo args]"""
import functools, sys, time, torch
import anymal.pretrain as P

P.pretrain_llm = functools.partial(P.pretrain_llm, device="cuda" if torch.cuda.is_available() else "cpu")
from anymal.demo import demo_main
t0 = time.time()
rc = demo_main(["--out", sys.argv[1], "--no-progress", *sys.argv[2:]])
print(f"[sweep] demo finished rc={rc} in {time.time() - t0:.1f} s", flush=True)
