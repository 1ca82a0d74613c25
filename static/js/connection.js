// A live connection to one room: WebSocket when possible, else Server-Sent Events
// (EventSource for the events, POST requests for the actions). Either way the page
// gets the same frames (docs/protocol.md), and after a drop it reconnects with
// back-off and resumes from the last event id it saw, so no text is lost or doubled.

import { api, urlToken } from "./api.js";

const CLOSE_ROOM_GONE = 4404;
const CLOSE_BAD_REQUEST = 4400;
const CLOSE_POLICY = 1008; // refused: bad token or foreign origin
const MAX_DELAY_MS = 10_000;
// WebSocket attempts that fail before ever opening, in a row, before we decide
// WebSocket is blocked on this network and use SSE instead.
const WS_FAILURES_BEFORE_SSE = 2;

export class RoomConnection {
  /**
   * @param {string} roomId
   * @param {{onFrame: (frame: object) => void, onStatus: (status: object) => void,
   *   who: () => {name?: string, user?: string}}} handlers `who`: the identity
   *   query parameters, read at each (re)connection
   */
  constructor(roomId, { onFrame, onStatus, who }) {
    this.roomId = roomId;
    this.onFrame = onFrame;
    this.onStatus = onStatus;
    this.who = who;
    this.lastEventId = null;
    this.transport = typeof WebSocket === "function" ? "websocket" : "sse";
    this.failures = 0;
    this.wsFailuresBeforeOpen = 0;
    this.closed = false;
    this.ws = null;
    this.source = null;
    this.retryTimer = null;
  }

  async open() {
    this.closed = false;
    let token;
    try {
      token = await urlToken();
    } catch (error) {
      if (error.status === 401) {
        this.onStatus({ state: "closed", transport: this.transport, reason: "an API key is needed", unauthorized: true });
      } else {
        this.retryLater();
      }
      return;
    }
    if (this.closed) return;
    if (this.transport === "websocket") this.openWebSocket(token);
    else this.openEventSource(token);
  }

  /** The query string of a (re)connection: who this is, the URL token and where to
   * resume. */
  query(token) {
    const params = this.whoParams();
    params.set("token", token);
    if (this.lastEventId != null) params.set("last_event_id", String(this.lastEventId));
    return `?${params}`;
  }

  whoParams() {
    const params = new URLSearchParams();
    for (const [key, value] of Object.entries(this.who())) if (value) params.set(key, value);
    return params;
  }

  close() {
    this.closed = true;
    clearTimeout(this.retryTimer);
    this.ws?.close(1000);
    this.source?.close();
    this.ws = this.source = null;
  }

  /** Remember the newest event id seen, to resume from after a drop. */
  track(frame) {
    const id = frame.event_id ?? (frame.type === "ready" || frame.type === "resync" ? frame.last_event_id : null);
    if (id != null && (this.lastEventId == null || id > this.lastEventId)) this.lastEventId = id;
  }

  deliver(frame) {
    this.track(frame);
    this.onFrame(frame);
  }

  // --- WebSocket ------------------------------------------------------------------

  openWebSocket(token) {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const ws = new WebSocket(`${scheme}://${location.host}/ws/rooms/${encodeURIComponent(this.roomId)}${this.query(token)}`);
    this.ws = ws;
    let opened = false;
    this.onStatus({ state: "connecting", transport: "websocket" });
    ws.addEventListener("open", () => {
      opened = true;
      this.failures = 0;
      this.wsFailuresBeforeOpen = 0;
      this.onStatus({ state: "connected", transport: "websocket" });
    });
    ws.addEventListener("message", (event) => {
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      this.deliver(frame);
    });
    ws.addEventListener("close", (event) => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (this.closed) return;
      if (event.code === CLOSE_ROOM_GONE || event.code === CLOSE_BAD_REQUEST || event.code === CLOSE_POLICY) {
        this.onStatus({ state: "closed", transport: "websocket", reason: event.reason || "room not found" });
        return;
      }
      if (!opened && ++this.wsFailuresBeforeOpen >= WS_FAILURES_BEFORE_SSE) {
        this.transport = "sse"; // WebSocket seems blocked here: plain HTTP instead
        this.failures = 0;
        this.open();
        return;
      }
      this.retryLater();
    });
  }

  // --- SSE ------------------------------------------------------------------------

  openEventSource(token) {
    // EventSource reconnects by itself, with Last-Event-ID, but with the same URL: its
    // token may have expired by then, so on an error we reconnect ourselves instead.
    const source = new EventSource(`/api/rooms/${encodeURIComponent(this.roomId)}/events${this.query(token)}`);
    this.source = source;
    this.onStatus({ state: "connecting", transport: "sse" });
    const types = [
      ...["ready", "resumed", "resync", "message", "start", "token", "done", "cancelled", "error", "branch", "room"],
      ...["presence", "typing", "hidden"],
    ];
    for (const type of types) {
      source.addEventListener(type, (event) => {
        if (this.source !== source) return;
        this.failures = 0;
        this.onStatus({ state: "connected", transport: "sse" });
        this.deliver(JSON.parse(event.data));
      });
    }
    source.addEventListener("error", () => {
      if (this.source !== source || this.closed) return;
      source.close();
      this.source = null;
      this.retryLater();
    });
  }

  retryLater() {
    const delay = Math.min(MAX_DELAY_MS, 500 * 2 ** this.failures) * (0.75 + Math.random() / 2);
    this.failures += 1;
    this.onStatus({ state: "reconnecting", transport: this.transport, inMs: Math.round(delay) });
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => this.open(), delay);
  }

  // --- actions --------------------------------------------------------------------

  /** Send a frame over the WebSocket, or do the same with a POST. Errors of a POST
   * are delivered as `error` frames, as the WebSocket would. */
  async act(frame) {
    if (this.transport === "websocket" && this.ws?.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify(frame));
      return;
    }
    if (frame.type === "rename") {
      this.reconnect(); // an event stream learns a new name by connecting again
      return;
    }
    const room = `/api/rooms/${encodeURIComponent(this.roomId)}`;
    const message = frame.message_id && `${room}/messages/${encodeURIComponent(frame.message_id)}`;
    const who = `?${this.whoParams()}`; // authorship of what a POST stores
    try {
      switch (frame.type) {
        case "send":
          await api.post(`${room}/messages${who}`, { content: frame.content, id: frame.id });
          break;
        case "cancel":
          await api.post(`${room}/generations/${encodeURIComponent(frame.generation_id)}/cancel`);
          break;
        case "regenerate":
          await api.post(`${message}/regenerate${who}`, frame.temperature != null ? { temperature: frame.temperature } : undefined);
          break;
        case "select":
          await api.post(`${message}/select`);
          break;
        case "edit":
          await api.post(`${message}/edit${who}`, { content: frame.content, id: frame.id });
          break;
        case "hide":
          await api.post(`${message}/hide${who}`, { hidden: frame.hidden });
          break;
        case "typing":
          await api.post(`${room}/typing${who}`, { active: frame.active ?? true });
          break;
      }
    } catch (error) {
      if (frame.type === "typing") return; // a hint only: not worth a notice
      this.onFrame({ type: "error", code: error.code ?? "network_error", message: error.message, id: frame.id, retryable: true });
    }
  }

  /** Connect again now, resuming from the last event seen. */
  reconnect() {
    if (this.closed) return;
    clearTimeout(this.retryTimer);
    const { ws, source } = this;
    this.ws = this.source = null; // their close events are then ignored
    ws?.close(1000);
    source?.close();
    this.open();
  }
}
