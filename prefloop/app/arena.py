"""The Arena tab: chat, two answers streaming side by side, one vote per turn.

Handlers are methods of :class:`ArenaHandlers`, plain functions of their inputs that a test
can call without a browser. :func:`build_arena` wires them to Gradio components.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from prefloop.app.chat import ChatService, Forbidden, InputError, Turn
from prefloop.app.guard import Client, Refused, parse_client_id
from prefloop.app.moderation import Flagged
from prefloop.app.privacy import (
    DELETION_LIMITS,
    ConsentRequired,
    client_data,
    describe_counts,
    holds_anything,
    stored_counts,
)
from prefloop.names import PairKind
from prefloop.serving.context import ContextTooLong
from prefloop.serving.sampler import PairProgress, SamplingError
from prefloop.storage.store import Conflict, NotFound

log = logging.getLogger(__name__)

VOTE_LABELS = {"a": "A is better", "b": "B is better", "tie": "Tie", "both_bad": "Both bad",
               "written": "your written answer"}
PLACEHOLDER = "*waiting for your message*"
# Where one answer is, said beside its heading: IDLE (no answer under way), WRITING, CHECKING
# (written, moderation has yet to pass it) and DONE.
IDLE, WRITING, CHECKING, DONE = "idle", "writing", "checking", "done"
MY_DATA_HELP = ("Everything stored under your browser's random cookie id (your conversations, "
                "the answers and your votes): [download it as JSON](api/v1/me/data), or "
                "delete it for good. " + DELETION_LIMITS)
ACCEPT_FIRST = ("⚠️ Please read the terms above and press **I accept** first: nothing of yours "
                "is stored until you do.")


@dataclass
class ArenaState:
    """What one browser tab knows: its conversation and the pair awaiting a vote."""

    conversation_id: str | None = None
    pair_id: str | None = None
    pending_message: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)  # accepted messages
    voted_pair_id: str | None = None  # the last vote, which Undo takes back


@dataclass
class View:
    """Values for the arena's outputs, in :data:`OUTPUTS` order."""

    state: ArenaState
    chat: list[dict[str, str]]
    answer_a: str = PLACEHOLDER
    answer_b: str = PLACEHOLDER
    status: str = ""
    voting: bool = False        # vote buttons enabled
    typing: bool = True         # message box and send enabled
    clear_message: bool = False
    clear_written: bool = False
    undo: bool = False          # the Undo button shown (after a vote)
    writing: tuple[str, str] = (IDLE, IDLE)  # where answers A and B are (WRITING, DONE, …)

    def updates(self) -> tuple[Any, ...]:
        vote = gr.update(interactive=self.voting)
        return (self.state, self.chat, self.answer_a, self.answer_b,
                *(answer_status(side, stage) for side, stage in zip("ab", self.writing,
                                                                    strict=True)),
                self.status,
                vote, vote, vote, vote, vote,
                gr.update(interactive=self.typing, **({"value": ""} if self.clear_message else {})),
                gr.update(interactive=self.typing),
                gr.update(**({"value": ""} if self.clear_written else {})),
                gr.update(visible=self.undo))


def answer_status(side: str, stage: str) -> str:
    """The status beside answer ``side``'s heading (HTML, inside a polite live region):
    "still writing…" while it grows, nothing to see once it is complete; a screen reader
    hears "Answer A is complete." then."""
    name = f"Answer {side.upper()}"
    if stage == WRITING:
        return (f'<span class="busy"><span class="visually-hidden">{name} is </span>'
                "still writing…</span>")
    if stage == CHECKING:
        return (f'<span class="busy"><span class="visually-hidden">{name} is </span>'
                "written; being checked…</span>")
    if stage == DONE:
        return f'<span class="visually-hidden">{name} is complete.</span>'
    return ""


def stages(progress: PairProgress, checked_later: bool) -> tuple[str, str]:
    """Where each answer of a pair being written is; a finished one is CHECKING while
    moderation has yet to pass it (``checked_later``)."""
    finished = CHECKING if checked_later else DONE
    a, b = (finished if side.done else WRITING for side in (progress.a, progress.b))
    return a, b


def reveal(vote: dict[str, Any]) -> str:
    """Who wrote the answers, said once the vote is in (a duel hides it until then)."""
    a, b = vote["policy_a"], vote["policy_b"]
    if a == b:
        return f"Both answers came from {a}."
    text = f"A came from {a}, B from {b}."
    if vote.get("decision") == "promote":
        text += " This vote made the new model the champion."
    return text


