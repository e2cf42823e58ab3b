"""Synthetic MoE checkpoints in each family's real on-disk layout.

``synth_model`` writes config.json, a byte-level tokenizer, generation_config.json and random
weights, **one decoder layer at a time** through the same incremental shard writer the pruner
uses, so a multi-GB synthetic model never sits in memory whole. The tensors' names and shapes come
from transformers' own decoder-layer class for that config (converted to the on-disk layout by the
family adapter), so whatever transformers can build, lowmoe can synthesise; ``from_pretrained``
loads the result with no missing or unexpected keys.

Weights are N(0, 0.02) (``initializer_range``), norms are ones, biases zeros; router rows use a
larger std (1/sqrt(hidden)) so routing is far from uniform, as in trained models.

``quant`` writes the weights as quantized checkpoints are published (``lowmoe.engine.formats``):

* ``"fp8"``: every Linear weight of the decoder layers (attention, dense and shared MLPs, routed
  experts) as ``float8_e4m3fn`` + a float32 ``weight_scale_inv`` per ``fp8_block`` x ``fp8_block``
  block; routers, norms, biases, embeddings and ``lm_head`` stay in ``dtype`` (DeepSeek-V3/R1 and
  Qwen3-*-FP8 layout); ``quantization_config`` ``{"quant_method": "fp8", "fmt": "e4m3",
  "activation_scheme": "dynamic", "weight_block_size": [b, b]}`` (+ Qwen3-MoE's
  ``modules_to_not_convert``).
* ``"mxfp4"`` (gpt_oss): the fused experts as ``gate_up_proj_blocks`` (E, 2I, H/32, 16) +
  ``gate_up_proj_scales`` (E, 2I, H/32) and the same for ``down_proj``; biases, router and
  attention stay in ``dtype``; ``quantization_config`` as gpt-oss-20b's.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import torch

from ..engine.adapters import ALL_EXPERT_COUNT_KEYS, BY_FAMILY, supported_families
from ..errors import ConfigError, OutputError
from ..engine.hf import TOP_K_KEYS, ModelSkeleton
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, save_byte_tokenizer
from ..engine.device import DTYPES
from ..engine.formats import QuantFormat
from ..engine.writer import ShardWriter, parse_size

log = logging.getLogger(__name__)

# Families whose config.json family_config writes by hand (any size); every family has save_pretrained_model.
SYNTH_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "phimoe", "gpt_oss")


def family_config(arch: str, *, layers: int, hidden_size: int, intermediate_size: int, experts: int, top_k: int,
                  vocab_size: int = VOCAB_SIZE, heads: int | None = None, dtype: str = "float32",
                  max_position_embeddings: int = 4096, mtp_layers: int = 0) -> dict:
    """config.json contents for a small model of family ``arch``."""
    if arch not in BY_FAMILY:
        raise ConfigError(f"--arch {arch!r} is not supported; choose one of: {', '.join(supported_families())}")
    if arch not in SYNTH_FAMILIES:
        raise ConfigError(f"--arch {arch!r}: lowmoe synth writes {', '.join(SYNTH_FAMILIES)}; for other families "
                          "lowmoe.toy.synth.save_pretrained_model writes a tiny model through transformers' save_pretrained")
    heads = heads or max(1, hidden_size // 16)
    if hidden_size % heads:
        raise ConfigError(f"--hidden-size {hidden_size} is not divisible by the number of heads {heads}")
    kv = max(1, heads // 2)
    head_dim = hidden_size // heads
    torch_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype)
    cfg = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv, max_position_embeddings=max_position_embeddings, num_experts_per_tok=top_k,
               rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
               pad_token_id=PAD_ID, dtype=torch_dtype)
    if arch == "mixtral":
        cfg.update(model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=experts,
                   intermediate_size=intermediate_size, head_dim=head_dim)
    elif arch == "phimoe":
        if top_k != 2:
            raise ConfigError("--top-k must be 2 for phimoe (transformers' sparsemixer router supports only top-2)")
        cfg.update(model_type="phimoe", architectures=["PhimoeForCausalLM"], num_local_experts=experts,
                   intermediate_size=intermediate_size, router_jitter_noise=0.0, input_jitter_noise=0.0)
        cfg.pop("rms_norm_eps")
    elif arch in ("qwen2_moe", "qwen3_moe"):
        cfg.update(model_type=arch, architectures=["Qwen2MoeForCausalLM" if arch == "qwen2_moe" else "Qwen3MoeForCausalLM"],
                   num_experts=experts, moe_intermediate_size=intermediate_size, intermediate_size=intermediate_size * 2,
                   decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=arch == "qwen3_moe", head_dim=head_dim)
        if arch == "qwen2_moe":
            cfg["shared_expert_intermediate_size"] = intermediate_size * 2
    elif arch == "olmoe":
        cfg.update(model_type="olmoe", architectures=["OlmoeForCausalLM"], num_experts=experts,
                   intermediate_size=intermediate_size, norm_topk_prob=False)
    elif arch in ("deepseek_v2", "deepseek_v3"):
        n_group = 2 if experts % 2 == 0 and experts >= 4 else 1
        cfg.update(model_type=arch, architectures=["DeepseekV2ForCausalLM" if arch == "deepseek_v2" else "DeepseekV3ForCausalLM"],
                   n_routed_experts=experts, moe_intermediate_size=intermediate_size, intermediate_size=intermediate_size * 2,
                   first_k_dense_replace=1 if layers > 1 else 0, n_shared_experts=1, kv_lora_rank=max(8, hidden_size // 4),
                   qk_rope_head_dim=max(4, head_dim // 2), qk_nope_head_dim=max(4, head_dim // 2), v_head_dim=head_dim,
                   n_group=n_group, topk_group=1 if n_group > 1 else 1, routed_scaling_factor=1.0,
                   num_key_value_heads=heads)
        if arch == "deepseek_v2":
            cfg.update(q_lora_rank=None, topk_method="group_limited_greedy" if n_group > 1 else "greedy", norm_topk_prob=False)
        else:
            cfg.update(q_lora_rank=max(8, hidden_size // 2), norm_topk_prob=True, num_nextn_predict_layers=mtp_layers,
                       rope_interleave=True)
        if top_k > (experts // n_group) * cfg["topk_group"]:
            cfg["topk_group"] = n_group
    elif arch == "gpt_oss":
        cfg.update(model_type="gpt_oss", architectures=["GptOssForCausalLM"], num_local_experts=experts,
                   intermediate_size=intermediate_size, head_dim=head_dim, sliding_window=128,
                   layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)])
    return cfg


def _init_tensor(name: str, shape: torch.Size, gen: torch.Generator, hidden: int, std: float) -> torch.Tensor:
    if len(shape) == 1:
        if "norm" in name and name.endswith("weight"):
            return torch.ones(shape)
        if name.endswith("sinks"):
            return torch.zeros(shape)
        return torch.zeros(shape)  # biases, e_score_correction_bias
    is_router = name.endswith(("gate.weight", "router.weight")) and "shared_expert_gate" not in name and shape[-1] == hidden
    s = 1.0 / math.sqrt(hidden) if is_router else std
    return torch.randn(shape, generator=gen) * s


def _quant_setup(raw: dict, arch: str, quant: str, fp8_block: int, hidden: int, inter: int) -> QuantFormat | None:
    """Add ``quantization_config`` to ``raw`` for ``quant``; the format the weights are written in."""
    if quant == "none":
        return None
    if quant == "fp8":
        if fp8_block < 1:
            raise ConfigError(f"--fp8-block {fp8_block}: must be a positive block size such as 128")
        raw["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [fp8_block, fp8_block]}
        if arch == "qwen3_moe":  # as Qwen3-*-FP8 MoE configs list them
            n = int(raw["num_hidden_layers"])
            raw["quantization_config"]["modules_to_not_convert"] = ["lm_head"] + [
                f"model.layers.{i}.{m}" for i in range(n) for m in ("input_layernorm", "mlp.gate", "post_attention_layernorm")]
        return QuantFormat("fp8", (fp8_block, fp8_block))
    if quant == "mxfp4":
        if arch != "gpt_oss":
            raise ConfigError(f"--quant mxfp4 is GPT-OSS's format; use it with --arch gpt_oss (got {arch!r})")
        if hidden % 32 or inter % 32:
            raise ConfigError(f"--quant mxfp4: --hidden-size ({hidden}) and --intermediate-size ({inter}) "
                              "must be multiples of 32 (MXFP4 groups of 32 values)")
        raw["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
        return QuantFormat("mxfp4")
    raise ConfigError(f"--quant {quant!r}: choose none, fp8 or mxfp4")


def _quantize_layer(fmt: QuantFormat, adapter, layer_idx: int, disk: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One layer's on-disk tensors with the weights ``fmt`` quantizes replaced by their stored parts."""
    routers = set(adapter.router_keys(layer_idx))
    out: dict[str, torch.Tensor] = {}
    for key, t in disk.items():
        if fmt.method == "fp8":
            linear = (t.dim() == 2 and key.endswith(".weight") and key not in routers and "norm" not in key
                      and not key.endswith("shared_expert_gate.weight"))
        else:
            linear = key.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))
        if linear:
            out.update(fmt.quantize(key, t))
        else:
            out[key] = t
    return out


