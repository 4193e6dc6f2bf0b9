"""The data a run trains on and an evaluation reads, in one package: what every layer above imports from.

* ``qa.py``: TOFU-format question/answer rows (loading and checking at the boundary, the chat prompt, ``encode_qa``
  with labels on the answer, ``QADataset``), also the format of MUSE's knowledge QA;
* ``rows.py``: the rows of a named split from a local folder of JSON Lines or a Hub dataset, checked at the boundary;
* ``text.py``: raw text (MUSE's and WMDP's corpora) cut into fixed-length token windows, every token scored;
* ``batching.py``: right-padded collation and the paired forget/retain sampler, indifferent to which of the two the
  rows are;
* ``synthetic.py``: the project's seeded fictitious-author set in TOFU format (offline tests and the demo).

The names below are the package's public surface (``from bs_train.data import collate``).
"""

from .batching import ForgetRetainSampler, collate
from .qa import (CHAT_DATE, OU_TEMPLATE_ARGS, PROTOCOLS, QADataset, chat_family, check_perturbed, check_protocol,
                 encode_prompt, encode_qa, format_prompt, load_qa, load_split, resolve_data, wrong_answers)
from .rows import load_rows
from .text import TextDataset, load_texts, token_windows

__all__ = ["CHAT_DATE", "OU_TEMPLATE_ARGS", "PROTOCOLS", "ForgetRetainSampler", "QADataset", "TextDataset",
           "chat_family", "check_perturbed", "check_protocol", "collate", "encode_prompt", "encode_qa", "format_prompt",
           "load_qa", "load_rows", "load_split", "load_texts", "resolve_data", "token_windows", "wrong_answers"]
