import json
import re

import pytest
import torch

from coom.cli import main
from coom.config import ConfigError, load_config
from coom.data.synthetic import SyntheticSamples
from coom.layers.block import Block
from coom.tools.profile import Gap, group_of, idle_gaps
from coom.train.metrics import read_metrics
from coom.train.trainer import Trainer

MODEL = ["model.hidden_size=32", "model.num_layers=2",
         "model.num_attention_heads=2", "model.ffn_hidden_size=64",
         "model.vocab_size=300", "data.seq_length=32",
         "train.micro_batch_size=2", "train.global_batch_size=4"]


def test_bench_command_reports_and_writes_figures(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--steps", "2", "--warmup", "1", "--out",
                 str(out), "--set", *MODEL]) == 0
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "not measured" in printed
    result = json.loads(out.read_text())
    assert result["tokens_per_s"] > 0
    assert result["global_batch_size"] == 4 and result["steps"] == 2
    assert result["flops_per_token"] > 0
    assert "joules_per_token" not in result and "mfu" not in result
    assert torch.isfinite(torch.tensor(result["loss_last"]))
    (rate,) = re.findall(r"model FLOPs +([\d.]+) GFLOP/s", printed)
    assert float(rate) == pytest.approx(result["achieved_tflops"] * 1e3,
                                        abs=0.05)
    assert float(rate) > 0


def test_profile_breaks_one_more_step_down(tmp_path, capsys):
    """On a CPU the ops' own time, by group: matmuls take a share, and
    the groups and the rest between ops make up the step's wall time."""
    out = tmp_path / "bench.json"
    assert main(["bench", "--steps", "1", "--warmup", "0", "--profile",
                 "--out", str(out), "--set", *MODEL]) == 0
    printed = capsys.readouterr().out
    step = json.loads(out.read_text())["profile"]
    assert step["timeline"] == "CPU"
    assert step["busy_ms"] == pytest.approx(sum(step["groups_ms"].values()))
    assert 0 < step["groups_ms"]["matmul"] < step["busy_ms"]
    assert step["busy_ms"] <= step["step_ms"] * 1.05
    assert "profiled step" in printed and "between ops" in printed
    shares = [float(share) for share in
              re.findall(r"ms +([\d.]+)%$", printed, re.MULTILINE)]
    assert sum(shares) == pytest.approx(100, abs=1)


@pytest.mark.parametrize("name, group", [
    ("nvjet_tst_256x128_64x4_2x1_v_bz_coopA_TNT", "matmul"),
    ("void cutlass::device_kernel<...>", "grouped matmul"),
    ("ncclDevKernel_SendRecv(ncclDevComm*)", "communication"),
    ("cudnn_generated_fort_native_sdpa_sm90", "attention"),
    ("_rms_norm_kernel", "triton (coom)"),
    ("triton_poi_fused__to_copy_0", "fused by inductor"),
    ("multi_tensor_apply_kernel<...>", "optimizer"),
    ("aten::mm", "matmul"),
    ("c10d::allreduce_", "communication"),
    ("aten::gelu", "other"),
])
def test_kernels_and_ops_fall_in_their_groups(name, group):
    assert group_of(name) == group


def test_idle_stretches_are_what_no_kernel_on_any_stream_covers():
    """Kernels on two streams (times in us): the second stream's kernel
    covers part of what would be a gap; a kernel inside another closes
    nothing; the largest stretch comes first."""
    kernels = [(0, 100, "a"), (150, 400, "b"), (180, 200, "inside b"),
               (300, 500, "c"), (900, 1000, "d"), (1030, 1040, "e")]
    assert idle_gaps(kernels) == [Gap(0.4, 0.5, "c", "d"),
                                  Gap(0.05, 0.1, "a", "b"),
                                  Gap(0.03, 1.0, "d", "e")]
    assert idle_gaps([(0, 10, "a"), (5, 20, "b")]) == []
    assert idle_gaps([]) == []