def _shown(state: ArenaState) -> list[dict[str, str]]:
    chat = list(state.history)
    if state.pending_message is not None:
        chat.append({"role": "user", "content": state.pending_message})
    return chat


class ArenaHandlers:
    """Event handlers of the Arena tab, bound to a :class:`ChatService`."""

    def __init__(self, service: ChatService) -> None:
        self.service = service

    def client(self, request: gr.Request | None) -> Client | None:
        """The visitor behind a page event, from the cookie the app's middleware set."""
        if request is None:
            return None
        client_id = parse_client_id(request.headers.get("cookie", ""))
        if client_id is None:
            return None
        host = request.client.host if request.client else None
        return self.service.guard.client(client_id, host)

    async def send(self, message: str, state: ArenaState | None,
                   client: Client | None = None) -> AsyncIterator[View]:
        state = state or ArenaState()
        if state.pair_id is not None:
            yield View(state, _shown(state), status="Vote on these answers first.",
                       voting=True, typing=False)
            return
        try:
            await asyncio.to_thread(self.service.check_turn, message, state.conversation_id,
                                    client)
        except ConsentRequired:
            yield View(state, _shown(state), status=ACCEPT_FIRST)
            return
        except (InputError, NotFound, Conflict, Forbidden) as exc:
            yield View(state, _shown(state), status=f"⚠️ {exc}")
            return
        state.pending_message = message
        chat = _shown(state)
        yield View(state, chat, "…", "…", status="Writing two answers…", typing=False,
                   clear_message=True, writing=(WRITING, WRITING))
        try:
            async for turn in self.service.stream_turn(message, state.conversation_id,
                                                       client):
                progress = turn.progress
                note = ""
                if progress.dropped_messages:
                    note = (f"The {progress.dropped_messages} oldest messages were left out "
                            "to fit the model's context window. ")
                if turn.pair_id is not None and turn.withheld:
                    yield self._withheld(state, turn, note)
                elif turn.pair_id is not None:
                    state.conversation_id, state.pair_id = turn.conversation_id, turn.pair_id
                    yield View(state, chat, progress.a.text or "*(empty answer)*",
                               progress.b.text or "*(empty answer)*",
                               status=note + "Which answer is better?", voting=True,
                               typing=False, writing=(DONE, DONE))
                else:
                    yield View(state, chat, self._growing(progress.a.text),
                               self._growing(progress.b.text),
                               status=note + "Writing two answers…", typing=False,
                               writing=stages(progress, self.service.moderator.active))
        except ConsentRequired:  # the visitor deleted their data while answers were written
            state.pending_message = None
            yield View(state, _shown(state), status=ACCEPT_FIRST)
        except (SamplingError, ContextTooLong, InputError, NotFound, Conflict, Forbidden,
                Refused, Flagged) as exc:
            state.pending_message = None
            yield View(state, _shown(state), status=f"⚠️ {exc}")
        except sqlite3.Error:
            log.exception("storing a pair failed")
            state.pending_message = None
            yield View(state, _shown(state), status="⚠️ The answers could not be saved; "
                       "please send your message again.")

    def _growing(self, text: str) -> str:
        """An answer being written: its text, or only its length while moderation has yet to
        check it (a flagged answer is never shown)."""
        if not self.service.moderator.active:
            return text or "…"
        return f"*Writing… {len(text):,} characters so far; shown once checked.*"

    def _withheld(self, state: ArenaState, turn: Turn, note: str) -> View:
        """A pair with an answer moderation withheld: shown without it, and no vote."""
        state.conversation_id, state.pending_message = turn.conversation_id, None

        def shown(side: str, text: str) -> str:
            if side in turn.withheld:
                return f"*Withheld: flagged by moderation ({turn.withheld[side]}).*"
            return text or "*(empty answer)*"

        which = " and ".join(f"answer {side.upper()}" for side in turn.withheld)
        return View(state, _shown(state), shown("a", turn.progress.a.text),
                    shown("b", turn.progress.b.text),
                    status=note + f"⚠️ Moderation withheld {which}, so this turn takes no "
                    "vote and stays out of the conversation. Send your message again, or "
                    "another one.", writing=(DONE, DONE))

    def vote(self, choice: str, state: ArenaState | None, answer: str | None = None,
             client: Client | None = None) -> View:
        state = state or ArenaState()
        if state.pair_id is None:
            return View(state, _shown(state), status="Send a message first.")
        try:
            result = self.service.vote(state.pair_id, choice, answer, client)
        except ConsentRequired:
            return View(state, _shown(state), status=ACCEPT_FIRST, voting=True, typing=False)
        except (InputError, NotFound, Conflict, Forbidden, Refused, Flagged) as exc:
            return View(state, _shown(state), status=f"⚠️ {exc}", voting=True, typing=False)
        except Exception:  # not stored (e.g. disk full): say so and keep the buttons
            log.exception("vote on pair %s failed", state.pair_id)
            return View(state, _shown(state), status="⚠️ The vote could not be saved; "
                        "please try again.", voting=True, typing=False)
        if state.conversation_id is not None:
            state.history = self.service.store.messages(state.conversation_id)
        state.voted_pair_id = state.pair_id
        state.pair_id, state.pending_message = None, None
        window = self.service.settings.undo_seconds
        undoable = window > 0 and result["kind"] != PairKind.DUEL  # a duel's reply named both
        undo = f" (Undo takes it back within {window:g} s.)" if undoable else ""
        return View(state, _shown(state), status=f"Saved: {VOTE_LABELS[choice]}. "
                    f"{reveal(result)} Send your next message.{undo}", clear_written=True,
                    undo=undoable)

    def undo(self, state: ArenaState | None, client: Client | None = None) -> View:
        """Take back the last vote; its pair awaits a vote again."""
        state = state or ArenaState()
        pair_id = state.voted_pair_id
        if pair_id is None or state.pair_id is not None:
            return View(state, _shown(state), status="There is no vote to take back.",
                        voting=state.pair_id is not None, typing=state.pair_id is None)
        try:
            self.service.undo_vote(pair_id, client)
            pair = self.service.store.pair(pair_id)
        except (InputError, NotFound, Conflict, Forbidden, Refused) as exc:
            state.voted_pair_id = None
            return View(state, _shown(state), status=f"⚠️ {exc}")
        except Exception:  # e.g. the database is locked: the vote stands, say so
            log.exception("undo of the vote on pair %s failed", pair_id)
            return View(state, _shown(state), status="⚠️ The vote could not be taken back; "
                        "please try again.", undo=True)
        state.history = self.service.store.messages(pair["conversation_id"])
        state.pair_id, state.voted_pair_id = pair_id, None
        state.pending_message = pair["context"][-1]["content"]
        return View(state, _shown(state), pair["text_a"] or "*(empty answer)*",
                    pair["text_b"] or "*(empty answer)*",
                    status="Vote taken back. Which answer is better?", voting=True,
                    typing=False)

    def new_conversation(self, state: ArenaState | None) -> View:
        return View(ArenaState(), [], status="New conversation.")

    def deletion_preview(self, client: Client | None) -> tuple[bool, str]:
        """Before deleting the visitor's data, say what would go: (confirm shown, text)."""
        if client is None:
            return False, "⚠️ This page came without a visitor id (cookie): nothing to delete."
        data = client_data(self.service.store, client.id)
        if not holds_anything(data):
            return False, "Nothing is stored under your cookie id."
        return True, (f"This deletes {describe_counts(stored_counts(data))} stored under your "
                      f"cookie id, for good. {DELETION_LIMITS} Press **Yes, delete "
                      "everything** to go on.")

    def delete_my_data(self, state: ArenaState | None,
                       client: Client | None) -> tuple[View, bool, str]:
        """Delete everything stored for the visitor: (the arena afresh, confirm shown, text)."""
        state = state or ArenaState()
        if client is None:
            return View(state, _shown(state)), False, "⚠️ No visitor id: nothing deleted."
        try:
            self.service.guard.admit_vote(client)  # as in the API: a deletion counts as a vote
            deleted = self.service.store.delete_client_data(client.id)
        except Refused as exc:
            return (View(state, _shown(state), voting=state.pair_id is not None,
                         typing=state.pair_id is None), True, f"⚠️ {exc}")
        except Exception:  # e.g. the database is locked: nothing was deleted, say so
            log.exception("deleting a visitor's data failed")
            return (View(state, _shown(state), voting=state.pair_id is not None,
                         typing=state.pair_id is None), True,
                    "⚠️ Your data could not be deleted; please try again.")
        said = f"✅ Deleted {describe_counts(deleted)}. {DELETION_LIMITS}"
        return View(ArenaState(), [], status="Your data was deleted."), False, said

    def terms_shown(self, client: Client | None) -> bool:
        """Whether the page shows the terms: asked, and not accepted by this visitor."""
        return not self.service.consent.accepted(client)

    def accept_terms(self, client: Client | None) -> tuple[bool, str]:
        """Accept the terms in force for ``client``: (terms still shown, status line)."""
        consent = self.service.consent
        if client is None or consent.terms is None:
            return False, ""
        try:
            consent.accept(client, consent.terms.version)
        except Exception:  # e.g. the database is locked: not accepted, say so
            log.exception("recording the acceptance of the terms failed")
            return True, "⚠️ Your acceptance could not be saved; please try again."
        return False, "Thank you. Type your message below."


