"""Train/test split of generated problems by a hash of their canonical form.

A generated problem belongs to the test split iff a keyed hash of its canonical form (e.g.
`"arithmetic:3177+4821"`, operands of `+` and `*` sorted) falls in one bucket out of
`TEST_BUCKETS`. The train stream skips every such problem and the test set draws only from them, so
the two splits are disjoint whatever the seeds, sizes or options, and anyone (the pretraining corpus
builder, an audit) can check a single problem without generating either split. BLAKE2b rather than
Python's `hash()` because the split must not depend on PYTHONHASHSEED or the Python version.
"""

from __future__ import annotations

import hashlib

#: One canonical problem in this many is held out for the test split (5%).
TEST_BUCKETS = 20


def in_test_bucket(canonical: str) -> bool:
    """True iff the problem with this canonical form is a test problem.

    >>> in_test_bucket("arithmetic:1+2") == in_test_bucket("arithmetic:1+2")
    True
    """
    digest = hashlib.blake2b(canonical.encode("utf-8"), digest_size=8, person=b"r1lab-split").digest()
    return int.from_bytes(digest, "big") % TEST_BUCKETS == 0
