"""open-unlearning's loss helpers as it computes them, over the model's full [B, T, V] logits: the baseline of
``benchmarks/bench_open_unlearning.py``.

Transcribed formula by formula from locuslab/open-unlearning (d3d7cf9) src/trainer/utils.py and
src/trainer/unlearn/ceu.py, and from the authors' fork kemoulee/open-unlearning (dev, 1c278ec)
src/trainer/unlearn/bst.py (whose BS-T loss lives in ``BST.compute_loss``; here as a function of the same arguments).
Each takes ``model`` (called as ``model(**inputs)``, returning ``.logits``) and returns ``(loss, outputs)`` as there.
The tests hold the drop-ins to their own independent transcriptions (``tests/test_open_unlearning.py``); this module
is what the benchmark times, so that both sides run the same operations the reference runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def _call(model, inputs):
    return model(**{k: inputs[k] for k in ("input_ids", "attention_mask", "labels")})


def compute_kl_divergence(model, target_model, inputs):
    with torch.no_grad():
        ref_outputs = _call(target_model, inputs)
    ref_probs = F.log_softmax(ref_outputs.logits, dim=-1).view(-1, ref_outputs.logits.shape[-1])
    outputs = _call(model, inputs)
    current = F.log_softmax(outputs.logits, dim=-1).view(-1, outputs.logits.shape[-1])
    return F.kl_div(current, ref_probs, reduction="batchmean", log_target=True), outputs


def compute_batch_nll(model, inputs):
    outputs = _call(model, inputs)
    logits = outputs.logits[..., :-1, :].contiguous()
    labels = inputs["labels"][..., 1:].contiguous()
    loss = F.cross_entropy(logits.transpose(-1, -2), labels, ignore_index=IGNORE, reduction="none").sum(dim=-1)
    return loss, outputs


def compute_dpo_loss(model, ref_model, win_inputs=None, lose_inputs=None, beta=1.0):
    win_log_ratio, lose_log_ratio = 0.0, 0.0
    win_outputs = lose_outputs = None
    if win_inputs is not None:
        win_loss, win_outputs = compute_batch_nll(model, win_inputs)
        with torch.no_grad():
            win_ref_loss, _ = compute_batch_nll(ref_model, win_inputs)
        win_log_ratio = -(win_loss - win_ref_loss)
    if lose_inputs is not None:
        lose_loss, lose_outputs = compute_batch_nll(model, lose_inputs)
        with torch.no_grad():
            lose_ref_loss, _ = compute_batch_nll(ref_model, lose_inputs)
        lose_log_ratio = -(lose_loss - lose_ref_loss)
    loss = -2 / beta * F.logsigmoid(beta * (win_log_ratio - lose_log_ratio)).mean()
    return loss, (win_outputs, lose_outputs)


def compute_undial_loss(model, ref_model, inputs, beta):
    outputs = _call(model, inputs)
    shift_labels = inputs["labels"][..., 1:].contiguous()
    shift_logits = outputs.logits[..., :-1, :].contiguous()
    with torch.no_grad():
        teacher = _call(ref_model, inputs).logits[..., :-1, :].contiguous()
    mask = torch.zeros_like(teacher)
    batch_idx = torch.arange(mask.shape[0], device=mask.device).view(-1, 1, 1)
    seq_idx = torch.arange(mask.shape[1], device=mask.device).view(1, -1, 1)
    mask[batch_idx, seq_idx, shift_labels.unsqueeze(-1)] = 1.0
    soft_label = F.softmax(teacher - mask * beta, dim=-1)
    loss = F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), soft_label.view(-1, soft_label.size(-1)),
                           reduction="none")
    return loss.mean(), outputs


def _token_nll(model, inputs):
    outputs = _call(model, inputs)
    shift_logits = outputs.logits[..., :-1, :].contiguous()
    shift_labels = inputs["labels"][..., 1:].contiguous()
    lm_loss = F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1),
                              ignore_index=IGNORE, reduction="none")
    return lm_loss, shift_labels.view(-1), outputs


def compute_wga_loss(model, inputs, beta):
    lm_loss, labels, outputs = _token_nll(model, inputs)
    weight_ce = ((-lm_loss).exp().detach()) ** beta
    return -(weight_ce * lm_loss)[labels != IGNORE].mean(), outputs


def compute_satimp_loss(model, inputs, beta1, beta2):
    lm_loss, labels, outputs = _token_nll(model, inputs)
    weight_sat = ((-lm_loss).exp().detach()) ** beta1
    weight_imp = (1 - (-lm_loss).exp().detach()) ** beta2
    return -((weight_sat * weight_imp) * lm_loss)[labels != IGNORE].mean(), outputs


def compute_batch_ceu(model, inputs, ignore_first_n_answer_tokens=1):
    outputs = _call(model, inputs)
    labels = inputs["labels"]
    valid = labels != IGNORE
    update = (valid.cumsum(dim=-1) <= ignore_first_n_answer_tokens) & valid
    shifted_labels = labels.masked_fill(update, IGNORE)[..., 1:].contiguous()
    shifted_logits = outputs.logits[..., :-1, :].contiguous()
    keep = shifted_labels != IGNORE
    valid_logits, valid_labels = shifted_logits[keep], shifted_labels[keep]
    target = valid_logits.detach().clone()
    target.scatter_(dim=-1, index=valid_labels.unsqueeze(-1), value=float("-inf"))
    return F.cross_entropy(input=valid_logits, target=F.softmax(target, dim=-1)), outputs


def compute_bst_loss(model, inputs, lambda_bst=0.2, top_k=20):
    outputs = _call(model, inputs)
    shift_logits = outputs.logits[..., :-1, :].contiguous()
    shift_labels = inputs["labels"][..., 1:].contiguous()
    top_k_logits = shift_logits.clone()
    if top_k < shift_logits.size(-1):
        values, indices = torch.topk(shift_logits, top_k, dim=-1)
        top_k_logits = torch.full_like(shift_logits, float("-inf")).scatter_(-1, indices, values)
    belief = F.softmax(top_k_logits, dim=-1).detach()
    clamped = torch.clamp(shift_labels.long(), min=0, max=shift_logits.size(-1) - 1)
    one_hot = F.one_hot(clamped, num_classes=shift_logits.size(-1)).to(shift_logits.dtype)
    one_hot[shift_labels == IGNORE] = 0
    target = lambda_bst * belief + (1 - lambda_bst) * one_hot
    per_token = -(target * F.log_softmax(shift_logits, dim=-1)).sum(dim=-1)
    mask = shift_labels != IGNORE
    per_seq = (per_token * mask).sum(dim=-1) / mask.sum(dim=-1)
    return -per_seq.mean(), outputs
