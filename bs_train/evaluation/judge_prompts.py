"""The prompts of the LLM-as-judge, kept in one file so they can be read, cited and changed in one place.

Two questions are asked about each answer a model generates to a forget-set question (the BS paper's judge metrics):

* **Naturalness**: is the answer fluent, coherent English, regardless of whether it is correct (0 = empty or
  gibberish, 5 = perfectly natural)?
* **Similarity**: how much of the reference answer's information does the generated answer still convey, even in
  other words (0 = none, 5 = all)? The paper reports it so that higher = more different, so the score is flipped
  (``5 - s``) after parsing; asking in the "how much is conveyed" direction is the easier question for small judges.

Each template ends by asking for one integer, and ``bs_train.evaluation.judge.parse_score`` reads the first number in the reply
that is not an echo of the scale ("0-5", "out of 5", "/5").
"""

from __future__ import annotations

NATURALNESS = (
    "You are grading how natural a piece of text is. Judge only fluency and coherence: is it grammatical, readable "
    "English that makes sense as an answer to the question? Do not judge whether it is factually correct.\n\n"
    "Question: {question}\n"
    "Answer: {generation}\n\n"
    "Score from 0 to 5: 0 = empty, gibberish or endless repetition; 1 = mostly broken; 2 = hard to read; "
    "3 = understandable with clear flaws; 4 = fluent with small flaws; 5 = perfectly fluent and coherent.\n"
    "Reply with a single integer from 0 to 5 and nothing else."
)

SIMILARITY = (
    "You are checking whether a model still reveals a specific fact. Compare the model's answer with the reference "
    "answer and decide how much of the reference's information the model's answer still conveys, even if it is "
    "worded differently. Ignore style; count only the facts.\n\n"
    "Question: {question}\n"
    "Reference answer: {reference}\n"
    "Model answer: {generation}\n\n"
    "Score from 0 to 5: 0 = conveys none of the reference's information (or contradicts it); 1 = a minor detail; "
    "2 = some of it; 3 = about half; 4 = most of it; 5 = all of it.\n"
    "Reply with a single integer from 0 to 5 and nothing else."
)

SCALE_MAX = 5
