"""The Leaderboard, Training and Admin tabs: what the online loop did, and how to steer it.

Handlers are methods of :class:`LoopHandlers`, plain functions that return strings and
DataFrames, so a test calls them without a browser. :func:`build_loop_tabs` lays the tabs
out and wires the handlers to Gradio components.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd
from gradio.context import get_render_context

from prefloop.app.guard import Guard
from prefloop.app.loop_api import password_matches
from prefloop.loop.controller import Loop, LoopError
from prefloop.loop.reports import round_summaries
from prefloop.names import BASE, is_hex_id
from prefloop.storage.store import NotFound, StoreError

TRAINING_TAB = "Training"
ADMIN_TAB = "Admin"
REFRESH_SECONDS = 5.0
WRONG_PASSWORD = "⚠️ Wrong admin password."
NO_DUELS = ("**No duel votes yet.** Ratings appear once people vote on duels: turns whose "
            "two answers come from two different policies (a new adapter against the "
            "champion, or the champion against base).")
NO_ROUNDS = "No finished training rounds with metrics yet."
ADMIN_DISABLED = ("**Admin is disabled.** To enable it, set the environment variable "
                  "`PREFLOOP_ADMIN_PASSWORD` to a password and restart prefloop.")
ADMIN_HELP = ("**Make champion** serves the chosen policy for new turns at once. It is also "
              "how to roll back: choose an earlier adapter, or `base` for the model without "
              "any adapter.")
LEADERBOARD_COLUMNS = ["policy", "state", "rating", "95% interval", "votes",
                       "win-rate vs base", "votes vs base", "KL/token"]
ROUND_COLUMNS = ["id", "trigger", "status", "started", "ended", "pairs", "new pairs",
                 "adapter", "adapter state", "final loss", "held-out accuracy after",
                 "KL/token", "relevance (base's)", "error", "decision"]
ACTIONS = ("start_round", "pause", "resume", "promote")
FLAGGED_COLUMNS = ["client", "flagged at", "votes held back", "reasons"]
FLAGGED_HELP = ("**Flagged voters.** A client (browser cookie) whose votes look untrustworthy "
                "(one side chosen far beyond chance, votes faster than the answers can be "
                "read, or duels judged against everyone else) is flagged: its votes stay "
                "stored but count neither for training nor for promotion. **Clear** one to "
                "count its votes again; only votes it casts afterwards can flag it again. "
                "Client ids are shown only with the admin password.")
VOTES_PLOT_HEIGHT = 300  # px; votes_axis_top counts on its few ticks
VOTES_AXIS_TOP = 5  # votes: the least top of the votes-per-hour axis (votes_axis_top)
SIDEWAYS_LABELS = 12  # more hours than this in the votes plot: their labels slant
# UI events stay out of the Gradio API: the JSON API under /api/v1 is the one to script.
QUIET: dict[str, Any] = {"api_visibility": "private", "show_progress": "hidden"}


def hour_label(hour: str) -> str:
    """'2025-01-01T10' (as the store groups votes) -> '2025-01-01 10:00': still in order."""
    return hour.replace("T", " ") + ":00"


def leaderboard_note(resamples: int) -> str:
    return ("Ratings are a Bradley–Terry fit over all duel votes, on the Elo scale with "
            "**base fixed at 1000**: 100 points above another policy means winning about 64% "
            "of duels against it. Ties and *both bad* count as half a win for each side; "
            "written answers are no duel result. The interval is a 95% bootstrap over "
            f"{resamples} resamples of the votes.")


@dataclass
class LeaderboardView:
    """Values for the Leaderboard tab: a note, the standings and the ratings over time."""

    note: str
    table: pd.DataFrame     # LEADERBOARD_COLUMNS
    over_time: pd.DataFrame  # duel_votes, policy, rating

    def updates(self) -> tuple[Any, ...]:
        shown = not self.table.empty
        return (self.note, gr.update(value=self.table, visible=shown),
                gr.update(value=self.over_time, visible=shown))


@dataclass
class FlaggedView:
    """Values for the Admin tab's flagged voters: a message, the table, the client ids."""

    message: str
    table: pd.DataFrame  # FLAGGED_COLUMNS
    clients: list[str]

    def updates(self) -> tuple[Any, ...]:
        return (self.message, gr.update(value=self.table, visible=not self.table.empty),
                gr.update(choices=self.clients, value=None))