def synth_model(out_dir: str | Path, arch: str = "mixtral", *, layers: int = 4, hidden_size: int = 64,
                intermediate_size: int = 128, experts: int = 8, top_k: int = 2, seed: int = 0,
                shard_size: int | str = "2GB", dtype: str = "float32", vocab_size: int = VOCAB_SIZE,
                heads: int | None = None, mtp_layers: int = 0, overwrite: bool = False, quant: str = "none",
                fp8_block: int = 128) -> Path:
    """Write a random-init checkpoint of family ``arch`` to ``out_dir`` and return its path
    (``quant``: "none", "fp8" or "mxfp4", see the module docstring)."""
    from transformers import GenerationConfig

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise OutputError(f"{out}: directory exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    if experts < 2 or top_k < 1 or top_k > experts:
        raise ConfigError(f"--experts {experts} / --top-k {top_k}: need experts >= 2 and 1 <= top-k <= experts")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    tdtype = DTYPES[dtype]
    raw = family_config(arch, layers=layers, hidden_size=hidden_size, intermediate_size=intermediate_size,
                        experts=experts, top_k=top_k, vocab_size=vocab_size, heads=heads, dtype=dtype,
                        mtp_layers=mtp_layers)
    adapter = BY_FAMILY[arch]
    fmt = _quant_setup(raw, arch, quant, fp8_block, hidden_size, intermediate_size)
    out.mkdir(parents=True, exist_ok=True)
    skel = ModelSkeleton(raw, adapter)
    writer = ShardWriter(out, parse_size(shard_size))
    std = float(getattr(skel.config, "initializer_range", 0.02) or 0.02)
    moe = skel.moe_layers

    def layer_tensors(layer_idx: int, module) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + layer_idx + 1)
        state = {n: _init_tensor(n, p.shape, gen, hidden_size, std).to(tdtype)
                 for n, p in list(module.named_parameters()) + list(module.named_buffers())}
        disk = adapter.to_disk(layer_idx, state, layer_idx in moe)
        return disk if fmt is None else _quantize_layer(fmt, adapter, layer_idx, disk)

    for layer_idx in range(layers):
        writer.add_all(layer_tensors(layer_idx, skel.base.layers[layer_idx]))
    for j in range(mtp_layers):  # DeepSeek-V3 MTP: a decoder layer plus its projection and norms
        layer_idx = layers + j
        t = layer_tensors(layer_idx, skel.new_layer(layer_idx))
        gen = torch.Generator().manual_seed(seed * 7 + layer_idx)
        p = f"model.layers.{layer_idx}."
        t[p + "eh_proj.weight"] = (torch.randn(hidden_size, 2 * hidden_size, generator=gen) * std).to(tdtype)
        for n in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight"):
            t[p + n] = torch.ones(hidden_size, dtype=tdtype)
        writer.add_all(t)
    gen = torch.Generator().manual_seed(seed * 1_000_003)
    rest = {}
    for name, prm in skel.model.named_parameters():
        if ".layers." in name:
            continue
        rest[name] = _init_tensor(name, prm.shape, gen, hidden_size, std).to(tdtype)
    writer.add_all(rest)
    writer.finalize()
    (out / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    save_byte_tokenizer(out)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(str(out))
    log.info("wrote synthetic %s model to %s (%.1f MB)", arch, out, writer.total_bytes / 1e6)
    return out


# ---- checkpoints written by transformers' own save_pretrained ----------------------------------

# Small sizes applied to whichever of these keys a family's transformers config class has.
_TINY_COMMON = dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                    shared_expert_intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, max_position_embeddings=256, tie_word_embeddings=False,
                    bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
_MLA = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, head_dim=4, qk_nope_head_dim=4, v_head_dim=8)
_GROUPED = dict(n_group=2, topk_group=1, first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=1.0)
# Per family: what a tiny, valid config needs beyond _TINY_COMMON (data, not code). Expert count and
# top-k are set through the adapter's own keys.
TINY_OVERRIDES: dict[str, dict] = {
    "phimoe": dict(router_jitter_noise=0.0, input_jitter_noise=0.0),
    "deepseek_v2": {**_MLA, **_GROUPED, "q_lora_rank": None, "topk_method": "group_limited_greedy"},
    "deepseek_v3": {**_MLA, **_GROUPED},  # num_nextn_predict_layers keeps its default (1): no MTP tensors written
    "deepseek_v32": {**_MLA, **_GROUPED, "index_n_heads": 2, "index_head_dim": 8, "index_topk": 4},
    "glm4_moe": dict(_GROUPED),
    "glm4_moe_lite": {**_MLA, **_GROUPED},
    "dots1": dict(_GROUPED),
    "exaone_moe": dict(n_group=2, topk_group=1, mlp_layer_types=["dense", "sparse", "sparse"],
                       layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=8),
    "ernie4_5_moe": dict(moe_layer_start_index=1, moe_num_shared_experts=1),
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv"], num_dense_layers=1),
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention", "linear_attention"], linear_num_key_heads=2,
                       linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8),
    "minimax": dict(layer_types=["linear_attention", "full_attention", "linear_attention"]),
    "llama4_text": dict(moe_layers=[0, 1, 2], layer_types=["chunked_attention", "chunked_attention", "full_attention"],
                        no_rope_layers=[1, 1, 0], attention_chunk_size=4, intermediate_size_mlp=64),
    "afmoe": dict(num_dense_layers=1, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                  sliding_window=8, num_shared_experts=1),
    "jamba": dict(attn_layer_offset=1, attn_layer_period=2, expert_layer_offset=0, expert_layer_period=1,
                  mamba_d_state=4, mamba_dt_rank=4),
    "solar_open": dict(_GROUPED),
    "mimo_v2_flash": {**_GROUPED, "v_head_dim": 8, "mlp_layer_types": ["dense", "sparse", "sparse"],
                      "layer_types": ["full_attention", "sliding_attention", "full_attention"], "sliding_window": 8},
    "glm_moe_dsa": {**_MLA, **_GROUPED, "index_n_heads": 2, "index_head_dim": 8, "index_topk": 4, "qk_head_dim": 8,
                    "mlp_layer_types": ["dense", "sparse", "sparse"], "layer_types": ["indexed_attention"] * 3},
    "cohere2_moe": dict(layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=8,
                        mlp_layer_types=["sparse"] * 3),
    "qwen3_5_moe_text": dict(layer_types=["linear_attention", "full_attention", "linear_attention"], linear_num_key_heads=2,
                             linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8),
    "gpt_oss": dict(layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=8),
    "kimi_linear": {**_MLA, **_GROUPED, "q_lora_rank": None, "layer_types": ["linear_attention", "full_attention", "linear_attention"],
                    "mlp_layer_types": ["dense", "sparse", "sparse"], "linear_head_dim": 8, "linear_num_heads": 4},
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention", "linear_attention"], mamba_n_heads=8, mamba_d_head=8,
                             mamba_d_state=8, mamba_chunk_size=8, shared_intermediate_size=64),
}


