"""The architecture of a decoder-only LM, as the kernels need it.

One frozen dataclass describes every supported family (dense Llama, Mixtral, Qwen3-MoE):
the families differ only in the flags below, so one span code path serves them all.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ModelConfig"]


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and options of the whole model (not of one span)."""

    family: str  # "llama" | "mixtral" | "qwen3_moe": informational, the flags below decide
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width (Llama, Qwen3-MoE dense layers)
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    num_experts: int = 0  # 0: every layer is dense
    top_k: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True  # renormalise the top-k router probabilities
    router_weights_in_model_dtype: bool = False  # Qwen3-MoE casts them back; Mixtral keeps fp32
    moe_layers: tuple[int, ...] = ()  # global indices of layers whose MLP is a MoE block
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before rotary
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.num_experts and not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"top_k {self.top_k} must be in 1..num_experts ({self.num_experts})")
        for layer in self.moe_layers:
            if not 0 <= layer < self.num_layers:
                raise ValueError(f"moe layer {layer} is outside 0..{self.num_layers - 1}")

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers
