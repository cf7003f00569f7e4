"""Closed-set scoring: a class's score is the log-likelihood of its label's tokens after the prompt.

For a prompt x and label y = (y_1 … y_L) (the label word after a space, as tokens):

    score(y | x) = Σ_j log p(y_j | x, y_<j)

and the prediction is the argmax over the task's labels. When every label of a task is one
token, one forward pass of the prompt scores all classes (the last position's log-softmax,
read at the label ids); otherwise each class is a teacher-forced continuation. The same
continuation log-likelihood, on the gold label, is the training loss.

Rows are left-padded and grouped by length (few pad tokens); position ids count real tokens
only, so a row's result does not depend on the batch it lands in.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor


def label_ids(tokenizer, labels: Sequence[str]) -> list[list[int]]:
    """The tokens of each label as it follows the prompt: a space, then the word."""
    ids = [tokenizer.encode(" " + label, add_special_tokens=False) for label in labels]
    if len({tuple(i) for i in ids}) != len(ids):
        raise ValueError(f"labels {list(labels)} do not tokenize to distinct token sequences")
    return ids


def encode_prompt(tokenizer, template: str, text: str, *, max_tokens: int = 48) -> list[int]:
    """The prompt's token ids; a text that would make it longer than ``max_tokens`` is cut short.

    ``template`` has one ``{text}`` field. The cut keeps the text's first tokens (an email's
    subject, a sentence's start), so train and evaluation see the same prompt.
    """
    ids = tokenizer.encode(template.format(text=text), add_special_tokens=False)
    while len(ids) > max_tokens and text:
        text_ids = tokenizer.encode(text, add_special_tokens=False)
        text = tokenizer.decode(text_ids[:max(0, len(text_ids) - (len(ids) - max_tokens))]).rstrip()
        ids = tokenizer.encode(template.format(text=text), add_special_tokens=False)
    return ids


def length_batches(lengths: Sequence[int], *, max_tokens: int, max_rows: int = 256) -> Iterator[list[int]]:
    """Indices grouped by length (longest first), each group at most ``max_tokens`` padded tokens.

    Example:
        >>> list(length_batches([3, 9, 4, 8], max_tokens=18))
        [[1, 3], [2, 0]]
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batch: list[int] = []
    for i in order:
        width = lengths[batch[0]] if batch else lengths[i]  # the first row is the longest
        if batch and (width * (len(batch) + 1) > max_tokens or len(batch) >= max_rows):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[Tensor, Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, S)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, S)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.as_tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, S): 0 at each row's first real token
    return ids.to(device), mask.to(device), positions.to(device)


def continuation_logprob(model, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                         *, pad_id: int) -> Tensor:
    """log p(continuation | prompt) per row, summed over the continuation's tokens; (B,).

    Differentiable (the training loss is its negative mean on the gold labels).
    """
    rows = [list(p) + list(c) for p, c in zip(prompts, continuations)]
    longest = max(len(c) for c in continuations)
    ids, mask, positions = _left_pad(rows, pad_id, model.device)  # (B, S)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                   logits_to_keep=longest + 1).logits  # (B, longest + 1, V)
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, longest, V): predicts the last `longest`
    targets = ids[:, -longest:]  # (B, longest)
    token_logp = logp.gather(-1, targets[..., None])[..., 0]  # (B, longest)
    lengths = torch.as_tensor([len(c) for c in continuations], device=token_logp.device)  # (B,)
    keep = torch.arange(longest, device=token_logp.device)[None, :] >= (longest - lengths)[:, None]  # (B, longest)
    return (token_logp * keep).sum(-1)  # (B,)


@torch.inference_mode()
def score_classes(model, prompts: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], *, pad_id: int,
                  max_tokens: int = 2048) -> Tensor:
    """Scores of every class for every prompt; (N, C) float32 on the CPU."""
    scores = torch.empty(len(prompts), len(labels))  # (N, C)
    single = all(len(label) == 1 for label in labels)
    first = torch.as_tensor([label[0] for label in labels])  # (C,)
    for batch in length_batches([len(p) + (0 if single else max(map(len, labels))) for p in prompts],
                                max_tokens=max_tokens):
        rows = [prompts[i] for i in batch]
        if single:
            ids, mask, positions = _left_pad(rows, pad_id, model.device)  # (B, S)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                           logits_to_keep=1).logits[:, -1]  # (B, V)
            scores[batch] = torch.log_softmax(logits.float(), dim=-1)[:, first.to(logits.device)].cpu()  # (B, C)
        else:
            for c, label in enumerate(labels):
                scores[batch, c] = continuation_logprob(model, rows, [label] * len(rows), pad_id=pad_id).cpu()
    return scores
