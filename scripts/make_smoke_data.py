#!/usr/bin/env python
"""Write the synthetic smoke-test preference data set (deterministic from --seed).

Each pair is a request built from a template and a topic. The chosen answer is
polite, on topic and gives two steps; the rejected one is curt, rude or off
topic. The style gap is systematic, so even a tiny model can learn it with
DPO, and because val prompts are unseen (template, topic) combinations the
learned preference has to generalise rather than be memorised.
"""

import argparse
import json
import random
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "mlx_dpo" / "assets" / "smoke"

TOPICS = [
    "cactus", "garden", "bike", "car", "laptop", "phone", "kitchen", "dog",
    "cat", "plant", "tent", "boat", "guitar", "piano", "printer", "oven",
    "lawn", "roof", "fence", "shoes", "jacket", "desk", "chair", "lamp",
    "window", "door", "sofa", "bed", "fridge", "camera", "watch", "bread",
    "soup", "cake", "coffee", "tea", "resume", "essay", "budget", "garage",
    "pool", "aquarium", "horse", "rabbit", "tomato", "rose", "tree", "pond",
    "kayak", "drone", "router", "keyboard", "mirror", "carpet", "bathroom",
    "backpack", "wallet", "violin", "skateboard", "scooter",
]

TEMPLATES = [
    "How do I take care of my {t}?",
    "How do I clean my {t}?",
    "How do I fix my {t}?",
    "Can you help me with my {t}?",
    "What is the best way to clean a {t}?",
    "Any tips for choosing a {t}?",
    "Explain how a {t} works.",
    "Please give me advice about my {t}.",
    "What should I know before buying a {t}?",
    "How can I make my {t} last longer?",
    "Why is my {t} not working?",
    "How often should I check my {t}?",
    "What do I need to start with a {t}?",
    "Tell me how to set up a {t}.",
    "Is it hard to look after a {t}?",
    "How do I keep my {t} safe?",
    "What mistakes do people make with a {t}?",
    "Give me a quick guide to my {t}.",
    "How should I store my {t}?",
    "Where do I begin with a new {t}?",
    "Can you explain how to care for a {t}?",
    "What is a simple routine for my {t}?",
    "How do I get better at using my {t}?",
    "My {t} looks bad. What can I do?",
]

OPENERS = [
    "Sure, happy to help!", "Great question!", "Of course!", "Good question.",
    "Happy to help.", "Sure thing!", "Thanks for asking!", "I can help with that.",
]
FIRST_STEPS = [
    "read the guide for your {t}", "look at your {t} closely",
    "clean your {t} gently", "check your {t} every week",
    "make a short plan for the {t}", "start with the basics of the {t}",
    "keep your {t} in a dry place", "write down what the {t} needs",
]
SECOND_STEPS = [
    "fix small problems early", "ask an expert if you are unsure",
    "keep a simple routine", "take your time with each step",
    "use the right tools", "test it again after a day",
    "be patient and careful", "keep notes on what works",
]
CLOSERS = [
    "I hope this helps.", "Good luck with your {t}.", "You can do it.",
    "Let me know if you need more help.", "Have fun with your {t}.",
    "Enjoy your {t}.",
]

# Rejected answers mirror the chosen structure (opener, two sentences,
# optional closer, each drawn from a bank of similar size) but are curt, rude
# or off topic. Matching the structure keeps the two styles at about the same
# length and entropy, so an SFT model trained on both has no built-in
# preference and length alone is not a usable signal for DPO.
CURT_OPENERS = [
    "Ugh.", "Whatever.", "No.", "Not again.", "Seriously?", "Meh.",
    "Oh please.", "Sigh.",
]
RUDE_OR_OFF_TOPIC = [
    "Why would I care about your {t}?", "Your {t} is your problem, not mine.",
    "That is a dumb question about a {t}.", "Just throw the {t} away.",
    "A {t}? Deal with it yourself.", "I like trains more than a {t2}.",
    "my {t2} is better lol", "The weather is nice today.",
]
DISMISSALS = [
    "No idea.", "Figure it out yourself.", "Not my problem.", "Ask someone else.",
    "Do not bother me.", "Google it.", "Who cares.", "lol no",
]
RUDE_CLOSERS = [
    "Go away.", "Stop asking.", "Leave me alone.", "I am busy.", "Bye.", "Enough.",
]


def chosen_response(rng: random.Random, topic: str) -> str:
    """Polite, on topic, two concrete steps, full sentences ending in a period."""
    first = rng.choice(FIRST_STEPS).format(t=topic)
    second = rng.choice(SECOND_STEPS)
    parts = [rng.choice(OPENERS), f"First, {first}.", f"Then {second}."]
    # The closer is optional to keep sequences short and lengths varied.
    if rng.random() < 0.5:
        parts.append(rng.choice(CLOSERS).format(t=topic))
    return " ".join(parts)


def rejected_response(rng: random.Random, topic: str) -> str:
    """Curt and dismissive; "t2" names a *different* topic (off-topic answers)."""
    other = rng.choice([t for t in TOPICS if t != topic])
    middle = rng.choice(RUDE_OR_OFF_TOPIC).format(t=topic, t2=other)
    parts = [rng.choice(CURT_OPENERS), middle, rng.choice(DISMISSALS)]
    if rng.random() < 0.5:
        parts.append(rng.choice(RUDE_CLOSERS))
    return " ".join(parts)


def scores(rng: random.Random) -> tuple[float, float]:
    """1-10 scores; about 5% of pairs have a narrow gap (chosen only just better)."""
    if rng.random() < 0.05:
        rejected = rng.choice([4.0, 4.5, 5.0, 5.5])
        return rejected + rng.choice([0.5, 1.0]), rejected
    return rng.choice([7.0, 7.5, 8.0, 8.5, 9.0, 9.5, 10.0]), rng.choice(
        [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0])


def make_pair(rng: random.Random, template: str, topic: str) -> dict:
    chosen, rejected = chosen_response(rng, topic), rejected_response(rng, topic)
    score_chosen, score_rejected = scores(rng)
    return {"prompt": template.format(t=topic), "chosen": chosen,
            "rejected": rejected, "score_chosen": score_chosen,
            "score_rejected": score_rejected}


def build_splits(seed: int, n_train: int, n_val: int) -> tuple[list, list]:
    """Each (template, topic) combination is used at most once, so the prompt
    sets of train and val are disjoint by construction."""
    rng = random.Random(seed)
    combos = [(tpl, t) for tpl in TEMPLATES for t in TOPICS]
    if n_train + n_val > len(combos):
        raise ValueError(f"only {len(combos)} distinct prompts available")
    rng.shuffle(combos)
    pairs = [make_pair(rng, tpl, t) for tpl, t in combos[: n_train + n_val]]
    return pairs[:n_train], pairs[n_train:]


def write_jsonl(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="ascii") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=1200)
    parser.add_argument("--n-val", type=int, default=200)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    train, val = build_splits(args.seed, args.n_train, args.n_val)
    assert all(p["chosen"] != p["rejected"] for p in train + val)
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in val}
    write_jsonl(args.out_dir / "train.jsonl", train)
    write_jsonl(args.out_dir / "val.jsonl", val)
    print(f"wrote {len(train)} train / {len(val)} val pairs to {args.out_dir}")


if __name__ == "__main__":
    main()
