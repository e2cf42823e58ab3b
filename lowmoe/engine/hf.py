"""One decoder layer at a time, computed by transformers' own classes.

lowmoe never re-implements attention, rotary embeddings, masks or routers. ``ModelSkeleton``
builds the family's ``*ForCausalLM`` on the ``meta`` device from config.json (no memory), which
gives the decoder-layer, rotary-embedding, norm and embedding classes. ``materialize_layer``
builds one real decoder layer from that layer's tensors; ``LayerInputs`` carries the rotary
embeddings and causal masks shared by every layer for one token batch.

``MoeProbe`` hooks a layer's MoE block: the router's (logits, top-k weights, top-k index) and the
experts module's input and (weighted, routed) output, per forward call. ``expert_output`` runs a
single expert through transformers' experts module on chosen tokens (unweighted f_e(x)).
"""

from __future__ import annotations

import copy
import inspect
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from .adapters import ALL_EXPERT_COUNT_KEYS, Adapter
from .device import cpu_runtime_defaults

log = logging.getLogger(__name__)


# How a layer's routed experts are computed (``--experts-impl``): transformers' per-expert loop
# ("eager") or its grouped GEMM ("grouped": ``grouped_mm``, what ``from_pretrained`` runs by default
# for every family whose experts class supports it). "auto": grouped on a CUDA device, where the
# eager loop's host synchronisations (about five per expert hit, per call) hold the GPU back, eager on
# the CPU (as fast there, and byte-identical to earlier lowmoe outputs). docs/gpu.md.
EXPERTS_IMPLS = ("auto", "eager", "grouped")


def check_experts_impl(requested: str) -> None:
    """ConfigError naming ``--experts-impl`` unless ``requested`` is one of ``EXPERTS_IMPLS``."""
    if requested not in EXPERTS_IMPLS:
        raise ConfigError(f"--experts-impl {requested!r}: choose one of {', '.join(EXPERTS_IMPLS)}")


def resolve_experts_impl(requested: str, device) -> str:
    """``requested`` (one of ``EXPERTS_IMPLS``) on ``device``: "eager" or "grouped"."""
    if requested not in EXPERTS_IMPLS:
        raise ValueError(f"experts implementation {requested!r}: choose one of {', '.join(EXPERTS_IMPLS)}")
    if requested == "auto":
        return "grouped" if torch.device(device).type == "cuda" else "eager"
    return requested


def hf_config(raw: dict, num_experts: int | None = None, top_k: int | None = None, adapter: Adapter | None = None,
              experts: str | None = "eager"):
    """A transformers config object from a parsed config.json (optionally with other expert counts).
    ``experts``: the experts implementation as transformers names it ("eager", "grouped_mm"), or None
    for transformers' own choice when a model is built from the config (``ModelSkeleton``)."""
    from transformers import AutoConfig, configuration_utils

    # transformers writes floats JSON cannot hold as {"__float__": "Infinity"} (GraniteMoeHybrid's
    # time_step_limit) and decodes them when it loads a config; so must a config.json read by hand
    cfg_cls = getattr(configuration_utils, "PreTrainedConfig", None) or configuration_utils.PretrainedConfig
    decode = getattr(cfg_cls, "_decode_special_floats", None)
    raw = dict(decode(raw) if decode is not None else raw)
    if adapter is not None and num_experts is not None:
        for k in adapter.expert_count_keys:
            if k in raw or k == adapter.expert_count_keys[0]:
                raw[k] = num_experts
    if adapter is not None and top_k is not None:
        raw[adapter.top_k_key] = top_k
    model_type = raw.pop("model_type")
    raw.pop("transformers_version", None)
    cfg = AutoConfig.for_model(model_type, **raw)
    # Attention keeps transformers' default for the family; the experts are computed as asked.
    cfg._experts_implementation = experts
    return cfg


