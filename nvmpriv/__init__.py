"""nvmpriv: membership-inference privacy and robustness of neural networks on RRAM/NVM crossbars.

The top-level package stays light on purpose: the black-box side (``nvmpriv.attacks``,
``nvmpriv.runtime``) must import without pulling in torch.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