def test_compiled_bench_evaluates_first_and_counts_graph_breaks(
        tmp_path, monkeypatch):
    """The bench evaluates once before its steps, as a run does; a
    compiled dense model is traced whole from there on, and a graph
    break in the blocks shows in the figures."""
    evaluations = []
    evaluate = Trainer.evaluate
    monkeypatch.setattr(Trainer, "evaluate", lambda self, samples: (
        evaluations.append(self.step) or evaluate(self, samples)))
    dense = [*MODEL, "train.compile=true", "model.n_routed_experts=0"]
    out = tmp_path / "bench.json"
    assert main(["bench", "--steps", "1", "--warmup", "1", "--out",
                 str(out), "--set", *dense]) == 0
    result = json.loads(out.read_text())
    assert evaluations == [0]
    assert result["graph_breaks"] == result["frames_left_eager"] == 0
    forward = Block.forward

    def broken(self, *args, **kwargs):
        torch._dynamo.graph_break()
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(Block, "forward", broken)
    assert main(["bench", "--steps", "1", "--warmup", "1", "--out",
                 str(out), "--set", *dense]) == 0
    assert json.loads(out.read_text())["graph_breaks"] > 0


def test_compiled_run_warns_of_graph_breaks_and_logs_them(
        tmp_path, monkeypatch, capsys):
    """``coom train`` logs what torch.compile left to eager PyTorch after
    its first step, and warns when it left anything."""
    args = [*MODEL, "train.compile=true", "model.n_routed_experts=0",
            "data.synthetic=true", "train.steps=2",
            "schedule.lr_warmup_iters=1", "train.eval_iters=1",
            "logging.tensorboard=false", "logging.progress_bar=false"]

    def compile_records(run_dir):
        return [record for record in read_metrics(run_dir)
                if "compile_graph_breaks" in record]
    assert main(["train", "--run-dir", str(tmp_path / "whole"), "--set",
                 *args]) == 0
    (record,) = compile_records(tmp_path / "whole")
    assert record["step"] == 1
    assert record["compile_graph_breaks"] == 0
    assert record["compile_frames_left_eager"] == 0
    assert "graph breaks" not in capsys.readouterr().out
    forward = Block.forward

    def broken(self, *args, **kwargs):
        torch._dynamo.graph_break()
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(Block, "forward", broken)
    assert main(["train", "--run-dir", str(tmp_path / "broken"), "--set",
                 *args]) == 0
    (record,) = compile_records(tmp_path / "broken")
    assert record["compile_graph_breaks"] > 0
    assert "warning: torch.compile left" in capsys.readouterr().out


def test_bench_refuses_no_steps(capsys):
    assert main(["bench", "--steps", "0", "--set", *MODEL]) == 2
    assert "--steps" in capsys.readouterr().err


def test_synthetic_batches_depend_only_on_their_start():
    samples = SyntheticSamples(50, 16, 3, seed=7)
    first, again = samples.batch(6), samples.batch(6)
    assert torch.equal(first.tokens, again.tokens)
    assert not torch.equal(first.tokens, samples.batch(9).tokens)
    assert torch.equal(first.tokens[:, 1:], first.labels[:, :-1])
    assert first.tokens.shape == (3, 16) and int(first.tokens.max()) < 50


def test_synthetic_samples_do_not_depend_on_the_micro_batch_size():
    """Samples 0-5 in micro-batches of 2 or of 3 are the same samples, so
    runs that split a global batch differently train on the same data."""
    pairs = SyntheticSamples(50, 16, 2, seed=7)
    triples = SyntheticSamples(50, 16, 3, seed=7)
    by_pairs = torch.cat([pairs.batch(start).tokens for start in (0, 2, 4)])
    by_triples = torch.cat([triples.batch(start).tokens for start in (0, 3)])
    assert torch.equal(by_pairs, by_triples)


def test_synthetic_data_needs_a_vocabulary_size():
    with pytest.raises(ConfigError, match="model.vocab_size"):
        load_config("tiny", ["data.synthetic=true"])


def test_sweep_options_without_the_sweep_are_refused(capsys):
    assert main(["bench", "tiny", "--eta", "0.3"]) == 2
    assert "--eta belong to --energy-sweep" in capsys.readouterr().err