class ModelSkeleton:
    """The model built on the meta device: module classes and shapes, no weights."""

    def __init__(self, raw_config: dict, adapter: Adapter, experts: str = "eager"):
        """``experts``: "eager" or "grouped" (``resolve_experts_impl``). Grouped is transformers'
        default (None in the config): its grouped GEMM where the family's experts class supports it,
        else the eager loop; ``experts_impl`` says which the layers run."""
        from transformers import AutoModelForCausalLM

        cpu_runtime_defaults()  # before torch first computes a layer
        self.raw = raw_config
        self.adapter = adapter
        self.config = hf_config(raw_config, experts="eager" if experts == "eager" else None)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.config)
        # now carries the attention and experts implementations chosen by transformers
        self.config = self.model.config
        self.experts_impl = "eager" if self.config._experts_implementation in (None, "eager") else "grouped"
        self.base = self.model.model
        self.layer_cls = type(self.base.layers[0])
        # MoE layers as transformers builds them: those whose MoE block holds a router
        self.moe_layers = set(adapter.moe_layers(raw_config, present=self._has_router))

    def _has_router(self, layer_idx: int) -> bool:
        try:
            block = self.base.layers[layer_idx].get_submodule(self.adapter.runtime_moe_prefix.rstrip("."))
        except AttributeError:
            return False
        return hasattr(block, self.adapter.runtime_router) and hasattr(block, "experts")

    def layer_types(self) -> list[str] | None:
        return getattr(self.config, "layer_types", None)

    def new_layer(self, layer_idx: int, config=None) -> nn.Module:
        # a layer's own class: hybrid models (Jamba) mix attention and Mamba decoder-layer classes
        cls = type(self.base.layers[layer_idx]) if layer_idx < len(self.base.layers) else self.layer_cls
        with torch.device("meta"):
            return cls(config or self.config, layer_idx)

    def rotary(self, device) -> nn.Module | None:
        """The model's rotary-embedding module (``rotary_emb`` in most families, ``pos_emb`` in LFM2);
        None for models without one (Jamba)."""
        rot = next((m for n, m in self.base.named_children() if type(m).__name__.endswith("RotaryEmbedding")), None)
        if rot is None:
            return None
        rot_cls = type(rot)
        return rot_cls(self.config, device=device) if "device" in rot_cls.__init__.__code__.co_varnames else rot_cls(self.config).to(device)


