"""End-to-end distillation variants on a converted SmolLM2 (the levers table of docs/quality.md, "distillation").

Loads a `clakit convert` output (made with `--distill-steps 0`) and the demo's GGUF as teacher, computes the teacher's
logits on `--tokens` calibration tokens (`calib_input_ids`, as the converter), trains the chosen tensors with Adam on
KL(teacher || student) for `--steps` steps of `--batch` sequences, and prints the held-out perplexity (`clakit eval`'s:
the first 8,192 tokens of heldout.txt, windows of 512) at the start, every `--eval-every` steps and at the end.

    clakit convert GGUF r200 --calib-data calib.txt --calib-tokens 4096 --reconstruct-steps 200 --distill-steps 0
    python benchmarks/distill_variants.py r200 --steps 100 --lr 3e-4 --sched cos --tokens 8192 --train attn

`--train`: fitted (the shared layers' q/k/v/o), attn (every layer's attention projections: what the converter
trains), fitted+norm, all (+ MLPs and norms).
"""

import argparse
import math
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

import clakit.modeling  # noqa
from clakit.convert.calibrate import calib_input_ids
from clakit.corpus import join_texts, load_texts
from clakit.eval import perplexity
from clakit.sources import load_model, resolve_source

p = argparse.ArgumentParser()
p.add_argument("cla")
p.add_argument("--steps", type=int, default=100)
p.add_argument("--lr", type=float, default=1e-4)
p.add_argument("--tokens", type=int, default=8192)
p.add_argument("--batch", type=int, default=2)
p.add_argument("--train", default="fitted")
p.add_argument("--eval-every", type=int, default=0)
p.add_argument("--sched", default="const")
p.add_argument("--seq", type=int, default=512)
a = p.parse_args()
torch.manual_seed(0)
D = "/root/.cache/clakit/demo/"
tok = AutoTokenizer.from_pretrained(a.cla)
teacher = (
    load_model(resolve_source(D + "model/SmolLM2-135M-Instruct.Q4_1.gguf"), torch.float32).eval().requires_grad_(False)
)
student = AutoModelForCausalLM.from_pretrained(a.cla, dtype=torch.float32)
layout = student.config.kv_source_layers
held = join_texts(load_texts([D + "text/heldout.txt"]))


def ppl(m):
    m.eval()
    return perplexity.perplexity(m, tok, held, seq_len=512, max_tokens=8192, quiet=True)["perplexity"]


ids = calib_input_ids(tok, load_texts([D + "text/calib.txt"]), a.tokens, a.seq)
t0 = time.time()
with torch.no_grad():
    tl = [teacher(ids[i : i + a.batch]).logits.to(torch.bfloat16) for i in range(0, len(ids), a.batch)]
print(f"teacher logits {time.time() - t0:.0f}s, {len(ids)} seqs", flush=True)
del teacher
student.requires_grad_(False)
shared = {i for i, s in enumerate(layout) if layout.count(s) > 1}
params = []
for name, prm in student.named_parameters():
    parts = name.split(".")
    if len(parts) < 5 or parts[1] != "layers":
        if a.train == "all" and "norm" in name:
            prm.requires_grad_(True)
            params.append(prm)
        continue
    layer = int(parts[2])
    kind = parts[4] if parts[3] == "self_attn" else parts[3]
    want = False
    if a.train in ("fitted", "fitted+norm", "all"):
        want = layer in shared and kind in ("q_proj", "k_proj", "v_proj", "o_proj")
    if a.train == "attn":
        want = kind in ("q_proj", "k_proj", "v_proj", "o_proj")
    if a.train in ("fitted+norm", "all") and "norm" in kind:
        want = True
    if a.train == "all" and kind == "mlp":
        want = True
    if want:
        prm.requires_grad_(True)
        params.append(prm)
print("trainable", sum(p.numel() for p in params), flush=True)
print("step 0 ppl", round(ppl(student), 2), flush=True)
opt = torch.optim.Adam(params, lr=a.lr)
sched = None
if a.sched == "cos":
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / a.steps)))
nb = len(tl)
g = torch.Generator().manual_seed(0)
t0 = time.time()
for step in range(1, a.steps + 1):
    student.train()
    b = int(torch.randint(nb, (1,), generator=g))
    x = ids[b * a.batch : (b + 1) * a.batch]
    logits = student(x).logits
    t = tl[b].float()
    loss = (
        F.kl_div(F.log_softmax(logits, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean") / x.shape[1]
    )
    opt.zero_grad()
    loss.backward()
    opt.step()
    if sched:
        sched.step()
    if step % 10 == 0:
        print(step, round(loss.item(), 4), f"{time.time() - t0:.0f}s", flush=True)
    if a.eval_every and step % a.eval_every == 0 and step < a.steps:
        print("step", step, "ppl", round(ppl(student), 2), flush=True)
print("final ppl", round(ppl(student), 2), f"train {time.time() - t0:.0f}s", flush=True)
