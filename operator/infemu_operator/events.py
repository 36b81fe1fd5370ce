"""Which Kubernetes Events the operator posts: problems as ``Warning``, milestones as ``Normal``.

``kubectl describe inferencecluster`` users read Events first. kopf posts logger messages as
Events only with ``settings.posting.loggers`` (off by default; on, it would post every info
line), so the operator decides here what is worth an Event and posts it with ``kopf.event``.
The functions below are pure: they compare what was known with what is now and say what to
post, so each transition is announced once, not on every timer tick.
"""

from __future__ import annotations

from dataclasses import dataclass

# container states that mean a pod will not become Ready by waiting
FAILING_WAIT_REASONS = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)


@dataclass(frozen=True)
class Event:
    type: str  # "Normal" or "Warning"
    reason: str
    message: str


def _by_type(conditions: list[dict] | None) -> dict[str, dict]:
    return {c.get("type"): c for c in conditions or []}


def condition_events(old: list[dict] | None, new: list[dict] | None) -> list[Event]:
    """Events for the condition changes a user cares about: became Ready, stopped being Ready,
    became Degraded (deadline exceeded, apply failed) or the spec turned out invalid."""
    before, after = _by_type(old), _by_type(new)
    events: list[Event] = []

    def turned(kind: str, value: str) -> dict | None:
        cond = after.get(kind)
        if cond is None or cond.get("status") != value:
            return None
        prev = before.get(kind)
        same = prev is not None and prev.get("status") == value and prev.get("reason") == cond.get("reason")
        return None if same else cond

    ready = turned("Ready", "True")
    if ready is not None:
        events.append(Event("Normal", "Ready", ready.get("message", "")))
    lost = turned("Ready", "False")
    if lost is not None and before.get("Ready", {}).get("status") == "True":
        events.append(Event("Warning", "NotReady", lost.get("message", "")))
    degraded = turned("Degraded", "True")
    if degraded is not None:
        events.append(Event("Warning", degraded.get("reason") or "Degraded", degraded.get("message", "")))
    return events


def failing_pods(pods: list[dict]) -> dict[str, str]:
    """Pod name -> why it will not become Ready (a container waiting in a failure state, or a
    container that exited with an error); pods merely starting are not listed."""
    out: dict[str, str] = {}
    for pod in pods:
        name = pod.get("metadata", {}).get("name", "?")
        status = pod.get("status") or {}
        if status.get("phase") == "Failed":
            out[name] = f"pod failed: {status.get('reason') or status.get('message') or 'phase Failed'}"
            continue
        for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
            # a crash-looping container alternates between waiting and running: name it by its last
            # exit, which stays the same, so it is announced once and not on every restart
            terminated = (cs.get("lastState") or {}).get("terminated") or {}
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if cs.get("restartCount", 0) > 0 and terminated.get("exitCode", 0) != 0:
                out[name] = (
                    f"container {cs.get('name')} keeps exiting: last exit code {terminated.get('exitCode')} "
                    f"({terminated.get('reason') or 'Error'})"
                )
                break
            if waiting.get("reason") in FAILING_WAIT_REASONS:
                detail = f" ({waiting['message'][:200]})" if waiting.get("message") else ""
                out[name] = f"container {cs.get('name')}: {waiting['reason']}{detail}"
                break
    return out


def pod_events(known: dict[str, str], now: dict[str, str]) -> list[Event]:
    """A Warning for each pod that started failing, or fails for a new reason, since last time."""
    changed = sorted((name, why) for name, why in now.items() if known.get(name) != why)
    return [Event("Warning", "PodFailing", f"{name}: {why}") for name, why in changed]
