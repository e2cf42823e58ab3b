"""The plan: which experts survive in each MoE layer, and how they are merged.

A plan is the central artefact: scoring produces one, applying one produces a checkpoint, and
``lowmoe prune --plan plan.json`` re-applies a saved plan without calibration. On disk::

    {"format": "lowmoe-plan/1",
     "num_experts_per_tok": 2,
     "layers": {"0": {"keep": [1, 4, 6, 7]}, ...}}

``keep`` lists original expert ids in output order (output expert j is original ``keep[j]``).
Merging plans add, per layer, ``merge``: an E'xE matrix W_EM (output expert j's weights are
Σ_i W_EM[j, i]·θ_i for every matrix of the expert) and ``router``: an E'xE matrix W_RM (output
router row j is Σ_i W_RM[j, i]·W_G[i]). Without them, output expert j is exactly expert keep[j]
and its router row is row keep[j]. Other per-layer fields (e.g. ``neurons`` for DERN) are kept
and handed to the apply step.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PlanError

FORMAT = "lowmoe-plan/1"


@dataclass
class LayerPlan:
    keep: list[int]
    merge: list[list[float]] | None = None
    router: list[list[float]] | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d: dict = {"keep": list(self.keep)}
        if self.merge is not None:
            d["merge"] = self.merge
        if self.router is not None:
            d["router"] = self.router
        d.update(self.extra)
        return d

    @classmethod
    def from_json(cls, d: dict, where: str) -> "LayerPlan":
        if not isinstance(d, dict) or "keep" not in d:
            raise PlanError(f"{where}: expected an object with a 'keep' list of expert ids")
        keep = d["keep"]
        if not isinstance(keep, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in keep):
            raise PlanError(f"{where}.keep: expected a list of integer expert ids, got {keep!r}")
        extra = {k: v for k, v in d.items() if k not in ("keep", "merge", "router")}
        return cls(list(keep), d.get("merge"), d.get("router"), extra)

    @property
    def is_selection(self) -> bool:
        return self.merge is None and self.router is None and not self.extra


@dataclass
class Plan:
    layers: dict[int, LayerPlan]
    num_experts_per_tok: int
    meta: dict = field(default_factory=dict)

    @property
    def num_kept(self) -> int:
        return len(next(iter(self.layers.values())).keep)

    def to_json(self) -> dict:
        return {"format": FORMAT, "num_experts_per_tok": self.num_experts_per_tok,
                "layers": {str(k): v.to_json() for k, v in sorted(self.layers.items())}, **({"meta": self.meta} if self.meta else {})}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def from_json(cls, d: dict, where: str = "plan") -> "Plan":
        if not isinstance(d, dict):
            raise PlanError(f"{where}: expected a JSON object")
        if d.get("format") != FORMAT:
            raise PlanError(f"{where}: 'format' is {d.get('format')!r}, expected {FORMAT!r}")
        layers = d.get("layers")
        if not isinstance(layers, dict) or not layers:
            raise PlanError(f"{where}: 'layers' must be a non-empty object keyed by layer index")
        out = {}
        for k, v in layers.items():
            try:
                idx = int(k)
            except ValueError:
                raise PlanError(f"{where}: layer key {k!r} is not an integer layer index") from None
            out[idx] = LayerPlan.from_json(v, f"{where}: layers[{k!r}]")
        k = d.get("num_experts_per_tok")
        if not isinstance(k, int) or k < 1:
            raise PlanError(f"{where}: 'num_experts_per_tok' must be a positive integer, got {k!r}")
        return cls(out, k, d.get("meta") or {})

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            raise PlanError(f"{p}: plan file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlanError(f"{p}: plan is not valid JSON ({e})") from None
        return cls.from_json(data, str(p))

    def validate(self, moe_layers: list[int], num_experts: int, where: str = "plan") -> None:
        """Check the plan fits a model with ``num_experts`` routed experts in ``moe_layers``."""
        want, have = set(moe_layers), set(self.layers)
        if want != have:
            missing, extra = sorted(want - have), sorted(have - want)
            raise PlanError(f"{where}: layers do not match the model's MoE layers {sorted(want)} "
                            f"(missing {missing}, not MoE layers {extra})")
        sizes = {len(lp.keep) for lp in self.layers.values()}
        if len(sizes) != 1:
            raise PlanError(f"{where}: every layer must keep the same number of experts (stock loaders require it); got sizes {sorted(sizes)}")
        n = sizes.pop()
        if not 1 <= n <= num_experts:
            raise PlanError(f"{where}: keeps {n} experts per layer; the model has {num_experts}")
        if self.num_experts_per_tok > n:
            raise PlanError(f"{where}: num_experts_per_tok {self.num_experts_per_tok} exceeds the {n} experts kept per layer")
        for idx, lp in sorted(self.layers.items()):
            bad = [e for e in lp.keep if not 0 <= e < num_experts]
            if bad:
                raise PlanError(f"{where}: layer {idx} keeps expert ids {bad} outside 0..{num_experts - 1}")
            if lp.merge is None and len(set(lp.keep)) != len(lp.keep):
                raise PlanError(f"{where}: layer {idx} keeps an expert twice ({lp.keep}); give a 'merge' matrix to duplicate experts")
            for name in ("merge", "router"):
                m = getattr(lp, name)
                if m is None:
                    continue
                if (not isinstance(m, list) or len(m) != n
                        or any(not isinstance(r, list) or len(r) != num_experts for r in m)):
                    raise PlanError(f"{where}: layer {idx} '{name}' must be a {n}x{num_experts} matrix")
                if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for r in m for x in r):
                    raise PlanError(f"{where}: layer {idx} '{name}' must hold finite numbers only")


def selection_plan(keep_by_layer: dict[int, list[int]], top_k: int, meta: dict | None = None) -> Plan:
    return Plan({k: LayerPlan(sorted(v)) for k, v in keep_by_layer.items()}, top_k, meta or {})
