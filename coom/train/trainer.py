"""The training loop.

A run lives in one directory: ``config.yaml`` (the resolved config),
``run_info.json`` (``coom.train.run_dir``), ``metrics.jsonl``,
TensorBoard events and ``checkpoints/``. Everything that decides what
the next step computes is in a checkpoint: weights, optimizer moments,
the step (which fixes the learning rate), the number of samples consumed
(which fixes the next batch, since samples are addressed by index) and
the random generators.
So a resumed run repeats the uninterrupted one bit for bit on the CPU.

SIGINT and SIGTERM do not kill the loop: they are noted, the current step
finishes, a checkpoint is written and the run exits cleanly. A time or
energy budget (``train.exit_duration_in_mins``, ``energy.budget_kwh``;
``coom.energy.ledger``) ends the run the same way.

Tensor names end in their shape: b micro-batch; s sequence; t tokens (b * s).
"""
import signal
import time
from pathlib import Path
from typing import Optional

import torch
from torch._dynamo.utils import counters
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from tqdm import tqdm

from coom.checkpoint.storage import (
    latest_checkpoint,
    load_sharded,
    read_train_state,
    tensor_shapes,
)
from coom.config import RunConfig
from coom.data.loader import Batch, Samples
from coom.energy.ledger import EnergyLedger
from coom.errors import UserError
from coom.fp8.convert import check_hardware
from coom.growth.operators import describe
from coom.growth.schedule import catch_up, due
from coom.interop.weights import differences, read_weights
from coom.models.info import model_info, state_shapes
from coom.parallel.build import build_model, check_batch_split
from coom.parallel.expert import PLACEMENT, ExpertParallel, place_experts
from coom.parallel.mesh import World, local_device, start_world
from coom.train.anomaly import LOG, ROLLBACK, SKIP, Anomaly, AnomalyGuard
from coom.train.checkpoints import RunCheckpoints
from coom.train.device import check_fits, read_later, resolve_device
from coom.train.metrics import MetricsWriter
from coom.train.optimizer import (
    build_optimizer,
    clip_coefficient,
    learning_rate,
    mtp_loss_weight,
)
from coom.train.run_data import read_run_data
from coom.train.run_dir import write_config
from coom.train.watchdog import Watchdog

ACTIONS = (LOG, SKIP, ROLLBACK)
"""A step's possible fates, in order of precedence among processes."""
PAST = {LOG: "applied", SKIP: "skipped, the weights unchanged",
        ROLLBACK: "rolling back to the latest checkpoint"}


class StopRequest:
    """Notes SIGINT/SIGTERM while active instead of dying on them."""

    def __init__(self):
        self.signal_name = None
        self._previous = {}

    def __enter__(self):
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous[number] = signal.signal(number, self._note)
        return self

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _note(self, number, frame):
        self.signal_name = signal.Signals(number).name


def _check_same_model(ours: dict[str, tuple], path: Path):
    """The checkpoint's weights have the model's names and whole shapes
    (ours: name to shape)."""
    theirs = {name.removeprefix("model."): shape
              for name, shape in tensor_shapes(path).items()
              if name.startswith("model.")}
    for name in sorted(set(ours) | set(theirs)):
        here, there = ours.get(name, "absent"), theirs.get(name, "absent")
        if here != there:
            raise UserError(
                f"checkpoint {path} holds a different model: {name} is "
                f"{there} there and {here} in this config; resume with "
                "the model settings it was trained with")


def compile_misses() -> tuple[int, int]:
    """What torch.compile has left to eager PyTorch in this process so
    far: (graph breaks, frames it gave up whole)."""
    frames = counters["frames"]
    return (sum(counters["graph_break"].values()),
            frames["total"] - frames["ok"])


