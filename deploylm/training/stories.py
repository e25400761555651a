"""The built-in text for the decoder-only LM: short generated stories (`--task stories --arch decoder`).

Each paragraph introduces a person, an animal, a place and a thing, then keeps referring back to
them many words later ("... One morning Clara found an old key by the river. ... the owl said:
Clara, keep the key safe."). Those long-range references are what a count-based n-gram model cannot
see past its n-1 tokens and what attention can, so the neural LM's perplexity beats the n-gram
baseline's on this text after a few hundred steps. Deterministic from the seed; write it to a file
with `python -m deploylm.training.stories --paragraphs 2000 > stories.txt`.
"""
from __future__ import annotations

import argparse

import numpy as np

NAMES = ("Anna Boris Clara David Elena Felix Greta Hugo Iris Jonas Karin Leo Mara Nils Olga Paul Rosa Sven "
         "Tara Umar Vera Walter").split()
ANIMALS = "fox owl cat dog crow hare wolf goat mouse bear".split()
PLACES = "river forest hill garden market bridge village lake meadow harbour".split()
THINGS = (("an", "old", "key"), ("a", "red", "apple"), ("a", "small", "boat"), ("a", "silver", "coin"),
          ("a", "blue", "hat"), ("a", "wooden", "box"), ("a", "green", "lamp"), ("a", "long", "rope"))
TIMES = ("One morning", "One evening", "On a cold day", "Late at night", "After the rain")
FEELINGS = "happy tired curious afraid proud".split()
STORIES_PARAGRAPHS = 2500          # the `--task stories` corpus (about 250k tokens)


def story(rng: np.random.Generator) -> str:
    """One paragraph; its characters, place and thing are drawn from `rng`."""
    name, friend = (str(x) for x in rng.choice(NAMES, size=2, replace=False))
    animal, place = str(rng.choice(ANIMALS)), str(rng.choice(PLACES))
    article, colour, thing = THINGS[int(rng.integers(len(THINGS)))]
    when, feeling = str(rng.choice(TIMES)), str(rng.choice(FEELINGS))
    sentences = [
        f"{name} lived near the {place} with a {animal}.",
        f"{when} {name} found {article} {colour} {thing} by the {place}.",
        f"{name} was {feeling} and showed the {thing} to {friend}.",
        f"{friend} looked at the {colour} {thing} for a long time.",
        f"Then the {animal} said: {name}, keep the {thing} safe.",
        f"So {name} took the {thing} home, and {friend} went back to the {place}.",
    ]
    if rng.random() < 0.5:                      # vary the middle so paragraphs differ in shape
        sentences[2], sentences[3] = f"{friend} came to the {place} to see it.", f"{name} gave the {thing} to {friend}."
    if rng.random() < 0.3:
        sentences.insert(1, f"Every day the {animal} walked with {name} to the {place}.")
    return " ".join(sentences)


def stories(seed: int, paragraphs: int = STORIES_PARAGRAPHS) -> list[str]:
    """`paragraphs` stories drawn from `seed`."""
    rng = np.random.default_rng([seed, 7])
    return [story(rng) for _ in range(paragraphs)]


def main() -> None:
    parser = argparse.ArgumentParser(description="Print the built-in stories, paragraphs separated by blank lines.")
    parser.add_argument("--paragraphs", type=int, default=STORIES_PARAGRAPHS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("\n\n".join(stories(args.seed, args.paragraphs)))


if __name__ == "__main__":
    main()
