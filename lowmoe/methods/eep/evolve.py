"""EEP's evolutionary search over (W_EM, W_RM), one population-parallel generation at a time.

Algorithm (Liu et al., arXiv 2407.00945, §4.3 / Alg. 1; defaults from the authors' code,
``configs/search/search.yml`` + ``opencompass/tasks/search.py``):

* **Archive.** Every evaluated candidate is kept with its fitness (training accuracy, ll
  tie-break). Parents are drawn uniformly from the archive top: the first ``i`` ranks whose
  accuracy is within ``parents_threshold`` points of the best, and at least ``parents_rank``.
* **Init.** Random one-hot candidates (per group a random E'-subset, W_RM = W_EM), plus seeds:
  one-shot scoring methods' plans (``--init auto``: every scorer; ``--init easy-ep``: one). The
  seeds are evaluated first (on training fitness, and on dev when the runner passes
  ``rank_seeds``), ranked (dev first when there is one), and generation 0 is: every seed,
  mutations of the best seed, group-wise crossovers of the seeds (each layer group's keep-set
  taken whole from one seed), random candidates. With E' = E the start is the identity (only
  fewer active experts).
* **Pruning phase** (the first ``prune_generations``). By default (``prune_search="local"``;
  lowmoe) up to ``swap_share`` (0.5) of each generation's children are a *swap local search*
  around the archive's best plan: plans one swap away from it (one kept expert of one group
  replaced by one the group drops) not yet evaluated, group by group starting at group
  ``generation mod G`` (a random sample where a group has more than the room left). The best plan
  moves as soon as a generation finds a better one. The rest of the generation -- all of it once
  every swap of the best has been evaluated (a local optimum) -- is EEP's children, below: they
  explore (a greedy climb alone can end on a plan that gave up one domain), and the climb
  continues from whatever beats the best.
  EEP's children (``prune_search="ga"``: all of them): one parent (top within 3.0 points) -- or,
  w.p. ``prune_crossover_prob`` (default 0), a group-wise crossover of two parents of the
  crossover pool, each group's keep-set whole from one of them --, then *discrete mutation*: each
  layer group is selected w.p. ``group_prob`` (0.25, redrawn until one is), and each row of a
  selected group is resampled w.p. ``row_prob`` (0.15) to an expert no other row uses; W_RM
  follows W_EM.
* **Merging phase**: w.p. ``crossover_prob`` (0.3) a row-wise crossover of two parents (top within
  1.0 point, at least 6): selected groups take each row from parent 1 w.p. 0.6, else parent 2;
  other groups take parent 1's matrix w.p. 0.6. Otherwise one parent. Then *Gaussian mutation*:
  W_EM and W_RM groups are selected independently w.p. 0.25, and each entry of a selected matrix
  gets + N(0, 1)·``sigma`` (0.065) w.p. ``entry_prob`` (0.25). W.p. ``norm_prob`` (0.1) every
  W_EM row is divided by its sum (W_RM is never normalised). By default (``sigma_rule="one-fifth"``;
  lowmoe, EEP keeps sigma fixed: ``"fixed"``) sigma starts at 0.065 and follows Rechenberg's 1/5
  success rule: after each merging generation it grows by 1/``sigma_factor`` if more than a fifth
  of the children beat their parent's fitness, and shrinks by ``sigma_factor`` if fewer did.
* Children already in the archive are redrawn (up to ``max_redraw`` times).
* **Final pick**: the top ``dev_num`` (20) by training fitness are re-scored on the dev split and
  the best on dev is returned (without dev data: the best on training fitness). Every seed is
  among the candidates compared on dev, so the pick is never worse on dev than any one-shot plan
  that seeded the search. A searched plan replaces the best seed only if it beats it on dev by more
  than ``pick_margin`` (1.0) standard errors of the difference, paired over the dev examples by
  default (``pick_se``; lowmoe, EEP has no seeds).

lowmoe evaluates ``population`` children per generation in one streamed pass
(``population.PopulationEvaluator``) instead of EEP's one candidate per full-model run. EEP's
code runs 100 pruning-phase evaluations out of 400, so the default pruning phase is the first
25% of the generations.

Randomness: generation g draws from ``numpy.random.default_rng([seed, g])``, so a search
resumed from its checkpoint (``state.json``, rewritten after every generation) continues exactly
as a run that never stopped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ...engine import faults
from ...errors import ConfigError
from .fitness import Fitness, paired_se, unpaired_se
from .space import Candidate, SearchSpace

log = logging.getLogger(__name__)

SIGMA_RULES = ("fixed", "one-fifth")
PRUNE_SEARCH = ("local", "ga")  # the pruning phase's children: swap local search (lowmoe) or EEP's mutations
PICK_SE = ("paired", "unpaired")  # the pick margin's standard error: per-example paired (default) or unpaired
SIGMA_BOUNDS = (0.1, 10.0)  # one-fifth: sigma stays within these multiples of the option's sigma


@dataclass(frozen=True)
class EvolveOptions:
    generations: int = 40
    population: int = 16
    prune_generations: int | None = None  # default: 25% of the generations (EEP code: 100 of 400 evaluations)
    group_prob: float = 0.25  # weight_change_prob = transfer_change_prob
    row_prob: float = 0.15  # discrete_mutate: per-row resample probability
    crossover_prob: float = 0.3
    prune_search: str = "local"  # pruning phase: swap local search around the best plan (lowmoe), or "ga" (EEP)
    swap_share: float = 0.5  # local: at most this share of a pruning generation's children are swaps of the best
    prune_crossover_prob: float = 0.0  # pruning phase: group-wise crossover of two parents (lowmoe; EEP: none)
    seed_cross_share: float = 0.25  # generation 0: share of the non-seed candidates that cross seeds group-wise
    from_front_prob: float = 0.6
    sigma: float = 0.065
    sigma_rule: str = "one-fifth"  # merging phase: Rechenberg's 1/5 success rule on sigma (lowmoe), or "fixed" (EEP)
    sigma_factor: float = 0.85  # one-fifth: sigma /= f after a generation with > 1/5 successes, *= f with fewer
    entry_prob: float = 0.25
    norm_prob: float = 0.1
    parents_threshold: float = 1.0  # crossover pool: accuracy points below the best
    parents_rank: int = 6
    single_threshold: float = 3.0  # single-parent pool
    single_rank: int = 0
    dev_num: int = 20
    pick_margin: float = 1.0  # a searched plan must beat the best seed on dev by this many standard errors (0: any gain)
    pick_se: str = "paired"  # that standard error: "paired" (per-example dev outcomes, McNemar) or "unpaired" (the former rule)
    max_redraw: int = 50
    seed: int = 0

    def check(self) -> None:
        if self.generations < 1:
            raise ConfigError(f"--generations must be >= 1, got {self.generations}")
        if self.sigma <= 0:
            raise ConfigError(f"EEP option sigma={self.sigma}: must be > 0")
        if self.sigma_rule not in SIGMA_RULES:
            raise ConfigError(f"EEP option sigma_rule={self.sigma_rule!r}: choose one of {', '.join(SIGMA_RULES)}")
        if not 0.0 < self.sigma_factor < 1.0:
            raise ConfigError(f"EEP option sigma_factor={self.sigma_factor}: must be in (0, 1)")
        if self.pick_margin < 0:
            raise ConfigError(f"EEP option pick_margin={self.pick_margin}: must be >= 0 (standard errors)")
        if self.prune_search not in PRUNE_SEARCH:
            raise ConfigError(f"EEP option prune_search={self.prune_search!r}: choose one of {', '.join(PRUNE_SEARCH)}")
        if self.pick_se not in PICK_SE:
            raise ConfigError(f"EEP option pick_se={self.pick_se!r}: choose one of {', '.join(PICK_SE)}")
        if self.population < 2:
            raise ConfigError(f"--population must be >= 2, got {self.population}")
        if self.prune_generations is not None and not 0 <= self.prune_generations <= self.generations:
            raise ConfigError(f"prune_generations {self.prune_generations}: must be between 0 and --generations {self.generations}")
        for name in ("group_prob", "row_prob", "crossover_prob", "prune_crossover_prob", "seed_cross_share",
                     "swap_share", "from_front_prob", "entry_prob", "norm_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"EEP option {name}={v}: must be a probability in [0, 1]")

    @property
    def n_prune(self) -> int:
        return self.prune_generations if self.prune_generations is not None else max(1, round(0.25 * self.generations))


@dataclass
class Entry:
    cand: Candidate
    fitness: Fitness
    generation: int
    phase: str
    dev: Fitness | None = None

    def to_json(self) -> dict:
        # the dev fitness keeps its per-example outcomes: the paired pick rule needs them after a resume
        return {**self.cand.to_json(), "fitness": self.fitness.to_json(), "generation": self.generation,
                "phase": self.phase, "dev": None if self.dev is None else self.dev.to_json(outcomes=True)}

    @classmethod
    def from_json(cls, d: dict) -> "Entry":
        return cls(Candidate.from_json(d), Fitness.from_json(d["fitness"]), int(d["generation"]), d["phase"],
                   None if d.get("dev") is None else Fitness.from_json(d["dev"]))


@dataclass
class SearchState:
    generation: int = 0  # next generation to run
    archive: list[Entry] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)
    elapsed_s: float = 0.0
    evaluations: int = 0
    sigma: float | None = None  # the merging phase's current mutation step (None: the option's sigma)

    def ranked(self) -> list[Entry]:
        # best first; ties on (acc, ll) fall back to the earliest evaluated (deterministic)
        return sorted(self.archive, key=lambda e: (-e.fitness.acc, -e.fitness.ll, e.generation))

    def keys(self) -> set[str]:
        return {e.cand.key() for e in self.archive}


class Evolution:
    """Runs the search; ``evaluate(list[Candidate]) -> list[Fitness]`` is one streamed pass."""

    def __init__(self, space: SearchSpace, opts: EvolveOptions, evaluate: Callable[[list[Candidate]], list[Fitness]],
                 state_path: str | Path | None = None, seed_cand: Candidate | None = None, fingerprint: dict | None = None,
                 on_generation: Callable[[int], None] | None = None, progress: bool = False,
                 seeds: list[tuple[str, Candidate]] | None = None,
                 rank_seeds: Callable[[list[Candidate]], list[Fitness]] | None = None):
        """``seeds``: (method name, one-hot plan) of one-shot methods (``seed_cand``: one, named "seed");
        ``rank_seeds``: the dev evaluator the seeds are ranked with (None: training fitness)."""
        opts.check()
        self.space, self.opts, self.evaluate = space, opts, evaluate
        self.state_path = Path(state_path) if state_path else None
        seeds = list(seeds or []) + ([("seed", seed_cand)] if seed_cand is not None else [])
        # distinct plans, each with every method that gave it (two scorers may agree)
        self.seeds: list[tuple[list[str], Candidate]] = []
        for name, c in seeds:
            c = c.canonical()
            same = next((s for s in self.seeds if s[1].key() == c.key()), None)
            if same is None:
                self.seeds.append(([name], c))
            else:
                same[0].append(name)
        self.rank_seeds = rank_seeds
        self.parent_fits: list[Fitness] = []
        self.n_swaps = 0  # children(): how many of the last pruning generation's children were swap neighbours
        self.pick_info: dict | None = None  # pick(): the margin test's figures
        self.fingerprint = {"options": asdict(opts), "space": space.describe(), **(fingerprint or {})}
        self.on_generation = on_generation
        self.progress = progress
        self.state = self._load() or SearchState()

    # ---- checkpoint ------------------------------------------------------------------------
    def _load(self) -> SearchState | None:
        if self.state_path is None or not self.state_path.is_file():
            return None
        d = json.loads(self.state_path.read_text())
        if d.get("fingerprint") != json.loads(json.dumps(self.fingerprint)):
            log.warning("%s: search state from other options; starting the search over", self.state_path)
            return None
        st = SearchState(int(d["generation"]), [Entry.from_json(e) for e in d["archive"]], d["curve"],
                         float(d["elapsed_s"]), int(d["evaluations"]), d.get("sigma"))
        log.info("resuming the EEP search at generation %d (%d candidates in the archive)", st.generation, len(st.archive))
        return st

    def save(self) -> None:
        if self.state_path is None:
            return
        st = self.state
        d = {"fingerprint": self.fingerprint, "generation": st.generation, "archive": [e.to_json() for e in st.archive],
             "curve": st.curve, "elapsed_s": st.elapsed_s, "evaluations": st.evaluations, "sigma": st.sigma}
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_text(json.dumps(d))
        os.replace(tmp, self.state_path)

    # ---- operators ------------------------------------------------------------------------
    def _pool(self, ranked: list[Entry], threshold: float, min_rank: int) -> list[Entry]:
        """EEP's parent pool: the top i, i = number within ``threshold`` accuracy points of the best, >= min_rank."""
        best = ranked[0].fitness.acc * 100
        i = sum(1 for e in ranked if e.fitness.acc * 100 >= best - threshold)
        return ranked[:max(i, min_rank, 1)]

    def parents(self) -> list[Entry]:
        """Every archive entry the next generation may draw a parent from, best first."""
        ranked = self.state.ranked()
        if not ranked:
            return []
        a = self._pool(ranked, self.opts.single_threshold, self.opts.single_rank)
        b = self._pool(ranked, self.opts.parents_threshold, self.opts.parents_rank)
        return ranked[:max(len(a), len(b))]

    def _select_groups(self, rng: np.random.Generator, n: int) -> np.ndarray:
        while True:
            sel = rng.random(n) < self.opts.group_prob
            if sel.any():
                return sel

    def discrete_mutate(self, cand: Candidate, rng: np.random.Generator) -> Candidate:
        E, sp = self.space.num_experts, self.space
        em = cand.em.copy()
        for g in np.flatnonzero(self._select_groups(rng, sp.num_groups)):
            used = set(em[g].argmax(1).tolist())
            for j in range(sp.keep):
                if rng.random() < self.opts.row_prob:
                    free = [e for e in range(E) if e not in used]
                    if not free:
                        break
                    new = int(rng.choice(free))
                    used.discard(int(em[g, j].argmax()))
                    used.add(new)
                    em[g, j] = 0.0
                    em[g, j, new] = 1.0
        return Candidate(em, em.copy()).canonical()

    def swap_children(self, best: Candidate, generation: int, rng: np.random.Generator, seen: set[str],
                      limit: int | None = None) -> list[Candidate]:
        """Up to ``limit`` (default ``population``) plans one swap away from ``best`` (one-hot) and not in
        ``seen``: group by group from group ``generation mod G``, each group's swaps in a random order."""
        sp, P = self.space, limit or self.opts.population
        keep = best.keep_sets()
        out: list[Candidate] = []
        for k in range(sp.num_groups):
            g = (generation + k) % sp.num_groups
            dropped = [e for e in range(sp.num_experts) if e not in keep[g]]
            for i in rng.permutation(sp.keep * len(dropped)):
                if len(out) >= P:
                    return out
                row, new = divmod(int(i), len(dropped))
                swapped = [list(ks) for ks in keep]
                swapped[g][row] = dropped[new]
                c = sp.onehot(swapped)
                if c.key() not in seen:
                    seen.add(c.key())
                    out.append(c)
        return out

    def group_crossover(self, parents: list[Candidate], rng: np.random.Generator) -> Candidate:
        """A pruning-phase crossover: each layer group's keep-set whole from one of ``parents`` (one-hot
        stays one-hot, W_RM = W_EM). Redrawn a few times if it equals a parent."""
        G = self.space.num_groups
        em = parents[0].em.copy()
        for _ in range(8):
            pick = rng.integers(len(parents), size=G)
            if G > 1 and len(set(pick.tolist())) == 1:
                continue
            em = np.stack([parents[int(p)].em[g] for g, p in enumerate(pick)])
            break
        return Candidate(em, em.copy()).canonical()

    def crossover(self, p1: Candidate, p2: Candidate, rng: np.random.Generator) -> Candidate:
        G = self.space.num_groups
        out = []
        for a, b in ((p1.em, p2.em), (p1.rm, p2.rm)):
            sel = self._select_groups(rng, G)
            m = a.copy()
            for g in range(G):
                if sel[g]:
                    rows = rng.random(a.shape[1]) < self.opts.from_front_prob
                    m[g] = np.where(rows[:, None], a[g], b[g])
                else:
                    m[g] = a[g] if rng.random() < self.opts.from_front_prob else b[g]
            out.append(m)
        return Candidate(out[0], out[1])

    def gaussian_mutate(self, cand: Candidate, rng: np.random.Generator) -> Candidate:
        G = self.space.num_groups
        em, rm = cand.em.copy(), cand.rm.copy()
        # each W_EM group and each W_RM group is selected independently; redraw until one is
        while True:
            sel = rng.random(2 * G) < self.opts.group_prob
            if sel.any():
                break
        for i in np.flatnonzero(sel):
            m = em if i < G else rm
            g = i % G
            hit = rng.random(m[g].shape) < self.opts.entry_prob
            m[g] = m[g] + hit * rng.standard_normal(m[g].shape) * self.sigma
        if rng.random() < self.opts.norm_prob:
            s = em.sum(-1, keepdims=True)
            em = np.where(np.abs(s) > 1e-6, em / np.where(np.abs(s) > 1e-6, s, 1.0), em)
        return Candidate(em, rm).canonical()

    @property
    def sigma(self) -> float:
        """The Gaussian mutation's step now: the option's ``sigma``, or where the 1/5 rule has moved it."""
        return self.opts.sigma if self.state.sigma is None else self.state.sigma

    def adapt_sigma(self, parent_fits: list[Fitness], fits: list[Fitness]) -> float | None:
        """Rechenberg's 1/5 success rule, after a merging-phase generation: the share of children
        fitter than their parent (on (accuracy, ll)); above 1/5 the step grows (sigma / sigma_factor),
        below it shrinks (sigma * sigma_factor), within ``SIGMA_BOUNDS`` x the option's sigma.
        Returns the success share (None when the rule is off or there were no children)."""
        if self.opts.sigma_rule != "one-fifth" or not fits:
            return None
        wins = sum(f > p for p, f in zip(parent_fits, fits))
        share = wins / len(fits)
        lo, hi = (b * self.opts.sigma for b in SIGMA_BOUNDS)
        if share > 0.2:
            self.state.sigma = min(self.sigma / self.opts.sigma_factor, hi)
        elif share < 0.2:
            self.state.sigma = max(self.sigma * self.opts.sigma_factor, lo)
        return share

    # ---- generations -----------------------------------------------------------------------
    def phase(self, generation: int) -> str:
        return "prune" if self.space.prunes and generation < self.opts.n_prune else "merge"

    def initial(self, rng: np.random.Generator, seeds_ranked: list[Candidate] | None = None) -> list[Candidate]:
        """Generation 0: the seeds (best first), mutations of the best, seed crossovers, random fill."""
        sp, P = self.space, self.opts.population
        cands: list[Candidate] = []
        seen: set[str] = set()

        def add(c: Candidate) -> None:
            if c.key() not in seen:
                seen.add(c.key())
                cands.append(c)

        if not sp.prunes:
            add(sp.identity())  # E' = E: the unpruned model with fewer active experts
            base = sp.identity()
            for _ in range(self.opts.max_redraw * P):
                if len(cands) >= P:
                    break
                add(self.gaussian_mutate(base, rng))
            return cands
        for c in seeds_ranked or []:
            add(c)
        if seeds_ranked:
            rest = max(P - len(cands), 0)
            n_cross = int(rest * self.opts.seed_cross_share) if len(seeds_ranked) > 1 and sp.num_groups > 1 else 0
            n_mut = (rest + 1) // 2
            for _ in range(self.opts.max_redraw * P):
                if len(cands) >= len(seeds_ranked) + n_mut:
                    break
                add(self.discrete_mutate(seeds_ranked[0], rng))
            target = len(cands) + n_cross
            for _ in range(self.opts.max_redraw * P):
                if len(cands) >= target:
                    break
                i, j = rng.choice(len(seeds_ranked), 2, replace=False)
                add(self.group_crossover([seeds_ranked[i], seeds_ranked[j]], rng))
        for _ in range(self.opts.max_redraw * P):
            if len(cands) >= P:
                break
            add(sp.random_onehot(rng))
        return cands

    def children(self, generation: int, rng: np.random.Generator) -> list[Candidate]:
        ranked = self.state.ranked()
        seen = self.state.keys()
        phase = self.phase(generation)
        single = self._pool(ranked, self.opts.single_threshold, self.opts.single_rank)
        cross = self._pool(ranked, self.opts.parents_threshold, self.opts.parents_rank)
        out: list[Candidate] = []
        self.parent_fits: list[Fitness] = []  # per child, its (first) parent's fitness: the 1/5 rule's reference
        n_swaps = round(self.opts.swap_share * self.opts.population)
        if phase == "prune" and self.opts.prune_search == "local" and n_swaps > 0 and ranked[0].cand.is_onehot():
            out = self.swap_children(ranked[0].cand, generation, rng, seen, n_swaps)
        self.n_swaps = len(out)
        for _ in range(self.opts.population - len(out)):
            child = None
            for _ in range(self.opts.max_redraw):
                if phase == "prune":
                    if len(cross) >= 2 and rng.random() < self.opts.prune_crossover_prob:
                        i, j = rng.choice(len(cross), 2, replace=False)
                        c = self.discrete_mutate(self.group_crossover([cross[i].cand, cross[j].cand], rng), rng)
                    else:
                        c = self.discrete_mutate(single[rng.integers(len(single))].cand, rng)
                else:
                    if len(cross) >= 2 and rng.random() < self.opts.crossover_prob:
                        i, j = rng.choice(len(cross), 2, replace=False)
                        parent = cross[i]
                        c = self.crossover(cross[i].cand, cross[j].cand, rng)
                    else:
                        parent = single[rng.integers(len(single))]
                        c = parent.cand
                    c = self.gaussian_mutate(c, rng)
                if c.key() not in seen:
                    child = c
                    break
            if child is not None:
                seen.add(child.key())
                out.append(child)
                if phase == "merge":
                    self.parent_fits.append(parent.fitness)
        return out

    def run(self) -> SearchState:
        st, opts = self.state, self.opts
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=opts.generations, initial=st.generation, desc="eep", unit="gen", dynamic_ncols=True)
        while st.generation < opts.generations:
            g = st.generation
            t0 = time.perf_counter()
            rng = np.random.default_rng([opts.seed, g])
            phase = self.phase(g)
            devs: dict[str, Fitness] = {}
            if g == 0 and self.seeds and self.space.prunes:
                # the seeds first: ranked on dev (or training fitness), the best one is mutated
                seed_cands = [c for _, c in self.seeds]
                seed_fits = self.evaluate(seed_cands)
                if self.rank_seeds is not None:
                    devs = {c.key(): f for c, f in zip(seed_cands, self.rank_seeds(seed_cands))}
                order = sorted(range(len(seed_cands)), key=lambda i: (
                    -(devs[seed_cands[i].key()].acc if devs else seed_fits[i].acc),
                    -(devs[seed_cands[i].key()].ll if devs else seed_fits[i].ll), -seed_fits[i].acc, i))
                ranked_seeds = [seed_cands[i] for i in order]
                for i in order:
                    names = "+".join(self.seeds[i][0])
                    log.info("EEP seed %s: train %s%s", names, seed_fits[i].describe(),
                             f", dev {devs[seed_cands[i].key()].describe()}" if devs else "")
                rest = self.initial(rng, ranked_seeds)[len(ranked_seeds):]
                cands = [seed_cands[i] for i in order] + rest
                fits = [seed_fits[i] for i in order] + (self.evaluate(rest) if rest else [])
            else:
                cands = self.initial(rng) if g == 0 else self.children(g, rng)
                if not cands:
                    log.info("generation %d: no new candidate left to try; stopping early", g)
                    break
                fits = self.evaluate(cands)
            sigma_used = self.sigma
            success = self.adapt_sigma(self.parent_fits, fits) if g > 0 and phase == "merge" else None
            faults.point("eep-generation")  # evaluated, not yet in the archive
            st.archive += [Entry(c, f, g, phase, devs.get(c.key())) for c, f in zip(cands, fits)]
            st.evaluations += len(cands)
            st.elapsed_s += time.perf_counter() - t0
            st.generation = g + 1
            accs = sorted(f.acc for f in fits)
            best = st.ranked()[0].fitness
            evals_h = st.evaluations / max(st.elapsed_s, 1e-9) * 3600
            eta = (opts.generations - st.generation) * st.elapsed_s / max(st.generation, 1)
            point = {"generation": g, "phase": phase, "evaluations": st.evaluations, "best_acc": best.acc,
                     "best_ll": best.ll, "gen_best_acc": accs[-1], "gen_median_acc": float(np.median(accs)),
                     "elapsed_s": round(st.elapsed_s, 3)}
            if phase == "prune" and g > 0 and self.opts.prune_search == "local":
                point["swaps"] = self.n_swaps  # children one swap from the best; fewer than swap_share x population: a local optimum
            if phase == "merge":
                point["sigma"] = sigma_used
                if success is not None:
                    point["success"] = success
            if best.domains:  # several domains: the archive best's and the generation's best per domain
                point["best_domains"] = best.domain_accs()
                point["gen_best_domains"] = {name: max(f.domain_accs()[name] for f in fits) for name, _, _ in best.domains}
            st.curve.append(point)
            if self.on_generation is not None:
                self.on_generation(g)
            self.save()
            line = (f"gen {st.generation}/{opts.generations} [{phase}] best {best.describe()} (ll {best.ll:.3f}) "
                    f"median {np.median(accs):.3f} | {evals_h:.0f} evals/h | ETA {eta / 60:.1f} min")
            if bar is not None:
                bar.set_postfix_str(line.split(" ", 2)[2])
                bar.update(1)
            log.info(line)
        if bar is not None:
            bar.close()
        return st

    def seed_entries(self) -> list[tuple[list[str], Entry]]:
        """(method names, archive entry) of every seed, once evaluated, in seeding order."""
        by_key = {e.cand.key(): e for e in self.state.archive if e.generation == 0}
        return [(names, by_key[c.key()]) for names, c in self.seeds if c.key() in by_key]

    def seed_entry(self) -> Entry | None:
        """The archive entry of the first seed (``--init METHOD``), once evaluated."""
        entries = self.seed_entries()
        return entries[0][1] if entries else None

    def pick(self, evaluate_dev: Callable[[list[Candidate]], list[Fitness]] | None, dev_examples: int | None = None,
             weights: list[float] | None = None, combine: str = "mean") -> Entry:
        """EEP's final pick: the top ``dev_num`` by training fitness, re-scored on dev.

        With seeds, a searched plan replaces the best seed on dev only if its dev accuracy is higher by
        more than ``pick_margin`` standard errors of the difference; a smaller gain is within what picking
        the best of ~25 candidates on the same dev examples gains by chance, and the seed is kept.
        ``pick_se="paired"`` (default): the two plans were scored on the same dev examples, so the error is
        the paired one (``fitness.paired_se``: sqrt(discordant pairs) / n per domain, the domains combined
        by ``combine`` with ``weights``, as the fitness is), from the per-example outcomes the dev
        evaluator returns. ``"unpaired"``, or dev fitness without outcomes: sqrt(p1(1-p1)/n + p2(1-p2)/n)
        over ``dev_examples`` (without it: no margin). ``self.pick_info`` says what was compared."""
        self.pick_info = None
        ranked = self.state.ranked()
        if evaluate_dev is None:
            return ranked[0]
        top = ranked[:self.opts.dev_num]
        # a seeded search (--init auto / METHOD) also compares every seed on dev, so the pick is never
        # worse on dev than any one-shot plan it started from
        for _, seed in self.seed_entries():
            if all(e is not seed for e in top):
                top.append(seed)
        todo = [e for e in top if e.dev is None]
        if todo:
            for e, f in zip(todo, evaluate_dev([e.cand for e in todo])):
                e.dev = f
            self.save()
        key = lambda e: (e.dev.acc, e.dev.ll, e.fitness.acc, e.fitness.ll, -e.generation)  # noqa: E731
        best = max(top, key=key)
        seeds = [e for _, e in self.seed_entries() if e.dev is not None]
        if seeds and self.opts.pick_margin > 0 and all(best is not e for e in seeds):
            seed = max(seeds, key=key)
            rule, se = None, None
            if self.opts.pick_se == "paired":
                se = paired_se(best.dev, seed.dev, weights, combine)
                rule = None if se is None else "paired"
            if se is None and dev_examples:
                rule, se = "unpaired", unpaired_se(best.dev, seed.dev, dev_examples)
            if se is not None:
                gain = best.dev.acc - seed.dev.acc
                kept = gain <= self.opts.pick_margin * se
                self.pick_info = {"rule": rule, "margin": self.opts.pick_margin, "searched_dev": best.dev.acc,
                                  "seed_dev": seed.dev.acc, "gain": gain, "se": se,
                                  "picked": "seed" if kept else "searched"}
                if kept:
                    log.info("EEP pick: the best searched plan (dev %.4f) is within %.1f %s standard errors (%.4f) of "
                             "the best seed (dev %.4f): keeping the seed", best.dev.acc, self.opts.pick_margin, rule, se,
                             seed.dev.acc)
                    return seed
                log.info("EEP pick: the best searched plan (dev %.4f) beats the best seed (dev %.4f) by %.1f %s "
                         "standard errors (%.4f)", best.dev.acc, seed.dev.acc, gain / se if se else float("inf"), rule, se)
        return best
