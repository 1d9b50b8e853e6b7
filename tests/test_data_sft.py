"""SFT material: TRAIN splits only, deterministic sampling, refusal replies the refusal score counts, reply cutting."""
from __future__ import annotations

import pytest

from data_prep.datasets import read_refusal
from data_prep.errors import DataError
from data_prep.sft import REFUSAL_REPLIES, cut_reply, refusal_reply, sft_material
from replication.mechanics.refusal_score import is_refusal


def test_every_refusal_reply_counts_as_a_refusal_and_they_differ():
    assert len(REFUSAL_REPLIES) >= 4 and len(set(REFUSAL_REPLIES)) == len(REFUSAL_REPLIES)
    assert all(is_refusal(reply) for reply in REFUSAL_REPLIES)
    assert [refusal_reply(i) for i in range(len(REFUSAL_REPLIES) + 2)] == [*REFUSAL_REPLIES, *REFUSAL_REPLIES[:2]]


def test_material_comes_from_the_train_splits_only(processed_data):
    material = sft_material(40, 60, seed=3)
    assert (len(material.harmful), len(material.refusals), len(material.harmless)) == (40, 40, 60)
    for kind, items in (("harmful", material.harmful), ("harmless", material.harmless)):
        assert len(set(items)) == len(items)
        assert set(items) <= set(read_refusal(kind, "train"))
        assert not set(items) & set(read_refusal(kind, "test"))
    assert material.refusals == tuple(refusal_reply(i) for i in range(40))


def test_material_is_deterministic_for_a_seed(processed_data):
    first, again, other = sft_material(20, 20, seed=0), sft_material(20, 20, seed=0), sft_material(20, 20, seed=1)
    assert first == again and first.sha256() == again.sha256()
    assert first.harmful != other.harmful and first.harmless != other.harmless
    assert first.sha256() != other.sha256()


def test_asking_for_more_than_the_split_holds_is_an_error(processed_data):
    with pytest.raises(DataError, match="416"):
        sft_material(417, 1, seed=0)


@pytest.mark.parametrize("completion, reply", [
    (" Paris is the capital of France.\nUser: And Spain?", "Paris is the capital of France."),
    ("\n\n  Three tips: sleep, eat, walk.  \nAssistant:", "Three tips: sleep, eat, walk."),
    (" one line only", "one line only"),
    ("   \n", ""),
])
def test_cut_reply_keeps_the_first_line_of_text(completion, reply):
    assert cut_reply(completion, "\n") == reply


def test_cut_reply_with_a_longer_stop():
    assert cut_reply(" a\nb\nUser: c", "\nUser:") == "a\nb"
