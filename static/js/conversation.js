// What the page knows of the open room's messages, updated frame by frame
// (docs/protocol.md), and drawn into the message list. Pure state changes live in
// `apply`; drawing is batched to one pass per animation frame, so a burst of tokens
// costs one render.

import { renderMarkdown } from "./markdown.js";

const STATUS_LABELS = {
  cancelled: "stopped",
  error: "failed",
  interrupted: "interrupted",
  blocked: "blocked",
  streaming: "writing…",
};

export class Conversation {
  /**
   * @param {HTMLElement} list the message list element, holding the `.empty` hint
   * @param {{onSelect, onRegenerate, onEdit, onHide, onRead, onReveal, onChange, onLoadEarlier}} actions
   *   callbacks for the buttons and for a message unhidden without its text
   * @param {() => {id: string | null, owner: boolean, canHide: boolean}} viewer who is
   *   looking: their user id, whether they own the room (may edit any message) and
   *   whether they may hide messages
   */
  constructor(list, actions, viewer) {
    this.list = list;
    this.actions = actions;
    this.viewer = viewer;
    this.emptyHint = list.querySelector(".empty");
    this.placeholder = this.emptyHint.textContent; // the hint while no room is shown
    this.room = null;
    this.messages = [];
    this.live = null; // {generation_id, message_id, seq} of the running answer
    this.earlier = false; // older messages of the branch are not held (paged in on demand)
    this.anchor = null; // after older messages are put on top: the distance to the bottom to keep
    this.focusId = null; // a message to scroll to and mark once drawn (a search result)
    this.editing = null; // {id, element} of the user message being edited in place
    this.peeks = new Map(); // message id -> text of a hidden message the owner asked to read
    this.dirty = new Set();
    this.redrawAll = false;
    this.scheduled = false;
    // Scrolled up near the top of a long conversation: the page before comes in.
    // (Up only: the list also scrolls when it is redrawn or follows a stream.)
    let lastTop = 0;
    list.addEventListener("scroll", () => {
      const up = list.scrollTop < lastTop;
      lastTop = list.scrollTop;
      if (up && this.earlier && list.scrollTop < 300) this.actions.onLoadEarlier?.();
    });
  }

  get generating() {
    return this.live !== null;
  }

  /** Update the state with one frame; returns what the page may want to react to. */
  apply(frame) {
    switch (frame.type) {
      case "ready":
      case "resync":
        this.room = frame.room;
        this.messages = frame.messages;
        this.earlier = Boolean(frame.earlier);
        this.live = frame.generation
          ? {
              generation_id: frame.generation.generation_id,
              message_id: frame.generation.message_id,
              seq: frame.generation.seq,
              queue: frame.generation.queue_position ?? 0,
            }
          : null;
        this.redrawAll = true;
        break;
      case "message":
        this.upsert(frame.message);
        break;
      case "start":
        this.upsert(frame.message);
        this.live = { generation_id: frame.generation_id, message_id: frame.message_id, seq: 0, queue: 0 };
        this.redrawAll = true; // every answer's buttons are disabled while generating
        break;
      case "token": {
        const live = this.live;
        if (!live || live.generation_id !== frame.generation_id || frame.seq <= live.seq) break;
        const message = this.find(live.message_id);
        if (message) {
          message.content += frame.text;
          this.dirty.add(message.id);
        }
        live.seq = frame.seq;
        if (live.queue) {
          live.queue = 0;
          this.dirty.add(live.message_id);
        }
        break;
      }
      case "queue": {
        // Where the answer waits for the model (0: started). Signals may overtake
        // tokens: once text came, it is not waiting any more.
        const live = this.live;
        if (!live || live.generation_id !== frame.generation_id || live.seq > 0) break;
        live.queue = frame.position;
        this.dirty.add(live.message_id);
        break;
      }
      case "done":
      case "cancelled":
        this.upsert(frame.message);
        this.endGeneration(frame.generation_id);
        break;
      case "error":
        if (frame.generation_id) {
          if (frame.answer) this.upsert(frame.answer);
          this.endGeneration(frame.generation_id);
        }
        break;
      case "branch":
        this.messages = frame.messages;
        this.earlier = Boolean(frame.earlier);
        this.redrawAll = true;
        break;
      case "room":
        this.room = frame.room;
        this.redrawAll = true; // the owner's buttons may change
        break;
      case "hidden":
        this.setHidden(frame);
        break;
    }
    this.schedule();
  }