def whole_model(skel: ModelSkeleton, state: dict[str, torch.Tensor], device, dtype, *, num_experts: int | None = None,
                top_k: int | None = None) -> nn.Module:
    """The family's ``*ForCausalLM`` with ``num_experts`` experts and ``top_k``, filled with ``state``
    (runtime names, every key), in ``dtype`` on ``device`` (``e_score_correction_bias`` stays fp32)."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config(skel.raw, num_experts=num_experts, top_k=top_k, adapter=skel.adapter,
                    experts=skel.config._experts_implementation)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    state = dict(state)
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    state = {k: v.to(device, dtype) if not k.endswith("e_score_correction_bias") else v.to(device) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.model.rotary_emb = skel.rotary(device)  # its non-persistent buffers were on meta
    return model.eval()


def materialize(module: nn.Module, state: dict[str, torch.Tensor], device, dtype) -> nn.Module:
    """Fill a meta-device module with ``state`` (every key must match), cast to ``dtype``."""
    module = module.to_empty(device=device)
    keep_fp32 = {k for k in state if k.endswith("e_score_correction_bias")}
    state = {k: (v.to(device=device) if k in keep_fp32 else v.to(device=device, dtype=dtype)) for k, v in state.items()}
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"layer tensors do not fit the {type(module).__name__} module: missing {missing[:5]}, unexpected {unexpected[:5]}")
    # Non-persistent buffers (none in current MoE layers, but be safe) keep their meta value otherwise.
    for name, buf in list(module.named_buffers()):
        if buf.is_meta:
            raise RuntimeError(f"{type(module).__name__}: buffer {name} was not provided")
    return module.eval()


def layer_config(skel: ModelSkeleton, num_experts: int | None = None, top_k: int | None = None):
    """The transformers config of a decoder layer with ``num_experts`` routed experts and ``top_k``
    (None for both: the skeleton's own, ``None`` returned)."""
    if num_experts is None and top_k is None:
        return None
    cfg = hf_config(skel.raw, num_experts=num_experts, top_k=top_k, adapter=skel.adapter,
                    experts=skel.config._experts_implementation)
    # same attention kernel as the skeleton: LayerInputs builds masks for it (sdpa's mask may be
    # None = "causal"; an eager layer given None would attend to every position)
    cfg._attn_implementation = skel.config._attn_implementation
    return cfg


def materialize_layer(skel: ModelSkeleton, layer_idx: int, runtime_state: dict[str, torch.Tensor], device, dtype,
                      num_experts: int | None = None, top_k: int | None = None) -> nn.Module:
    return materialize(skel.new_layer(layer_idx, layer_config(skel, num_experts, top_k)), runtime_state, device, dtype)


def split_experts(adapter: Adapter, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A decoder layer's runtime state split into its routed experts (experts-module parameter name ->
    (E, ...) tensor) and everything else (attention, norms, router, shared experts; full names)."""
    prefix = adapter.runtime_moe_prefix + "experts."
    experts = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    rest = {k: v for k, v in state.items() if not k.startswith(prefix)}
    return experts, rest


@dataclass
class LayerInputs:
    """What every decoder layer needs besides hidden states, for one (batch, seq) token block."""

    position_ids: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | dict | None  # dict: per layer type
    masks: dict[str, object] = field(default_factory=dict)

    @classmethod
    def build(cls, skel: ModelSkeleton, hidden: torch.Tensor, rotary: nn.Module) -> "LayerInputs":
        b, s, _ = hidden.shape
        pos = torch.arange(s, device=hidden.device).unsqueeze(0).expand(b, -1)
        if rotary is None:
            pe = None
        elif "layer_type" in inspect.signature(rotary.forward).parameters:  # one rotary table per layer type (MiMo-V2)
            pe = {t: rotary(hidden, pos, t) for t in sorted(set(skel.layer_types() or []))}
        else:
            pe = rotary(hidden, pos)
        types = set(skel.layer_types() or []) | {"full_attention"}
        masks = {t: _mask(t, skel.config, hidden, pos) for t in sorted(types)}
        return cls(pos, pe, masks)

    def mask_for(self, skel: ModelSkeleton, layer_idx: int):
        types = skel.layer_types()
        return self.masks[types[layer_idx] if types else "full_attention"]

    def rotary_for(self, skel: ModelSkeleton, layer_idx: int):
        if isinstance(self.position_embeddings, dict):
            return self.position_embeddings[skel.layer_types()[layer_idx]]
        return self.position_embeddings


class LayerInputsCache:
    """``LayerInputs`` per (batch, seq) shape of the hidden states, built once each, with one rotary
    module on ``device``: ``inputs_for(hidden)``."""

    def __init__(self, skel: ModelSkeleton, device):
        self.skel, self.rotary = skel, skel.rotary(device)
        self._by_shape: dict[tuple, LayerInputs] = {}

    def __call__(self, hidden: torch.Tensor) -> LayerInputs:
        key = tuple(hidden.shape[:2])
        if key not in self._by_shape:
            self._by_shape[key] = LayerInputs.build(self.skel, hidden, self.rotary)
        return self._by_shape[key]


def run_layer(skel: ModelSkeleton, layer: nn.Module, layer_idx: int, hidden: torch.Tensor, inputs: LayerInputs) -> torch.Tensor:
    # No cache argument at all: its name changed (past_key_values in 5.20 -> cache in 5.24) and
    # both default to None, which is what a full-sequence forward without a KV cache wants.
    out = layer(hidden, attention_mask=inputs.mask_for(skel, layer_idx), position_ids=inputs.position_ids,
                position_embeddings=inputs.rotary_for(skel, layer_idx), use_cache=False)
    return out[0] if isinstance(out, tuple) else out


# transformers' mask builder per layer type (masking_utils); recurrent layers (linear attention,
# short convolutions, Mamba) take a padding-only mask, None without padding.
_MASK_BUILDERS = {"full_attention": ("create_causal_mask", {}),
                  "sliding_attention": ("create_sliding_window_causal_mask", {}),
                  "chunked_attention": ("create_chunked_causal_mask", {}),
                  # DeepSeek-V3.2: the sparse-attention indexer needs the explicit mask
                  "indexed_attention": ("create_causal_mask", {"allow_is_causal_skip": False})}


def _mask(layer_type: str, config, hidden: torch.Tensor, pos: torch.Tensor):
    """The attention mask transformers' model forward builds for ``layer_type`` (no padding, no cache),
    through masking_utils' keyword names as installed (``cache`` in 5.24, ``past_key_values`` in 5.20)."""
    from transformers import masking_utils

    name, extra = _MASK_BUILDERS.get(layer_type, (None, {}))
    if name is None:
        return None
    fn = getattr(masking_utils, name)
    params = inspect.signature(fn).parameters
    kw = dict(config=config, attention_mask=None, position_ids=pos, **{k: v for k, v in extra.items() if k in params})
    kw["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = hidden
    kw["cache" if "cache" in params else "past_key_values"] = None
    if "cache_position" in params:
        kw["cache_position"] = torch.arange(hidden.shape[1], device=hidden.device)
    return fn(**kw)


# ---- probing the MoE block ------------------------------------------------------------------


@dataclass
class MoeCall:
    """One forward call of a MoE block, flattened over tokens.

    router_logits: (T, E) float32   -- raw router logits (pre-softmax / pre-sigmoid, router bias included)
    top_k_index:   (T, k) long       -- experts chosen by transformers' router
    top_k_weights: (T, k) float32    -- their weights as the experts module applies them
    moe_input:     (T, H)            -- hidden states entering the experts (after the post-attn norm)
    routed_output: (T, H)            -- Σ_k weight · expert output (before any shared expert is added)
    expert_outputs: (T, k, H) | None -- unweighted f_e(x_t) of each top-k slot (only when the callback
                                        sets ``needs_expert_outputs``; computed at no extra expert cost)
    token_domain:  (T,) long | None  -- calibration domain of each token (index into CalibTokens.domains)
    num_domains:   int | None        -- how many domains there are (None: not known without reading token_domain)
    router_scoring: "softmax" or "sigmoid" -- how the router turns logits into scores (adapter data)
    """

    router_logits: torch.Tensor
    top_k_index: torch.Tensor
    top_k_weights: torch.Tensor
    moe_input: torch.Tensor
    routed_output: torch.Tensor
    experts: nn.Module
    token_mask: torch.Tensor | None = None  # (T,) bool: tokens that count in statistics
    expert_outputs: torch.Tensor | None = None
    token_domain: torch.Tensor | None = None
    num_domains: int | None = None
    router: nn.Module | None = None
    router_scoring: str = "softmax"


def moe_modules(adapter: Adapter, layer: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    block = layer.get_submodule(adapter.runtime_moe_prefix.rstrip("."))
    return block, getattr(block, adapter.runtime_router), block.experts


class MoeProbe:
    """Context manager: calls ``callback(MoeCall)`` for every forward of the layer's MoE block."""

    def __init__(self, adapter: Adapter, layer: nn.Module, callback: Callable[[MoeCall], None],
                 token_mask: torch.Tensor | None = None, token_domain: torch.Tensor | None = None,
                 num_domains: int | None = None):
        self.adapter, self.layer, self.callback = adapter, layer, callback
        self._tokens = (token_mask, token_domain)
        self.num_domains = num_domains
        # per thread (.tokens, .router_out, .slot_outputs): the chunks of an experts-major wave
        # (``experts.run_wave``) go through the layer on threads of their own, each inside its own
        # router and experts calls at once
        self._local = threading.local()
        self._handles = []
        self._patched = None

    def chunk_tokens(self, token_mask: torch.Tensor | None, token_domain: torch.Tensor | None) -> None:
        """The token mask and domains of the chunk the calling thread runs (default: the constructor's)."""
        self._local.tokens = (token_mask, token_domain)

    def __enter__(self):
        if not self.adapter.probes:
            raise UnsupportedModelError(
                f"{self.adapter.family}: transformers' MoE block of this family does not route tokens through "
                "experts(hidden, top_k_index, top_k_weights), so calibration scoring cannot observe it; "
                "prune it with --plan FILE (explicit keep lists) instead")
        _, router, experts = moe_modules(self.adapter, self.layer)

        local = self._local

        def on_router(mod, args, out):
            local.router_out = out

        def on_experts(mod, args, out):
            hidden, idx, w = args[0], args[1], args[2]
            logits = local.router_out[0]
            slots, local.slot_outputs = getattr(local, "slot_outputs", None), None
            mask, dom = getattr(local, "tokens", self._tokens)
            self.callback(MoeCall(logits.reshape(-1, logits.shape[-1]).float(), idx.reshape(-1, idx.shape[-1]),
                                  w.reshape(-1, w.shape[-1]).float(), hidden, out, mod,
                                  None if mask is None else mask.reshape(-1),
                                  expert_outputs=slots,
                                  token_domain=None if dom is None else dom.reshape(-1),
                                  num_domains=self.num_domains if dom is not None else None,
                                  router=router, router_scoring=getattr(self.adapter, "router_scoring", "softmax")))

        if getattr(self.callback, "needs_expert_outputs", False):
            # Run transformers' experts module once on one row per (token, top-k slot) with unit
            # weights: the same expert work as the normal call (each token still visits only its k
            # experts, in one loop over experts), but it yields every slot's unweighted output f_e(x)
            # (T, k, H), which REAP / EASY-EP / super-expert detection need. The weighted sum over
            # slots then replaces the module's own weighted index_add.
            orig = experts.forward

            def forward(hidden_states, top_k_index, top_k_weights, *rest, **kw):
                t, k = top_k_index.shape
                rows = hidden_states.repeat_interleave(k, dim=0)  # (T·k, H)
                ones = torch.ones((t * k, 1), dtype=top_k_weights.dtype, device=top_k_weights.device)
                slots = orig(rows, top_k_index.reshape(t * k, 1), ones, *rest, **kw).view(t, k, -1)  # (T, k, H)
                local.slot_outputs = slots
                return (slots.float() * top_k_weights.float().unsqueeze(-1)).sum(-2).to(hidden_states.dtype)

            experts.forward = forward
            self._patched = experts
        self._handles = [router.register_forward_hook(on_router), experts.register_forward_hook(on_experts)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._patched is not None:
            del self._patched.forward  # back to the class's forward
            self._patched = None


def experts_forward(template: nn.Module) -> Callable:
    """The experts class's own ``forward(module, hidden, top_k_index, top_k_weights)`` (unbound), which
    ``experts.RoutedExperts`` runs per expert on modules holding other weights."""
    return type(template).forward


def experts_run_grouped(module: nn.Module) -> bool:
    """Whether transformers' experts ``module`` computes its experts with a grouped GEMM (its class
    dispatches on ``config._experts_implementation`` and that is not "eager"): its output is then each
    (token, top-k slot)'s weighted expert output summed over the slots, not ``index_add_``-ed per expert."""
    dispatches = hasattr(type(module).forward, "__wrapped__")  # transformers' use_experts_implementation
    impl = getattr(getattr(module, "config", None), "_experts_implementation", None)
    return dispatches and impl not in (None, "eager")


def experts_subset(template: nn.Module, params: dict[str, torch.Tensor], num_experts: int) -> nn.Module:
    """A shallow copy of transformers' experts module ``template`` (same class, config and activation)
    holding ``params`` (parameter name -> (num_experts, ...) tensor) instead of its own parameters."""
    sub = copy.copy(template)
    sub._parameters = {n: nn.Parameter(t, requires_grad=False) for n, t in params.items()}
    sub.num_experts = num_experts
    return sub


@torch.no_grad()
def expert_output(experts: nn.Module, hidden: torch.Tensor, expert_idx: int) -> torch.Tensor:
    """f_e(x) for the rows of ``hidden`` (T, H): one expert, unweighted, via transformers' own module."""
    idx = torch.full((hidden.shape[0], 1), expert_idx, dtype=torch.long, device=hidden.device)
    w = torch.ones((hidden.shape[0], 1), dtype=hidden.dtype, device=hidden.device)
    return experts(hidden, idx, w)


def clone_config(cfg):
    return copy.deepcopy(cfg)


# ---- a family's layout, derived from transformers ----------------------------------------------

# Config keys transformers' MoE config classes use for top-k (for the expert count: ALL_EXPERT_COUNT_KEYS).
TOP_K_KEYS = ("num_experts_per_tok", "moe_k", "moe_topk", "top_k", "moe_top_k", "num_experts_per_token")


@dataclass
class DerivedLayout:
    """What transformers itself says about a MoE family: its config class's expert-count and top-k
    keys, its causal-LM class, the MoE block and router in the module tree it builds, and -- from the
    weight conversion its ``save_pretrained`` applies (``revert_weight_conversion``) -- one MoE layer's
    on-disk tensors. ``runtime``/``disk``: that layer's state dict (full keys, small real tensors of
    the config's shapes) and what ``save_pretrained`` writes for it. ``fields()``: the
    ``adapters.Adapter`` fields this gives; ``missing``: fields it could not derive, with why."""

    model_type: str
    architectures: tuple[str, ...] = ()
    expert_count_keys: tuple[str, ...] = ()
    top_k_keys: tuple[str, ...] = ()
    grouped_routing: bool = False
    moe_layers: tuple[int, ...] = ()
    layer: int = -1
    num_experts: int = 0
    runtime_moe_prefix: str = ""
    runtime_router: str = ""
    runtime: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    disk: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    runtime_of: dict[str, str] = field(default_factory=dict, repr=False)  # on-disk key -> runtime key it holds
    model: nn.Module | None = field(default=None, repr=False)  # built on the meta device
    # every decoder layer's tensors outside the MoE block renamed on disk (disk, runtime) and
    # concatenated on load ((disk pieces in order), runtime, dim), relative to the layer
    layer_renames: tuple[tuple[str, str], ...] = ()
    layer_concats: tuple[tuple[tuple[str, ...], str, int], ...] = ()
    expert_keys: tuple[str, ...] = ()  # on-disk keys of the layer's routed experts
    router_keys: tuple[str, ...] = ()  # on-disk keys of its per-expert routing tensors
    missing: dict[str, str] = field(default_factory=dict)

    def fields(self) -> dict:
        """``adapters.Adapter`` keyword arguments for this family (those derivable: see ``missing``)."""
        lp = f"model.layers.{self.layer}."
        rel = lambda k: k[len(lp):]  # noqa: E731
        runtime_of = self.runtime_of
        moe_keys = [rel(k) for k in self.expert_keys + self.router_keys]
        moe_prefix = _common_prefix(moe_keys)
        out: dict = {"model_types": (self.model_type,), "architectures": self.architectures,
                     "expert_count_keys": self.expert_count_keys, "moe_prefix": moe_prefix,
                     "runtime_moe_prefix": self.runtime_moe_prefix, "runtime_router": self.runtime_router,
                     "grouped_routing": self.grouped_routing}
        if self.top_k_keys:
            out["top_k_key"] = self.top_k_keys[0]
        # router: the disk name of the runtime router (its tensors' disk keys minus their runtime names)
        rt_router = self.runtime_moe_prefix + self.runtime_router + "."
        router, tensors, extra, renames = None, [], [], []
        for k in self.router_keys:
            d, r = rel(k)[len(moe_prefix):], rel(runtime_of[k])
            if r.startswith(rt_router) and d.endswith("." + r[len(rt_router):]):
                name = r[len(rt_router):]
                router = router or d[: -len(name) - 1]
                if d == router + "." + name:
                    tensors.append(name)
                    continue
            extra.append(d)
            if r[len(self.runtime_moe_prefix):] != d:
                renames.append((d, r[len(self.runtime_moe_prefix):]))
        out.update(router=router or self.runtime_router, router_tensors=tuple(tensors), router_extra=tuple(extra))
        per_expert = [k for k in self.expert_keys if ".experts.0." in k]
        if per_expert:
            # (gate, up, down): the halves of gate_up_proj were marked 1 and 2, down_proj 3
            by_mark = {int(self.disk[k].flatten()[0].item()): rel(k)[len(moe_prefix + "experts.0."):].removesuffix(".weight")
                       for k in per_expert}
            out.update(expert_layout="per_expert", expert_projs=(by_mark.get(1), by_mark.get(2), by_mark.get(3)))
        else:
            names = [rel(k)[len(moe_prefix):] for k in self.expert_keys]
            fused_dir = "experts." if all(n.startswith("experts.") for n in names) else ""
            out.update(expert_layout="fused", fused_dir=fused_dir, fused_tensors=tuple(n[len(fused_dir):] for n in names))
            for k, n in zip(self.expert_keys, names):
                r = rel(runtime_of[k])[len(self.runtime_moe_prefix):]
                if r != n:
                    renames.append((n, r))
        moe_disk = set(self.expert_keys) | set(self.router_keys)
        for d, r in runtime_of.items():  # other tensors of the block renamed on disk (hy_v3's shared_mlp)
            if d not in moe_disk and rel(d).startswith(moe_prefix) and rel(r).startswith(self.runtime_moe_prefix):
                dn, rn = rel(d)[len(moe_prefix):], rel(r)[len(self.runtime_moe_prefix):]
                if dn != rn:
                    renames.append((dn, rn))
        out["moe_renames"] = tuple(renames)
        out["layer_renames"] = self.layer_renames
        out["layer_concats"] = self.layer_concats
        return out


def _common_prefix(keys: list[str]) -> str:
    """The longest dotted prefix (ending in ".") all ``keys`` share."""
    parts = [k.split(".") for k in keys]
    n = 0
    while all(len(p) > n + 1 and p[n] == parts[0][n] for p in parts):
        n += 1
    return "".join(p + "." for p in parts[0][:n])


def _disk_to_runtime(d: DerivedLayout) -> dict[str, str]:
    """On-disk key -> the runtime key it holds (a per-expert tensor: its fused runtime tensor), matched
    through ``revert_weight_conversion`` one runtime tensor at a time."""
    from transformers.core_model_loading import revert_weight_conversion

    out = {}
    for k, v in d.runtime.items():
        for dk in revert_weight_conversion(d.model, {k: v}):
            out[dk] = k
    return out


def derive_layout(config) -> DerivedLayout:
    """``DerivedLayout`` of ``config``'s family (a transformers config object; small sizes keep the
    tensors of one layer tiny). Nothing is read from disk: the model is built on the meta device and
    one MoE layer's state dict is made of small real tensors, then reverted to the on-disk layout."""
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    d = DerivedLayout(config.model_type)
    arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    d.architectures = (arch,) if arch else ()
    if not arch:
        d.missing["architectures"] = "transformers has no *ForCausalLM class for this model_type"
        return d
    raw = config.to_dict()
    d.top_k_keys = tuple(k for k in TOP_K_KEYS if k in raw)
    aliases = getattr(config, "attribute_map", {}) or {}  # e.g. qwen3_moe: num_experts -> num_local_experts
    d.grouped_routing = all(k in raw or aliases.get(k) in raw for k in ("n_group", "topk_group"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    d.model = model
    found = []
    for i, layer in enumerate(model.model.layers):
        block = next(((n, m) for n, m in layer.named_modules() if n and isinstance(getattr(m, "experts", None), nn.Module)), None)
        if block is not None:
            found.append((i, *block))
    if not found:
        d.missing["moe"] = "no decoder layer has a module with an `experts` child"
        return d
    d.moe_layers = tuple(i for i, *_ in found)
    d.layer, name, block = found[0]
    d.runtime_moe_prefix = name + "."
    hidden = int(config.hidden_size)
    # the router: the block's child (not experts, not a shared expert) holding an (E, hidden) weight
    for cname, child in block.named_children():
        if cname == "experts" or "shared" in cname:
            continue
        w = next((p for p in child.parameters() if p.dim() == 2 and p.shape[-1] == hidden), None)
        if w is not None:
            d.runtime_router, d.num_experts = cname, int(w.shape[0])
            break
    if not d.runtime_router:
        d.missing["router"] = f"{type(block).__name__} has no child with an (experts, hidden) weight"
        return d
    stored = [k for k in ALL_EXPERT_COUNT_KEYS if raw.get(k) == d.num_experts]
    d.expert_count_keys = tuple(stored + [k for k in ALL_EXPERT_COUNT_KEYS if k not in stored and aliases.get(k) in stored])
    lp = f"model.layers.{d.layer}."
    bp = lp + d.runtime_moe_prefix
    state = model.state_dict()
    for k, v in state.items():
        if not k.startswith(lp):
            continue
        if k == bp + "experts.gate_up_proj" and v.dim() == 3:  # mark the gate and up halves: 1, 2
            half = v.shape[1] // 2
            t = torch.full(tuple(v.shape), 2.0)
            t[:, :half] = 1.0
        elif k == bp + "experts.down_proj":
            t = torch.full(tuple(v.shape), 3.0)
        else:  # distinct values, increasing: a tensor concatenated on load shows its pieces' order
            t = torch.arange(v.numel(), dtype=torch.float32).reshape(tuple(v.shape)) / max(1, v.numel())
            t = t.to(v.dtype if v.dtype.is_floating_point else torch.float32)
        d.runtime[k] = t
    d.disk = revert_weight_conversion(model, dict(d.runtime))
    renames: dict[str, str] = {}
    concats: dict[str, tuple[tuple[str, ...], int]] = {}
    for i in range(len(model.model.layers)):  # hybrid models rename tensors of some layer types only
        lpi = f"model.layers.{i}."
        for k, v in state.items():
            r = k[len(lpi):]
            if not k.startswith(lpi) or r.startswith(d.runtime_moe_prefix):
                continue
            t = torch.arange(v.numel(), dtype=torch.float32).reshape(tuple(v.shape))
            back = revert_weight_conversion(model, {k: t})
            if len(back) > 1:  # concatenated on load: pieces in order (increasing values), on the dim that grew
                ds = sorted(back, key=lambda x: back[x].flatten()[0].item())
                dim = next(j for j, (a, b) in enumerate(zip(back[ds[0]].shape, v.shape)) if a != b)
                concats[r] = (tuple(x[len(lpi):] for x in ds), dim)
            elif next(iter(back)) != k:
                renames[next(iter(back))[len(lpi):]] = r
    d.layer_renames = tuple(renames.items())
    d.layer_concats = tuple((pieces, r, dim) for r, (pieces, dim) in concats.items())
    runtime_of = d.runtime_of = _disk_to_runtime(d)
    E = d.num_experts
    # in the module's parameter order (revert_weight_conversion sorts its output)
    d.expert_keys = tuple(k for k in runtime_of if runtime_of[k].startswith(bp + "experts."))
    d.router_keys = tuple(k for k in runtime_of if runtime_of[k].startswith(bp) and not runtime_of[k].startswith(bp + "experts.")
                          and "shared" not in runtime_of[k][len(bp):] and E in d.runtime[runtime_of[k]].shape)
    return d
