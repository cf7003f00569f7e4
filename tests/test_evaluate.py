"""coremerge eval: lm-eval on one loaded base model, checked against lm-eval's own command.

Offline and small: a tiny random Llama with a byte-level tokenizer saved to a temp dir as the base
model, two local lm-eval tasks (a multiple-choice one, and a rolling log-likelihood one whose
perplexities move with every logit), and adapters made with PEFT on that base.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

from coremerge import cli, evaluate  # noqa: E402

from peft_factories import save_adapter  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}

MC_TASK = """task: tiny_add
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {root}/add_validation.jsonl
    test: {root}/add_test.jsonl
output_type: multiple_choice
validation_split: validation
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""

PPL_TASK = """task: tiny_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root}/text_test.jsonl
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<s>": len(vocab), "</s>": len(vocab) + 1})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>"), vocab


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tokenizer, vocab = _byte_tokenizer()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=len(vocab), bos_token_id=vocab["<s>"],
                                      eos_token_id=vocab["</s>"])
    transformers.LlamaForCausalLM(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    rng = random.Random(0)
    for split in ("validation", "test"):
        with open(root / f"add_{split}.jsonl", "w") as f:
            for _ in range(12):
                a, b = rng.randint(0, 9), rng.randint(0, 9)
                f.write(json.dumps({"question": f"{a}+{b}=", "choices": [str(a + b), str(a + b + 1), str(a * b)],
                                    "answer": 0}) + "\n")
    with open(root / "text_test.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"text": f"the {i} quick brown fox jumps over {i + 1} lazy dogs"}) + "\n")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "add.yaml").write_text(MC_TASK.format(root=root))
    (tasks / "text.yaml").write_text(PPL_TASK.format(root=root))

    def base():
        return transformers.LlamaForCausalLM.from_pretrained(root / "base")

    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    adapters = [save_adapter(root, f"ad{i}", lora, seed=10 + i, base=base) for i in range(3)]
    other = peft.LoraConfig(r=2, target_modules=["q_proj"])
    wrong = save_adapter(root, "wrong", other, seed=5,
                         base=lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
                             hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, vocab_size=len(vocab))))
    return {"root": root, "base": root / "base", "tasks": tasks, "adapters": adapters, "wrong": wrong}


def _run(args, cwd):
    env = {**__import__("os").environ, **OFFLINE}
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_scores_are_lm_evals_own_and_do_not_depend_on_what_was_scored_before(world, tmp_path):
    out = tmp_path / "scores.json"
    ours = _run([sys.executable, "-m", "coremerge", "eval", *world["adapters"], "--base", world["base"],
                 "--tasks", world["tasks"], "--baseline", "--out", out], tmp_path)
    assert ours.returncode == 0, ours.stderr[-3000:]
    scores = json.loads(out.read_text())["scores"]
    got = {(s["adapter"], s["task"], s["metric"]): s for s in scores}
    last = str(world["adapters"][-1])  # scored after the base model and two other adapters
    # lm-eval's own command, a fresh process that loads the base model with only this adapter
    done = _run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                 f"pretrained={world['base']},peft={last},dtype=float32", "--include_path", str(world["tasks"]),
                 "--tasks", "tiny_add,tiny_text", "--batch_size", "8", "--device", "cpu",
                 "--output_path", str(tmp_path / "lm_eval_out")], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = list((tmp_path / "lm_eval_out").rglob("results_*.json"))
    theirs = json.loads(results.read_text())
    compared = 0
    for task, metrics in theirs["results"].items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if filt != "none" or metric.endswith("_stderr") or not isinstance(value, float):
                continue
            mine = got[(last, task, metric)]
            assert mine["value"] == value, (task, metric)
            stderr = metrics.get(f"{metric}_stderr,none")
            assert mine["stderr"] == (stderr if isinstance(stderr, float) else None)
            assert mine["n"] == theirs["n-samples"][task]["effective"]
            compared += 1
    assert compared == 5  # acc, acc_norm; word and byte perplexity, bits per byte
    assert got[(last, "tiny_add", "acc")]["split"] == "test"
    assert got[(last, "tiny_add", "acc")]["adapter_sha256"] is not None
    # the adapters change the model: their perplexities differ from the base model's and from each other's
    ppl = {name: got[(name, "tiny_text", "word_perplexity")]["value"]
           for name in ["base", *map(str, world["adapters"])]}
    assert len(set(ppl.values())) == 4
    table = ours.stdout.splitlines()
    assert table[0].split() == ["adapter", "task", "split", "metric", "value", "±", "stderr", "n", "s"]
    assert len(table) == 1 + 4 * 5 + 1 and table[-1] == f"wrote {out}"


@pytest.mark.parametrize("adapter, args, message", [
    ("ad0", ["--tasks", "no_such_task"], "unknown task 'no_such_task'"),
    ("ad0", ["--tasks", "{bad}"], "task file {bad}: not valid YAML"),
    ("ad0", ["--tasks", "{empty}"], "names no lm-eval task"),
    ("wrong", ["--tasks", "{tasks}"], "the base model's is 32x32: the adapter was trained on another model"),
    ("ad0", ["--tasks", "{tasks}", "--limit", "0"], "limit must be a positive integer"),
])
def test_bad_input_is_one_line_and_nothing_is_scored(world, tmp_path, capsys, adapter, args, message):
    (tmp_path / "bad.yaml").write_text("task: [unclosed\n")
    (tmp_path / "empty.yaml").write_text("just: a mapping\n")
    names = {"bad": tmp_path / "bad.yaml", "empty": tmp_path / "empty.yaml", "tasks": world["tasks"]}
    path = world["wrong"] if adapter == "wrong" else world["adapters"][0]
    code = cli.main(["eval", str(path), "--base", str(world["base"]), *(a.format(**names) for a in args)])
    err = capsys.readouterr().err
    assert code == 2 and message.format(**names) in err and err.count("\n") == 1, err


def test_a_task_that_fails_is_recorded_and_the_others_go_on(world, tmp_path, monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "gone.yaml").write_text(MC_TASK.format(root=tmp_path / "nowhere").replace("tiny_add", "tiny_gone"))
    settings = evaluate.EvalSettings(base_model=str(world["base"]), tasks=(str(broken), str(world["tasks"] / "add.yaml")))
    scores = evaluate.Evaluator(settings).score(world["adapters"][0])
    failed = [s for s in scores if s.error is not None]
    assert [s.task for s in failed] == ["tiny_gone"] and "nowhere" in failed[0].error
    assert {(s.task, s.metric) for s in scores if s.error is None} == {("tiny_add", "acc"), ("tiny_add", "acc_norm")}