# The heading of an answer and, beside it, its status (answer_status) in a polite live
# region that stays in place (Gradio patches the template's nodes, it does not replace them).
# While the answer is written the answer's box is aria-busy: a screen reader waits for it.
HEADING_TEMPLATE = (
    '<div class="answer-heading"><h3>Answer {letter}</h3>'
    '<span id="writing-{side}" class="writing" role="status" aria-live="polite">${{value}}'
    "</span></div>")
# The page's own CSS (given to Gradio with the theme): the headings' layout, and no padding
# around them, so that a heading starts where its answer's text does.
ARENA_CSS = """
.answer-status .html-container { padding: 0; }
.answer-heading { display: flex; align-items: baseline; gap: 0.75em; min-height: 2em; }
.answer-heading h3 { margin: 0; font-size: var(--text-xl); font-weight: 600; }
.writing { color: var(--body-text-color-subdued); font-size: var(--text-md); }
.busy::before { content: ""; display: inline-block; width: 0.5em; height: 0.5em;
  margin-right: 0.4em; border-radius: 50%; background: var(--color-accent);
  animation: writing-pulse 1s ease-in-out infinite alternate; }
@keyframes writing-pulse { from { opacity: 1; } to { opacity: 0.2; } }
@media (prefers-reduced-motion: reduce) { .busy::before { animation: none; } }
.visually-hidden { position: absolute; width: 1px; height: 1px; overflow: hidden;
  clip-path: inset(50%); white-space: nowrap; }
"""
HEADING_JS = """
const mark = () => {
  const answer = document.getElementById('answer-{side}');
  if (answer) answer.setAttribute('aria-busy', String(!!element.querySelector('.busy')));
};
mark();
watch('value', mark);
"""


