// Who this browser is in rooms: a display name the person chose, and a random user id
// made once, so the gateway (without API keys) knows their messages after a reload.
// Both live in localStorage, shared by the tabs of this browser.

const NAME_STORAGE = "chat-gateway.name";
const USER_STORAGE = "chat-gateway.user";
export const NAME_MAX = 64;

// The gateway refuses control characters in a name (`invalid_name`).
const CONTROL = /[\u0000-\u001f\u007f-\u009f]/;

/** What is wrong with `name` as a display name, or null if nothing. */
export function nameProblem(name) {
  if (!name) return "A name is needed.";
  if (name.length > NAME_MAX) return `At most ${NAME_MAX} characters.`;
  if (CONTROL.test(name)) return "No control characters, please.";
  return null;
}

export const identity = {
  /** The chosen display name, or null before the person chose one. */
  get name() {
    return localStorage.getItem(NAME_STORAGE);
  },
  set name(value) {
    localStorage.setItem(NAME_STORAGE, value);
  },

  /** A stable id of [A-Za-z0-9._-], made on first use. */
  get user() {
    let user = localStorage.getItem(USER_STORAGE);
    if (!user) {
      // getRandomValues, unlike randomUUID, works on plain http too (a LAN address).
      const bytes = crypto.getRandomValues(new Uint8Array(12));
      user = `u-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
      localStorage.setItem(USER_STORAGE, user);
    }
    return user;
  },
};