@dataclass
class TrainingView:
    """Values for the Training tab, in the order of :meth:`updates`."""

    status: str
    rounds: pd.DataFrame    # ROUND_COLUMNS
    loss: pd.DataFrame      # round, loss
    accuracy: pd.DataFrame  # round, accuracy
    margin: pd.DataFrame    # round, margin
    votes: pd.DataFrame     # hour, votes

    @property
    def plots_note(self) -> str:
        return "" if len(self.loss) or len(self.accuracy) else NO_ROUNDS

    def updates(self) -> tuple[Any, ...]:
        return (self.status, self.rounds, self.plots_note,
                *(gr.update(value=frame, visible=not frame.empty)
                  for frame in (self.loss, self.accuracy, self.margin)),
                gr.update(value=self.votes, visible=not self.votes.empty,
                          y_lim=[0, votes_axis_top(self.votes)],
                          x_label_angle=-45 if len(self.votes) > SIDEWAYS_LABELS else 0))


def votes_axis_top(votes: pd.DataFrame) -> int:
    """The top of the votes-per-hour axis: the busiest hour, and at least VOTES_AXIS_TOP.

    Vega-Lite aims at one tick per 40 px of plot height (fewer than 8 on VOTES_PLOT_HEIGHT),
    at steps of 1, 2 or 5 × 10^k: over 0..5 or more the step is a whole vote, where over 0..3
    it was 0.5 (and one hour of 1 vote, on an axis not starting at 0, read "1.000000")."""
    return max(VOTES_AXIS_TOP, int(votes["votes"].max()) if len(votes) else 0)


