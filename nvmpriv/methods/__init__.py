"""Training methods as LightningModules: one class per method, all extending MembershipModule."""

from nvmpriv.methods.base import MembershipModule
from nvmpriv.methods.standard import StandardTraining

__all__ = ["MembershipModule", "StandardTraining"]

from nvmpriv.methods.admm import ADMMMinMax, ADMMPruning
from nvmpriv.methods.dorefa import DoReFaTraining
from nvmpriv.methods.minmax import MinMaxTraining
from nvmpriv.methods.pgd import PGDTraining
from nvmpriv.methods.ppb import PPBFineTuning

__all__ += [
    "ADMMMinMax",
    "ADMMPruning",
    "DoReFaTraining",
    "MinMaxTraining",
    "PGDTraining",
    "PPBFineTuning",
]