  setHidden({ message_id: id, hidden }) {
    const held = this.find(id);
    if (!held) return;
    held.hidden = hidden;
    if (hidden) {
      held.content = "";
    } else {
      this.peeks.delete(id);
      this.actions.onReveal?.(id); // the frame does not carry the text back
    }
    this.dirty.add(id);
  }

  /** The owner's own view of a hidden message's text. */
  peek(id, content) {
    if (!this.find(id)) return;
    this.peeks.set(id, content);
    this.dirty.add(id);
    this.schedule();
  }

  /** A message as the server now has it (after `onReveal`), if it is still shown. */
  refresh(message) {
    if (!this.find(message.id)) return;
    this.upsert(message);
    this.schedule();
  }

  /** Scroll to the message `id` (held) and mark it, once drawn. */
  focus(id) {
    this.focusId = id;
    this.redrawAll = true;
    this.schedule();
  }

  /** The id of the oldest message held, above which the next older page goes. */
  get oldestId() {
    return this.messages[0]?.id ?? null;
  }

  /** Put the page of messages above `beforeId` (GET /api/rooms/{id}/messages?before=)
   * on top of the ones held, keeping what the reader sees where it is; ignored if the
   * branch changed meanwhile. `earlier`: there are older ones still. */
  prependEarlier(page, beforeId, earlier) {
    if (this.oldestId !== beforeId) return;
    this.messages = [...page, ...this.messages];
    this.earlier = earlier;
    this.anchor = this.list.scrollHeight - this.list.scrollTop;
    this.redrawAll = true;
    this.schedule();
  }

  find(id) {
    return this.messages.find((m) => m.id === id);
  }

  upsert(message) {
    const index = this.messages.findIndex((m) => m.id === message.id);
    if (index === -1) this.messages.push(message);
    else this.messages[index] = message;
    this.dirty.add(message.id);
  }

  /** Open the in-place editor on one of the user messages. */
  startEditing(message) {
    this.stopEditing(); // one editor at a time
    this.editing = { id: message.id, element: this.drawEditor(message), fresh: true };
    this.dirty.add(message.id);
    this.schedule();
  }

  stopEditing() {
    if (!this.editing) return;
    this.dirty.add(this.editing.id);
    this.editing = null;
    this.schedule();
  }

  endGeneration(generationId) {
    if (this.live?.generation_id === generationId) {
      this.live = null;
      this.redrawAll = true;
    }
  }

  /** Forget the room; `placeholder` is shown until another one is ready. */
  clear(placeholder) {
    this.room = null;
    this.messages = [];
    this.earlier = false;
    this.live = null;
    this.editing = null;
    this.peeks.clear();
    this.placeholder = placeholder;
    this.redrawAll = true;
    this.schedule();
  }

  // --- drawing --------------------------------------------------------------------

  schedule() {
    if (this.scheduled) return;
    this.scheduled = true;
    requestAnimationFrame(() => {
      this.scheduled = false;
      this.draw();
    });
  }

  draw() {
    const list = this.list;
    // Follow the stream, unless the reader scrolled up to read something.
    const following = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
    if (this.editing && !this.find(this.editing.id)) this.editing = null; // another branch
    const focusEditor = this.editing && (this.editing.fresh || this.editing.element.contains(document.activeElement));
    if (!this.messages.length) {
      this.emptyHint.textContent = this.room ? "No messages yet — say hello." : this.placeholder;
      list.replaceChildren(this.emptyHint);
    } else if (this.redrawAll || this.emptyHint.isConnected) {
      list.replaceChildren(...this.drawAll());
    } else {
      this.drawDirty();
    }
    this.redrawAll = false;
    this.dirty.clear();
    // A new editor takes the caret; one that had it gets it back after being moved.
    if (focusEditor && this.editing) {
      this.editing.fresh = false;
      this.editing.element.querySelector("textarea").focus();
    }
    if (this.anchor !== null) {
      list.scrollTop = list.scrollHeight - this.anchor;
      this.anchor = null;
    } else if (following) list.scrollTop = list.scrollHeight;
    if (this.focusId) {
      const found = list.querySelector(`[data-id="${CSS.escape(this.focusId)}"]`);
      this.focusId = null;
      for (const old of list.querySelectorAll(".message.found")) old.classList.remove("found");
      found?.classList.add("found");
      found?.scrollIntoView({ block: "center" });
    }
    this.actions.onChange?.();
  }

