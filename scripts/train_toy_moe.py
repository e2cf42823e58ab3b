"""Train the toy multi-domain MoE that ships in lowmoe/assets/toy-moe (CPU only, ~15 min on 2 cores).

A Mixtral-layout model (transformers' own ``MixtralForCausalLM``) with the byte tokenizer of
``lowmoe.toy.tokenizer`` learns the few-shot domains of ``lowmoe.toy.tasks`` (arithmetic, reverse, sort,
look-up, brackets) and language modelling on standard-library docstrings. The loss is
cross-entropy on every answer of a prompt (the demos' answers and the query's; every byte for the
text domain), plus a routing prior: each domain has a preferred pair of experts, and
``--route-weight`` × −log(router probability mass on that pair) pulls its tokens there. That makes
experts specialise by domain the way large MoEs do (measured in the report, per domain and layer),
so that "keep half the experts for domain X" is a meaningful, measurable operation.

    python scripts/train_toy_moe.py --out lowmoe/assets/toy-moe            # reproduces the shipped model
    python scripts/train_toy_moe.py --out lowmoe/assets/toy-moe-learned --route-weight 0 \
        --balance-weight 1.0 --balance-scope domain --loss-balance domain   # the second one (~10 min)

``toy-moe-learned`` has no routing prior. A Mixtral load-balancing loss applied within each domain's
examples (``--balance-weight``, ``--balance-scope domain``) keeps every domain from settling on a
few experts: no domain has experts of its own, as in a real MoE trained without domain labels, and
dropping half of the experts costs most domains accuracy (sort 0.96 -> 0.72, brackets 0.99 -> 0.88,
arithmetic 0.88 -> 0.77 with the best one-shot scorer), which gives EEP's search something to win (docs/eep.md). Balancing
over the whole batch instead (``--balance-scope batch``, the first version of this toy at weight
0.02) lets each domain keep to about four experts, and half of the experts then lose nothing on
most domains.

The output is a normal sharded HF checkpoint (``save_pretrained`` with a small ``max_shard_size``)
plus the tokenizer, generation_config.json and ``training_report.json`` (per-domain exact match and
perplexity on the held-out test split, routing frequencies per domain and layer, wall time, seed).
Same seed and thread count → same weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowmoe.toy import tasks
from lowmoe.toy.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, build_byte_tokenizer, save_byte_tokenizer

log = logging.getLogger("train_toy_moe")

# Preferred expert pair of each domain (overlapping, as shared knowledge is in real MoEs).
ROUTE_PREF = {"arithmetic": (0, 3), "reverse": (1, 4), "sort": (2, 5), "lookup": (3, 6), "brackets": (4, 7), "text": (5, 0)}
SEPARATORS = "=>?"


def model_config(args):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=VOCAB_SIZE, hidden_size=args.hidden, intermediate_size=args.expert_ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=max(1, args.heads // 2), head_dim=args.hidden // args.heads,
        num_local_experts=args.experts, num_experts_per_tok=args.top_k, max_position_embeddings=256,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, router_aux_loss_coef=0.0,
        output_router_logits=False, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, dtype="float32",
    )


def answer_mask(rec: dict) -> list[bool]:
    """Which bytes of prompt+answer carry loss: every demo answer and the query's answer (all text bytes)."""
    text = rec["prompt"] + rec["answer"]
    mask = [False] * len(text)
    header = text.index("\n") + 1
    if rec["domain"] == "text":
        return [False] * header + [True] * (len(text) - header)
    pos = header
    if rec["domain"] == "lookup":  # the context line is data, not an answer
        pos = text.index("\n", header) + 1
    for line in text[pos:].splitlines(keepends=True):
        cut = max(line.rfind(c) for c in SEPARATORS) + 1
        for i in range(pos + cut, pos + len(line)):
            mask[i] = True
        pos += len(line)
    return mask


def encode(tok, recs: list[dict], with_mask: bool = True):
    """Right-padded (ids, loss mask, answer-only mask, domain index) tensors for a batch of records."""
    ids = [tok(r["prompt"] + r["answer"], add_special_tokens=False)["input_ids"] for r in recs]
    n = max(map(len, ids))
    x = torch.full((len(recs), n), PAD_ID, dtype=torch.long)
    m = torch.zeros((len(recs), n), dtype=torch.bool)     # loss positions (token predicted at i)
    ans = torch.zeros((len(recs), n), dtype=torch.bool)   # the query's answer only
    for b, (r, seq) in enumerate(zip(recs, ids)):
        x[b, :len(seq)] = torch.tensor(seq)
        if with_mask:
            m[b, :len(seq)] = torch.tensor(answer_mask(r))
        ans[b, len(seq) - len(tok(r["answer"], add_special_tokens=False)["input_ids"]):len(seq)] = True
    dom = torch.tensor([tasks.DOMAINS.index(r["domain"]) for r in recs])
    return x, m, ans, dom


