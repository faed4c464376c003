"""The ``coom`` argument parser: one function adds each command."""
import argparse

from coom.cli.bench import cmd_bench
from coom.cli.data import cmd_data_prepare
from coom.cli.model import cmd_convert, cmd_generate, cmd_grow, cmd_model_info
from coom.cli.plan import cmd_plan
from coom.cli.runs import cmd_experts_rebalance, cmd_report
from coom.cli.train import cmd_eval, cmd_train

SET_HELP = ("override config fields, e.g. --set train.steps=200 "
            "model.hidden_size=256 (values are YAML)")


def _add_recipe_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "recipe", nargs="?", default=None,
        help="recipe name (tiny, small, ...) or a YAML file; "
        "default: tiny")
    parser.add_argument("--set", dest="overrides", nargs="+",
                        action="extend", default=[], metavar="KEY=VALUE",
                        help=SET_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coom", description="Pretrain DeepSeek-V3-style models.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of input errors")
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="COMMAND")
    _add_train(commands)
    _add_data(commands)
    _add_model(commands)
    _add_plan(commands)
    _add_convert(commands)
    _add_grow(commands)
    _add_generate(commands)
    _add_bench(commands)
    _add_experts(commands)
    _add_eval(commands)
    _add_report(commands)
    return parser


def _add_train(commands) -> None:
    """Add ``coom train``."""
    train = commands.add_parser(
        "train", help="train a model from a recipe",
        description="Train a model. Writes config.yaml, metrics.jsonl, "
        "TensorBoard events and checkpoints to the run directory.")
    _add_recipe_options(train)
    train.add_argument("--run-dir", metavar="DIR",
                       help="run directory (default: runs/RECIPE-TIMESTAMP)")
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue the run in RUN_DIR from its latest "
                       "checkpoint, with its config plus any --set")
    train.add_argument("--overwrite", action="store_true",
                       help="delete an existing run directory first")
    train.add_argument("--auto-resume", action="store_true",
                       help="resume the run when --run-dir already holds "
                       "one, else start it: the command a scheduler or "
                       "torchrun --max-restarts runs again")
    train.set_defaults(handler=cmd_train)


def _add_data(commands) -> None:
    """Add ``coom data``."""
    data = commands.add_parser(
        "data", help="prepare training data",
        description="Data commands.").add_subparsers(
            dest="data_command", required=True, metavar="COMMAND")
    data_prepare = data.add_parser(
        "prepare", help="tokenize a recipe's data sources",
        description="Train or load the tokenizer and write each text "
        "source of the recipe's data section as a Megatron indexed dataset "
        "in data.cache_dir; unchanged sources are reused.")
    _add_recipe_options(data_prepare)
    data_prepare.set_defaults(handler=cmd_data_prepare)


def _add_model(commands) -> None:
    """Add ``coom model``."""
    model = commands.add_parser(
        "model", help="describe a recipe's model",
        description="Model commands.").add_subparsers(
            dest="model_command", required=True, metavar="COMMAND")
    model_info = model.add_parser(
        "info", help="parameters, FLOPs per token and KV cache size",
        description="Print a recipe's total and active parameters, "
        "training FLOPs per token at its sequence length, and the bytes "
        "per token of MLA's compressed KV cache against multi-head "
        "attention of the same shape. Builds nothing in memory.")
    _add_recipe_options(model_info)
    model_info.set_defaults(handler=cmd_model_info)


def _add_plan(commands) -> None:
    """Add ``coom plan``."""
    plan = commands.add_parser(
        "plan", help="predict a run's memory and step time per GPU, or "
        "search the layouts that fit",
        description="Print what each GPU of a run would hold at its peak: "
        "parameters, gradients and optimizer states by their sharding, "
        "activations, transients and buffers, read off the model built "
        "as each process of the layout builds it, on the meta device; "
        "and the step time, from a roofline of each operator at the "
        "GPU's rates and the layout's communication. Runs on a CPU in "
        "seconds.")
    _add_recipe_options(plan)
    plan.add_argument("--gpus", type=int, default=1, metavar="N",
                      help="processes (GPUs) of the run; default 1")
    plan.add_argument("--gpu",
                      help="the GPU kind: h100, h800, h200 or a100; "
                      "default h100 (with --calibrate, this machine's)")
    plan.add_argument("--search", action="store_true",
                      help="plan every layout, micro-batch size and "
                      "recompute mode at --gpus and print the fastest "
                      "that fit, with their commands")
    plan.add_argument("--calibrate", action="store_true",
                      help="measure this machine's GPU (matrix products, "
                      "expert products, attention, copies; under a "
                      "minute) and keep its rates for later plans")
    plan.set_defaults(handler=cmd_plan)


