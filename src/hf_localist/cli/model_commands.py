"""``hf-localist apply`` (make a saved model localist) and ``hf-localist inspect`` (per-layer attention
diagnostics of a localist model on a text)."""

from __future__ import annotations

import argparse
import json
import math
import os
import re

import torch

from ..config.localist import LocalistConfig
from ..errors import LocalistConfigError, LocalistLoadError
from .base import Command, UsageError, check_output_dir, positive_int
from .models import add_localist_config_arguments, load_model_and_tokenizer, localist_overrides


class ApplyCommand(Command):
    """Load a local model directory, make it localist with a LocalistConfig built from the flags below, and save
    the localist model (weights, config.json with its 'localist' entry, localist_config.json) and its tokenizer
    to --output_dir. Load the result with hf_localist.AutoLocalistModel.from_pretrained(output_dir)."""

    name = "apply"
    help = "make a saved model localist and save it"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model_dir", "--model-dir", dest="model_dir", required=True,
                            help="local model directory (save_pretrained output)")
        parser.add_argument("--output_dir", "--output-dir", dest="output_dir", required=True,
                            help="where the localist model and its tokenizer are saved")
        add_localist_config_arguments(parser)

    def run(self) -> int:
        out = self.args.output_dir
        check_output_dir(out)
        overrides = localist_overrides(self.args)
        try:
            LocalistConfig.from_dict({}, **overrides)  # bad flag values fail here, before the model loads
        except LocalistConfigError as e:
            raise UsageError(str(e)) from e
        model, handle, tokenizer, loaded = load_model_and_tokenizer(self.args.model_dir, overrides)
        model.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        cfg = handle.config
        print(f"saved localist {type(model).__name__} to {out} ({'updated its saved state' if loaded else 'applied'}: "
              f"alpha={cfg.alpha}, schedule={cfg.schedule}, first_local_layer={cfg.first_local_layer}, "
              f"block_assignment={cfg.block_assignment}, layers={cfg.num_layers}; "
              f"tokenizer {'saved' if tokenizer is not None else 'not found'})")
        return 0


# ---------------------------------------------------------------------------------------------- inspect
def text_to_inputs(text: str, tokenizer, config, max_length: int):
    """``(input_ids, block_ids or None, description)`` of ``text``.

    With anchor tokens in the config (segment assignment) the text is tokenized as is and the anchors lay out the
    blocks. Otherwise paragraphs (separated by blank lines) are blocks 1..n (paragraphs past max_blocks join block
    max_blocks), passed as explicit ``block_ids``; a BOS token, when the tokenizer has one, opens the sequence in
    block 0 and takes the sink.
    """
    if config.block_assignment == "segment" and config.anchor_token_ids:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"][:max_length]
        return torch.tensor([ids]), None, f"segment assignment from {len(config.anchor_token_ids)} anchor tokens"
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if not paragraphs:
        raise LocalistLoadError("--text_file holds no text: write one or more paragraphs separated by blank lines")
    ids: list[int] = []
    blocks: list[int] = []
    if getattr(tokenizer, "bos_token_id", None) is not None:
        ids.append(tokenizer.bos_token_id)
        blocks.append(0)
    for i, para in enumerate(paragraphs):
        toks = tokenizer(para, add_special_tokens=False)["input_ids"]
        ids += toks
        blocks += [min(i + 1, config.max_blocks)] * len(toks)
    ids, blocks = ids[:max_length], blocks[:max_length]
    n = len(set(b for b in blocks if b >= 1))
    note = f"{len(paragraphs)} paragraphs as explicit blocks" + (
        f" (capped at max_blocks={config.max_blocks})" if len(paragraphs) > config.max_blocks else "")
    if n == 0:
        raise LocalistConfigError("the text tokenizes to no tokens inside a paragraph (check the tokenizer)")
    return torch.tensor([ids]), torch.tensor([blocks]), note


def _nan_to_none(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _nan_to_none(v) for k, v in value.items()}
    return value