class LoopHandlers:
    """Event handlers of the loop's tabs, bound to a :class:`Loop`."""

    def __init__(self, loop: Loop, admin_password: str | None,
                 guard: Guard | None = None,
                 moderation: Callable[[], str] | None = None) -> None:
        self.loop = loop
        self.admin_password = admin_password or None
        self.guard = guard  # slows wrong passwords to 10 a minute per address
        self.moderation = moderation  # the moderation counts, a line for the Admin tab

    # -- leaderboard ------------------------------------------------------------------------

    def leaderboard_view(self) -> LeaderboardView:
        standings = self.loop.reports.leaderboard()
        table = pd.DataFrame([_standing_row(s) for s in standings], columns=LEADERBOARD_COLUMNS)
        over_time = pd.DataFrame(
            [{"duel_votes": r["duel_votes"], "policy": r["policy"],
              "rating": round(r["rating"], 1)} for r in self.loop.reports.ratings_over_time()],
            columns=["duel_votes", "policy", "rating"])
        note = (leaderboard_note(self.loop.settings.rating_resamples) if standings
                else NO_DUELS)
        return LeaderboardView(note, table, over_time)

    # -- training ---------------------------------------------------------------------------

    def training_view(self) -> TrainingView:
        rounds = round_summaries(self.loop.store, 50)  # newest first
        finished = [r for r in reversed(rounds) if r["status"] == "succeeded"]
        return TrainingView(
            status=self.status_text(),
            # object dtype: whole numbers stay whole, and pandas makes no NaN of a blank
            rounds=pd.DataFrame([_round_row(r) for r in rounds], columns=ROUND_COLUMNS,
                                dtype=object),
            loss=pd.DataFrame([{"round": r["id"], "loss": r["losses"][-1]}
                               for r in finished if r["losses"]], columns=["round", "loss"]),
            accuracy=_held_out(finished, "accuracy"),
            margin=_held_out(finished, "margin"),
            votes=pd.DataFrame([{"hour": hour_label(r["hour"]), "votes": r["votes"]}
                                for r in self.loop.store.votes_per_hour()],
                               columns=["hour", "votes"]))

    def status_text(self) -> str:
        status = self.loop.reports.status()
        state, running = status["state"], status["round"]
        if state == "training" and running is not None:
            line = f"Loop: **training** round {running['id']}"
            progress = running.get("progress") or {}
            if "step" in progress:
                line += f" — step {progress['step']}/{progress.get('of', '?')}"
                if isinstance(progress.get("loss"), (int, float)):
                    line += f", loss {progress['loss']:.2f}"
            elif progress.get("event") == "kl_probe":
                line += " — measuring the new adapter's KL from base"
            else:
                line += " — preparing"
            if self.loop.paused:
                line += " (paused: no scheduled round after this one)"
        elif state == "paused":
            line = ("Loop: **paused** — no scheduled rounds until an admin resumes the loop "
                    "(an admin can still start one)")
        else:
            line = "Loop: **running**"
        candidate = status["candidate"]
        policies = (f"Champion: **{status['champion']}** · Candidate: "
                    + (f"**{candidate}** (dueling the champion)" if candidate else "none"))
        new, needed = status["new_trainable_votes"], status["min_new_pairs"]
        every = f"{status['train_every_minutes']:g} min"
        if status["waiting_for_verdict"]:
            votes = (f"{new} new votes; the next scheduled round waits for the candidate's "
                     f"verdict ({status['candidate_duel_votes']} of at most "
                     f"{status['max_duel_votes']} duel votes so far).")
        elif new < needed:
            votes = (f"{new} of {needed} new votes needed for the next round, checked every "
                     f"{every}.")
        else:
            votes = (f"{new} new votes ({needed} needed): a round starts at the next check "
                     f"(every {every}) unless the loop is paused.")
        promote = ("every new adapter becomes champion" if status["promote"] == "immediate"
                   else "a new adapter becomes champion when the promotion test finds it "
                        "better than the champion in their duels")
        return "\n\n".join([line, policies, votes, f"Promotion: {promote}."])

    # -- admin ------------------------------------------------------------------------------

    def policy_choices(self) -> list[tuple[str, str]]:
        """(label, value) pairs: ``base`` and every adapter, with its state."""
        champion = self.loop.store.champion()
        base = f"{BASE} (champion)" if champion == BASE else BASE
        return [(base, BASE)] + [(f"{a['name']} ({a['state']})", a["name"])
                                 for a in self.loop.store.adapters()]

    def admin_refusal(self, password: str | None, host: str | None) -> str | None:
        """Why an admin request with ``password`` from ``host`` is refused (None: it is not);
        a wrong password counts towards the address's limit."""
        if not self.admin_password:
            return "⚠️ Admin is disabled."
        if self.guard is not None and (wait := self.guard.admin_blocked(host)) is not None:
            return f"⚠️ Too many wrong passwords; try again in {wait} s."
        if not password or not password_matches(password, self.admin_password):
            if self.guard is not None:
                self.guard.admin_missed(host)
            return WRONG_PASSWORD
        return None

    def admin_action(self, action: str, password: str | None, policy: str | None = None,
                     host: str | None = None) -> str:
        """Do ``action`` (one of :data:`ACTIONS`) if ``password`` is right; say what
        happened. ``host``: the address it came from, for the wrong-password limit."""
        if (refusal := self.admin_refusal(password, host)) is not None:
            return refusal
        try:
            if action == "start_round":
                round_id = self.loop.start_round("admin")
                return f"✅ Round {round_id} started; follow it on the Training tab."
            if action == "pause":
                self.loop.pause()
                return ("✅ Loop paused: no scheduled rounds until you resume it (a running "
                        "round finishes).")
            if action == "resume":
                self.loop.resume()
                return "✅ Loop resumed: a round starts once enough new votes come in."
            if action == "promote":
                if not policy:
                    return "⚠️ Choose a policy to make champion."
                old = self.loop.promote(policy, "admin")
                if old == policy:
                    return f"✅ {policy} was already the champion."
                return f"✅ {policy} is the champion now (was {old}); new turns come from it."
        except (LoopError, StoreError, ValueError) as exc:
            return f"⚠️ {exc}"
        raise ValueError(f"unknown admin action {action!r}: expected one of "
                         f"{', '.join(ACTIONS)}")

    def flagged_view(self, password: str | None, host: str | None = None) -> FlaggedView:
        """The flagged clients, if ``password`` is right (client ids are cookies: never shown
        without it)."""
        if (refusal := self.admin_refusal(password, host)) is not None:
            return FlaggedView(refusal, pd.DataFrame(columns=FLAGGED_COLUMNS), [])
        return self._flagged("")

    def _flagged(self, done: str) -> FlaggedView:
        """The flagged clients, after ``done`` (what an action just did)."""
        flagged = self.loop.store.flagged_clients()
        table = pd.DataFrame([{"client": f["client_id"], "flagged at": _time(f["flagged_at"]),
                               "votes held back": f["votes"], "reasons": "\n".join(f["reasons"])}
                              for f in flagged], columns=FLAGGED_COLUMNS, dtype=object)
        count = (f"{len(flagged)} client{'s' if len(flagged) != 1 else ''} flagged."
                 if flagged else "No client is flagged.")
        return FlaggedView(f"{done} {count}".strip(), table, [f["client_id"] for f in flagged])

    def clear_flag(self, password: str | None, client_id: str | None,
                   host: str | None = None) -> FlaggedView:
        """Clear a flagged client (its votes count again) if ``password`` is right."""
        if (refusal := self.admin_refusal(password, host)) is not None:
            return FlaggedView(refusal, pd.DataFrame(columns=FLAGGED_COLUMNS), [])
        client_id = (client_id or "").strip()
        if not is_hex_id(client_id):
            done = "⚠️ Choose a flagged client (32 hex digits) to clear."
        else:
            try:
                self.loop.store.clear_client(client_id, by="admin (page)")
                done = f"✅ Cleared {client_id}: its votes count again."
            except NotFound as exc:
                done = f"⚠️ {exc}."
        return self._flagged(done)

    def admin_state(self) -> str:
        store = self.loop.store
        state = (f"Champion: **{store.champion()}** · Candidate: "
                 f"**{store.candidate() or 'none'}** · Loop: "
                 f"**{'paused' if self.loop.paused else 'running'}**")
        return state + (f"\n\n{self.moderation()}" if self.moderation else "")