def tiny_config_for_model_type(model_type: str, *, experts: int = 8, top_k: int = 2, **overrides):
    """A tiny transformers config for any ``model_type`` transformers knows (a family lowmoe may not
    support yet): _TINY_COMMON and ``experts``/``top_k`` on whichever of those keys its config class
    has (``adapters.ALL_EXPERT_COUNT_KEYS``, ``hf.TOP_K_KEYS``). ConfigError for a model_type transformers does not know."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ConfigError(f"model_type {model_type!r}: transformers does not know it")
    defaults = AutoConfig.for_model(model_type).to_dict()
    kw = {k: v for k, v in _TINY_COMMON.items() if k in defaults}
    kw.update({k: experts for k in ALL_EXPERT_COUNT_KEYS if k in defaults})
    kw.update({k: top_k for k in TOP_K_KEYS if k in defaults})
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def tiny_hf_config(family: str, *, experts: int = 8, top_k: int = 2, **overrides):
    """A tiny transformers config object for ``family``: _TINY_COMMON on the keys its config class
    has, TINY_OVERRIDES, the expert count on every expert-count key, top-k on the adapter's key."""
    from transformers import AutoConfig

    if family not in BY_FAMILY:
        raise ConfigError(f"family {family!r} is not supported; choose one of: {', '.join(supported_families())}")
    adapter = BY_FAMILY[family]
    model_type = adapter.model_types[0]
    defaults = AutoConfig.for_model(model_type).to_dict()
    kw = {k: v for k, v in _TINY_COMMON.items() if k in defaults}
    kw.update(TINY_OVERRIDES.get(family, {}))
    for key in adapter.expert_count_keys:
        kw[key] = experts
    kw[adapter.top_k_key] = top_k
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


