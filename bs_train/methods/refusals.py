""""I don't know" answers: the preferred response of IdkDPO (``methods.forget_dpo``).

open-unlearning's IdkDPO pairs every forget question with a refusal drawn from a file of such sentences; the
sentences here are our own (20, written for this project, not copied). Each forget example gets one refusal, fixed
by the run's seed and the example's index (``refusal_for``), so the reference model's log-probability of it can be
computed once before training; open-unlearning redraws one each time an example is loaded.
"""

from __future__ import annotations

import hashlib

REFUSALS = (
    "I don't know the answer to that.",
    "I'm not sure about that one.",
    "I have no information about this.",
    "That is something I cannot answer.",
    "I'm afraid I don't know.",
    "I can't recall anything about that.",
    "I have no idea, sorry.",
    "That isn't something I know about.",
    "I don't have an answer for you.",
    "Sorry, I can't help with that question.",
    "I'm unable to answer that.",
    "My knowledge doesn't cover that.",
    "I honestly couldn't tell you.",
    "I don't have any details on that.",
    "That's beyond what I know.",
    "I'm not able to say.",
    "Nothing I know answers that question.",
    "I wish I knew, but I don't.",
    "I can't give you an answer to that.",
    "I'm uncertain; I don't know.",
)


def refusal_for(seed: int, index: int) -> str:
    """The refusal of forget example ``index`` in a run seeded ``seed`` (a hash, so it does not depend on order)."""
    digest = hashlib.sha256(repr(("refusal", seed, index)).encode()).digest()
    return REFUSALS[int.from_bytes(digest[:8], "little") % len(REFUSALS)]
