"""The architecture of a decoder-only LM, as the kernels need it.

One frozen dataclass describes every supported family (dense Llama, Mixtral, Qwen2/3-MoE,
OLMoE, Granite-MoE, DeepSeek-V3, GPT-OSS): the families differ only in the options below, so
one span code path serves them all. `RopeConfig` and `LatentAttentionConfig` group the options
of the rotary embedding and of DeepSeek's multi-head latent attention.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ROPE_STYLES", "ROPE_TYPES", "ROUTERS", "LatentAttentionConfig", "ModelConfig", "RopeConfig"]

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
# softmax_topk: softmax over all experts, then top-k (Mixtral, Qwen, OLMoE)
# topk_softmax: top-k logits, then softmax over those (Granite-MoE, GPT-OSS)
# sigmoid_group: sigmoid scores + correction bias, group-limited top-k (DeepSeek-V3)
# softmax_group: softmax scores, top-k within the best groups or over all (DeepSeek-V2)
ROUTERS = ("softmax_topk", "topk_softmax", "sigmoid_group", "softmax_group")
# half: rotate (first half, second half); interleave: pairs (x0, x1), ... (DeepSeek-V3);
# complex: pairs as complex numbers times e^(i theta) (DeepSeek-V2)
ROPE_STYLES = ("half", "interleave", "complex")


@dataclass(frozen=True)
class RopeConfig:
    """A rotary embedding as transformers' `modeling_rope_utils` defines each `rope_type`."""

    rope_type: str = "default"
    theta: float = 10000.0
    dim: int = 0  # rotated dimensions per head (head_dim * partial_rotary_factor)
    max_position_embeddings: int = 4096
    factor: float | None = None  # linear, dynamic, yarn, llama3
    original_max_position_embeddings: int | None = None  # yarn, llama3
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    beta_fast: float | None = None  # yarn
    beta_slow: float | None = None  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn (DeepSeek also scales the softmax by it)
    attention_factor: float | None = None  # yarn: cos/sin scaling, derived when None
    truncate: bool = True  # yarn

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} is not one of {', '.join(ROPE_TYPES)}")
        if self.dim <= 0 or self.dim % 2:
            raise ValueError(f"rotary dim {self.dim} must be positive and even")


@dataclass(frozen=True)
class LatentAttentionConfig:
    """DeepSeek's multi-head latent attention: low-rank q and kv, decoupled rope dims."""

    q_lora_rank: int | None  # None: a full q_proj
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and options of the whole model (not of one span)."""

    family: str  # the model_type: informational, the options below decide
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width (Llama, dense layers of MoE models)
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    # attention
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = ""  # "": none, "head": RMSNorm over head_dim (Qwen3), "full": over the projection (OLMoE)
    clip_qkv: float | None = None  # OLMoE: clamp q, k, v
    attention_scale: float | None = None  # None: head_dim ** -0.5 (Granite: attention_multiplier)
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()  # global indices of layers that attend within the window
    attention_sinks: bool = False  # GPT-OSS: a learned per-head logit joins the softmax (eager attention)
    rope_style: str = "half"  # one of ROPE_STYLES
    mla: LatentAttentionConfig | None = None
    # MLP and MoE
    mlp_bias: bool = False
    num_experts: int = 0  # 0: every layer is dense
    top_k: int = 0
    moe_intermediate_size: int = 0
    moe_layers: tuple[int, ...] = ()  # global indices of layers whose MLP is a MoE block
    router: str = "softmax_topk"
    norm_topk_prob: bool = True  # renormalise the top-k router weights
    router_weights_in_model_dtype: bool = False  # Qwen3-MoE, OLMoE cast them back; Mixtral keeps fp32
    router_bias: bool = False  # GPT-OSS
    group_limited: bool = True  # DeepSeek-V2: False for its "greedy" top-k over all experts
    n_group: int = 1  # DeepSeek group-limited routing
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    shared_expert_size: int = 0  # intermediate width of the always-on shared expert (0: none)
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(x W) scales the shared expert
    expert_style: str = "swiglu"  # "swiglu" | "gpt_oss" (biases, interleaved gate/up, clamped SwiGLU)
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # Granite multipliers
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    norm_cast_after_weight: bool = False  # GPT-OSS: (w * x).to(dtype) with fp32 norm weights
    fp32_params: tuple[str, ...] = ()  # parameter name suffixes transformers keeps in fp32 (bf16 and fp16)
    fp32_params_under_fp16: tuple[str, ...] = ()  # ... and those it keeps in fp32 only under fp16
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.num_experts and not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"top_k {self.top_k} must be in 1..num_experts ({self.num_experts})")
        if self.router not in ROUTERS:
            raise ValueError(f"router {self.router!r} is not one of {', '.join(ROUTERS)}")
        if self.num_experts and self.num_experts % self.n_group:
            raise ValueError(f"{self.num_experts} experts do not split into n_group {self.n_group}")
        if not 0 < self.topk_group <= self.n_group:
            raise ValueError(f"topk_group {self.topk_group} must be in 1..n_group ({self.n_group})")
        if self.rope_style not in ROPE_STYLES:
            raise ValueError(f"rope_style {self.rope_style!r} is not one of {', '.join(ROPE_STYLES)}")
        if self.qk_norm not in ("", "head", "full"):
            raise ValueError(f"qk_norm {self.qk_norm!r} is not '', 'head' or 'full'")
        if self.sliding_layers and not self.sliding_window:
            raise ValueError("sliding layers need a positive sliding_window")
        for layer in (*self.moe_layers, *self.sliding_layers):
            if not 0 <= layer < self.num_layers:
                raise ValueError(f"layer {layer} is outside 0..{self.num_layers - 1}")

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    def window(self, layer: int) -> int | None:
        """The sliding window of global layer `layer`, None if it attends to every position."""
        return self.sliding_window if layer in self.sliding_layers else None

    @property
    def rope_theta(self) -> float:
        return self.rope.theta