class InspectCommand(Command):
    """Run a text through a localist model with diagnostics on, and print per layer the dial alpha_l, the attention
    entropy H_t (nats), pointer fidelity PF_t and block mass BM_t (means over queries; sink dropped). A model saved
    with localist state is loaded with it; any other model gets LocalistConfig defaults. Blocks come from the
    anchor tokens when the config has them, else each paragraph (blank-line separated) of the text is a block."""

    name = "inspect"
    help = "per-layer attention diagnostics of a localist model on a text"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model_dir", "--model-dir", dest="model_dir", required=True,
                            help="local model directory (localist or not)")
        parser.add_argument("--text_file", "--text-file", dest="text_file", required=True,
                            help="UTF-8 text; paragraphs separated by blank lines are the blocks")
        parser.add_argument("--max_length", "--max-length", dest="max_length", type=positive_int, default=512,
                            help="truncate the tokenized text to this many tokens")
        parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
        add_localist_config_arguments(parser, only=("alpha", "schedule", "schedule_power", "first_local_layer"))

    def run(self) -> int:
        args = self.args
        if args.max_length < 1:
            raise LocalistConfigError(f"--max_length={args.max_length} must be >= 1")
        if os.path.isdir(args.text_file):
            raise LocalistLoadError(f"--text_file {args.text_file!r} is a directory: pass a text file")
        if not os.path.isfile(args.text_file):
            raise LocalistLoadError(f"--text_file {args.text_file!r} does not exist")
        try:
            with open(args.text_file, encoding="utf-8") as fh:
                text = fh.read()
        except UnicodeDecodeError as e:
            raise LocalistLoadError(f"--text_file {args.text_file!r} is not UTF-8 text: {e}") from e
        model, handle, tokenizer, loaded = load_model_and_tokenizer(args.model_dir, {})
        if tokenizer is None:
            raise LocalistLoadError(f"--model_dir {args.model_dir!r} has no tokenizer: save one next to the model")
        overrides = localist_overrides(args)
        cfg = handle.config
        input_ids, block_ids, note = text_to_inputs(text, tokenizer, cfg, args.max_length)
        if block_ids is not None and cfg.block_assignment != "explicit":
            overrides["block_assignment"] = "explicit"
        if overrides:
            handle.update(**overrides)
        model.eval()
        kwargs = {"block_ids": block_ids} if block_ids is not None else {}
        with torch.no_grad(), handle.record() as rec:
            model(input_ids=input_ids, **kwargs)
        summary = rec.summary()
        alphas = handle.layer_alphas()
        result = {
            "model_dir": args.model_dir, "localist_state": "loaded" if loaded else "defaults applied",
            "alpha": cfg.alpha, "tokens": int(input_ids.shape[1]), "blocks": note,
            "layers": {int(layer): {"alpha_l": alphas[layer], **row} for layer, row in summary["layers"].items()},
            "mean": summary["mean"],
        }
        if args.json:
            print(json.dumps(_nan_to_none(result), indent=2))
            return 0
        print(f"{args.model_dir}: localist state {result['localist_state']}, alpha={cfg.alpha}, "
              f"{result['tokens']} tokens, {note}")
        print(f"{'layer':>5} {'alpha_l':>8} {'entropy':>9} {'pointer_fid':>11} {'block_mass':>10} {'n_pf':>5}")

        def fmt(v: float) -> str:
            return "nan" if v != v else f"{v:.4f}"

        for layer, row in result["layers"].items():
            print(f"{layer:>5} {row['alpha_l']:>8.3f} {fmt(row['entropy']):>9} {fmt(row['pointer_fidelity']):>11} "
                  f"{fmt(row['block_mass']):>10} {row['n_pointer_fidelity']:>5}")
        m = result["mean"]
        print(f"{'mean':>5} {'':>8} {fmt(m['entropy']):>9} {fmt(m['pointer_fidelity']):>11} {fmt(m['block_mass']):>10}")
        return 0
