"""The route policy: model, loader and evaluation (all pure)."""

from proxy.policy.evaluate import Decision, Request, evaluate
from proxy.policy.loader import load_policy
from proxy.policy.model import Policy, Route
from proxy.policy.patterns import IdentityPattern

__all__ = ["Decision", "IdentityPattern", "Policy", "Request", "Route", "evaluate", "load_policy"]
