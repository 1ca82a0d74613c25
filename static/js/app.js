// The page: room list, persona editor, who you are, and the open room (#/rooms/{id}).

import { api, credentials } from "./api.js";
import { RoomConnection } from "./connection.js";
import { Conversation } from "./conversation.js";
import { identity, nameProblem } from "./identity.js";
import { People } from "./people.js";
import { Search } from "./search.js";

const $ = (id) => document.getElementById(id);
const ui = {
  app: $("app"),
  sidebar: $("sidebar"),
  toggleSidebar: $("toggle-sidebar"),
  roomList: $("room-list"),
  search: $("search"),
  searchResults: $("search-results"),
  newRoom: $("new-room"),
  roomName: $("room-name"),
  roomPersona: $("room-persona"),
  members: $("members"),
  status: $("status"),
  rename: $("rename"),
  editRoom: $("edit-room"),
  deleteRoom: $("delete-room"),
  messages: $("messages"),
  typing: $("typing"),
  notice: $("notice"),
  noticeText: $("notice-text"),
  noticeRetry: $("notice-retry"),
  noticeClose: $("notice-close"),
  composer: $("composer"),
  input: $("input"),
  send: $("send"),
  stop: $("stop"),
  dialog: $("room-dialog"),
  form: $("room-form"),
  formTitle: $("room-dialog-title"),
  formError: $("room-form-error"),
  formCancel: $("room-cancel"),
  formAccess: $("room-form").querySelector("fieldset.access"),
  nameDialog: $("name-dialog"),
  nameForm: $("name-form"),
  nameError: $("name-form-error"),
  keyDialog: $("key-dialog"),
  keyForm: $("key-form"),
  keyError: $("key-form-error"),
};

const PERSONA_FIELDS = ["system_prompt", "model", "temperature", "max_tokens"];

const NO_ROOM_HINT = "Create a room, or pick one, to start chatting.";

// GET /api/info: the model that answers when a room names none, and whether the
// gateway uses API keys (then rooms have owners and access settings). `access` stays
// null while unknown.
let info = { default_model: null, access: null };
let rooms = [];
let roomId = null;
let connection = null;
let linkState = null; // the connection's state: connecting, connected, reconnecting, closed
let focusId = null; // a message to show once the room is open (a search result)
const pending = new Map(); // client id -> content of a send not yet confirmed

const people = new People(() => showPeople());
new Search(ui.search, ui.searchResults, (showing) => (ui.roomList.hidden = showing), showNotice);
const conversation = new Conversation(
  ui.messages,
  {
    onSelect: (messageId) => act({ type: "select", message_id: messageId }),
    onRegenerate: (messageId, temperature) =>
      act({ type: "regenerate", message_id: messageId, ...(temperature == null ? {} : { temperature }) }),
    onEdit: (messageId, content) => act({ type: "edit", message_id: messageId, content, id: newClientId() }),
    onHide: (messageId, hidden) => act({ type: "hide", message_id: messageId, hidden }),
    onRead: (messageId) => readHidden(messageId),
    onReveal: (messageId) => reloadMessage(messageId),
    onChange: () => updateControls(),
    onLoadEarlier: () => loadEarlier(),
  },
  viewer,
);

/** Who is looking at the open room: the owner (a key name, with API keys) may edit
 * anyone's message; without keys there are no owners and anyone may hide. */
function viewer() {
  const id = people.you?.id ?? null;
  const room = conversation.room;
  const owner = Boolean(room && id != null && room.owner === id && info.access !== false);
  return { id, owner, canHide: owner || (Boolean(room) && info.access === false) };
}

async function loadInfo() {
  try {
    info = await api.get("/api/info");
  } catch {
    // Without it the page still works: "default model", access settings shown.
  }
  ui.formAccess.hidden = info.access === false;
}

// A hidden message made visible again comes back without its text.
async function reloadMessage(messageId) {
  const message = await fetchMessage(messageId, "");
  if (message) conversation.refresh(message);
}

// The owner may read what they hid; nobody else gets its text.
async function readHidden(messageId) {
  const message = await fetchMessage(messageId, "?include_hidden=true");
  if (message) conversation.peek(messageId, message.content);
}

