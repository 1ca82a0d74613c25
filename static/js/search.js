// The search box: GET /api/search, its results in place of the room list. A result
// links to #/rooms/{room}/messages/{message}, which opens the room at that message.

import DOMPurify from "../vendor/dompurify-3.4.18/purify.es.mjs";
import { api } from "./api.js";

export class Search {
  /**
   * @param {HTMLFormElement} form holding the search input
   * @param {HTMLElement} results the list the results go in
   * @param {(showing: boolean) => void} onToggle results shown (the room list hidden) or not
   * @param {(message: string) => void} onError
   */
  constructor(form, results, onToggle, onError) {
    this.form = form;
    this.input = form.querySelector("input");
    this.results = results;
    this.onToggle = onToggle;
    this.onError = onError;
    this.asked = 0; // the newest query's number: an older answer arriving late is dropped
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.run();
    });
    // Cleared (the input's × or Escape): back to the rooms.
    this.input.addEventListener("input", () => {
      if (!this.input.value.trim()) this.close();
    });
    this.input.addEventListener("keydown", (event) => {
      if (event.key === "Escape") {
        this.input.value = "";
        this.close();
      }
    });
  }

  async run() {
    const q = this.input.value.trim();
    if (!q) return this.close();
    const asked = ++this.asked;
    let found;
    try {
      found = await api.get(`/api/search?${new URLSearchParams({ q, limit: "50" })}`);
    } catch (error) {
      if (asked === this.asked) this.onError(`Search failed: ${error.message}`);
      return;
    }
    if (asked !== this.asked) return;
    this.draw(found.results);
  }

  draw(results) {
    const items = results.map((result) => {
      const item = document.createElement("li");
      const link = document.createElement("a");
      link.href = `#/rooms/${encodeURIComponent(result.room.id)}/messages/${encodeURIComponent(result.message.id)}`;
      const head = document.createElement("span");
      head.className = "result-head";
      head.textContent = `${result.room.name} · ${result.message.author.name ?? result.message.role}`;
      const text = document.createElement("span");
      text.className = "result-snippet";
      // The server escapes the text and marks matches; only <mark> is let through.
      text.append(DOMPurify.sanitize(result.snippet, { RETURN_DOM_FRAGMENT: true, ALLOWED_TAGS: ["mark"], ALLOWED_ATTR: [] }));
      link.append(head, text);
      item.append(link);
      return item;
    });
    if (!items.length) {
      const none = document.createElement("li");
      none.className = "muted no-results";
      none.textContent = "No messages found.";
      items.push(none);
    }
    this.results.replaceChildren(...items);
    this.results.hidden = false;
    this.onToggle(true);
  }

  close() {
    this.asked++;
    this.results.hidden = true;
    this.results.replaceChildren();
    this.onToggle(false);
  }
}
