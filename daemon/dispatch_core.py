"""The dispatcher's bookkeeping, apart from sockets: which frame waits, which worker holds which
frame, what each camera's frames became.

A frame from capture first waits for a free worker slot (a *credit*) in its camera's short
admission queue; when the queue is full or the frame grows older than `max_frame_age_ms` it is
*dropped* there (a live camera wants its newest frame). Once handed to a worker it is
*admitted*, and from then on it ends in exactly one of two ways: *published* (the publisher
acknowledged its result after storing it) or *lost*, with a reason, when it could not be re-sent
in time. A worker that stops heartbeating for `worker_timeout_ms` is declared lost and the frames
it held are re-sent to the others, newest first. So at every moment, per camera:

    captured = dropped + published + lost + in_flight

where in_flight counts frames waiting for admission, held by a worker, or done and waiting for
their acknowledgement. Sockets, clocks and logging stay outside (daemon/dispatcher.py); this
class takes events and returns what to send, so its rules are unit-tested on hand-made events.
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

LOST_REASONS = ("worker_lost", "result_unacknowledged", "no_publisher", "shutdown", "dispatcher_lost")
"""Why an admitted frame was lost: its worker died and it was too old to re-send; its result was never
acknowledged although the publisher was alive; no publisher was alive to take it in time; the
dispatcher stopped with it in flight; the dispatcher died with it (counted by the supervisor from
the dead dispatcher's last heartbeat). A fixed set: it is a metric label."""

Key = tuple[str, str, int]
"""A frame's identity across hosts and restarts: (camera, capture session, sequence number)."""


@dataclass(eq=False)
class FlightFrame:
    """One frame the dispatcher holds until it is published, dropped or lost."""

    key: Key
    ts: float
    parts: list[Any]
    admitted: bool = False
    worker: str = ""
    route: tuple[str, int, str] | None = None
    done_at: float | None = None
    requeue_reason: str = ""
    sends: int = 0
    admit_seq: int = -1
    sent_at: float = 0.0


@dataclass
class WorkerSlot:
    """A worker as the dispatcher sees it: its free batch slots and its last heartbeat."""

    name: str
    credits: int
    heard_at: float
    window: int = 1
    last_sent: float = 0.0
    holding: set[Key] = field(default_factory=set)

    def give(self, credits: int) -> None:
        """Free slots back, never more than the worker offered less what it holds (a late report of
        a frame taken from it must not inflate its share)."""
        self.credits = max(0, min(self.credits + credits, self.window - len(self.holding)))


@dataclass
class Flow:
    """One camera's frame accounting (the /stats fields)."""

    captured: int = 0
    dropped: int = 0
    published: int = 0
    resent: int = 0
    lost: dict[str, int] = field(default_factory=lambda: {reason: 0 for reason in LOST_REASONS})


@dataclass
class Leader:
    """The publisher whose results count: name, epoch (fencing number) and process instance."""

    name: str
    epoch: int
    instance: str
    peer: bytes
    heard_at: float

    @property
    def route(self) -> tuple[str, int, str]:
        """What a frame sent now is tagged with: results go to this publisher."""
        return (self.name, self.epoch, self.instance)


@dataclass
class Lost:
    """An admitted frame given up, with why (for the log, the record file and the counters)."""

    key: Key
    reason: str
    age_s: float
    sends: int


class DispatchCore:
    """Events in (frames, credits, heartbeats, done, acks, leader beats, ticks), sends out."""

    def __init__(self, cameras: Iterable[str], worker_timeout_s: float, max_frame_age_s: float,
                 ack_timeout_s: float, queue_frames: int, wall: Callable[[], float]) -> None:
        self.flows = {camera: Flow() for camera in cameras}
        self.worker_timeout_s = worker_timeout_s
        self.max_frame_age_s = max_frame_age_s
        self.ack_timeout_s = ack_timeout_s
        self.queue_frames = queue_frames
        self.wall = wall
        self.waiting: dict[str, deque[FlightFrame]] = {camera: deque() for camera in self.flows}
        self.resend: list[FlightFrame] = []
        self.frames: dict[Key, FlightFrame] = {}
        self.workers: dict[bytes, WorkerSlot] = {}
        self.leader: Leader | None = None
        self.sessions: dict[str, tuple[str, int]] = {}
        self.admitted: dict[str, int] = {camera: 0 for camera in self.flows}
        self._turn = itertools.cycle(list(self.flows))

    # -- accounting ----------------------------------------------------------------------------

    def accounting(self) -> dict[str, dict[str, Any]]:
        """Per camera: captured, dropped, published, resent, lost (total and by reason), and in_flight:
        frames captured and neither dropped, published nor lost yet."""
        in_flight = Counter(key[0] for key in self.frames)
        return {camera: {"captured": flow.captured, "dropped": flow.dropped, "published": flow.published,
                         "resent": flow.resent, "lost": sum(flow.lost.values()), "lost_reasons": dict(flow.lost),
                         "in_flight": in_flight[camera]}
                for camera, flow in self.flows.items()}

    # -- frames from capture -------------------------------------------------------------------

    def intake(self, camera: str, session: str, seq: int, ts: float, parts: list[Any]) -> int:
        """A captured frame joins its camera's admission queue. Sequence numbers the capture skipped
        (its queue to us was full) count as captured and dropped. Returns frames dropped now."""
        flow = self.flows[camera]
        known = self.sessions.get(camera)
        skipped = 0
        if known is not None and known[0] == session:
            if seq <= known[1]:
                return 0
            skipped = seq - known[1] - 1
        self.sessions[camera] = (session, seq)
        flow.captured += 1 + skipped
        flow.dropped += skipped
        frame = FlightFrame((camera, session, seq), ts, parts)
        if frame.key in self.frames:
            return skipped
        queue = self.waiting[camera]
        queue.append(frame)
        self.frames[frame.key] = frame
        dropped = skipped
        while len(queue) > self.queue_frames:
            old = queue.popleft()
            del self.frames[old.key]
            flow.dropped += 1
            dropped += 1
        return dropped

    # -- workers -------------------------------------------------------------------------------

    def worker_hello(self, peer: bytes, name: str, credits: int, now: float) -> bool:
        """A worker (re)introduces itself with its slots; a reconnect under a new peer id is a new worker.
        A second hello from a known peer (it crossed our reply) sets its free slots to what it offers
        less the frames on their way to it. True when the worker is new."""
        known = self.workers.get(peer)
        if known is not None:
            known.window = credits
            known.credits = 0
            known.give(credits)
            known.heard_at = now
            return False
        self.workers[peer] = WorkerSlot(name, credits, now, window=credits)
        return True

    def worker_beat(self, peer: bytes, now: float) -> bool:
        """A heartbeat from a worker's inference loop; False when the worker is unknown (it must say hello)."""
        slot = self.workers.get(peer)
        if slot is None:
            return False
        slot.heard_at = now
        return True

    def worker_credit(self, peer: bytes, credits: int, now: float) -> bool:
        """More free slots; False when the worker is unknown."""
        slot = self.workers.get(peer)
        if slot is None:
            return False
        slot.give(credits)
        slot.heard_at = now
        return True

    def worker_done(self, peer: bytes, keys: Iterable[Key], now: float) -> list[FlightFrame]:
        """The worker sent these frames' results to the publisher their route named; the frames now wait
        for an acknowledgement. One whose route is no longer the leader is re-queued at once (its
        result went to a publisher that lost its turn). A worker declared lost, or one reporting a frame
        that was taken from it meanwhile, changes nothing (its result still counts if the publisher
        acknowledges it). Returns those re-queued."""
        slot = self.workers.get(peer)
        requeued = []
        for key in keys:
            if slot is None or key not in slot.holding:
                continue
            slot.holding.discard(key)
            frame = self.frames.get(key)
            if frame is None or not frame.admitted or frame.done_at is not None:
                continue
            frame.done_at = now
            frame.worker = ""
            if self.leader is None or frame.route != self.leader.route:
                self._requeue(frame, "no_publisher")
                requeued.append(frame)
        return requeued

    def worker_unreachable(self, peer: bytes, frame: FlightFrame) -> str:
        """A frame could not be sent to this worker (its connection is gone): forget the worker and
        re-queue what it held, this frame included. Returns the worker's name ('' if unknown)."""
        slot = self.workers.pop(peer, None)
        if slot is not None:
            self._release(slot, "worker_lost")
        if frame.worker:
            self._requeue(frame, "worker_lost")
        return slot.name if slot is not None else ""

    def _requeue(self, frame: FlightFrame, reason: str) -> None:
        frame.worker = ""
        frame.done_at = None
        frame.requeue_reason = reason
        self.resend.append(frame)

    def _release(self, slot: WorkerSlot, reason: str) -> list[FlightFrame]:
        frames = [self.frames[key] for key in slot.holding if key in self.frames]
        for frame in frames:
            self._requeue(frame, reason)
        slot.holding.clear()
        return frames

    # -- publisher -------------------------------------------------------------------------------

    def leader_beat(self, peer: bytes, name: str, epoch: int, instance: str, now: float) -> tuple[bool, int, list[FlightFrame]]:
        """A publisher says it leads with this epoch. Accepted when the epoch is the highest seen (or the
        same publisher's); a lower epoch is fenced. A change of leader (another publisher, a new epoch
        or a restarted process) re-queues every frame whose result went to the previous one and is not
        acknowledged. Returns (accepted, epoch in force, frames re-queued)."""
        current = self.leader
        if current is not None and (epoch < current.epoch or (epoch == current.epoch and name != current.name)):
            return False, current.epoch, []
        changed = current is None or current.route != (name, epoch, instance)
        self.leader = Leader(name, epoch, instance, peer, now)
        requeued: list[FlightFrame] = []
        if changed and current is not None:
            for frame in self.frames.values():
                if frame.admitted and frame.done_at is not None and frame.route == current.route:
                    self._requeue(frame, "no_publisher")
                    requeued.append(frame)
        return True, epoch, requeued

    def leader_age(self, now: float) -> float | None:
        """Seconds since the leader's last heartbeat (None: never heard one)."""
        return None if self.leader is None else now - self.leader.heard_at

    def ack(self, keys: Iterable[Key], epoch: int) -> int:
        """The publisher stored and published these frames' results. Acks under an epoch older than the
        leader's are ignored (a fenced publisher). Returns how many frames this retired."""
        if self.leader is not None and epoch < self.leader.epoch:
            return 0
        retired = 0
        for key in keys:
            frame = self.frames.pop(key, None)
            if frame is None:
                continue
            if not frame.admitted:
                self.waiting[key[0]].remove(frame)
            if frame in self.resend:
                self.resend.remove(frame)
            for slot in self.workers.values():
                slot.holding.discard(key)
            self.flows[key[0]].published += 1
            retired += 1
        return retired

    # -- time --------------------------------------------------------------------------------

    def tick(self, now: float) -> tuple[list[str], list[Lost]]:
        """Declare silent workers lost (their frames re-queued), take back frames a live worker never
        reported done (it never got them: its slot is freed), drop frames that waited too long for
        admission, re-queue results nobody acknowledged, and give up frames too old to re-send.
        Returns (names of workers declared lost, frames lost)."""
        gone = []
        for peer, slot in list(self.workers.items()):
            if now - slot.heard_at > self.worker_timeout_s:
                del self.workers[peer]
                self._release(slot, "worker_lost")
                gone.append(slot.name)
        stuck_s = self.worker_timeout_s + self.ack_timeout_s
        for slot in self.workers.values():
            for key in list(slot.holding):
                frame = self.frames.get(key)
                if frame is None:
                    slot.holding.discard(key)
                elif now - frame.sent_at > stuck_s:
                    slot.holding.discard(key)
                    slot.give(1)
                    self._requeue(frame, "result_unacknowledged")
        wall = self.wall()
        for camera, queue in self.waiting.items():
            while queue and wall - queue[0].ts > self.max_frame_age_s:
                frame = queue.popleft()
                del self.frames[frame.key]
                self.flows[camera].dropped += 1
        leader_alive = self.leader is not None and now - self.leader.heard_at <= self.worker_timeout_s
        for frame in self.frames.values():
            if frame.done_at is not None and leader_alive and now - frame.done_at > self.ack_timeout_s:
                self._requeue(frame, "result_unacknowledged")
        lost = []
        for frame in list(self.frames.values()):
            if not frame.admitted or frame.worker or wall - frame.ts <= self.max_frame_age_s:
                continue
            reason = frame.requeue_reason or "no_publisher"
            if frame.done_at is not None and leader_alive:
                continue
            if frame.done_at is not None:
                reason = "no_publisher"
            lost.append(self._lose(frame, reason, wall))
        return gone, lost

    def _lose(self, frame: FlightFrame, reason: str, wall: float) -> Lost:
        del self.frames[frame.key]
        if frame in self.resend:
            self.resend.remove(frame)
        self.flows[frame.key[0]].lost[reason] += 1
        return Lost(frame.key, reason, wall - frame.ts, frame.sends)

    def shutdown(self) -> list[Lost]:
        """The dispatcher stops: admitted frames still in flight are lost (reason shutdown); frames
        never admitted count as dropped."""
        wall = self.wall()
        lost = []
        for camera, queue in self.waiting.items():
            self.flows[camera].dropped += len(queue)
            for frame in queue:
                del self.frames[frame.key]
            queue.clear()
        for frame in list(self.frames.values()):
            lost.append(self._lose(frame, "shutdown", wall))
        return lost

    # -- scheduling ----------------------------------------------------------------------------

    def _free_worker(self) -> tuple[bytes, WorkerSlot] | None:
        """The worker with a free slot that was sent a frame longest ago: turns go round, so a fast
        worker cannot starve a slower one that is just as free."""
        best = None
        for peer, slot in self.workers.items():
            if slot.credits > 0 and (best is None or slot.last_sent < best[1].last_sent):
                best = (peer, slot)
        return best

    def _next_frame(self) -> FlightFrame | None:
        if self.resend:
            newest = max(self.resend, key=lambda f: f.ts)
            self.resend.remove(newest)
            return newest
        for _ in range(len(self.waiting)):
            camera = next(self._turn)
            if self.waiting[camera]:
                return self.waiting[camera].popleft()
        return None

    def assign(self, now: float) -> list[tuple[bytes, FlightFrame]]:
        """Pair waiting frames with free worker slots: re-sends first (newest first), then each camera's
        admission queue in turn. Nothing is sent without a leader to take the results. A frame admitted
        for the first time gets the camera's next admission number: the publisher counts gaps in those,
        so frames dropped at admission are no gap, and a gap is a frame lost after admission."""
        sends = []
        if self.leader is None:
            return sends
        while True:
            chosen = self._free_worker()
            if chosen is None:
                break
            frame = self._next_frame()
            if frame is None:
                break
            peer, slot = chosen
            slot.credits -= 1
            slot.last_sent = now
            slot.holding.add(frame.key)
            if frame.sends:
                self.flows[frame.key[0]].resent += 1
            else:
                frame.admit_seq = self.admitted[frame.key[0]]
                self.admitted[frame.key[0]] += 1
            frame.admitted = True
            frame.worker = slot.name
            frame.route = self.leader.route
            frame.done_at = None
            frame.sent_at = now
            frame.sends += 1
            sends.append((peer, frame))
        return sends