/** A message of the open room, as the server has it now; null if it is not there (or
 * another room was opened meanwhile). */
async function fetchMessage(messageId, query) {
  const id = roomId;
  try {
    const path = `/api/rooms/${encodeURIComponent(id)}/messages/${encodeURIComponent(messageId)}${query}`;
    const { message } = await api.get(path);
    return id === roomId ? message : null;
  } catch (error) {
    showNotice(`Could not load the message: ${error.message}`);
    return null;
  }
}

// `ready` and `branch` hold only the newest messages of a long conversation
// (docs/protocol.md): older ones come over REST a page at a time (the server's page
// size), as the reader scrolls up (or asks with the button on top).
let loadingEarlier = null; // {id, before, done}: the older page being fetched

/** Fetch the page above the oldest message held (once, however many ask at a time);
 * resolves to whether it was added. */
function loadEarlier() {
  const id = roomId;
  const before = conversation.oldestId;
  if (!id || !before) return Promise.resolve(false);
  if (loadingEarlier?.id === id && loadingEarlier.before === before) return loadingEarlier.done;
  const done = (async () => {
    try {
      const path = `/api/rooms/${encodeURIComponent(id)}/messages?before=${encodeURIComponent(before)}`;
      const { messages, earlier } = await api.get(path);
      if (id === roomId) conversation.prependEarlier(messages, before, earlier);
      return id === roomId;
    } catch (error) {
      showNotice(`Could not load the earlier messages: ${error.message}`);
      return false;
    } finally {
      if (loadingEarlier?.done === done) loadingEarlier = null;
    }
  })();
  loadingEarlier = { id, before, done };
  return done;
}

// --- rooms ----------------------------------------------------------------------

// The server lists rooms by last activity, newest first.
async function loadRooms() {
  try {
    rooms = (await api.get("/api/rooms?limit=1000")).rooms;
  } catch (error) {
    if (error.status === 401) askForKey(error.message);
    else showNotice(`Could not load the rooms: ${error.message}`, { retry: loadRooms });
    return;
  }
  drawRooms();
}

function drawRooms() {
  const now = Date.now();
  ui.roomList.replaceChildren(
    ...rooms.map((room) => {
      const item = document.createElement("li");
      const link = document.createElement("a");
      link.href = `#/rooms/${encodeURIComponent(room.id)}`;
      if (room.id === roomId) link.setAttribute("aria-current", "page");
      const name = document.createElement("span");
      name.className = "room-name";
      name.textContent = room.name;
      link.append(name);
      if (room.updated_at) link.append(timeElement(room.updated_at, now));
      item.append(link);
      return item;
    }),
  );
}

function timeElement(iso, now) {
  const time = document.createElement("time");
  time.className = "room-time";
  time.dateTime = iso;
  time.title = `Last activity ${new Date(iso).toLocaleString()}`;
  time.textContent = since(new Date(iso), now);
  return time;
}

/** "just now", "3 min ago", "14:05" (today), "Nov 3", "Nov 3, 2025". */
function since(then, now) {
  const minutes = Math.floor((now - then) / 60_000);
  if (minutes < 1) return "just now";
  if (minutes < 60) return `${minutes} min ago`;
  const today = new Date(now);
  if (then.toDateString() === today.toDateString()) {
    return then.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }
  const year = then.getFullYear() === today.getFullYear() ? {} : { year: "numeric" };
  return then.toLocaleDateString([], { month: "short", day: "numeric", ...year });
}

/** A message in the open room at `at`: the list is ordered by last activity again.
 * (A replayed message may be older than what the list knows.) */
function touchRoom(id, at) {
  const room = rooms.find((r) => r.id === id);
  if (!room || Date.parse(room.updated_at) >= Date.parse(at)) return;
  room.updated_at = at;
  rooms.sort((a, b) => Date.parse(b.updated_at) - Date.parse(a.updated_at));
  drawRooms();
}

function describePersona(room) {
  const p = room.persona;
  const bits = [p.model ?? info.default_model ?? "default model"];
  if (p.temperature != null) bits.push(`temperature ${p.temperature}`);
  if (p.max_tokens != null) bits.push(`max ${p.max_tokens} tokens`);
  if (p.system_prompt) bits.push(`“${p.system_prompt.length > 80 ? `${p.system_prompt.slice(0, 80)}…` : p.system_prompt}”`);
  return bits.join(" · ");
}