  drawAll() {
    const items = this.messages.map((m) => this.drawMessage(m));
    if (this.earlier) {
      const more = button("Show earlier messages", "Show the earlier messages of this conversation", () =>
        this.actions.onLoadEarlier?.(),
      );
      more.className = "load-earlier";
      items.unshift(more);
    }
    return items;
  }

  drawDirty() {
    for (const id of this.dirty) {
      const message = this.find(id);
      const old = this.list.querySelector(`[data-id="${CSS.escape(id)}"]`);
      if (!message) old?.remove();
      else if (old) this.drawMessage(message, old);
      else this.list.append(this.drawMessage(message));
    }
  }

  /** The element for `message`; updates `element` in place when given. */
  drawMessage(message, element = null) {
    const article = element ?? document.createElement("article");
    const own = this.isOwn(message);
    article.className = `message ${message.role} status-${message.status}`;
    article.classList.toggle("own", own);
    article.classList.toggle("is-hidden", Boolean(message.hidden));
    article.dataset.id = message.id;
    const parts = [this.drawHead(message, own)];

    if (this.editing?.id === message.id) {
      this.updateEditor();
      parts.push(this.editing.element);
    } else if (message.hidden) {
      parts.push(el("p", "hidden-note", "Message hidden by the room owner"));
      if (this.peeks.has(message.id)) parts.push(drawContent(this.peeks.get(message.id), "content peek"));
    } else {
      parts.push(drawContent(message.content || "", "content"));
    }

    if (message.error && message.status !== "streaming") {
      const error = el("p", "error-text");
      error.textContent = `${message.error.message} (${message.error.code})`;
      parts.push(error);
    }
    if (this.editing?.id !== message.id) parts.push(this.drawActions(message, own));
    article.replaceChildren(...parts);
    return article;
  }

  isOwn(message) {
    const you = this.viewer().id;
    return message.role === "user" && you != null && message.author?.id === you;
  }

  drawHead(message, own) {
    const head = el("header", "message-head");
    const author = el("span", "author", own ? "You" : authorName(message));
    if (own && message.author?.name) author.title = message.author.name;
    head.append(author);
    const waiting = this.live?.message_id === message.id ? this.live.queue : 0;
    const label = waiting ? `waiting for the model (${ordinal(waiting)} in line)` : STATUS_LABELS[message.status];
    if (label) head.append(el("span", `badge ${waiting ? "waiting" : message.status}`, label));
    if (message.role === "assistant") {
      const stats = answerStats(message);
      if (stats) head.append(el("span", "stats", stats));
    }
    return head;
  }

  drawActions(message, own) {
    const bar = el("footer", "message-actions");
    const busy = this.generating;
    const { owner, canHide } = this.viewer();
    bar.append(...this.drawVersions(message));
    if (message.role === "user" && (own || owner) && !message.hidden) {
      const edit = button("✎ Edit", "Edit this message", () => this.startEditing(message));
      edit.classList.add("edit");
      edit.disabled = busy;
      bar.append(edit);
    }
    if (message.role === "assistant" && message.status !== "streaming") bar.append(...this.drawRegenerate(message));
    if (canHide && message.hidden && !this.peeks.has(message.id)) {
      const read = button("Read", "Read the hidden message (only you see it)", () => this.actions.onRead(message.id));
      read.classList.add("read");
      bar.append(read);
    }
    if (canHide && message.status !== "streaming") {
      const hide = message.hidden
        ? button("Unhide", "Show this message to everyone again", () => this.actions.onHide(message.id, false))
        : button("Hide", "Hide this message from everyone", () => this.actions.onHide(message.id, true));
      hide.classList.add("hide");
      bar.append(hide);
    }
    return bar;
  }

