"""The whole run's config: its sections, and the checks that span
several of them."""
import dataclasses
import warnings
from dataclasses import dataclass, field

from coom.config.checks import require
from coom.config.data import DataConfig
from coom.config.energy import EnergyConfig
from coom.config.fp8 import FP8Config
from coom.config.growth import GrowthConfig
from coom.config.model import ModelConfig
from coom.config.output import CheckpointConfig, LoggingConfig
from coom.config.parallel import ParallelConfig
from coom.config.training import OptimizerConfig, ScheduleConfig, TrainConfig
from coom.errors import Adjusted


@dataclass
class RunConfig:
    """Everything that defines a run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fp8: FP8Config = field(default_factory=FP8Config)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    growth: GrowthConfig = field(default_factory=GrowthConfig)

    def __post_init__(self):
        tensor = self.parallel.tensor
        for name in ("num_attention_heads", "ffn_hidden_size"):
            require(getattr(self.model, name) % tensor == 0,
                    f"model.{name}", f"{getattr(self.model, name)} does "
                    f"not split over parallel.tensor {tensor}")
        shared = self.model.n_shared_experts * self.model.moe_intermediate_size
        require(shared % tensor == 0, "model.moe_intermediate_size",
                f"the shared experts' {shared} hidden units do not split "
                f"over parallel.tensor {tensor}")
        require(not self.parallel.sequence_parallel
                or self.data.seq_length % tensor == 0, "data.seq_length",
                f"{self.data.seq_length} does not split over "
                f"parallel.tensor {tensor} (parallel.sequence_parallel)")
        require(tensor == 1 or self.fp8.recipe == "off", "parallel.tensor",
                "tensor parallelism does not run FP8 products yet; set "
                "fp8.recipe=off or parallel.tensor=1")
        self._check_expert_parallel()
        self._check_pipeline()
        require(not self.data.synthetic or self.model.vocab_size is not None,
                "model.vocab_size", "must be set for data.synthetic")
        require(self.data.seq_length <= self.model.max_position_embeddings,
                "data.seq_length",
                f"{self.data.seq_length} exceeds "
                f"model.max_position_embeddings "
                f"{self.model.max_position_embeddings}")
        if self.schedule.lr_warmup_iters > self.train.steps:
            # A recipe's warmup is sized for its own length; a short trial
            # run of it warms up over the whole run instead of failing.
            warnings.warn(Adjusted(
                f"schedule.lr_warmup_iters {self.schedule.lr_warmup_iters} "
                f"exceeds train.steps {self.train.steps}; warming up over "
                f"all {self.train.steps} steps"), stacklevel=2)
            self.schedule = dataclasses.replace(
                self.schedule, lr_warmup_iters=self.train.steps)
        last = max((entry.step for entry in self.growth.schedule),
                   default=0)
        require(last < self.train.steps, "growth.schedule",
                f"a growth at step {last} must come before the run's "
                f"last step ({self.train.steps})")
        last = max((change.step for change in self.data.mixture_schedule),
                   default=0)
        require(last < self.train.steps, "data.mixture_schedule",
                f"a mixture change at step {last} must come before the "
                f"run's last step ({self.train.steps})")
        decay = self.schedule.lr_wsd_decay_iters
        require(decay is None or self.schedule.lr_warmup_iters + decay
                <= self.train.steps, "schedule.lr_wsd_decay_iters",
                "warmup plus decay exceeds train.steps")

    def _check_expert_parallel(self):
        expert, experts = self.parallel.expert, self.model.n_routed_experts
        if expert == 1:
            return
        require(experts % expert == 0 and experts > 0,
                "model.n_routed_experts", f"{experts} routed experts do "
                f"not split over parallel.expert {expert}; make it a "
                f"positive multiple of {expert}")

    def _check_pipeline(self):
        parallel, model = self.parallel, self.model
        if parallel.pipeline == 1:
            return
        stages = parallel.pipeline_stages
        require(stages <= model.num_layers, "parallel.pipeline",
                f"{stages} stages ({parallel.pipeline_schedule}) need at "
                f"least as many blocks, but model.num_layers is "
                f"{model.num_layers}")
        require(not model.share_embeddings_and_output_weights,
                "parallel.pipeline", "a tied embedding and output head "
                "(model.share_embeddings_and_output_weights) does not run "
                "under pipeline parallelism yet")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