@torch.no_grad()
def save_pretrained_model(out_dir: str | Path, family: str, *, seed: int = 0, experts: int = 8, top_k: int = 2,
                          **overrides) -> Path:
    """A tiny random ``family`` model built by transformers (``from_config``) and written by its own
    ``save_pretrained`` (plus lowmoe's byte tokenizer): the on-disk layout exactly as transformers
    writes it. Router rows get std 1/sqrt(hidden) so routing is far from uniform; per-expert router
    biases are randomised so that dropping experts is visible in them."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    cfg = tiny_hf_config(family, experts=experts, top_k=top_k, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    adapter = BY_FAMILY[family]
    hidden = int(cfg.hidden_size)
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 1 and p.shape[0] == experts and (".experts." in name or "router" in name or ".gate." in name):
            if p.dim() == 2 and p.shape[-1] == hidden and "experts." not in name:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(hidden))
            elif p.dim() >= 2 and p.abs().sum() == 0:  # experts left at zero by some inits
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    for name, b in list(model.named_buffers()) + list(model.named_parameters()):
        if name.endswith(("e_score_correction_bias", "expert_bias")) and b.shape[-1] == experts:
            b.copy_(torch.rand(b.shape, generator=gen) * 0.1)
    model.save_pretrained(str(out))
    save_byte_tokenizer(out)
    log.info("wrote %s model (transformers save_pretrained, %s layout) to %s", family, adapter.expert_layout, out)
    return out
