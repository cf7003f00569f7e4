"""The Core Space paper's merge functions as its code computes them, for the tests to pin ours against.

Re-read from github.com/apanariello4/core-space-merging (commit 85176fa: task_merger.py,
merging_functions.py) and written out here in torch, float64, independently of coremerge: each
function names the one it follows. They take the per-module task matrices the paper's
MatrixPerLayerMerger passes to ``_merge_tensors`` (k x k cores in core space, m x n updates in full
space) and leave out its scale ``scaling_coeffs`` (our alpha), applied after them there too.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def ties(tasks: Tensor, top_k: float) -> Tensor:
    """``_process_ties`` -> ``ties_merging``: ``topk_values_mask``, ``resolve_sign``, ``disjoint_merge``
    ("mean"). ``top_k`` is its ``topK``: a fraction, or a percent when above 1."""
    num_tasks, p, q = tasks.shape
    m = tasks.reshape(num_tasks, p * q)  # each task flattened to a row
    fraction = top_k / 100 if top_k > 1 else top_k
    if fraction >= 1:
        pruned = m
    else:
        d = m.shape[1]
        kth = m.abs() if m.numel() == 1 else m.abs().kthvalue(d - int(d * fraction), dim=1, keepdim=True).values
        pruned = m * (m.abs() >= kth)  # the entries at or above the (d - int(d K))-th smallest magnitude
    sign = torch.sign(pruned.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())  # an exactly-zero sum takes the module's majority sign
    selected = pruned * torch.where(sign > 0, pruned > 0, pruned < 0)
    mean = selected.sum(dim=0) / torch.clamp((selected != 0).sum(dim=0).to(tasks.dtype), min=1)
    return mean.reshape(p, q)


def cart(tasks: Tensor, pruning_rank: float = 0.04, scaling_coeffs: float = 0.1) -> Tensor:
    """``get_cart_delta_w``, with the defaults ``_merge_tensors`` passes (cart_pruning_rank 0.04,
    cart_scaling_coeffs 0.1)."""
    theta_avg = tasks.mean(dim=0)
    total = torch.zeros_like(theta_avg)
    for tau in tasks - theta_avg:
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        k = math.ceil(pruning_rank * s.shape[0])
        total += u[:, :k] @ torch.diag(s[:k]) @ vh[:k, :]
    return theta_avg + scaling_coeffs * total


def tsv(tasks: Tensor) -> Tensor:
    """``get_tsv_delta_w``: int(d / T) components of every task (d = min(p, q)) placed in d-wide
    zero-padded concatenations, whose polar factors (u @ vh of their SVDs) replace them."""
    num_tasks = tasks.shape[0]
    sv_reduction = 1 / num_tasks
    for i, vec in enumerate(tasks):
        u, s, v = torch.linalg.svd(vec, full_matrices=False)
        if i == 0:
            sum_u, sum_s, sum_v = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(v)
        c = int(s.shape[0] * sv_reduction)
        sum_u[:, i * c:(i + 1) * c] = u[:, :c]
        sum_s[i * c:(i + 1) * c] = s[:c]
        sum_v[i * c:(i + 1) * c, :] = v[:c, :]
    u_u, _, v_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_v, _, v_v = torch.linalg.svd(sum_v, full_matrices=False)
    return torch.linalg.multi_dot((u_u, v_u, torch.diag(sum_s), u_v, v_v))


def isotropize(matrix: Tensor) -> Tensor:
    """``isotropize_matrix`` (Iso-C, applied to the task-arithmetic sum): every singular value of
    ``matrix``, zeros included, replaced by their mean."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ torch.diag(s.mean() * torch.ones_like(s)) @ vh
