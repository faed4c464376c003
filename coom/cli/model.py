"""The commands on a model's shape and weights: ``coom model info``,
``convert``, ``grow`` and ``generate``."""
import sys
from pathlib import Path

from coom.errors import UserError


def cmd_model_info(args) -> int:
    from dataclasses import replace

    from coom.config import load_config
    from coom.models.info import describe
    config = load_config(args.recipe or "tiny", args.overrides)
    model = config.model
    note = ""
    if model.vocab_size is None:
        model = replace(model, vocab_size=config.data.tokenizer_vocab_size)
        note = (f" (vocabulary: the tokenizer's "
                f"{model.vocab_size} tokens)")
    print(f"recipe {args.recipe or 'tiny'}{note}")
    print(describe(model, config.data.seq_length))
    return 0


def cmd_convert(args) -> int:
    from coom.interop import convert
    source, out = Path(args.source), Path(args.out)
    if args.to == "hf":
        convert.to_hf(source, out, args.overwrite)
        print(f"wrote {out}: load it with transformers."
              "AutoModelForCausalLM.from_pretrained")
    else:
        recipe, defaults = convert.from_hf(source, out, args.overwrite)
        print(f"wrote {out}; continue training with: coom train {recipe}")
        if defaults:
            fields = ", ".join(f"model.{name}={value}"
                               for name, value in defaults.items())
            print(f"{source}/config.json holds no COOM training settings; "
                  f"the recipe takes COOM's defaults {fields} (change "
                  "them with --set)")
    return 0


def cmd_grow(args) -> int:
    from coom.growth.offline import grow_folder, parse_op
    ops = [parse_op(words) for words in args.op]
    recipe = grow_folder(Path(args.source), Path(args.out), ops, args.seed,
                         args.overwrite)
    print(f"wrote {args.out}; train the grown model with: coom train "
          f"{recipe}")
    return 0


def cmd_generate(args) -> int:
    import torch

    from coom.data.tokenizer import Tokenizer
    from coom.inference import generate
    from coom.interop.weights import build_model, read_weights
    from coom.models.info import model_info
    from coom.train.device import resolve_device
    if args.speculative and args.temperature != 0:
        raise UserError("--speculative decodes greedily; add "
                        "--temperature 0")
    generate.check_sampling(args.temperature, args.top_p)
    weights = read_weights(args.source)
    if weights.tokenizer is None:
        raise UserError(f"{args.source} comes with no tokenizer.json to "
                        "encode the prompt")
    tokenizer = Tokenizer(weights.tokenizer, weights.eod_token)
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(weights, device, dtype)
    prompt = tokenizer.encode(args.prompt)
    absorbed = not args.expanded
    if args.speculative:
        out = generate.generate_speculative(
            model, prompt, args.max_new_tokens, tokenizer.eod, absorbed)
    else:
        out = generate.generate(
            model, prompt, args.max_new_tokens, args.temperature,
            args.top_p, args.seed, tokenizer.eod, absorbed)
    print(tokenizer.decode(prompt + out.tokens))
    info = model_info(weights.config, 1)
    positions = len(prompt) + len(out.tokens) - 1
    per_token = out.cache_bytes // positions
    mha = info.mha_cache_values_per_token * dtype.itemsize
    print(f"{len(out.tokens)} tokens in {out.seconds:.2f} s "
          f"({len(out.tokens) / out.seconds:.1f} tokens/s); KV cache "
          f"{out.cache_bytes:,} bytes, {per_token:,} bytes per token "
          f"(multi-head attention: {mha:,})", file=sys.stderr)
    if args.speculative:
        rate = out.accepted / max(out.drafted, 1)
        print(f"MTP drafts accepted: {out.accepted} of {out.drafted} "
              f"({rate:.0%})", file=sys.stderr)
    return 0