class Trainer:
    """Trains config's model in run_dir, from its latest checkpoint if any.

    The model is the one growth.schedule gives at that checkpoint's step
    (``coom.growth.schedule``): a trainer runs until the next growth, and
    the next trainer grows the checkpoint and goes on.

    Args:
        config: the run config; model.vocab_size may be None and is then
            taken from the tokenizer.
        run_dir: the run directory (created by the caller).
        world: the processes of the run, when a trainer before this one
            started them.
        job_started: when that trainer's job began (its energy ledger's
            ``job_started``), for the time budget.
    """

    def __init__(self, config: RunConfig, run_dir: Path,
                 world: Optional[World] = None,
                 job_started: Optional[float] = None):
        self.run_dir = run_dir
        self.device = local_device(resolve_device(config.train.device))
        self.world = world or start_world(config.parallel, self.device)
        check_batch_split(config, self.world.data_size)
        check_hardware(config.fp8, self.device)
        torch.manual_seed(config.train.seed)
        train = config.train
        self.energy = EnergyLedger(
            config.energy, self.device, self.world.main,
            train.global_batch_size * config.data.seq_length,
            train.exit_duration_in_mins, reduce=self.world.host_sum,
            job_started=job_started)
        self.data, self.recipe = read_run_data(config, self.world, run_dir)
        self.config, self.grown = catch_up(self.recipe,
                                           run_dir / "checkpoints")
        self.model_info = model_info(self.config.model,
                                     config.data.seq_length)
        self.flops_per_step = self.model_info.training_flops_per_token \
            * train.global_batch_size * config.data.seq_length
        self.flops = 0.0
        self.seconds = 0.0
        check_fits(self.model_info.total_params
                   + self.model_info.mtp_params, self.device)
        self.model_shapes = state_shapes(self.config.model)
        self.parallel = build_model(self.config, self.world, self.device)
        self.model = self.parallel.model
        self.compile_misses_before = compile_misses() \
            if train.compile else None
        self.optimizer = build_optimizer(
            self.model, self.config.optimizer, self.parallel.weights,
            self.parallel.dtype)
        self.expert_placement = None
        self.guard = AnomalyGuard(train.anomaly)
        self.skipped_samples: list[list[int]] = []
        """The sample ranges rollbacks skipped, [first, end)."""
        self.step = 0
        self.consumed_samples = 0
        self.prefetched: Optional[tuple[int, list[Batch]]] = None
        self.checkpoints = RunCheckpoints(run_dir / "checkpoints",
                                          config.checkpoint, self.world)

    def tensors(self) -> dict:
        """The weights and optimizer moments as this process holds them
        (its shards under FSDP or tensor parallelism), named as in the
        single-device model: what checkpoints save and load with DCP."""
        model, optimizer = get_state_dict(self.model, self.optimizer)
        return {"model": model, "optimizer": optimizer}

    def train_state(self) -> dict:
        """Everything else a checkpoint holds."""
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"step": self.step, "consumed_samples": self.consumed_samples,
                "train_flops": self.flops, "train_seconds": self.seconds,
                "rng": rng,
                "tokenizer_sha256": self.data.tokenizer_sha256,
                "config": self.config.to_dict(),
                "energy": self.energy.state_dict(),
                "anomaly": self.guard.state_dict(),
                "skipped_samples": self.skipped_samples,
                PLACEMENT: self.expert_placement}

    def restore(self, path: Path) -> None:
        state = read_train_state(path)
        _check_same_model(self.model_shapes, path)
        if state["tokenizer_sha256"] != self.data.tokenizer_sha256:
            raise UserError(
                f"checkpoint {path} was trained with another tokenizer "
                f"than {self.data.tokenizer_label}; set data.tokenizer to the "
                "run's tokenizer")
        tensors = self.tensors()
        load_sharded(path, tensors)
        set_state_dict(self.model, self.optimizer,
                       model_state_dict=tensors["model"],
                       optim_state_dict=tensors["optimizer"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.step = state["step"]
        self.consumed_samples = state["consumed_samples"]
        self.flops = state.get("train_flops", 0.0)
        self.seconds = state.get("train_seconds", 0.0)
        self.energy.load_state_dict(state.get("energy"))
        self.guard.load_state_dict(state.get("anomaly"))
        self.skipped_samples = state.get("skipped_samples", [])
        self._place_experts(state.get(PLACEMENT), path)

    def _place_experts(self, placement: Optional[dict], path: Path):
        """Apply a checkpoint's expert placement (``coom experts
        rebalance --redundant``) where this run's layout can use it; it
        stays in the checkpoints either way, for a resume at the layout
        it was planned for."""
        if not placement:
            return
        self.expert_placement = placement
        layers = self.model.moe_layers()
        problem = place_experts(layers, placement)
        # Every process (each pipeline stage) uses it, or none does.
        if self.world.any(problem is not None):
            for moe in layers.values():
                if isinstance(moe.experts, ExpertParallel):
                    moe.experts.place(None)
            problem = problem or "another process's layers do not fit it"
            message = (f"expert placement of {path.name} left unused "
                       f"({problem}); experts stay on their owners")
        else:
            message = (f"expert placement of {path.name}: redundant "
                       "copies in every MoE layer")
        if self.world.main:
            tqdm.write(message)

    def initialise_from(self, path: str) -> None:
        """Load the model weights of another run or model folder."""
        weights = read_weights(path)
        changed = differences(self.config.model, weights.config)
        if changed:
            raise UserError(
                f"checkpoint.init_from {path} holds another model; set the "
                f"recipe's model fields to its values: {'; '.join(changed)}")
        sha = weights.tokenizer_sha256
        if sha is not None and sha != self.data.tokenizer_sha256:
            raise UserError(
                f"checkpoint.init_from {path} was trained with another "
                f"tokenizer than {self.data.tokenizer_label}; set "
                "data.tokenizer to its tokenizer.json")
        # Every process holds the whole weights; each keeps its shards
        # (and under pipeline parallelism its stages').
        ours = self.model.state_dict().keys()
        state = {name: tensor for name, tensor in weights.state.items()
                 if name in ours}
        set_model_state_dict(self.model, state,
                             options=StateDictOptions(full_state_dict=True))

    def train_step(self) -> dict:
        """One optimizer step over a global batch; returns its metrics
        (the MoE layers' only where log_moe)."""
        train = self.config.train
        self.step += 1
        lr = learning_rate(self.step, train.steps, self.config.optimizer,
                           self.config.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        mtp_weight = mtp_loss_weight(self.step, train.steps,
                                     self.config.schedule)
        sums = self.parallel.forward_backward(
            self._batches(),
            train.global_batch_size * self.config.data.seq_length,
            mtp_weight)
        self.consumed_samples += train.global_batch_size
        self.flops += self.flops_per_step
        norm = self.parallel.gradient_norm()
        coefficient = clip_coefficient(norm, self.config.optimizer.clip_grad)
        # The figures are copied out before anything else is queued, so
        # that reading them waits for them alone. Where only figures that
        # are not finite keep a step from the weights, the device judges
        # that itself, and the step is launched before the host reads
        # them: the GPU does not wait for the host's judgement.
        figures = read_later(torch.cat([sums, norm[None]]))
        launched = not self.guard.holds_back_spikes
        if launched:
            self._apply(coefficient,
                        torch.stack([sums[0], norm]).isfinite().all())
        # The next step's batches are read and sent to the device while
        # the device still runs this one.
        if self.step < train.steps:
            self.prefetched = (self.consumed_samples, self._batches())
        total, mtp_total, grad_norm = figures()
        metrics = {"loss": total, "lr": lr, "grad_norm": grad_norm}
        if self.config.model.mtp_num_layers:
            metrics |= {"mtp_loss": mtp_total, "mtp_weight": mtp_weight}
        anomaly = self.guard.judge(total, grad_norm)
        action = self._fate(anomaly, coefficient, launched)
        self.optimizer.zero_grad(set_to_none=True)
        if anomaly is not None or action != LOG:
            metrics |= anomaly.record() if anomaly \
                else {"anomaly": "on another process"}
            metrics["anomaly_action"] = action
        return metrics

    def _apply(self, coefficient: torch.Tensor,
               applies: Optional[torch.Tensor] = None) -> None:
        """The optimizer's step, clipped in its own pass, and the expert
        biases'; where applies (a bool on the device) is false, the
        device leaves both as they were."""
        self.optimizer.step(grad_scale=coefficient, applies=applies)
        self.parallel.balancer.after_step(applies)

    def _fate(self, anomaly: Optional[Anomaly], coefficient: torch.Tensor,
              launched: bool) -> str:
        """The step's action (``ACTIONS``), carried out: where the step
        was launched already, the device has judged the same figures as
        the host and only the step counts of a step it held back are
        taken back."""
        # Every process judges the same global figures; the vote keeps
        # them together all the same, since a rollback is collective
        # (and costs no wait for the GPU: ``World.control``).
        own = anomaly.action if anomaly else LOG
        action = ACTIONS[self.world.maximum(ACTIONS.index(own))]
        if launched:
            if action != own:
                raise RuntimeError(
                    f"step {self.step}: this process judged its figures "
                    f"'{own}' and another '{action}', after the step was "
                    "launched; the processes' loss and gradient norm "
                    "should be the same global figures")
            if action != LOG:
                self.optimizer.forget_step()
            return action
        if action == LOG:
            self._apply(coefficient)
        else:
            self.parallel.balancer.discard()
        return action

    def roll_back(self) -> Optional[dict]:
        """Go back to the latest checkpoint, after a spike, and skip the
        data from there through the spike's batch and skip_batches more;
        the energy, time and work spent since stay counted. Returns the
        event's record, or None without a checkpoint to go back to (the
        spike's step then stays skipped)."""
        self.checkpoints.finish()
        latest = latest_checkpoint(self.run_dir / "checkpoints")
        if latest is None:
            return None
        end = self.consumed_samples + self.config.train.anomaly.skip_batches \
            * self.config.train.global_batch_size
        kept = self.energy.state_dict(), self.flops, self.seconds
        spike_step = self.step
        self.restore(latest)
        self.energy.load_state_dict(kept[0])
        self.flops, self.seconds = kept[1:]
        self.skipped_samples.append([self.consumed_samples, end])
        self.consumed_samples = end
        return {"rollback": f"from step {spike_step} to {latest.name}",
                "skipped_samples": self.skipped_samples[-1]}

    def _batches(self) -> list[Batch]:
        """This process's micro-batches of the step that starts at
        consumed_samples, on its device. Each data-parallel process takes
        its consecutive share of the global batch; losses are divided by
        the global batch's tokens, so the processes' gradients sum to the
        single-process one."""
        if self.prefetched is not None \
                and self.prefetched[0] == self.consumed_samples:
            return self.prefetched[1]
        micro_batch = self.config.train.micro_batch_size
        share = self.config.train.global_batch_size // micro_batch \
            // self.world.data_size
        first = self.consumed_samples \
            + self.world.data_rank * share * micro_batch
        return [self.data.samples.batch(first + index * micro_batch)
                .to(self.device) for index in range(share)]

    def evaluate(self, samples: Samples,
                 iterations: Optional[int] = None) -> float:
        train = self.config.train
        return self.parallel.evaluate(
            [samples.batch(i * train.micro_batch_size)
             for i in range(iterations or train.eval_iters)])

    def validation(self) -> dict:
        """The validation loss, and where the sources name languages each
        language's: its loss per token and, where its bytes per token are
        known, bits per byte, which compare across languages and
        tokenizers."""
        record = {"val_loss": self.evaluate(self.data.valid)}
        for language, samples in self.data.valid_by_language.items():
            loss = self.evaluate(
                samples, self.config.train.eval_iters_per_language)
            record[f"val_loss/{language}"] = loss
            bits = self.data.bits_per_byte(language, loss)
            if bits is not None:
                record[f"val_bpb/{language}"] = bits
        return record

    def save(self, ending: bool = False) -> None:
        """Write a checkpoint of this step (``RunCheckpoints.save``)."""
        self.checkpoints.save(self.step, self.tensors(), self.train_state(),
                              ending)

    def _progress(self) -> tqdm:
        return tqdm(total=self.config.train.steps, initial=self.step,
                    unit="step", dynamic_ncols=True,
                    disable=not (self.config.logging.progress_bar
                                 and self.world.main))

    def run(self) -> str:
        """Train to train.steps; returns why the loop ended."""
        latest = latest_checkpoint(self.run_dir / "checkpoints")
        if latest is not None:
            self.restore(latest)
        elif self.config.checkpoint.init_from:
            self.initialise_from(self.config.checkpoint.init_from)
        if self.world.main:
            write_config(self.run_dir, self.recipe)
        metrics = MetricsWriter(self.run_dir, self.config.logging.tensorboard,
                                enabled=self.world.main)
        if self.grown:
            self._note_growth(metrics)
        watchdog = Watchdog(self.run_dir, self.world.rank,
                            self.config.train.watchdog_minutes)
        try:
            with StopRequest() as stop, self._progress() as bar, \
                    self.energy, watchdog:
                return self._loop(metrics, stop, bar, watchdog)
        finally:
            metrics.close()

    def _note_growth(self, metrics: MetricsWriter) -> None:
        growth = [describe(entry.op, entry.args) for entry in self.grown]
        parameters = self.model_info.total_params
        if self.world.main:
            tqdm.write(f"grew the model after step {self.step}: "
                       f"{'; '.join(growth)} (now {parameters:,} "
                       "parameters)")
        metrics.write({"step": self.step, "growth": growth,
                       "total_params": parameters})

    def _rolled_back(self, step_metrics: dict,
                     metrics: MetricsWriter) -> bool:
        """Roll back where the step's fate says so, and log the event;
        whether the run went back (without a checkpoint the step stays
        skipped, and its record says so)."""
        if step_metrics.get("anomaly_action") != ROLLBACK:
            return False
        spike_step, rollback = self.step, self.roll_back()
        if rollback is None:
            step_metrics["rollback"] = "no checkpoint yet: the step was " \
                "skipped"
            return False
        metrics.write({"step": spike_step, **step_metrics, **rollback})
        return True

    def _note_anomaly(self, step_metrics: dict) -> None:
        if self.world.main:
            deviations = step_metrics.get("anomaly_deviations")
            how_far = "" if deviations is None \
                else f", {deviations:.1f} deviations above its window"
            tqdm.write(f"step {self.step}: {step_metrics['anomaly']} (loss "
                       f"{step_metrics['loss']:g}, gradient norm "
                       f"{step_metrics['grad_norm']:g}{how_far}): "
                       f"{PAST[step_metrics['anomaly_action']]}")

    def _report_compile_misses(self, metrics: MetricsWriter) -> None:
        """Log what torch.compile left to eager PyTorch up to the end of
        this process's first step (its evaluation included), and warn
        when it left anything: that part of the model runs slower."""
        breaks, frames = (now - before for now, before in zip(
            compile_misses(), self.compile_misses_before))
        metrics.write({"step": self.step, "compile_graph_breaks": breaks,
                       "compile_frames_left_eager": frames})
        if (breaks or frames) and self.world.main:
            tqdm.write(f"warning: torch.compile left {breaks} graph "
                       f"breaks and {frames} frames to eager PyTorch, "
                       "which runs them slower; TORCH_LOGS=graph_breaks "
                       "shows where")

    def _loop(self, metrics: MetricsWriter, stop: StopRequest, bar: tqdm,
              watchdog: Watchdog) -> str:
        config = self.config
        tokens_per_step = config.train.global_batch_size \
            * config.data.seq_length
        seconds, steps = 0.0, 0
        if self.energy.stop_reason:
            return self.energy.stop_reason
        if self.step == 0:
            metrics.write({"step": 0, **self.validation()})
            self.energy.end_phase("eval")
        first_step = self.step + 1
        while self.step < config.train.steps:
            watchdog.step()
            started = time.perf_counter()
            step_metrics = self.train_step()
            step_seconds = time.perf_counter() - started
            self.seconds += step_seconds
            self.energy.end_phase("step")
            if "anomaly" in step_metrics:
                self._note_anomaly(step_metrics)
            if self._rolled_back(step_metrics, metrics):
                bar.n = self.step
                continue
            if self.step == first_step \
                    and self.compile_misses_before is not None:
                self._report_compile_misses(metrics)
            seconds, steps = seconds + step_seconds, steps + 1
            done = self.step == config.train.steps
            evaluating = self.step % config.train.eval_interval == 0 or done
            logging = evaluating or "anomaly" in step_metrics \
                or self.step % config.logging.log_interval == 0
            # The MoE loads are read to the host only when they are
            # logged.
            moe = self.parallel.balancer.metrics() if logging else {}
            record = {"step": self.step, **step_metrics, **moe,
                      "tokens_per_s": steps * tokens_per_step / seconds,
                      "consumed_samples": self.consumed_samples,
                      "train_flops": self.flops,
                      "train_seconds": self.seconds}
            if evaluating:
                record |= self.validation()
                self.energy.end_phase("eval")
            over_budget = self.energy.step_done()
            if logging:
                metrics.write(record | self._peak_memory()
                              | self.energy.metrics())
                seconds, steps = 0.0, 0
            bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False,
                            tok_s=f"{tokens_per_step / step_seconds:,.0f}")
            bar.update(1)
            ended = self._end_of_step(stop, over_budget, done)
            if ended:
                return ended
        return "done"

    def _peak_memory(self) -> dict:
        """On GPUs, the most device memory any process held allocated
        since the last log, in GiB; every process takes part."""
        if self.device.type != "cuda":
            return {}
        peak = self.world.maximum(
            torch.cuda.max_memory_allocated(self.device))
        torch.cuda.reset_peak_memory_stats(self.device)
        return {"max_memory_gib": peak / 2 ** 30}

    def _end_of_step(self, stop: StopRequest, over_budget: Optional[str],
                     done: bool) -> Optional[str]:
        """Write a checkpoint where one is due; returns why the loop ends
        after this step, if it does."""
        config = self.config
        # A signal reaches each process at its own moment; all stop after
        # the same step, or their collectives would wait for ever.
        signalled = self.world.any(stop.signal_name is not None)
        stopping = signalled or over_budget or (
            config.train.exit_interval
            and self.step % config.train.exit_interval == 0)
        growing = bool(due(config.growth.schedule, self.step))
        ending = bool(done or stopping or growing)
        self.checkpoints.finish(unless_writing=True)
        if ending or self.step % config.checkpoint.interval == 0:
            self.save(ending)
            self.energy.end_phase("checkpoint")
        if stopping:
            if signalled:
                return stop.signal_name or "a signal to another process"
            return over_budget or "exit_interval"
        return "growth" if growing else None
