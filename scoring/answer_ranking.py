"""CCLM xGQA answer ranking without padding waste: the summed NLL of each of the k candidate answers a question
keeps (X2-VLM's rank_answer, train_cclm.CCLMForXGQA.rank_answers), with the decoder's 250k-word output layer run
only where a target token is scored.

The candidates are tokenised "<s> answer </s>" padded to the longest of the whole answer list; X2-VLM runs the
LM head at every position and ignores the padded targets (-100). Here the head runs at the positions whose next
token is a real one (a rows argument of the decoder), the NLLs go back into a zero [N, L-1] matrix and are summed per
answer exactly as before: every per-position value and the summation are the same operations on the same
numbers, so the scores are bitwise those of the padded computation (tests/test_eval_cost.py). The decoder
layers still run over the padded length (their padded positions are masked; bench/eval_cost.py counts what the
head saves).

Not on the reading path: CCLMForXGQA.rank_answers makes one call here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def answer_nll(
    decoder,
    answer_ids: torch.Tensor,
    answer_atts: torch.Tensor,
    states: torch.Tensor,
    state_atts: torch.Tensor,
    pad_token_id: int,
) -> torch.Tensor:
    """Per candidate: the SUM of token NLLs of its shifted targets (answer tokens and </s>). answer_ids/atts
    [n * k, L]: k candidates per question, question-major; states/state_atts [n, Lq(, H)]: each question once
    (repeated to its k candidates here, as X2-VLM does). decoder(ids, atts, states, state_atts, rows) returns the
    logits of the flattened positions `rows` (train_cclm.AnswerDecoder). Returns [n, k] float32."""
    n = states.shape[0]
    k = answer_ids.shape[0] // n
    targets = answer_ids.masked_fill(answer_ids == pad_token_id, -100)[:, 1:]  # [N, L-1]
    scored = targets != -100
    length = answer_ids.shape[1]
    # position p predicts token p + 1: rows of the flattened [N, L] decoder output with a real target
    rows = torch.arange(answer_ids.shape[0] * length, device=answer_ids.device).view(-1, length)[:, :-1][scored]
    logits = decoder(
        answer_ids, answer_atts, states.repeat_interleave(k, dim=0), state_atts.repeat_interleave(k, dim=0), rows
    )
    nll = torch.zeros(targets.shape, dtype=torch.float32, device=logits.device)
    nll[scored] = F.cross_entropy(logits.float(), targets[scored], reduction="none")
    return nll.sum(dim=1).view(n, k)