def _add_convert(commands) -> None:
    """Add ``coom convert``."""
    convert = commands.add_parser(
        "convert", help="convert checkpoints to and from Hugging Face",
        description="--to hf: write a run's latest checkpoint (or a "
        "checkpoint folder) as a Hugging Face DeepseekV3 folder "
        "(DeepseekV2 for softmax routing; model.safetensors, config.json, "
        "tokenizer.json). --from hf: import a Hugging Face DeepseekV3 or "
        "DeepseekV2 folder as a COOM checkpoint "
        "folder with a recipe.yaml that continues training it.")
    direction = convert.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to", choices=["hf"],
                           help="convert a COOM run or checkpoint")
    direction.add_argument("--from", dest="from_", choices=["hf"],
                           help="import a Hugging Face folder")
    convert.add_argument("source", metavar="SOURCE",
                         help="run directory, checkpoint folder, or (with "
                         "--from hf) Hugging Face folder")
    convert.add_argument("out", metavar="OUT", help="folder to write")
    convert.add_argument("--overwrite", action="store_true",
                         help="replace OUT if it exists")
    convert.set_defaults(handler=cmd_convert)


def _add_grow(commands) -> None:
    """Add ``coom grow``."""
    grow = commands.add_parser(
        "grow", help="grow a model offline, keeping what it computes",
        description="Apply growth operators (docs/growth.md) to a model "
        "and write it as a checkpoint folder with a recipe that trains "
        "it. To grow while training, use the recipe's growth.schedule.")
    grow.add_argument("source", metavar="SOURCE",
                      help="run directory, checkpoint folder or Hugging "
                      "Face folder")
    grow.add_argument("out", metavar="OUT", help="folder to write")
    grow.add_argument("--op", nargs="+", action="append", required=True,
                      metavar="WORD", help="an operator and its arguments, "
                      "e.g. --op depth num_layers=8; repeat to apply "
                      "several in order")
    grow.add_argument("--seed", type=int, default=0,
                      help="seed of the new weights")
    grow.add_argument("--overwrite", action="store_true",
                      help="replace OUT if it exists")
    grow.set_defaults(handler=cmd_grow)


def _add_generate(commands) -> None:
    """Add ``coom generate``."""
    generate = commands.add_parser(
        "generate", help="sample text from a model",
        description="Continue a prompt with a trained model, decoding with "
        "MLA's compressed KV cache (latents and rope keys only).")
    generate.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                          help="run directory, checkpoint folder or Hugging "
                          "Face folder (with tokenizer.json)")
    generate.add_argument("--prompt", required=True, help="text to continue")
    generate.add_argument("--max-new-tokens", type=int, default=64,
                          help="most tokens to add (default: 64)")
    generate.add_argument("--temperature", type=float, default=0.8,
                          help="0 decodes greedily (default: 0.8)")
    generate.add_argument("--top-p", type=float, default=0.95,
                          help="sample from the smallest set of tokens "
                          "whose probability reaches this (default: 0.95)")
    generate.add_argument("--seed", type=int, default=0,
                          help="sampling seed (default: 0)")
    generate.add_argument("--speculative", action="store_true",
                          help="draft with the first MTP depth and verify "
                          "(greedy only); prints the acceptance rate")
    generate.add_argument("--expanded", action="store_true",
                          help="expand cached latents to keys and values "
                          "instead of the absorbed attention")
    generate.add_argument("--device", default="auto",
                          help="cpu, cuda, cuda:N or auto (default)")
    generate.set_defaults(handler=cmd_generate)


