// What the page knows of the open room, updated frame by frame (docs/protocol.md),
// and drawn into the message list. Pure state changes live in `apply`; drawing is
// batched to one pass per animation frame, so a burst of tokens costs one render.

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
   * @param {HTMLElement} list the message list element
   * @param {{onSelect, onRegenerate, onChange, onLoadEarlier}} actions callbacks for the buttons
   */
  constructor(list, actions) {
    this.list = list;
    this.actions = actions;
    this.room = null;
    this.messages = [];
    this.live = null; // {generation_id, message_id, seq} of the running answer
    this.earlier = false; // the server left older messages of the branch out of `ready`
    this.dirty = new Set();
    this.redrawAll = false;
    this.scheduled = false;
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
          ? { generation_id: frame.generation.generation_id, message_id: frame.generation.message_id, seq: frame.generation.seq }
          : null;
        this.redrawAll = true;
        break;
      case "message":
        this.upsert(frame.message);
        break;
      case "start":
        this.upsert(frame.message);
        this.live = { generation_id: frame.generation_id, message_id: frame.message_id, seq: 0 };
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
        this.earlier = false; // a branch frame carries the whole branch
        this.redrawAll = true;
        break;
      case "room":
        this.room = frame.room;
        break;
    }
    this.schedule();
  }

  /** Put the older messages of the branch (`all`, from GET /api/rooms/{id}/messages)
   * before the ones held; ignored if the branch changed meanwhile. */
  prependEarlier(all) {
    const first = this.messages[0];
    const index = first ? all.findIndex((m) => m.id === first.id) : -1;
    if (index === -1) return;
    this.messages = [...all.slice(0, index), ...this.messages];
    this.earlier = false;
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

  endGeneration(generationId) {
    if (this.live?.generation_id === generationId) {
      this.live = null;
      this.redrawAll = true;
    }
  }

  clear() {
    this.room = null;
    this.messages = [];
    this.earlier = false;
    this.live = null;
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
    if (this.redrawAll) {
      this.redrawAll = false;
      this.dirty.clear();
      const items = this.messages.map((m) => this.drawMessage(m));
      if (this.earlier) {
        const more = button("Show earlier messages", "Show the earlier messages of this conversation", () =>
          this.actions.onLoadEarlier?.(),
        );
        more.className = "load-earlier";
        items.unshift(more);
      }
      list.replaceChildren(...items);
    } else {
      for (const id of this.dirty) {
        const message = this.find(id);
        const old = list.querySelector(`[data-id="${CSS.escape(id)}"]`);
        if (!message) old?.remove();
        else if (old) this.drawMessage(message, old);
        else list.append(this.drawMessage(message));
      }
      this.dirty.clear();
    }
    if (following) list.scrollTop = list.scrollHeight;
    this.actions.onChange?.();
  }

  /** The element for `message`; updates `element` in place when given. */
  drawMessage(message, element = null) {
    const article = element ?? document.createElement("article");
    article.className = `message ${message.role} status-${message.status}`;
    article.dataset.id = message.id;
    const parts = [];

    const head = el("header", "message-head");
    head.append(el("span", "role", message.role === "user" ? "You" : "Assistant"));
    const label = STATUS_LABELS[message.status];
    if (label) head.append(el("span", `badge ${message.status}`, label));
    parts.push(head);

    const body = el("div", "content");
    renderMarkdown(body, message.content || "");
    parts.push(body);

    if (message.error && message.status !== "streaming") {
      const error = el("p", "error-text");
      error.textContent = `${message.error.message} (${message.error.code})`;
      parts.push(error);
    }
    if (message.role === "assistant") parts.push(this.drawActions(message));
    article.replaceChildren(...parts);
    return article;
  }

  drawActions(message) {
    const bar = el("footer", "message-actions");
    const siblings = message.siblings ?? [message.id];
    const index = siblings.indexOf(message.id);
    const busy = this.generating;
    if (siblings.length > 1) {
      const nav = el("span", "versions");
      nav.setAttribute("aria-label", "Versions of this answer");
      const prev = button("‹", "Previous version", () => this.actions.onSelect(siblings[index - 1]));
      prev.disabled = busy || index <= 0;
      const next = button("›", "Next version", () => this.actions.onSelect(siblings[index + 1]));
      next.disabled = busy || index >= siblings.length - 1;
      nav.append(prev, el("span", "version-count", `${index + 1} / ${siblings.length}`), next);
      bar.append(nav);
    }
    if (message.status !== "streaming") {
      const temperature = document.createElement("input");
      Object.assign(temperature, { type: "number", min: "0", max: "2", step: "0.1", placeholder: "temp" });
      temperature.className = "temperature";
      temperature.setAttribute("aria-label", "Temperature for the new version (optional)");
      const label = message.status === "complete" ? "Regenerate" : "Retry";
      const regenerate = button(`↻ ${label}`, `${label} this answer`, () => {
        const value = temperature.value.trim();
        this.actions.onRegenerate(message.id, value === "" ? null : Number(value));
      });
      regenerate.classList.add("regenerate");
      regenerate.disabled = busy;
      bar.append(regenerate, temperature);
    }
    return bar;
  }
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
