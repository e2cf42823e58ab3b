"""One adapter per supported model family (data only).

Each entry names the family's on-disk tensor layout and config keys; see ``base.Adapter``.
Layouts were read from what ``transformers`` 5.x ``save_pretrained`` writes (the original
per-expert format) and from the families' published checkpoints.
"""

from __future__ import annotations

from dataclasses import replace

from .base import Adapter

# Every config key any family uses for the routed-expert count: a checkpoint's config.json may
# carry more than one (e.g. qwen3_moe configs saved by transformers 5 write num_local_experts).
ALL_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _qwen_dense(cfg: dict) -> set[int]:
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    only = set(cfg.get("mlp_only_layers") or [])
    n = int(cfg["num_hidden_layers"])
    return {i for i in range(n) if i in only or (i + 1) % step != 0}


def _deepseek_dense(cfg: dict) -> set[int]:
    return set(range(int(cfg.get("first_k_dense_replace", 0) or 0)))


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
    extra_layers_key="num_nextn_predict_layers",
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

# ---- families added from transformers 5.x; MoE layers are found from the index (dense_layers None) --


def _deepseek_like(family: str, arch: str, notes: str = "", **kw) -> Adapter:
    """DeepSeek-V3-style routing: sigmoid gate + e_score_correction_bias, optional node groups, per-expert
    gate/up/down under mlp.experts, shared experts copied unchanged."""
    return Adapter(family=family, model_types=(family,), architectures=(arch,), expert_count_keys=("n_routed_experts",),
                   router_tensors=("weight", "e_score_correction_bias"), grouped_routing=True, router_scoring="sigmoid",
                   extra_layers_key="num_nextn_predict_layers", notes=notes, **kw)


GLM4_MOE = _deepseek_like("glm4_moe", "Glm4MoeForCausalLM",
                          "GLM-4.5/4.6; first_k_dense_replace layers dense; MTP layers copied when the index has them")
GLM4_MOE_LITE = _deepseek_like("glm4_moe_lite", "Glm4MoeLiteForCausalLM", "GLM-4.7-Flash; MLA attention")
DEEPSEEK_V32 = _deepseek_like("deepseek_v32", "DeepseekV32ForCausalLM",
                              "DeepSeek-V3.2 (sparse-attention indexer copied unchanged)")
DOTS1 = _deepseek_like("dots1", "Dots1ForCausalLM", "rednote dots.llm1")

EXAONE_MOE = Adapter(
    family="exaone_moe", model_types=("exaone_moe",), architectures=("ExaoneMoeForCausalLM",),
    expert_count_keys=("num_experts",), router_extra=("e_score_correction_bias",), grouped_routing=True,
    router_scoring="sigmoid", moe_renames=(("e_score_correction_bias", "gate.e_score_correction_bias"),),
    notes="K-EXAONE; e_score_correction_bias beside the gate on disk",
)

MINIMAX_M2 = Adapter(
    family="minimax_m2", model_types=("minimax_m2",), architectures=("MiniMaxM2ForCausalLM",),
    expert_count_keys=("num_local_experts",), moe_prefix="block_sparse_moe.", expert_projs=("w1", "w3", "w2"),
    router_extra=("e_score_correction_bias",), router_scoring="sigmoid",
    notes="sigmoid router; e_score_correction_bias beside the gate",
)

MINIMAX = Adapter(
    family="minimax", model_types=("minimax",), architectures=("MiniMaxForCausalLM",),
    expert_count_keys=("num_local_experts",), moe_prefix="block_sparse_moe.", expert_projs=("w1", "w3", "w2"),
    notes="MiniMax-Text-01: lightning (linear) attention layers computed without a cache",
)

ERNIE4_5_MOE = Adapter(
    family="ernie4_5_moe", model_types=("ernie4_5_moe",), architectures=("Ernie4_5_MoeForCausalLM",),
    expert_count_keys=("moe_num_experts",), top_k_key="moe_k", router_extra=("moe_statics.e_score_correction_bias",),
    moe_renames=(("moe_statics.e_score_correction_bias", "gate.moe_statics.e_score_correction_bias"),),
    notes="ERNIE-4.5 MoE; the (1, E) moe_statics bias is sliced with the router",
)

HUNYUAN_V1_MOE = Adapter(
    family="hunyuan_v1_moe", model_types=("hunyuan_v1_moe",), architectures=("HunYuanMoEV1ForCausalLM",),
    expert_count_keys=("num_experts",), top_k_key="moe_topk", router_tensors=("wg.weight",),
    notes="Hunyuan-A13B; router is gate.wg; shared_mlp copied unchanged",
)

