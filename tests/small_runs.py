"""Settings shared by the tests that train: small enough to fine-tune in seconds on 2 cores.

4 authors x 5 questions of the generated dataset; forget10 is the last author (5 rows).
"""

SMALL = ["data.synthetic_authors=4", "data.synthetic_qa_per_author=5", "train.batch_size=4", "train.grad_accum=1"]
