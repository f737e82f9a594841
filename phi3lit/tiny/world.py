"""The offline lab's world: invented people, three facts each, as documents for pretraining and as chats for LoRA.

A random-init base can only teach LoRA the chat format. To show LoRA doing what it is for (steering knowledge the
base already holds), `builtin:tiny-phi3` is pretrained on this world (`phi3lit.tiny.pretrain`) and the default
recipe fine-tunes it to answer questions about it in chat.

- **The base learns the facts as plain text**: short biographies ("Kenur lives in Eastwick. Kenur owns a rabbit.")
  with the sentence order and wording drawn at random each time, which makes a fact retrievable from the name
  whatever the context (Allen-Zhu & Li, "Physics of Language Models 3.1": knowledge augmentation). For the
  `train` people only, question-and-answer documents too ("Where does Kenur live?\nEastwick"): mixed training,
  from the same paper, teaches the base to extract facts, and it then extracts them for people it never saw asked
  about. The base also reads the skill chats of `assets/tiny_chat.jsonl` (arithmetic, reversal, ...), so it knows
  Phi-3's chat format, but it never sees a chat about a person.
- **LoRA learns the task in chat**: conversations asking about the `train` people only (`assets/world/train.jsonl`).
  Validation asks about the `val` people and the demo eval task (`phi3lit_demo`) about the `test` people: no
  question there, and no answer about those people, was ever in the fine-tuning data, so the score measures
  whether the adapter reads the base's knowledge, not whether it memorised replies.

Everything is drawn from one seeded `random.Random`, so the world, the shipped files and the base are the same on
every machine; `python -m phi3lit.tiny` rewrites the shipped files and a test checks them against this code.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# Each relation: the values a person can have, how a biography says it, and how a user asks about it.
VALUES = {
    "city": ["Brimford", "Coldwater", "Dunmore", "Eastwick", "Fairhaven", "Greystone", "Highmoor", "Larkspur"],
    "pet": ["cat", "dog", "fish", "bird", "frog", "goat", "horse", "rabbit"],
    "colour": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"],
}
STATEMENTS = {
    "city": ["{name} lives in {value}.", "{name} has a home in {value}.", "The town of {name} is {value}."],
    "pet": ["{name} has a pet {value}.", "The pet of {name} is a {value}.", "{name} owns a {value}."],
    "colour": [
        "{name} likes the colour {value}.",
        "The favourite colour of {name} is {value}.",
        "{name} loves {value}.",
    ],
}
QUESTIONS = {
    "city": ["Where does {name} live?", "Which town is {name} from?"],
    "pet": ["What pet does {name} have?", "Which animal does {name} own?"],
    "colour": ["What is {name}'s favourite colour?", "Which colour does {name} like?"],
}
MIX = {"chat": 0.3, "qa": 0.21, "biography": 0.49}  # shares of pretraining documents (a chat is ~3x longer)
QA_SPLITS = ("train",)  # whose facts the base also reads as plain-text question-and-answer documents
SPLITS = {"train": 64, "val": 16, "test": 16}  # people per split; LoRA trains on chats about `train` only
_CONSONANTS, _VOWELS, _ENDINGS = "bdfgklmnprstvz", "aeiou", "lnr"
_TAKEN = {"Biden", "Nikol", "Timor"}  # drawn names that are real people or places: skipped
_SYSTEMS = ["You are a helpful assistant.", "Answer briefly and exactly.", "You know everyone in town."]


@dataclass(frozen=True)
class Person:
    name: str
    facts: dict[str, str]  # relation -> value
    split: str


def make_world(seed: int = 0) -> list[Person]:
    """The people of the world, in split order (train, val, test), with their facts."""
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < sum(SPLITS.values()):  # five-letter names: one token each in the tiny tokenizer
        c, v = rng.choice, rng.choice
        name = (c(_CONSONANTS) + v(_VOWELS) + c(_CONSONANTS) + v(_VOWELS) + c(_ENDINGS)).capitalize()
        if name not in names and name not in _TAKEN:
            names.append(name)
    splits = [s for s, n in SPLITS.items() for _ in range(n)]
    return [
        Person(name, {r: rng.choice(vals) for r, vals in VALUES.items()}, split)
        for name, split in zip(names, splits, strict=True)
    ]


def questions(person: Person) -> list[tuple[str, str]]:
    """Every (question, reply) about a person: the reply is the bare value ("Eastwick"), scored by exact match."""
    return [(q.format(name=person.name), person.facts[r]) for r in QUESTIONS for q in QUESTIONS[r]]


def biography(person: Person, rng: random.Random) -> str:
    """One plain-text document stating all of a person's facts, in a random order and wording."""
    sentences = [rng.choice(STATEMENTS[r]).format(name=person.name, value=v) for r, v in person.facts.items()]
    rng.shuffle(sentences)
    return " ".join(sentences)


def qa_document(person: Person, rng: random.Random) -> str:
    """A plain-text question and, on the next line, its answer: pretraining text, not a chat (no template, no
    special tokens). The answer starts a line as a chat reply does, so it is the same token ("Eastwick", not
    " Eastwick" as in a biography): a byte-level BPE gives a word a different id after a space, and the base must
    have produced the reply's tokens before for LoRA to reach them."""
    question, answer = rng.choice(questions(person))
    return f"{question}\n{answer}"


def pretraining_documents(world: list[Person], chats: list[str], rng: random.Random):
    """An endless stream of pretraining documents drawn by MIX: biographies (everyone), question-and-answer
    documents (`train` people only) and rendered skill chats (the chat format, on other topics)."""
    asked = [p for p in world if p.split in QA_SPLITS]
    while True:
        u = rng.random()
        if u < MIX["chat"]:
            yield rng.choice(chats)
        elif u < MIX["chat"] + MIX["qa"]:
            yield qa_document(rng.choice(asked), rng)
        else:
            yield biography(rng.choice(world), rng)


def make_world_chats(world: list[Person], split: str, n: int, seed: int = 0) -> list[dict]:
    """`n` conversations about the people of one split: 1-3 questions about one person, sometimes after a system
    prompt."""
    rng = random.Random(f"{seed}-{split}")
    people = [p for p in world if p.split == split]
    rows = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": rng.choice(_SYSTEMS)})
        person = rng.choice(people)  # a conversation is about one person, as a user would ask
        for _ in range(rng.choice([1, 1, 2, 3])):
            question, answer = rng.choice(questions(person))
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        rows.append({"messages": messages})
    return rows


def eval_rows(world: list[Person], split: str = "test") -> list[dict]:
    """Every question about one split's people, as the demo eval task's rows ({"question", "answer"})."""
    return [{"question": q, "answer": a} for p in world if p.split == split for q, a in questions(p)]