FLEX_OLMO = Adapter(
    family="flex_olmo", model_types=("flex_olmo",), architectures=("FlexOlmoForCausalLM",),
    expert_count_keys=("num_experts",),
)

AFMOE = Adapter(
    family="afmoe", model_types=("afmoe",), architectures=("AfmoeForCausalLM",), expert_count_keys=("num_experts",),
    router="router", runtime_router="router", router_tensors=("gate.weight",), router_extra=("expert_bias",),
    router_scoring="sigmoid", notes="Arcee Trinity; expert_bias sliced with the router",
)

LFM2_MOE = Adapter(
    family="lfm2_moe", model_types=("lfm2_moe",), architectures=("Lfm2MoeForCausalLM",), expert_count_keys=("num_experts",),
    moe_prefix="feed_forward.", runtime_moe_prefix="feed_forward.", expert_projs=("w1", "w3", "w2"),
    router_extra=("expert_bias",), router_scoring="sigmoid",
    notes="LFM2-8B-A1B; short-convolution layers computed without a cache",
)

QWEN3_NEXT = Adapter(
    family="qwen3_next", model_types=("qwen3_next",), architectures=("Qwen3NextForCausalLM",),
    expert_count_keys=("num_experts",), notes="gated-DeltaNet (linear attention) layers computed without a cache; "
    "shared_expert copied unchanged; mtp.* tensors copied unchanged",
)

LLAMA4_TEXT = Adapter(
    family="llama4_text", model_types=("llama4_text",), architectures=("Llama4ForCausalLM",),
    expert_count_keys=("num_local_experts",), moe_prefix="feed_forward.", runtime_moe_prefix="feed_forward.",
    router="router", runtime_router="router", expert_layout="fused", fused_tensors=("gate_up_proj", "down_proj"),
    probes=False,
    notes="Llama 4 text model; experts fused on disk (E, H, 2I); shared_expert copied unchanged; its experts run "
          "densely on router-scaled inputs, so calibration scoring is not available: apply a --plan",
)

GRANITEMOE = Adapter(
    family="granitemoe", model_types=("granitemoe",), architectures=("GraniteMoeForCausalLM",),
    expert_count_keys=("num_local_experts",), moe_prefix="block_sparse_moe.", runtime_moe_prefix="block_sparse_moe.",
    router="router.layer", runtime_router="router", expert_layout="fused", fused_dir="",
    fused_tensors=("input_linear.weight", "output_linear.weight"),
    moe_renames=(("input_linear.weight", "experts.gate_up_proj"), ("output_linear.weight", "experts.down_proj")),
    notes="experts fused on disk as input_linear/output_linear",
)
GRANITEMOESHARED = replace(GRANITEMOE, family="granitemoeshared", model_types=("granitemoeshared",),
                           architectures=("GraniteMoeSharedForCausalLM",),
                           notes="GraniteMoE with a shared MLP (copied unchanged)")

JAMBA = Adapter(
    family="jamba", model_types=("jamba",), architectures=("JambaForCausalLM",), expert_count_keys=("num_experts",),
    moe_prefix="feed_forward.", runtime_moe_prefix="feed_forward.", router="router", runtime_router="router",
    notes="hybrid attention/Mamba; Mamba layers computed without a cache (PyTorch reference scan on CPU)",
)

SOLAR_OPEN = _deepseek_like("solar_open", "SolarOpenForCausalLM", "Upstage Solar Open")
MIMO_V2_FLASH = _deepseek_like("mimo_v2_flash", "MiMoV2FlashForCausalLM", "Xiaomi MiMo-V2-Flash (hybrid sliding attention)",
                               layer_renames=(("self_attn.attention_sink_bias", "self_attn.sinks"),))
GLM_MOE_DSA = _deepseek_like("glm_moe_dsa", "GlmMoeDsaForCausalLM", "GLM-5 (MLA + sparse-attention indexer copied unchanged)")

COHERE2_MOE = Adapter(
    family="cohere2_moe", model_types=("cohere2_moe",), architectures=("Cohere2MoeForCausalLM",),
    expert_count_keys=("num_experts",),
    notes="expert_selection_fn 'sigmoid' configs are scored as softmax by the calibration statistics",
)

QWEN3_5_MOE = Adapter(
    family="qwen3_5_moe_text", model_types=("qwen3_5_moe_text",), architectures=("Qwen3_5MoeForCausalLM",),
    expert_count_keys=("num_experts",),
    notes="Qwen3.5 MoE text model; gated-DeltaNet layers computed without a cache; shared_expert copied unchanged",
)

# ---- families whose fields were derived from transformers (``hf.derive_layout(config).fields()``,
# checked against it for every family by tests/test_derive.py) --------------------------------------

