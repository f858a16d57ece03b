"""Preconditioners: how each method turns a query gradient into a searched feature (:mod:`.base` has the
protocol). The registry maps a :class:`~diffinfluence_widgets.config.Method` to its class; a new method is one file
and one line here."""
from __future__ import annotations

from ...config import Method, choice
from .base import Preconditioner, PreconditionerBase, PreconditionerContext
from .identity import IdentityPreconditioner
from .kfac import KFACPreconditioner, KFACQuery
from .trak import TRAKPreconditioner

__all__ = ["PRECONDITIONERS", "make_preconditioner", "Preconditioner", "PreconditionerBase", "PreconditionerContext",
           "KFACQuery", "KFACPreconditioner", "TRAKPreconditioner", "IdentityPreconditioner"]

#: the registry: method → preconditioner class (constructed from a :class:`PreconditionerContext`)
PRECONDITIONERS: dict[Method, type[PreconditionerBase]] = {
    Method.EKFAC: KFACPreconditioner,
    Method.KFAC: KFACPreconditioner,
    Method.TRAK: TRAKPreconditioner,
    Method.DTRAK: TRAKPreconditioner,
    Method.JOURNEY_TRAK: TRAKPreconditioner,
    Method.IDENTITY: IdentityPreconditioner,
}


def make_preconditioner(ctx: PreconditionerContext) -> Preconditioner:
    """The registered preconditioner of ``ctx.method`` (a ``ValueError`` naming an unknown method)."""
    return PRECONDITIONERS[choice(Method, ctx.method, "method")](ctx)
