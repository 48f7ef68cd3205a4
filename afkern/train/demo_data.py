"""The GENERATED demo tasks of ``afkern-train demo``: synthetic sentences from word lists by seeded
rules, three source tasks and one small target related to two of them. Not a benchmark."""

from __future__ import annotations

import random
from typing import List, Sequence, Tuple

from .data import TaskData

__all__ = ["GENERATED_NOTE", "make_demo_tasks", "demo_vocabulary"]

GENERATED_NOTE = (
    "GENERATED data: synthetic sentences built from word lists by seeded rules "
    "(afkern.train.demo_data.make_demo_tasks); not a real benchmark, accuracies say nothing about real tasks"
)

_TOPICS = {
    "sports": ["football", "match", "goal", "team", "coach", "stadium", "tennis", "player", "race", "league",
               "referee", "season"],
    "food": ["pizza", "soup", "bread", "chef", "recipe", "dinner", "cheese", "salad", "dessert", "restaurant",
             "coffee", "noodles"],
    "science": ["experiment", "telescope", "molecule", "laboratory", "physics", "research", "planet", "theory",
                "microscope", "chemistry", "data", "scientist"],
    "travel": ["flight", "hotel", "beach", "passport", "train", "island", "museum", "airport", "luggage", "mountain",
               "tour", "harbor"],
}
_POS = ["wonderful", "great", "excellent", "delightful", "amazing", "superb", "pleasant", "fantastic", "lovely",
        "brilliant"]
_NEG = ["terrible", "awful", "horrible", "disappointing", "dreadful", "poor", "boring", "nasty", "miserable",
        "annoying"]
_NEUTRAL = ["new", "old", "big", "small", "local", "usual", "second", "long"]
_SUBJ = ["my friend", "the reviewer", "our group", "a neighbour", "my sister", "the visitor", "everyone", "the author",
         "my colleague", "the guide"]
_VERB = ["said", "thought", "felt", "wrote", "claimed", "noted", "told us"]
_TAIL = ["today", "this week", "again", "last night", "at last", "as usual", "once more", "yesterday", "", ""]
_OTHER = ["weather", "street", "book", "phone", "garden", "office", "meeting", "window"]


def demo_vocabulary() -> List[str]:
    """Every word the demo generator can emit (for building a tiny tokenizer in tests)."""
    words = set()
    for ws in list(_TOPICS.values()) + [_POS, _NEG, _NEUTRAL, _SUBJ, _VERB, _TAIL, _OTHER]:
        for w in ws:
            words.update(w.split())
    words.update("the was were and a what did seem is it really honestly felt , ? .".split())
    words.update(["about", "how", "was", "were", "not", "quite"])
    return sorted(words)


def _sentence(rng: random.Random, nouns: Sequence[str], adj: str, question: bool = False) -> str:
    n1, n2 = rng.choice(nouns), rng.choice(nouns + _OTHER)
    subj, verb, tail = rng.choice(_SUBJ), rng.choice(_VERB), rng.choice(_TAIL)
    if question:
        t = rng.choice([
            f"did {subj} think the {n1} was {adj} ?",
            f"was the {n1} really {adj} {tail} ?",
            f"how {adj} was the {n1} and the {n2} ?",
            f"is it {adj} about the {n1} ?",
        ])
    else:
        t = rng.choice([
            f"{subj} {verb} the {n1} was {adj} {tail} .",
            f"the {n1} and the {n2} were {adj} .",
            f"what a {adj} {n1} {tail} .",
            f"honestly the {n1} felt {adj} {tail} .",
            f"{subj} {verb} it was a {adj} {n1} near the {n2} .",
        ])
    return " ".join(t.split())


def make_demo_tasks(seed: int = 0, quick: bool = False) -> Tuple[List[TaskData], TaskData]:
    """GENERATED classification tasks: (source tasks, target task).

    Sources (different sizes): ``topic`` (4 topics: sports/food/science/travel; the adjective is
    noise), ``sentiment`` (positive/negative adjective; the topic is noise), ``question`` (question
    or statement; unrelated to the target, a distractor). Target ``routing`` (small): 4 labels that
    combine a topic group (outdoor = sports/travel, indoor = food/science) with the sentiment, so it
    is related to ``topic`` and ``sentiment`` and AdapterFusion can transfer from them.
    """
    rng = random.Random(seed)
    topics = list(_TOPICS)
    sizes = dict(topic=(320, 96), sentiment=(256, 96), question=(64, 96), routing=(24, 160)) if quick else \
        dict(topic=(2000, 400), sentiment=(1500, 400), question=(600, 400), routing=(96, 400))

    def sample(task: str):
        pol = rng.random() < 0.5
        adj = rng.choice(_POS if pol else _NEG)
        topic = rng.choice(topics)
        if task == "topic":
            if rng.random() < 0.3:
                adj = rng.choice(_NEUTRAL)
            return _sentence(rng, _TOPICS[topic], adj, question=rng.random() < 0.2), topic
        if task == "sentiment":
            return _sentence(rng, _TOPICS[topic], adj, question=False), "positive" if pol else "negative"
        if task == "question":
            q = rng.random() < 0.5
            adj = rng.choice(_POS + _NEG + _NEUTRAL)
            return _sentence(rng, _TOPICS[topic], adj, question=q), "question" if q else "statement"
        group = "outdoor" if topic in ("sports", "travel") else "indoor"
        return _sentence(rng, _TOPICS[topic], adj, question=False), f"{group}_{'praise' if pol else 'complaint'}"

    out = []
    for task, (n_train, n_dev) in sizes.items():
        train = [sample(task) for _ in range(n_train)]
        dev = [sample(task) for _ in range(n_dev)]
        names = sorted({lab for _, lab in train + dev})
        ids = {n: i for i, n in enumerate(names)}
        out.append(TaskData(
            name=task, label_names=names,
            train_text=[t for t, _ in train], train_labels=[ids[lab] for _, lab in train],
            dev_text=[t for t, _ in dev], dev_labels=[ids[lab] for _, lab in dev],
            source=f"generated(seed={seed}, quick={quick})", generated=True,
        ))
    return out[:-1], out[-1]