def _standing_row(s: dict[str, Any]) -> dict[str, Any]:
    interval = ("–" if math.isnan(s["low"]) or math.isnan(s["high"])
                else f"{round(s['low'])}–{round(s['high'])}")
    winrate = s["winrate_vs_base"]
    return {"policy": s["policy"], "state": s["state"], "rating": round(s["rating"]),
            "95% interval": interval, "votes": s["votes"],
            "win-rate vs base": "–" if winrate is None else f"{winrate:.0%}",
            "votes vs base": s["votes_vs_base"], "KL/token": _kl(s["kl_per_token"])}


def _round_row(r: dict[str, Any]) -> dict[str, Any]:
    """A round as table cells; what it does not have (yet) is blank."""
    after = (r["held_out"] or {}).get("after") or {}
    kl = (r["kl"] or {}).get("per_token")
    relevance, base = (r["kl"] or {}).get("relevance"), (r["kl"] or {}).get("base_relevance")
    row = {"id": r["id"], "trigger": r["trigger"], "status": r["status"],
           "started": _time(r["started_at"]), "ended": _time(r["ended_at"]),
           "pairs": r["pairs"], "new pairs": r["new_pairs"], "adapter": r["adapter"],
           "adapter state": r["adapter_state"],
           "final loss": round(r["losses"][-1], 3) if r["losses"] else None,
           "held-out accuracy after": _rounded(after.get("accuracy")),
           "KL/token": None if kl is None else _kl(kl),
           "relevance (base's)": None if relevance is None else f"{relevance:.2f}" + (
               "" if base is None else f" ({base:.2f})"),
           "error": r["error"],
           "decision": r["adapter_reason"]}
    return {key: "" if value is None else value for key, value in row.items()}


def _held_out(rounds: list[dict[str, Any]], metric: str) -> pd.DataFrame:
    """``metric`` of the held-out pairs after training, per round that has it."""
    rows = [{"round": r["id"], metric: after[metric]} for r in rounds
            if (after := (r["held_out"] or {}).get("after") or {}).get(metric) is not None]
    return pd.DataFrame(rows, columns=["round", metric])