HY_V3 = Adapter(
    family="hy_v3", model_types=("hy_v3",), architectures=("HYV3ForCausalLM",), expert_count_keys=("num_experts",),
    router="router.gate", router_extra=("expert_bias",), router_scoring="sigmoid",
    moe_renames=(("expert_bias", "e_score_correction_bias"), ("shared_mlp.gate_proj.weight", "shared_experts.gate_proj.weight"),
                 ("shared_mlp.up_proj.weight", "shared_experts.up_proj.weight"),
                 ("shared_mlp.down_proj.weight", "shared_experts.down_proj.weight")),
    notes="Hunyuan 3 (HY-V3); sigmoid router, expert_bias sliced with it; shared_mlp copied unchanged",
)

MELLUM = Adapter(
    family="mellum", model_types=("mellum",), architectures=("MellumForCausalLM",), expert_count_keys=("num_local_experts",),
    notes="JetBrains Mellum MoE; dense mlp_layer_types layers copied unchanged",
)

GRANITEMOE_SWA = Adapter(
    family="granitemoe_swa", model_types=("granitemoe_swa",), architectures=("GraniteMoeSWAForCausalLM",),
    expert_count_keys=("num_local_experts",), moe_prefix="block_sparse_moe.", runtime_moe_prefix="block_sparse_moe.",
    router="router", runtime_router="router", expert_layout="fused", fused_tensors=("gate_up_proj", "down_proj"),
    notes="GraniteMoE with sliding-window attention and sinks; experts fused on disk; shared_mlp copied unchanged",
)

GRANITEMOEHYBRID = replace(GRANITEMOE, family="granitemoehybrid", model_types=("granitemoehybrid",),
                           architectures=("GraniteMoeHybridForCausalLM",),
                           notes="Granite 4.0 hybrid: Mamba-2 layers computed without a cache; shared_mlp copied unchanged")

LAGUNA = Adapter(
    family="laguna", model_types=("laguna",), architectures=("LagunaForCausalLM",), expert_count_keys=("num_experts",),
    router_extra=("experts.e_score_correction_bias",), router_scoring="sigmoid",
    moe_renames=(("experts.e_score_correction_bias", "gate.e_score_correction_bias"),
                 ("shared_expert.gate_proj.weight", "shared_experts.gate_proj.weight"),
                 ("shared_expert.up_proj.weight", "shared_experts.up_proj.weight"),
                 ("shared_expert.down_proj.weight", "shared_experts.down_proj.weight")),
    notes="Poolside Laguna; sigmoid router whose e_score_correction_bias is stored under mlp.experts (sliced with "
          "the router); shared_expert copied unchanged",
)

KIMI_LINEAR = Adapter(
    family="kimi_linear", model_types=("kimi_linear",), architectures=("KimiLinearForCausalLM",),
    expert_count_keys=("num_experts", "num_local_experts"), top_k_key="num_experts_per_token",
    moe_prefix="block_sparse_moe.", expert_projs=("w1", "w3", "w2"), router_tensors=("weight", "e_score_correction_bias"),
    grouped_routing=True, router_scoring="sigmoid",
    layer_renames=(("self_attn.dt_bias", "self_attn.forget_gate.dt_bias"), ("self_attn.A_log", "self_attn.forget_gate.A_log"),
                   ("self_attn.f_a_proj.weight", "self_attn.forget_gate.f_a_proj.weight"),
                   ("self_attn.f_b_proj.weight", "self_attn.forget_gate.f_b_proj.weight")),
    layer_concats=((("self_attn.q_conv1d.weight", "self_attn.k_conv1d.weight", "self_attn.v_conv1d.weight"),
                    "self_attn.conv1d.weight", 0),),
    notes="Kimi-Linear: KDA (linear attention) layers computed without a cache; expert groups are num_expert_group",
)

ALL = (MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE, DEEPSEEK_V2, DEEPSEEK_V3, PHIMOE, GPT_OSS,
       GLM4_MOE, GLM4_MOE_LITE, DEEPSEEK_V32, DOTS1, EXAONE_MOE, MINIMAX_M2, MINIMAX, ERNIE4_5_MOE, HUNYUAN_V1_MOE,
       FLEX_OLMO, AFMOE, LFM2_MOE, QWEN3_NEXT, LLAMA4_TEXT, GRANITEMOE, GRANITEMOESHARED, JAMBA,
       SOLAR_OPEN, MIMO_V2_FLASH, GLM_MOE_DSA, COHERE2_MOE, QWEN3_5_MOE, HY_V3, MELLUM, GRANITEMOE_SWA,
       GRANITEMOEHYBRID, LAGUNA, KIMI_LINEAR)
