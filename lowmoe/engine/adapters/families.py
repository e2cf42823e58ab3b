"""One adapter per supported model family (data only).

Each entry names the family's on-disk tensor layout and config keys; see ``base.Adapter``.
Layouts were read from what ``transformers`` 5.x ``save_pretrained`` writes (the original
per-expert format) and from the families' published checkpoints.
"""

from __future__ import annotations

from .base import Adapter

# Every config key any family uses for the routed-expert count: a checkpoint's config.json may
# carry more than one (e.g. qwen3_moe configs saved by transformers 5 write num_local_experts).
ALL_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def _qwen_dense(cfg: dict) -> set[int]:
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    only = set(cfg.get("mlp_only_layers") or [])
    n = int(cfg["num_hidden_layers"])
    return {i for i in range(n) if i in only or (i + 1) % step != 0}


def _deepseek_dense(cfg: dict) -> set[int]:
    return set(range(int(cfg.get("first_k_dense_replace", 0) or 0)))


def _deepseek_mtp(cfg: dict) -> list[int]:
    n = int(cfg["num_hidden_layers"])
    return list(range(n, n + int(cfg.get("num_nextn_predict_layers", 0) or 0)))


MIXTRAL = Adapter(
    family="mixtral",
    model_types=("mixtral",),
    architectures=("MixtralForCausalLM",),
    expert_count_keys=("num_local_experts",),
    moe_prefix="block_sparse_moe.",
    expert_projs=("w1", "w3", "w2"),
)

PHIMOE = Adapter(
    family="phimoe",
    model_types=("phimoe",),
    architectures=("PhimoeForCausalLM",),
    expert_count_keys=("num_local_experts",),
    moe_prefix="block_sparse_moe.",
    runtime_router="router",
    expert_projs=("w1", "w3", "w2"),
    notes="sparsemixer routing; top-k must stay 2 (transformers' sparsemixer supports only 2)",
)

QWEN2_MOE = Adapter(
    family="qwen2_moe",
    model_types=("qwen2_moe",),
    architectures=("Qwen2MoeForCausalLM",),
    expert_count_keys=("num_experts",),
    dense_layers=_qwen_dense,
    notes="shared_expert and shared_expert_gate are copied unchanged",
)

QWEN3_MOE = Adapter(
    family="qwen3_moe",
    model_types=("qwen3_moe",),
    architectures=("Qwen3MoeForCausalLM",),
    expert_count_keys=("num_experts", "num_local_experts"),
    dense_layers=_qwen_dense,
)

OLMOE = Adapter(
    family="olmoe",
    model_types=("olmoe",),
    architectures=("OlmoeForCausalLM",),
    expert_count_keys=("num_experts", "num_local_experts"),
)

DEEPSEEK_V2 = Adapter(
    family="deepseek_v2",
    model_types=("deepseek_v2",),
    architectures=("DeepseekV2ForCausalLM",),
    expert_count_keys=("n_routed_experts",),
    dense_layers=_deepseek_dense,
    grouped_routing=True,
    notes="first_k_dense_replace layers are dense; shared_experts copied unchanged",
)

DEEPSEEK_V3 = Adapter(
    family="deepseek_v3",
    model_types=("deepseek_v3",),
    architectures=("DeepseekV3ForCausalLM",),
    expert_count_keys=("n_routed_experts",),
    router_tensors=("weight", "e_score_correction_bias"),
    dense_layers=_deepseek_dense,
    extra_layers=_deepseek_mtp,
    grouped_routing=True,
    router_scoring="sigmoid",
    notes="sigmoid router with e_score_correction_bias; MTP layers past num_hidden_layers copied unchanged",
)

GPT_OSS = Adapter(
    family="gpt_oss",
    model_types=("gpt_oss",),
    architectures=("GptOssForCausalLM",),
    expert_count_keys=("num_local_experts",),
    runtime_router="router",
    router="router",
    router_tensors=("weight", "bias"),
    expert_layout="fused",
    fused_tensors=("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"),
    notes="experts fused on disk (gate/up interleaved on the last dim of gate_up_proj); router has a bias",
)

ALL = (MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE, DEEPSEEK_V2, DEEPSEEK_V3, PHIMOE, GPT_OSS)
