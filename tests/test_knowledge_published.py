"""Which knowledge pair the paper's numbers describe (analysis/knowledge.py): the models published_numbers.yaml
names, whatever order a profile lists its families in."""
import dataclasses

import pytest

from analysis import knowledge
from replication.config import load_profile


def with_knowledge_families(profile, families: tuple[str, ...]):
    experiments = dataclasses.replace(profile.experiments, knowledge=dataclasses.replace(
        profile.experiments.knowledge, families=families))
    return dataclasses.replace(profile, experiments=experiments)


@pytest.mark.parametrize("families", [("llama3", "mistral", "llama2-13b"), ("llama2-13b", "mistral", "llama3"),
                                      ("mistral", "llama3")])
def test_the_published_pair_is_llama3_base_and_instruct_in_any_order(monkeypatch, families):
    profile = with_knowledge_families(load_profile("paper"), families)
    monkeypatch.setattr(knowledge, "load_profile", lambda name: profile)
    assert knowledge.published_pair("paper") == ("llama-3.1-8b", "llama-3.1-8b-instruct")
    assert knowledge.reference_pair("paper") == ("llama-3.1-8b", "llama-3.1-8b-instruct")


def test_a_profile_without_the_papers_pair_has_none_and_figures_use_its_first_family(monkeypatch):
    profile = with_knowledge_families(load_profile("paper"), ("llama2-13b", "mistral"))
    monkeypatch.setattr(knowledge, "load_profile", lambda name: profile)
    assert knowledge.published_pair("paper") is None
    assert knowledge.reference_pair("paper") == ("llama-2-13b", "llama-2-13b-chat")
