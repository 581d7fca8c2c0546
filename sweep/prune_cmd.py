"""``sweep prune``: one-shot pruning without a sweep, the same code path as the sweep's
preparation (``trainers.pruning.prune_model``).

Loads a model (``sweep eval``'s model and text flags), measures the dense perplexity, prunes it by
one recipe (method, sparsity or N:M pattern, layer-wise rule) with its calibration data, measures
the pruned perplexity, and writes a Hugging Face directory holding the pruned weights, the masks
(``masks.safetensors``, uint8 keep-masks by layer) and ``prune.json`` (the recipe, calibration and
figures). The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from eval.perplexity import evaluate, tokenize_text
from eval.text import TextSource, load_text
from sweep.eval_cmd import EXIT_INVALID_INPUT, CommandFailed, add_eval_arguments, load_inputs
from trainers.spec import OWLConfig, SparseGPTConfig, parse_pattern


def add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    add_eval_arguments(parser)
    parser.add_argument("--method", required=True, choices=("magnitude", "wanda", "sparsegpt"))
    parser.add_argument("--sparsity", type=float, default=None,
                        help="fraction of weights zeroed per pruned layer (mean, with OWL)")
    parser.add_argument("--pattern", default=None, help='N:M semi-structured, e.g. "2:4"')
    parser.add_argument("--layerwise", choices=("uniform", "owl"), default="uniform")
    parser.add_argument("--out", required=True, help="directory to write (Hugging Face format)")
    cal = parser.add_mutually_exclusive_group()
    cal.add_argument("--calib-text-file", default=None, help="calibration text (UTF-8 file)")
    cal.add_argument("--calib-pydoc-topics", default=None, choices=["all", "train", "eval"],
                     help="calibrate on CPython's bundled docs topics (no download)")
    cal.add_argument("--calib-dataset", default=None, help="calibration datasets name or directory")
    parser.add_argument("--calib-dataset-config", default=None)
    parser.add_argument("--calib-split", default="train")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-seq-len", type=int, default=None,
                        help="tokens per calibration sequence (default: --token-length)")
    parser.add_argument("--calib-seed", type=int, default=0)
    parser.add_argument("--percdamp", type=float, default=SparseGPTConfig.percdamp)
    parser.add_argument("--blocksize", type=int, default=SparseGPTConfig.blocksize)
    parser.add_argument("--owl-m", type=float, default=OWLConfig.m)
    parser.add_argument("--owl-lam", type=float, default=OWLConfig.lam)


def _calibration_source(args: argparse.Namespace) -> TextSource | None:
    if args.calib_text_file is not None:
        return TextSource(source="file", path=args.calib_text_file)
    if args.calib_pydoc_topics is not None:
        return TextSource(source="pydoc_topics", part=args.calib_pydoc_topics)
    if args.calib_dataset is not None:
        return TextSource(source="dataset", dataset=args.calib_dataset,
                          dataset_config=args.calib_dataset_config, split=args.calib_split)
    return None


def _problems(args: argparse.Namespace, recipe) -> list[str]:
    problems = []
    try:
        pattern = parse_pattern(args.pattern)
    except ValueError as e:
        problems.append(f"--pattern: {e}")
        pattern = None
    if pattern is None and args.sparsity is None:
        problems.append("--sparsity: required unless --pattern is given")
    if args.sparsity is not None and not 0 <= args.sparsity < 1:
        problems.append(f"--sparsity: must be in [0, 1), got {args.sparsity}")
    if args.layerwise == "owl" and pattern is not None:
        problems.append("--layerwise owl: spreads an unstructured sparsity; drop --pattern")
    if recipe.needs_calibration and _calibration_source(args) is None:
        problems.append(f"--calib-text-file / --calib-pydoc-topics / --calib-dataset: {args.method}"
                        f"{' with owl' if args.layerwise == 'owl' else ''} needs calibration text "
                        "(the papers use 128 x 2048 tokens of C4's train split)")
    if args.calib_text_file is not None and not Path(args.calib_text_file).expanduser().is_file():
        problems.append(f"--calib-text-file: file not found: {args.calib_text_file}")
    for flag, value in (("--calib-samples", args.calib_samples), ("--blocksize", args.blocksize)):
        if value < 1:
            problems.append(f"{flag}: must be >= 1, got {value}")
    if args.calib_seq_len is not None and args.calib_seq_len < 2:
        problems.append(f"--calib-seq-len: must be >= 2, got {args.calib_seq_len}")
    if not 0 <= args.percdamp < 1:
        problems.append(f"--percdamp: must be in [0, 1), got {args.percdamp}")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        problems.append(f"--out: {out} exists and is not a directory")
    return problems


def run_prune(args: argparse.Namespace) -> int:
    from trainers.files import write_json
    from trainers.hf import tied_keys, write_hf_dir
    from trainers.parallel import measured_sparsity, sparsity_summary
    from trainers.prune import prunable_linears, save_masks
    from trainers.pruning import Recipe, calibration_ids, prune_model

    recipe = Recipe(args.method, None if args.pattern else args.sparsity, args.pattern,
                    args.layerwise, SparseGPTConfig(args.percdamp, args.blocksize),
                    OWLConfig(args.owl_m, args.owl_lam))
    try:
        model, tokenizer, _, input_ids, labels, _ = load_inputs(
            args, "sweep prune", _problems(args, recipe))
        calib, calib_info = None, None
        if recipe.needs_calibration:
            seq_len = args.calib_seq_len or args.token_length
            source = _calibration_source(args)
            try:
                tokens = tokenize_text(tokenizer, load_text(source))
                calib = calibration_ids(tokens, seq_len, args.calib_samples, args.calib_seed)
            except (FileNotFoundError, ValueError, UnicodeDecodeError) as e:
                raise CommandFailed(EXIT_INVALID_INPUT, f"sweep prune: invalid calibration text: {e}") from e
            where = {"file": source.path, "dataset": source.dataset, "pydoc_topics": source.part}
            calib_info = {"text": source.source, "from": where[source.source],
                          "samples": int(calib.shape[0]), "seq_len": seq_len, "seed": args.calib_seed}
    except CommandFailed as e:
        print(e.message, file=sys.stderr)
        return e.code
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    progress = not args.no_progress
    dense = evaluate(model, input_ids, labels, args.batch_size, progress=progress)
    print(f"dense perplexity {dense['perplexity']:.4f}", file=sys.stderr)
    masks, record = prune_model(model, recipe, calib)
    per_layer = measured_sparsity(model)
    sizes = {name: lin.weight.numel() for name, lin in prunable_linears(model).items()}
    actual = sparsity_summary(per_layer, sizes)["overall"]
    t0 = time.perf_counter()
    pruned = evaluate(model, input_ids, labels, args.batch_size, progress=progress)
    result = {
        "method": args.method, "sparsity": record["sparsity"], "pattern": args.pattern,
        "layerwise": args.layerwise, "dense_perplexity": dense["perplexity"],
        "perplexity": pruned["perplexity"], "sparsity_actual": actual,
        "windows": pruned["windows"], "tokens": pruned["tokens"],
        "seconds": round(record["seconds"], 3), "eval_seconds": round(time.perf_counter() - t0, 3),
        "calibration": calib_info, "block_sparsities": record.get("block_sparsities"),
        "device": device.type, "model": args.model, "out": str(Path(args.out).expanduser()),
    }
    out = Path(args.out).expanduser()
    model.to("cpu")
    write_hf_dir(out, model.config, model.state_dict(), tied_keys(model), tokenizer=tokenizer)
    save_masks(masks, out / "masks.safetensors")
    write_json(out / "prune.json", {**result, "record": record})
    print(f"{args.method} {args.pattern or args.sparsity} ({args.layerwise}): perplexity "
          f"{dense['perplexity']:.2f} -> {pruned['perplexity']:.2f}, sparsity {actual:.4f}, "
          f"pruned in {record['seconds']:.1f} s; wrote {out}", file=sys.stderr)
    print(json.dumps(result))
    return 0