  /** ‹ n / m › between the versions of a message, when it has several. */
  drawVersions(message) {
    const siblings = message.siblings ?? [message.id];
    if (siblings.length < 2) return [];
    const index = siblings.indexOf(message.id);
    const busy = this.generating;
    const nav = el("span", "versions");
    nav.setAttribute("aria-label", message.role === "user" ? "Versions of this message" : "Versions of this answer");
    const prev = button("‹", "Previous version", () => this.actions.onSelect(siblings[index - 1]));
    prev.disabled = busy || index <= 0;
    const next = button("›", "Next version", () => this.actions.onSelect(siblings[index + 1]));
    next.disabled = busy || index >= siblings.length - 1;
    nav.append(prev, el("span", "version-count", `${index + 1} / ${siblings.length}`), next);
    return [nav];
  }

  drawRegenerate(message) {
    const temperature = document.createElement("input");
    Object.assign(temperature, { type: "number", min: "0", max: "2", step: "0.1", placeholder: "room's" });
    temperature.className = "temperature";
    temperature.setAttribute("aria-label", "Temperature for the new version (optional, 0 to 2)");
    const field = el("label", "temperature-field");
    field.title = "Temperature of the new version only: 0 is steady, 2 is wild. Empty: the room's.";
    field.append("temperature 0–2 ", temperature);
    const label = message.status === "complete" ? "Regenerate" : "Retry";
    const regenerate = button(`↻ ${label}`, `${label} this answer`, () => {
      const value = temperature.value.trim();
      this.actions.onRegenerate(message.id, value === "" ? null : Number(value));
    });
    regenerate.classList.add("regenerate");
    regenerate.disabled = this.generating;
    return [regenerate, field];
  }

  /** The in-place editor of a user message: a textarea, Save and Cancel. Made once
   * per edit and moved into each redraw, so the draft and caret survive. */
  drawEditor(message) {
    const form = el("form", "editor");
    const text = document.createElement("textarea");
    text.value = message.content;
    text.rows = Math.min(10, Math.max(2, message.content.split("\n").length));
    text.setAttribute("aria-label", "Edited message");
    const save = el("button", "primary", "Save");
    save.type = "submit";
    save.setAttribute("aria-label", "Save and answer again");
    const cancel = button("Cancel", "Cancel editing", () => this.stopEditing());
    const actions = el("div", "editor-actions");
    actions.append(save, cancel);
    form.append(text, actions);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      if (save.disabled) return;
      this.actions.onEdit(message.id, text.value);
      this.stopEditing();
    });
    text.addEventListener("input", () => this.updateEditor());
    text.addEventListener("keydown", (event) => {
      if (event.key === "Escape") this.stopEditing();
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        form.requestSubmit();
      }
    });
    return form;
  }

  /** Save only with some text, and not while an answer is being written. */
  updateEditor() {
    const form = this.editing.element;
    form.querySelector("button[type=submit]").disabled =
      this.generating || form.querySelector("textarea").value.trim() === "";
  }
}

function drawContent(markdown, className) {
  const body = el("div", className);
  renderMarkdown(body, markdown);
  return body;
}

const authorName = (message) =>
  message.role === "assistant"
    ? (message.author?.name ?? message.model ?? "Assistant")
    : (message.author?.name ?? "Someone");

// Below this, an answer came in one burst (buffered somewhere): a speed would be noise.
const MIN_TIMED_SECONDS = 0.25;

/** "30 tokens · 42 tokens/s": what is known of an ended answer. The speed is from
 * its first token to its end, as the gateway streamed it (`timing`). */
function answerStats(message) {
  const tokens = message.usage?.completion_tokens;
  if (tokens == null || message.status === "streaming") return "";
  const bits = [tokens === 1 ? "1 token" : `${tokens} tokens`];
  const { first_token_ms: first, duration_ms: duration } = message.timing ?? {};
  const seconds = first == null || duration == null ? 0 : (duration - first) / 1000;
  if (seconds >= MIN_TIMED_SECONDS) bits.push(`${Math.round(tokens / seconds)} tokens/s`);
  return bits.join(" · ");
}

function el(tag, className, text) {
  const element = document.createElement(tag);
  element.className = className;
  if (text !== undefined) element.textContent = text;
  return element;
}

function button(text, label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

/** 1 → "1st", 2 → "2nd", 11 → "11th", 23 → "23rd". */
export function ordinal(n) {
  const tens = n % 100;
  const suffix = tens >= 11 && tens <= 13 ? "th" : { 1: "st", 2: "nd", 3: "rd" }[n % 10] ?? "th";
  return `${n}${suffix}`;
}
