// The page: room list, persona editor, and the open room (#/rooms/{id}).

import { api, credentials } from "./api.js";
import { RoomConnection } from "./connection.js";
import { Conversation } from "./conversation.js";

const $ = (id) => document.getElementById(id);
const ui = {
  app: $("app"),
  sidebar: $("sidebar"),
  toggleSidebar: $("toggle-sidebar"),
  roomList: $("room-list"),
  newRoom: $("new-room"),
  roomName: $("room-name"),
  roomPersona: $("room-persona"),
  status: $("status"),
  editRoom: $("edit-room"),
  deleteRoom: $("delete-room"),
  messages: $("messages"),
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
  keyDialog: $("key-dialog"),
  keyForm: $("key-form"),
  keyError: $("key-form-error"),
};

const PERSONA_FIELDS = ["system_prompt", "model", "temperature", "max_tokens"];

let rooms = [];
let roomId = null;
let connection = null;
const pending = new Map(); // client id -> content of a send not yet confirmed

const conversation = new Conversation(ui.messages, {
  onSelect: (messageId) => act({ type: "select", message_id: messageId }),
  onRegenerate: (messageId, temperature) =>
    act({ type: "regenerate", message_id: messageId, ...(temperature == null ? {} : { temperature }) }),
  onChange: () => updateControls(),
  onLoadEarlier: () => loadEarlier(),
});

// `ready` holds only the newest messages of a long conversation (docs/protocol.md):
// the rest comes over REST when asked for.
async function loadEarlier() {
  const id = roomId;
  if (!id) return;
  try {
    const { messages } = await api.get(`/api/rooms/${encodeURIComponent(id)}/messages`);
    if (id === roomId) conversation.prependEarlier(messages);
  } catch (error) {
    showNotice(`Could not load the earlier messages: ${error.message}`);
  }
}

// --- rooms ----------------------------------------------------------------------

async function loadRooms() {
  try {
    rooms = (await api.get("/api/rooms?limit=1000")).rooms;
  } catch (error) {
    if (error.status === 401) askForKey(error.message);
    else showNotice(`Could not load the rooms: ${error.message}`, { retry: loadRooms });
    return;
  }
  ui.roomList.replaceChildren(
    ...rooms.map((room) => {
      const item = document.createElement("li");
      const link = document.createElement("a");
      link.href = `#/rooms/${encodeURIComponent(room.id)}`;
      link.textContent = room.name;
      if (room.id === roomId) link.setAttribute("aria-current", "page");
      item.append(link);
      return item;
    }),
  );
}

function describePersona(room) {
  const p = room.persona;
  const bits = [p.model ?? "default model"];
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
  const match = location.hash.match(/^#\/rooms\/([^/]+)$/);
  openRoom(match ? decodeURIComponent(match[1]) : null);
}

function openRoom(id) {
  if (id === roomId && connection) return;
  connection?.close();
  connection = null;
  roomId = id;
  pending.clear();
  hideNotice();
  conversation.clear();
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
  connection = new RoomConnection(id, { onFrame, onStatus });
  connection.open();
  updateControls();
}

function onFrame(frame) {
  conversation.apply(frame);
  switch (frame.type) {
    case "ready":
    case "resync":
    case "room":
      showRoomHeader(frame.room);
      break;
    case "message":
      if (frame.id) pending.delete(frame.id);
      break;
    case "error":
      onError(frame);
      break;
  }
  updateControls();
}

function onError(frame) {
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
  await loadRooms();
  if (roomId) {
    const id = roomId;
    roomId = null;
    openRoom(id);
  }
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
  ui.status.dataset.state = state;
  ui.status.dataset.transport = transport;
}

function act(frame) {
  hideNotice();
  connection?.act(frame);
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
  const empty = !conversation.messages.length;
  ui.messages.classList.toggle("is-empty", empty);
}

// --- notices --------------------------------------------------------------------

let noticeRetry = null;

function showNotice(text, { retry = null } = {}) {
  ui.noticeText.textContent = text;
  noticeRetry = retry;
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
  updateControls();
});
ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});
ui.input.addEventListener("input", updateControls);
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

await loadRooms();
route();