function showRoomHeader(room) {
  ui.roomName.textContent = room ? room.name : "No room open";
  ui.roomPersona.textContent = room ? describePersona(room) : "";
  ui.editRoom.hidden = ui.deleteRoom.hidden = !room;
  document.title = room ? `${room.name} · chat-gateway` : "chat-gateway";
}

function openDialog(room) {
  ui.formTitle.textContent = room ? "Edit room" : "New room";
  ui.form.dataset.roomId = room?.id ?? "";
  const form = ui.form.elements;
  form.name.value = room?.name ?? "";
  for (const field of PERSONA_FIELDS) form[field].value = room?.persona[field] ?? "";
  form.private.checked = room?.private ?? false;
  form.secret_prompt.checked = room?.secret_prompt ?? false;
  form.grants.value = (room?.grants ?? []).join(", ");
  ui.formAccess.hidden = info.access === false;
  ui.formError.hidden = true;
  ui.dialog.showModal();
  form.name.focus();
}

async function saveRoom(event) {
  event.preventDefault();
  const form = ui.form.elements;
  const persona = {};
  for (const field of PERSONA_FIELDS) {
    const raw = form[field].value.trim();
    persona[field] = raw === "" ? null : form[field].type === "number" ? Number(raw) : raw;
  }
  if (persona.system_prompt === null) persona.system_prompt = "";
  const id = ui.form.dataset.roomId;
  const body = {
    name: form.name.value.trim(),
    persona,
    private: form.private.checked,
    secret_prompt: form.secret_prompt.checked,
    grants: form.grants.value.split(",").map((name) => name.trim()).filter(Boolean),
  };
  try {
    const room = id
      ? await api.patch(`/api/rooms/${encodeURIComponent(id)}`, body)
      : await api.post("/api/rooms", body);
    ui.dialog.close();
    await loadRooms();
    if (id) showRoomHeader(room);
    else location.hash = `#/rooms/${encodeURIComponent(room.id)}`;
  } catch (error) {
    ui.formError.textContent = error.message;
    ui.formError.hidden = false;
  }
}

async function deleteRoom() {
  const room = conversation.room;
  if (!room || !confirm(`Delete the room “${room.name}” and its whole history?`)) return;
  try {
    await api.delete(`/api/rooms/${encodeURIComponent(room.id)}`);
  } catch (error) {
    showNotice(`Could not delete the room: ${error.message}`);
    return;
  }
  location.hash = "#/";
  await loadRooms();
}

// --- the open room --------------------------------------------------------------