def _time(stamp: str | None) -> str | None:
    """An ISO UTC stamp as 'YYYY-MM-DD HH:MM:SS' (the page says the times are UTC)."""
    return stamp[:19].replace("T", " ") if stamp else None


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _kl(nats_per_token: float | None) -> str:
    """KL from base in nats per token as a cell ('–': not measured)."""
    return "–" if nats_per_token is None else f"{nats_per_token:.3f}"


def build_loop_tabs(loop: Loop, admin_password: str | None, guard: Guard | None = None,
                    moderation: Callable[[], str] | None = None) -> None:
    """Lay out the Leaderboard, Training and Admin tabs inside the current ``gr.Tabs``;
    ``moderation`` gives the Admin tab's moderation line."""
    handlers = LoopHandlers(loop, admin_password, guard, moderation)
    tabs = get_render_context()
    with gr.Tab("Leaderboard", id="leaderboard", elem_id="leaderboard-tab") as leaderboard_tab:
        refresh_leaderboard = _build_leaderboard(handlers)
    with gr.Tab(TRAINING_TAB, id="training", elem_id="training-tab") as training_tab:
        refresh_training = _build_training(handlers)
    with gr.Tab(ADMIN_TAB, id="admin", elem_id="admin-tab") as admin_tab:
        refresh_admin = _build_admin(handlers)

    leaderboard_tab.select(**refresh_leaderboard)
    # Training and Admin refresh when shown and then every few seconds while shown.
    timers: dict[str, gr.Timer] = {}
    for label, tab, refresh in ((TRAINING_TAB, training_tab, refresh_training),
                                (ADMIN_TAB, admin_tab, refresh_admin)):
        if refresh is None:
            continue
        timers[label] = timer = gr.Timer(REFRESH_SECONDS, active=False)
        tab.select(**refresh)
        timer.tick(**refresh)
        tab.select(lambda: gr.Timer(active=True), None, timer, **QUIET)
    if isinstance(tabs, gr.Tabs):  # it tells which tab is shown: stop the others' timers

        def shown_only(evt: gr.SelectData) -> list[gr.Timer]:
            return [gr.Timer(active=evt.value == label) for label in timers]

        tabs.select(shown_only, None, list(timers.values()), **QUIET)


def _build_leaderboard(handlers: LoopHandlers) -> dict[str, Any]:
    """The Leaderboard tab's components; returns the arguments of its refresh event."""
    note = gr.Markdown(NO_DUELS, elem_id="leaderboard-note")
    table = gr.Dataframe(pd.DataFrame(columns=LEADERBOARD_COLUMNS), elem_id="leaderboard",
                         interactive=False, visible=False, show_label=False,
                         datatype=["str", "str", "number", "str", "number", "str", "number"])
    plot = gr.LinePlot(pd.DataFrame(columns=["duel_votes", "policy", "rating"]),
                       x="duel_votes", y="rating", color="policy", elem_id="ratings-plot",
                       title="Ratings as duel votes came in", x_title="duel votes",
                       y_title="rating", visible=False)
    refresh = gr.Button("Refresh", elem_id="leaderboard-refresh")
    event = {"fn": lambda: handlers.leaderboard_view().updates(),
             "outputs": [note, table, plot], **QUIET}
    refresh.click(**event)
    return event


def _build_training(handlers: LoopHandlers) -> dict[str, Any]:
    """The Training tab's components; returns the arguments of its refresh event."""
    status = gr.Markdown("Loading…", elem_id="loop-status")
    gr.Markdown("### Rounds (times in UTC)")
    rounds = gr.Dataframe(pd.DataFrame(columns=ROUND_COLUMNS), elem_id="rounds",
                          interactive=False, show_label=False, wrap=True, max_chars=300)
    plots_note = gr.Markdown("", elem_id="rounds-note")
    with gr.Row():
        loss = gr.LinePlot(x="round", y="loss", elem_id="loss-plot", visible=False,
                           title="Final training loss", x_title="round")
        accuracy = gr.LinePlot(x="round", y="accuracy", elem_id="accuracy-plot",
                               visible=False, title="Held-out reward accuracy (after)",
                               x_title="round", y_lim=[0, 1])
        margin = gr.LinePlot(x="round", y="margin", elem_id="margin-plot", visible=False,
                             title="Held-out reward margin (after)", x_title="round")
    votes = gr.BarPlot(x="hour", y="votes", elem_id="votes-plot", visible=False,
                       title="Votes per hour (UTC)", x_title="hour (UTC)", y_title="votes",
                       y_axis_format="d", y_lim=[0, VOTES_AXIS_TOP], sort="x",
                       height=VOTES_PLOT_HEIGHT)
    refresh = gr.Button("Refresh", elem_id="training-refresh")
    event = {"fn": lambda: handlers.training_view().updates(),
             "outputs": [status, rounds, plots_note, loss, accuracy, margin, votes], **QUIET}
    refresh.click(**event)
    return event