class TrainData:
    """An endless, seeded stream of mixed-domain training records."""

    def __init__(self, domains: list[str], seed: int, chunk: int = 2000):
        self.domains, self.seed, self.chunk = domains, seed, chunk
        self.rng = random.Random(f"train-stream:{seed}")
        self.pool: list[dict] = []
        self.round = 0

    def _refill(self):
        for d in self.domains:
            self.pool += tasks.make_split(d, "train", self.chunk, seed=self.seed * 1000 + self.round)
        self.rng.shuffle(self.pool)
        self.round += 1

    def batch(self, n: int) -> list[dict]:
        if len(self.pool) < n:
            self._refill()
        out, self.pool = self.pool[:n], self.pool[n:]
        return out


def route_loss(router_logits, dom: torch.Tensor, valid: torch.Tensor, domains: list[str], n_experts: int) -> torch.Tensor:
    """Mean over layers and real tokens of −log Σ_{e ∈ pref(domain)} softmax(router logits)_e."""
    pref = torch.zeros((len(tasks.DOMAINS), n_experts))
    for d in domains:
        pref[tasks.DOMAINS.index(d), list(ROUTE_PREF[d])] = 1.0
    b, s = valid.shape
    target = pref[dom].unsqueeze(1).expand(b, s, n_experts).reshape(-1, n_experts)  # (tokens, E)
    v = valid.reshape(-1)
    total = 0.0
    for logits in router_logits:  # (tokens, E) per layer
        logp = torch.log_softmax(logits.float(), -1)
        mass = torch.logsumexp(logp.masked_fill(target == 0, -1e9), -1)
        total = total - mass[v].mean()
    return total / len(router_logits)


@torch.no_grad()
def evaluate_in_memory(model, tok, domains: list[str], n: int, seed: int, batch_size: int = 50) -> tuple[dict, dict]:
    """Teacher-forced exact match (= greedy exact match) and answer perplexity on each domain's test split,
    and routing frequencies (fraction of top-k slots per expert, per layer) over all tokens of those prompts."""
    model.eval()
    metrics, routing = {}, {}
    k = model.config.num_experts_per_tok
    for d in domains:
        recs = tasks.make_split(d, "test", n, seed=seed)
        exact, nll, ntok = 0, 0.0, 0
        counts = torch.zeros((model.config.num_hidden_layers, model.config.num_local_experts))
        for i in range(0, len(recs), batch_size):
            x, _, ans, _ = encode(tok, recs[i:i + batch_size], with_mask=False)
            out = model(input_ids=x, output_router_logits=True)
            logp = torch.log_softmax(out.logits[:, :-1].float(), -1)
            tgt, am = x[:, 1:], ans[:, 1:]
            tok_lp = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
            hit = (logp.argmax(-1) == tgt) | ~am
            exact += int(hit.all(-1).sum())
            nll -= float(tok_lp[am].sum())
            ntok += int(am.sum())
            valid = (x != PAD_ID).reshape(-1)
            for layer, logits in enumerate(out.router_logits):
                top = logits[valid].topk(k, -1).indices.reshape(-1)
                counts[layer] += torch.bincount(top, minlength=counts.shape[1]).float()
        metrics[d] = {"exact_match": exact / len(recs), "perplexity": math.exp(nll / ntok), "n": len(recs)}
        routing[d] = (counts / counts.sum(-1, keepdim=True)).round(decimals=4).tolist()
    model.train()
    return metrics, routing


