"""The model section: the shape of the decoder."""
from dataclasses import dataclass
from typing import Literal, Optional

from coom.config.checks import positive, require


@dataclass
class ModelConfig:
    """Shape of the DeepSeek-V3-style decoder: MLA attention, dense or
    DeepSeekMoE feed-forward blocks."""

    vocab_size: Optional[int] = None
    """Rows of the embedding and output head. None takes the tokenizer's
    vocabulary size; a value smaller than the tokenizer's is an error."""

    hidden_size: int = 256
    """Width of the residual stream."""

    num_layers: int = 4
    """Number of transformer blocks (HF: num_hidden_layers)."""

    num_attention_heads: int = 4
    """Attention heads per block."""

    ffn_hidden_size: int = 704
    """Inner width of the dense SwiGLU blocks (HF: intermediate_size)."""

    q_lora_rank: Optional[int] = None
    """Rank of the low-rank query projection (with an RMSNorm on the
    latent); None projects queries at full rank."""

    kv_lora_rank: int = 64
    """Width of the compressed key-value latent that MLA caches."""

    qk_nope_head_dim: int = 32
    """Query and key channels per head that carry no position."""

    qk_rope_head_dim: int = 16
    """Query and key channels per head rotated by RoPE; the key part is
    shared by all heads."""

    v_head_dim: int = 32
    """Value channels per head."""

    max_position_embeddings: int = 2048
    """Longest sequence the rotary tables are built for."""

    rotary_base: float = 10000.0
    """Base of the rotary position embedding (HF: rope_theta)."""

    rope_type: Literal["rope", "yarn"] = "rope"
    """Plain RoPE, or YaRN's frequency interpolation for long contexts."""

    rope_interleave: bool = True
    """Rotate channel pairs (2i, 2i+1) of the rope part, as DeepSeek's
    checkpoints lay them out; false pairs channel i with i + k/2 (k =
    qk_rope_head_dim), as Hugging Face's rotate_half does."""

    rotary_scaling_factor: float = 1.0
    """YaRN: context extension factor (HF: rope_scaling.factor)."""

    original_max_position_embeddings: int = 4096
    """YaRN: context length the model was trained at before scaling."""

    beta_fast: float = 32.0
    """YaRN: rotations above which frequencies are kept."""

    beta_slow: float = 1.0
    """YaRN: rotations below which frequencies are interpolated."""

    mscale: float = 1.0
    """YaRN: numerator coefficient of the cos/sin attention factor. 0, as
    transformers reads a config.json that leaves it out, makes that factor
    0.1 ln(rotary_scaling_factor) + 1."""

    mscale_all_dim: float = 1.0
    """YaRN: coefficient of the softmax-scale correction (squared) and the
    denominator of the cos/sin attention factor. 0, as transformers reads
    a config.json that leaves it out, turns the correction off and makes
    that factor 0.1 ln(rotary_scaling_factor) + 1."""

    first_k_dense_replace: int = 1
    """Leading blocks that use a dense MLP instead of MoE."""

    n_routed_experts: int = 0
    """Fine-grained routed experts per MoE block; 0 makes every block
    dense."""

    num_experts_per_tok: int = 2
    """Routed experts each token is sent to (top-k)."""

    n_shared_experts: int = 1
    """Experts every token goes through, fused into one SwiGLU of
    n_shared_experts * moe_intermediate_size."""

    moe_intermediate_size: int = 128
    """Inner width of each expert (Megatron: moe_ffn_hidden_size)."""

    scoring_func: Literal["sigmoid", "softmax"] = "sigmoid"
    """Router affinity: sigmoid (DeepSeek-V3) or softmax (DeepSeek-V2)."""

    norm_topk_prob: bool = True
    """Normalise the chosen experts' scores to sum to one."""

    routed_scaling_factor: float = 1.0
    """Multiplier of the routed experts' combined output."""

    n_group: int = 1
    """Expert groups for group-limited routing (DeepSeek-V3's node-limited
    routing); 1 turns it off."""

    topk_group: int = 1
    """Groups a token may choose experts from."""

    topk_method: Literal["noaux_tc", "group_limited_greedy"] = "noaux_tc"
    """How groups are ranked when n_group > 1, named as Hugging Face's
    configs name them: noaux_tc by the sum of a group's two best selection
    scores (DeepSeek-V3), group_limited_greedy by its best one
    (DeepSeek-V2)."""

    moe_router_enable_expert_bias: bool = True
    """Auxiliary-loss-free balancing: a per-expert bias, added to the
    scores for selection only, moved after every optimizer step."""

    moe_router_bias_update_rate: float = 1e-3
    """Step of the bias update, bias += rate * sign(mean load - load)
    (DeepSeek-V3: 0.001)."""

    moe_seq_aux_loss_coeff: float = 1e-4
    """Weight of DeepSeek-V3's sequence-wise balance loss (alpha); 0 turns
    it off."""

    moe_aux_loss_coeff: float = 0.0
    """Weight of the classic balance loss over the whole batch."""

    moe_z_loss_coeff: float = 0.0
    """Weight of the router z-loss, the mean squared log-sum-exp of the
    router logits."""

    mtp_num_layers: int = 0
    """Multi-Token Prediction depths D, each one block that predicts one
    token further ahead (HF: num_nextn_predict_layers)."""

    layernorm_epsilon: float = 1e-6
    """Epsilon of the blocks', MTP's and the final RMSNorms (HF:
    rms_norm_eps); MLA's q and kv latent norms always use 1e-6, as
    DeepSeek's and transformers' do."""

    init_method_std: float = 0.02
    """Standard deviation of the normal weight init (HF:
    initializer_range). Output projections are scaled down by
    sqrt(2 * num_layers)."""

    share_embeddings_and_output_weights: bool = False
    """Tie the output head to the embedding (HF: tie_word_embeddings)."""

    def __post_init__(self):
        positive(self, "hidden_size", "num_layers", "num_attention_heads",
                 "ffn_hidden_size", "kv_lora_rank", "qk_rope_head_dim",
                 "v_head_dim", "max_position_embeddings", "rotary_base",
                 "rotary_scaling_factor", "layernorm_epsilon",
                 "init_method_std")
        for name in ("vocab_size", "q_lora_rank"):
            if getattr(self, name) is not None:
                positive(self, name)
        for name in ("qk_nope_head_dim", "mtp_num_layers", "mscale",
                     "mscale_all_dim"):
            require(getattr(self, name) >= 0, name, "must be >= 0")
        require(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
                f"{self.qk_rope_head_dim} must be even for rotary pairs")
        require(0 <= self.first_k_dense_replace <= self.num_layers,
                "first_k_dense_replace", f"must lie in [0, num_layers="
                f"{self.num_layers}]")
        if self.n_routed_experts:
            self._check_moe()

    def _check_moe(self):
        experts, groups = self.n_routed_experts, self.n_group
        positive(self, "n_routed_experts", "num_experts_per_tok",
                 "moe_intermediate_size", "n_group", "topk_group")
        for name in ("n_shared_experts", "moe_router_bias_update_rate",
                     "moe_seq_aux_loss_coeff", "moe_aux_loss_coeff",
                     "moe_z_loss_coeff"):
            require(getattr(self, name) >= 0, name, "must be >= 0")
        require(experts % groups == 0, "n_group",
                f"{groups} does not divide n_routed_experts {experts}")
        require(groups == 1 or experts // groups >= 2
                or self.topk_method == "group_limited_greedy", "n_group",
                "each group needs at least 2 experts (topk_method "
                "noaux_tc ranks groups by their top-2 scores)")
        require(self.topk_group <= groups, "topk_group",
                f"{self.topk_group} exceeds n_group {groups}")
        reachable = self.topk_group * (experts // groups)
        require(self.num_experts_per_tok <= reachable,
                "num_experts_per_tok", f"{self.num_experts_per_tok} "
                f"exceeds the {reachable} experts in topk_group groups")

    @property
    def qk_head_dim(self) -> int:
        """Query and key channels per head."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, index: int) -> bool:
        return self.n_routed_experts > 0 \
            and index >= self.first_k_dense_replace