def _add_bench(commands) -> None:
    """Add ``coom bench``."""
    bench = commands.add_parser(
        "bench", help="time a recipe's training steps",
        description="Train a recipe for a few steps (on random tokens "
        "unless --real-data) and report tokens/s, model FLOPs "
        "utilisation, peak memory and, on GPUs, energy per token.")
    _add_recipe_options(bench)
    bench.add_argument("--steps", type=int, default=10,
                       help="timed steps (default: 10)")
    bench.add_argument("--warmup", type=int, default=3,
                       help="untimed steps first (default: 3)")
    bench.add_argument("--real-data", action="store_true",
                       help="train on the recipe's data, not random tokens")
    bench.add_argument("--out", metavar="FILE",
                       help="also write the figures as JSON")
    bench.add_argument("--profile", action="store_true",
                       help="profile one more step and print where its "
                       "time goes: matmuls, attention, other kernels, "
                       "communication, idle")
    sweep = bench.add_argument_group(
        "energy sweep", "--energy-sweep measures J/token and tokens/s for "
        "candidate settings (micro-batch size, recomputation, compile, "
        "kernels, FP8; "
        "never hardware settings), prints their Pareto front and writes "
        "the one of least Zeus cost, eta * energy + (1 - eta) * "
        "max_power * time, as a recipe (docs/energy.md)")
    sweep.add_argument("--energy-sweep", action="store_true",
                       help="sweep settings instead of one measurement")
    sweep.add_argument("--vary", nargs="+", action="extend", default=[],
                       metavar="KEY=V1,V2",
                       help="a setting and its values to try, e.g. "
                       "train.micro_batch_size=2,4,8 (default: "
                       "micro-batch size halved and doubled, and on GPUs "
                       "recomputation, compile, kernels and FP8 flipped)")
    sweep.add_argument("--grid", action="store_true",
                       help="try every combination, not one setting at a "
                       "time")
    sweep.add_argument("--eta", type=float,
                       help="weight of energy against time, 0 to 1 "
                       "(default: 0.5)")
    sweep.add_argument("--max-power", type=float, metavar="WATTS",
                       help="price of time in the cost (default: NVML's "
                       "power limit)")
    sweep.add_argument("--recipe-out", metavar="FILE",
                       help="where to write the best setting (default: "
                       "energy-sweep-RECIPE.yaml); never overwritten")
    bench.set_defaults(handler=cmd_bench)


def _add_experts(commands) -> None:
    """Add ``coom experts``."""
    experts = commands.add_parser(
        "experts", help="expert placement",
        description="Expert commands.").add_subparsers(
            dest="experts_command", required=True)
    rebalance = experts.add_parser(
        "rebalance", help="renumber a run's experts to balance expert "
        "parallelism",
        description="Plan a placement of each MoE layer's routed experts "
        "on the expert-parallel ranks from the load the run measured "
        "since its last rebalance, and apply it to the run's latest "
        "checkpoint by renumbering the experts, with --redundant also "
        "placing copies of hot experts (nothing the model computes "
        "changes). The run then resumes from the rebalanced checkpoint "
        "(docs/distributed.md).")
    rebalance.add_argument("run_dir", metavar="RUN_DIR",
                           help="a run directory written by coom train")
    rebalance.add_argument("--ranks", type=int, required=True,
                           help="expert-parallel ranks to balance "
                           "(parallel.expert of the resumed run)")
    rebalance.add_argument("--redundant", type=int, default=0,
                           metavar="N",
                           help="extra expert slots per MoE layer for "
                           "copies of hot experts, a multiple of --ranks "
                           "(default 0: renumbering only)")
    rebalance.add_argument("--dry-run", action="store_true",
                           help="report the plan, write nothing")
    rebalance.set_defaults(handler=cmd_experts_rebalance)


def _add_eval(commands) -> None:
    """Add ``coom eval``."""
    evaluate = commands.add_parser(
        "eval", help="evaluate a run's checkpoint",
        description="Evaluate a checkpoint of RUN_DIR (its latest unless "
        "--step) on the run's validation data, with the run's config plus "
        "any --set (fp8.recipe=off, say, to see what FP8 changes; "
        "train.eval_iters for more of the validation data), as Megatron's "
        "--skip-train does. The run itself is not changed. Runs under "
        "torchrun too.")
    evaluate.add_argument("run_dir", metavar="RUN_DIR",
                          help="a run directory written by coom train")
    evaluate.add_argument("--step", type=int, metavar="N",
                          help="the checkpoint of step N")
    evaluate.add_argument("--set", dest="overrides", nargs="+",
                          action="extend", default=[],
                          metavar="KEY=VALUE", help=SET_HELP)
    evaluate.add_argument("--out", metavar="FILE",
                          help="also write the loss as JSON to FILE")
    evaluate.set_defaults(handler=cmd_eval)


def _add_report(commands) -> None:
    """Add ``coom report``."""
    report = commands.add_parser(
        "report", help="plot and summarise a run",
        description="Write loss, throughput and learning-rate plots and a "
        "markdown summary to RUN_DIR/report.")
    report.add_argument("run_dir", metavar="RUN_DIR",
                        help="a run directory written by coom train")
    report.set_defaults(handler=cmd_report)
