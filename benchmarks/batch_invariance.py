"""How much a prompt's result moves when it is decoded in a batch beside a longer prompt (left padding)
instead of alone: max |Δ logit| of its first step, and whether its beams stay the same.

    .venv/bin/python benchmarks/batch_invariance.py export/smollm2-fp32-v3 export/smollm2-int8-v5

fp32 moves in the last float bits (the padded row's attention sums in another order). Profiles that
round activations to int8 inside their MatMuls (int8 at accuracy_level 4, int8-dynamic, int8-static)
turn such a last-bit difference into a whole rounding step now and then: docs/serving.md, "Batching".
"""
from __future__ import annotations

import argparse

import deploylm

PROMPT = "Once upon a time there was a little"
EXTRAS = (" a", " a b c", " a b c d e f g h i j", " and then the story went on for a while")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    for src in args.models:
        gen = deploylm.load(src)
        first_alone, _ = gen.backend.prefill(gen.encode([PROMPT]))
        alone = gen.generate(PROMPT, num_beams=args.num_beams, num_return_sequences=args.num_beams,
                             max_new_tokens=args.max_new_tokens)[0]
        for extra in EXTRAS:
            logits, _ = gen.backend.prefill(gen.encode([PROMPT + extra, PROMPT]))
            moved = float((logits[1].float() - first_alone[0].float()).abs().max())
            batched = gen.generate([PROMPT + extra, PROMPT], num_beams=args.num_beams,
                                   num_return_sequences=args.num_beams, max_new_tokens=args.max_new_tokens)[1]
            same = sum(a.token_ids == b.token_ids for a, b in zip(alone.sequences, batched.sequences))
            print(f"{src}  +{gen.count_tokens(PROMPT + extra) - gen.count_tokens(PROMPT):>2} tokens beside: "
                  f"first-step max|Δ logit| {moved:.2e}, beams identical {same}/{len(alone.sequences)}, "
                  f"best score {alone.sequences[0].score:.6f} alone, {batched.sequences[0].score:.6f} batched")


if __name__ == "__main__":
    main()
