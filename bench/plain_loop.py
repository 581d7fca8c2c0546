"""The demo workload as a user would write it without prune-sweep: one process, all cores.

    python -m bench.plain_loop CONFIG MODEL_DIR OUT.json

Same model (the HF directory the sweep materialized from the config's model, so both start
from the same warm cache), same texts, training blocks and evaluation windows (read through
the project's text loaders, so the tokens are identical), same grid, steps per epoch, learning
rates, epochs and evaluations. What a sweep adds on top (Ray, a process per trial, sharding,
checkpoints, Parquet, the console) is what ``bench.e2e`` measures against this.

The loop itself is the plain one: deep-copy the dense model per trial, magnitude-prune every
linear layer of the decoder blocks, then AdamW with the masks re-applied after each step.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time


def main(config: str, model_dir: str, out: str) -> None:
    t0 = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.perplexity import make_windows, tokenize_text
    from eval.text import load_text
    from sweep.config import load_config

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    cfg = load_config(config)
    tok = AutoTokenizer.from_pretrained(model_dir)
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    train = tokenize_text(tok, load_text(cfg.data.train))
    n = train.numel() // cfg.data.seq_len
    blocks = train[: n * cfg.data.seq_len].view(n, cfg.data.seq_len)
    ids, labels = make_windows(tokenize_text(tok, load_text(cfg.eval.text)),
                               cfg.eval.token_length, cfg.eval.stride, cfg.eval.max_windows)

    @torch.no_grad()
    def perplexity(model) -> float:
        model.eval()
        nll, count = 0.0, 0
        for i in range(0, ids.shape[0], cfg.eval.batch_size):
            x, y = ids[i:i + cfg.eval.batch_size], labels[i:i + cfg.eval.batch_size]
            logits = model(x).logits[:, :-1].float()
            target = y[:, 1:]
            nll += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
            count += target.numel()
        return math.exp(nll / count)

    def prune(model, sparsity: float) -> dict:
        masks = {}
        for layer in model.model.layers:
            for lin in layer.modules():
                if isinstance(lin, torch.nn.Linear):
                    w = lin.weight.data
                    k = int(round(sparsity * w.numel()))
                    threshold = w.abs().flatten().kthvalue(k).values
                    masks[lin] = w.abs() > threshold
                    w.mul_(masks[lin])
        return masks

    results = {"dense": perplexity(dense), "trials": []}
    for sparsity in cfg.grid.sparsity:
        for batch in cfg.grid.batch_size:
            model = copy.deepcopy(dense)
            masks = prune(model, sparsity)
            history = [perplexity(model)]
            lr = cfg.train.base_lr * math.sqrt(batch)
            opt = torch.optim.AdamW(model.parameters(), lr=lr,
                                    weight_decay=cfg.train.weight_decay)
            steps = math.ceil(cfg.train.base_samples / batch)
            g = torch.Generator().manual_seed(cfg.train.seed)
            for _ in range(cfg.train.num_epochs):
                model.train()
                for _ in range(steps):
                    x = blocks[torch.randint(0, n, (batch,), generator=g)]
                    loss = model(x, labels=x).loss
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    with torch.no_grad():
                        for lin, m in masks.items():
                            lin.weight.mul_(m)
                history.append(perplexity(model))
            results["trials"].append({"sparsity": sparsity, "batch_size": batch,
                                      "perplexity": history})
    results["seconds"] = time.perf_counter() - t0
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:4])
