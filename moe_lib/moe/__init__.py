"""The teaching core, the MoE model the notebooks rebuild piece by piece.

* :mod:`~moe_lib.moe.routing` - routers: token choice (top-k, noisy, sigmoid, biased), expert choice, random;
* :mod:`~moe_lib.moe.losses` - the load-balancing and router z-losses;
* :mod:`~moe_lib.moe.experts` - the experts' weights, capacity and the dispatchers (loop, sort + grouped GEMM);
* :mod:`~moe_lib.moe.model` - the MoE layer and the decoder-only transformer around it.

It imports nothing from training, runs or studies (``tests/test_architecture.py`` checks).
"""

from .experts import Experts
from .losses import load_balancing_loss, router_z_loss
from .model import DenseFeedForward, MoEFeedForward, MoETransformer, count_parameters, flops_per_token
from .routing import ExpertChoiceRouter, RandomRouter, RoutingResult, TopKRouter, build_router

__all__ = [
    "DenseFeedForward", "ExpertChoiceRouter", "Experts", "MoEFeedForward", "MoETransformer", "RandomRouter", "RoutingResult",
    "TopKRouter", "build_router", "count_parameters", "flops_per_token", "load_balancing_loss", "router_z_loss",
]