def answer_heading(side: str) -> gr.HTML:
    """The heading "Answer A" (or B), and the answer's status beside it (:func:`answer_status`)."""
    return gr.HTML(answer_status(side, IDLE), elem_id=f"answer-{side}-heading",
                   elem_classes="answer-status",
                   html_template=HEADING_TEMPLATE.format(letter=side.upper(), side=side),
                   js_on_load=HEADING_JS.replace("{side}", side))


def build_arena(handlers: ArenaHandlers) -> dict[str, Any] | None:
    """Lay out the Arena inside the current ``gr.Blocks`` and wire its events. Returns the
    arguments of the page's load event (the terms shown or not), None without terms."""
    terms = handlers.service.consent.terms
    if terms is not None:
        # Shown until the page's load event finds this visitor accepted them already.
        # A Column, not a Group: Gradio 6 gives a Group's elem_id to two nested divs.
        with gr.Column(elem_id="terms", variant="panel") as terms_box:
            gr.Markdown(terms.text, elem_id="terms-text")
            accept = gr.Button("I accept", variant="primary", elem_id="accept-terms")
    state = gr.State(None)
    chat = gr.Chatbot(label="Conversation", elem_id="conversation", height=320)
    # Not equal_height: a stretched column centres its shorter answer beside a longer one.
    with gr.Row(equal_height=False):
        with gr.Column():
            heading_a = answer_heading("a")
            answer_a = gr.Markdown(PLACEHOLDER, elem_id="answer-a", line_breaks=True)
        with gr.Column():
            heading_b = answer_heading("b")
            answer_b = gr.Markdown(PLACEHOLDER, elem_id="answer-b", line_breaks=True)
    with gr.Row():
        better_a = gr.Button("A is better", interactive=False, elem_id="vote-a")
        better_b = gr.Button("B is better", interactive=False, elem_id="vote-b")
        tie = gr.Button("Tie", interactive=False, elem_id="vote-tie")
        both_bad = gr.Button("Both bad", interactive=False, elem_id="vote-both-bad")
    with gr.Accordion("Write a better answer", open=False, elem_id="write-accordion"):
        written = gr.Textbox(label="Your answer", lines=4, elem_id="written-answer")
        submit_written = gr.Button("Send my answer", interactive=False, elem_id="vote-written")
    status = gr.Markdown("", elem_id="status")
    with gr.Row():
        message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False,
                             scale=5, elem_id="message", max_lines=8)
        send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
    undo = gr.Button("Undo my vote", visible=False, elem_id="undo-vote", size="sm")
    new = gr.Button("New conversation", elem_id="new-conversation")
    with gr.Accordion("My data", open=False, elem_id="my-data"):
        gr.Markdown(MY_DATA_HELP, elem_id="my-data-help")
        with gr.Row():
            ask = gr.Button("Delete my data", variant="stop", size="sm",
                            elem_id="delete-my-data")
            confirm = gr.Button("Yes, delete everything", variant="stop", size="sm",
                                visible=False, elem_id="confirm-delete-my-data")
        said = gr.Markdown("", elem_id="my-data-result")
    # Answers render as sanitised Markdown: HTML or script in model output stays inert.
    disabled_until_vote = [better_a, better_b, tie, both_bad, submit_written]

    outputs = [state, chat, answer_a, answer_b, heading_a, heading_b, status,
               *disabled_until_vote, message, send, written, undo]

    async def on_send(text: str, current: ArenaState | None, request: gr.Request):
        async for view in handlers.send(text, current, handlers.client(request)):
            yield view.updates()

    def voter(choice: str) -> Callable[..., tuple[Any, ...]]:
        def on_vote(current: ArenaState | None, request: gr.Request) -> tuple[Any, ...]:
            return handlers.vote(choice, current, client=handlers.client(request)).updates()
        return on_vote

    def on_written(text: str, current: ArenaState | None,
                   request: gr.Request) -> tuple[Any, ...]:
        return handlers.vote("written", current, text, handlers.client(request)).updates()

    for trigger in (send.click, message.submit):
        trigger(on_send, [message, state], outputs, concurrency_limit=None,
                show_progress="hidden")
    for button, choice in ((better_a, "a"), (better_b, "b"), (tie, "tie"),
                           (both_bad, "both_bad")):
        button.click(voter(choice), [state], outputs, concurrency_limit=None)
    submit_written.click(on_written, [written, state], outputs, concurrency_limit=None)

    def on_undo(current: ArenaState | None, request: gr.Request) -> tuple[Any, ...]:
        return handlers.undo(current, handlers.client(request)).updates()

    undo.click(on_undo, [state], outputs, concurrency_limit=None)
    new.click(lambda current: handlers.new_conversation(current).updates(), [state], outputs)
    assert len(outputs) == len(View(ArenaState(), []).updates())

    def on_ask(request: gr.Request) -> tuple[Any, str]:
        shown, text = handlers.deletion_preview(handlers.client(request))
        return gr.update(visible=shown), text

    def on_delete(current: ArenaState | None, request: gr.Request) -> tuple[Any, ...]:
        client = handlers.client(request)
        view, shown, text = handlers.delete_my_data(current, client)
        terms_update = (gr.update(visible=handlers.terms_shown(client)),) if terms else ()
        return (*view.updates(), gr.update(visible=shown), text, *terms_update)

    ask.click(on_ask, None, [confirm, said], api_visibility="private")
    confirm.click(on_delete, [state], [*outputs, confirm, said,
                                       *([terms_box] if terms else [])],
                  api_visibility="private")
    if terms is None:
        return None

    def on_accept(request: gr.Request) -> tuple[Any, str]:
        shown, said = handlers.accept_terms(handlers.client(request))
        return gr.update(visible=shown), said

    accept.click(on_accept, None, [terms_box, status], api_visibility="private")

    def on_load(request: gr.Request) -> Any:
        return gr.update(visible=handlers.terms_shown(handlers.client(request)))

    return {"fn": on_load, "outputs": [terms_box], "api_visibility": "private"}
