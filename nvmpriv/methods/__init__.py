"""Training methods as LightningModules: one class per method, all extending MembershipModule."""

from nvmpriv.methods.base import MembershipModule
from nvmpriv.methods.standard import StandardTraining

__all__ = ["MembershipModule", "StandardTraining"]
