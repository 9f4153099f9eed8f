"""Regenerate the offline lm-eval tasks' data (`python -m lowbit.eval.tasks.generate`).

Every item is built here from small word lists and arithmetic, with a fixed seed: no third-party text. The
questions are easy for a real language model and at chance for a random one, so a quantized model's drop shows.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).parent
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]  # fmt: skip
OPPOSITES = {
    "hot": "cold", "up": "down", "big": "small", "fast": "slow", "day": "night", "open": "closed", "early": "late",
    "full": "empty", "light": "dark", "high": "low", "left": "right", "wet": "dry", "happy": "sad", "hard": "soft",
    "loud": "quiet", "long": "short", "rich": "poor", "thick": "thin", "inside": "outside", "win": "lose",
}  # fmt: skip
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve"]  # fmt: skip
SOUNDS = {"cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "owl": "hoot"}
COLOURS = {"grass": "green", "the sky on a clear day": "blue", "snow": "white", "coal": "black",
           "a ripe banana": "yellow"}  # fmt: skip
PLURALS = {
    "mouse": "mice",
    "child": "children",
    "foot": "feet",
    "tooth": "teeth",
    "man": "men",
    "woman": "women",
    "goose": "geese",
    "person": "people",
    "box": "boxes",
    "baby": "babies",
    "leaf": "leaves",
    "knife": "knives",
}
PLACES = {"fish": "water", "bird": "sky", "cow": "field", "bee": "hive", "bear": "forest", "camel": "desert"}
TEST_ITEMS, TRAIN_ITEMS = 200, 20


def _options(rng: random.Random, answer: str, pool: list[str], k: int = 4) -> tuple[list[str], int]:
    """`answer` plus k-1 distinct distractors from `pool`, shuffled; returns (choices, index of the answer)."""
    distractors = rng.sample([item for item in dict.fromkeys(pool) if item != answer], k - 1)
    choices = [answer, *distractors]
    rng.shuffle(choices)
    return choices, choices.index(answer)


def _mc_item(rng: random.Random) -> dict:
    kind = rng.randrange(6)
    if kind <= 1:  # arithmetic
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        word, answer = ("plus", a + b) if kind == 0 else ("minus", max(a, b) - min(a, b))
        a, b = (a, b) if kind == 0 else (max(a, b), min(a, b))
        pool = [str(answer + d) for d in (-3, -2, -1, 1, 2, 3) if answer + d >= 0]
        choices, index = _options(rng, str(answer), pool)
        return {"question": f"What is {a} {word} {b}?", "choices": choices, "answer": index}
    if kind == 2:
        names, unit = (DAYS, "day of the week") if rng.random() < 0.5 else (MONTHS, "month")
        i = rng.randrange(len(names))
        choices, index = _options(rng, names[(i + 1) % len(names)], names)
        return {"question": f"Which {unit} comes after {names[i]}?", "choices": choices, "answer": index}
    if kind == 3:
        word = rng.choice(sorted(OPPOSITES))
        choices, index = _options(rng, OPPOSITES[word], list(OPPOSITES.values()))
        return {"question": f"What is the opposite of {word}?", "choices": choices, "answer": index}
    if kind == 4:
        n = rng.randrange(len(NUMBER_WORDS) - 1)
        choices, index = _options(rng, NUMBER_WORDS[n + 1], NUMBER_WORDS)
        return {"question": f"Which number comes after {NUMBER_WORDS[n]}?", "choices": choices, "answer": index}
    if rng.random() < 0.5:
        animal = rng.choice(sorted(SOUNDS))
        choices, index = _options(rng, SOUNDS[animal], list(SOUNDS.values()))
        return {"question": f"What sound does a {animal} make?", "choices": choices, "answer": index}
    thing = rng.choice(sorted(COLOURS))
    choices, index = _options(rng, COLOURS[thing], [*COLOURS.values(), "red", "purple"])
    return {"question": f"What colour is {thing}?", "choices": choices, "answer": index}


def _yesno_item(rng: random.Random, truth: bool) -> dict:
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.sample(range(1, 100), 2)
        a, b = (max(a, b), min(a, b)) if truth else (min(a, b), max(a, b))
        question = f"Is {a} greater than {b}?"
    elif kind == 1:
        n = rng.randrange(1, 50) * 2 + (0 if truth else 1)
        question = f"Is {n} an even number?"
    elif kind == 2:
        i = rng.randrange(7)
        j = (i + 1) % 7 if truth else (i + rng.randrange(2, 7)) % 7
        question = f"Does {DAYS[j]} come right after {DAYS[i]}?"
    elif kind == 3:
        word = rng.choice(sorted(OPPOSITES))
        other = OPPOSITES[word] if truth else rng.choice([w for w in OPPOSITES.values() if w != OPPOSITES[word]])
        question = f"Is {other} the opposite of {word}?"
    else:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        total = a + b if truth else a + b + rng.choice((-2, -1, 1, 2))
        question = f"Is {a} plus {b} equal to {total}?"
    return {"question": question, "label": int(truth)}


def _cloze_item(rng: random.Random) -> dict:
    """Raw-text continuations (scored like LAMBADA/HellaSwag: the likelihood of each ending after the context)."""
    kind = rng.randrange(6)
    if kind <= 1:  # continue a run of days, months or number words
        names = (DAYS, MONTHS, NUMBER_WORDS[1:])[rng.randrange(3)] if kind == 0 else MONTHS
        length, start = rng.randint(3, 4), rng.randrange(len(names))
        run = [names[(start + k) % len(names)] for k in range(length + 1)]
        if names is NUMBER_WORDS[1:] or start + length >= len(names):
            start = rng.randrange(len(names) - length)
            run = names[start : start + length + 1]
        context, answer, pool = ", ".join(run[:-1]) + ",", run[-1], list(names)
    elif kind == 2:
        step, first = rng.randint(1, 9), rng.randint(1, 30)
        run = [first + step * k for k in range(5)]
        context, answer = ", ".join(map(str, run[:-1])) + ",", str(run[-1])
        pool = [str(run[-1] + d) for d in (-3, -2, -1, 1, 2, 3)]
    elif kind == 3:
        word = rng.choice(sorted(PLURALS))
        context = f"I saw one {word}, and then I saw two"
        answer, pool = PLURALS[word], list(PLURALS.values())
    elif kind == 4:
        word = rng.choice(sorted(OPPOSITES))
        context, answer, pool = f"It was not {word} at all. It was very", OPPOSITES[word], list(OPPOSITES.values())
    else:
        animal = rng.choice(sorted(PLACES))
        context = f"The {animal} went back home to the"
        answer, pool = PLACES[animal], list(PLACES.values())
    choices, index = _options(rng, answer, pool)
    return {"context": context, "choices": choices, "answer": index}


def build(make: Callable[[random.Random, int], dict], seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < TEST_ITEMS + TRAIN_ITEMS:
        row = make(rng, len(rows))
        key = row.get("question", row.get("context"))
        if key in seen:  # unique questions: few-shot examples never repeat a test item
            continue
        seen.add(key)
        rows.append({**row, "split": "train" if len(rows) < TRAIN_ITEMS else "test"})
    return rows


def main() -> None:
    tasks = {
        "lowbit_mc.jsonl": build(lambda rng, _i: _mc_item(rng), seed=1),
        "lowbit_yesno.jsonl": build(lambda rng, i: _yesno_item(rng, truth=i % 2 == 0), seed=2),
        "lowbit_cloze.jsonl": build(lambda rng, _i: _cloze_item(rng), seed=3),
    }
    for name, rows in tasks.items():
        (HERE / name).write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    main()
