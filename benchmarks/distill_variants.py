"""End-to-end distillation variants on a converted SmolLM2 (the levers table of docs/quality.md, "distillation").

Loads a `clakit convert` output (made with `--distill-steps 0`) and the demo's GGUF as teacher, computes the teacher's
logits on `--tokens` calibration tokens (`calib_input_ids`, as the converter), trains the chosen tensors with Adam on
KL(teacher || student) for `--steps` steps of `--batch` sequences, and prints the held-out perplexity (`clakit eval`'s:
the first 8,192 tokens of heldout.txt, windows of 512) at the start, every `--eval-every` steps and at the end.

    clakit convert GGUF r200 --calib-data calib.txt --calib-tokens 4096 --reconstruct-steps 200 --distill-steps 0
    python benchmarks/distill_variants.py r200 --steps 100 --lr 3e-4 --sched cos --tokens 8192 --train attn

`--train`: fitted (the shared layers' q/k/v/o), attn (every layer's attention projections: what the converter
trains), fitted+norm, all (+ MLPs and norms).

Progress goes to stderr; the report (settings, provenance: versions and command, the perplexity curve, the losses
every 10 steps, the wall times) is printed as JSON at the end and, with --out, written there.
"""

import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (
    FORCE_HELP,
    OUT_HELP,
    Parser,
    check_output,
    emit,
    main_guard,
    non_negative,
    positive,
    positive_float,
    provenance,
    refuse,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

import clakit.modeling  # noqa: F401  (registers the CLA architectures)
from clakit.convert.calibrate import calib_input_ids
from clakit.corpus import join_texts, load_texts
from clakit.eval import perplexity
from clakit.sources import load_model, resolve_source

TRAIN = ("fitted", "attn", "fitted+norm", "all")
SCHEDULES = ("const", "cos")


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def trainable(student, layout: list[int], train: str) -> list:
    """Mark and return the parameters `--train` names (everything else frozen)."""
    student.requires_grad_(False)
    shared = {i for i, s in enumerate(layout) if layout.count(s) > 1}
    params = []
    for name, prm in student.named_parameters():
        parts = name.split(".")
        if len(parts) < 5 or parts[1] != "layers":
            if train == "all" and "norm" in name:
                prm.requires_grad_(True)
                params.append(prm)
            continue
        layer = int(parts[2])
        kind = parts[4] if parts[3] == "self_attn" else parts[3]
        want = False
        if train in ("fitted", "fitted+norm", "all"):
            want = layer in shared and kind in ("q_proj", "k_proj", "v_proj", "o_proj")
        if train == "attn":
            want = kind in ("q_proj", "k_proj", "v_proj", "o_proj")
        if train in ("fitted+norm", "all") and "norm" in kind:
            want = True
        if train == "all" and kind == "mlp":
            want = True
        if want:
            prm.requires_grad_(True)
            params.append(prm)
    return params


def main() -> None:
    p = Parser(__doc__)
    p.add_argument("cla", type=Path, help="a `clakit convert` output folder (made with --distill-steps 0)")
    p.add_argument("--steps", type=positive, default=100, help="Adam steps (default 100)")
    p.add_argument("--lr", type=positive_float, default=1e-4, help="learning rate (default 1e-4)")
    p.add_argument("--tokens", type=positive, default=8192, help="calibration tokens (default 8192)")
    p.add_argument("--batch", type=positive, default=2, help="sequences per step (default 2)")
    p.add_argument("--train", choices=TRAIN, default="fitted", help="what trains (see above; default fitted)")
    p.add_argument("--eval-every", type=non_negative, default=0, help="held-out perplexity every N steps (0: start "
                   "and end only)")  # fmt: skip
    p.add_argument("--sched", choices=SCHEDULES, default="const", help="learning-rate schedule (default const)")
    p.add_argument("--seq", type=positive, default=512, help="tokens per calibration sequence (default 512)")
    p.add_argument("--out", type=Path, help=OUT_HELP)
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    a = p.parse_args()
    if not (a.cla / "config.json").is_file():
        refuse(f"{a.cla} is not a converted model folder (no config.json): pass a `clakit convert` output")
    check_output(a.out, a.force)
    from clakit.demo import fetch_demo

    torch.manual_seed(0)
    assets = fetch_demo(quiet=True)
    tok = AutoTokenizer.from_pretrained(a.cla)
    student = AutoModelForCausalLM.from_pretrained(a.cla, dtype=torch.float32)
    layout = getattr(student.config, "kv_source_layers", None)
    if layout is None:
        refuse(f"{a.cla} is not a CLA model (no kv_source_layers): pass a `clakit convert` output")
    teacher = load_model(resolve_source(str(assets.model)), torch.float32).eval().requires_grad_(False)
    held = join_texts(load_texts([str(assets.heldout)]))
    report = {"benchmark": "distill_variants", "provenance": provenance(a), "teacher": str(assets.model)}
    report |= {"heldout": str(assets.heldout), "curve": [], "losses": []}

    def ppl(m):
        m.eval()
        return perplexity.perplexity(m, tok, held, seq_len=512, max_tokens=8192, quiet=True)["perplexity"]

    ids = calib_input_ids(tok, load_texts([str(assets.calib)]), a.tokens, a.seq)
    t0 = time.time()
    with torch.no_grad():
        tl = [teacher(ids[i : i + a.batch]).logits.to(torch.bfloat16) for i in range(0, len(ids), a.batch)]
    report["teacher_logits_s"] = round(time.time() - t0, 1)
    log(f"teacher logits {time.time() - t0:.0f}s, {len(ids)} seqs")
    del teacher
    params = trainable(student, layout, a.train)
    if not params:
        refuse(f"--train {a.train} selects no parameters in {a.cla} (nothing is shared?): pick another --train")
    report["trainable_parameters"] = sum(p.numel() for p in params)
    report["curve"].append({"step": 0, "perplexity": round(ppl(student), 2)})
    log("step 0", report["curve"][-1])
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
            F.kl_div(F.log_softmax(logits, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
            / x.shape[1]
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched:
            sched.step()
        if step % 10 == 0:
            report["losses"].append({"step": step, "loss": round(loss.item(), 4), "s": round(time.time() - t0, 1)})
            log(report["losses"][-1])
        if a.eval_every and step % a.eval_every == 0 and step < a.steps:
            report["curve"].append({"step": step, "perplexity": round(ppl(student), 2)})
            log(report["curve"][-1])
    report["train_s"] = round(time.time() - t0, 1)
    report["curve"].append({"step": a.steps, "perplexity": round(ppl(student), 2)})
    emit(report, a.out)


if __name__ == "__main__":
    main_guard(main)
