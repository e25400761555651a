"""Prompt-lookup speculative decoding on the standard greedy workload: how many decode steps could it save
(issue 7, twelfth session)?

Speculative decoding keeps greedy's tokens exactly (a verify step keeps the drafted tokens the model itself
would pick). Prompt lookup (transformers' `prompt_lookup_num_tokens`) drafts for free: it looks the last
n tokens up earlier in the prompt and output and proposes the k tokens that followed them. This script
generates the standard workload greedily (8 prompts, exactly 64 new tokens) with an artifact, then replays
each row's output: at every verify step the draft is accepted up to its first wrong token, plus the one
token the verify step computes itself. It prints the verify steps each row needs for its 64 tokens.

The batch decodes together, so the slowest row bounds the batch's steps; 64 / its steps is the most a
verify step that cost no more than a plain step could gain (it costs more: k + 1 positions per row).

    .venv/bin/python benchmarks/prompt_lookup.py [--model export/smollm2-fp32-v3]
"""
from __future__ import annotations

import argparse


def draft(context: list[int], k: int, max_ngram: int, latest: bool) -> list[int]:
    """The k tokens that followed the longest (<= max_ngram) earlier match of the context's tail."""
    for n in range(max_ngram, 0, -1):
        if len(context) <= n:
            continue
        tail = context[-n:]
        starts = range(len(context) - n - 1, -1, -1) if latest else range(len(context) - n)
        for i in starts:
            if context[i:i + n] == tail:
                follow = context[i + n:i + n + k]
                if follow:
                    return follow
    return []


def verify_steps(prompt: list[int], output: list[int], k: int, max_ngram: int, latest: bool) -> int:
    """Verify steps to produce `output` after `prompt` with drafts of up to k tokens."""
    done = steps = 0
    while done < len(output):
        proposal = draft(prompt + output[:done], min(k, len(output) - done - 1), max_ngram, latest)
        accepted = 0
        while accepted < len(proposal) and proposal[accepted] == output[done + accepted]:
            accepted += 1
        done += accepted + 1
        steps += 1
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="export/smollm2-fp32-v3")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import deploylm
    from deploylm.benchmarking.workload import STANDARD_PROMPTS

    model = deploylm.load(args.model, threads=args.threads)
    results = model.generate(list(STANDARD_PROMPTS), num_beams=1, max_new_tokens=64, min_new_tokens=64)
    rows = [(model.tokenizer(r.prompt)["input_ids"], list(r.sequences[0].token_ids)) for r in results]
    new = len(rows[0][1])
    print(f"{len(rows)} rows x {new} new tokens (greedy, {args.model})")
    print("| search | k | n | verify steps per row | slowest | mean | bound 64/slowest | bound 64/mean |")
    print("|---|---|---|---|---|---|---|---|")
    for latest in (False, True):
        for k in (3, 5, 10):
            for n in (1, 2, 3):
                steps = [verify_steps(p, o, k, n, latest) for p, o in rows]
                mean = sum(steps) / len(steps)
                print(f"| {'latest' if latest else 'first'} | {k} | {n} | {' '.join(map(str, steps))} | {max(steps)} "
                      f"| {mean:.1f} | {new / max(steps):.2f}x | {new / mean:.2f}x |")


if __name__ == "__main__":
    main()
