"""Loading and unloading models at an admin's request, for every transport.

A (re)load applies the config's screening policy, so both are decisions: each is recorded in the
incident log before the caller is answered.
"""

from __future__ import annotations

from bastion.gateway.incidents.audit import append_decision
from bastion.gateway.incidents.log import IncidentLog
from bastion.gateway.registry import ModelRegistry


async def load_model(registry: ModelRegistry, incident_log: IncidentLog | None, name: str) -> None:
    """Loads (or reloads) ``name``. Raises ``NotFound`` for a model not in the repository,
    ``Unavailable`` when it fails to load (the old versions keep serving) or when the log
    cannot record it."""
    await registry.load(name)
    versions = [m for m in registry.loaded() if m.config.name == name]
    policy = {
        str(m.version): {"action": m.screening_action, "review": m.screening_review}
        for m in versions
    }
    await append_decision(
        incident_log, "policy_change", name, {"event": "load", "versions": policy}
    )


async def unload_model(
    registry: ModelRegistry, incident_log: IncidentLog | None, name: str
) -> None:
    """Unloads every version of ``name`` (accepted requests are answered first). Raises
    ``NotFound`` when it is not loaded."""
    await registry.unload(name)
    await append_decision(incident_log, "policy_change", name, {"event": "unload"})
