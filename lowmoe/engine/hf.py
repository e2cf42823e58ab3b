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

from ..errors import UnsupportedModelError
from .adapters import Adapter
from .device import cpu_runtime_defaults

log = logging.getLogger(__name__)


def hf_config(raw: dict, num_experts: int | None = None, top_k: int | None = None, adapter: Adapter | None = None):
    """A transformers config object from a parsed config.json (optionally with other expert counts)."""
    from transformers import AutoConfig

    raw = dict(raw)
    if adapter is not None and num_experts is not None:
        for k in adapter.expert_count_keys:
            if k in raw or k == adapter.expert_count_keys[0]:
                raw[k] = num_experts
    if adapter is not None and top_k is not None:
        raw[adapter.top_k_key] = top_k
    model_type = raw.pop("model_type")
    raw.pop("transformers_version", None)
    cfg = AutoConfig.for_model(model_type, **raw)
    # Eager experts: the per-expert loop is what the probes and expert_output() rely on, and it is
    # what from_pretrained uses on CPU. Attention keeps transformers' default for the family.
    cfg._experts_implementation = "eager"
    return cfg


class ModelSkeleton:
    """The model built on the meta device: module classes and shapes, no weights."""

    def __init__(self, raw_config: dict, adapter: Adapter):
        from transformers import AutoModelForCausalLM

        cpu_runtime_defaults()  # before torch first computes a layer
        self.raw = raw_config
        self.adapter = adapter
        self.config = hf_config(raw_config)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.config)
        self.config = self.model.config  # now carries the attention implementation chosen by transformers
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

    cfg = hf_config(skel.raw, num_experts=num_experts, top_k=top_k, adapter=skel.adapter)
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
    cfg = hf_config(skel.raw, num_experts=num_experts, top_k=top_k, adapter=skel.adapter)
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
    router: nn.Module | None = None
    router_scoring: str = "softmax"


def moe_modules(adapter: Adapter, layer: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    block = layer.get_submodule(adapter.runtime_moe_prefix.rstrip("."))
    return block, getattr(block, adapter.runtime_router), block.experts


class MoeProbe:
    """Context manager: calls ``callback(MoeCall)`` for every forward of the layer's MoE block."""

    def __init__(self, adapter: Adapter, layer: nn.Module, callback: Callable[[MoeCall], None],
                 token_mask: torch.Tensor | None = None, token_domain: torch.Tensor | None = None):
        self.adapter, self.layer, self.callback = adapter, layer, callback
        self._tokens = (token_mask, token_domain)
        # per thread: the chunks of an experts-major wave (``experts.run_wave``) go through the layer
        # on threads of their own, each inside its own router and experts calls at once
        self._local = threading.local()
        self._handles = []
        self._patched = None

    def chunk_tokens(self, token_mask: torch.Tensor | None, token_domain: torch.Tensor | None) -> None:
        """The token mask and domains of the chunk the calling thread runs (default: the constructor's)."""
        self._local.tokens = (token_mask, token_domain)

    @property
    def token_mask(self):
        return getattr(self._local, "tokens", self._tokens)[0]

    @property
    def token_domain(self):
        return getattr(self._local, "tokens", self._tokens)[1]

    @property
    def _router_out(self):
        return getattr(self._local, "router_out", None)

    @_router_out.setter
    def _router_out(self, v):
        self._local.router_out = v

    @property
    def _slot_outputs(self):
        return getattr(self._local, "slot_outputs", None)

    @_slot_outputs.setter
    def _slot_outputs(self, v):
        self._local.slot_outputs = v

    def __enter__(self):
        if not self.adapter.probes:
            raise UnsupportedModelError(
                f"{self.adapter.family}: transformers' MoE block of this family does not route tokens through "
                "experts(hidden, top_k_index, top_k_weights), so calibration scoring cannot observe it; "
                "prune it with --plan FILE (explicit keep lists) instead")
        _, router, experts = moe_modules(self.adapter, self.layer)

        def on_router(mod, args, out):
            self._router_out = out

        def on_experts(mod, args, out):
            hidden, idx, w = args[0], args[1], args[2]
            logits = self._router_out[0]
            slots, self._slot_outputs = self._slot_outputs, None
            self.callback(MoeCall(logits.reshape(-1, logits.shape[-1]).float(), idx.reshape(-1, idx.shape[-1]),
                                  w.reshape(-1, w.shape[-1]).float(), hidden, out, mod,
                                  None if self.token_mask is None else self.token_mask.reshape(-1),
                                  expert_outputs=slots,
                                  token_domain=None if self.token_domain is None else self.token_domain.reshape(-1),
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
                self._slot_outputs = slots
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
