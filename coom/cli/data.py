"""``coom data prepare``: tokenize a recipe's data sources."""


def cmd_data_prepare(args) -> int:
    from coom.config import load_config
    from coom.data.languages import describe_statistics
    from coom.data.prepare import prepare
    config = load_config(args.recipe or "tiny", args.overrides)
    prepared = prepare(config.data)
    print(f"tokenizer: {prepared.tokenizer.path} "
          f"({prepared.tokenizer.vocab_size} tokens)")
    for prefix in prepared.prefixes:
        print(f"dataset: {prefix}.bin / .idx")
    if prepared.statistics:
        print(describe_statistics(prepared.statistics))
    return 0
