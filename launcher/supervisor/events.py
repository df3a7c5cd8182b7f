"""What a model server tells, the moment it happens: the one channel from a ManagedModel to
whoever listens, given to it at construction.

A model run alone (speed tests) tells nobody (`NO_EVENTS`). Under a supervisor, every model
gets its share of one `SupervisorEvents` (`for_model()`): the supervisor built with it hears
crashes and memory peaks, the child records hear of each process (so a lalo killed with -9
reaps them at the next start), and the measurements store keeps each model's peak under its
measurement key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from launcher.supervisor.state import ModelState

if TYPE_CHECKING:  # types only: a model run alone needs neither
    from launcher.placement.measurements import Measurements
    from launcher.supervisor.instance import ChildRecords


class ProcessEvents(Protocol):
    """What one ManagedModel tells. Each call is made on the event loop and returns at once."""

    def spawned(self, pid: int, created: float, port: int) -> None:
        """A server process exists (`created`: its create time, for reaping it safely)."""

    def changed(self, state: ModelState) -> None:
        """Every state change, `sleeping` included."""

    def crashed(self, uptime: float | None) -> None:
        """The ready server exited or hung: the model is `failed` already, not leasable."""

    def measured(self, rss: int) -> None:
        """A new peak of the server's resident memory."""

    def out_of_memory(self, rss: int) -> None:
        """The ready server was killed from outside, most likely for memory, having reached
        `rss`; `crashed` follows at once."""

    def reaped(self, pid: int) -> None:
        """The process has exited and is reaped."""


class _NoEvents:
    """Tells nobody: a model run without a supervisor."""

    def spawned(self, pid: int, created: float, port: int) -> None: ...

    def changed(self, state: ModelState) -> None: ...

    def crashed(self, uptime: float | None) -> None: ...

    def measured(self, rss: int) -> None: ...

    def out_of_memory(self, rss: int) -> None: ...

    def reaped(self, pid: int) -> None: ...


NO_EVENTS: ProcessEvents = _NoEvents()


class EventsOwner(Protocol):
    """What the supervisor running the models hears."""

    def model_crashed(self, name: str, uptime: float | None) -> None: ...

    def record_measurement(self, name: str, rss: int) -> None: ...

    def model_changed(self, name: str, state: ModelState) -> None: ...

    def model_out_of_memory(self, name: str, rss: int) -> None: ...


class SupervisorEvents:
    """The events of one supervisor's models: each model is built with `for_model(name)`,
    the supervisor with this object (its constructor makes it the one owner)."""

    def __init__(self, children: ChildRecords | None = None,
                 measurements: Measurements | None = None) -> None:
        self.children = children
        self.measurements = measurements
        self.owner: EventsOwner | None = None

    def for_model(self, name: str, measurement_key: str = "") -> ModelEvents:
        """What the ManagedModel `name` is given; its peaks are stored under `measurement_key`."""
        return ModelEvents(self, name, measurement_key)

    def attach(self, owner: EventsOwner) -> None:
        """`owner` (the supervisor, while it is constructed) hears every model's crashes and peaks."""
        if self.owner is not None and self.owner is not owner:
            raise ValueError("these model events already belong to another supervisor")
        self.owner = owner

    def check(self, name: str, events: ProcessEvents) -> None:
        """ValueError unless `events` is what the model `name` was to be built with: a model
        built without them would crash without its supervisor ever hearing of it."""
        if not (isinstance(events, ModelEvents) and events.hub is self and events.name == name):
            raise ValueError(f"{name}: the model was not built with this supervisor's events "
                             "(ManagedModel(..., events=events.for_model(name)))")


class ModelEvents:
    """One model's share of SupervisorEvents: what its ManagedModel is given."""

    __slots__ = ("hub", "measurement_key", "name")

    def __init__(self, hub: SupervisorEvents, name: str, measurement_key: str) -> None:
        self.hub = hub
        self.name = name
        self.measurement_key = measurement_key

    def spawned(self, pid: int, created: float, port: int) -> None:
        if self.hub.children is not None:
            self.hub.children.add(self.name, pid, created, port)

    def changed(self, state: ModelState) -> None:
        if self.hub.owner is not None:  # the supervisor decides on states when it dispatches;
            self.hub.owner.model_changed(self.name, state)  # its thread governor needs them now

    def crashed(self, uptime: float | None) -> None:
        if self.hub.owner is not None:
            self.hub.owner.model_crashed(self.name, uptime)

    def measured(self, rss: int) -> None:
        if self.hub.owner is not None:
            self.hub.owner.record_measurement(self.name, rss)
        if self.hub.measurements is not None:  # keeps the highest figure per key
            self.hub.measurements.record(self.measurement_key, rss)

    def out_of_memory(self, rss: int) -> None:
        if self.hub.owner is not None:
            self.hub.owner.model_out_of_memory(self.name, rss)
        if self.hub.measurements is not None:  # it needs at least that: so planned next time
            self.hub.measurements.record(self.measurement_key, rss)

    def reaped(self, pid: int) -> None:
        if self.hub.children is not None:
            self.hub.children.remove(self.name, pid)
