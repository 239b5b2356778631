"""Seconds per training step and tokens/s for the embedded SmolLM2 at TRL's GRPO setting.

8 prompts x 8 samples x 32 new tokens, ~46-token chat prompts, one forward + backward + AdamW step.
Providers:

* ``tao-shared-prefix``: ``tao_core.train.Trainer`` (prompt computed once per group, no padding,
  head on completion tokens only through ``tao_kernels``);
* ``tao-padded``: the same Trainer with one padded row per completion (head still on completions);
* ``naive-hf``: what a user (or TRL) writes: a padded ``[64, 78]`` HF forward with full logits,
  ``log_softmax``, gather, the GRPO loss, backward, AdamW.

Each provider runs in a fresh subprocess so its peak resident memory is its own. Prints CSV:
``provider,precision,device,threads,prompts,samples,new_tokens,prompt_tokens,s_per_step,
completion_tokens_per_s,peak_rss_mb,torch,date``. Completions are random tokens with made-up rewards:
the cost of a step does not depend on what the tokens say.

    TAO_HOME=/tmp/taohome python bench/train_step.py [--steps 3] [--precision fp32,bf16] [--threads N]

The tao providers run bf16 with ``old_logprobs="current"`` (see ``TrainConfig``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

PROVIDERS = ("tao-shared-prefix", "tao-padded", "naive-hf")
QUESTIONS = [f"What is {a} + {b}? Answer with the number only, after thinking step by step." for a, b in
             [(17, 25), (48, 39), (63, 21), (90, 11), (34, 58), (72, 19), (26, 44), (85, 13)]]


def make_batch(lm, n: int, new_tokens: int, seed: int = 0):
    from tao_core.types import Candidate, Prompt, Score

    g = torch.Generator().manual_seed(seed)
    prompts = [Prompt(id=str(i), text=q) for i, q in enumerate(QUESTIONS)]
    vocab = lm.model.config.vocab_size
    groups, scores = [], []
    for p in prompts:
        ids = lm.prompt_token_ids(p)
        cands = []
        for j in range(n):
            toks = torch.randint(0, vocab, (new_tokens,), generator=g).tolist()
            lps = (-torch.rand(new_tokens, generator=g) * 5).tolist()
            cands.append(Candidate(p.id, j, "", ids, toks, lps, temperature=1.0))
        groups.append(cands)
        scores.append([Score.ok(float(torch.rand(1, generator=g) > 0.5)) for _ in range(n)])
    return prompts, groups, scores


def naive_step(model, optimizer, groups, scores, precision: str) -> None:
    """A padded HF forward over [prompt + completion] rows with full logits: TRL's shape of work."""
    rows = [c.prompt_token_ids + c.token_ids for grp in groups for c in grp]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    comp = torch.zeros(len(rows), width - 1)
    for i, (r, c) in enumerate(zip(rows, [c for grp in groups for c in grp], strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        comp[i, len(c.prompt_token_ids) - 1 : len(r) - 1] = 1
    rewards = torch.tensor([[s.value for s in grp] for grp in scores])
    adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).flatten()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast("cpu", enabled=False)
    optimizer.zero_grad()
    with ctx:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    lp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    ratio = torch.exp(lp - lp.detach())  # one update per batch: old policy = current
    per = -torch.minimum(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None])
    loss = ((per * comp).sum(1) / comp.sum(1)).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def run_provider(provider: str, precision: str, steps: int, n: int, new_tokens: int, n_prompts: int) -> dict:
    from tao_core.models import load_model
    from tao_core.train import TrainConfig, Trainer

    lm = load_model("smollm2-135m")
    prompts, groups, scores = (x[:n_prompts] for x in make_batch(lm, n, new_tokens))
    if provider == "naive-hf":
        lm.model.train()
        opt = torch.optim.AdamW(lm.model.parameters(), lr=5e-6)
        step = lambda: naive_step(lm.model, opt, groups, scores, precision)
    else:
        layout = "shared_prefix" if provider == "tao-shared-prefix" else "padded"
        old = "current" if precision == "bf16" else "sampled"  # CPU bf16 is used with the policy's own old log-probs
        trainer = Trainer(lm, TrainConfig(objective="grpo", layout=layout, precision=precision, old_logprobs=old))
        step = lambda: trainer.step(prompts, groups, scores)
    times = []
    for _ in range(steps + 1):  # the first step warms up allocators and the optimizer state
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    sec = statistics.median(times[1:])
    return {
        "prompt_tokens": round(statistics.mean(len(g[0].prompt_token_ids) for g in groups), 1),
        "s_per_step": round(sec, 3),
        "completion_tokens_per_s": round(len(groups) * n * new_tokens / sec, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per provider (median reported)")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step (at most 8)")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one provider,precision in this process
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        provider, precision = args.one.split(",")
        print(json.dumps(run_provider(provider, precision, args.steps, args.samples, args.new_tokens, args.prompts)))
        return
    cols = ["provider", "precision", "device", "threads", "prompts", "samples", "new_tokens", "prompt_tokens",
            "s_per_step", "completion_tokens_per_s", "peak_rss_mb", "torch", "date"]
    print(",".join(cols), flush=True)
    for precision in args.precision.split(","):
        for provider in args.providers.split(","):
            cmd = [sys.executable, __file__, "--one", f"{provider},{precision}", "--steps", str(args.steps),
                   "--samples", str(args.samples), "--new-tokens", str(args.new_tokens),
                   "--prompts", str(args.prompts), "--threads", str(args.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            if res.returncode != 0:
                print(f"# {provider} {precision} failed: {res.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            row = {"provider": provider, "precision": precision, "device": "cpu", "threads": torch.get_num_threads(),
                   "prompts": args.prompts, "samples": args.samples, "new_tokens": args.new_tokens,
                   **json.loads(res.stdout.strip().splitlines()[-1]), "torch": torch.__version__,
                   "date": datetime.date.today().isoformat()}
            print(",".join(str(row[c]) for c in cols), flush=True)


if __name__ == "__main__":
    main()