function route() {
  const match = location.hash.match(/^#\/rooms\/([^/]+)(?:\/messages\/([^/]+))?$/);
  focusId = match?.[2] ? decodeURIComponent(match[2]) : null;
  openRoom(match ? decodeURIComponent(match[1]) : null);
  if (focusId && conversation.room) reveal(); // already open
}

/** Show the message `focusId` of the open room: paged in from further back if need
 * be; if it is on another version of the conversation, offer to switch to it. */
async function reveal() {
  const id = focusId;
  const room = roomId;
  while (!conversation.find(id) && conversation.earlier && room === roomId && id === focusId) {
    if (!(await loadEarlier())) return;
  }
  if (room !== roomId || id !== focusId) return;
  focusId = null;
  if (conversation.find(id)) {
    conversation.focus(id);
    return;
  }
  showNotice("That message is in another version of this conversation.", {
    retry: () => {
      focusId = id; // shown when the branch arrives
      act({ type: "select", message_id: id });
    },
    label: "Show that version",
  });
}

function openRoom(id) {
  if (id === roomId && connection) return;
  if (roomId !== null) ui.search.querySelector("input").blur();
  connection?.close();
  connection = null;
  roomId = id;
  pending.clear();
  typingSentAt = 0;
  hideNotice();
  people.clear();
  conversation.clear(id ? "" : NO_ROOM_HINT);
  showRoomHeader(null);
  ui.app.classList.remove("sidebar-open");
  for (const link of ui.roomList.querySelectorAll("a")) {
    if (link.getAttribute("href") === `#/rooms/${encodeURIComponent(id)}`) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (!id) {
    ui.status.textContent = "";
    updateControls();
    return;
  }
  connection = new RoomConnection(id, { onFrame, onStatus, who });
  connection.open();
  updateControls();
}

/** The identity query parameters of a connection: the gateway takes the user id
 * from the API key when there are keys. */
function who() {
  return { name: identity.name, user: info.access ? null : identity.user };
}

function onFrame(frame) {
  people.apply(frame);
  conversation.apply(frame);
  switch (frame.type) {
    case "ready":
    case "resync":
    case "room":
      showRoomHeader(frame.room);
      if (frame.type !== "room" && focusId) reveal();
      break;
    case "branch":
      if (focusId) reveal();
      break;
    case "message":
      if (frame.id) pending.delete(frame.id);
      touchRoom(roomId, frame.message.created_at);
      break;
    case "error":
      onError(frame);
      break;
  }
  updateControls();
}

function onError(frame) {
  if (frame.code === "invalid_name") {
    askForName(`The gateway refused that name: ${frame.message}`);
    return;
  }
  if (frame.code === "room_not_found" || frame.code === "room_deleted") {
    showNotice(frame.code === "room_deleted" ? "This room was deleted." : "There is no such room.");
    loadRooms();
    return;
  }
  if (frame.generation_id) {
    // Shown on the answer itself, with its Retry button.
    if (!frame.answer) showNotice(`The answer failed: ${frame.message}`);
    return;
  }
  const content = frame.id ? pending.get(frame.id) : undefined;
  const retry = content !== undefined && frame.retryable ? () => sendMessage(content, frame.id) : null;
  showNotice(`${frame.message} (${frame.code})`, { retry });
}

function askForKey(message) {
  if (ui.keyDialog.open) return;
  ui.keyError.textContent = credentials.key ? message : "";
  ui.keyError.hidden = !credentials.key;
  ui.keyForm.elements.key.value = "";
  ui.keyDialog.showModal();
}

async function saveKey(event) {
  event.preventDefault();
  credentials.key = ui.keyForm.elements.key.value.trim();
  ui.keyDialog.close();
  await loadInfo();
  await loadRooms();
  if (roomId) reopenRoom();
}

function onStatus({ state, transport, inMs, reason, unauthorized }) {
  if (unauthorized) askForKey("That key was not accepted.");
  const via = transport === "sse" ? "SSE" : "WebSocket";
  const text = {
    connecting: `Connecting (${via})…`,
    connected: `Live · ${via}`,
    reconnecting: inMs != null ? `Reconnecting in ${Math.ceil(inMs / 1000)} s…` : "Reconnecting…",
    closed: `Disconnected: ${reason ?? ""}`,
  }[state];
  ui.status.textContent = text;
  ui.status.dataset.state = linkState = state;
  ui.status.dataset.transport = transport;
}

function act(frame) {
  hideNotice();
  connection?.act(frame);
}

// --- people ---------------------------------------------------------------------

function showPeople() {
  const you = people.you?.name ?? identity.name;
  ui.rename.textContent = you ? `You: ${you} ✎` : "Your name ✎";
  const names = [...people.members].map(([id, name]) => (id === people.you?.id ? `${name} (you)` : name));
  ui.members.hidden = names.length === 0;
  ui.members.textContent = `${names.length} here`;
  ui.members.title = `In this room: ${names.join(", ")}`;
  ui.members.setAttribute("aria-label", `${names.length} in this room: ${names.join(", ")}`);
  ui.typing.textContent = people.typingText;
}

let nameAsked = null; // resolves when the open name dialog closes

/** Ask for a display name (again); resolves when the dialog closes. */
function askForName(problem = "") {
  if (!ui.nameDialog.open) {
    ui.nameForm.elements.name.value = identity.name ?? "";
    ui.nameDialog.showModal();
    nameAsked = new Promise((resolve) => ui.nameDialog.addEventListener("close", resolve, { once: true }));
  }
  ui.nameError.textContent = problem;
  ui.nameError.hidden = !problem;
  return nameAsked;
}

function saveName(event) {
  event.preventDefault();
  const name = ui.nameForm.elements.name.value.trim();
  const problem = nameProblem(name);
  if (problem) {
    ui.nameError.textContent = problem;
    ui.nameError.hidden = false;
    return;
  }
  const changed = name !== identity.name;
  identity.name = name;
  ui.nameDialog.close();
  showPeople();
  if (!changed || !connection) return;
  if (linkState === "closed") reopenRoom(); // refused the old name
  else connection.act({ type: "rename", name });
}

function reopenRoom() {
  const id = roomId;
  roomId = null;
  openRoom(id);
}

// Tell the room while the draft grows (the gateway shows it for a few seconds, so
// every couple of seconds is enough), and when the draft is emptied or sent.
const TYPING_EVERY_MS = 2000;
let typingSentAt = 0; // when `typing` was last sent; 0: not typing

function noteTyping() {
  const drafting = ui.input.value.trim() !== "";
  const now = Date.now();
  if (drafting && now - typingSentAt >= TYPING_EVERY_MS) {
    typingSentAt = now;
    connection?.act({ type: "typing" });
  } else if (!drafting && typingSentAt) {
    typingSentAt = 0;
    connection?.act({ type: "typing", active: false });
  }
}

function newClientId() {
  return `c-${crypto.randomUUID?.() ?? Math.random().toString(36).slice(2)}`;
}

function sendMessage(content, clientId = newClientId()) {
  pending.set(clientId, content);
  act({ type: "send", content, id: clientId });
}

function updateControls() {
  const open = Boolean(roomId && conversation.room);
  const generating = conversation.generating;
  ui.input.disabled = !open;
  ui.send.disabled = !open || generating || ui.input.value.trim() === "";
  ui.send.hidden = generating;
  ui.stop.hidden = !generating;
  ui.messages.setAttribute("aria-busy", String(generating));
}

// --- notices --------------------------------------------------------------------

let noticeRetry = null;

function showNotice(text, { retry = null, label = "Retry" } = {}) {
  ui.noticeText.textContent = text;
  noticeRetry = retry;
  ui.noticeRetry.textContent = label;
  ui.noticeRetry.hidden = !retry;
  ui.notice.hidden = false;
}

function hideNotice() {
  ui.notice.hidden = true;
  noticeRetry = null;
}

// --- wiring ---------------------------------------------------------------------

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const content = ui.input.value;
  if (!content.trim() || conversation.generating) return;
  ui.input.value = "";
  sendMessage(content);
  noteTyping();
  updateControls();
});
ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});
ui.input.addEventListener("input", () => {
  noteTyping();
  updateControls();
});
ui.stop.addEventListener("click", () => {
  if (conversation.live) act({ type: "cancel", generation_id: conversation.live.generation_id });
});
ui.newRoom.addEventListener("click", () => openDialog(null));
ui.editRoom.addEventListener("click", async () => {
  // Fetched afresh: the owner's view has the grants and a secret system prompt.
  try {
    openDialog(await api.get(`/api/rooms/${encodeURIComponent(roomId)}`));
  } catch (error) {
    showNotice(`Could not load the room: ${error.message}`);
  }
});
ui.deleteRoom.addEventListener("click", deleteRoom);
ui.form.addEventListener("submit", saveRoom);
ui.keyForm.addEventListener("submit", saveKey);
ui.nameForm.addEventListener("submit", saveName);
ui.rename.addEventListener("click", () => askForName());
ui.formCancel.addEventListener("click", () => ui.dialog.close());
ui.noticeClose.addEventListener("click", hideNotice);
ui.noticeRetry.addEventListener("click", () => {
  const retry = noticeRetry;
  hideNotice();
  retry?.();
});
ui.toggleSidebar.addEventListener("click", () => {
  const open = ui.app.classList.toggle("sidebar-open");
  ui.toggleSidebar.setAttribute("aria-expanded", String(open));
});
window.addEventListener("hashchange", route);
// Other rooms' activity is not pushed: refresh the list when the page is looked at
// again, and its times every minute.
document.addEventListener("visibilitychange", () => {
  if (!document.hidden) loadRooms();
});
setInterval(drawRooms, 60_000);

showPeople();
if (!identity.name) await askForName(); // once, on the first visit
await Promise.all([loadInfo(), loadRooms()]);
route();
