"""bench/accuracy: the data builders on tiny hand-made source files, the splits, and the scoring.

No network and no real model: the sources are written in tmp_path in the registries' formats,
and the scoring runs on a tiny random Llama.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for bench.accuracy

from bench.accuracy import tasks  # noqa: E402
from bench.accuracy.scoring import continuation_logprob, encode_prompt, length_batches, score_classes  # noqa: E402
from bench.accuracy.tasks import Example, make_splits  # noqa: E402


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- builders ---------------------------------------------------------------------------------


def test_spam_reads_subject_and_first_body_lines(tmp_path):
    data = tmp_path / tasks.SPAM_PACKAGE
    spam = "From: a@b\nSubject: Cheap pills now\n\n> quoted line\nBuy cheap pills today, best offer ever\n"
    ham = ("From: c@d\nSubject: Re: build broken\nContent-Type: text/html\n\n"
           "<html><body><p>The nightly build &amp; tests fail again</p></body></html>\n")
    write(data / "spam-1" / "00001.x.json", json.dumps({"text": spam}))
    write(data / "easy-ham-1" / "00001.y.json", json.dumps({"text": ham}))
    out = sorted(tasks.build_spam(tmp_path), key=lambda e: e.label)
    assert out == [Example("Re: build broken | The nightly build & tests fail again", "ham"),
                   Example("Cheap pills now | Buy cheap pills today, best offer ever", "spam")]


def test_brown_genre_and_pos(tmp_path):
    base = tmp_path / tasks.BROWN_PACKAGE
    sentence = "\tThe/at jury/nn further/rbr said/vbd in/in term-end/nn presentments/nns that/cs it/pps ran/vbd ./.\n"
    write(base / "ca01", "\n\n" + sentence + "\n\n\tToo/ql short/jj ./.\n")
    write(base / "cb01", sentence)  # editorial: not one of the eight genres
    write(base / "CONTENTS", "not a corpus file\n")
    genre = tasks.build_brown_genre(tmp_path)
    assert genre == [Example("The jury further said in term-end presentments that it ran.", "news")]
    pos = tasks.build_brown_pos(tmp_path)
    assert len(pos) == 3  # one word per sentence; "Too" (ql) is never chosen, "short" is
    for example in pos:
        word = example.text.split("[")[1].split("]")[0]
        expected = {"The": "article", "jury": "noun", "further": "adverb", "said": "verb", "in": "preposition",
                    "presentments": "noun", "that": "conjunction", "it": "pronoun", "ran": "verb",
                    "short": "adjective"}[word]
        assert example.label == expected


def test_coarse_pos_tags():
    assert [tasks.coarse_pos(t) for t in ("nns-tl", "np$", "vbn", "bedz", "hvd", "jjr", "rb", "pps", "in-tl",
                                          "at", "cc", "cs", "ppss+md", ".", "ql", "dt")] == [
        "noun", "noun", "verb", "verb", "verb", "adjective", "adverb", "pronoun", "preposition", "article",
        "conjunction", "conjunction", "pronoun", None, None, None]


def test_fortunes_topic_and_language(tmp_path):
    english = tmp_path / "deb/fortunes" / tasks.FORTUNE_DIR
    write(english / "computers", "A computer program does what you tell it to do.\n%\nshort\n%\n"
                                 "Real programmers write in any language they like.\n%\n")
    write(english / "computers.dat", "binary index")
    for topic in tasks.FORTUNE_TOPICS[1:]:
        write(english / topic, f"This is a long enough fortune about {topic}, really.\n%\n")
    german = tmp_path / "deb/fortunes-de" / tasks.FORTUNE_DIR / "de"
    write(german / "sprueche", "Wer anderen eine Grube gräbt, fällt selbst hinein.\n%\n")
    write(german / "sprueche.u8", "Wer anderen eine Grube gräbt, fällt selbst hinein.\n%\n")  # duplicate file
    topic = tasks.build_fortune_topic(tmp_path)
    assert [e.label for e in topic].count("computers") == 2  # "short" has too few letters
    assert Example("A computer program does what you tell it to do.", "computers") in topic
    lang = tasks.build_langid(tmp_path)
    assert Example("Wer anderen eine Grube gräbt, fällt", "German") in lang  # clipped to 40 characters
    assert [e.label for e in lang].count("German") == 1
    assert {e.label for e in lang} == {"English", "German"}


def test_wordnet_keeps_lemmas_whose_senses_share_one_lexicographer_file(tmp_path):
    base = tmp_path / tasks.WORDNET_DIR
    write(base / "data.noun", "  1 licence text\n"
                              "00000001 05 n 01 cat 0 000 | a feline\n"
                              "00000002 05 n 01 cat 0 000 | another animal sense\n"
                              "00000003 06 n 01 bank 0 000 | a building\n"
                              "00000004 15 n 01 bank 0 000 | a river side\n"
                              "00000005 13 n 01 bread 0 000 | food\n"
                              "00000006 04 n 01 act 0 000 | not one of the eight\n")
    write(base / "index.noun", "  1 licence text\n"
                               "cat n 2 0 2 0 00000001 00000002\n"
                               "bank n 2 0 2 0 00000003 00000004\n"
                               "bread n 1 0 1 0 00000005\n"
                               "act n 1 0 1 0 00000006\n"
                               "hot_dog n 1 0 1 0 00000005\n")
    assert tasks.build_wn_supersense(tmp_path) == [Example("bread", "food"), Example("cat", "animal")]


def test_vader_polarity(tmp_path):
    write(tmp_path / tasks.VADER_LEXICON, "good\t1.9\t0.9\t[2, 2]\nbad\t-2.5\t0.5\t[-2, -3]\n"
                                          "okay\t0.9\t0.5\t[1, 1]\n:)\t2.0\t0.5\t[2, 2]\n")
    assert tasks.build_word_sentiment(tmp_path) == [Example("good", "positive"), Example("bad", "negative")]


def test_every_task_has_distinct_labels_and_one_text_field():
    for task in tasks.TASKS.values():
        assert len(set(task.labels)) == len(task.labels) >= 2
        assert task.template.count("{text}") == 1
        for split, size in tasks.SPLIT_SIZES.items():
            assert size % len(task.labels) == 0, (task.name, split)


# --- splits -----------------------------------------------------------------------------------


def _pool(n_per_class: int, labels=("a", "b", "c", "d")) -> list[Example]:
    return [Example(f"{label}{i}", label) for label in labels for i in range(n_per_class)]


def test_splits_are_balanced_disjoint_and_seeded():
    sizes = {"train": 40, "val": 8, "test": 16}
    pool = _pool(30) + [Example("a0", "a")] * 5  # duplicates are dropped
    s = make_splits(pool, ["a", "b", "c", "d"], seed=3, task="t", sizes=sizes)
    for split, size in sizes.items():
        assert len(s[split]) == size
        assert {l: sum(e.label == l for e in s[split]) for l in "abcd"} == dict.fromkeys("abcd", size // 4)
    texts = [e.text for split in s.values() for e in split]
    assert len(texts) == len(set(texts))
    # any prefix of whole class rounds is balanced
    assert sorted(e.label for e in s["test"][:8]) == list("aabbccdd")
    assert make_splits(pool, ["a", "b", "c", "d"], seed=3, task="t", sizes=sizes) == s
    assert make_splits(pool, ["a", "b", "c", "d"], seed=4, task="t", sizes=sizes) != s


def test_splits_refuse_too_few_examples_and_unknown_labels():
    with pytest.raises(ValueError, match="class 'b' has 5 distinct examples, 16 needed"):
        make_splits(_pool(20, "a") + _pool(5, "b"), ["a", "b"], seed=0, task="t",
                    sizes={"train": 20, "val": 4, "test": 8})
    with pytest.raises(ValueError, match="outside"):
        make_splits(_pool(20, "az"), ["a", "b"], seed=0, task="t", sizes={"train": 2, "val": 2, "test": 2})


def test_clip_cuts_at_a_word_boundary():
    assert tasks.clip("one two  three\nfour", 12) == "one two"
    assert tasks.clip("short", 12) == "short"


# --- scoring ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _manual_logprob(model, prompt: list[int], label: list[int]) -> float:
    """log p(label | prompt) from one unpadded row, token by token."""
    ids = torch.tensor([prompt + label])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)  # (S, V)
    return sum(logp[len(prompt) - 1 + j, tok].item() for j, tok in enumerate(label))


def test_single_token_scores_equal_the_unpadded_log_softmax(tiny_llama):
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [3]]
    labels = [[20], [21], [22]]
    scores = score_classes(tiny_llama, prompts, labels, pad_id=0, max_tokens=8)  # several padded batches
    expected = torch.tensor([[_manual_logprob(tiny_llama, p, l) for l in labels] for p in prompts], dtype=torch.float64)
    torch.testing.assert_close(scores.double(), expected, atol=1e-5, rtol=0)


def test_multi_token_labels_sum_their_tokens(tiny_llama):
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    labels = [[20, 21], [22], [23, 24, 25]]
    scores = score_classes(tiny_llama, prompts, labels, pad_id=0)
    expected = torch.tensor([[_manual_logprob(tiny_llama, p, l) for l in labels] for p in prompts], dtype=torch.float64)
    torch.testing.assert_close(scores.double(), expected, atol=1e-5, rtol=0)
    # the training loss uses the same continuation log-likelihood, with mixed lengths in one batch
    gold = continuation_logprob(tiny_llama, prompts, [labels[2], labels[1]], pad_id=0)
    torch.testing.assert_close(gold.detach().double(), torch.stack([expected[0, 2], expected[1, 1]]), atol=1e-5, rtol=0)


def test_prediction_is_the_argmax_of_a_known_logit_table():
    class Fixed(torch.nn.Module):  # "model" whose last-position logits are set by the prompt's first token
        device = torch.device("cpu")

        def forward(self, input_ids, attention_mask, position_ids, logits_to_keep):
            table = torch.full((input_ids.shape[0], 1, 10), -5.0)
            for row, ids in enumerate(input_ids):
                first = ids[attention_mask[row].bool()][0].item()
                table[row, 0, first] = 5.0  # the class whose label token equals the first prompt token wins
            return type("Out", (), {"logits": table})()

    scores = score_classes(Fixed(), [[3, 1], [4, 1, 1], [2]], [[2], [3], [4]], pad_id=0)
    assert scores.argmax(-1).tolist() == [1, 2, 0]


def test_length_batches_cover_every_index_once_within_budget():
    lengths = [5, 1, 9, 3, 3, 7, 2, 8]
    batches = list(length_batches(lengths, max_tokens=16))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert max(lengths[i] for i in b) * len(b) <= 16 or len(b) == 1


def test_encode_prompt_cuts_long_texts_to_the_token_budget():
    class CharTokenizer:  # one token per character
        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

        def decode(self, ids):
            return "".join(map(chr, ids))

    ids = encode_prompt(CharTokenizer(), "T: {text}\nA:", "abcdefghij", max_tokens=10)
    assert CharTokenizer().decode(ids) == "T: abcd\nA:"  # the text's first characters, the question kept
    assert encode_prompt(CharTokenizer(), "T: {text}\nA:", "ab", max_tokens=10) == [ord(c) for c in "T: ab\nA:"]