def balance_loss(router_logits, dom: torch.Tensor, mask: torch.Tensor, top_k: int, scope: str) -> torch.Tensor:
    """Switch/Mixtral load-balancing loss: top_k when the load is uniform, E when every token goes to
    the same top_k experts.
    ``router_logits``: one (batch * seq, experts) tensor per layer, batch-major; ``mask``: (batch, seq)
    real tokens. ``scope`` "batch": the load over the whole batch; "domain": each domain's examples
    balanced on their own, averaged, so no domain may keep to a few experts."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    E = router_logits[0].shape[-1]
    if scope == "batch":
        return load_balancing_loss_func(router_logits, E, top_k, mask)
    B, S = mask.shape
    return torch.stack([load_balancing_loss_func(tuple(r.view(B, S, E)[dom == d].reshape(-1, E) for r in router_logits),
                                                 E, top_k, mask[dom == d]) for d in dom.unique()]).mean()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="lowmoe/assets/toy-moe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=48)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--loss-balance", choices=["token", "domain"], default="domain",
                   help="average the loss over all answer tokens, or per domain first")
    p.add_argument("--route-weight", type=float, default=0.2, help="weight of the per-domain routing prior (0 = off)")
    p.add_argument("--balance-weight", type=float, default=0.0,
                   help="weight of the Switch/Mixtral load-balancing loss (0 = off); with --route-weight 0 it gives a toy "
                        "whose experts are not specialised by domain")
    p.add_argument("--balance-scope", choices=["batch", "domain"], default="batch",
                   help="balance expert load over the whole batch, or within each domain's examples (averaged over "
                        "domains): 'domain' spreads every domain over all the experts, so even 50%% pruning costs accuracy")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=96)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-ffn", type=int, default=128)
    p.add_argument("--domains", default=",".join(tasks.DOMAINS))
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 is fastest for this small model (2 threads thrash when the cores are shared)")
    p.add_argument("--shard-size", default="2MB")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    domains = tasks.check_domains(args.domains)

    from transformers import GenerationConfig, MixtralForCausalLM

    t0 = time.time()
    torch.manual_seed(args.seed)  # transformers' weight init draws from the global generator
    cfg = model_config(args)
    cfg._experts_implementation = "eager"  # fastest on CPU for 8 small experts; the saved checkpoint is the same
    model = MixtralForCausalLM(cfg)
    model.train()
    tok = build_byte_tokenizer()
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %d parameters, %s", n_params, {k: getattr(cfg, k) for k in ("hidden_size", "num_hidden_layers", "num_local_experts", "intermediate_size")})

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    data = TrainData(domains, args.seed)
    history = []
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x, m, _, dom = encode(tok, data.batch(args.batch_size))
        out = model(input_ids=x, output_router_logits=args.route_weight > 0 or args.balance_weight > 0)
        logits = out.logits[:, :-1].float()
        tgt = x[:, 1:].masked_fill(~m[:, 1:], -100)
        if args.loss_balance == "token":
            lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)
        else:  # each domain's mean token loss counts equally (text would otherwise dominate: ~8x more loss tokens)
            tok_loss = F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=-100, reduction="none")  # (B, S-1)
            per_dom = [tok_loss[dom == d][m[dom == d, 1:]].mean() for d in dom.unique()]
            lm = torch.stack(per_dom).mean()
        loss = lm
        rl = torch.zeros(())
        if args.route_weight > 0:
            rl = route_loss(out.router_logits, dom, x != PAD_ID, domains, args.experts)
            loss = loss + args.route_weight * rl
        if args.balance_weight > 0:
            loss = loss + args.balance_weight * balance_loss(out.router_logits, dom, x != PAD_ID, args.top_k, args.balance_scope)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            log.info("step %d/%d  loss %.4f  route %.4f  lr %.2e  %.0fs", step, args.steps, lm.item(), rl.item(), lr_at(step), time.time() - t0)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            met, _ = evaluate_in_memory(model, tok, domains, 100, seed=args.seed)
            history.append({"step": step + 1, "wall_s": round(time.time() - t0, 1),
                            "exact_match": {d: v["exact_match"] for d, v in met.items()}})
            log.info("eval @%d: %s", step + 1, {d: round(v["exact_match"], 3) for d, v in met.items()})
    train_s = time.time() - t0

    metrics, routing = evaluate_in_memory(model, tok, domains, args.eval_n, seed=args.seed)
    for d in domains:
        log.info("%-10s exact %.3f  ppl %.3f", d, metrics[d]["exact_match"], metrics[d]["perplexity"])

    out_dir = Path(args.out)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False)
    model.save_pretrained(out_dir, max_shard_size=args.shard_size)
    save_byte_tokenizer(out_dir)
    specialisation = {d: [round(sum(r[e] for e in ROUTE_PREF[d]), 4) for r in routing[d]] for d in domains}
    report = {
        "format": "lowmoe-toy-training/1",
        "seed": args.seed,
        "args": vars(args),
        "parameters": n_params,
        "wall_time_s": round(time.time() - t0, 1),
        "train_time_s": round(train_s, 1),
        "threads": args.threads,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "eval": {"split": "test", "n": args.eval_n, "seed": args.seed, "metric": "teacher-forced exact match (= greedy) and answer perplexity"},
        "metrics": metrics,
        "route_preference": {d: list(ROUTE_PREF[d]) for d in domains},
        "routing_frequency": {"what": "per domain, per layer: fraction of top-k slots taken by each expert, over all prompt+answer tokens of the test split",
                              "by_domain": routing},
        "preferred_pair_share": specialisation,
        "history": history,
    }
    (out_dir / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")
    log.info("saved %s (%.0fs)", out_dir, time.time() - t0)


if __name__ == "__main__":
    main()