def _build_admin(handlers: LoopHandlers) -> dict[str, Any] | None:
    """The Admin tab's components; returns the arguments of its refresh event (None when
    admin is disabled: then the tab only says how to enable it)."""
    if not handlers.admin_password:
        gr.Markdown(ADMIN_DISABLED, elem_id="admin-disabled")
        return None
    state = gr.Markdown("", elem_id="admin-state")
    password = gr.Textbox(label="Admin password", type="password", elem_id="admin-password")
    with gr.Row():
        start = gr.Button("Start a round now", elem_id="admin-start-round")
        pause = gr.Button("Pause loop", elem_id="admin-pause")
        resume = gr.Button("Resume loop", elem_id="admin-resume")
    gr.Markdown(ADMIN_HELP)
    with gr.Row():
        policy = gr.Dropdown(handlers.policy_choices(), value=None, label="Policy",
                             elem_id="admin-policy", scale=3)
        promote = gr.Button("Make champion", elem_id="admin-promote", scale=1)
    result = gr.Markdown("", elem_id="admin-result")
    _build_flagged(handlers, password)

    def refresh() -> tuple[str, Any]:
        return handlers.admin_state(), gr.update(choices=handlers.policy_choices())

    event = {"fn": refresh, "outputs": [state, policy], **QUIET}
    for button, action in ((start, "start_round"), (pause, "pause"), (resume, "resume"),
                           (promote, "promote")):
        # The password travels with each click only: no gr.State holds it.
        button.click(admin_click(handlers, action), [password, policy], result,
                     api_visibility="private").then(**event)
    return event


def _build_flagged(handlers: LoopHandlers, password: gr.Textbox) -> None:
    """Flagged voters in the Admin tab: listed and cleared with the admin password."""
    gr.Markdown(FLAGGED_HELP)
    with gr.Row():
        show = gr.Button("Show flagged voters", elem_id="admin-show-flagged", scale=1)
        client = gr.Dropdown([], value=None, label="Flagged client", scale=3,
                             elem_id="admin-flagged-client")
        clear = gr.Button("Clear flag", elem_id="admin-clear-flag", scale=1)
    message = gr.Markdown("", elem_id="admin-flagged-result")
    table = gr.Dataframe(pd.DataFrame(columns=FLAGGED_COLUMNS), elem_id="admin-flagged",
                         interactive=False, visible=False, show_label=False, wrap=True)

    def on_show(given: str | None, request: gr.Request) -> tuple[Any, ...]:
        return handlers.flagged_view(given, _host(request)).updates()

    def on_clear(given: str | None, chosen: str | None,
                 request: gr.Request) -> tuple[Any, ...]:
        return handlers.clear_flag(given, chosen, _host(request)).updates()

    # The password travels with each click only, as for the other admin actions.
    show.click(on_show, [password], [message, table, client], api_visibility="private")
    clear.click(on_clear, [password, client], [message, table, client],
                api_visibility="private")


def _host(request: gr.Request | None) -> str | None:
    return request.client.host if request is not None and request.client else None


def admin_click(handlers: LoopHandlers, action: str) -> Callable[..., str]:
    def on_click(given: str | None, chosen: str | None, request: gr.Request) -> str:
        host = request.client.host if request is not None and request.client else None
        return handlers.admin_action(action, given, chosen, host)
    return on_click
