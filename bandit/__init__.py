"""bandit: the learning core of the LLM router (numpy + river, no I/O).

Each model is an arm; each arm learns one linear head per objective (quality, cost in
USD, latency) over the query's embedding; a tenant's :class:`Preferences` combine the
heads into one utility at decision time, so a change of preferences needs no refit.

>>> from bandit import LinUCB, Preferences
>>> policy = LinUCB(dim=4, seed=0)
>>> policy.add_arm("gpt-4o-mini")
>>> policy.decide([0.1, 0.2, 0.3, 0.4], Preferences(cost=10)).arm
'gpt-4o-mini'
"""

from bandit.base import (
    OBJECTIVES,
    ArmPrior,
    BatchDecision,
    CostEstimate,
    Decision,
    Policy,
    PolicyConfig,
    Prediction,
    Preferences,
    PriceList,
)
from bandit.errors import DimensionError, InvalidInputError, RoutingError, UnknownArmError
from bandit.featurize import (
    Featurizer,
    HashingFeaturizer,
    PrototypeFeaturizer,
    PrototypeMap,
    SentenceEmbeddingFeaturizer,
    make_featurizer,
)
from bandit.linucb import LinUCB, LinUCBConfig
from bandit.select import SelectiveThompson, SelectiveThompsonConfig
from bandit.thompson import LinearThompson, LinearThompsonConfig

__all__ = [
    "OBJECTIVES",
    "ArmPrior",
    "BatchDecision",
    "CostEstimate",
    "Decision",
    "DimensionError",
    "Featurizer",
    "HashingFeaturizer",
    "InvalidInputError",
    "LinUCB",
    "LinUCBConfig",
    "LinearThompson",
    "LinearThompsonConfig",
    "Policy",
    "PolicyConfig",
    "Prediction",
    "Preferences",
    "PriceList",
    "PrototypeFeaturizer",
    "PrototypeMap",
    "RoutingError",
    "SelectiveThompson",
    "SelectiveThompsonConfig",
    "SentenceEmbeddingFeaturizer",
    "UnknownArmError",
    "make_featurizer",
]
